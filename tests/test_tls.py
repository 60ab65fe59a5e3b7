"""TLS and mTLS with real handshakes over loopback: good, expired, wrong CA, wrong SAN, plaintext
client, old protocol versions, client identities, certificate rotation, metrics over HTTPS."""

from __future__ import annotations

import os
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recgw.v1 import upload_pb2, upload_pb2_grpc

from recgw_server.auth.tokens import hash_token
from recgw_server.dev.certs import Issued, write_dev_tls
from recgw_server.dev.stack import MotoS3, OpenBao, VaultIdentities, free_port, wait_until
from tests.harness import (
    ADMIN_TOKEN,
    UPLOADER,
    UPLOADER_TOKEN,
    GatewayThread,
    Metadata,
    MiB,
    Tenant,
    bearer,
    error_info,
    make_settings,
    read_object,
    register_canary,
    upload,
    upload_messages,
)
from tests.secure import Pki, ago, credentials, serial, served_certificate, tls_channel

BOUND_TOKEN = register_canary("bound-CANARY-TOKEN-" + uuid.uuid4().hex)


def health(channel: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest(service="recgw.v1.UploadService")
    return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)


def status_code(channel: grpc.Channel, metadata: Metadata = ()) -> grpc.StatusCode:
    """The code of a GetUploadStatus for an unknown id: NOT_FOUND once authenticated."""
    request = upload_pb2.GetUploadStatusRequest(upload_id=str(uuid.uuid4()))
    try:
        upload_pb2_grpc.UploadServiceStub(channel).GetUploadStatus(
            request, metadata=metadata, timeout=5
        )
    except grpc.RpcError as error:
        return error.code()
    raise AssertionError("an unknown upload id was found")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki.create(tmp_path_factory.mktemp("pki"))
    pki.install_server()
    return pki


@pytest.fixture(scope="module")
def tls_gateway(pki: Pki, openbao: OpenBao, identities: VaultIdentities) -> Iterator[GatewayThread]:
    settings = make_settings(openbao, identities, tls=pki.tls_setting())
    thread = GatewayThread(settings, channel_credentials=credentials(pki.ca.cert_pem))
    yield thread
    thread.stop()


def test_tls_serves_health_credentials_and_uploads(
    tls_gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant], pki: Pki
) -> None:
    assert health(tls_gateway.channel) == health_pb2.HealthCheckResponse.SERVING
    tenant = new_tenant(gateway=tls_gateway)  # SetCredentials over TLS
    data = os.urandom(6 * MiB)
    result = upload(tls_gateway, upload_messages(tenant.tenant_id, "tls/a.bin", data))
    assert result.size == len(data)
    assert read_object(moto, tenant.bucket, "uploads/tls/a.bin") == data
    with tls_channel(tls_gateway.port, pki.ca.cert_pem) as channel:
        assert status_code(channel, UPLOADER) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("case", ["wrong CA", "wrong SAN", "plaintext client"])
def test_client_refuses_or_is_refused(tls_gateway: GatewayThread, pki: Pki, case: str) -> None:
    if case == "wrong CA":
        channel = tls_channel(tls_gateway.port, Pki.create(pki.directory / "other").ca.cert_pem)
    elif case == "wrong SAN":
        channel = tls_channel(tls_gateway.port, pki.ca.cert_pem, server_name="other.example")
    else:
        channel = grpc.insecure_channel(
            f"127.0.0.1:{tls_gateway.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
    with channel, pytest.raises(grpc.RpcError) as caught:
        health(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_expired_server_certificate_is_refused_by_clients(
    make_gateway: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    pki = Pki.create(tmp_path)
    pki.install_server(not_before=ago(days=2), not_after=ago(hours=1))
    gateway = make_gateway(tls=pki.tls_setting(), channel_credentials=credentials(pki.ca.cert_pem))
    with pytest.raises(grpc.RpcError) as caught:
        health(gateway.channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        served_certificate(gateway.port, pki.ca_file)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_only_tls_1_2_and_newer(tls_gateway: GatewayThread, pki: Pki) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        assert served_certificate(tls_gateway.port, pki.ca_file, version).serial_number
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises(ssl.SSLError) as caught:
            served_certificate(tls_gateway.port, pki.ca_file, version)
        # The client did offer the old version (it was not refused on our side): the server
        # ended the handshake.
        assert "NO_PROTOCOLS_AVAILABLE" not in str(caught.value)


def _hold_stream(
    tenant: Tenant, data: bytes, upload_id: str, split: int, release: threading.Event
) -> Iterator[upload_pb2.UploadRequest]:
    for message in upload_messages(tenant.tenant_id, "rotated.bin", data, upload_id=upload_id):
        if message.write_offset == split:
            release.wait(60)
        yield message


def _replace(issued: Issued, pki: Pki) -> None:
    """Rotate as cert-manager does: new files moved into place, the key first."""
    issued.write(pki.directory / "next.pem", pki.directory / "next.key")
    os.replace(pki.directory / "next.key", pki.key_file)
    os.replace(pki.directory / "next.pem", pki.cert_file)


def test_rotated_certificate_serves_new_connections_while_a_stream_runs(
    make_gateway: Callable[..., GatewayThread],
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    tmp_path: Path,
) -> None:
    pki = Pki.create(tmp_path)
    first = pki.install_server()
    metrics_port = free_port()
    gateway = make_gateway(
        tls=pki.tls_setting(),
        channel_credentials=credentials(pki.ca.cert_pem),
        metrics_listen=f"127.0.0.1:{metrics_port}",
        metrics_tls=True,
        reload_check_seconds=0.05,
    )
    tenant = new_tenant(gateway=gateway)
    data = os.urandom(8 * MiB)
    upload_id = str(uuid.uuid4())
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            upload, gateway, _hold_stream(tenant, data, upload_id, 6 * MiB, release)
        )

        def committed() -> bool:
            request = upload_pb2.GetUploadStatusRequest(upload_id=upload_id)
            status = gateway.uploads.GetUploadStatus(request, metadata=UPLOADER, timeout=5)
            return status.committed_size >= 5 * MiB

        try:
            wait_until(committed, 30, "the first part")
            assert served_certificate(gateway.port, pki.ca_file).serial_number == serial(first)
            https = f"https://127.0.0.1:{metrics_port}/metrics"
            assert "recgw_uploads_started" in requests.get(https, verify=str(pki.ca_file)).text
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)

            second = pki.server()
            _replace(second, pki)
            assert served_certificate(gateway.port, pki.ca_file).serial_number == serial(second)
            with tls_channel(gateway.port, pki.ca.cert_pem) as channel:
                request = upload_pb2.GetUploadStatusRequest(upload_id=upload_id)
                status = upload_pb2_grpc.UploadServiceStub(channel).GetUploadStatus(
                    request, metadata=UPLOADER, timeout=5
                )
                assert status.state == upload_pb2.UPLOAD_STATE_OPEN
            wait_until(
                lambda: (
                    served_certificate(metrics_port, pki.ca_file).serial_number == serial(second)
                ),
                10,
                "the metrics port to serve the new certificate",
            )
        finally:
            release.set()
        result = running.result(60)  # the stream opened before the rotation finishes
    assert result.size == len(data)
    assert read_object(moto, tenant.bucket, "uploads/rotated.bin") == data


def test_half_done_rotation_keeps_the_old_pair(
    tls_gateway: GatewayThread, pki: Pki, tmp_path: Path
) -> None:
    before = served_certificate(tls_gateway.port, pki.ca_file).serial_number
    stranger = pki.server()
    # A new certificate whose key has not arrived yet: the gateway must not serve it.
    original = pki.cert_file.read_bytes()
    pki.cert_file.write_bytes(stranger.cert_pem)
    try:
        assert served_certificate(tls_gateway.port, pki.ca_file).serial_number == before
        assert health(tls_gateway.channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        pki.cert_file.write_bytes(original)


# -- mTLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls(
    pki: Pki, openbao: OpenBao, identities: VaultIdentities
) -> Iterator[tuple[GatewayThread, Pki]]:
    tokens = [
        {"name": "uploader", "role": "uploader", "sha256": hash_token(UPLOADER_TOKEN)},
        {"name": "admin", "role": "admin", "sha256": hash_token(ADMIN_TOKEN)},
        {"name": "fleet", "role": "uploader", "client_identity": "uri:spiffe://recgw.test/fleet"},
        {"name": "legacy", "role": "uploader", "client_identity": "cn:legacy-client"},
        {
            "name": "bound",
            "role": "uploader",
            "sha256": hash_token(BOUND_TOKEN),
            "client_identity": "dns:bound.recgw.test",
        },
    ]
    settings = make_settings(
        openbao,
        identities,
        tls=pki.tls_setting(mutual=True),
        tokens=[{**t, "tenants": ["*"]} for t in tokens],
    )
    admin_cert = pki.client("console", dns=["console.recgw.test"])
    thread = GatewayThread(settings, channel_credentials=credentials(pki.ca.cert_pem, admin_cert))
    yield thread, pki
    thread.stop()


def _client_cert(pki: Pki, case: str) -> Issued | None:
    other = Pki.create(pki.directory / "other-ca")
    return {
        "no certificate": None,
        "other CA": other.client("x", dns=["bound.recgw.test"]),
        "expired": pki.client(
            "x", dns=["bound.recgw.test"], not_before=ago(days=2), not_after=ago(hours=1)
        ),
        "fleet": pki.client("fleet", uris=["spiffe://recgw.test/fleet"]),
        "legacy cn": pki.client("legacy-client"),
        "bound": pki.client("bound", dns=["bound.recgw.test"]),
        "cn is not a dns san": pki.client("bound.recgw.test"),
        "stranger": pki.client("stranger", dns=["stranger.recgw.test"]),
    }[case]


_TOKENS = {"no token": "", "uploader token": UPLOADER_TOKEN, "bound token": BOUND_TOKEN}


@pytest.mark.parametrize(
    ("case", "token", "expected"),
    [
        ("no certificate", "uploader token", grpc.StatusCode.UNAVAILABLE),
        ("other CA", "bound token", grpc.StatusCode.UNAVAILABLE),
        ("expired", "bound token", grpc.StatusCode.UNAVAILABLE),
        ("fleet", "no token", grpc.StatusCode.NOT_FOUND),  # the certificate stands in
        ("legacy cn", "no token", grpc.StatusCode.NOT_FOUND),
        ("bound", "bound token", grpc.StatusCode.NOT_FOUND),  # token and certificate together
        ("fleet", "bound token", grpc.StatusCode.UNAUTHENTICATED),
        ("cn is not a dns san", "bound token", grpc.StatusCode.UNAUTHENTICATED),
        ("bound", "no token", grpc.StatusCode.UNAUTHENTICATED),  # bound needs its token too
        ("stranger", "no token", grpc.StatusCode.UNAUTHENTICATED),
        ("stranger", "uploader token", grpc.StatusCode.NOT_FOUND),
    ],
)
def test_mtls_client_identities(
    mtls: tuple[GatewayThread, Pki], case: str, token: str, expected: grpc.StatusCode
) -> None:
    gateway, pki = mtls
    metadata = bearer(_TOKENS[token]) if _TOKENS[token] else ()
    with tls_channel(gateway.port, pki.ca.cert_pem, _client_cert(pki, case)) as channel:
        assert status_code(channel, metadata) == expected


def test_mtls_denial_names_the_missing_identity(mtls: tuple[GatewayThread, Pki]) -> None:
    gateway, pki = mtls
    with tls_channel(gateway.port, pki.ca.cert_pem, _client_cert(pki, "fleet")) as channel:
        stub = upload_pb2_grpc.UploadServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetUploadStatus(
                upload_pb2.GetUploadStatusRequest(upload_id="x"), metadata=bearer(BOUND_TOKEN)
            )
    assert "dns:bound.recgw.test" in str(caught.value.details())
    assert error_info(caught.value)[0] == "TOKEN_INVALID"


def test_dev_tls_files_serve_mtls(
    make_gateway: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    files = write_dev_tls(tmp_path / "tls")
    assert files.server_key.stat().st_mode & 0o077 == 0
    assert files.client_key.stat().st_mode & 0o077 == 0
    client = Issued(files.client_cert.read_bytes(), files.client_key.read_bytes())
    gateway = make_gateway(
        tls={
            "cert_file": files.server_cert,
            "key_file": files.server_key,
            "client_ca_file": files.ca_file,
        },
        channel_credentials=credentials(files.ca_file.read_bytes(), client),
    )
    assert health(gateway.channel) == health_pb2.HealthCheckResponse.SERVING
    assert status_code(gateway.channel, UPLOADER) == grpc.StatusCode.NOT_FOUND
