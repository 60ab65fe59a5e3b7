"""Bad input and failures: a precise status, a helpful message, no object, a healthy gateway."""

from __future__ import annotations

import http.server
import os
import threading
import uuid
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recgw.v1 import upload_pb2

from recgw_server.dev.stack import AwsKeys, MotoS3, free_port, seed_policy
from recgw_server.domain import Secret
from tests.conftest import SHARED_BUCKET
from tests.harness import (
    UPLOADER,
    GatewayThread,
    MiB,
    Tenant,
    details,
    expect_error,
    object_exists,
    set_credentials,
    upload,
    upload_messages,
)


def assert_healthy(gateway: GatewayThread) -> None:
    health = health_pb2_grpc.HealthStub(gateway.channel)
    response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def start_message(tenant_id: str, name: str, **start: object) -> upload_pb2.UploadRequest:
    return upload_pb2.UploadRequest(
        start=upload_pb2.UploadStart(tenant_id=tenant_id, object_name=name, **start)  # type: ignore[arg-type]
    )


@pytest.fixture
def tenant(gateway: GatewayThread, new_tenant: Callable[..., Tenant]) -> Tenant:
    return new_tenant(gateway=gateway)


def test_empty_stream(gateway: GatewayThread) -> None:
    error = expect_error(gateway, iter([]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start" in details(error)
    assert_healthy(gateway)


def test_data_before_start(gateway: GatewayThread, tenant: Tenant) -> None:
    error = expect_error(gateway, [upload_pb2.UploadRequest(write_offset=0, data=b"abc")])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "data came before start" in details(error)


def test_two_start_messages(gateway: GatewayThread, moto: MotoS3, tenant: Tenant) -> None:
    first = start_message(tenant.tenant_id, "two-starts.bin")
    first.data = b"abc"
    second = start_message(tenant.tenant_id, "two-starts.bin")
    second.write_offset = 3
    second.finish_write = True
    error = expect_error(gateway, [first, second])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only the first message may carry 'start'" in details(error)
    assert not object_exists(moto, tenant.bucket, "uploads/two-starts.bin")


@pytest.mark.parametrize("tenant_id", ["", "Upper", "../other", "a/b", "x" * 64, "-lead"])
def test_malformed_tenant_id(gateway: GatewayThread, tenant_id: str) -> None:
    error = expect_error(gateway, upload_messages(tenant_id, "a.bin", b"abc"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant_id must match" in details(error)


def test_tenant_without_credentials(gateway: GatewayThread) -> None:
    error = expect_error(gateway, upload_messages("nobody-" + uuid.uuid4().hex[:8], "a", b"x"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "SetCredentials" in details(error)


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("", "object_name is required"),
        ("/abs/path.bin", "remove the leading '/'"),
        ("a/../b.bin", "'..'"),
        ("./b.bin", "'.'"),
        ("bad\nname.bin", "control characters"),
        ("bad\x00name.bin", "control characters"),
        ("a//b.bin", "empty segments"),
        ("n" * 1020, "too long"),
    ],
)
def test_invalid_object_names(
    gateway: GatewayThread, moto: MotoS3, tenant: Tenant, name: str, hint: str
) -> None:
    error = expect_error(gateway, upload_messages(tenant.tenant_id, name, b"abc"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert hint in details(error)
    assert_healthy(gateway)


def test_wrong_write_offset(gateway: GatewayThread, moto: MotoS3, tenant: Tenant) -> None:
    messages = list(upload_messages(tenant.tenant_id, "offset.bin", b"a" * 1000, chunk=400))
    messages[1].write_offset = 123
    error = expect_error(gateway, messages)
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "send the bytes from offset 400" in details(error)
    assert not object_exists(moto, tenant.bucket, "uploads/offset.bin")


def test_data_after_finish_write(gateway: GatewayThread, moto: MotoS3, tenant: Tenant) -> None:
    messages = list(upload_messages(tenant.tenant_id, "after.bin", b"a" * 100))
    messages.append(upload_pb2.UploadRequest(write_offset=100, data=b"more"))
    error = expect_error(gateway, messages)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "followed finish_write" in details(error)
    assert not object_exists(moto, tenant.bucket, "uploads/after.bin")


def test_more_bytes_than_declared(gateway: GatewayThread, moto: MotoS3, tenant: Tenant) -> None:
    error = expect_error(
        gateway, upload_messages(tenant.tenant_id, "over.bin", b"a" * 100, expected_size=50)
    )
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "expected_size 50" in details(error)
    assert not object_exists(moto, tenant.bucket, "uploads/over.bin")


def test_short_upload_at_finish(gateway: GatewayThread, moto: MotoS3, tenant: Tenant) -> None:
    error = expect_error(
        gateway, upload_messages(tenant.tenant_id, "short.bin", b"a" * 100, expected_size=150)
    )
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "remaining 50 bytes" in details(error)
    assert not object_exists(moto, tenant.bucket, "uploads/short.bin")


def test_short_multipart_upload_at_finish(
    gateway: GatewayThread, moto: MotoS3, tenant: Tenant
) -> None:
    data = os.urandom(11 * MiB)
    error = expect_error(
        gateway,
        upload_messages(tenant.tenant_id, "short-mp.bin", data, expected_size=len(data) + 1),
    )
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert not object_exists(moto, tenant.bucket, "uploads/short-mp.bin")


def test_message_too_large(gateway: GatewayThread, moto: MotoS3, tenant: Tenant) -> None:
    error = expect_error(
        gateway,
        upload_messages(tenant.tenant_id, "huge.bin", b"a" * (5 * MiB), chunk=5 * MiB),
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not object_exists(moto, tenant.bucket, "uploads/huge.bin")
    assert_healthy(gateway)


def test_four_mib_messages_are_accepted(
    gateway: GatewayThread, moto: MotoS3, tenant: Tenant
) -> None:
    data = os.urandom(9 * MiB)
    response = upload(gateway, upload_messages(tenant.tenant_id, "4m.bin", data, chunk=4 * MiB))
    assert response.size == len(data)


@pytest.mark.parametrize("size", [1000, 7 * MiB])
def test_object_checksum_mismatch(
    gateway: GatewayThread, moto: MotoS3, tenant: Tenant, size: int
) -> None:
    data = os.urandom(size)
    wrong = upload_pb2.ObjectChecksums(crc32c=12345)
    error = expect_error(
        gateway, upload_messages(tenant.tenant_id, f"crc-{size}.bin", data, checksums=wrong)
    )
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert "CRC32C mismatch" in details(error)
    assert not object_exists(moto, tenant.bucket, f"uploads/crc-{size}.bin")


def test_sha256_mismatch(gateway: GatewayThread, moto: MotoS3, tenant: Tenant) -> None:
    wrong = upload_pb2.ObjectChecksums(sha256=b"\x00" * 32)
    error = expect_error(
        gateway, upload_messages(tenant.tenant_id, "sha.bin", b"abc", checksums=wrong)
    )
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert not object_exists(moto, tenant.bucket, "uploads/sha.bin")


def test_chunk_checksum_mismatch(gateway: GatewayThread, moto: MotoS3, tenant: Tenant) -> None:
    messages = list(upload_messages(tenant.tenant_id, "chunk-crc.bin", b"a" * 1000, chunk=500))
    messages[1].data_crc32c = 1
    error = expect_error(gateway, messages)
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert "offset 500" in details(error)
    assert not object_exists(moto, tenant.bucket, "uploads/chunk-crc.bin")


def test_stream_without_finish_leaves_no_object(
    gateway: GatewayThread, moto: MotoS3, tenant: Tenant
) -> None:
    data = os.urandom(6 * MiB)
    error = expect_error(
        gateway, upload_messages(tenant.tenant_id, "unfinished.bin", data, finish=False)
    )
    assert error.code() == grpc.StatusCode.ABORTED
    assert "without finish_write" in details(error)
    assert not object_exists(moto, tenant.bucket, "uploads/unfinished.bin")


def test_prefix_outside_policy_is_permission_denied(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(
        policy=seed_policy(SHARED_BUCKET, "uploads/*"),
        bucket=SHARED_BUCKET,
        prefix="elsewhere/",
        gateway=gateway,
    )
    error = expect_error(gateway, upload_messages(tenant.tenant_id, "x.bin", b"abc"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert SHARED_BUCKET in details(error)
    assert "elsewhere/x.bin" in details(error)
    # ...while the same policy lets a tenant under uploads/ write
    allowed = new_tenant(
        policy=seed_policy(SHARED_BUCKET, "uploads/*"), bucket=SHARED_BUCKET, gateway=gateway
    )
    assert upload(gateway, upload_messages(allowed.tenant_id, "x.bin", b"abc")).size == 3


def test_access_denied_on_multipart(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(
        policy=seed_policy(SHARED_BUCKET, "uploads/*"),
        bucket=SHARED_BUCKET,
        prefix="elsewhere/",
        gateway=gateway,
    )
    error = expect_error(gateway, upload_messages(tenant.tenant_id, "mp.bin", os.urandom(11 * MiB)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert_healthy(gateway)


def test_wrong_secret(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant()
    tenant.keys = AwsKeys(tenant.keys.access_key_id, Secret("WRONG-CANARY-SECRET-0123456789"))
    set_credentials(gateway, tenant, endpoint_url=moto.endpoint_url)
    error = expect_error(gateway, upload_messages(tenant.tenant_id, "wrong.bin", b"abc"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "credentials were rejected by S3" in details(error)
    assert "overwrite them with SetCredentials" in details(error)
    assert "SignatureDoesNotMatch" in details(error)
    assert not object_exists(moto, tenant.bucket, "uploads/wrong.bin")


def test_unknown_access_key(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant()
    tenant.keys = AwsKeys("AKIAUNKNOWN000000000", tenant.keys.secret_access_key)
    set_credentials(gateway, tenant, endpoint_url=moto.endpoint_url)
    error = expect_error(gateway, upload_messages(tenant.tenant_id, "unknown.bin", b"abc"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "InvalidAccessKeyId" in details(error)


def test_no_such_bucket(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(policy=seed_policy("recgw-missing-bucket"), bucket="recgw-missing-bucket")
    set_credentials(gateway, tenant, endpoint_url=moto.endpoint_url)
    error = expect_error(gateway, upload_messages(tenant.tenant_id, "nb.bin", b"abc"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "NoSuchBucket" in details(error)


class _SlowDownHandler(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that only ever says 503 SlowDown."""

    requests_seen = 0

    def _reply(self) -> None:
        type(self).requests_seen += 1
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = (
            b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
            b"<Message>Please reduce your request rate.</Message></Error>"
        )
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_POST = do_GET = do_HEAD = _reply

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_throttling_after_retries_is_unavailable(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowDownHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tenant = new_tenant()
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        set_credentials(gateway, tenant, endpoint_url=endpoint)
        error = expect_error(gateway, upload_messages(tenant.tenant_id, "slow.bin", b"abc"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "SlowDown" in details(error)
        assert _SlowDownHandler.requests_seen >= 2  # the test gateway retries once
    finally:
        server.shutdown()
    assert_healthy(gateway)


def test_unreachable_s3_is_unavailable(
    gateway: GatewayThread, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant()
    set_credentials(gateway, tenant, endpoint_url=f"http://127.0.0.1:{free_port()}")
    error = expect_error(gateway, upload_messages(tenant.tenant_id, "down.bin", b"abc"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "cannot reach the S3 endpoint" in details(error)


def test_vault_down_is_unavailable(
    make_gateway: Callable[..., GatewayThread],
    new_tenant: Callable[..., Tenant],
    gateway: GatewayThread,
) -> None:
    tenant = new_tenant(gateway=gateway)
    down = make_gateway(vault_address=f"http://127.0.0.1:{free_port()}")
    error = expect_error(down, upload_messages(tenant.tenant_id, "vault-down.bin", b"abc"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "Vault" in details(error)
    assert_healthy(down)


def test_unknown_upload_status(gateway: GatewayThread) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        gateway.uploads.GetUploadStatus(
            upload_pb2.GetUploadStatusRequest(upload_id=str(uuid.uuid4())), metadata=UPLOADER
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_malformed_upload_id(gateway: GatewayThread, tenant: Tenant) -> None:
    error = expect_error(
        gateway, upload_messages(tenant.tenant_id, "id.bin", b"abc", upload_id="not-a-uuid")
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "upload_id must be a UUID" in details(error)


def test_bad_metadata_key(gateway: GatewayThread, tenant: Tenant) -> None:
    error = expect_error(
        gateway, upload_messages(tenant.tenant_id, "m.bin", b"abc", metadata={"Bad Key": "v"})
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "metadata key" in details(error)
