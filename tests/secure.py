"""Helpers for the security tests: a test PKI, TLS channels, raw TLS probes, config files."""

from __future__ import annotations

import datetime
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from recgw_server.auth.tokens import hash_token
from recgw_server.dev.certs import Authority, Issued
from recgw_server.dev.stack import OpenBao, VaultIdentities
from tests.harness import ADMIN_TOKEN, UPLOADER_TOKEN, register_canary


def ago(**delta: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(**delta)


@dataclass
class Pki:
    """A CA and a directory for the files a gateway reads."""

    directory: Path
    ca: Authority

    @classmethod
    def create(cls, directory: Path, name: str = "recgw test CA") -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        pki = cls(directory, Authority(name))
        pki.ca_file.write_bytes(pki.ca.cert_pem)
        return pki

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def cert_file(self) -> Path:
        return self.directory / "server.pem"

    @property
    def key_file(self) -> Path:
        return self.directory / "server.key"

    def server(self, **options: Any) -> Issued:
        """A server certificate for localhost and 127.0.0.1."""
        return self.ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], **options)

    def install_server(self, **options: Any) -> Issued:
        issued = self.server(**options)
        issued.write(self.cert_file, self.key_file)
        return issued

    def client(self, common_name: str, **options: Any) -> Issued:
        return self.ca.issue(common_name, client=True, **options)

    def tls_setting(self, mutual: bool = False) -> dict[str, Any]:
        return {
            "cert_file": self.cert_file,
            "key_file": self.key_file,
            "client_ca_file": self.ca_file if mutual else None,
        }


def credentials(ca_pem: bytes, client: Issued | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(ca_pem)
    return grpc.ssl_channel_credentials(ca_pem, client.key_pem, client.cert_pem)


def tls_channel(
    port: int,
    ca_pem: bytes,
    client: Issued | None = None,
    server_name: str = "localhost",
) -> grpc.Channel:
    """A channel with a connection of its own (no shared subchannel), so each makes a new
    TLS handshake."""
    return grpc.secure_channel(
        f"127.0.0.1:{port}",
        credentials(ca_pem, client),
        options=[
            ("grpc.ssl_target_name_override", server_name),
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


def served_certificate(
    port: int, ca_file: Path, version: ssl.TLSVersion | None = None
) -> x509.Certificate:
    """The certificate a new TLS connection to the port is served (raises on a failed handshake)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    if version is not None:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer old protocols at all
        context.minimum_version = context.maximum_version = version
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def serial(issued: Issued) -> int:
    return x509.load_pem_x509_certificate(issued.cert_pem).serial_number


def token_toml(name: str, role: str, tenants: list[str], **fields: Any) -> str:
    lines = [
        "[[tokens]]",
        f'name = "{name}"',
        f'role = "{role}"',
        "tenants = [" + ", ".join(f'"{t}"' for t in tenants) + "]",
    ]
    for key, value in fields.items():
        lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}")
    return "\n".join(lines) + "\n"


DEFAULT_TOKENS = token_toml(
    "uploader", "uploader", ["*"], sha256=hash_token(UPLOADER_TOKEN)
) + token_toml("admin", "admin", ["*"], sha256=hash_token(ADMIN_TOKEN))


def config_toml(
    port: int,
    data_dir: Path,
    bao: OpenBao,
    identities: VaultIdentities,
    tokens: str,
    *,
    top: str = "",
    with_secrets: bool = True,
) -> str:
    """A complete recgw.toml; the Vault secret ids are inline unless `with_secrets` is False
    (then they come from RECGW_VAULT__*__SECRET_ID)."""
    assert identities.writer.secret_id and identities.reader.secret_id
    writer = register_canary(identities.writer.secret_id.reveal())
    reader = register_canary(identities.reader.secret_id.reveal())
    return f"""
listen = "127.0.0.1:{port}"
plaintext = true
data_dir = "{data_dir}"
shutdown_grace_seconds = 2
{top}

[audit]
sink = "{data_dir / "audit.jsonl"}"

{tokens}

[vault]
address = "{bao.address}"

[vault.writer]
method = "approle"
role_id = "{identities.writer.role_id}"
{f'secret_id = "{writer}"' if with_secrets else ""}

[vault.reader]
method = "approle"
role_id = "{identities.reader.role_id}"
{f'secret_id = "{reader}"' if with_secrets else ""}

[uploads]
part_size_mib = 5
"""
