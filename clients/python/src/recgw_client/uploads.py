"""Streaming uploads that ride out outages, upload status, abort and salvage.

asyncio, grpc.aio. How an upload survives failures:

* The client chooses the upload id (a uuid4 unless the caller passes one), so
  it can ask about the upload even if the stream died before the gateway's
  ``x-recgw-upload-id`` header arrived.
* The gateway makes bytes durable a whole S3 part at a time; GetUploadStatus
  reports that ``committed_size``. Bytes it received beyond it are lost when a
  stream breaks, so the client keeps every byte from the committed size on (the
  retained buffer) and re-sends them on a new stream whose first message
  repeats ``start`` with ``write_offset`` = the committed size.
* A reader task drains the source into the retained buffer independently of
  the streams; each byte is folded into the CRC32C and SHA-256 once, when it
  is read. A live (non-seekable) source is read as it produces, also while the
  gateway is unreachable: beyond ``retain_limit`` bytes in memory the retained
  bytes spill to a private temporary file (``spill_limit``). A seekable source
  (a file) simply waits while the buffer is full.
* What to retry follows testdata/retry_table.json (see ``recgw_client.retry``);
  retries stop after ``outage_tolerance`` seconds without the committed size
  growing.
* Finishing is idempotent: if the stream breaks after ``finish_write``, the
  status shows COMPLETE and its result is returned.
* An upload id the caller passes may name an upload that already has
  committed bytes (an earlier process died): the client asks GetUploadStatus
  first and continues from the committed size.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from recgw.v1 import upload_pb2, upload_pb2_grpc

from recgw_client._channel import (
    DEFAULT_TIMEOUT,
    ChannelOrTarget,
    TlsConfig,
    bearer_metadata,
    open_channel,
)
from recgw_client._retained import RetainedBuffer, check_spill_dir
from recgw_client._sources import OpenedSource, Source
from recgw_client.checksums import Checksummer, ObjectChecksums, crc32c
from recgw_client.errors import (
    RESUME_IMPOSSIBLE,
    SOURCE_MISMATCH,
    SOURCE_NOT_SEEKABLE,
    UPLOAD_ENDED,
    RecgwError,
)
from recgw_client.retry import RetryCallback, RetryPolicy, is_retryable

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_RETAIN_LIMIT",
    "DEFAULT_SPILL_LIMIT",
    "HEARTBEAT_INTERVAL",
    "MAX_CHUNK_SIZE",
    "UPLOAD_ID_HEADER",
    "AbortResult",
    "CommittedCallback",
    "ProgressCallback",
    "SalvageResult",
    "UploadClient",
    "UploadIdCallback",
    "UploadResult",
    "UploadState",
    "UploadStatus",
    "abort_upload",
    "get_upload_status",
    "salvage_upload",
    "upload",
]

MiB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 1 * MiB
MAX_CHUNK_SIZE = 4 * MiB
DEFAULT_CONTENT_TYPE = "application/octet-stream"
UPLOAD_ID_HEADER = "x-recgw-upload-id"
DEFAULT_RETAIN_LIMIT = 64 * MiB
"""Default bound on the retained bytes an upload keeps in memory.

The gateway writes 8 MiB parts with up to 4 in flight, so its committed size
lags the bytes sent by up to about 40 MiB.
"""
DEFAULT_SPILL_LIMIT = 1024 * MiB
"""Default bound on the retained bytes a live source may spill to disk (about 28 minutes
of a 5 Mbit/s recording while the gateway is unreachable)."""
HEARTBEAT_INTERVAL = 2.0
"""Seconds of a silent source after which an empty message tells the gateway the stream
lives (the gateway lets a new stream take over one silent for 5 s)."""

# Polling GetUploadStatus while reading is paused for memory.
_POLL_INITIAL = 0.05
_POLL_MAX = 1.0
# Seconds of polling after which a gateway that holds every byte sent and
# commits none is taken to wait for a part larger than the retain limit.
_STALL_TIMEOUT = 10.0

ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes sent so far, total size or None) after each chunk."""
CommittedCallback = Callable[[int], None]
"""Called with the gateway's committed size whenever the client learns that it grew."""
UploadIdCallback = Callable[[str], None]
"""Called once with the upload id, as soon as the gateway accepted the start message."""


class UploadState(enum.Enum):
    """Life-cycle state of an upload."""

    UNSPECIFIED = 0
    OPEN = 1
    FINISHING = 2
    COMPLETE = 3
    ABORTED = 4
    EXPIRED = 5
    COMPLETION_UNCONFIRMED = 6
    SALVAGED = 7

    @classmethod
    def _from_proto(cls, value: int) -> UploadState:
        try:
            return cls(value)
        except ValueError:
            return cls.UNSPECIFIED


@dataclass(frozen=True)
class UploadResult:
    """The finished object; ``checksums`` are those the gateway computed and verified.

    ``unconfirmed``: S3's answer to the completion was lost and the gateway could
    not confirm the object (see UPLOAD_STATE_COMPLETION_UNCONFIRMED): it is very
    likely complete; ``etag`` is then the ETag the gateway expects.
    """

    upload_id: str
    bucket: str
    key: str
    size: int
    etag: str
    version_id: str
    part_count: int
    checksums: ObjectChecksums
    unconfirmed: bool = False


@dataclass(frozen=True)
class UploadStatus:
    """What GetUploadStatus reports about an upload."""

    upload_id: str
    state: UploadState
    committed_size: int
    received_size: int
    tenant_id: str
    key: str
    result: UploadResult | None
    error_message: str
    create_time: datetime | None
    update_time: datetime | None


@dataclass(frozen=True)
class AbortResult:
    """What AbortUpload did; ``detail`` explains anything left in S3."""

    state: UploadState
    storage_aborted: bool
    detail: str


@dataclass(frozen=True)
class SalvageResult:
    """What SalvageUpload did: the state after it and the object it kept."""

    state: UploadState
    result: UploadResult | None


def _checksums(message: upload_pb2.ObjectChecksums) -> ObjectChecksums:
    return ObjectChecksums(
        crc32c=message.crc32c if message.HasField("crc32c") else None,
        sha256=message.sha256 or None,
    )


def _result(response: upload_pb2.UploadResponse, upload_id: str | None = None) -> UploadResult:
    return UploadResult(
        upload_id=response.upload_id or upload_id or "",
        bucket=response.bucket,
        key=response.key,
        size=response.size,
        etag=response.etag,
        version_id=response.version_id,
        part_count=response.part_count,
        checksums=_checksums(response.checksums),
        unconfirmed=response.unconfirmed,
    )


def _time(stamp: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    return stamp.ToDatetime(tzinfo=UTC) if present else None


def _status(response: upload_pb2.GetUploadStatusResponse) -> UploadStatus:
    state = UploadState._from_proto(response.state)
    result = None
    if response.HasField("result"):
        result = _result(response.result, response.upload_id)
        if state is UploadState.COMPLETION_UNCONFIRMED and not result.unconfirmed:
            result = dataclasses.replace(result, unconfirmed=True)
    return UploadStatus(
        upload_id=response.upload_id,
        state=state,
        committed_size=response.committed_size,
        received_size=response.received_size,
        tenant_id=response.tenant_id,
        key=response.key,
        result=result,
        error_message=response.error_message,
        create_time=_time(response.create_time, response.HasField("create_time")),
        update_time=_time(response.update_time, response.HasField("update_time")),
    )


# --- the messages of a stream (shared test vectors check these bytes) ---------------------------


def start_message(start: upload_pb2.UploadStart, write_offset: int) -> upload_pb2.UploadRequest:
    """The first message of a stream: ``start``, at the offset the stream begins."""
    return upload_pb2.UploadRequest(start=start, write_offset=write_offset)


def data_message(write_offset: int, data: bytes, with_crc32c: bool) -> upload_pb2.UploadRequest:
    """A data message; with ``with_crc32c`` it carries the CRC32C of its data."""
    message = upload_pb2.UploadRequest(write_offset=write_offset, data=data)
    if with_crc32c and data:
        message.data_crc32c = crc32c(data)
    return message


def finish_fields(message: upload_pb2.UploadRequest, checksums: ObjectChecksums | None) -> None:
    """Make ``message`` the last of the upload, with the whole object's checksums."""
    message.finish_write = True
    if checksums is not None:
        message.object_checksums.crc32c = checksums.crc32c or 0
        message.object_checksums.sha256 = checksums.sha256 or b""


_CORE_INTERNAL_DETAILS = "Internal error from Core"
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
_Trailers = Iterable[tuple[str, Any]] | None

_UploadCall = grpc.aio.StreamUnaryCall[upload_pb2.UploadRequest, upload_pb2.UploadResponse]


class _StatusLog:
    """Every status the call was given, in order: works around grpc/grpc#36066.

    When a write fails because the gateway is ending the RPC (an abort while
    data is still flowing), grpc.aio replaces the gateway's status with
    INTERNAL "Internal error from Core". The gateway's own status (and its
    trailers, with the ErrorInfo) is also set on the call, before or after
    that, and is kept here. grpc has no public way to read it from a done
    callback, hence the private attribute; without it the INTERNAL error is
    reported unchanged.
    """

    def __init__(self, call: _UploadCall) -> None:
        self._statuses: list[tuple[grpc.StatusCode, str, _Trailers]] = []
        call.add_done_callback(self._record)

    def _record(self, call: object) -> None:
        status = getattr(getattr(call, "_cython_call", None), "_status", None)
        if status is None:
            return
        code = _STATUS_CODES.get(status.code())
        if code is not None:
            self._statuses.append((code, status.details() or "", status.trailing_metadata()))

    def resolve(self, error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, _Trailers]:
        """The gateway's status behind ``error``."""
        code, details = error.code(), error.details() or ""
        if code is grpc.StatusCode.INTERNAL and details == _CORE_INTERNAL_DETAILS:
            for logged in self._statuses:
                if logged[:2] != (grpc.StatusCode.INTERNAL, _CORE_INTERNAL_DETAILS):
                    return logged
        return code, details, error.trailing_metadata()


class _UploadIdWatch:
    """Reports the upload id from the response header as soon as it arrives."""

    def __init__(self, call: _UploadCall, announce: Callable[[str], None]) -> None:
        self._call = call
        self._announce = announce
        self.callback_error: Exception | None = None

    async def run(self) -> None:
        try:
            metadata = await self._call.initial_metadata()
        except Exception:
            return  # the call failed; its status is reported by the upload itself
        value = metadata.get(UPLOAD_ID_HEADER) if metadata is not None else None
        if value is None:
            return
        try:
            self._announce(value.decode() if isinstance(value, bytes) else value)
        except Exception as exc:
            # Whoever needed the id (to resume later) did not get it: give up.
            self.callback_error = exc
            self._call.cancel()


class _Reader:
    """Drains the source into the retained buffer, independently of the streams.

    The first ``discard`` bytes read are already committed (an upload continued
    from a seekable source): they only enter the checksums.
    """

    def __init__(self, run: _UploadRun) -> None:
        self._run = run
        self._discard = 0
        self.eof = False
        self.error: Exception | None = None
        self.changed = asyncio.Event()  # set on new bytes, the end and a failure
        self.failed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self, chunks: AsyncIterator[bytes], discard: int) -> None:
        self._discard = discard
        self.task = asyncio.ensure_future(self._read(chunks))

    async def _read(self, chunks: AsyncIterator[bytes]) -> None:
        run = self._run
        checksummer, retained = run.checksummer, run.retained
        try:
            while True:
                await run.make_room()
                data = await anext(chunks, b"")
                if not data:
                    break
                if checksummer is not None:
                    # In a thread: the sender goes on meanwhile (hashlib releases the GIL).
                    await asyncio.to_thread(checksummer.update, data)
                if self._discard:
                    skipped = min(self._discard, len(data))
                    self._discard -= skipped
                    data = data[skipped:]
                    if not data:
                        continue
                await retained.append(data)
                self.changed.set()
            if self._discard:
                raise run.error(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the source ended {self._discard} bytes before the committed size of "
                    f"upload {run.upload_id}; it is not the source of this upload",
                    reason=SOURCE_MISMATCH,
                )
            self.eof = True
        except Exception as exc:  # the source's own, or a full spill file
            self.error = exc
            self.failed.set()
        finally:
            self.changed.set()

    async def close(self) -> None:
        if self.task is not None:
            await _cancel(self.task)


class _Sender:
    """Writes one stream: start at the resume offset, then the retained bytes as they come."""

    def __init__(self, run: _UploadRun, call: _UploadCall, resume_at: int) -> None:
        self._run = run
        self._call = call
        self._resume_at = resume_at
        # Set once every byte is handed to gRPC and finish_write is being sent.
        self.finishing = False

    async def run(self) -> None:
        # Once the call has ended, awaiting it gives the gateway's status.
        with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
            await self._send()

    async def _send(self) -> None:
        run, call = self._run, self._call
        retained, reader = run.retained, run.reader
        offset = self._resume_at
        run.position = offset
        first = start_message(run.start, offset)
        if reader.eof and offset == retained.end:
            # All data is committed: finish at once. If the gateway completed the
            # upload meanwhile, this returns its result.
            await self._finish(first)
            return
        run.report_progress(offset)
        await call.write(first)
        while True:
            if offset < retained.end:
                data = await retained.read(offset, run.chunk_size)
                await call.write(data_message(offset, data, run.chunk_checksums))
                offset += len(data)
                run.position = offset
                run.report_progress(offset)
                run.maybe_trim()
                continue
            if reader.error is not None:
                raise reader.error
            if reader.eof:
                break
            reader.changed.clear()
            try:
                await asyncio.wait_for(reader.changed.wait(), run.heartbeat_interval)
            except TimeoutError:
                # A silent source: show the gateway that this stream is alive.
                await call.write(upload_pb2.UploadRequest(write_offset=offset))
        await self._finish(upload_pb2.UploadRequest(write_offset=offset))

    async def _finish(self, final: upload_pb2.UploadRequest) -> None:
        checksummer = self._run.checksummer
        finish_fields(final, checksummer.result() if checksummer is not None else None)
        self.finishing = True
        self._run.finish_sent = True
        await self._call.write(final)
        await self._call.done_writing()


async def _response(call: _UploadCall) -> upload_pb2.UploadResponse:
    return await call


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


_RESUMABLE = (UploadState.OPEN, UploadState.FINISHING)
_COMPLETED = (UploadState.COMPLETE, UploadState.COMPLETION_UNCONFIRMED)


class _UploadRun:
    """One upload: its streams, the reader, the retained bytes and the status queries."""

    def __init__(
        self,
        client: UploadClient,
        start: upload_pb2.UploadStart,
        source: OpenedSource,
        *,
        total: int | None,
        chunk_size: int,
        retain_limit: int,
        spill_limit: int,
        spill_dir: str | os.PathLike[str] | None,
        policy: RetryPolicy,
        progress: ProgressCallback | None,
        on_committed: CommittedCallback | None,
        checksums: bool,
        source_offset: int,
        caller_chose_id: bool,
        on_upload_id: UploadIdCallback | None,
        on_retry: RetryCallback | None,
        heartbeat_interval: float,
    ) -> None:
        self._client = client
        self.start = start
        self.upload_id = start.upload_id
        self._source = source
        self.total = total
        self.chunk_size = chunk_size
        self.policy = policy
        # Whole-object checksums need every byte from 0; a source starting later has not.
        self.checksummer = Checksummer() if checksums and source_offset == 0 else None
        self.chunk_checksums = checksums
        self._source_offset = source_offset
        self._caller_chose_id = caller_chose_id
        self.heartbeat_interval = heartbeat_interval
        # A live source is drained at once, spilling to disk beyond the memory limit; a
        # seekable one waits for room (self.cap) instead.
        self.spills = spill_limit > 0 and not source.seekable
        self.cap = retain_limit
        self.retained = (
            RetainedBuffer(memory_limit=retain_limit, spill_limit=spill_limit, spill_dir=spill_dir)
            if self.spills
            else RetainedBuffer()
        )
        self.reader = _Reader(self)
        self._progress = progress
        self._on_committed = on_committed
        self._on_upload_id = on_upload_id
        self._on_retry = on_retry
        self._reported = -1
        self._announced = False
        # Offset the current stream has reached; trimming never passes it.
        self.position = 0
        self.finish_sent = False
        self.streams = 0
        self._refreshing: asyncio.Future[UploadStatus | None] | None = None
        self._queried_at = 0
        # The largest committed size seen; since when the upload fails without it growing
        # (None while it goes well), and the retries since.
        self._committed = 0
        self._outage_since: float | None = None
        self._failures = 0

    # --- progress and the upload id -----------------------------------------------------

    def report_progress(self, offset: int) -> None:
        if self._progress is not None and offset > self._reported:
            self._reported = offset
            self._progress(offset, self.total)

    def _observe(self, committed: int) -> None:
        """The gateway has committed this much: progress restarts the outage clock."""
        if committed > self._committed:
            self._committed = committed
            self._outage_since = None
            self._failures = 0
            if self._on_committed is not None:
                self._on_committed(committed)

    def announce(self, upload_id: str) -> None:
        if self._announced:
            return
        self._announced = True
        if upload_id != self.upload_id:  # the gateway's word decides which upload to resume
            self.upload_id = upload_id
            self.start.upload_id = upload_id
        if self._on_upload_id is not None:
            self._on_upload_id(upload_id)

    def error(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> RecgwError:
        return RecgwError(
            code,
            message,
            reason=reason,
            metadata=metadata,
            upload_id=self.upload_id,
            attempts=max(self.streams, 1),
        )

    def _own(self, error: RecgwError) -> RecgwError:
        error.upload_id = self.upload_id
        error.attempts = max(self.streams, 1)
        return error

    # --- memory ---------------------------------------------------------------------------

    def _room(self) -> bool:
        return self.spills or self.retained.size + self.chunk_size <= self.cap

    def maybe_trim(self) -> None:
        """Ask for the committed size in the background once half the cap is sent, uncommitted."""
        step = max(self.chunk_size, self.cap // 8)
        if (
            self._refreshing is None
            and self.position - self.retained.start > self.cap // 2
            and self.position - self._queried_at >= step
        ):
            self._start_refresh()

    def _start_refresh(self) -> asyncio.Future[UploadStatus | None]:
        if self._refreshing is None:
            self._queried_at = self.position
            task = asyncio.ensure_future(self._query())
            self._refreshing = task
            task.add_done_callback(self._refreshed)
        return self._refreshing

    def _refreshed(self, task: asyncio.Future[UploadStatus | None]) -> None:
        if self._refreshing is task:
            self._refreshing = None

    async def _query(self) -> UploadStatus | None:
        try:
            status = await self._client.get_upload_status(self.upload_id)
        except RecgwError:
            return None  # a broken stream reports the real problem
        if status.state in _RESUMABLE:
            self._observe(status.committed_size)
            committed = min(status.committed_size, self.position, self.retained.end)
            self.retained.release(max(committed, self.retained.start))
        return status

    async def make_room(self) -> None:
        """Wait until the cap leaves room for one more chunk, polling the committed size."""
        if self._room():
            return
        delay = _POLL_INITIAL
        stalled = 0.0
        committed = self.retained.start
        while True:
            status = await asyncio.shield(self._start_refresh())
            if self._room():
                return
            if self.retained.start != committed:
                committed, stalled = self.retained.start, 0.0
            elif status is not None and status.received_size >= self.retained.end:
                # The gateway holds every byte sent and commits none: it waits for more
                # bytes than the cap allows to fill a part. Raise the cap rather than hang.
                if stalled >= _STALL_TIMEOUT:
                    self.cap *= 2
                    return
            else:
                stalled = 0.0
            await self.policy.sleep(delay)
            stalled += delay
            delay = min(delay * 2, _POLL_MAX)

    # --- the streams ------------------------------------------------------------------------

    async def close(self) -> None:
        if self._refreshing is not None:
            await _cancel(self._refreshing)
        await self.reader.close()
        await self._source.aclose()
        await self.retained.aclose()

    async def run(self) -> UploadResult:
        """Continue an existing upload or start one, then stream it to the end."""
        resume_at = 0
        if self._caller_chose_id:
            status, _ = await self._query_until_answered(None)
            done = self._settle_existing(status)
            if done is not None:
                return done
            resume_at = self._start_point(status)
        self._begin(resume_at)
        return await self._stream(resume_at)

    def _begin(self, resume_at: int) -> None:
        """Start reading the source, positioned so that the next byte read is ``resume_at``."""
        skip = resume_at - self._source_offset
        hashing = self.checksummer is not None
        seek = skip if self._source.seekable and not hashing else 0
        discard = skip - seek if not hashing else resume_at
        self.retained.begin_at(resume_at)
        self.position = self._queried_at = resume_at
        self._committed = resume_at
        self.reader.start(self._source.chunks(seek), discard)

    def _start_point(self, status: UploadStatus | None) -> int:
        """Where the upload named by the caller's id continues, or why it cannot."""
        offset = self._source_offset
        if status is None:
            if offset:
                raise self.error(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the gateway does not know upload {self.upload_id}; a source that starts "
                    f"at byte {offset} can only continue an existing upload",
                    reason=SOURCE_MISMATCH,
                )
            return 0
        committed = status.committed_size
        if committed < offset:
            raise self.error(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"upload {self.upload_id} has {committed} bytes committed but the source starts "
                f"at byte {offset}: bytes {committed} to {offset} are missing; supply the source "
                f"from byte {committed} on",
                reason=SOURCE_MISMATCH,
                metadata={"committed_size": str(committed)},
            )
        if committed > offset and not self._source.seekable and offset == 0:
            raise self.error(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"upload {self.upload_id} already has {committed} bytes committed and the "
                f"source cannot seek: supply a seekable source holding the whole object (a "
                f"file path, bytes or a seekable stream), or a source of the bytes from byte "
                f"{committed} on with source_offset={committed}",
                reason=SOURCE_NOT_SEEKABLE,
                metadata={"committed_size": str(committed)},
            )
        return committed

    def _settle_existing(self, status: UploadStatus | None) -> UploadResult | None:
        """The result, if the upload named by the caller's id has already completed."""
        if status is None or status.state not in _COMPLETED:
            return self._settle(status)
        if status.result is None:
            raise self.error(
                grpc.StatusCode.UNKNOWN,
                f"upload {self.upload_id} is complete but the gateway gave no result",
            )
        expected = None if self.total is None else self.total
        if expected is not None and status.result.size != expected:
            raise self.error(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"upload {self.upload_id} completed with {status.result.size} bytes, "
                f"the source has {expected}",
                reason=SOURCE_MISMATCH,
            )
        return status.result

    async def _stream(self, resume_at: int) -> UploadResult:
        """Stream the upload from ``resume_at``, resuming after retryable failures."""
        while True:
            started_at = resume_at
            try:
                response = await self._attempt(resume_at)
            except RecgwError as err:
                error = err
            else:
                return self._checked(_result(response, self.upload_id))
            self._raise_reader_error()
            if not is_retryable(error):
                raise error
            committed = error.committed_size() if error.reason == "OFFSET_MISMATCH" else None
            if (
                committed is not None
                and committed != started_at
                and self.retained.start <= committed <= self.retained.end
            ):
                # The committed size moved between the status query and the stream (a
                # part in flight landed): the error says where to go on, at once.
                self._observe(committed)
                resume_at = self._resume_point_at(committed)
                continue
            status, last = await self._query_until_answered(error)
            error = last or error
            done = self._settle(status)
            if done is not None:
                return done
            resume_at = self._resume_point(status)
            if self._on_retry is not None:
                self._on_retry(self.streams + 1, error, resume_at)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up when the reader fails (a full spill file must not wait)."""
        sleeper = asyncio.ensure_future(self.policy.sleep(seconds))
        failed = asyncio.ensure_future(self.reader.failed.wait())
        try:
            await asyncio.wait((sleeper, failed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel(sleeper, failed)
        self._raise_reader_error()

    def _raise_reader_error(self) -> None:
        """Raise what ended the reader (the source's error, a full spill file), if anything."""
        error = self.reader.error
        if isinstance(error, RecgwError):
            raise self._own(error)
        if error is not None:
            raise error

    async def _query_until_answered(
        self, error: RecgwError | None
    ) -> tuple[UploadStatus | None, RecgwError | None]:
        """Back off, ask GetUploadStatus; again while that fails retryably, within the tolerance.

        ``error`` is what ended the last stream; None before the first stream (no wait
        then). Returns the status (None: the gateway does not know the upload) and the
        error to report.
        """
        policy = self.policy
        while True:
            if error is not None:
                # The outage starts with the first failure after the committed size last grew
                # (the client learns of growth only when it asks, so a stream that went well
                # until it broke does not count against the tolerance).
                if self._outage_since is None:
                    self._outage_since = policy.clock()
                remaining = policy.outage_tolerance - (policy.clock() - self._outage_since)
                if remaining <= 0:
                    raise self._own(error)
                self._failures += 1
                await self._pause(min(policy.backoff(self._failures), remaining))
            try:
                status = await self._client.get_upload_status(self.upload_id)
            except RecgwError as err:
                if err.code is grpc.StatusCode.NOT_FOUND:
                    return None, error
                if not is_retryable(err):
                    raise self._own(err) from None
                error = self._own(err)
                continue
            if status.state in _RESUMABLE:
                self._observe(status.committed_size)
            return status, error

    def _settle(self, status: UploadStatus | None) -> UploadResult | None:
        """The result of a completed upload; raises for one that ended otherwise."""
        if status is None or status.state in _RESUMABLE:
            return None
        if status.state in _COMPLETED:
            if not self.finish_sent:
                raise self.error(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"upload {self.upload_id} was completed by another stream before this "
                    "client sent all its data",
                    reason=SOURCE_MISMATCH,
                )
            if status.result is None:
                raise self.error(
                    grpc.StatusCode.UNKNOWN,
                    f"upload {self.upload_id} is complete but the gateway gave no result",
                )
            return self._checked(status.result)
        why = status.error_message or "no reason given"
        raise self.error(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"upload {self.upload_id} is {status.state.name.lower()}: {why}; start a new upload",
            reason=UPLOAD_ENDED,
            metadata={"state": status.state.name},
        )

    def _resume_point(self, status: UploadStatus | None) -> int:
        """Where the next stream starts: the committed size, which must still be retained."""
        if status is None:  # the gateway does not know the upload (any more)
            if self.retained.start > 0:
                raise self.error(
                    grpc.StatusCode.NOT_FOUND,
                    f"the gateway no longer knows upload {self.upload_id}, and its first "
                    f"{self.retained.start} bytes are no longer held to send again",
                    reason=RESUME_IMPOSSIBLE,
                )
            self.position = 0
            return 0
        return self._resume_point_at(status.committed_size)

    def _resume_point_at(self, committed: int) -> int:
        retained = self.retained
        if not retained.start <= committed <= retained.end:
            raise self.error(
                grpc.StatusCode.DATA_LOSS,
                f"cannot resume upload {self.upload_id}: the gateway committed {committed} "
                f"bytes, the client holds bytes {retained.start} to {retained.end}",
                reason=RESUME_IMPOSSIBLE,
                metadata={"committed_size": str(committed)},
            )
        # Before the next stream starts, a status query still in flight must not
        # release bytes past the point it resumes from.
        self.position = committed
        retained.release(committed)
        return committed

    def _checked(self, result: UploadResult) -> UploadResult:
        """The result, if it describes the bytes read and hashed."""
        problem = ""
        if self.reader.eof and result.size != self.retained.end:
            problem = f"the gateway stored {result.size} bytes, the client sent {self.retained.end}"
        elif self.checksummer is not None:
            sums = self.checksummer.result()
            got = result.checksums
            if (got.crc32c is not None and got.crc32c != sums.crc32c) or (
                got.sha256 is not None and got.sha256 != sums.sha256
            ):
                problem = "the gateway's checksums differ from those of the bytes sent"
        if problem:
            raise self.error(
                grpc.StatusCode.DATA_LOSS,
                f"upload {self.upload_id}: {problem}",
                reason=SOURCE_MISMATCH,
            )
        return result

    async def _attempt(self, resume_at: int) -> upload_pb2.UploadResponse:
        """One stream from ``resume_at``: the gateway's response, or RecgwError."""
        self.streams += 1
        client = self._client
        call = client._stub.Upload(metadata=client._metadata)
        statuses = _StatusLog(call)
        watch = _UploadIdWatch(call, self.announce)
        writer = _Sender(self, call, resume_at)
        watcher = asyncio.ensure_future(watch.run())
        sender = asyncio.ensure_future(writer.run())
        responder = asyncio.ensure_future(_response(call))
        try:
            # Wait for either: a live source may be idle for long, and a gateway
            # error must not wait for its next chunk.
            await asyncio.wait((sender, responder), return_when=asyncio.FIRST_COMPLETED)
            if sender.done():
                sender.result()  # raises the source's error, if any
            elif writer.finishing:
                # The response can overtake the completion of the last write.
                await asyncio.gather(sender, return_exceptions=True)
            else:
                await _cancel(sender)
            response = await responder
            await watcher
        except BaseException as exc:
            call.cancel()
            await _cancel(sender, responder, watcher)
            if watch.callback_error is not None:
                raise watch.callback_error from None
            if isinstance(exc, grpc.aio.AioRpcError):
                code, details, trailers = statuses.resolve(exc)
                error = RecgwError.from_status(
                    code, details, trailers, upload_id=self.upload_id, secrets=client._secrets
                )
                error.attempts = self.streams
                raise error from None
            raise
        if not writer.finishing:
            raise self.error(
                grpc.StatusCode.UNKNOWN, "the gateway ended the upload before all data was sent"
            )
        return response


class UploadClient:
    """Client of UploadService; one instance may run many uploads at once.

    ``channel_or_target`` is a ``grpc.aio.Channel`` (not closed by this client)
    or an address such as ``"gateway:50051"`` (a channel the client owns), or
    several replicas' IP addresses (a list, or one string separated by
    commas), over which calls are balanced round_robin (so are the addresses a
    DNS name resolves to). For an address, ``tls`` sets the CA file, client
    certificate and key (mTLS) and the TLS server name; ``plaintext=True``
    turns TLS off, which is also the default for loopback addresses
    (127.0.0.0/8, ::1, localhost) only:
    any other address uses TLS with the system's root certificates unless
    told otherwise. ``channel_credentials`` gives full control instead.
    ``token`` is the bearer token of an ``uploader``.
    """

    def __init__(
        self,
        channel_or_target: ChannelOrTarget,
        token: str,
        *,
        tls: TlsConfig | None = None,
        plaintext: bool | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self._metadata = bearer_metadata(token)
        self._secrets = (token.strip(),)
        self._channel, self._owns_channel = open_channel(
            channel_or_target, tls=tls, plaintext=plaintext, credentials=channel_credentials
        )
        self._stub = upload_pb2_grpc.UploadServiceStub(self._channel)
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channel={self._channel!r})"

    async def close(self) -> None:
        """Close the channel if this client opened it."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> UploadClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def upload(
        self,
        source: Source,
        tenant_id: str,
        object_name: str,
        *,
        content_type: str = DEFAULT_CONTENT_TYPE,
        metadata: Mapping[str, str] | None = None,
        expected_size: int | None = None,
        upload_id: str | None = None,
        source_offset: int = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: ProgressCallback | None = None,
        on_committed: CommittedCallback | None = None,
        compute_checksums: bool = True,
        on_upload_id: UploadIdCallback | None = None,
        outage_tolerance: float | None = None,
        retain_limit: int = DEFAULT_RETAIN_LIMIT,
        spill_limit: int = DEFAULT_SPILL_LIMIT,
        spill_dir: str | os.PathLike[str] | None = None,
        on_retry: RetryCallback | None = None,
        retry_policy: RetryPolicy | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
    ) -> UploadResult:
        """Stream ``source`` into the tenant's bucket as ``object_name``.

        ``source`` is a path (its size becomes ``expected_size``), bytes, a
        binary stream such as ``sys.stdin.buffer`` (read in a thread), or an
        (async) iterable of byte chunks such as a live recording. It is read
        once. With ``compute_checksums`` every message carries the CRC32C of
        its data, and the CRC32C and SHA-256 of the whole object go with the
        last message: the gateway verifies them before the object becomes
        visible. Raises RecgwError (code, reason, message, metadata).

        ``upload_id`` defaults to a new uuid4; ``on_upload_id`` is called once,
        when the gateway first confirms it. An ``upload_id`` the caller passes
        may name an existing upload (say, of a process that died): the client
        asks GetUploadStatus first; a COMPLETE upload returns its result, an
        open one continues from its committed size. That needs a seekable
        source holding the whole object (a path, bytes, a seekable stream),
        or a source holding the bytes from ``source_offset`` on (then no
        whole-object checksums are sent: the client cannot compute them).
        Otherwise it fails with FAILED_PRECONDITION (SOURCE_NOT_SEEKABLE).

        Failures: what is retried follows testdata/retry_table.json (see
        ``recgw_client.retry``). The upload then resumes on a new stream from
        the gateway's committed size after a backoff, calling
        ``on_retry(attempt, error, committed_size)`` first. It gives up
        ``outage_tolerance`` seconds (default 300; it overrides the one of
        ``retry_policy``) after the committed size last grew.

        Memory and disk: the bytes after the committed size are kept to be
        sent again. A seekable source waits while ``retain_limit`` bytes are
        retained, polling GetUploadStatus (50 ms, doubling to 1 s) until parts
        are committed (if the gateway holds every byte sent and commits none
        for 10 s, it must be waiting for a larger part: the limit doubles). A
        live source is never made to wait: beyond ``retain_limit`` bytes in
        memory, up to ``spill_limit`` bytes go to a private temporary file
        under ``spill_dir`` (default: the system's temporary directory;
        created 0600 in a 0700 directory and unlinked at once, so it is gone
        whatever ends the process). When both are full the upload fails with
        RESOURCE_EXHAUSTED (RETAIN_LIMIT_EXCEEDED): no byte is dropped
        silently. ``spill_limit=0`` makes a live source wait like a file. Once
        half of ``retain_limit`` is sent but not known committed, the client
        asks GetUploadStatus in the background and drops what is committed.

        ``progress(sent, total)`` follows the bytes sent, ``on_committed(size)``
        the gateway's committed size. A source silent for ``heartbeat_interval``
        seconds makes the stream send an empty message, so that the gateway
        never mistakes a live but quiet writer for a dead one.
        """
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE} bytes")
        if expected_size is not None and expected_size < 0:
            raise ValueError("expected_size must not be negative")
        if retain_limit < chunk_size:
            raise ValueError("retain_limit must be at least chunk_size")
        if spill_limit < 0:
            raise ValueError("spill_limit must not be negative")
        if source_offset < 0:
            raise ValueError("source_offset must not be negative")
        if source_offset and upload_id is None:
            raise ValueError("source_offset needs the upload_id of the upload to continue")
        if not heartbeat_interval > 0:
            raise ValueError("heartbeat_interval must be positive")
        if spill_dir is not None:
            check_spill_dir(spill_dir)
        policy = retry_policy or RetryPolicy()
        if outage_tolerance is not None:
            policy = dataclasses.replace(policy, outage_tolerance=outage_tolerance)
        opened = OpenedSource(source, chunk_size)
        run: _UploadRun | None = None
        try:
            await opened.check()
            total = expected_size
            if total is None and opened.size is not None:
                total = source_offset + opened.size
            start = upload_pb2.UploadStart(
                tenant_id=tenant_id,
                object_name=object_name,
                content_type=content_type,
                metadata=dict(metadata or {}),
                expected_size=total,
                upload_id=upload_id or str(uuid.uuid4()),
                # The gateway computes SHA-256 only when asked; the client verifies it.
                compute_sha256=compute_checksums,
            )
            run = _UploadRun(
                self,
                start,
                opened,
                total=total,
                chunk_size=chunk_size,
                retain_limit=retain_limit,
                spill_limit=spill_limit,
                spill_dir=spill_dir,
                policy=policy,
                progress=progress,
                on_committed=on_committed,
                checksums=compute_checksums,
                source_offset=source_offset,
                caller_chose_id=upload_id is not None,
                on_upload_id=on_upload_id,
                on_retry=on_retry,
                heartbeat_interval=heartbeat_interval,
            )
            return await run.run()
        finally:
            if run is not None:
                await run.close()
            else:
                await opened.aclose()

    async def _unary(self, method: Any, request: Any, upload_id: str) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            raise RecgwError.from_rpc_error(
                err, upload_id=upload_id, secrets=self._secrets
            ) from None

    async def get_upload_status(self, upload_id: str) -> UploadStatus:
        """The state and committed size of an upload."""
        response = await self._unary(
            self._stub.GetUploadStatus,
            upload_pb2.GetUploadStatusRequest(upload_id=upload_id),
            upload_id,
        )
        return _status(response)

    async def abort_upload(self, upload_id: str) -> AbortResult:
        """Cancel an upload; nothing of it becomes visible."""
        response = await self._unary(
            self._stub.AbortUpload, upload_pb2.AbortUploadRequest(upload_id=upload_id), upload_id
        )
        return AbortResult(
            state=UploadState._from_proto(response.state),
            storage_aborted=response.storage_aborted,
            detail=response.detail,
        )

    async def salvage_upload(self, upload_id: str) -> SalvageResult:
        """Keep what an open upload has committed as an object; the upload ends SALVAGED."""
        response = await self._unary(
            self._stub.SalvageUpload,
            upload_pb2.SalvageUploadRequest(upload_id=upload_id),
            upload_id,
        )
        return SalvageResult(
            state=UploadState._from_proto(response.state),
            result=_result(response.result, upload_id) if response.HasField("result") else None,
        )


async def upload(
    channel_or_target: ChannelOrTarget,
    token: str,
    source: Source,
    tenant_id: str,
    object_name: str,
    *,
    content_type: str = DEFAULT_CONTENT_TYPE,
    metadata: Mapping[str, str] | None = None,
    expected_size: int | None = None,
    upload_id: str | None = None,
    source_offset: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: ProgressCallback | None = None,
    on_committed: CommittedCallback | None = None,
    compute_checksums: bool = True,
    on_upload_id: UploadIdCallback | None = None,
    outage_tolerance: float | None = None,
    retain_limit: int = DEFAULT_RETAIN_LIMIT,
    spill_limit: int = DEFAULT_SPILL_LIMIT,
    spill_dir: str | os.PathLike[str] | None = None,
    on_retry: RetryCallback | None = None,
    retry_policy: RetryPolicy | None = None,
    heartbeat_interval: float = HEARTBEAT_INTERVAL,
    tls: TlsConfig | None = None,
    plaintext: bool | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
) -> UploadResult:
    """Stream one object, riding out outages; see ``UploadClient.upload``."""
    async with UploadClient(
        channel_or_target,
        token,
        tls=tls,
        plaintext=plaintext,
        channel_credentials=channel_credentials,
    ) as client:
        return await client.upload(
            source,
            tenant_id,
            object_name,
            content_type=content_type,
            metadata=metadata,
            expected_size=expected_size,
            upload_id=upload_id,
            source_offset=source_offset,
            chunk_size=chunk_size,
            progress=progress,
            on_committed=on_committed,
            compute_checksums=compute_checksums,
            on_upload_id=on_upload_id,
            outage_tolerance=outage_tolerance,
            retain_limit=retain_limit,
            spill_limit=spill_limit,
            spill_dir=spill_dir,
            on_retry=on_retry,
            retry_policy=retry_policy,
            heartbeat_interval=heartbeat_interval,
        )


async def get_upload_status(
    channel_or_target: ChannelOrTarget,
    token: str,
    upload_id: str,
    *,
    tls: TlsConfig | None = None,
    plaintext: bool | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - a gRPC deadline the gateway sees
) -> UploadStatus:
    """The state and committed size of an upload."""
    async with UploadClient(
        channel_or_target,
        token,
        tls=tls,
        plaintext=plaintext,
        channel_credentials=channel_credentials,
        timeout=timeout,
    ) as client:
        return await client.get_upload_status(upload_id)


async def abort_upload(
    channel_or_target: ChannelOrTarget,
    token: str,
    upload_id: str,
    *,
    tls: TlsConfig | None = None,
    plaintext: bool | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - a gRPC deadline the gateway sees
) -> AbortResult:
    """Cancel an upload; nothing of it becomes visible."""
    async with UploadClient(
        channel_or_target,
        token,
        tls=tls,
        plaintext=plaintext,
        channel_credentials=channel_credentials,
        timeout=timeout,
    ) as client:
        return await client.abort_upload(upload_id)


async def salvage_upload(
    channel_or_target: ChannelOrTarget,
    token: str,
    upload_id: str,
    *,
    tls: TlsConfig | None = None,
    plaintext: bool | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - a gRPC deadline the gateway sees
) -> SalvageResult:
    """Keep what an open upload has committed as an object."""
    async with UploadClient(
        channel_or_target,
        token,
        tls=tls,
        plaintext=plaintext,
        channel_credentials=channel_credentials,
        timeout=timeout,
    ) as client:
        return await client.salvage_upload(upload_id)
