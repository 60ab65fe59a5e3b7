"""Real `recgw serve` processes sharing PostgreSQL, OpenBao and moto: killed, frozen, restarted.

Every replica reaches moto through an S3FaultProxy of its own (tests/replica_processes.py), a
recording proxy of ours: it tells which replica sent which S3 request and when, and it holds or
answers single requests where a test needs a request "on the wire" or an answer AWS would give
and moto does not. Lease and takeover times are scaled down by configuration.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from recgw.v1 import upload_pb2

from recgw_client import UploadClient
from recgw_server.dev.stack import MotoS3, OpenBao, PostgresCluster, VaultIdentities
from tests.harness import (
    UPLOADER,
    UPLOADER_TOKEN,
    MiB,
    Tenant,
    details,
    error_info,
    object_exists,
    read_object,
    resume_messages,
    set_credentials,
    upload_messages,
)
from tests.replica_processes import (
    ReplicaProcess,
    ReplicaSet,
    ReplicaTimes,
    new_upload_id,
    part_numbers,
    poll_status,
    sessions_row,
    stream_with_pause,
    wait_for,
)
from tests.s3_fault_proxy import Rule, s3_error
from tests.test_replicas import _delete_access_key, _listener_pids, _new_access_key


@pytest.fixture
def replica_set(
    tmp_path: Path,
    postgres: PostgresCluster,
    openbao: OpenBao,
    identities: VaultIdentities,
    moto: MotoS3,
) -> Iterator[ReplicaSet]:
    replicas = ReplicaSet(
        tmp_path, postgres.create_database(), openbao, identities, moto, ReplicaTimes()
    )
    try:
        yield replicas
    finally:
        replicas.close()


def tenant_on(replicas: ReplicaSet, new_tenant: Callable[..., Tenant]) -> Tenant:
    tenant = new_tenant()
    set_credentials(replicas.replicas[0], tenant, endpoint_url=replicas.tenant_endpoint)
    return tenant


class Stream:
    """An upload stream to one replica, in the background; it pauses before `pause_at`."""

    def __init__(
        self,
        replica: ReplicaProcess,
        tenant: Tenant,
        name: str,
        data: bytes,
        pause_at: int,
        upload_id: str = "",
    ) -> None:
        self.upload_id = upload_id or new_upload_id()
        self.go_on = threading.Event()
        messages = upload_messages(tenant.tenant_id, name, data, upload_id=self.upload_id)
        self.future = replica.uploads.Upload.future(
            stream_with_pause(messages, pause_at, self.go_on), metadata=UPLOADER, timeout=120
        )

    def error(self, timeout: float = 60) -> grpc.RpcError:
        """The error the stream ended with (it must fail)."""
        self.go_on.set()
        try:
            self.future.result(timeout)
        except grpc.RpcError as error:
            return error
        raise AssertionError("the stream succeeded")


def resume_through(
    replica: ReplicaProcess,
    tenant: Tenant,
    name: str,
    data: bytes,
    upload_id: str,
    deadline: float = 60,
) -> tuple[upload_pb2.UploadResponse, int]:
    """Resume from the committed size `replica` reports, retrying while another replica holds
    the lease (ABORTED ANOTHER_WRITER); returns the response and the number of refusals."""
    refusals = 0
    end = time.monotonic() + deadline
    while True:
        committed = replica.status(upload_id).committed_size
        try:
            return replica.upload(
                resume_messages(tenant, name, data, upload_id, committed)
            ), refusals
        except grpc.RpcError as error:
            if error_info(error)[0] != "ANOTHER_WRITER" or time.monotonic() > end:
                raise
            refusals += 1
            time.sleep(0.1)


def test_kill_9_the_writer_mid_upload_and_finish_through_another(
    replica_set: ReplicaSet, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    a, b = replica_set.start(2)
    tenant = tenant_on(replica_set, new_tenant)
    data = os.urandom(17 * MiB)
    stream = Stream(a, tenant, "killed.bin", data, pause_at=12 * MiB)
    poll_status(b, stream.upload_id, lambda s: s.committed_size == 10 * MiB, "2 parts via A")
    a.kill()
    assert stream.error().code() == grpc.StatusCode.UNAVAILABLE
    response, _ = resume_through(b, tenant, "killed.bin", data, stream.upload_id)
    assert read_object(moto, tenant.bucket, response.key) == data
    row = sessions_row(replica_set.sessions_url, stream.upload_id)
    assert (row["state"], row["holder"], row["generation"]) == ("complete", None, 2)
    assert b.s3.count("CompleteMultipartUpload") == 1
    assert a.s3.count("CompleteMultipartUpload") == 0


def _fenced(error: grpc.RpcError) -> bool:
    return error.code() == grpc.StatusCode.ABORTED and error_info(error)[0] == "WRITER_FENCED"


def test_a_frozen_writer_is_fenced_after_another_replica_resumed(
    replica_set: ReplicaSet, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    """SIGSTOP the writer mid-upload, resume through B once A's lease lapses, SIGCONT A: A's
    stream ends with WRITER_FENCED, A records nothing and sends no further S3 request."""
    a, b = replica_set.start(2)
    tenant = tenant_on(replica_set, new_tenant)
    data = os.urandom(17 * MiB)
    stream = Stream(a, tenant, "frozen.bin", data, pause_at=12 * MiB)
    poll_status(b, stream.upload_id, lambda s: s.committed_size == 10 * MiB, "2 parts via A")
    a.freeze()
    response, _ = resume_through(b, tenant, "frozen.bin", data, stream.upload_id)
    assert read_object(moto, tenant.bucket, response.key) == data
    url = replica_set.sessions_url
    after_takeover = sessions_row(url, stream.upload_id), part_numbers(url, stream.upload_id)
    assert (after_takeover[0]["state"], after_takeover[0]["generation"]) == ("complete", 2)

    woke = a.thaw()
    # A's client sends the rest (3 parts' worth past A's buffered bytes) and finish_write.
    assert _fenced(stream.error())
    # A re-read the upload from the store: it reports what B did.
    poll_status(a, stream.upload_id, lambda s: s.state == upload_pb2.UPLOAD_STATE_COMPLETE, "A")
    assert (sessions_row(url, stream.upload_id), part_numbers(url, stream.upload_id)) == (
        after_takeover
    )
    assert [r.operation for r in a.s3.seen_since(woke)] == []
    assert a.s3.count("CompleteMultipartUpload") == 0
    assert read_object(moto, tenant.bucket, response.key) == data


def test_a_writer_frozen_while_finishing_gives_exactly_one_outcome(
    replica_set: ReplicaSet, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    """A made FINISHING durable and sent CompleteMultipartUpload; its proxy holds the request
    and A is frozen. B resumes and completes. A's request then gets what AWS answers for a
    completed upload (404 NoSuchUpload; moto would answer 200, so A's proxy answers itself):
    after SIGCONT A reports WRITER_FENCED, not an ended upload, and sends nothing more."""
    a, b = replica_set.start(2)
    tenant = tenant_on(replica_set, new_tenant)
    held = a.s3.add(
        Rule(
            "CompleteMultipartUpload",
            "hold_then_answer",
            status=404,
            body=s3_error("NoSuchUpload", "The specified upload does not exist."),
        )
    )
    data = os.urandom(12 * MiB)
    stream = Stream(a, tenant, "finishing.bin", data, pause_at=len(data) + 1)
    assert held.arrived.wait(60), "A's CompleteMultipartUpload"
    url = replica_set.sessions_url
    assert sessions_row(url, stream.upload_id)["state"] == "finishing"
    a.freeze()
    response, _ = resume_through(b, tenant, "finishing.bin", data, stream.upload_id)
    assert response.size == len(data) and not response.unconfirmed
    assert read_object(moto, tenant.bucket, response.key) == data
    done = sessions_row(url, stream.upload_id)
    assert (done["state"], done["generation"], done["result"]["etag"]) == (
        "complete",
        2,
        response.etag,
    )

    woke = a.thaw()
    held.released.set()
    assert _fenced(stream.error())
    poll_status(a, stream.upload_id, lambda s: s.state == upload_pb2.UPLOAD_STATE_COMPLETE, "A")
    assert sessions_row(url, stream.upload_id) == done
    assert [r.operation for r in a.s3.seen_since(woke)] == []
    assert b.s3.count("CompleteMultipartUpload") == 1
    assert read_object(moto, tenant.bucket, response.key) == data


@pytest.mark.parametrize("same_bytes", [True, False], ids=["same-bytes", "different-bytes"])
def test_a_stray_upload_part_of_a_fenced_writer_never_makes_a_wrong_object(
    replica_set: ReplicaSet, moto: MotoS3, new_tenant: Callable[..., Tenant], same_bytes: bool
) -> None:
    """What fencing cannot stop: A's UploadPart of part 2 is on the wire (its proxy holds it)
    when A freezes. B takes over, writes part 2 again and part 3, and sends its completion
    (held at B's proxy). Then A's stray part 2 lands in S3, replacing B's, and only then B's
    completion goes on. With the bytes B wrote, nothing changes: the object is byte-exact.
    With other bytes (a client that sent different data to A), S3 refuses the completion
    (the part's ETag is not the one B recorded) and B's client is told: never a wrong object."""
    a, b = replica_set.start(2)
    tenant = tenant_on(replica_set, new_tenant)
    data = os.urandom(12 * MiB)
    sent_to_a = data if same_bytes else data[: 6 * MiB] + os.urandom(MiB) + data[7 * MiB :]
    stray = a.s3.add(Rule("UploadPart", "hold", when=lambda r: r.part_number == 2))
    completion = b.s3.add(Rule("CompleteMultipartUpload", "hold"))
    stream = Stream(a, tenant, "stray.bin", sent_to_a, pause_at=11 * MiB)
    assert stray.arrived.wait(60), "A's UploadPart of part 2"
    poll_status(b, stream.upload_id, lambda s: s.committed_size == 5 * MiB, "part 1 via A")
    a.freeze()
    with ThreadPoolExecutor(1) as pool:
        resumed = pool.submit(resume_through, b, tenant, "stray.bin", data, stream.upload_id)
        assert completion.arrived.wait(60), "B's CompleteMultipartUpload"
        assert [n for n, _ in part_numbers(replica_set.sessions_url, stream.upload_id)] == [
            1,
            2,
            3,
        ]
        stray.released.set()  # A's part 2 reaches moto now, after B's
        assert stray.answered.wait(60), "moto's answer to the stray part"
        completion.released.set()
        if same_bytes:
            response, _ = resumed.result(60)
            assert read_object(moto, tenant.bucket, response.key) == data
        else:
            with pytest.raises(grpc.RpcError) as refused:
                resumed.result(60)
            error = refused.value
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, details(error)
            assert error_info(error)[1].get("store_code") == "InvalidPart"
            assert not object_exists(moto, tenant.bucket, "uploads/stray.bin")
            row = sessions_row(replica_set.sessions_url, stream.upload_id)
            assert row["state"] == "open" and row["result"] is None
    woke = a.thaw()
    assert _fenced(stream.error())
    assert [r.operation for r in a.s3.seen_since(woke)] == []
    assert a.s3.count("CompleteMultipartUpload") == 0


def _blocked_inserts(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO sessions%%'"
        ).fetchone()
    return int(row[0]) if row else 0


def test_one_upload_id_created_on_two_replicas_at_once_one_wins_the_other_is_told_to_retry(
    replica_set: ReplicaSet, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    """Both replicas find no session and insert one: the test holds a table lock that lets them
    read but not insert until both inserts wait, so the race happens every time."""
    import psycopg

    a, b = replica_set.start(2)
    tenant = tenant_on(replica_set, new_tenant)
    upload_id = new_upload_id()
    data = os.urandom(1000)
    url = replica_set.sessions_url
    with psycopg.connect(url) as lock:
        lock.execute("LOCK TABLE sessions IN SHARE ROW EXCLUSIVE MODE")  # SELECT still works
        calls = [
            r.uploads.Upload.future(
                upload_messages(tenant.tenant_id, "twice.bin", data, upload_id=upload_id),
                metadata=UPLOADER,
                timeout=60,
            )
            for r in (a, b)
        ]
        wait_for(lambda: _blocked_inserts(url) == 2, "both replicas inserting the session")
        lock.commit()
    outcomes: list[upload_pb2.UploadResponse | grpc.RpcError] = []
    for call in calls:
        try:
            outcomes.append(call.result(60))
        except grpc.RpcError as error:
            outcomes.append(error)
    [response] = [o for o in outcomes if isinstance(o, upload_pb2.UploadResponse)]
    [refused] = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert refused.code() == grpc.StatusCode.ABORTED, details(refused)
    assert error_info(refused) == ("ANOTHER_WRITER", {"upload_id": upload_id})
    assert "retry" in details(refused)
    assert read_object(moto, tenant.bucket, response.key) == data
    assert sessions_row(url, upload_id)["state"] == "complete"


def test_status_on_a_replica_that_cached_an_upload_follows_the_writer_on_another(
    replica_set: ReplicaSet, new_tenant: Callable[..., Tenant]
) -> None:
    a, b = replica_set.start(2)
    tenant = tenant_on(replica_set, new_tenant)
    data = os.urandom(12 * MiB)
    stream = Stream(a, tenant, "watched.bin", data, pause_at=6 * MiB)
    poll_status(a, stream.upload_id, lambda s: s.committed_size == 5 * MiB, "part 1 via A")
    first = b.status(stream.upload_id)  # B has the upload in memory from now on
    assert (first.state, first.committed_size) == (upload_pb2.UPLOAD_STATE_OPEN, 5 * MiB)
    stream.go_on.set()
    response = stream.future.result(60)
    done = b.status(stream.upload_id)
    assert (done.state, done.committed_size) == (upload_pb2.UPLOAD_STATE_COMPLETE, len(data))
    assert done.result.etag == response.etag


def test_expiry_racing_a_resume_on_another_replica_gives_exactly_one_outcome(
    tmp_path: Path,
    postgres: PostgresCluster,
    openbao: OpenBao,
    identities: VaultIdentities,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
) -> None:
    """Uploads idle for `idle_timeout` expire on whichever replica claims them first, while
    resumes through B start around that moment (from 1 s before to 1 s after). Each upload
    ends one way: completed byte-exact (and the record says complete), or expired (the resume
    gets FAILED_PRECONDITION UPLOAD_ENDED, no object, the record says expired)."""
    idle = 3.0
    times = ReplicaTimes(idle_timeout=idle, expiry_check=0.2)
    replica_set = ReplicaSet(tmp_path, postgres.create_database(), openbao, identities, moto, times)
    try:
        a, b = replica_set.start(2)
        tenant = tenant_on(replica_set, new_tenant)
        url = replica_set.sessions_url
        uploads: list[tuple[str, bytes]] = []
        for index in range(6):
            data = os.urandom(7 * MiB)
            upload_id = new_upload_id()
            # Part 1 is committed, then the stream ends without finish_write: open, idle.
            with pytest.raises(grpc.RpcError) as ended:
                a.upload(
                    upload_messages(
                        tenant.tenant_id, f"race-{index}.bin", data[: 6 * MiB],
                        upload_id=upload_id, finish=False,
                    )
                )  # fmt: skip
            assert error_info(ended.value)[0] == "STREAM_ENDED_WITHOUT_FINISH"
            uploads.append((upload_id, data))
        idle_since = [sessions_row(url, u)["updated_at"] for u, _ in uploads]

        def resume(index: int) -> upload_pb2.UploadResponse | grpc.RpcError:
            upload_id, data = uploads[index]
            start = idle_since[index] + idle + (index - 2.5) * 0.4  # -1 s .. +1 s
            time.sleep(max(0.0, start - time.time()))
            try:
                return resume_through(b, tenant, f"race-{index}.bin", data, upload_id)[0]
            except grpc.RpcError as error:
                return error

        with ThreadPoolExecutor(len(uploads)) as pool:
            outcomes = list(pool.map(resume, range(len(uploads))))
        kinds = []
        for (upload_id, data), outcome in zip(uploads, outcomes, strict=True):
            row = sessions_row(url, upload_id)
            key = f"uploads/race-{uploads.index((upload_id, data))}.bin"
            if isinstance(outcome, upload_pb2.UploadResponse):
                assert row["state"] == "complete"
                assert read_object(moto, tenant.bucket, outcome.key) == data
                kinds.append("complete")
            else:
                assert outcome.code() == grpc.StatusCode.FAILED_PRECONDITION, details(outcome)
                assert error_info(outcome)[0] == "UPLOAD_ENDED"
                assert "expired" in details(outcome)
                assert row["state"] == "expired"
                assert not object_exists(moto, tenant.bucket, key)
                kinds.append("expired")
            assert row["holder"] is None
        # Whichever won, every replica reports it.
        for (upload_id, _), kind in zip(uploads, kinds, strict=True):
            for replica in (a, b):
                state = upload_pb2.UploadState.Name(replica.status(upload_id).state)
                assert state == f"UPLOAD_STATE_{kind.upper()}"
    finally:
        replica_set.close()


def test_a_rolling_restart_during_ten_uploads_loses_none(
    replica_set: ReplicaSet, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    """Ten live uploads with the Python client over a round_robin channel to all replicas;
    each replica in turn gets SIGTERM, exits, and starts again on its port. Every upload
    rides it out (resuming on another replica) and ends byte-exact."""
    replicas = replica_set.start(2)
    tenant = tenant_on(replica_set, new_tenant)
    blobs = [os.urandom(6 * MiB + 1000 * i) for i in range(10)]
    restarted = threading.Event()
    exits: list[int] = []
    retries: list[grpc.StatusCode] = []  # what ended a stream that then resumed

    def rolling_restart() -> None:
        for replica in replicas:
            exits.append(replica.terminate())
            replica.start()
        restarted.set()

    async def live(data: bytes) -> Any:
        """A live call: 64 KiB every 50 ms until the restarts are over, then the rest."""
        for offset in range(0, len(data), 64 * 1024):
            if not restarted.is_set():
                await asyncio.sleep(0.05)
            yield data[offset : offset + 64 * 1024]

    async def main() -> list[Any]:
        target = "ipv4:" + ",".join(r.address for r in replicas)
        options = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.keepalive_time_ms", 20_000),
        ]
        async with grpc.aio.insecure_channel(target, options) as channel:
            client = UploadClient(channel, UPLOADER_TOKEN)
            uploads = [
                asyncio.ensure_future(
                    client.upload(
                        live(data),
                        tenant.tenant_id,
                        f"rolling-{i}.bin",
                        on_retry=lambda attempt, error, committed: retries.append(error.code),
                    )
                )
                for i, data in enumerate(blobs)
            ]
            await asyncio.sleep(0.5)  # all ten are streaming
            await asyncio.to_thread(rolling_restart)
            return list(await asyncio.wait_for(asyncio.gather(*uploads), 120))

    results = asyncio.run(main())
    assert exits == [0, 0]
    assert len(retries) >= 2, retries  # the restarts did cut streams (at least one each)
    for data, result in zip(blobs, results, strict=True):
        assert read_object(moto, tenant.bucket, result.key) == data


def test_abort_through_b_ends_the_stream_on_a(
    replica_set: ReplicaSet, new_tenant: Callable[..., Tenant]
) -> None:
    """AbortUpload on B takes the lease from A, which is writing: A's stream ends, A records
    nothing and sends no UploadPart after the abort, and both replicas report ABORTED."""
    a, b = replica_set.start(2)
    tenant = tenant_on(replica_set, new_tenant)
    data = os.urandom(17 * MiB)
    stream = Stream(a, tenant, "aborted.bin", data, pause_at=7 * MiB)
    poll_status(b, stream.upload_id, lambda s: s.committed_size == 5 * MiB, "part 1 via A")
    aborted_at = time.monotonic()
    report = b.uploads.AbortUpload(
        upload_pb2.AbortUploadRequest(upload_id=stream.upload_id), metadata=UPLOADER, timeout=30
    )
    assert report.state == upload_pb2.UPLOAD_STATE_ABORTED
    ended = stream.error()  # A's client sends the rest: A refuses it
    assert ended.code() == grpc.StatusCode.ABORTED
    assert error_info(ended)[0] in ("WRITER_FENCED", "UPLOAD_ABORTED")
    assert [r.operation for r in a.s3.seen_since(aborted_at)] == []
    url = replica_set.sessions_url
    assert sessions_row(url, stream.upload_id)["state"] == "aborted"
    assert [number for number, _ in part_numbers(url, stream.upload_id)] == [1]
    for replica in (a, b):
        poll_status(
            replica,
            stream.upload_id,
            lambda s: s.state == upload_pb2.UPLOAD_STATE_ABORTED,
            replica.replica_id,
        )


def test_credentials_set_through_a_are_used_by_b_at_once_also_after_b_lost_its_listener(
    replica_set: ReplicaSet, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    """SetCredentials through A: B, which cached the old key and an S3 client for it, uses the
    new key at once (the old one is deleted in IAM, so a stale cache fails). After B's
    notification connection is killed, B drops its cache, listens again and still hears."""
    a, b = replica_set.start(2)
    tenant = tenant_on(replica_set, new_tenant)
    endpoint = replica_set.tenant_endpoint

    def small(name: str) -> None:
        b.upload(upload_messages(tenant.tenant_id, name, os.urandom(1000)))

    def rotate() -> None:
        old = tenant.keys
        tenant.keys = _new_access_key(moto, tenant)
        set_credentials(a, tenant, endpoint_url=endpoint)
        _delete_access_key(moto, tenant, old)

    small("first.bin")  # B caches the credentials (TTL 30 s) and a client
    rotate()
    small("after-set.bin")
    [old_pid] = _listener_pids(replica_set.sessions_url, b.replica_id)
    with psycopg.connect(replica_set.sessions_url, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (old_pid,)).fetchone() == (True,)

    def listening_again() -> bool:
        pids = _listener_pids(replica_set.sessions_url, b.replica_id)
        return len(pids) == 1 and pids != [old_pid]

    wait_for(listening_again, "B's new notification connection")
    rotate()
    small("after-reconnect.bin")
