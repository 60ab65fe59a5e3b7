"""Two gateway replicas over one real PostgreSQL: resume anywhere, stale writers fenced, and
credentials changes seen by every replica at once.

The replicas run in this process (each on its own event loop and port) with different replica
ids, sharing PostgreSQL, OpenBao and moto; lease times are scaled down by configuration.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import psycopg
import pytest
from recgw.v1 import upload_pb2, upload_pb2_grpc

from recgw_server.dev.stack import AwsKeys, MotoS3, wait_until
from recgw_server.domain import Secret, StorageTarget
from recgw_server.sessions.postgres import PostgresSessionStore
from tests.harness import (
    UPLOADER,
    GatewayThread,
    MiB,
    Tenant,
    details,
    error_info,
    expect_error,
    read_object,
    register_canary,
    resume_messages,
    set_credentials,
    upload,
    upload_messages,
)
from tests.proxy import CuttableProxy
from tests.test_lifecycle import HeldStream, abort_metric, status, wait_for_status

LEASE_SECONDS = 3.0


class Replicas:
    def __init__(self, url: str, a: GatewayThread, b: GatewayThread) -> None:
        self.url = url
        self.a = a
        self.b = b


@pytest.fixture
def replicas(make_replicas: Callable[..., tuple[str, list[GatewayThread]]]) -> Replicas:
    url, (a, b) = make_replicas(
        "replica-a", "replica-b", lease_seconds=LEASE_SECONDS, heartbeat_seconds=0.25
    )
    return Replicas(url, a, b)


def stored(url: str, upload_id: str) -> Any:
    """The session record as PostgreSQL has it."""
    import asyncio

    async def read() -> Any:
        store = PostgresSessionStore(url)
        await store.open()
        try:
            return await store.get(upload_id)
        finally:
            await store.close()

    return asyncio.run(read())


def test_upload_started_on_a_resumes_on_b_after_its_stream_was_cut(
    replicas: Replicas, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    a, b = replicas.a, replicas.b
    tenant = new_tenant(gateway=a)
    data = os.urandom(12 * MiB)
    upload_id = str(uuid.uuid4())
    hold = threading.Event()

    def stream() -> Iterator[upload_pb2.UploadRequest]:
        for message in upload_messages(tenant.tenant_id, "moved.bin", data, upload_id=upload_id):
            if message.write_offset == 7 * MiB:
                hold.wait(60)
            yield message

    proxy = CuttableProxy(a.port)
    try:
        with grpc.insecure_channel(proxy.address) as channel:
            call = upload_pb2_grpc.UploadServiceStub(channel).Upload.future(
                stream(), metadata=UPLOADER, timeout=60
            )
            wait_for_status(a, upload_id, lambda s: s.received_size == 7 * MiB, "7 MiB on A")
            proxy.cut()
            with pytest.raises(grpc.RpcError):
                call.result()
            hold.set()
    finally:
        proxy.close()
    # A notices the dead connection, detaches and lets go of the lease.
    wait_for_status(a, upload_id, lambda s: s.received_size == s.committed_size, "A's detach")
    on_b = status(b, upload_id)
    assert (on_b.state, on_b.committed_size) == (upload_pb2.UPLOAD_STATE_OPEN, 5 * MiB)
    response = upload(b, resume_messages(tenant, "moved.bin", data, upload_id, 5 * MiB))
    assert read_object(moto, tenant.bucket, response.key) == data
    record = stored(replicas.url, upload_id)
    assert (record.state, record.holder, record.generation) == ("complete", "", 2)
    assert status(b, upload_id).state == upload_pb2.UPLOAD_STATE_COMPLETE


def resume_when_the_lease_frees(
    gateway: GatewayThread, messages: Callable[[], Iterator[upload_pb2.UploadRequest]]
) -> tuple[upload_pb2.UploadResponse, int]:
    """Resume, retrying while another replica holds the lease; returns the refusals too."""
    refusals = 0
    deadline = time.monotonic() + 10 * LEASE_SECONDS
    while True:
        try:
            return upload(gateway, messages()), refusals
        except grpc.RpcError as error:
            refused = error.code() == grpc.StatusCode.ABORTED
            if not refused or "another gateway replica" not in details(error):
                raise
            if time.monotonic() > deadline:
                raise
            refusals += 1
            time.sleep(0.1)


def test_a_frozen_writer_is_fenced_after_another_replica_took_over(
    replicas: Replicas, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    a, b = replicas.a, replicas.b
    tenant = new_tenant(gateway=a)
    data = os.urandom(12 * MiB)
    held = HeldStream(a, tenant, "frozen.bin", data[: 6 * MiB])
    wait_for_status(a, held.upload_id, lambda s: s.committed_size == 5 * MiB, "part 1 on A")

    def rest() -> Iterator[upload_pb2.UploadRequest]:
        return resume_messages(tenant, "frozen.bin", data, held.upload_id, 5 * MiB)

    refused = expect_error(b, rest())  # A lives: B may not take its upload
    assert refused.code() == grpc.StatusCode.ABORTED
    assert error_info(refused)[0] == "ANOTHER_WRITER"
    assert "another gateway replica is writing" in details(refused)
    # A "freezes": its stream stays attached, but its heartbeat stops.
    assert a.gateway.heartbeats is not None
    a.call_soon(a.gateway.heartbeats.cancel)
    response, _ = resume_when_the_lease_frees(b, rest)
    assert read_object(moto, tenant.bucket, response.key) == data
    # A wakes up and finishes its stream: its FINISHING write is fenced, so it never completes.
    with pytest.raises(grpc.RpcError) as fenced:
        held.finish()
    assert fenced.value.code() == grpc.StatusCode.ABORTED
    assert error_info(fenced.value)[0] == "WRITER_FENCED"
    assert abort_metric(a, "denied") + abort_metric(a, "aborted") + abort_metric(a, "failed") == 0
    record = stored(replicas.url, held.upload_id)
    assert (record.state, record.result["etag"]) == ("complete", response.etag)
    assert read_object(moto, tenant.bucket, response.key) == data
    assert status(a, held.upload_id).state == upload_pb2.UPLOAD_STATE_COMPLETE  # A re-read it


def test_abort_through_b_ends_the_stream_on_a(
    replicas: Replicas, new_tenant: Callable[..., Tenant]
) -> None:
    a, b = replicas.a, replicas.b
    tenant = new_tenant(gateway=a)
    held = HeldStream(a, tenant, "aborted.bin", os.urandom(6 * MiB))
    wait_for_status(a, held.upload_id, lambda s: s.committed_size == 5 * MiB, "part 1 on A")
    report = b.uploads.AbortUpload(
        upload_pb2.AbortUploadRequest(upload_id=held.upload_id), metadata=UPLOADER
    )
    assert report.state == upload_pb2.UPLOAD_STATE_ABORTED
    assert abort_metric(b, "denied") == 1  # B found A's multipart upload and tried to abort it
    with pytest.raises(grpc.RpcError) as ended:
        held.finish()
    assert ended.value.code() == grpc.StatusCode.ABORTED
    assert error_info(ended.value)[0] in ("WRITER_FENCED", "UPLOAD_ABORTED")
    assert stored(replicas.url, held.upload_id).state == "aborted"


def _new_access_key(moto: MotoS3, tenant: Tenant) -> AwsKeys:
    """A second key of the tenant's IAM user; the old one is deleted after the switch."""
    user = "tenant-" + tenant.tenant_id.removeprefix("t-")
    key = moto.client("iam").create_access_key(UserName=user)["AccessKey"]
    return AwsKeys(key["AccessKeyId"], Secret(register_canary(key["SecretAccessKey"])))


def _delete_access_key(moto: MotoS3, tenant: Tenant, keys: AwsKeys) -> None:
    user = "tenant-" + tenant.tenant_id.removeprefix("t-")
    moto.client("iam").delete_access_key(UserName=user, AccessKeyId=keys.access_key_id)


def _small_upload(gateway: GatewayThread, tenant: Tenant, name: str) -> upload_pb2.UploadResponse:
    return upload(gateway, upload_messages(tenant.tenant_id, name, os.urandom(1000)))


def _listener_pids(url: str, replica: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (f"recgw-credentials {replica}"[:63],),
        ).fetchall()
    return [int(row[0]) for row in rows]


def test_credentials_set_through_a_are_used_by_b_at_once(
    replicas: Replicas, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    a, b = replicas.a, replicas.b
    tenant = new_tenant(gateway=a)
    endpoint = moto.endpoint_url
    _small_upload(b, tenant, "first.bin")  # B caches the credentials (TTL 30 s) and a client

    def rotate(through: GatewayThread | None) -> None:
        """New access key for the tenant, the old one deleted in IAM."""
        old = tenant.keys
        tenant.keys = _new_access_key(moto, tenant)
        if through is not None:
            set_credentials(through, tenant, endpoint_url=endpoint)
        else:  # straight into Vault: nobody is told
            target = StorageTarget(
                region="us-east-1",
                bucket=tenant.bucket,
                prefix=tenant.prefix,
                endpoint_url=endpoint,
                force_path_style=True,
            )
            admin = a.gateway.adapters.admin
            a.run(
                admin.set(
                    tenant.tenant_id,
                    tenant.keys.access_key_id,
                    tenant.keys.secret_access_key,
                    target,
                )
            )
        _delete_access_key(moto, tenant, old)

    rotate(through=a)
    _small_upload(b, tenant, "after-set.bin")  # B dropped the old ones when A published

    # A change B cannot hear about: B keeps the credentials it cached, the deleted key fails.
    rotate(through=None)
    with pytest.raises(grpc.RpcError):
        _small_upload(b, tenant, "stale.bin")
    # B's notification connection dies: B drops every cached credential and listens again.
    [old_pid] = _listener_pids(replicas.url, b.gateway.replica_id)
    with psycopg.connect(replicas.url, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (old_pid,)).fetchone() == (True,)

    def listening_again() -> bool:
        pids = _listener_pids(replicas.url, b.gateway.replica_id)
        return len(pids) == 1 and pids != [old_pid]

    wait_until(listening_again, 15, "B's new notification connection")
    _small_upload(b, tenant, "after-reconnect.bin")
    # and the new connection hears changes as the first did
    rotate(through=a)
    _small_upload(b, tenant, "after-second-set.bin")
