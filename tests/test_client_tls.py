"""The client's TLS options against a grpc.aio gateway fake with TLS: real handshakes.

A throwaway CA (made here with `cryptography`) signs the server's certificate, for the
name gateway.test only, and the clients' certificates for mTLS.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import typer.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from recgw.v1 import upload_pb2_grpc

from recgw_client import RecgwError, TlsConfig, UploadClient, UploadState
from recgw_client._channel import channel_credentials_for
from recgw_client.cli import commands as cli_client
from recgw_server.dev.stack import free_port
from tests.test_client_unit import TOKEN, WAIT, FakeGateway

SERVER_NAME = "gateway.test"
Key = ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Authority:
    """A throwaway CA that signs server and client certificates."""

    key: Key
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str, *, server: bool) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a server named ``name`` or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


@dataclass
class Pki:
    ca_file: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from another CA
    stranger_key: Path
    authority: Authority


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    authority = Authority.create("recgw test CA")
    stranger = Authority.create("another CA")
    files: dict[str, bytes] = {"ca.pem": authority.pem}
    files["client.pem"], files["client.key"] = authority.issue("media-server-1", server=False)
    files["stranger.pem"], files["stranger.key"] = stranger.issue("intruder", server=False)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    return Pki(
        ca_file=directory / "ca.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        stranger_cert=directory / "stranger.pem",
        stranger_key=directory / "stranger.key",
        authority=authority,
    )


class TlsGateway:
    """The fake gateway on its own event loop thread, serving TLS (mTLS if asked)."""

    def __init__(self, pki: Pki, require_client_auth: bool) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        cert, key = pki.authority.issue(SERVER_NAME, server=True)
        self._credentials = grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=pki.authority.pem if require_client_auth else None,
            require_client_auth=require_client_auth,
        )
        self._server: grpc.aio.Server | None = None
        port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(WAIT)
        self.address = f"127.0.0.1:{port}"

    async def _start(self) -> int:
        self._server = grpc.aio.server()
        upload_pb2_grpc.add_UploadServiceServicer_to_server(FakeGateway(), self._server)
        port = self._server.add_secure_port(f"127.0.0.1:{free_port()}", self._credentials)
        await self._server.start()
        return port

    def stop(self) -> None:
        assert self._server is not None
        asyncio.run_coroutine_threadsafe(self._server.stop(None), self._loop).result(WAIT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT)


@pytest.fixture(scope="module")
def tls_gateway(pki: Pki) -> Iterator[TlsGateway]:
    gateway = TlsGateway(pki, require_client_auth=False)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def mtls_gateway(pki: Pki) -> Iterator[TlsGateway]:
    gateway = TlsGateway(pki, require_client_auth=True)
    yield gateway
    gateway.stop()


def status(address: str, **security: object) -> UploadState:
    async def run() -> UploadState:
        async with UploadClient(address, TOKEN, timeout=WAIT, **security) as client:  # type: ignore[arg-type]
            return (await client.get_upload_status("u-1")).state

    return asyncio.run(run())


def refused(address: str, **security: object) -> RecgwError:
    with pytest.raises(RecgwError) as caught:
        status(address, **security)
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    return caught.value


def test_tls_with_the_ca_and_the_server_name(tls_gateway: TlsGateway, pki: Pki) -> None:
    tls = TlsConfig(ca_file=pki.ca_file, server_name=SERVER_NAME)
    assert status(tls_gateway.address, tls=tls) is UploadState.COMPLETE


def test_tls_checks_the_certificate_and_its_name(tls_gateway: TlsGateway, pki: Pki) -> None:
    refused(tls_gateway.address, tls=TlsConfig(server_name=SERVER_NAME))  # system roots
    refused(tls_gateway.address, tls=TlsConfig(ca_file=pki.ca_file))  # 127.0.0.1 is not its name
    refused(tls_gateway.address, tls=TlsConfig(ca_file=pki.ca_file, server_name="other.test"))
    # Plaintext (the default on loopback) does not talk to a TLS gateway.
    refused(tls_gateway.address)


def test_mtls_needs_a_client_certificate_from_the_gateways_ca(
    mtls_gateway: TlsGateway, pki: Pki
) -> None:
    address = mtls_gateway.address
    refused(address, tls=TlsConfig(ca_file=pki.ca_file, server_name=SERVER_NAME))
    stranger = TlsConfig(
        ca_file=pki.ca_file,
        server_name=SERVER_NAME,
        cert_file=pki.stranger_cert,
        key_file=pki.stranger_key,
    )
    refused(address, tls=stranger)
    tls = TlsConfig(
        ca_file=pki.ca_file,
        server_name=SERVER_NAME,
        cert_file=pki.client_cert,
        key_file=pki.client_key,
    )
    assert status(address, tls=tls) is UploadState.COMPLETE


def test_plaintext_only_on_loopback_or_when_asked(tmp_path: Path) -> None:
    for loopback in ("127.0.0.1:50051", "127.3.2.1:1", "localhost:50051", "[::1]:50051"):
        assert channel_credentials_for(loopback) is None, loopback
        assert channel_credentials_for(loopback, plaintext=False) is not None, loopback
    for remote in ("gateway.example.com:443", "10.0.0.7:50051", "dns:///gw.internal:50051"):
        assert channel_credentials_for(remote) is not None, remote
        assert channel_credentials_for(remote, plaintext=True) is None, remote
    with pytest.raises(ValueError, match="either plaintext"):
        channel_credentials_for("gw:1", TlsConfig(), plaintext=True)
    with pytest.raises(ValueError, match="needs its key"):
        TlsConfig(cert_file=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="cannot read the CA file"):
        TlsConfig(ca_file=tmp_path / "missing.pem").credentials()


def test_cli_tls_options(
    tls_gateway: TlsGateway, mtls_gateway: TlsGateway, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECGW_TOKEN", TOKEN)
    app = cli_client.make_app(plugins=False)
    runner = typer.testing.CliRunner()
    tls = ["--ca-file", str(pki.ca_file), "--server-name", SERVER_NAME]
    result = runner.invoke(app, ["status", "u-1", "--address", tls_gateway.address, *tls])
    assert result.exit_code == 0, result.output
    assert "COMPLETE" in result.stdout
    mtls = [*tls, "--cert-file", str(pki.client_cert), "--key-file", str(pki.client_key)]
    result = runner.invoke(app, ["status", "u-1", "--address", mtls_gateway.address, *mtls])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["status", "u-1", "--address", tls_gateway.address, "--plaintext"])
    assert result.exit_code == 1 and "UNAVAILABLE" in result.stderr
    result = runner.invoke(app, ["status", "u-1", "--plaintext", *tls])
    assert result.exit_code == 2 and "--plaintext cannot go with" in result.stderr
    result = runner.invoke(app, ["status", "u-1", "--cert-file", str(pki.client_cert)])
    assert result.exit_code == 2 and "needs its key" in result.stderr
