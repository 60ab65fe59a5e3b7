"""Resumable, verifiable uploads: offsets, idempotent finish, writers, checksums, expiry, store."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable

import grpc
import pytest
from awscrt import checksums
from recgw.v1 import upload_pb2

from recgw_server.dev.stack import MotoS3
from tests.harness import (
    UPLOADER,
    GatewayThread,
    MiB,
    Tenant,
    details,
    expect_error,
    object_exists,
    read_object,
    resume_messages,
    upload,
    upload_messages,
)
from tests.test_lifecycle import HeldStream, status, wait_for_status


@pytest.fixture
def tenant(gateway: GatewayThread, new_tenant: Callable[..., Tenant]) -> Tenant:
    return new_tenant(gateway=gateway)


def interrupted(
    gateway: GatewayThread, tenant: Tenant, name: str, data: bytes, sent: int
) -> tuple[str, int]:
    """Send `sent` bytes of `data`, cut the stream; returns the upload id and committed size."""
    held = HeldStream(gateway, tenant, name, data[:sent])
    wait_for_status(gateway, held.upload_id, lambda s: s.received_size == sent, "bytes received")
    held.future.cancel()
    held.release.set()
    after = wait_for_status(
        gateway, held.upload_id, lambda s: s.received_size == s.committed_size, "the detach"
    )
    assert after.state == upload_pb2.UPLOAD_STATE_OPEN
    return held.upload_id, after.committed_size


def test_resume_needs_the_committed_offset(
    gateway: GatewayThread, moto: MotoS3, tenant: Tenant
) -> None:
    data = os.urandom(12 * MiB)
    upload_id, committed = interrupted(gateway, tenant, "offset.bin", data, 7 * MiB)
    assert committed == 5 * MiB
    for wrong in (0, 7 * MiB):
        error = expect_error(gateway, resume_messages(tenant, "offset.bin", data, upload_id, wrong))
        assert error.code() == grpc.StatusCode.OUT_OF_RANGE
        assert f"committed size {committed}" in details(error)
    # the refused attempts changed nothing: the right offset still works
    response = upload(gateway, resume_messages(tenant, "offset.bin", data, upload_id, committed))
    assert read_object(moto, tenant.bucket, response.key) == data


def test_resume_must_name_the_same_object(gateway: GatewayThread, tenant: Tenant) -> None:
    data = os.urandom(6 * MiB)
    upload_id, committed = interrupted(gateway, tenant, "same.bin", data, 6 * MiB)
    error = expect_error(gateway, resume_messages(tenant, "other.bin", data, upload_id, committed))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "same tenant_id and object_name" in details(error)


def test_finish_is_idempotent(gateway: GatewayThread, tenant: Tenant) -> None:
    data = os.urandom(7 * MiB)
    first = upload(gateway, upload_messages(tenant.tenant_id, "idem.bin", data))
    repeat = upload_pb2.UploadRequest(
        start=upload_pb2.UploadStart(
            tenant_id=tenant.tenant_id, object_name="idem.bin", upload_id=first.upload_id
        ),
        write_offset=len(data),
        finish_write=True,
        object_checksums=upload_pb2.ObjectChecksums(sha256=hashlib.sha256(data).digest()),
    )
    assert upload(gateway, [repeat]) == first
    repeat.write_offset = 3
    error = expect_error(gateway, [repeat])
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    repeat.write_offset = len(data)
    repeat.object_checksums.sha256 = b"\x01" * 32
    assert expect_error(gateway, [repeat]).code() == grpc.StatusCode.DATA_LOSS
    more = upload_pb2.UploadRequest()
    more.CopyFrom(repeat)
    more.data = b"more"
    more.ClearField("object_checksums")
    assert expect_error(gateway, [more]).code() == grpc.StatusCode.FAILED_PRECONDITION


def test_second_writer_is_aborted(gateway: GatewayThread, tenant: Tenant) -> None:
    held = HeldStream(gateway, tenant, "writers.bin", b"a" * 1000)
    wait_for_status(gateway, held.upload_id, lambda s: s.received_size == 1000, "first writer")
    error = expect_error(
        gateway, resume_messages(tenant, "writers.bin", b"a" * 2000, held.upload_id, 0)
    )
    assert error.code() == grpc.StatusCode.ABORTED
    assert "another stream is writing" in details(error)
    held.rest = b"b"
    assert held.finish().size == 1001  # the first writer was not disturbed


def test_chunk_checksum_mismatch_commits_nothing_of_it(
    gateway: GatewayThread, moto: MotoS3, tenant: Tenant
) -> None:
    data = os.urandom(8 * MiB)
    upload_id = str(uuid.uuid4())
    messages = list(upload_messages(tenant.tenant_id, "crc.bin", data, upload_id=upload_id))
    messages[6].data_crc32c = checksums.crc32c(messages[6].data) ^ 1  # bytes 6..7 MiB
    error = expect_error(gateway, messages)
    assert error.code() == grpc.StatusCode.DATA_LOSS
    after = status(gateway, upload_id)
    assert (after.state, after.committed_size) == (upload_pb2.UPLOAD_STATE_OPEN, 5 * MiB)
    good = resume_messages(tenant, "crc.bin", data, upload_id, 5 * MiB)
    assert read_object(moto, tenant.bucket, upload(gateway, good).key) == data


@pytest.mark.parametrize("size", [1000, 7 * MiB])
def test_object_checksum_mismatch_leaves_the_upload_open(
    gateway: GatewayThread, moto: MotoS3, tenant: Tenant, size: int
) -> None:
    data = os.urandom(size)
    upload_id = str(uuid.uuid4())
    name = f"sum-{size}.bin"
    wrong = upload_pb2.ObjectChecksums(sha256=b"\x00" * 32, crc32c=checksums.crc32c(data))
    error = expect_error(
        gateway, upload_messages(tenant.tenant_id, name, data, upload_id=upload_id, checksums=wrong)
    )
    assert error.code() == grpc.StatusCode.DATA_LOSS
    after = status(gateway, upload_id)
    assert after.state == upload_pb2.UPLOAD_STATE_OPEN
    assert not object_exists(moto, tenant.bucket, f"uploads/{name}")
    right = upload_pb2.ObjectChecksums(
        sha256=hashlib.sha256(data).digest(), crc32c=checksums.crc32c(data)
    )
    response = upload(
        gateway,
        resume_messages(tenant, name, data, upload_id, after.committed_size, checksums=right),
    )
    assert read_object(moto, tenant.bucket, response.key) == data
    assert response.checksums == right


def test_checksums_span_resumes(gateway: GatewayThread, moto: MotoS3, tenant: Tenant) -> None:
    data = os.urandom(17 * MiB)
    upload_id, committed = interrupted(gateway, tenant, "span.bin", data, 11 * MiB)
    assert committed == 10 * MiB
    sums = upload_pb2.ObjectChecksums(
        sha256=hashlib.sha256(data).digest(), crc32c=checksums.crc32c(data)
    )
    response = upload(
        gateway, resume_messages(tenant, "span.bin", data, upload_id, committed, checksums=sums)
    )
    assert response.checksums == sums
    assert status(gateway, upload_id).result == response


def test_unknown_length_crosses_part_size_steps(
    make_gateway: Callable[..., GatewayThread],
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
) -> None:
    # parts double every 2 parts: 5, 5, 10, 10, 20 MiB ...
    growing = make_gateway(uploads={"growth_interval_parts": 2, "memory_budget_mib": 64})
    tenant = new_tenant(gateway=growing)
    data = os.urandom(36 * MiB)
    upload_id, committed = interrupted(growing, tenant, "growing.bin", data, 23 * MiB)
    assert committed == 20 * MiB  # parts 1-3 (5+5+10); part 4 was still being filled
    response = upload(growing, resume_messages(tenant, "growing.bin", data, upload_id, committed))
    assert response.part_count == 5  # 5+5+10+10+6
    assert read_object(moto, tenant.bucket, response.key) == data


def test_idle_uploads_expire(
    make_gateway: Callable[..., GatewayThread],
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
) -> None:
    expiring = make_gateway(uploads={"idle_timeout_seconds": 60})
    tenant = new_tenant(gateway=expiring)
    data = os.urandom(6 * MiB)
    upload_id, committed = interrupted(expiring, tenant, "idle.bin", data, 6 * MiB)
    manager = expiring.gateway.manager
    assert expiring.run(manager.expire_idle(now=time.time())) == []  # not idle long enough
    assert expiring.run(manager.expire_idle(now=time.time() + 61)) == [upload_id]
    after = status(expiring, upload_id)
    assert after.state == upload_pb2.UPLOAD_STATE_EXPIRED
    assert "expired" in after.error_message
    registry = expiring.gateway.metrics.registry
    assert registry.get_sample_value("recgw_multipart_aborts_total", {"outcome": "denied"}) == 1
    error = expect_error(expiring, resume_messages(tenant, "idle.bin", data, upload_id, committed))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expired" in details(error)


def test_abort_of_a_detached_upload(gateway: GatewayThread, moto: MotoS3, tenant: Tenant) -> None:
    upload_id, _ = interrupted(gateway, tenant, "detached.bin", os.urandom(6 * MiB), 6 * MiB)
    report = gateway.uploads.AbortUpload(
        upload_pb2.AbortUploadRequest(upload_id=upload_id), metadata=UPLOADER
    )
    assert report.state == upload_pb2.UPLOAD_STATE_ABORTED
    assert not report.storage_aborted  # the seed policy has no AbortMultipartUpload
    assert "lifecycle rule" in report.detail
    assert status(gateway, upload_id).state == upload_pb2.UPLOAD_STATE_ABORTED


def test_equal_part_sizes_tenant_setting(
    make_gateway: Callable[..., GatewayThread],
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
) -> None:
    growing = make_gateway(uploads={"growth_interval_parts": 2, "memory_budget_mib": 64})
    equal = new_tenant(gateway=growing, equal_part_sizes=True)
    data = os.urandom(26 * MiB)
    response = upload(growing, upload_messages(equal.tenant_id, "equal.bin", data))
    assert response.part_count == 6  # 5 MiB each and 1 MiB: no growth for this tenant
    assert read_object(moto, equal.bucket, response.key) == data
    grows = new_tenant(gateway=growing)
    assert upload(growing, upload_messages(grows.tenant_id, "g.bin", data)).part_count == 4
