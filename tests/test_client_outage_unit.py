"""recgw_client against the fake gateway: continuing an existing upload id, the disk spill of a
live source through an outage, heartbeats, unconfirmed completions, salvage; and the CLI's
side of them. Time is virtual (tests.test_client_unit.VirtualTime) except for the heartbeat,
which waits for an event, not for time.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import typer.testing

import recgw_client
import recgw_client.uploads
from recgw_client import RecgwError, UploadResult
from recgw_client.cli import commands as cli_client
from tests.test_client_resume_unit import PART, Retries, _Tracked, check_upload
from tests.test_client_unit import (
    ABORTED,
    TOKEN,
    WAIT,
    Break,
    FakeServer,
    VirtualTime,
)

KiB = 1024
Code = grpc.StatusCode
app = cli_client.make_app(plugins=False)


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    server.start()
    server.gateway.part_size = PART
    yield server
    server.stop()


def upload(fake: FakeServer, source: recgw_client.Source, **kwargs: Any) -> UploadResult:
    kwargs.setdefault("chunk_size", 4 * KiB)
    kwargs.setdefault("retry_policy", Retries().policy())

    async def run() -> UploadResult:
        return await recgw_client.upload(fake.address, TOKEN, source, "acme", "a.webm", **kwargs)

    return asyncio.run(run())


def died_upload(fake: FakeServer, data: bytes, at: int = 40_000) -> str:
    """An upload whose process died at ``at`` bytes: 2 parts committed, still open."""
    upload_id = str(uuid.uuid4())
    fake.gateway.breaks.append(Break(at=at))
    with pytest.raises(RecgwError):
        upload(fake, data, upload_id=upload_id, outage_tolerance=0)
    assert len(fake.gateway.sessions[upload_id].committed) == 2 * PART
    return upload_id


class CountingStream(io.BytesIO):
    """A seekable binary stream that counts the bytes read from it."""

    bytes_read = 0

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data

    def read1(self, size: int | None = -1, /) -> bytes:
        return self.read(size)


class Pipe:
    """stdin when it is a pipe: readable, not seekable."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1, /) -> bytes:
        return self._data.read(size)

    def seekable(self) -> bool:
        return False


# --- continuing an existing upload id -------------------------------------------------------


def test_continuing_an_upload_from_its_file_after_the_process_died(
    fake: FakeServer, tmp_path: Path
) -> None:
    data = random.Random(1).randbytes(100_000)
    upload_id = died_upload(fake, data)
    path = tmp_path / "call.webm"
    path.write_bytes(data)
    queries = fake.gateway.status_queries
    result = upload(fake, path, upload_id=upload_id)
    # One status query, then one stream from the committed size; the whole-object
    # checksums still cover every byte (the committed prefix was read and hashed).
    assert fake.gateway.status_queries == queries + 1
    offsets = check_upload(fake, result, data)
    assert offsets == [0, 2 * PART]
    assert all(r.HasField("data_crc32c") for r in fake.gateway.uploads[1].requests if r.data)


def test_continuing_without_checksums_seeks_past_the_committed_bytes(fake: FakeServer) -> None:
    data = random.Random(2).randbytes(100_000)
    upload_id = died_upload(fake, data)
    stream = CountingStream(data)
    result = upload(fake, stream, upload_id=upload_id, compute_checksums=False)
    assert stream.bytes_read == len(data) - 2 * PART  # sought, not read
    session = fake.gateway.sessions[result.upload_id]
    assert bytes(session.committed) == data
    second = fake.gateway.uploads[1].requests
    assert second[0].write_offset == 2 * PART
    assert not second[-1].HasField("object_checksums")
    assert not any(r.HasField("data_crc32c") for r in second)


def test_continuing_from_a_pipe_says_what_to_supply(fake: FakeServer) -> None:
    data = random.Random(3).randbytes(100_000)
    upload_id = died_upload(fake, data)
    with pytest.raises(RecgwError) as caught:
        upload(fake, iter([data]), upload_id=upload_id)
    error = caught.value
    assert (error.code, error.reason) == (Code.FAILED_PRECONDITION, "SOURCE_NOT_SEEKABLE")
    assert error.committed_size() == 2 * PART and error.upload_id == upload_id
    assert "seekable source" in error.message
    assert f"source_offset={2 * PART}" in error.message
    assert len(fake.gateway.uploads) == 1  # no stream was opened


def test_source_offset_continues_from_the_remaining_bytes(fake: FakeServer) -> None:
    data = random.Random(4).randbytes(100_000)
    upload_id = died_upload(fake, data)
    # The caller has the bytes from 100 before the committed size on: those 100 are skipped.
    start = 2 * PART - 100
    result = upload(fake, iter([data[start:]]), upload_id=upload_id, source_offset=start)
    session = fake.gateway.sessions[result.upload_id]
    assert bytes(session.committed) == data
    second = fake.gateway.uploads[1].requests
    assert second[0].write_offset == 2 * PART
    # The client never saw the first bytes: no whole-object checksums, per-message ones yes.
    assert not second[-1].HasField("object_checksums")
    assert all(r.HasField("data_crc32c") for r in second if r.data)
    with pytest.raises(RecgwError) as caught:
        upload(fake, iter([b"x"]), upload_id=str(uuid.uuid4()), source_offset=10)
    assert caught.value.reason == "SOURCE_MISMATCH"


def test_source_offset_beyond_the_committed_size_is_refused(fake: FakeServer) -> None:
    data = random.Random(5).randbytes(100_000)
    upload_id = died_upload(fake, data)
    with pytest.raises(RecgwError) as caught:
        upload(fake, iter([data[50_000:]]), upload_id=upload_id, source_offset=50_000)
    assert (caught.value.code, caught.value.reason) == (Code.FAILED_PRECONDITION, "SOURCE_MISMATCH")
    assert f"bytes {2 * PART} to 50000 are missing" in caught.value.message


def test_an_upload_id_that_is_complete_returns_its_result(fake: FakeServer) -> None:
    data = random.Random(6).randbytes(30_000)
    first = upload(fake, data)
    again = upload(fake, data, upload_id=first.upload_id)
    assert again == first
    assert len(fake.gateway.uploads) == 1  # no new stream
    with pytest.raises(RecgwError) as caught:
        upload(fake, data + b"more", upload_id=first.upload_id)
    assert caught.value.reason == "SOURCE_MISMATCH" and "30000 bytes" in caught.value.message


def test_an_upload_id_that_has_ended_is_final(fake: FakeServer) -> None:
    data = random.Random(7).randbytes(100_000)
    upload_id = died_upload(fake, data)
    fake.gateway.sessions[upload_id].state = ABORTED
    with pytest.raises(RecgwError) as caught:
        upload(fake, data, upload_id=upload_id)
    assert (caught.value.code, caught.value.reason) == (Code.FAILED_PRECONDITION, "UPLOAD_ENDED")
    assert len(fake.gateway.uploads) == 1


def test_an_unknown_upload_id_starts_a_new_upload(fake: FakeServer) -> None:
    data = random.Random(8).randbytes(30_000)
    chosen = str(uuid.uuid4())
    result = upload(fake, iter([data]), upload_id=chosen)
    assert result.upload_id == chosen
    assert check_upload(fake, result, data) == [0]
    assert fake.gateway.status_queries == 1  # the one that found nothing


# --- a live source through an outage ----------------------------------------------------------


class Recorder:
    """A live recording, as fast as the client reads it; notes whether a stream was up."""

    def __init__(self, fake: FakeServer, data: bytes, chunk: int = 4 * KiB) -> None:
        self._fake = fake
        self.data = data
        self._chunk = chunk
        self.done = asyncio.Event()
        self.streams_when_done = -1

    async def chunks(self) -> AsyncIterator[bytes]:
        for offset in range(0, len(self.data), self._chunk):
            yield self.data[offset : offset + self._chunk]
            await asyncio.sleep(0)
        self.streams_when_done = len(self._fake.gateway.uploads)
        self._fake.gateway.unary_failures = 0  # the gateway is back
        self.done.set()


class OutageTime(VirtualTime):
    """Virtual backoff; the first wait lasts until the recording has ended (the outage)."""

    def __init__(self, recorder: Recorder | None) -> None:
        super().__init__()
        self._recorder = recorder

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds)
        if self._recorder is None:
            await asyncio.Event().wait()  # an outage that never ends
        else:
            await self._recorder.done.wait()


def test_a_live_source_spills_to_disk_through_an_outage(
    fake: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recgw_client.uploads, "RetainedBuffer", _Tracked)
    _Tracked.instances = []
    data = random.Random(9).randbytes(400 * KiB)
    recorder = Recorder(fake, data)
    # The stream breaks after 2 parts; then the status cannot be asked until the recorder
    # is done: the whole rest of the recording arrives while no stream is up.
    fake.gateway.breaks.append(Break(at=40_000, status_failures=10**6))
    result = upload(
        fake,
        recorder.chunks(),
        retain_limit=16 * KiB,
        spill_limit=1024 * KiB,
        spill_dir=tmp_path,
        retry_policy=OutageTime(recorder).policy(),
    )
    check_upload(fake, result, data)
    assert recorder.streams_when_done == 1  # read to the end during the outage
    [retained] = _Tracked.instances
    assert retained.disk_high_water >= len(data) - 2 * PART - 16 * KiB - 4 * KiB
    assert retained.high_water <= 16 * KiB + retained.disk_high_water
    assert retained.spill_fd is None and list(tmp_path.iterdir()) == []


def test_a_full_spill_file_fails_clearly_at_once(fake: FakeServer, tmp_path: Path) -> None:
    data = random.Random(10).randbytes(400 * KiB)
    recorder = Recorder(fake, data)
    fake.gateway.breaks.append(Break(at=40_000, status_failures=10**6))
    with pytest.raises(RecgwError) as caught:
        upload(
            fake,
            recorder.chunks(),
            retain_limit=16 * KiB,
            spill_limit=64 * KiB,
            spill_dir=tmp_path,
            retry_policy=OutageTime(None).policy(),  # the gateway never comes back
        )
    error = caught.value
    assert (error.code, error.reason) == (Code.RESOURCE_EXHAUSTED, "RETAIN_LIMIT_EXCEEDED")
    assert "spill_limit 65536" in error.message and error.upload_id is not None
    assert not recorder.done.is_set()  # it stopped reading: nothing was dropped silently
    assert list(tmp_path.iterdir()) == []


def test_a_silent_source_sends_heartbeats(fake: FakeServer) -> None:
    async def recording() -> AsyncIterator[bytes]:
        yield b"a" * 10
        # Silent until the gateway saw a heartbeat (waits for the event, not for time).
        assert await asyncio.to_thread(fake.gateway.heartbeat.wait, WAIT)
        yield b"b" * 5

    result = upload(fake, recording(), heartbeat_interval=0.01)
    assert result.size == 15
    assert fake.gateway.heartbeats and set(fake.gateway.heartbeats) == {10}


def test_an_unconfirmed_completion_is_returned_with_its_flag(fake: FakeServer) -> None:
    data = random.Random(11).randbytes(40_000)
    fake.gateway.breaks.append(Break(at=None, at_finish="complete", unconfirmed=True))
    result = upload(fake, data)
    assert result.unconfirmed and result.size == len(data)
    assert len(fake.gateway.uploads) == 1


# --- the CLI --------------------------------------------------------------------------------


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


def test_cli_continues_an_upload_id_from_the_file_or_says_what_to_give(
    runner: typer.testing.CliRunner,
    fake: FakeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = random.Random(12).randbytes(100_000)
    upload_id = died_upload(fake, data)
    monkeypatch.setattr(cli_client, "_stdin", lambda: Pipe(data))
    path = tmp_path / "a.webm"
    path.write_bytes(data)
    base = [
        "--tenant",
        "acme",
        "--name",
        "a.webm",
        "--upload-id",
        upload_id,
        "--chunk-size",
        "4KiB",
    ]
    piped = runner.invoke(app, ["upload", "-", *base, "-q"])
    assert piped.exit_code == 1
    assert "SOURCE_NOT_SEEKABLE" in piped.stderr
    assert f"--source-offset {2 * PART}" in piped.stderr
    result = runner.invoke(app, ["upload", str(path), *base, "-q", "--json"])
    assert result.exit_code == 0, result.output
    assert f"continuing at byte {2 * PART}" in result.stderr
    assert json.loads(result.stdout)["size"] == len(data)
    assert bytes(fake.gateway.sessions[upload_id].committed) == data


def test_cli_pipes_the_rest_with_source_offset(
    runner: typer.testing.CliRunner, fake: FakeServer
) -> None:
    data = random.Random(13).randbytes(100_000)
    upload_id = died_upload(fake, data)
    args = ["upload", "-", "--tenant", "acme", "--name", "a.webm", "--upload-id", upload_id]
    result = runner.invoke(
        app, [*args, "--source-offset", str(2 * PART), "-q"], input=data[2 * PART :]
    )
    assert result.exit_code == 0, result.output
    assert bytes(fake.gateway.sessions[upload_id].committed) == data
    result = runner.invoke(
        app, ["upload", "-", "--tenant", "a", "--name", "b", "--source-offset", "5"]
    )
    assert result.exit_code == 2 and "--upload-id" in result.output


def test_cli_salvage(runner: typer.testing.CliRunner, fake: FakeServer) -> None:
    data = random.Random(14).randbytes(100_000)
    upload_id = died_upload(fake, data)
    result = runner.invoke(app, ["salvage", upload_id, "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["state"] == "SALVAGED" and shown["size"] == 2 * PART
    assert shown["key"] == "uploads/a.webm.partial"
    fake.gateway.salvage_implemented = False
    result = runner.invoke(app, ["salvage", upload_id, "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "UNIMPLEMENTED"


def test_cli_errors_carry_the_reason_and_metadata(
    runner: typer.testing.CliRunner, fake: FakeServer
) -> None:
    fake.gateway.unary_error = (Code.NOT_FOUND, "no upload u-9", "UPLOAD_NOT_FOUND")
    result = runner.invoke(app, ["status", "u-9"])
    assert result.exit_code == 1
    assert "error: NOT_FOUND: no upload u-9 (UPLOAD_NOT_FOUND" in result.stderr
    result = runner.invoke(app, ["status", "u-9", "--json"])
    assert json.loads(result.stdout)["error"] == {
        "code": "NOT_FOUND",
        "message": "no upload u-9",
        "reason": "UPLOAD_NOT_FOUND",
        "upload_id": "u-9",
    }
