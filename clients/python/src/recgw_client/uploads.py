"""Streaming uploads that resume after connection losses, upload status and abort.

asyncio, grpc.aio. How an upload resumes:

* The client chooses the upload id (a uuid4 unless the caller passes one), so
  it can ask about the upload even if the stream died before the gateway's
  ``x-recgw-upload-id`` header arrived.
* The gateway makes bytes durable a whole S3 part at a time; GetUploadStatus
  reports that ``committed_size``. Bytes it received beyond it are lost when a
  stream breaks, so the client keeps every byte from the committed size on (the
  retained buffer) and re-sends them on a new stream whose first message
  repeats ``start`` with ``write_offset`` = the committed size.
* The source is read once; re-sent bytes come from the retained buffer, and
  each byte is folded into the CRC32C and SHA-256 once, when it is read.
* Finishing is idempotent: if the stream breaks after ``finish_write``, the
  status shows COMPLETE and its result is returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from recgw.v1 import upload_pb2, upload_pb2_grpc

from recgw_client._channel import DEFAULT_TIMEOUT, ChannelOrTarget, bearer_metadata, open_channel
from recgw_client._retained import RetainedBuffer
from recgw_client._sources import Source, open_source
from recgw_client.checksums import Checksummer, ObjectChecksums
from recgw_client.errors import RecgwError
from recgw_client.retry import RetryCallback, RetryPolicy, is_retryable

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_RETAIN_LIMIT",
    "MAX_CHUNK_SIZE",
    "UPLOAD_ID_HEADER",
    "AbortResult",
    "ProgressCallback",
    "UploadClient",
    "UploadIdCallback",
    "UploadResult",
    "UploadState",
    "UploadStatus",
    "abort_upload",
    "get_upload_status",
    "upload",
]

MiB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 1 * MiB
MAX_CHUNK_SIZE = 4 * MiB
DEFAULT_CONTENT_TYPE = "application/octet-stream"
UPLOAD_ID_HEADER = "x-recgw-upload-id"
DEFAULT_RETAIN_LIMIT = 64 * MiB
"""Default bound on the bytes an upload keeps for re-sending.

The gateway writes 8 MiB parts with up to 4 in flight, so its committed size
lags the bytes sent by up to about 40 MiB.
"""

# Polling GetUploadStatus while reading is paused for memory.
_POLL_INITIAL = 0.05
_POLL_MAX = 1.0
# Seconds of polling after which a gateway that holds every byte sent and
# commits none is taken to wait for a part larger than the retain limit.
_STALL_TIMEOUT = 10.0

ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes sent so far, total size or None) after each chunk."""
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

    @classmethod
    def _from_proto(cls, value: int) -> UploadState:
        try:
            return cls(value)
        except ValueError:
            return cls.UNSPECIFIED


@dataclass(frozen=True)
class UploadResult:
    """The finished object; ``checksums`` are those the gateway computed and verified."""

    upload_id: str
    bucket: str
    key: str
    size: int
    etag: str
    version_id: str
    part_count: int
    checksums: ObjectChecksums


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
    )


def _time(stamp: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    return stamp.ToDatetime(tzinfo=UTC) if present else None


_CORE_INTERNAL_DETAILS = "Internal error from Core"
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}

_UploadCall = grpc.aio.StreamUnaryCall[upload_pb2.UploadRequest, upload_pb2.UploadResponse]


class _StatusLog:
    """Every status the call was given, in order: works around grpc/grpc#36066.

    When a write fails because the gateway is ending the RPC (an abort while
    data is still flowing), grpc.aio replaces the gateway's status with
    INTERNAL "Internal error from Core". The gateway's own status is also set
    on the call, before or after that, and is kept here. grpc has no public
    way to read it from a done callback, hence the private attribute; without
    it the INTERNAL error is reported unchanged.
    """

    def __init__(self, call: _UploadCall) -> None:
        self._statuses: list[tuple[grpc.StatusCode, str]] = []
        call.add_done_callback(self._record)

    def _record(self, call: object) -> None:
        status = getattr(getattr(call, "_cython_call", None), "_status", None)
        if status is None:
            return
        code = _STATUS_CODES.get(status.code())
        if code is not None:
            self._statuses.append((code, status.details() or ""))

    def resolve(self, error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
        """The gateway's status behind ``error``."""
        code, details = error.code(), error.details() or ""
        if code is grpc.StatusCode.INTERNAL and details == _CORE_INTERNAL_DETAILS:
            for logged in self._statuses:
                if logged != (grpc.StatusCode.INTERNAL, _CORE_INTERNAL_DETAILS):
                    return logged
        return code, details


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


class _Feed:
    """Reads the source once, one chunk ahead of the sender.

    Each chunk is hashed as it is read, so every byte enters the checksums
    exactly once, however often it is sent. A read in progress survives the
    stream that asked for it (cancelling it could end the source): the next
    stream picks it up.
    """

    def __init__(self, chunks: AsyncIterator[bytes], checksummer: Checksummer | None) -> None:
        self._chunks = chunks
        self._checksummer = checksummer
        self._pending: asyncio.Future[bytes] | None = None
        self.eof = False

    async def _read(self) -> bytes:
        data = await anext(self._chunks, b"")
        if data and self._checksummer is not None:
            # In a thread, while gRPC sends the previous chunk: the pure-Python CRC32C is slow.
            await asyncio.to_thread(self._checksummer.update, data)
        return data

    def prefetch(self) -> None:
        """Start reading the next chunk."""
        if self._pending is None and not self.eof:
            self._pending = asyncio.ensure_future(self._read())

    async def next(self) -> bytes | None:
        """The next chunk, or None at the end of the source."""
        if self.eof:
            return None
        self.prefetch()
        pending = self._pending
        assert pending is not None
        await asyncio.wait((pending,))  # unlike awaiting it, cancellation leaves the read running
        self._pending = None
        data = pending.result()
        if not data:
            self.eof = True
            return None
        return data

    async def close(self) -> None:
        if self._pending is not None:
            await _cancel(self._pending)
            self._pending = None


def _status(response: upload_pb2.GetUploadStatusResponse) -> UploadStatus:
    return UploadStatus(
        upload_id=response.upload_id,
        state=UploadState._from_proto(response.state),
        committed_size=response.committed_size,
        received_size=response.received_size,
        tenant_id=response.tenant_id,
        key=response.key,
        result=_result(response.result) if response.HasField("result") else None,
        error_message=response.error_message,
        create_time=_time(response.create_time, response.HasField("create_time")),
        update_time=_time(response.update_time, response.HasField("update_time")),
    )


_RESUMABLE = (UploadState.OPEN, UploadState.FINISHING)


class _Sender:
    """Writes one stream: start at the resume offset, the retained bytes, new data, finish_write."""

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
        retained, feed = run.retained, run.feed
        offset = self._resume_at
        run.position = offset
        first = upload_pb2.UploadRequest(start=run.start, write_offset=offset)
        if feed.eof and offset == retained.end:
            # All data is committed: finish at once. If the gateway completed the
            # upload meanwhile, this returns its result.
            await self._finish(first)
            return
        run.report_progress(offset)
        await call.write(first)
        while offset < retained.end:  # what the gateway received but did not commit
            held = retained.read(offset, run.chunk_size)
            await call.write(upload_pb2.UploadRequest(write_offset=offset, data=held))
            offset += len(held)
            run.position = offset
            run.report_progress(offset)
        while True:
            await run.make_room()
            data = await feed.next()
            if data is None:
                break
            retained.append(data)
            run.prefetch()
            await call.write(upload_pb2.UploadRequest(write_offset=offset, data=data))
            offset += len(data)
            run.position = offset
            run.report_progress(offset)
            run.maybe_trim()
        await self._finish(upload_pb2.UploadRequest(write_offset=offset))

    async def _finish(self, final: upload_pb2.UploadRequest) -> None:
        final.finish_write = True
        checksummer = self._run.checksummer
        if checksummer is not None:
            sums = checksummer.result()
            final.object_checksums.crc32c = sums.crc32c or 0
            final.object_checksums.sha256 = sums.sha256 or b""
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


class _UploadRun:
    """One upload: its streams, the retained bytes, and the status queries that trim them."""

    def __init__(
        self,
        client: UploadClient,
        start: upload_pb2.UploadStart,
        chunks: AsyncIterator[bytes],
        *,
        total: int | None,
        chunk_size: int,
        retain_limit: int,
        policy: RetryPolicy,
        progress: ProgressCallback | None,
        checksummer: Checksummer | None,
        on_upload_id: UploadIdCallback | None,
        on_retry: RetryCallback | None,
    ) -> None:
        self._client = client
        self.start = start
        self.upload_id = start.upload_id
        self.total = total
        self.chunk_size = chunk_size
        self.policy = policy
        self.checksummer = checksummer
        self.retained = RetainedBuffer()
        self.feed = _Feed(chunks, checksummer)
        # The retained bytes never exceed the cap: reading waits for room.
        self.cap = retain_limit
        self._progress = progress
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

    # --- progress and the upload id -----------------------------------------------------

    def report_progress(self, offset: int) -> None:
        if self._progress is not None and offset > self._reported:
            self._reported = offset
            self._progress(offset, self.total)

    def announce(self, upload_id: str) -> None:
        if self._announced:
            return
        self._announced = True
        if upload_id != self.upload_id:  # the gateway's word decides which upload to resume
            self.upload_id = upload_id
            self.start.upload_id = upload_id
        if self._on_upload_id is not None:
            self._on_upload_id(upload_id)

    def error(self, code: grpc.StatusCode, message: str) -> RecgwError:
        return RecgwError(code, message, upload_id=self.upload_id, attempts=self.streams)

    # --- memory ---------------------------------------------------------------------------

    def _room(self) -> bool:
        return self.retained.size + self.chunk_size <= self.cap

    def prefetch(self) -> None:
        """Read ahead while a chunk is sent, if the cap leaves room for one more chunk."""
        if self._room():
            self.feed.prefetch()

    def maybe_trim(self) -> None:
        """Ask for the committed size in the background once half the cap is retained."""
        retained = self.retained
        step = max(self.chunk_size, self.cap // 8)
        if (
            self._refreshing is None
            and retained.size > self.cap // 2
            and retained.end - self._queried_at >= step
        ):
            self._start_refresh()

    def _start_refresh(self) -> asyncio.Future[UploadStatus | None]:
        if self._refreshing is None:
            self._queried_at = self.retained.end
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
            self.retained.release(min(status.committed_size, self.position))
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
        await self.feed.close()

    async def run(self) -> UploadResult:
        """Stream the upload, resuming after retryable failures."""
        policy = self.policy
        failed = 0  # consecutive failed streams without progress
        resume_at = 0
        resuming = False
        handshake_checked = False
        while True:
            started_at = resume_at
            try:
                response = await self._attempt(resume_at)
            except RecgwError as err:
                error = err
            else:
                return self._checked(_result(response, self.upload_id))
            if error.code is grpc.StatusCode.OUT_OF_RANGE and resuming and not handshake_checked:
                # The committed size moved between the status query and the new stream
                # (a part in flight landed): ask once more.
                handshake_checked = True
                status = await self._status_or(error)
                done = self._settle(status)
                if done is not None:
                    return done
                if status is not None and status.committed_size != started_at:
                    resume_at = self._resume_point(status)
                    continue
                raise error
            handshake_checked = False
            if not is_retryable(error):
                raise error
            # Where did the stream get? A completed upload ends here. If the stream got
            # more bytes committed, the count starts again with its failure (learnt from
            # the first status query that succeeds; failed queries count as attempts).
            earlier = failed
            failed += 1
            status = await self._status_or(None)
            done = self._settle(status)
            if done is not None:
                return done
            progress_known = status is not None
            if status is not None and status.committed_size > started_at:
                failed -= earlier
            while True:
                if failed >= policy.max_attempts:
                    raise error
                await policy.sleep(policy.backoff(failed))
                try:
                    status = await self._client.get_upload_status(self.upload_id)
                except RecgwError as err:
                    if err.code is grpc.StatusCode.NOT_FOUND:
                        status = None
                        break
                    if not is_retryable(err):
                        raise
                    err.attempts = self.streams
                    error = err
                    failed += 1
                    continue
                break
            done = self._settle(status)
            if done is not None:
                return done
            if not progress_known and status is not None and status.committed_size > started_at:
                failed -= earlier
            resume_at = self._resume_point(status)
            resuming = True
            if self._on_retry is not None:
                self._on_retry(failed + 1, error, resume_at)

    async def _status_or(self, error: RecgwError | None) -> UploadStatus | None:
        """The status, None if the gateway cannot say; on other failures ``error`` or theirs."""
        try:
            return await self._client.get_upload_status(self.upload_id)
        except RecgwError as err:
            if err.code is grpc.StatusCode.NOT_FOUND or is_retryable(err):
                if error is not None:
                    raise error from None
                return None
            raise self.error(err.code, err.message) from None

    def _settle(self, status: UploadStatus | None) -> UploadResult | None:
        """The result of a completed upload; raises for one that ended otherwise."""
        if status is None or status.state in _RESUMABLE:
            return None
        if status.state is UploadState.COMPLETE:
            if not self.finish_sent:
                raise self.error(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"upload {self.upload_id} was completed by another stream before this "
                    "client sent all its data",
                )
            if status.result is None:
                raise self.error(
                    grpc.StatusCode.UNKNOWN,
                    f"upload {self.upload_id} is complete but the gateway gave no result",
                )
            return self._checked(status.result)
        reason = status.error_message or "no reason given"
        raise self.error(
            grpc.StatusCode.ABORTED,
            f"upload {self.upload_id} is {status.state.name.lower()}: {reason}",
        )

    def _resume_point(self, status: UploadStatus | None) -> int:
        """Where the next stream starts: the committed size, which must still be retained."""
        retained = self.retained
        if status is None:  # the gateway does not know the upload (any more)
            if retained.start > 0:
                raise self.error(
                    grpc.StatusCode.NOT_FOUND,
                    f"the gateway no longer knows upload {self.upload_id}, and its first "
                    f"{retained.start} bytes are no longer held to send again",
                )
            self.position = 0
            return 0
        committed = status.committed_size
        if not retained.start <= committed <= retained.end:
            raise self.error(
                grpc.StatusCode.DATA_LOSS,
                f"cannot resume upload {self.upload_id}: the gateway committed {committed} "
                f"bytes, the client holds bytes {retained.start} to {retained.end}",
            )
        # Before the next stream starts, a status query still in flight must not
        # release bytes past the point it resumes from.
        self.position = committed
        retained.release(committed)
        return committed

    def _checked(self, result: UploadResult) -> UploadResult:
        """The result, if it describes the bytes read and hashed."""
        problem = ""
        if self.feed.eof and result.size != self.retained.end:
            problem = f"the gateway stored {result.size} bytes, the client sent {self.retained.end}"
        elif self.checksummer is not None:
            sums = self.checksummer.result()
            got = result.checksums
            if (got.crc32c is not None and got.crc32c != sums.crc32c) or (
                got.sha256 is not None and got.sha256 != sums.sha256
            ):
                problem = "the gateway's checksums differ from those of the bytes sent"
        if problem:
            raise self.error(grpc.StatusCode.DATA_LOSS, f"upload {self.upload_id}: {problem}")
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
                code, details = statuses.resolve(exc)
                error = RecgwError.from_status(
                    code, details, upload_id=self.upload_id, secrets=client._secrets
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
    or an address such as ``"gateway:50051"`` (a channel the client owns;
    plaintext unless ``channel_credentials`` are given). ``token`` is the
    bearer token of an ``uploader``.
    """

    def __init__(
        self,
        channel_or_target: ChannelOrTarget,
        token: str,
        *,
        channel_credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self._metadata = bearer_metadata(token)
        self._secrets = (token.strip(),)
        self._channel, self._owns_channel = open_channel(channel_or_target, channel_credentials)
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
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: ProgressCallback | None = None,
        compute_checksums: bool = True,
        on_upload_id: UploadIdCallback | None = None,
        max_attempts: int | None = None,
        retain_limit: int = DEFAULT_RETAIN_LIMIT,
        on_retry: RetryCallback | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> UploadResult:
        """Stream ``source`` into the tenant's bucket as ``object_name``.

        ``source`` is a path (its size becomes ``expected_size``), bytes, a
        binary stream such as ``sys.stdin.buffer`` (read in a thread), or an
        (async) iterable of byte chunks such as a live recording. It is read
        once. With ``compute_checksums`` the CRC32C and SHA-256 of the whole
        object go with the last message and the gateway verifies them before
        the object becomes visible. Raises RecgwError with the gateway's status
        code.

        ``upload_id`` defaults to a new uuid4. ``on_upload_id`` is called once,
        when the gateway first confirms it.

        When the stream fails with a retryable status (see
        ``recgw_client.retry``) the upload resumes on a new stream from the
        gateway's committed size, after a backoff, calling ``on_retry(attempt,
        error, committed_size)`` first. ``retry_policy`` sets the backoff and
        ``max_attempts`` (overridden by ``max_attempts`` if given; default 8,
        1 disables resuming).

        Memory: the bytes after the gateway's committed size are kept to be
        sent again, at most ``retain_limit`` bytes. Once half of it is
        retained the client asks GetUploadStatus for the committed size (at
        most once per eighth of the limit sent) and drops what is committed;
        when one more chunk would exceed the limit it stops reading the source
        and polls the status (50 ms, doubling to 1 s) until parts are
        committed. The limit should exceed the gateway's part size plus the
        parts it writes at once (8 MiB parts, 4 at once: about 40 MiB). If the
        gateway has received every byte sent and commits none for 10 s of
        polling, it must be waiting to fill a larger part: the limit then
        doubles rather than letting the upload hang.
        """
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE} bytes")
        if expected_size is not None and expected_size < 0:
            raise ValueError("expected_size must not be negative")
        if retain_limit < chunk_size:
            raise ValueError("retain_limit must be at least chunk_size")
        policy = retry_policy or RetryPolicy()
        if max_attempts is not None:
            policy = dataclasses.replace(policy, max_attempts=max_attempts)
        async with open_source(source, chunk_size) as (chunks, known_size):
            total = known_size if expected_size is None else expected_size
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
                chunks,
                total=total,
                chunk_size=chunk_size,
                retain_limit=retain_limit,
                policy=policy,
                progress=progress,
                checksummer=Checksummer() if compute_checksums else None,
                on_upload_id=on_upload_id,
                on_retry=on_retry,
            )
            try:
                return await run.run()
            finally:
                await run.close()

    async def get_upload_status(self, upload_id: str) -> UploadStatus:
        """The state and committed size of an upload."""
        try:
            response = await self._stub.GetUploadStatus(
                upload_pb2.GetUploadStatusRequest(upload_id=upload_id),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise RecgwError.from_rpc_error(
                err, upload_id=upload_id, secrets=self._secrets
            ) from None
        return _status(response)

    async def abort_upload(self, upload_id: str) -> AbortResult:
        """Cancel an upload; nothing of it becomes visible."""
        try:
            response = await self._stub.AbortUpload(
                upload_pb2.AbortUploadRequest(upload_id=upload_id),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise RecgwError.from_rpc_error(
                err, upload_id=upload_id, secrets=self._secrets
            ) from None
        return AbortResult(
            state=UploadState._from_proto(response.state),
            storage_aborted=response.storage_aborted,
            detail=response.detail,
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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: ProgressCallback | None = None,
    compute_checksums: bool = True,
    on_upload_id: UploadIdCallback | None = None,
    max_attempts: int | None = None,
    retain_limit: int = DEFAULT_RETAIN_LIMIT,
    on_retry: RetryCallback | None = None,
    retry_policy: RetryPolicy | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
) -> UploadResult:
    """Stream one object, resuming after connection losses; see ``UploadClient.upload``."""
    async with UploadClient(
        channel_or_target, token, channel_credentials=channel_credentials
    ) as client:
        return await client.upload(
            source,
            tenant_id,
            object_name,
            content_type=content_type,
            metadata=metadata,
            expected_size=expected_size,
            upload_id=upload_id,
            chunk_size=chunk_size,
            progress=progress,
            compute_checksums=compute_checksums,
            on_upload_id=on_upload_id,
            max_attempts=max_attempts,
            retain_limit=retain_limit,
            on_retry=on_retry,
            retry_policy=retry_policy,
        )


async def get_upload_status(
    channel_or_target: ChannelOrTarget,
    token: str,
    upload_id: str,
    *,
    channel_credentials: grpc.ChannelCredentials | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - a gRPC deadline the gateway sees
) -> UploadStatus:
    """The state and committed size of an upload."""
    async with UploadClient(
        channel_or_target, token, channel_credentials=channel_credentials, timeout=timeout
    ) as client:
        return await client.get_upload_status(upload_id)


async def abort_upload(
    channel_or_target: ChannelOrTarget,
    token: str,
    upload_id: str,
    *,
    channel_credentials: grpc.ChannelCredentials | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - a gRPC deadline the gateway sees
) -> AbortResult:
    """Cancel an upload; nothing of it becomes visible."""
    async with UploadClient(
        channel_or_target, token, channel_credentials=channel_credentials, timeout=timeout
    ) as client:
        return await client.abort_upload(upload_id)
