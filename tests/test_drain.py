"""Draining on shutdown (SIGTERM): two in-process replicas over one real PostgreSQL.

Replica A is stopped with a grace period while streams run on it: a stream that reaches a part
boundary ends there with SHUTTING_DOWN and the committed size, one that finishes within the
grace finishes, one still mid-part when the grace ends is detached and its lease released, so
replica B resumes it at once. Leases are long here (30 s), so a resume that had to wait for a
lease to lapse would be obvious.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recgw.v1 import credentials_pb2_grpc, upload_pb2, upload_pb2_grpc

from recgw_client import UploadResult
from recgw_client import upload as client_upload
from recgw_server.dev.stack import (
    MotoS3,
    OpenBao,
    PostgresCluster,
    VaultIdentities,
    free_port,
    wait_until,
)
from recgw_server.domain import Reason, RecgwError
from recgw_server.pipeline.model import StartRequest
from tests.harness import (
    ADMIN_TOKEN,
    UPLOADER,
    UPLOADER_TOKEN,
    GatewayThread,
    MiB,
    ServedGateway,
    Tenant,
    assert_no_secrets,
    error_info,
    listening,
    read_object,
    resume_messages,
    set_credentials,
    upload,
    upload_messages,
)
from tests.served_config import serve_env, serve_toml
from tests.test_lifecycle import status, wait_for_status
from tests.test_replicas import stored

LEASE_SECONDS = 30.0


class Pair:
    def __init__(self, url: str, a: GatewayThread, b: GatewayThread) -> None:
        self.url, self.a, self.b = url, a, b


@pytest.fixture
def pair(make_replicas: Callable[..., tuple[str, list[GatewayThread]]]) -> Pair:
    url, (a, b) = make_replicas(
        "drain-a", "drain-b", lease_seconds=LEASE_SECONDS, heartbeat_seconds=1.0
    )
    return Pair(url, a, b)


class GatedStream:
    """An upload stream on its own channel that waits at `gate_at` bytes until `go` is set."""

    def __init__(
        self, gateway: GatewayThread, tenant: Tenant, name: str, data: bytes, gate_at: int
    ) -> None:
        self.upload_id = str(uuid.uuid4())
        self.go = threading.Event()
        self.channel = grpc.insecure_channel(gateway.address)
        messages = upload_messages(tenant.tenant_id, name, data, upload_id=self.upload_id)

        def generate() -> Iterator[upload_pb2.UploadRequest]:
            for message in messages:
                if message.write_offset == gate_at:
                    self.go.wait(60)
                yield message

        stub = upload_pb2_grpc.UploadServiceStub(self.channel)
        self.call = stub.Upload.future(generate(), metadata=UPLOADER, timeout=60)

    def error(self) -> grpc.RpcError:
        error = self.call.exception(timeout=60)
        assert isinstance(error, grpc.RpcError), "the stream should have failed"
        return error

    def close(self) -> None:
        self.go.set()
        self.channel.close()


class Stopping:
    """`gateway.stop(grace)` in a thread, timed."""

    def __init__(self, gateway: GatewayThread, grace: float) -> None:
        self.started = time.monotonic()
        self.seconds = -1.0
        self._thread = threading.Thread(target=self._run, args=(gateway, grace), daemon=True)
        self._thread.start()
        manager = gateway.gateway.manager
        wait_until(lambda: manager.draining, 10, "the drain")

    def _run(self, gateway: GatewayThread, grace: float) -> None:
        gateway.stop(grace=grace)
        self.seconds = time.monotonic() - self.started

    def join(self) -> float:
        self._thread.join(90)
        assert self.seconds >= 0, "the gateway did not stop"
        return self.seconds


def test_a_stream_at_a_part_boundary_ends_there_with_the_committed_size(
    pair: Pair, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    a, b = pair.a, pair.b
    tenant = new_tenant(gateway=a)
    data = os.urandom(12 * MiB)
    stream = GatedStream(a, tenant, "boundary.bin", data, gate_at=3 * MiB)
    try:
        wait_for_status(a, stream.upload_id, lambda s: s.received_size == 3 * MiB, "3 MiB on A")
        stopping = Stopping(a, grace=30)
        stream.go.set()  # it goes on sending: part 1 fills at 5 MiB, the next message ends it
        error = stream.error()
    finally:
        stream.close()
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    reason, metadata = error_info(error)
    assert reason == "SHUTTING_DOWN"
    assert metadata == {"upload_id": stream.upload_id, "committed_size": str(5 * MiB)}
    record = stored(pair.url, stream.upload_id)
    # Ended before the stream's status went out: detached and the lease let go.
    assert (record.state, record.committed_size, record.holder) == ("open", 5 * MiB, "")
    assert stopping.join() < 20, "the drain ended once no stream was left, not at the grace"
    on_b = status(b, stream.upload_id)
    assert (on_b.committed_size, on_b.received_size) == (5 * MiB, 5 * MiB)
    response = upload(b, resume_messages(tenant, "boundary.bin", data, stream.upload_id, 5 * MiB))
    assert read_object(moto, tenant.bucket, response.key) == data


def test_a_stream_that_finishes_within_the_grace_completes_and_new_streams_go_elsewhere(
    pair: Pair, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    a = pair.a
    tenant = new_tenant(gateway=a)
    data = os.urandom(4 * MiB + 17)  # one part: finished with a single PutObject
    stream = GatedStream(a, tenant, "short.bin", data, gate_at=3 * MiB)
    try:
        wait_for_status(a, stream.upload_id, lambda s: s.received_size == 3 * MiB, "3 MiB on A")
        stopping = Stopping(a, grace=30)

        def refused(request: StartRequest) -> bool:
            try:
                a.run(a.gateway.manager.start(request))
            except RecgwError as error:
                return error.reason is Reason.SHUTTING_DOWN
            return False

        # A stream that reaches the pipeline while draining is refused (the listener is closed
        # too, so new connections are refused before that).
        assert refused(StartRequest(tenant.tenant_id, "late.bin", upload_id=str(uuid.uuid4())))
        wait_until(lambda: not listening(a.port), 5, "A's listener to close")
        with grpc.insecure_channel(a.address) as late, pytest.raises(grpc.RpcError) as new_stream:
            upload_pb2_grpc.UploadServiceStub(late).Upload(
                upload_messages(tenant.tenant_id, "late.bin", b"late"),
                metadata=UPLOADER,
                timeout=10,
            )
        assert new_stream.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(new_stream.value)[0] in ("", "SHUTTING_DOWN")
        stream.go.set()
        response = stream.call.result(timeout=60)
    finally:
        stream.close()
    assert (response.size, response.part_count) == (len(data), 0)
    assert read_object(moto, tenant.bucket, response.key) == data
    assert stopping.join() < 20
    assert stored(pair.url, stream.upload_id).state == "complete"


def test_a_stream_mid_part_at_the_end_of_the_grace_resumes_on_b_at_once(
    pair: Pair, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    a, b = pair.a, pair.b
    tenant = new_tenant(gateway=a)
    data = os.urandom(12 * MiB)
    # Part 1 committed, 1 MiB of part 2 buffered, then silence (a slow live call).
    stream = GatedStream(a, tenant, "mid-part.bin", data, gate_at=6 * MiB)
    try:
        wait_for_status(
            a,
            stream.upload_id,
            lambda s: (s.committed_size, s.received_size) == (5 * MiB, 6 * MiB),
            "part 1 committed and 1 MiB more on A",
        )
        grace = 2.0
        stopping = Stopping(a, grace=grace)
        error = stream.error()
        ended = time.monotonic()
    finally:
        stream.close()
    assert ended - stopping.started < grace + 2, "the stream must end with the grace"
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    reason, metadata = error_info(error)
    assert (reason, metadata["committed_size"]) == ("SHUTTING_DOWN", str(5 * MiB))
    record = stored(pair.url, stream.upload_id)
    assert (record.holder, record.generation) == ("", 1), "A released its lease"
    # B takes the upload over at once: one stream, no ANOTHER_WRITER, no lease to wait out.
    response = upload(b, resume_messages(tenant, "mid-part.bin", data, stream.upload_id, 5 * MiB))
    resumed_after = time.monotonic() - ended
    assert resumed_after < LEASE_SECONDS / 3, f"the resume took {resumed_after:.1f} s"
    assert read_object(moto, tenant.bucket, response.key) == data
    record = stored(pair.url, stream.upload_id)
    assert (record.state, record.generation) == ("complete", 2)
    assert stopping.join() < grace + 5


def served_replica(
    tmp_path: Path, name: str, url: str, openbao: OpenBao, identities: VaultIdentities
) -> ServedGateway:
    """`recgw serve` as a process, one replica over the shared PostgreSQL database `url`."""
    port = free_port()
    home = tmp_path / name
    home.mkdir()
    config = home / "recgw.toml"
    sections = f"""
[uploads]
part_size_mib = 5

[sessions]
url = "{url}"
replica_id = "{name}"
lease_seconds = {LEASE_SECONDS}
heartbeat_seconds = 1
"""
    tokens = {"uploader": UPLOADER_TOKEN, "admin": ADMIN_TOKEN}
    toml = serve_toml(
        port, home, openbao, identities, tokens=tokens, shutdown_grace=20, sections=sections
    )
    config.write_text(toml)
    env = serve_env(identities)
    return ServedGateway(config, env, port, home / "serve.log")


def holder_of(url: str, upload_id: str) -> str:
    record = stored(url, upload_id)
    return str(record.holder) if record is not None else ""


def received(port: int, upload_id: str) -> int:
    """The bytes the replica on `port` has received of the upload (its memory knows)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = upload_pb2_grpc.UploadServiceStub(channel).GetUploadStatus(
            upload_pb2.GetUploadStatusRequest(upload_id=upload_id), metadata=UPLOADER, timeout=5
        )
    return int(reply.received_size)


def refuses_connections(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.UNAVAILABLE
    return False


def test_sigterm_on_recgw_serve_while_a_python_client_uploads_loses_nothing(
    tmp_path: Path,
    postgres: PostgresCluster,
    openbao: OpenBao,
    identities: VaultIdentities,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
) -> None:
    """Two `recgw serve` processes; the client balances over both (round_robin). SIGTERM to the
    one writing: its stream ends at the next part boundary, the client resumes on the other."""
    url = postgres.create_database()
    replicas = [served_replica(tmp_path, n, url, openbao, identities) for n in ("p-a", "p-b")]
    try:
        with ThreadPoolExecutor() as starting:  # both start at once
            list(starting.map(ServedGateway.start, replicas))
        tenant = new_tenant()
        with grpc.insecure_channel(f"127.0.0.1:{replicas[0].port}") as admin:
            stubs = SimpleNamespace(credentials=credentials_pb2_grpc.CredentialsServiceStub(admin))
            set_credentials(stubs, tenant, endpoint_url=moto.endpoint_url)
        data = os.urandom(16 * MiB)
        upload_id = str(uuid.uuid4())
        retries: list[tuple[int, str, int]] = []

        async def scenario() -> tuple[UploadResult, ServedGateway]:
            gate = asyncio.Event()

            async def source() -> AsyncIterator[bytes]:
                for offset in range(0, len(data), MiB):
                    if offset == 7 * MiB:
                        await gate.wait()
                    yield data[offset : offset + MiB]

            target = ",".join(f"127.0.0.1:{r.port}" for r in replicas)
            channel = grpc.aio.insecure_channel(
                f"ipv4:{target}", options=[("grpc.lb_policy_name", "round_robin")]
            )
            async with channel:
                running = asyncio.ensure_future(
                    client_upload(
                        channel,
                        UPLOADER_TOKEN,
                        source(),
                        tenant.tenant_id,
                        "sigterm.bin",
                        upload_id=upload_id,
                        on_retry=lambda n, e, at: retries.append((n, e.reason, at)),
                    )
                )
                await asyncio.to_thread(
                    wait_until, lambda: holder_of(url, upload_id), 30, "the upload to start"
                )
                holder = await asyncio.to_thread(holder_of, url, upload_id)
                writer = next(r for r in replicas if r.config.parent.name == holder)
                assert writer.process is not None
                await asyncio.to_thread(
                    wait_until,
                    lambda: received(writer.port, upload_id) == 7 * MiB,
                    30,
                    "7 MiB on the writing replica",
                )
                writer.process.send_signal(signal.SIGTERM)
                await asyncio.to_thread(
                    wait_until, lambda: refuses_connections(writer.port), 30, "the drain"
                )
                gate.set()
                return await running, writer

        result, writer = asyncio.run(scenario())
        assert result.size == len(data)
        assert read_object(moto, tenant.bucket, result.key) == data
        # The stream ended at the boundary of part 2 (10 MiB), and resumed from exactly there.
        assert retries == [(2, "SHUTTING_DOWN", 10 * MiB)]
        assert writer.process is not None and writer.process.wait(timeout=30) == 0
        log_text = writer.log.read_text()
        assert "stream ended at byte 10485760 for the shutdown" in log_text
        assert_no_secrets(log_text)
        record = stored(url, upload_id)
        assert (record.state, record.holder, record.generation) == ("complete", "", 2)
    finally:
        for replica in replicas:
            replica.stop()
