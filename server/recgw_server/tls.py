"""TLS for the gRPC and metrics ports, with certificates re-read when their files change.

gRPC asks for the certificate configuration before every new connection's handshake (from one
of its own threads); the files are only read again when their stat changes, and a new pair is
only used once the key matches the certificate, so a half-written rotation is never served.
Connections already open keep the certificate they were made with. The minimum protocol is
gRPC core's: TLS 1.2.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)


class TlsError(Exception):
    """The TLS files cannot be used; the message says which and why (never their content)."""


def is_loopback(listen: str) -> bool:
    """Whether a listen address ("host:port", "[::1]:port", "unix:path") stays on this host."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_Stamp = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class CertificateMaterial:
    key_pem: bytes
    chain_pem: bytes
    client_ca_pem: bytes | None
    not_after: datetime


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read {what} {path}: {exc.strerror or type(exc).__name__}") from None


def load_material(
    cert_file: Path, key_file: Path, client_ca_file: Path | None
) -> CertificateMaterial:
    """Read and check the files: a chain, the leaf's key, and the client CA bundle if any."""
    chain_pem = _read(cert_file, "tls.cert_file")
    key_pem = _read(key_file, "tls.key_file")
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise TlsError(f"tls.cert_file {cert_file} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TlsError(f"tls.key_file {key_file} holds no unencrypted PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise TlsError(
            f"tls.key_file {key_file} is not the key of the first certificate in {cert_file}"
        )
    client_ca_pem = None
    if client_ca_file is not None:
        client_ca_pem = _read(client_ca_file, "tls.client_ca_file")
        try:
            x509.load_pem_x509_certificates(client_ca_pem)
        except ValueError:
            raise TlsError(
                f"tls.client_ca_file {client_ca_file} holds no PEM certificate"
            ) from None
    return CertificateMaterial(key_pem, chain_pem, client_ca_pem, chain[0].not_valid_after_utc)


class CertificateFiles:
    """The gateway's certificate chain, key and client CA, re-read when the files change."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.material = load_material(cert_file, key_file, client_ca_file)
        self.version = 1
        self._served_version = 1
        self._refused: _Stamp | None = None
        self._warn_if_expired()

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def _paths(self) -> list[Path]:
        return [self.cert_file, self.key_file] + (
            [self.client_ca_file] if self.client_ca_file else []
        )

    def _stat(self) -> _Stamp:
        stamps = []
        for path in self._paths():
            try:
                st = os.stat(path)
            except OSError:
                stamps.append((0, 0, 0))
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def _warn_if_expired(self) -> None:
        if self.material.not_after <= datetime.now(UTC):
            log.warning(
                "the TLS certificate in %s expired at %s; clients will refuse it",
                self.cert_file,
                self.material.not_after.isoformat(),
            )

    def refresh(self) -> bool:
        """Re-read the files if they changed; True when new material is in force."""
        with self._lock:
            stamp = self._stat()
            if stamp == self._stamp or stamp == self._refused:
                return False
            try:
                material = load_material(self.cert_file, self.key_file, self.client_ca_file)
            except TlsError as error:
                # Most likely a rotation half done: keep serving the old pair, look again later.
                self._refused = stamp
                log.warning("keeping the current TLS certificate: %s", error)
                return False
            self.material, self._stamp, self._refused = material, stamp, None
            self.version += 1
        log.info("TLS certificate reloaded from %s", self.cert_file)
        self._warn_if_expired()
        return True

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        material = self.material
        return grpc.ssl_server_certificate_configuration(
            [(material.key_pem, material.chain_pem)], root_certificates=material.client_ca_pem
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each new connection's handshake, on a gRPC thread.
        try:
            self.refresh()
            with self._lock:
                if self._served_version == self.version:
                    return None
                self._served_version = self.version
            return self._configuration()
        except Exception:  # an exception here would fail the handshake with no clue
            log.exception("checking the TLS files failed; keeping the current certificate")
            return None

    def server_credentials(self) -> grpc.ServerCredentials:
        fetch: Any = self._fetch  # the stubs omit that None means "no change"
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(), fetch, require_client_authentication=self.mutual
        )
