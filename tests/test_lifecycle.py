"""Cancel, abort, status, back-pressure, conditional writes and encryption, end to end."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from recgw.v1 import credentials_pb2, upload_pb2

from recgw_server.dev.stack import MotoS3, wait_until
from tests.conftest import SHARED_BUCKET
from tests.harness import (
    UPLOADER,
    CapturedLogs,
    GatewayThread,
    MiB,
    Tenant,
    details,
    object_exists,
    read_object,
    resume_messages,
    upload,
    upload_messages,
)

_HELD: dict[str, HeldStream] = {}


class HeldStream:
    """An upload stream that sends some data, then waits until released or cancelled."""

    def __init__(
        self, gateway: GatewayThread, tenant: Tenant, name: str, data: bytes, chunk: int = MiB
    ) -> None:
        self.upload_id = str(uuid.uuid4())
        self.release = threading.Event()
        self.rest = b""
        self._messages = list(
            upload_messages(
                tenant.tenant_id, name, data, chunk=chunk, upload_id=self.upload_id, finish=False
            )
        )
        self._sent = len(data)
        self.future: Any = gateway.uploads.Upload.future(
            self._generate(), metadata=UPLOADER, timeout=120
        )
        _HELD[self.upload_id] = self

    def _generate(self) -> Iterator[upload_pb2.UploadRequest]:
        yield from self._messages
        self.release.wait(120)
        yield upload_pb2.UploadRequest(write_offset=self._sent, data=self.rest, finish_write=True)

    def finish(self) -> upload_pb2.UploadResponse:
        self.release.set()
        response: upload_pb2.UploadResponse = self.future.result(timeout=120)
        return response


def status(gateway: GatewayThread, upload_id: str) -> upload_pb2.GetUploadStatusResponse:
    response: upload_pb2.GetUploadStatusResponse = gateway.uploads.GetUploadStatus(
        upload_pb2.GetUploadStatusRequest(upload_id=upload_id), metadata=UPLOADER, timeout=10
    )
    return response


def wait_for_status(
    gateway: GatewayThread, upload_id: str, check: Callable[[Any], bool], what: str
) -> upload_pb2.GetUploadStatusResponse:
    def ready() -> bool:
        try:
            return check(status(gateway, upload_id))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            held = _HELD.get(upload_id)
            if held is not None and held.future.done():
                held.future.result()  # the stream ended before its start: say why
            return False

    try:
        wait_until(ready, 60, what)
    except TimeoutError as timeout:
        held = _HELD.get(upload_id)
        if held is not None and held.future.done():
            held.future.result()  # the stream failed: that error is the one to see
        # Say where the upload stood, to tell a stuck stream from a slow machine.
        budget = gateway.gateway.budget
        try:
            last = str(status(gateway, upload_id)).replace("\n", " ")
        except grpc.RpcError as error:
            last = f"status failed: {error.code()}"
        raise TimeoutError(
            f"{timeout}; last status: {last}; budget in use {budget.in_use} of "
            f"{budget.capacity}, {budget.waiting} waiting"
        ) from None
    return status(gateway, upload_id)


def abort_metric(gateway: GatewayThread, outcome: str) -> float:
    value = gateway.gateway.metrics.registry.get_sample_value(
        "recgw_multipart_aborts_total", {"outcome": outcome}
    )
    return value or 0.0


def open_multipart_uploads(moto: MotoS3, bucket: str, key: str) -> int:
    listing = moto.client("s3").list_multipart_uploads(Bucket=bucket, Prefix=key)
    return len([u for u in listing.get("Uploads", []) if u["Key"] == key])


@pytest.fixture
def tenant(gateway: GatewayThread, new_tenant: Callable[..., Tenant]) -> Tenant:
    return new_tenant(gateway=gateway)


def test_client_cancel_mid_stream_leaves_no_object_and_can_resume(
    gateway: GatewayThread, moto: MotoS3, tenant: Tenant
) -> None:
    data = os.urandom(13 * MiB)
    held = HeldStream(gateway, tenant, "cancelled.bin", data[: 6 * MiB])
    wait_for_status(gateway, held.upload_id, lambda s: s.committed_size >= 5 * MiB, "a part")
    held.future.cancel()
    held.release.set()
    after = wait_for_status(
        gateway, held.upload_id, lambda s: s.received_size == s.committed_size, "the detach"
    )
    # Nothing visible; the upload stays open with exactly the bytes that are durably in S3.
    assert after.state == upload_pb2.UPLOAD_STATE_OPEN
    assert after.committed_size == 5 * MiB
    assert not object_exists(moto, tenant.bucket, "uploads/cancelled.bin")
    response = upload(
        gateway,
        resume_messages(tenant, "cancelled.bin", data, held.upload_id, after.committed_size),
    )
    assert response.size == len(data)
    assert response.checksums.sha256 == hashlib.sha256(data).digest()
    assert read_object(moto, tenant.bucket, "uploads/cancelled.bin") == data


def test_abort_upload_under_seed_policy(
    gateway: GatewayThread, moto: MotoS3, tenant: Tenant
) -> None:
    held = HeldStream(gateway, tenant, "aborted.bin", os.urandom(6 * MiB))
    wait_for_status(gateway, held.upload_id, lambda s: s.committed_size >= 5 * MiB, "a part")
    report = gateway.uploads.AbortUpload(
        upload_pb2.AbortUploadRequest(upload_id=held.upload_id), metadata=UPLOADER
    )
    assert report.state == upload_pb2.UPLOAD_STATE_ABORTED
    assert not report.storage_aborted
    assert "lifecycle rule" in report.detail
    with pytest.raises(grpc.RpcError) as caught:
        held.future.result(timeout=30)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert not object_exists(moto, tenant.bucket, "uploads/aborted.bin")
    held.release.set()


def test_abort_upload_with_abort_permission(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
                "Resource": f"arn:aws:s3:::{SHARED_BUCKET}/uploads/*",
            }
        ],
    }
    tenant = new_tenant(policy=policy, bucket=SHARED_BUCKET, gateway=gateway)
    held = HeldStream(gateway, tenant, "abortable.bin", os.urandom(6 * MiB))
    wait_for_status(gateway, held.upload_id, lambda s: s.committed_size >= 5 * MiB, "a part")
    report = gateway.uploads.AbortUpload(
        upload_pb2.AbortUploadRequest(upload_id=held.upload_id), metadata=UPLOADER
    )
    assert report.storage_aborted
    assert open_multipart_uploads(moto, tenant.bucket, "uploads/abortable.bin") == 0
    assert not object_exists(moto, tenant.bucket, "uploads/abortable.bin")
    held.release.set()


def test_status_of_open_and_complete_uploads(gateway: GatewayThread, tenant: Tenant) -> None:
    held = HeldStream(gateway, tenant, "status.bin", b"x" * 1000, chunk=500)
    open_status = wait_for_status(
        gateway, held.upload_id, lambda s: s.received_size == 1000, "bytes received"
    )
    assert open_status.state == upload_pb2.UPLOAD_STATE_OPEN
    assert open_status.committed_size == 0  # nothing is durable in S3 yet
    assert open_status.key == "uploads/status.bin"
    assert open_status.tenant_id == tenant.tenant_id
    held.rest = b"yz"
    response = held.finish()
    done = status(gateway, held.upload_id)
    assert done.state == upload_pb2.UPLOAD_STATE_COMPLETE
    assert done.committed_size == 1002
    assert done.result == response
    abort = gateway.uploads.AbortUpload(
        upload_pb2.AbortUploadRequest(upload_id=held.upload_id), metadata=UPLOADER
    )
    assert abort.state == upload_pb2.UPLOAD_STATE_COMPLETE


def test_upload_id_header_arrives_before_the_end(gateway: GatewayThread, tenant: Tenant) -> None:
    held = HeldStream(gateway, tenant, "header.bin", b"x" * 10)
    metadata = dict(held.future.initial_metadata())
    assert metadata["x-recgw-upload-id"] == held.upload_id
    held.finish()


def test_generated_upload_id(gateway: GatewayThread, tenant: Tenant) -> None:
    response = upload(gateway, upload_messages(tenant.tenant_id, "gen-id.bin", b"abc"))
    assert uuid.UUID(response.upload_id)
    assert status(gateway, response.upload_id).state == upload_pb2.UPLOAD_STATE_COMPLETE


def test_a_lease_check_racing_the_end_of_an_upload_is_no_takeover(
    gateway: GatewayThread, tenant: Tenant
) -> None:
    """After a heartbeat gap every attached upload's lease is checked; one that finishes (and so
    gives its lease up) while the checks run must not be reported as taken over, while an
    upload whose lease really went elsewhere is fenced."""
    from recgw_server.domain import Reason, RecgwError

    manager = gateway.gateway.manager
    logs = CapturedLogs()
    logging.getLogger("recgw_server").addHandler(logs)
    try:
        done = upload(gateway, upload_messages(tenant.tenant_id, "lease-race.bin", b"abc"))
        finished = gateway.run(manager.find(done.upload_id))
        assert finished is not None and finished.lease is not None
        gateway.run(finished.check_lease())  # its own released lease: nothing to report

        held = HeldStream(gateway, tenant, "lease-taken.bin", os.urandom(MiB))
        wait_for_status(gateway, held.upload_id, lambda s: s.received_size == MiB, "the data")
        taken = gateway.run(
            manager.sessions.attach(held.upload_id, "another-replica", 30.0, force=True)
        )
        assert taken is not None
        open_upload = gateway.run(manager.find(held.upload_id))
        assert open_upload is not None
        with pytest.raises(RecgwError) as fenced:
            gateway.run(open_upload.check_lease())
        assert fenced.value.reason is Reason.WRITER_FENCED
        held.future.cancel()
        held.release.set()
    finally:
        logging.getLogger("recgw_server").removeHandler(logs)
    taken_over = [line for line in logs.lines if "taken over" in line]
    assert taken_over == [
        f"WARNING recgw_server.pipeline.uploads upload {held.upload_id} was "
        "taken over by another replica; its stream here stops"
    ]


def test_a_stream_short_of_memory_moves_its_part_to_disk_and_goes_on(
    make_gateway: Callable[..., GatewayThread],
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
) -> None:
    """Memory for each message is reserved before it is read. A stream whose next read does not
    fit the budget moves the part it fills to disk and waits without reading (HTTP/2 flow
    control pushes back); no stream fails for memory, and memory in use never exceeds the
    budget, although one stream alone could fill it several times over."""
    small = make_gateway(
        uploads={
            "memory_budget_mib": 5,
            "max_inflight_parts": 1,
            "tenant_memory_share": 1.0,
            "spill_after_seconds": 60,  # spills here come from waiting, not from slowness
        }
    )
    tenant = new_tenant(gateway=small)
    gateway = small.gateway
    budget, spool = gateway.budget, gateway.spool
    first = HeldStream(small, tenant, "budget-1.bin", b"1" * (4 * MiB))
    wait_for_status(small, first.upload_id, lambda s: s.received_size == 4 * MiB, "4 MiB")
    # After its fourth message, the read of the next found no room beside its own 4 MiB part:
    # the part went to disk instead of holding memory while the stream waits.
    wait_until(lambda: spool.spilled_parts == 1, 30, "the first stream's part to spill")
    assert budget.in_use <= 2 * MiB  # what it reserved for its next message
    second = HeldStream(small, tenant, "budget-2.bin", b"2" * (3 * MiB))
    wait_for_status(small, second.upload_id, lambda s: s.received_size == 3 * MiB, "3 MiB")
    first.rest = b"!" * MiB
    second.rest = b"?"
    assert first.finish().size == 5 * MiB
    assert second.finish().size == 3 * MiB + 1
    assert budget.high_water <= budget.capacity
    wait_until(lambda: budget.in_use == 0, 10, "all memory to come back")
    assert spool.budget.in_use == 0
    assert read_object(moto, tenant.bucket, "uploads/budget-1.bin") == b"1" * (4 * MiB) + b"!" * MiB
    assert read_object(moto, tenant.bucket, "uploads/budget-2.bin") == b"2" * (3 * MiB) + b"?"


def test_part_larger_than_budget_goes_through_the_spool(
    make_gateway: Callable[..., GatewayThread], moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    """A part that cannot fit in memory waits only until the spiller moves it to disk."""
    small = make_gateway(
        uploads={
            "memory_budget_mib": 5,
            "part_size_mib": 8,
            "tenant_memory_share": 1.0,
            "spill_after_seconds": 0.2,
        }
    )
    tenant = new_tenant(gateway=small)
    data = os.urandom(9 * MiB + 5)
    response = upload(small, upload_messages(tenant.tenant_id, "big-part.bin", data))
    assert response.size == len(data)
    assert response.part_count == 2
    assert small.gateway.spool.spilled_parts >= 1
    assert small.gateway.budget.high_water <= small.gateway.budget.capacity
    assert read_object(moto, tenant.bucket, "uploads/big-part.bin") == data
    assert small.gateway.spool.budget.in_use == 0
    assert not list(small.gateway.spool.directory.iterdir())  # spool files are gone


@pytest.mark.parametrize("size", [100, 7 * MiB])
def test_existing_object_is_never_overwritten(
    gateway: GatewayThread, moto: MotoS3, tenant: Tenant, size: int
) -> None:
    name = f"clash-{size}.bin"
    original = os.urandom(size)
    upload(gateway, upload_messages(tenant.tenant_id, name, original))
    with pytest.raises(grpc.RpcError) as caught:
        upload(gateway, upload_messages(tenant.tenant_id, name, os.urandom(size)))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "choose another object_name" in details(caught.value)
    assert read_object(moto, tenant.bucket, f"uploads/{name}") == original


def test_allow_overwrite_tenant_setting(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(gateway=gateway, allow_overwrite=True)
    upload(gateway, upload_messages(tenant.tenant_id, "over.bin", b"first"))
    upload(gateway, upload_messages(tenant.tenant_id, "over.bin", b"second"))
    assert read_object(moto, tenant.bucket, "uploads/over.bin") == b"second"


def test_sse_s3_is_applied_to_every_write(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    encryption = credentials_pb2.ServerSideEncryption(
        mode=credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_S3
    )
    tenant = new_tenant(gateway=gateway, encryption=encryption)
    small = upload(gateway, upload_messages(tenant.tenant_id, "sse-small.bin", b"abc"))
    large = upload(gateway, upload_messages(tenant.tenant_id, "sse-mp.bin", os.urandom(6 * MiB)))
    s3 = moto.client("s3")
    for key in (small.key, large.key):
        assert s3.head_object(Bucket=tenant.bucket, Key=key)["ServerSideEncryption"] == "AES256"


@pytest.mark.moto_only("MinIO has one static KMS key here; another key id is kms:KeyNotFound")
def test_sse_kms_is_applied(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    key_id = "arn:aws:kms:us-east-1:123456789012:key/" + str(uuid.uuid4())
    encryption = credentials_pb2.ServerSideEncryption(
        mode=credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_KMS, kms_key_id=key_id
    )
    tenant = new_tenant(gateway=gateway, encryption=encryption)
    response = upload(gateway, upload_messages(tenant.tenant_id, "kms.bin", b"abc"))
    head = moto.client("s3").head_object(Bucket=tenant.bucket, Key=response.key)
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"] == key_id


def test_concurrent_uploads_are_independent(
    gateway: GatewayThread, moto: MotoS3, tenant: Tenant
) -> None:
    payloads = {f"par-{i}.bin": os.urandom(3 * MiB + i) for i in range(4)}
    futures = {
        name: gateway.uploads.Upload.future(
            upload_messages(tenant.tenant_id, name, data), metadata=UPLOADER, timeout=120
        )
        for name, data in payloads.items()
    }
    for name, future in futures.items():
        assert future.result().size == len(payloads[name])
        assert read_object(moto, tenant.bucket, f"uploads/{name}") == payloads[name]


def test_shutdown_keeps_open_uploads_resumable(
    make_gateway: Callable[..., GatewayThread],
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    captured_logs: CapturedLogs,
    tmp_path: Path,
) -> None:
    stopping = make_gateway(data_dir=tmp_path)
    tenant = new_tenant(gateway=stopping)
    data = os.urandom(8 * MiB)
    held = HeldStream(stopping, tenant, "shutdown.bin", data[: 6 * MiB])
    wait_for_status(stopping, held.upload_id, lambda s: s.committed_size >= 5 * MiB, "a part")
    already_logged = len(captured_logs.lines)
    stopping.stop()
    held.release.set()
    assert not any("failed" in line for line in captured_logs.lines[already_logged:])
    assert not object_exists(moto, tenant.bucket, "uploads/shutdown.bin")
    restarted = make_gateway(data_dir=tmp_path)
    after = status(restarted, held.upload_id)
    assert after.state == upload_pb2.UPLOAD_STATE_OPEN
    assert after.committed_size == 5 * MiB
    response = upload(
        restarted, resume_messages(tenant, "shutdown.bin", data, held.upload_id, 5 * MiB)
    )
    assert read_object(moto, tenant.bucket, response.key) == data
