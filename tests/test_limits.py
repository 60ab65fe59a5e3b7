"""Per-tenant concurrent uploads and per-token call rates: one tenant cannot starve another."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recgw.v1 import upload_pb2

from recgw_server.api.limits import TenantUploadLimits
from recgw_server.auth.guard import TokenBucket
from recgw_server.auth.tokens import hash_token
from recgw_server.config import LimitsSetting
from recgw_server.dev.stack import MotoS3, wait_until
from recgw_server.domain import RecgwError
from tests.harness import (
    ADMIN_TOKEN,
    UPLOADER,
    GatewayThread,
    Metadata,
    MiB,
    Tenant,
    bearer,
    error_info,
    read_object,
    register_canary,
    set_credentials,
    upload_messages,
)

FLOOD_TOKEN = register_canary("flood-CANARY-TOKEN-" + uuid.uuid4().hex)
CALM_TOKEN = register_canary("calm-CANARY-TOKEN-" + uuid.uuid4().hex)
FLOOD, CALM = bearer(FLOOD_TOKEN), bearer(CALM_TOKEN)


def _held(tenant: Tenant, release: threading.Event) -> Iterator[upload_pb2.UploadRequest]:
    """An upload stream that holds after its first message until `release` is set."""
    for message in upload_messages(tenant.tenant_id, f"held/{uuid.uuid4()}", b"h" * 2 * MiB):
        if message.write_offset:
            release.wait(60)
        yield message


def _code(call: Callable[[], object]) -> tuple[str, str, dict[str, str]]:
    try:
        call()
    except grpc.RpcError as error:
        reason, details = error_info(error)
        return error.code().name, reason, details
    return "OK", "", {}


def test_a_flooding_tenant_does_not_stop_another_tenants_upload(
    make_gateway: Callable[..., GatewayThread],
    new_tenant: Callable[..., Tenant],
    moto: MotoS3,
) -> None:
    flooder, calm = new_tenant(), new_tenant()
    gateway = make_gateway(
        tokens=[
            {
                "name": "flood",
                "role": "uploader",
                "sha256": hash_token(FLOOD_TOKEN),
                "tenants": [flooder.tenant_id],
                "calls_per_second": 2,
                "burst": 6,
            },
            {
                "name": "calm",
                "role": "uploader",
                "sha256": hash_token(CALM_TOKEN),
                "tenants": ["*"],
            },
            {"name": "admin", "role": "admin", "sha256": hash_token(ADMIN_TOKEN), "tenants": ["*"]},
        ],
        limits={"max_uploads_per_tenant": 2},
    )
    for tenant in (flooder, calm):
        set_credentials(gateway, tenant, endpoint_url=moto.endpoint_url)
    uploads = gateway.uploads
    release = threading.Event()
    outcomes: Counter[tuple[str, str]] = Counter()
    limits_named: set[tuple[str, str]] = set()
    done = threading.Event()

    def upload(metadata: Metadata, messages: Iterator[upload_pb2.UploadRequest]) -> object:
        return uploads.Upload(messages, metadata=metadata, timeout=60)

    def flood() -> None:
        # Streams and status queries as fast as the gateway answers, until the calm upload ends.
        while not done.is_set():
            for call in (
                lambda: upload(FLOOD, iter(upload_messages(flooder.tenant_id, "f", b"f"))),
                lambda: uploads.GetUploadStatus(
                    upload_pb2.GetUploadStatusRequest(upload_id=str(uuid.uuid4())),
                    metadata=FLOOD,
                    timeout=10,
                ),
            ):
                code, reason, details = _code(call)
                outcomes[code, reason] += 1
                if "limit" in details:
                    limits_named.add((details["limit"], details["limit_value"]))

    with ThreadPoolExecutor(4) as pool:
        held: list[Future[object]] = [
            pool.submit(upload, FLOOD, _held(flooder, release)) for _ in range(2)
        ]
        flooding: Future[None] | None = None
        try:
            wait_until(
                lambda: gateway.gateway.tenant_limits.active(flooder.tenant_id) == 2,
                10,
                "2 streams",
            )
            flooding = pool.submit(flood)
            data = os.urandom(12 * MiB)
            calm_result = upload(CALM, upload_messages(calm.tenant_id, "calm.bin", data))
            statuses = [
                _code(
                    lambda: uploads.GetUploadStatus(
                        upload_pb2.GetUploadStatusRequest(upload_id=str(uuid.uuid4())),
                        metadata=CALM,
                    )
                )[0]
                for _ in range(20)
            ]
        finally:
            done.set()
            release.set()
            if flooding is not None:
                flooding.result(30)
        for stream in held:  # the flooder's own uploads were held, not broken
            assert stream.result(60)
    assert calm_result.size == len(data)  # type: ignore[attr-defined]
    assert read_object(moto, calm.bucket, "uploads/calm.bin") == data
    assert statuses == ["NOT_FOUND"] * 20  # the calm token was never rate limited
    assert outcomes["RESOURCE_EXHAUSTED", "RATE_LIMITED"] > 0
    assert ("calls_per_second", "2") in limits_named
    # The burst left room for the first flooding streams: the tenant limit refused those.
    assert outcomes["RESOURCE_EXHAUSTED", "TENANT_LIMIT_EXCEEDED"] > 0
    assert ("max_uploads_per_tenant", "2") in limits_named
    assert set(outcomes) <= {
        ("RESOURCE_EXHAUSTED", "RATE_LIMITED"),
        ("RESOURCE_EXHAUSTED", "TENANT_LIMIT_EXCEEDED"),
        ("NOT_FOUND", "UPLOAD_NOT_FOUND"),
    }, outcomes
    health = health_pb2_grpc.HealthStub(gateway.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == 1


def test_tenant_limit_refuses_the_stream_beyond_it(
    make_gateway: Callable[..., GatewayThread], new_tenant: Callable[..., Tenant], moto: MotoS3
) -> None:
    gateway = make_gateway(limits={"max_uploads_per_tenant": 1})
    tenant = new_tenant(gateway=gateway)
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            gateway.uploads.Upload, _held(tenant, release), metadata=UPLOADER, timeout=60
        )
        try:
            wait_until(lambda: gateway.gateway.tenant_limits.active(tenant.tenant_id), 10, "slot")
            with pytest.raises(grpc.RpcError) as caught:
                gateway.uploads.Upload(
                    upload_messages(tenant.tenant_id, "second", b"x"), metadata=UPLOADER
                )
        finally:
            release.set()
        assert first.result(60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    reason, details = error_info(caught.value)
    assert reason == "TENANT_LIMIT_EXCEEDED"
    assert details == {"limit": "max_uploads_per_tenant", "limit_value": "1"}
    assert "max_uploads_per_tenant" in str(caught.value.details())
    # The slot is free again once the first stream ended.
    wait_until(lambda: not gateway.gateway.tenant_limits.active(tenant.tenant_id), 10, "free")
    result = gateway.uploads.Upload(
        upload_messages(tenant.tenant_id, "third", b"x"), metadata=UPLOADER, timeout=60
    )
    assert result.size == 1


def test_tenant_limit_overrides_and_release() -> None:
    setting = LimitsSetting(max_uploads_per_tenant=1, tenant_max_uploads={"big": 3})
    limits = TenantUploadLimits(setting.max_uploads)
    slots = [limits.acquire("big") for _ in range(3)]
    with pytest.raises(RecgwError):
        limits.acquire("big")
    small = limits.acquire("small")
    with pytest.raises(RecgwError):
        limits.acquire("small")
    small.release()
    small.release()  # a second release changes nothing
    assert limits.active("small") == 0
    limits.acquire("small")
    for slot in slots:
        slot.release()
    assert limits.active("big") == 0
    assert TenantUploadLimits(LimitsSetting().max_uploads).acquire("x")  # 0: no limit


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.take() for _ in range(3)] == [0, 0, 0]
    wait = bucket.take()
    assert 0 < wait <= 0.1


@pytest.mark.parametrize("accept_wait", [1, 60])
def test_new_calls_wait_for_a_busy_event_loop_as_configured(
    make_gateway: Callable[..., GatewayThread],
    new_tenant: Callable[..., Tenant],
    accept_wait: int,
) -> None:
    """grpc.aio takes one new call per turn of the event loop; calls that arrive while the loop
    is busy wait in gRPC for `server.accept_wait_seconds` and are then cancelled unseen. With
    hundreds of streams at once, gRPC's default of 30 s was too short (the bench's 500-stream
    scenario lost streams that way); the gateway waits 300 s by default."""
    gateway = make_gateway(server={"accept_wait_seconds": accept_wait})
    tenant = new_tenant(gateway=gateway)
    blocked = threading.Event()

    def block_the_loop() -> None:  # the loop stands for one busy with other streams
        blocked.set()
        time.sleep(3)

    gateway.call_soon(block_the_loop)
    assert blocked.wait(10)
    with ThreadPoolExecutor(4) as pool:
        calls = [
            pool.submit(
                gateway.uploads.Upload,
                upload_messages(tenant.tenant_id, f"queued-{n}.bin", b"x"),
                metadata=UPLOADER,
                timeout=60,
            )
            for n in range(4)
        ]
        outcomes = [call.exception(60) for call in calls]
    failed = [outcome for outcome in outcomes if outcome is not None]
    if accept_wait >= 60:
        assert failed == []
    else:  # all but the call gRPC had already matched to the server's one waiting request
        errors = [error for error in failed if isinstance(error, grpc.RpcError)]
        assert len(errors) == len(failed) >= 2
        assert {error.code() for error in errors} == {grpc.StatusCode.CANCELLED}
