"""The identities of a verified client certificate: its SAN DNS names and URIs, and its CN."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

from cryptography import x509
from cryptography.x509.oid import NameOID


@functools.lru_cache(maxsize=1024)
def certificate_identities(pem: bytes) -> tuple[str, ...]:
    """("dns:...", "uri:...", "cn:...") of a PEM certificate, SANs first."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return ()
    identities: list[str] = []
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        identities += [f"dns:{n}" for n in names.get_values_for_type(x509.DNSName)]
        identities += [
            f"uri:{n}" for n in names.get_values_for_type(x509.UniformResourceIdentifier)
        ]
    for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attribute.value
        identities.append(f"cn:{value.decode() if isinstance(value, bytes) else value}")
    return tuple(identities)


def peer_identities(auth_context: Mapping[str, Iterable[bytes]]) -> tuple[str, ...]:
    """The identities of the client certificate gRPC verified for this call (none without mTLS)."""
    pems = list(auth_context.get("x509_pem_cert") or ())
    return certificate_identities(bytes(pems[0])) if pems else ()
