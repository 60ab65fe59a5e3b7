"""Unit tests of automatic resume in recgw_client against the fake resumable gateway.

The fake (tests.test_client_unit.FakeGateway) commits bytes a whole part at a
time and breaks streams on request: aborts with a status and ErrorInfo reason,
cut TCP connections, lost replies after finish_write. Backoff sleeps and the
clock are virtual (tests.test_client_unit.VirtualTime), so nothing here waits.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import stat
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import typer.testing
from recgw.v1 import upload_pb2

import recgw_client
import recgw_client.sync
import recgw_client.uploads
from recgw_client import RecgwError, RetryPolicy, UploadResult, crc32c, is_retryable
from recgw_client._retained import RetainedBuffer
from recgw_client.cli import commands as cli_client
from tests.test_client_unit import (
    COMPLETE,
    FINISHING,
    TOKEN,
    WAIT,
    Break,
    FakeServer,
    FakeSession,
    RecordedUpload,
    VirtualTime,
)

app = cli_client.make_app(plugins=False)

KiB = 1024
PART = 16 * KiB
Code = grpc.StatusCode


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    server.start()
    server.gateway.part_size = PART
    yield server
    server.stop()


class Retries(VirtualTime):
    """Virtual backoff sleeps and clock, and the on_retry calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, Code, int]] = []
        self.reasons: list[str] = []

    def on_retry(self, attempt: int, error: RecgwError, committed: int) -> None:
        self.calls.append((attempt, error.code, committed))
        self.reasons.append(error.reason)


def upload(
    fake: FakeServer,
    source: recgw_client.Source,
    retries: Retries,
    *,
    via_proxy: bool = False,
    **kwargs: Any,
) -> UploadResult:
    kwargs.setdefault("chunk_size", 4 * KiB)
    kwargs.setdefault("retry_policy", retries.policy())

    async def run() -> UploadResult:
        return await recgw_client.upload(
            fake.proxy_address if via_proxy else fake.address,
            TOKEN,
            source,
            "acme",
            "a.webm",
            on_retry=retries.on_retry,
            **kwargs,
        )

    return asyncio.run(run())


def check_upload(fake: FakeServer, result: UploadResult, data: bytes) -> list[int]:
    """The object is exactly ``data``; every stream followed the resume protocol.

    Returns the offset each stream started at. (The client's CRC32C is checked
    against a bitwise reference in test_client_unit; SHA-256 comes from hashlib.)
    """
    crc, sha = crc32c(data), hashlib.sha256(data).digest()
    session = fake.gateway.sessions[result.upload_id]
    assert session.state == COMPLETE
    assert bytes(session.committed) == data
    assert result.size == len(data)
    assert (result.checksums.crc32c, result.checksums.sha256) == (crc, sha)
    streams = fake.gateway.uploads
    first_start = streams[0].requests[0].start
    assert uuid.UUID(first_start.upload_id).version == 4
    assert first_start.upload_id == result.upload_id
    offsets = []
    for stream in streams:
        requests = stream.requests
        # The same start every time, at the resume offset; then contiguous data.
        assert requests[0].start == first_start
        assert all(not r.HasField("start") for r in requests[1:])
        offset = requests[0].write_offset
        offsets.append(offset)
        for request in requests:
            assert request.write_offset == offset
            assert request.data == data[offset : offset + len(request.data)]
            offset += len(request.data)
        finals = [r for r in requests if r.finish_write]
        assert finals in ([], [requests[-1]])
        for final in finals:
            # Checksums of the WHOLE object, each byte folded in once despite re-sending.
            assert final.write_offset == len(data)
            assert (final.object_checksums.crc32c, final.object_checksums.sha256) == (crc, sha)
    return offsets


# After a TCP cut, grpc may fail a status query or two (on the dead connection, or
# while it reconnects) before one gets through: the client backs off and asks again,
# so with a cut the number of backoff sleeps depends on timing, not their values.
SCHEDULE = (0.2, 0.4, 0.8, 1.6)


def break_code(kind: str) -> Code | None:
    return {"unavailable": Code.UNAVAILABLE, "internal": Code.INTERNAL, "cut": None}[kind]


# --- resuming after each kind of break -------------------------------------------------------


@pytest.mark.parametrize("kind", ["unavailable", "internal", "cut"])
def test_resume_after_a_break_stores_the_exact_bytes(fake: FakeServer, kind: str) -> None:
    data = random.Random(1).randbytes(200_000)
    code = break_code(kind)
    fake.gateway.breaks.extend(
        [Break(at=50_000, code=code, message="reset"), Break(at=140_000, code=code)]
    )
    retries = Retries()
    result = upload(fake, data, retries, via_proxy=kind == "cut")
    offsets = check_upload(fake, result, data)
    # 4 KiB chunks: the first break came at 53248 bytes received, 3 parts committed;
    # the second at 143360, 8 parts committed. The rest was sent again.
    assert offsets == [0, 3 * PART, 8 * PART]
    if code is None:
        assert [n for _, _, n in retries.calls] == [3 * PART, 8 * PART]
        assert {c for _, c, _ in retries.calls} <= {Code.UNAVAILABLE, Code.INTERNAL}
        assert set(retries.sleeps) <= set(SCHEDULE)
    else:
        assert retries.calls == [(2, code, 3 * PART), (3, code, 8 * PART)]
        assert retries.sleeps == [0.2, 0.2]  # progress since the last retry: backoff restarts
    if code is None:
        assert fake.gateway.uploads[0].broken and fake.gateway.uploads[1].broken


def test_stream_lost_before_the_upload_id_header(fake: FakeServer) -> None:
    """The client chose the id, so it can ask about the upload and resume it."""
    data = random.Random(2).randbytes(30_000)
    fake.gateway.breaks.append(Break(before_header=True))
    ids: list[str] = []
    retries = Retries()
    result = upload(fake, data, retries, on_upload_id=ids.append)
    assert check_upload(fake, result, data) == [0, 0]
    assert ids == [result.upload_id]  # once, from the stream that got the header
    assert retries.calls == [(2, Code.UNAVAILABLE, 0)]


def test_caller_chosen_upload_id_is_kept_across_streams(fake: FakeServer) -> None:
    data = random.Random(3).randbytes(40_000)
    chosen = str(uuid.uuid4())
    fake.gateway.breaks.append(Break(at=20_000))
    result = upload(fake, data, Retries(), upload_id=chosen)
    assert result.upload_id == chosen
    assert check_upload(fake, result, data) == [0, PART]


def test_resume_with_expected_size_metadata_and_no_checksums(fake: FakeServer) -> None:
    data = random.Random(4).randbytes(50_000)
    fake.gateway.breaks.append(Break(at=40_000))
    result = upload(
        fake,
        iter([data[:25_000], data[25_000:]]),
        Retries(),
        expected_size=len(data),
        metadata={"call-id": "42"},
        content_type="video/webm",
        compute_checksums=False,
    )
    session = fake.gateway.sessions[result.upload_id]
    assert bytes(session.committed) == data
    for stream in fake.gateway.uploads:
        start = stream.requests[0].start
        assert start.expected_size == len(data) and dict(start.metadata) == {"call-id": "42"}
        assert not stream.requests[-1].HasField("object_checksums")


def test_nothing_committed_yet_resends_everything(fake: FakeServer) -> None:
    """No part was complete when the stream broke: the resumed stream starts at byte 0."""
    data = random.Random(5).randbytes(12_000)
    fake.gateway.breaks.append(Break(at=10_000))
    retries = Retries()
    result = upload(fake, data, retries)
    assert check_upload(fake, result, data) == [0, 0]
    assert retries.calls == [(2, Code.UNAVAILABLE, 0)]


# --- the offset handshake ---------------------------------------------------------------------


def test_offset_handshake_requeries_the_committed_size(fake: FakeServer) -> None:
    """A part in flight lands after the status query: OUT_OF_RANGE, one more query, resume."""
    gateway = fake.gateway
    gateway.max_in_flight = 2
    gateway.late_landing = True
    gateway.breaks.append(Break(at=100_000))
    data = random.Random(6).randbytes(150_000)
    retries = Retries()
    result = upload(fake, data, retries)
    # At the break (102400 received) 4 parts were committed and 2 in flight; those
    # landed only when the next stream opened, so its offset 4 parts was refused.
    offsets = check_upload(fake, result, data)
    assert offsets == [0, 4 * PART, 6 * PART]
    refused = gateway.uploads[1]
    assert refused.refused is Code.OUT_OF_RANGE and len(refused.requests) >= 1
    assert retries.calls == [(2, Code.UNAVAILABLE, 4 * PART)]
    # The OFFSET_MISMATCH error carries the committed size: no backoff, no second query.
    assert retries.sleeps == [0.2]
    assert gateway.status_queries == 1


def test_out_of_range_that_is_not_the_handshake_is_final(fake: FakeServer) -> None:
    fake.gateway.breaks.extend(
        [
            Break(at=20_000),
            Break(
                at=1,
                code=Code.OUT_OF_RANGE,
                message="more than expected",
                reason="SIZE_LIMIT_EXCEEDED",
            ),
        ]
    )
    retries = Retries()
    with pytest.raises(RecgwError) as caught:
        upload(fake, random.Random(7).randbytes(60_000), retries)
    assert caught.value.code is Code.OUT_OF_RANGE
    assert caught.value.message == "more than expected"
    # The committed size did not move: not a handshake. Asked once, not retried.
    assert len(fake.gateway.uploads) == 2
    assert retries.sleeps == [0.2]


# --- memory --------------------------------------------------------------------------------


class _Tracked(RetainedBuffer):
    instances: list[RetainedBuffer] = []  # noqa: RUF012 - a test hook

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _Tracked.instances.append(self)


def test_retained_bytes_stay_under_the_cap_for_a_large_stream(
    fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without spilling, a live source is paused until parts are committed; polls back off."""
    gateway = fake.gateway
    gateway.max_in_flight = 64  # parts land only as the client polls
    gateway.polls_per_landing = 3
    cap = 64 * KiB
    chunk = 4 * KiB
    data = random.Random(8).randbytes(2 * 1024 * KiB)
    upload_id = str(uuid.uuid4())
    monkeypatch.setattr(recgw_client.uploads, "RetainedBuffer", _Tracked)
    _Tracked.instances = []
    ahead: list[int] = []

    async def recording() -> AsyncIterator[bytes]:
        for offset in range(0, len(data), chunk):
            session = gateway.sessions.get(upload_id)
            committed = len(session.committed) if session is not None else 0
            # Read only with room for this chunk: never more than the cap past the commit.
            ahead.append(offset + chunk - committed)
            yield data[offset : offset + chunk]

    retries = Retries()
    result = upload(
        fake,
        recording(),
        retries,
        chunk_size=chunk,
        retain_limit=cap,
        spill_limit=0,
        upload_id=upload_id,
    )
    check_upload(fake, result, data)
    [retained] = _Tracked.instances
    assert 0 < retained.high_water <= cap
    assert max(ahead) <= cap
    assert gateway.max_lag <= cap
    # It did pause, polling with a growing delay (no busy loop), and far fewer status
    # queries than chunks.
    assert retries.sleeps and set(retries.sleeps) <= {0.05, 0.1, 0.2}
    assert gateway.status_queries < len(data) // chunk


def test_retained_buffer_is_trimmed_before_the_cap_and_resume_still_works(
    fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = fake.gateway
    gateway.max_in_flight = 2
    gateway.breaks.extend([Break(at=300_000), Break(at=700_000, code=None)])
    monkeypatch.setattr(recgw_client.uploads, "RetainedBuffer", _Tracked)
    _Tracked.instances = []
    data = random.Random(9).randbytes(1024 * KiB)
    retries = Retries()
    result = upload(fake, data, retries, retain_limit=128 * KiB, via_proxy=True)
    offsets = check_upload(fake, result, data)
    [retained] = _Tracked.instances
    assert retained.high_water <= 128 * KiB
    # 1 MiB went through 128 KiB: trimmed as it went (in the background from half the
    # cap; a slow status query may make reading pause for a poll or two).
    assert len(retries.calls) == 2
    assert set(retries.sleeps) <= {*SCHEDULE, 0.05, 0.1, 0.2}
    assert offsets[1] % PART == 0 and 300_000 - 3 * PART <= offsets[1] <= 300_000
    assert offsets[2] % PART == 0 and 700_000 - 3 * PART <= offsets[2] <= 700_000


def test_cap_grows_when_the_gateway_waits_for_a_part_larger_than_the_cap(
    fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts of 256 KiB and a 64 KiB cap would otherwise wait forever."""
    fake.gateway.part_size = 256 * KiB
    monkeypatch.setattr(recgw_client.uploads, "RetainedBuffer", _Tracked)
    _Tracked.instances = []
    data = random.Random(10).randbytes(600 * KiB)
    retries = Retries()
    result = upload(fake, data, retries, retain_limit=64 * KiB)
    check_upload(fake, result, data)
    [retained] = _Tracked.instances
    assert 256 * KiB <= retained.high_water <= 512 * KiB
    # Each stall polled for at least 10 (virtual) seconds, 1 s apart at most.
    assert sum(retries.sleeps) >= 2 * 10 and max(retries.sleeps) == 1.0


# --- what is and is not retried --------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "message"),
    [
        (Code.INVALID_ARGUMENT, "INVALID_FIELD", "object_name has a '..' segment"),
        (Code.OUT_OF_RANGE, "SIZE_LIMIT_EXCEEDED", "more bytes than expected_size"),
        (Code.PERMISSION_DENIED, "ACCESS_DENIED", "tenant acme: no access"),
        (Code.UNAUTHENTICATED, "TOKEN_INVALID", "token expired"),
        (Code.FAILED_PRECONDITION, "CREDENTIALS_NOT_FOUND", "no credentials for acme"),
        (Code.ALREADY_EXISTS, "OBJECT_EXISTS", "the object exists"),
        (Code.DATA_LOSS, "OBJECT_CHECKSUM_MISMATCH", "checksum mismatch"),
        (Code.NOT_FOUND, "UPLOAD_NOT_FOUND", "no such upload"),
        (Code.ABORTED, "UPLOAD_ABORTED", "upload was aborted by AbortUpload"),
        (Code.ABORTED, "STREAM_TAKEN_OVER", "a newer stream took over"),
        # The text a person reads says "another stream", the reason does not: not retried.
        (Code.ABORTED, "", "another stream is writing upload u-1"),
        (Code.RESOURCE_EXHAUSTED, "MEMORY_EXHAUSTED", "a part exceeds the memory budget"),
    ],
)
def test_final_errors_are_not_retried(
    fake: FakeServer, code: Code, reason: str, message: str
) -> None:
    fake.gateway.breaks.append(Break(at=10_000, code=code, message=message, reason=reason))
    retries = Retries()
    with pytest.raises(RecgwError) as caught:
        upload(fake, random.Random(11).randbytes(50_000), retries)
    error = caught.value
    assert (error.code, error.reason, error.message) == (code, reason, message)
    assert error.upload_id == fake.gateway.uploads[0].requests[0].start.upload_id
    assert len(fake.gateway.uploads) == 1
    assert fake.gateway.status_queries == 0
    assert retries.sleeps == [] and retries.calls == []


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (Code.UNKNOWN, ""),
        (Code.DEADLINE_EXCEEDED, ""),
        (Code.UNAVAILABLE, "STORAGE_UNAVAILABLE"),
        (Code.DATA_LOSS, "CHUNK_CHECKSUM_MISMATCH"),
        (Code.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
        (Code.RESOURCE_EXHAUSTED, "SPOOL_EXHAUSTED"),
    ],
)
def test_transient_reasons_are_resumed(fake: FakeServer, code: Code, reason: str) -> None:
    data = random.Random(34).randbytes(50_000)
    fake.gateway.breaks.append(Break(at=40_000, code=code, reason=reason))
    retries = Retries()
    result = upload(fake, data, retries)
    check_upload(fake, result, data)
    assert retries.calls == [(2, code, 2 * PART)] and retries.reasons == [reason]


def test_gives_up_after_the_outage_tolerance_without_progress(fake: FakeServer) -> None:
    fake.gateway.breaks.extend(Break(at=1000) for _ in range(10))  # before any part
    retries = Retries()
    with pytest.raises(RecgwError) as caught:
        upload(fake, random.Random(12).randbytes(50_000), retries, outage_tolerance=5)
    assert caught.value.code is Code.UNAVAILABLE and caught.value.attempts == 6
    # 0.2 + 0.4 + 0.8 + 1.6 = 3 s, then the last wait ends at the 5 s of tolerance.
    assert retries.sleeps == [0.2, 0.4, 0.8, 1.6, pytest.approx(2.0)]
    assert len(fake.gateway.uploads) == 6
    assert [a for a, _, _ in retries.calls] == [2, 3, 4, 5, 6]


def test_the_outage_clock_starts_when_a_long_healthy_stream_breaks(fake: FakeServer) -> None:
    """Hours of streaming without a status query do not count against the tolerance."""
    retries = Retries()
    data = random.Random(35).randbytes(60_000)
    fake.gateway.breaks.extend([Break(at=50_000), Break(at=1), Break(at=1)])

    async def recording() -> AsyncIterator[bytes]:
        for offset in range(0, len(data), 4 * KiB):
            if offset < 40 * KiB:  # read before the break at 50000 bytes
                retries.now += 3600  # an hour of recording per chunk, in virtual time
            yield data[offset : offset + 4 * KiB]

    result = upload(fake, recording(), retries, outage_tolerance=1)
    check_upload(fake, result, data)
    # The first query (after 0.2 s) showed 3 parts committed; then 0.2 + 0.4 s of
    # failures, within the 1 s, and the fourth stream finished.
    assert retries.sleeps == [0.2, 0.2, 0.4]


def test_default_outage_tolerance_is_five_minutes_with_capped_backoff(fake: FakeServer) -> None:
    fake.gateway.breaks.extend(Break(at=1000) for _ in range(60))
    retries = Retries()
    with pytest.raises(RecgwError) as caught:
        upload(fake, random.Random(13).randbytes(50_000), retries)
    assert caught.value.code is Code.UNAVAILABLE
    assert retries.sleeps[:7] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0]
    assert max(retries.sleeps) == 10.0
    assert sum(retries.sleeps) == pytest.approx(300.0)
    assert len(fake.gateway.uploads) == len(retries.sleeps) + 1 == caught.value.attempts


def test_outage_tolerance_zero_disables_resuming(fake: FakeServer) -> None:
    fake.gateway.breaks.append(Break(at=1000))
    retries = Retries()
    with pytest.raises(RecgwError) as caught:
        upload(fake, random.Random(14).randbytes(50_000), retries, outage_tolerance=0)
    assert caught.value.code is Code.UNAVAILABLE
    assert len(fake.gateway.uploads) == 1 and retries.sleeps == []


def test_progress_restarts_the_outage_clock(fake: FakeServer) -> None:
    """Six outages of a long upload, each after more parts were committed: 0.5 s is enough."""
    fake.gateway.breaks.extend(Break(at=n * 40_000) for n in range(1, 7))
    data = random.Random(15).randbytes(300_000)
    retries = Retries()
    result = upload(fake, data, retries, outage_tolerance=0.5)
    check_upload(fake, result, data)
    assert retries.sleeps == [0.2] * 6  # 1.2 s in all, never 0.5 s without progress
    assert [a for a, _, _ in retries.calls] == [2, 3, 4, 5, 6, 7]


def test_progress_learnt_after_a_failed_status_query_still_restarts_the_clock(
    fake: FakeServer,
) -> None:
    fake.gateway.breaks.extend([Break(at=1000), Break(at=60_000, status_failures=1)])
    data = random.Random(33).randbytes(100_000)
    retries = Retries()
    result = upload(fake, data, retries, outage_tolerance=1.5)
    check_upload(fake, result, data)
    # The second stream got 3 parts committed; the query right after it failed, so the
    # client waited as for a third failure in a row (0.2 + 0.4 + 0.8 = 1.4 s without
    # known progress), then saw the progress and went on.
    assert retries.calls == [(2, Code.UNAVAILABLE, 0), (3, Code.UNAVAILABLE, 3 * PART)]
    assert retries.sleeps == [0.2, 0.4, 0.8]


def test_concurrent_writer_aborted_is_retried_with_backoff(fake: FakeServer) -> None:
    """The gateway has not yet noticed that the broken stream is gone."""
    fake.gateway.breaks.append(Break(at=30_000, stays_attached=2))
    data = random.Random(16).randbytes(60_000)
    retries = Retries()
    result = upload(fake, data, retries)
    streams = fake.gateway.uploads
    assert [s.refused for s in streams] == [None, Code.ABORTED, Code.ABORTED, None]
    # 30000 bytes asked for, 32768 received: 2 parts committed.
    assert retries.calls == [
        (2, Code.UNAVAILABLE, 2 * PART),
        (3, Code.ABORTED, 2 * PART),
        (4, Code.ABORTED, 2 * PART),
    ]
    assert retries.reasons == ["", "ANOTHER_WRITER", "ANOTHER_WRITER"]
    assert retries.sleeps == [0.2, 0.2, 0.4]  # the first query showed progress
    session = fake.gateway.sessions[result.upload_id]
    assert bytes(session.committed) == data


def test_another_writer_for_longer_than_the_tolerance_is_final(fake: FakeServer) -> None:
    fake.gateway.breaks.append(Break(at=30_000, stays_attached=50))
    with pytest.raises(RecgwError) as caught:
        upload(fake, random.Random(17).randbytes(60_000), Retries(), outage_tolerance=2)
    assert (caught.value.code, caught.value.reason) == (Code.ABORTED, "ANOTHER_WRITER")
    assert caught.value.metadata["upload_id"] == caught.value.upload_id
    # The first query showed progress; then 0.2 + 0.4 + 0.8 s, and 0.6 s to reach 2 s.
    assert len(fake.gateway.uploads) == 6


def test_expired_upload_is_final(fake: FakeServer) -> None:
    fake.gateway.breaks.append(Break(at=30_000, expire=True))
    retries = Retries()
    with pytest.raises(RecgwError) as caught:
        upload(fake, random.Random(18).randbytes(60_000), retries)
    assert (caught.value.code, caught.value.reason) == (Code.FAILED_PRECONDITION, "UPLOAD_ENDED")
    assert caught.value.metadata == {"state": "EXPIRED"}
    assert "expired: idle for too long" in caught.value.message
    assert len(fake.gateway.uploads) == 1 and retries.sleeps == [0.2]


def test_forgotten_upload_restarts_from_zero_while_every_byte_is_held(fake: FakeServer) -> None:
    fake.gateway.breaks.append(Break(at=30_000, forget=True))
    data = random.Random(19).randbytes(60_000)
    result = upload(fake, data, Retries())
    assert check_upload(fake, result, data) == [0, 0]


def test_forgotten_upload_after_trimming_cannot_resume(fake: FakeServer) -> None:
    fake.gateway.breaks.append(Break(at=400_000, forget=True))
    with pytest.raises(RecgwError) as caught:
        upload(fake, random.Random(20).randbytes(600_000), Retries(), retain_limit=64 * KiB)
    assert caught.value.code is Code.NOT_FOUND
    assert "no longer knows" in caught.value.message


def test_status_query_failures_are_retried_too(fake: FakeServer) -> None:
    fake.gateway.breaks.append(Break(at=30_000))
    fake.gateway.unary_failures = 3  # the immediate query and the next two
    data = random.Random(21).randbytes(60_000)
    retries = Retries()
    result = upload(fake, data, retries)
    check_upload(fake, result, data)
    assert retries.sleeps == [0.2, 0.4, 0.8, 1.6]
    assert retries.calls == [(2, Code.UNAVAILABLE, 2 * PART)]


# --- finishing again -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unavailable", "cut"])
def test_reply_lost_after_finish_returns_the_completed_upload(fake: FakeServer, kind: str) -> None:
    fake.gateway.breaks.append(Break(at=None, at_finish="complete", code=break_code(kind)))
    data = random.Random(22).randbytes(40_000)
    retries = Retries()
    result = upload(fake, data, retries, via_proxy=kind == "cut")
    check_upload(fake, result, data)
    assert len(fake.gateway.uploads) == 1  # the status said COMPLETE: no new stream
    session = fake.gateway.sessions[result.upload_id]
    assert session.result is not None and result.etag == session.result.etag
    assert retries.calls == []
    if kind == "unavailable":
        assert retries.sleeps == [0.2]
    else:
        assert retries.sleeps == list(SCHEDULE[: len(retries.sleeps)])


def test_reply_lost_while_status_is_briefly_unavailable(fake: FakeServer) -> None:
    fake.gateway.breaks.append(Break(at=None, at_finish="complete"))
    fake.gateway.unary_failures = 1
    data = random.Random(23).randbytes(40_000)
    retries = Retries()
    result = upload(fake, data, retries)
    check_upload(fake, result, data)
    assert len(fake.gateway.uploads) == 1 and retries.sleeps == [0.2, 0.4]


def test_finish_lost_before_completion_is_sent_again(fake: FakeServer) -> None:
    fake.gateway.breaks.append(Break(at=None, at_finish="open"))
    data = random.Random(24).randbytes(40_000)
    retries = Retries()
    result = upload(fake, data, retries)
    assert check_upload(fake, result, data) == [0, 2 * PART]
    assert all(s.requests[-1].finish_write for s in fake.gateway.uploads)


def test_finishing_upload_is_finished_again_idempotently(fake: FakeServer) -> None:
    """FINISHING with every byte committed: the new stream's only message is start + finish."""
    fake.gateway.breaks.append(Break(at=None, at_finish="finishing"))
    data = random.Random(25).randbytes(40_000)
    retries = Retries()
    result = upload(fake, data, retries)
    check_upload(fake, result, data)
    [_, again] = fake.gateway.uploads
    [message] = again.requests
    assert message.HasField("start") and message.finish_write
    assert message.write_offset == len(data) and not message.data
    assert retries.calls == [(2, Code.UNAVAILABLE, len(data))]


@pytest.mark.parametrize("finish_sent", [False, True])
def test_an_upload_completed_with_other_bytes_is_an_error(
    fake: FakeServer, finish_sent: bool
) -> None:
    """A COMPLETE status is returned only if it describes the bytes this client sent."""
    gateway = fake.gateway
    upload_id = str(uuid.uuid4())
    gateway.breaks.append(Break(at=20_000) if not finish_sent else Break(at=None))
    original = gateway._detach

    def detach_and_complete(session: FakeSession, record: RecordedUpload, brk: Any) -> None:
        original(session, record, brk)
        if record.broken:  # someone else completed it, with other bytes
            session.state = COMPLETE
            session.result = upload_pb2.UploadResponse(upload_id=upload_id, size=5)

    gateway._detach = detach_and_complete  # type: ignore[method-assign]
    gateway._complete = lambda session, request: None  # type: ignore[method-assign]
    data = random.Random(26).randbytes(24_000)

    async def stalling() -> AsyncIterator[bytes]:
        yield data
        await asyncio.Event().wait()  # finish_write is never sent
        yield b""

    with pytest.raises(RecgwError) as caught:
        upload(fake, data if finish_sent else stalling(), Retries(), upload_id=upload_id)
    if finish_sent:
        assert caught.value.code is Code.DATA_LOSS
        assert "stored 5 bytes, the client sent 24000" in caught.value.message
    else:
        assert caught.value.code is Code.FAILED_PRECONDITION
        assert "completed by another stream" in caught.value.message
    assert len(gateway.uploads) == 1


# --- sources are read once -------------------------------------------------------------------


def test_live_async_iterator_is_read_exactly_once(fake: FakeServer) -> None:
    pieces = [random.Random(27 + i).randbytes(random.Random(i).randint(1, 9000)) for i in range(40)]
    data = b"".join(pieces)
    fake.gateway.breaks.extend(
        [Break(at=len(data) // 4), Break(at=len(data) // 2, code=Code.INTERNAL)]
    )
    served: list[int] = []
    finished: list[bool] = []

    async def recording() -> AsyncIterator[bytes]:
        for index, piece in enumerate(pieces):
            served.append(index)
            await asyncio.sleep(0)
            yield piece
        finished.append(True)

    result = upload(fake, recording(), Retries())
    check_upload(fake, result, data)
    assert served == list(range(len(pieces))) and finished == [True]
    assert len(fake.gateway.uploads) == 3


class CountingPipe:
    """A pipe's read end that counts the bytes read from it."""

    def __init__(self, fd: int) -> None:
        self._file = open(fd, "rb", buffering=0)  # noqa: SIM115 - closed by the test
        self.bytes_read = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self._file.read(size)
        assert data is not None
        self.bytes_read += len(data)
        return data

    def close(self) -> None:
        self._file.close()


def test_pipe_source_is_read_exactly_once(fake: FakeServer) -> None:
    data = random.Random(28).randbytes(300_000)
    read_fd, write_fd = os.pipe()

    def recorder() -> None:
        with open(write_fd, "wb", buffering=0) as pipe:
            for offset in range(0, len(data), 7000):
                pipe.write(data[offset : offset + 7000])

    thread = threading.Thread(target=recorder)
    thread.start()
    fake.gateway.breaks.extend([Break(at=60_000), Break(at=200_000, code=None)])
    pipe = CountingPipe(read_fd)
    try:
        result = upload(fake, pipe, Retries(), via_proxy=True)
    finally:
        pipe.close()
        thread.join(WAIT)
    check_upload(fake, result, data)
    assert pipe.bytes_read == len(data)
    assert len(fake.gateway.uploads) == 3


def test_sync_wrapper_resumes(fake: FakeServer) -> None:
    data = random.Random(29).randbytes(50_000)
    fake.gateway.breaks.append(Break(at=40_000))
    retries = Retries()
    result = recgw_client.sync.upload(
        fake.address,
        TOKEN,
        data,
        "acme",
        "a.webm",
        chunk_size=4 * KiB,
        retain_limit=1024 * KiB,
        on_retry=retries.on_retry,
        retry_policy=retries.policy(),
    )
    check_upload(fake, result, data)
    assert retries.calls == [(2, Code.UNAVAILABLE, 2 * PART)]


def test_progress_never_goes_back_while_resending(fake: FakeServer) -> None:
    data = random.Random(30).randbytes(100_000)
    fake.gateway.breaks.append(Break(at=60_000))
    reported: list[int] = []
    upload(fake, data, Retries(), progress=lambda sent, _: reported.append(sent))
    assert reported == sorted(set(reported)) and reported[0] == 0
    assert reported[-1] == len(data)


# --- the policy and the buffer ---------------------------------------------------------------


def test_backoff_is_exponential_capped_and_jittered() -> None:
    policy = RetryPolicy(jitter=0.0)
    assert [policy.backoff(n) for n in range(1, 10)] == [
        0.2,
        0.4,
        0.8,
        1.6,
        3.2,
        6.4,
        10.0,
        10.0,
        10.0,
    ]
    assert policy.backoff(10_000) == 10.0
    low = RetryPolicy(jitter=0.2, rand=lambda: 0.0)
    high = RetryPolicy(jitter=0.2, rand=lambda: 1.0)
    assert low.backoff(2) == pytest.approx(0.32) and high.backoff(2) == pytest.approx(0.48)
    assert high.backoff(8) == 10.0  # jitter never exceeds the cap
    bad_policies: list[dict[str, Any]] = [
        {"outage_tolerance": -1},
        {"outage_tolerance": float("nan")},
        {"multiplier": 0.5},
        {"jitter": 2.0},
        {"max_backoff": -1},
    ]
    for bad in bad_policies:
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


def test_retries_are_decided_on_the_reason_never_on_the_text() -> None:
    assert is_retryable(RecgwError(Code.ABORTED, "busy", reason="ANOTHER_WRITER"))
    assert not is_retryable(RecgwError(Code.ABORTED, "another stream is writing upload u-1"))
    assert is_retryable(RecgwError(Code.INTERNAL, "Internal error from Core"))
    # Errors the client raises itself are final whatever their code.
    assert not is_retryable(RecgwError(Code.UNAVAILABLE, "full", reason="RETAIN_LIMIT_EXCEEDED"))


def test_retained_buffer_reads_and_releases_by_offset() -> None:
    async def run() -> None:
        buffer = RetainedBuffer()
        for piece in (b"abcd", b"efgh", b"ij"):
            await buffer.append(piece)
        assert (buffer.start, buffer.end, buffer.size, buffer.high_water) == (0, 10, 10, 10)
        assert await buffer.read(0, 100) == b"abcd"
        assert await buffer.read(5, 2) == b"fg" and await buffer.read(9, 5) == b"j"
        buffer.release(6)
        assert (buffer.start, buffer.size) == (6, 4)
        assert await buffer.read(6, 100) == b"gh"
        buffer.release(3)  # already released: nothing happens
        with pytest.raises(ValueError, match="not held"):
            await buffer.read(5, 1)
        with pytest.raises(ValueError, match="only 10 bytes"):
            buffer.release(11)
        buffer.release(10)
        assert buffer.size == 0 and buffer.high_water == 10
        await buffer.append(b"k")
        assert await buffer.read(10, 1) == b"k"
        many = RetainedBuffer(start=5)
        for index in range(1000):
            await many.append(bytes([index % 256]) * 3)
        many.release(2005)  # inside the chunk at 2003; drops the 666 before it
        assert await many.read(2005, 10) == bytes([666 % 256])
        assert await many.read(2006, 10) == bytes([667 % 256]) * 3
        assert await many.read(3004, 1) == bytes([999 % 256])
        assert many.spill_fd is None  # no limit, never on disk

    asyncio.run(run())


def test_retained_buffer_spills_beyond_its_memory_to_a_private_unlinked_file(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        buffer = RetainedBuffer(100, memory_limit=10, spill_limit=25, spill_dir=tmp_path)
        await buffer.append(b"0123456")  # memory
        await buffer.append(b"789abcd")  # would exceed 10 in memory: disk
        await buffer.append(b"efg")  # memory again (7 + 3)
        await buffer.append(b"hijklmnopqrs")  # disk
        assert (buffer.memory_size, buffer.disk_size, buffer.size) == (10, 19, 29)
        fd = buffer.spill_fd
        assert fd is not None
        info = os.fstat(fd)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_nlink == 0  # unlinked at once: nothing left behind, even on a crash
        assert list(tmp_path.iterdir()) == []  # its private directory is gone too
        assert await buffer.read(100, 100) == b"0123456"
        assert await buffer.read(109, 100) == b"9abcd"  # from the disk, inside a chunk
        assert await buffer.read(114, 2) == b"ef"
        assert await buffer.read(117, 3) == b"hij"
        with pytest.raises(RecgwError) as caught:
            await buffer.append(b"t" * 7)  # 19 + 7 > 25 on disk
        assert caught.value.code is Code.RESOURCE_EXHAUSTED
        assert caught.value.reason == "RETAIN_LIMIT_EXCEEDED"
        assert buffer.end == 129  # nothing was taken
        buffer.release(115)  # a disk chunk is still held
        assert buffer.disk_size == 19 and buffer.memory_size == 2
        assert await buffer.read(115, 100) == b"fg"
        buffer.release(125)
        assert (buffer.memory_size, buffer.disk_size) == (0, 19)
        assert await buffer.read(125, 100) == b"pqrs"
        buffer.release(129)  # nothing on disk is needed any more: the file is emptied
        assert buffer.disk_size == 0 and os.fstat(fd).st_size == 0
        await buffer.append(b"u" * 20)  # room on disk again
        assert buffer.disk_high_water == 20
        assert await buffer.read(139, 100) == b"u" * 10
        await buffer.aclose()
        with pytest.raises(OSError):
            os.fstat(fd)  # closed

    asyncio.run(run())


def test_a_spill_file_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    async def run() -> None:
        gone = tmp_path / "gone"
        gone.mkdir()
        buffer = RetainedBuffer(memory_limit=4, spill_limit=100, spill_dir=gone)
        gone.rmdir()  # e.g. a temporary directory cleaned up under a running recorder
        with pytest.raises(RecgwError) as caught:
            await buffer.append(b"0123456789")
        assert caught.value.code is Code.RESOURCE_EXHAUSTED
        assert caught.value.reason == "RETAIN_LIMIT_EXCEEDED"
        assert f"cannot spill the retained bytes to a file in {gone}" in caught.value.message
        await buffer.aclose()

    asyncio.run(run())


def test_the_spill_file_is_not_emptied_while_a_chunk_is_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release between the write of a chunk and its registration must not lose it."""

    async def run() -> None:
        buffer = RetainedBuffer(memory_limit=0, spill_limit=100, spill_dir=tmp_path)
        await buffer.append(b"first")
        gate = asyncio.Event()
        written = asyncio.Event()
        original = buffer._in_thread

        async def write_then_wait(function: Any, *args: Any) -> Any:
            result = await original(function, *args)
            written.set()
            await gate.wait()  # the write is done; the chunk is not registered yet
            return result

        monkeypatch.setattr(buffer, "_in_thread", write_then_wait)
        appending = asyncio.ensure_future(buffer.append(b"second"))
        await written.wait()
        buffer.release(5)  # every registered byte on disk is released
        gate.set()
        await appending
        monkeypatch.setattr(buffer, "_in_thread", original)
        assert await buffer.read(5, 100) == b"second"
        await buffer.aclose()

    asyncio.run(run())


def test_upload_arguments_are_checked(fake: FakeServer) -> None:
    with pytest.raises(ValueError, match="retain_limit"):
        upload(fake, b"x", Retries(), chunk_size=4096, retain_limit=1000)
    with pytest.raises(ValueError, match="outage_tolerance"):
        upload(fake, b"x", Retries(), outage_tolerance=-1)
    with pytest.raises(ValueError, match="spill_limit"):
        upload(fake, b"x", Retries(), spill_limit=-1)
    with pytest.raises(ValueError, match="source_offset needs the upload_id"):
        upload(fake, b"x", Retries(), source_offset=5)
    with pytest.raises(ValueError, match="is not a directory"):
        upload(fake, b"x", Retries(), spill_dir="/nonexistent/spill")
    assert fake.gateway.uploads == []


# --- CLI ----------------------------------------------------------------------------------


@pytest.fixture
def runner(fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> typer.testing.CliRunner:
    monkeypatch.setenv("RECGW_ADDRESS", fake.address)
    monkeypatch.setenv("RECGW_TOKEN", TOKEN)

    monkeypatch.setattr(
        cli_client,
        "_retry_policy",
        lambda outage_tolerance: VirtualTime().policy(outage_tolerance=outage_tolerance),
    )
    return typer.testing.CliRunner()


def test_cli_upload_prints_one_line_per_resume(
    runner: typer.testing.CliRunner, fake: FakeServer, tmp_path: Path
) -> None:
    data = random.Random(31).randbytes(100_000)
    path = tmp_path / "call.webm"
    path.write_bytes(data)
    fake.gateway.breaks.extend(
        [
            Break(at=40_000),
            Break(at=1000),
            Break(at=70_000, code=Code.INTERNAL, reason="STORAGE_UNAVAILABLE"),
        ]
    )
    args = ["upload", str(path), "--tenant", "acme", "--name", "call.webm", "--chunk-size", "4KiB"]
    result = runner.invoke(app, [*args, "-q", "--json"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("connection lost")]
    assert lines == [
        f"connection lost (UNAVAILABLE); resuming at byte {2 * PART}, stream 2",
        f"connection lost (UNAVAILABLE); resuming at byte {2 * PART}, stream 3",
        f"connection lost (INTERNAL STORAGE_UNAVAILABLE); resuming at byte {4 * PART}, stream 4",
    ]
    session = next(s for s in fake.gateway.sessions.values() if s.start.object_name == "call.webm")
    assert bytes(session.committed) == data


def test_cli_outage_tolerance(runner: typer.testing.CliRunner, fake: FakeServer) -> None:
    fake.gateway.breaks.extend(Break(at=1000) for _ in range(10))
    base = ["upload", "-", "--tenant", "acme", "--name", "a.bin", "--chunk-size", "4KiB"]
    data = random.Random(32).randbytes(20_000)
    result = runner.invoke(app, [*base, "--outage-tolerance", "0"], input=data)
    assert result.exit_code == 1
    assert "connection lost" not in result.stderr
    assert "error: UNAVAILABLE: the gateway went away (upload id " in result.stderr
    result = runner.invoke(app, [*base, "--outage-tolerance", "0.5", "--json"], input=data)
    assert result.exit_code == 1
    assert result.stderr.count("connection lost") == 2  # after 0.2 and 0.4 (virtual) s
    assert "3 attempts" in result.stderr
    assert "no progress for 0.5 s, so the upload was left open" in result.stderr
    assert "--upload-id" in result.stderr
    assert json.loads(result.stdout)["error"]["attempts"] == 3
    result = runner.invoke(app, [*base, "--outage-tolerance", "-1"], input=data)
    assert result.exit_code == 2
    assert len(fake.gateway.uploads) == 4


def test_cli_status_shows_committed_size_state_and_result(
    runner: typer.testing.CliRunner, fake: FakeServer
) -> None:
    def fields(output: str) -> dict[str, str]:
        rows = (re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in output.splitlines())
        return {key: value for key, value in rows}

    result = runner.invoke(app, ["status", "u-1"])
    assert result.exit_code == 0, result.output
    shown = fields(result.stdout)
    assert shown["state"] == "COMPLETE" and shown["committed size"] == "11"
    # The result of a complete upload.
    assert shown["bucket"] == "customer-bucket" and shown["size"] == "11"
    assert shown["key"] == "uploads/a.webm"
    fake.gateway.sessions["u-2"] = FakeSession(
        start=upload_pb2.UploadStart(tenant_id="acme", object_name="b.webm", upload_id="u-2"),
        state=FINISHING,
        committed=bytearray(3 * PART),
    )
    result = runner.invoke(app, ["status", "u-2"])
    assert result.exit_code == 0, result.output
    shown = fields(result.stdout)
    assert shown["state"] == "FINISHING" and shown["committed size"] == str(3 * PART)
    assert "bucket" not in shown
