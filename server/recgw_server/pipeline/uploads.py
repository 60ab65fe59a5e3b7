"""One upload: from a stream of chunks to one object in the tenant's bucket.

It knows nothing of gRPC. A transport gets an `Upload` from `UploadManager.start` (which opens a
new upload or attaches to an existing one to resume it), then calls `Upload.write` for each chunk
and `Upload.finish` at the end, or `Upload.stream_failed` when its stream breaks.

Receiving never waits for hashing or sending: a full part is handed to a task that sends it
(and, if the upload computes SHA-256, to a hasher that runs in a worker thread, in part order),
while the stream goes on filling the next part; at most `max_inflight_parts` are in flight.
Each message's CRC32C is computed once; part and object CRC32Cs are combined from those.

Every upload is a durable session (see sessions/). Bytes count as committed only once the part
that holds them is in S3 and recorded; a broken stream loses only uncommitted bytes, and a new
stream resumes at the committed size, also after a gateway restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from recgw_server.domain import (
    ErrorKind,
    ObjectChecksums,
    Reason,
    RecgwError,
    UploadResult,
)
from recgw_server.events import model as events
from recgw_server.events.model import Event
from recgw_server.pipeline.budget import Reservation
from recgw_server.pipeline.buffers import PartBody, PartBuffer
from recgw_server.pipeline.digest import (
    ResumableSha256,
    combine_crc32c,
    crc32c,
    expected_multipart_etag,
)
from recgw_server.pipeline.model import (
    DONE_STATES,
    ENDED_STATES,
    UploadState,
    UploadStatus,
    is_terminal,
    result_from_record,
    result_to_record,
)
from recgw_server.pipeline.parts import PartPlan
from recgw_server.sessions.base import Fenced, Lease, PartRecord, SessionRecord
from recgw_server.storage.base import (
    AbortOutcome,
    BytesBody,
    ObjectSpec,
    ObjectWriter,
    WrittenObject,
    WrittenPart,
)

if TYPE_CHECKING:
    from recgw_server.pipeline.manager import UploadManager

log = logging.getLogger(__name__)

_UNCONFIRMED_CODES = {"NoSuchUpload", "PreconditionFailed", "412"}


class Upload:
    """One upload session. At most one stream writes to it at a time."""

    def __init__(
        self,
        manager: UploadManager,
        record: SessionRecord,
        writer: ObjectWriter | None,
    ) -> None:
        self._manager = manager
        self.record = record
        self.upload_id = record.upload_id
        self.tenant_id = record.tenant_id
        self.spec = ObjectSpec(
            key=record.key,
            content_type=record.content_type,
            metadata=dict(record.metadata),
            if_none_match=record.if_none_match,
        )
        self._writer = writer
        self._plan = PartPlan(
            record.part_base_size,
            record.part_growing,
            record.expected_size,
            record.growth_interval,
        )
        self.state = UploadState(record.state)
        # FINISHING in the record means a completion request may have reached S3 before the
        # gateway stopped: finishing again is allowed, and its answer is read with that in mind.
        self._completion_sent = self.state is UploadState.FINISHING
        if self.state is UploadState.FINISHING:
            self.state = UploadState.OPEN
        self.compute_sha256 = record.compute_sha256
        self.created_at = record.created_at
        self.updated_at = record.updated_at
        self.error_message = record.error_message
        self.abort_outcome = AbortOutcome(record.abort_outcome) if record.abort_outcome else None
        self.result = (
            result_from_record(self.upload_id, record.result) if record.result is not None else None
        )
        self._store_upload_id = record.store_upload_id
        self._parts: dict[int, PartRecord] = {p.number: p for p in record.parts}
        self._prefix = 0  # parts 1.._prefix are all durably written: the committed prefix
        self.committed = 0
        self._advance_prefix()
        if self.result is not None:  # a finished upload (a single PutObject has no parts)
            self.committed = self.result.size
        self.received = self.committed
        self._reset_to_prefix()
        self.tail = record.tail
        self._salvage_tail = False  # keep the buffered bytes when the stream ends
        self._part: PartBuffer | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(manager.settings.max_inflight_parts)
        self._background_error: RecgwError | None = None
        self._fail_task: asyncio.Task[None] | None = None
        self._finish_task: asyncio.Task[UploadResult] | None = None
        self._detach_task: asyncio.Task[None] | None = None
        self._stream: asyncio.Task[object] | None = None
        self._interruption: RecgwError | None = None
        self._ending = False
        self.last_activity = time.monotonic()
        self.attached = False
        self.abort_requested = asyncio.Event()
        self.terminal = asyncio.Event()
        if self.state not in (UploadState.OPEN, UploadState.FINISHING):
            self.terminal.set()
        self.lease: Lease | None = None  # the writer lease every session store write names
        self._fenced = False  # another replica took the lease over
        self._released: Lease | None = None  # the lease this copy gave up itself, if any

    # -- attaching streams -------------------------------------------------------------------

    async def attach(self, stream: asyncio.Task[object] | None = None) -> None:
        """Let one stream write. A second one is refused, unless the first has been silent for
        longer than the takeover time: then the new stream takes over at once."""
        if self.state in DONE_STATES:
            return  # only an idempotent finish can follow; the transport checks it
        if self.state in ENDED_STATES:
            raise RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"upload {self.upload_id} is {self.state.value} ({self.error_message}); start a "
                "new upload with a new upload id",
                reason=Reason.UPLOAD_ENDED,
            )
        if self._fail_task is not None or (
            self._finish_task is not None and not self._finish_task.done()
        ):
            raise self._another_writer()
        if self.attached or self._detach_task is not None:
            silent = time.monotonic() - self.last_activity
            if self._detach_task is None and silent <= self._manager.settings.takeover_after:
                raise self._another_writer()
            if self._detach_task is None:
                log.info(
                    "upload %s taken over: its stream was silent for %.1f s",
                    self.upload_id,
                    silent,
                )
                self._manager.metrics.takeovers.inc()
                self.interrupt(
                    RecgwError(
                        ErrorKind.ABORTED,
                        f"a newer stream took over upload {self.upload_id} after this one was "
                        f"silent for {silent:.1f} s; its uncommitted bytes were dropped",
                        reason=Reason.STREAM_TAKEN_OVER,
                        details={"upload_id": self.upload_id},
                    )
                )
            await self._wait_detached()
            if self.attached or self.state is not UploadState.OPEN:
                raise self._another_writer()
        self.attached = True
        self._stream = stream
        self._interruption = None
        self._ending = False
        self._background_error = None
        self.last_activity = time.monotonic()

    def _another_writer(self) -> RecgwError:
        return RecgwError(
            ErrorKind.ABORTED,
            f"another stream is writing upload {self.upload_id}; retry after it has ended "
            f"(a silent stream is taken over after {self._manager.settings.takeover_after:g} s)",
            reason=Reason.ANOTHER_WRITER,
            details={"upload_id": self.upload_id, "committed_size": str(self.committed)},
        )

    async def _wait_detached(self) -> None:
        deadline = time.monotonic() + 30
        while (self.attached or self._detach_task is not None) and time.monotonic() < deadline:
            if self._detach_task is not None:
                await asyncio.shield(self._detach_task)
            else:
                await asyncio.sleep(0.01)  # the interrupted handler is unwinding

    def adopt_sha256(self, compute: bool) -> None:
        """Before any byte is committed, a resuming stream may switch SHA-256 on or off."""
        assert self.committed == 0
        self.compute_sha256 = compute
        self._reset_to_prefix()

    def release_stream(self) -> None:
        """The stream that attached is not going to write after all."""
        self._stream = None

    def take_over_if_silent(self) -> None:
        """Another replica wants this upload: end the local stream if it has gone silent."""
        silent = time.monotonic() - self.last_activity
        if silent > self._manager.settings.takeover_after:
            self._manager.metrics.takeovers.inc()
            self.interrupt(
                RecgwError(
                    ErrorKind.ABORTED,
                    f"a newer stream on another gateway replica took over upload "
                    f"{self.upload_id} after this one was silent for {silent:.1f} s",
                    reason=Reason.STREAM_TAKEN_OVER,
                    details={"upload_id": self.upload_id},
                )
            )

    def interrupt(self, error: RecgwError, unless_active: float | None = None) -> None:
        """End the attached stream's handler at once with `error` (takeover, AbortUpload).

        With `unless_active`, a stream that delivered a message within that many seconds is not
        cancelled: it meets the error at its next message (a cancelled handler whose client is
        still sending could not always be answered with a status by grpc.aio).
        """
        self._interruption = error
        stream = self._stream
        if stream is None or stream.done() or self._ending:
            return
        if unless_active is not None and time.monotonic() - self.last_activity < unless_active:
            # An active stream ends at its next message; one that sends none is cancelled.
            asyncio.get_running_loop().call_later(unless_active, self._cancel_if_writing, stream)
            return
        stream.cancel()

    def _cancel_if_writing(self, stream: asyncio.Task[object]) -> None:
        # Not a stream that has met its error and is ending by itself: it owes its client a status.
        if self._stream is stream and not self._ending and not stream.done():
            stream.cancel()

    @property
    def busy(self) -> bool:
        """A stream, finish, abort or detach of this process is at work on this upload."""
        return self.attached or self.ending()

    @property
    def stream_task(self) -> asyncio.Task[object] | None:
        """The task of the stream that writes this upload, while one does."""
        return self._stream

    def interruption(self) -> RecgwError | None:
        """Why the attached stream was interrupted, if it was."""
        return self._interruption

    async def stream_failed(self, error: RecgwError) -> None:
        """The attached stream ended with `error`: keep the upload resumable unless it cannot be."""
        self._ending = True  # by itself: cancelling it now would cost its client the status
        if self._finish_task is not None and not self._finish_task.done():
            # Finishing runs to its end by itself and cleans up after itself if it fails.
            await asyncio.gather(self._finish_task, return_exceptions=True)
            return
        await self._end_stream(error)

    async def _end_stream(self, error: RecgwError) -> None:
        if error.reason in (Reason.CREDENTIALS_REJECTED, Reason.ACCESS_DENIED):
            await self._manager.credentials_failing(self.tenant_id, error)
        if self.state in DONE_STATES:
            return
        if self._fail_task is not None or self.abort_requested.is_set() or is_terminal(error):
            await self.fail(error)
        else:
            await self.detach()

    async def detach(self) -> None:
        """The stream is gone: drop what is not committed; the upload stays open for resuming."""
        if not self.attached:
            return
        if self._detach_task is None:
            self._detach_task = asyncio.ensure_future(self._detach())
        await asyncio.shield(self._detach_task)

    async def _detach(self) -> None:
        sessions = self._manager.sessions
        try:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            if not self._fenced:
                await self._keep_tail()
            beyond = [n for n in self._parts if n > self._prefix]
            for number in beyond:
                del self._parts[number]
            if beyond and not self._fenced:
                await self._store_write(
                    lambda lease: sessions.drop_parts_after(lease, self._prefix)
                )
            if self.state is UploadState.FINISHING:
                self.state = UploadState.OPEN
            self.updated_at = time.time()
            if self.state is UploadState.OPEN and not self._fenced:
                await self._store_write(
                    lambda lease: sessions.update(
                        lease, self.updated_at, state=UploadState.OPEN.value
                    )
                )
                await self._release_lease()
        except RecgwError:
            if not self._fenced:
                raise
            # Another replica took the upload over: its record is that replica's to write now.
        finally:
            # No await from here on: once GetUploadStatus shows received == committed, the
            # upload is ready for the next stream.
            self._drop_part()
            self._reset_to_prefix()
            self._background_error = None
            self.attached = False
            self._stream = None
            self.abort_requested = asyncio.Event()
            self._detach_task = None
            self.received = self.committed

    async def _keep_tail(self) -> None:
        """Under the salvage policy, upload the bytes after the committed prefix as a short part,
        so that a salvage can keep them; a resuming stream writes that part again."""
        part = self._part
        if part is None or not part.size or part.number != self._prefix + 1:
            return  # nothing buffered, or a hole before it: it could not be the last part
        if not (self._salvage_tail or await self._manager.salvages(self.tenant_id)):
            return
        try:
            writer = await self._writer_for_upload()
            if not self._store_upload_id:
                await self._start_multipart(writer)
            body = await part.seal()
            object_crc = combine_crc32c(self._object_crc, part.crc32c, part.size)
            tail = await self._write_part(writer, part, body, object_crc, self._hash(body))
            await self._store_write(
                lambda lease: self._manager.sessions.update(lease, time.time(), tail=tail)
            )
            self.tail = tail
            log.info(
                "upload %s: kept %d bytes after the committed size for salvaging",
                self.upload_id,
                part.size,
            )
        except RecgwError as error:
            log.warning(
                "upload %s: the bytes after the committed size could not be kept: %s",
                self.upload_id,
                error.message,
            )

    # -- driven by the transport -------------------------------------------------------------

    async def write(
        self,
        write_offset: int,
        data: bytes | memoryview,
        data_crc32c: int | None = None,
        last: bool = False,
        prepaid: Reservation | None = None,
    ) -> None:
        """Accept the next chunk of the object (`last`: finish follows at once), in memory
        reserved by `prepaid` before it was read, if that holds enough.

        While the gateway shuts down, a stream that reaches a part boundary ends there with
        SHUTTING_DOWN, once the part before it is committed.
        """
        self._check_writable()
        self.last_activity = time.monotonic()
        if write_offset != self.received:
            raise RecgwError(
                ErrorKind.OUT_OF_RANGE,
                f"write_offset is {write_offset} but the upload is at byte {self.received} "
                f"(committed size {self.committed}); send the bytes from offset {self.received}",
                reason=Reason.OFFSET_MISMATCH,
                details={
                    "upload_id": self.upload_id,
                    "committed_size": str(self.committed),
                    "received_size": str(self.received),
                    "write_offset": str(write_offset),
                },
            )
        size = len(data)
        if not size:
            return  # a heartbeat
        crc = crc32c(data)
        if data_crc32c is not None and crc != data_crc32c:
            raise RecgwError(
                ErrorKind.DATA_LOSS,
                f"data_crc32c does not match the {size} bytes at offset {write_offset}; "
                "the chunk was corrupted in transit, send it again",
                reason=Reason.CHUNK_CHECKSUM_MISMATCH,
                details={"upload_id": self.upload_id, "committed_size": str(self.committed)},
            )
        expected = self._plan.expected_size
        if expected is not None and self.received + size > expected:
            raise RecgwError(
                ErrorKind.OUT_OF_RANGE,
                f"the upload declared expected_size {expected} but this message would bring it "
                f"to {self.received + size} bytes",
                reason=Reason.SIZE_LIMIT_EXCEEDED,
            )
        capacity = self._plan.capacity
        if self.received + size > capacity:
            raise RecgwError(
                ErrorKind.OUT_OF_RANGE,
                f"the upload would exceed {capacity} bytes, the most this tenant's part plan "
                "fits in 10,000 S3 parts; declare expected_size for very large objects",
                reason=Reason.SIZE_LIMIT_EXCEEDED,
            )
        position = 0
        while position < size:
            part = self._part
            if part is not None and part.room == 0:
                await self._send_part()  # more bytes follow a full part: it is not the last
                part = None
            if part is None:
                if self._manager.draining and not last:
                    await self._stop_at_boundary()
                part = self._part = self._new_part()
            room = part.room
            if position == 0 and size <= room:
                piece: bytes | memoryview = data
                piece_crc = crc
            else:
                # Only a message that straddles parts is split (views, not copies).
                piece = memoryview(data)[position : position + room]
                piece_crc = crc32c(piece)
            await part.append(piece, piece_crc, prepaid)
            position += len(piece)
            self.received += len(piece)
        self._manager.metrics.bytes_received.inc(size)
        self.updated_at = time.time()

    async def _stop_at_boundary(self) -> None:
        """End the stream for the shutdown, at a part boundary: nothing it sent is dropped."""
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._background_error is not None:
            raise self._background_error
        log.info(
            "upload %s: stream ended at byte %d for the shutdown", self.upload_id, self.committed
        )
        raise self._manager.shutting_down(self)

    async def finish(self, expected: ObjectChecksums | None = None) -> UploadResult:
        """Complete the object. Runs to the end even if the caller is cancelled meanwhile."""
        self._check_writable()
        if self._plan.expected_size is not None and self.received != self._plan.expected_size:
            raise RecgwError(
                ErrorKind.OUT_OF_RANGE,
                f"finish_write after {self.received} bytes, but the upload declared "
                f"expected_size {self._plan.expected_size}; send the remaining "
                f"{self._plan.expected_size - self.received} bytes first",
                reason=Reason.SIZE_INCOMPLETE,
            )
        if expected is not None and expected.sha256 and self._sha256 is None:
            raise RecgwError(
                ErrorKind.INVALID_ARGUMENT,
                "object_checksums.sha256 was sent, but this upload does not compute SHA-256; "
                "set start.compute_sha256 when the upload starts, or send only the CRC32C",
                reason=Reason.INVALID_FIELD,
                details={"field": "object_checksums.sha256"},
            )
        self._finish_task = asyncio.ensure_future(self._finish(expected))
        # Completing an object must not be interrupted halfway: shield it from cancellation of
        # the stream, so the outcome is either a whole object or none (GetUploadStatus tells).
        return await asyncio.shield(self._finish_task)

    def finished_result(self, write_offset: int, expected: ObjectChecksums | None) -> UploadResult:
        """The response to a repeated finish of a complete upload (finishing is idempotent)."""
        assert self.result is not None
        if write_offset != self.result.size:
            raise RecgwError(
                ErrorKind.OUT_OF_RANGE,
                f"upload {self.upload_id} is complete with {self.result.size} bytes; a repeated "
                f"finish_write must have write_offset {self.result.size}",
                reason=Reason.OFFSET_MISMATCH,
                details={
                    "upload_id": self.upload_id,
                    "committed_size": str(self.result.size),
                    "write_offset": str(write_offset),
                },
            )
        self._verify(expected, self.result.checksums)
        return self.result

    async def fail(self, error: RecgwError, final: UploadState = UploadState.ABORTED) -> None:
        """End the upload without an object; safe to call more than once and concurrently."""
        if self.state in DONE_STATES or self.state is UploadState.FINISHING:
            return
        if self._fail_task is None:
            self._fail_task = asyncio.ensure_future(self._fail(error, final))
        await asyncio.shield(self._fail_task)

    async def salvage(self, reason: str) -> UploadResult:
        """Keep what was recorded: complete the committed parts (and the kept tail) as the
        object, and write `<key>.salvaged.json` beside it. Needs nothing but PutObject."""
        if self.state in DONE_STATES or self.state is UploadState.SALVAGED:
            assert self.result is not None
            return self.result
        if self.state in ENDED_STATES or self._fail_task is not None:
            raise RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"upload {self.upload_id} is {self.state.value}; nothing is left to salvage",
                reason=Reason.UPLOAD_ENDED,
            )
        if self._finish_task is not None and not self._finish_task.done():
            raise self._another_writer()
        if self.attached:
            silent = time.monotonic() - self.last_activity
            if silent <= self._manager.settings.takeover_after:
                raise self._another_writer()
            self._salvage_tail = True
            self.interrupt(
                RecgwError(
                    ErrorKind.ABORTED,
                    f"upload {self.upload_id} was salvaged after this stream was silent for "
                    f"{silent:.1f} s",
                    reason=Reason.UPLOAD_ENDED,
                )
            )
            await self._wait_detached()
        self._finish_task = asyncio.ensure_future(self._complete_recorded(reason))
        return await asyncio.shield(self._finish_task)

    @property
    def completion_sent(self) -> bool:
        """A completion may have reached S3 before the gateway stopped."""
        return self._completion_sent

    async def complete_again(self) -> UploadResult:
        """Repeat a completion whose answer was lost (found after a restart by expiry)."""
        self._finish_task = asyncio.ensure_future(self._complete_recorded(None))
        return await asyncio.shield(self._finish_task)

    async def _complete_recorded(self, salvage_reason: str | None) -> UploadResult:
        """Complete the recorded parts: as a salvage (with its note) or as a repeated finish."""
        parts = [self._parts[n] for n in range(1, self._prefix + 1)]
        if self.tail is not None and self.tail.number == self._prefix + 1:
            parts.append(self.tail)
        if not parts or not self._store_upload_id:
            raise RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"upload {self.upload_id} has no bytes in S3 to salvage",
                reason=Reason.UPLOAD_ENDED,
            )
        last = parts[-1]
        writer = await self._writer_for_upload()
        written_parts = [WrittenPart(p.number, p.etag, p.size, p.crc32c) for p in parts]
        expected_etag = expected_multipart_etag([p.etag for p in parts])
        self.state = UploadState.FINISHING
        try:
            written = await self._complete(
                lambda: writer.complete_multipart_upload(
                    self.spec, self._store_upload_id, written_parts, last.object_crc32c
                )
            )
        except RecgwError:
            self.state = UploadState.OPEN
            raise
        self._object_crc = last.object_crc32c
        if written is None:
            written = await self._confirm(writer, expected_etag)
        size = sum(p.size for p in parts)
        sha = ResumableSha256(last.sha256_state).digest() if last.sha256_state else None
        self.received = self.committed = size
        result = self._result(
            writer, written, ObjectChecksums(last.object_crc32c, sha), len(parts), expected_etag
        )
        if salvage_reason is not None:
            await self._write_salvage_note(writer, result, salvage_reason)
            self.state = UploadState.SALVAGED
            self.error_message = salvage_reason
        else:
            self.state = (
                UploadState.COMPLETION_UNCONFIRMED if result.unconfirmed else UploadState.COMPLETE
            )
        self.result = result
        self.updated_at = time.time()
        outbox, record, message = self._outbox(), result_to_record(result), self.error_message
        await self._store_write(
            lambda lease: self._manager.sessions.update(
                lease,
                self.updated_at,
                outbox=outbox,
                state=self.state.value,
                committed_size=size,
                error_message=message,
                result=record,
            )
        )
        await self._release_lease()
        self._manager.on_events()
        self.terminal.set()
        self._manager.metrics.uploads_finished.labels(self.state.value).inc()
        log.info("upload %s %s: %d bytes", self.upload_id, self.state.value, size)
        return result

    async def _write_salvage_note(
        self, writer: ObjectWriter, result: UploadResult, reason: str
    ) -> None:
        note = json.dumps(
            {
                "salvaged": True,
                "upload_id": self.upload_id,
                "key": result.key,
                "size": result.size,
                "part_count": result.part_count,
                "crc32c": f"{result.checksums.crc32c or 0:08x}",
                "sha256": (result.checksums.sha256 or b"").hex(),
                "etag": result.etag,
                "reason": reason,
            },
            indent=1,
        ).encode()
        spec = ObjectSpec(result.key + ".salvaged.json", "application/json", {}, False)
        try:
            await writer.put_object(spec, BytesBody(note), crc32c(note))
        except RecgwError as error:
            log.warning(
                "upload %s: the salvage note could not be written: %s",
                self.upload_id,
                error.message,
            )

    def ending(self) -> bool:
        """Whether finishing, failing or detaching is under way in this copy."""
        return (
            (self._fail_task is not None and not self._fail_task.done())
            or (self._finish_task is not None and not self._finish_task.done())
            or self._detach_task is not None
        )

    def matches(self, record: SessionRecord) -> bool:
        """Whether this copy is as current as the stored `record`: no replica leased the
        upload since this copy last held or read it."""
        known = self.lease.generation if self.lease is not None else self.record.generation
        return record.generation == known and record.committed_size == self.committed

    def status(self) -> UploadStatus:
        return UploadStatus(
            upload_id=self.upload_id,
            state=self.state,
            committed_size=self.committed,
            received_size=self.received,
            tenant_id=self.tenant_id,
            key=self.spec.key,
            result=self.result,
            error_message=self.error_message,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )

    async def spill_if_slow(self, now: float) -> None:
        """Move the part being filled to disk if it has been filling for too long."""
        part = self._part
        if part is not None and not part.spilled and part.size and part.slow(now):
            try:
                await part.spill()
            except RecgwError as error:
                log.warning("cannot spill upload %s: %s", self.upload_id, error.message)
                self.interrupt(error)

    async def spill_before_waiting(self) -> None:
        """Move the part being filled to disk before the stream waits for memory: a waiting
        stream then holds none of the budget (its part fills on from disk). With the spool
        full it waits with the part in memory; parts in flight free memory as they land."""
        part = self._part
        if part is not None and not part.spilled and part.size:
            try:
                await part.spill()
            except RecgwError as error:
                if error.reason is not Reason.SPOOL_EXHAUSTED:
                    raise

    # -- internals ---------------------------------------------------------------------------

    def aborted_error(self) -> RecgwError:
        return RecgwError(
            ErrorKind.ABORTED,
            f"upload {self.upload_id} was aborted by AbortUpload",
            reason=Reason.UPLOAD_ABORTED,
        )

    def _check_writable(self) -> None:
        if self._background_error is not None:
            raise self._background_error
        if self._interruption is not None:
            raise self._interruption
        if self._fenced:
            raise self._fenced_error()
        if self.abort_requested.is_set():
            raise self.aborted_error()
        if self._fail_task is not None:
            raise RecgwError(
                ErrorKind.ABORTED,
                f"upload {self.upload_id} has ended: {self.error_message}",
                reason=Reason.UPLOAD_ABORTED,
            )
        if self.state is not UploadState.OPEN:
            raise RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"upload {self.upload_id} is {self.state.value}; no more data is accepted",
                reason=Reason.UPLOAD_FINISHING
                if self.state is UploadState.FINISHING
                else Reason.UPLOAD_ENDED,
            )

    def _extended_prefix(self) -> tuple[int, int]:
        """The committed prefix (part count, bytes) once every contiguous new part counts."""
        prefix, committed = self._prefix, self.committed
        while prefix + 1 in self._parts:
            prefix += 1
            committed += self._parts[prefix].size
        return prefix, committed

    def _advance_prefix(self) -> None:
        self._prefix, self.committed = self._extended_prefix()

    def _reset_to_prefix(self) -> None:
        """Checksum state and part numbering as they were at the end of the committed prefix."""
        last = self._parts.get(self._prefix)
        self._object_crc = last.object_crc32c if last else 0
        self._sha256: ResumableSha256 | None = None
        if self.compute_sha256:
            self._sha256 = ResumableSha256(last.sha256_state if last else None)
        self._hash_tail: asyncio.Future[bytes] | None = None
        self._next_part = self._prefix + 1

    def _new_part(self) -> PartBuffer:
        number = self._next_part
        self._next_part += 1
        capacity = self._plan.size_of(number)
        if self._plan.expected_size is not None:
            capacity = min(capacity, self._plan.expected_size - self.received) or capacity
        manager = self._manager
        return PartBuffer(
            number,
            capacity,
            manager.budget,
            manager.spool,
            self.tenant_id,
            manager.settings.spill_after,
        )

    def _drop_part(self) -> None:
        if self._part is not None:
            self._part.release()
            self._part = None

    def _hash(self, body: PartBody) -> asyncio.Future[bytes] | None:
        """Fold the part into the object's SHA-256 in a worker thread, after the parts before."""
        sha = self._sha256
        if sha is None:
            return None
        previous = self._hash_tail

        async def run() -> bytes:
            if previous is not None:
                await previous
            await asyncio.to_thread(_update_all, sha, body)
            return sha.state()

        self._hash_tail = asyncio.ensure_future(run())
        return self._hash_tail

    async def _sha256_digest(self) -> bytes | None:
        if self._sha256 is None:
            return None
        if self._hash_tail is not None:
            await self._hash_tail
        return self._sha256.digest()

    async def _writer_for_upload(self) -> ObjectWriter:
        if self._writer is None:
            self._writer = await self._manager.writer_for_tenant(self.tenant_id)
        return self._writer

    async def _start_multipart(self, writer: ObjectWriter) -> None:
        await self._lease_before_s3()
        self._store_upload_id = await writer.create_multipart_upload(self.spec)
        store_upload_id = self._store_upload_id
        await self._store_write(
            lambda lease: self._manager.sessions.update(
                lease, time.time(), store_upload_id=store_upload_id
            )
        )

    def _fenced_error(self) -> RecgwError:
        return RecgwError(
            ErrorKind.ABORTED,
            f"another gateway replica took over upload {self.upload_id}; this stream stops "
            "(resume the upload from its committed size)",
            reason=Reason.WRITER_FENCED,
            details={"upload_id": self.upload_id},
        )

    async def _store_write(self, write: Callable[[Lease], Awaitable[None]]) -> None:
        """A session store write under this upload's lease; a lost lease stops the stream."""
        if self._fenced:
            raise self._fenced_error()
        assert self.lease is not None, "a store write without a lease"
        try:
            await write(self.lease)
        except Fenced:
            self._fenced = True
            self._manager.forget(self)  # this copy is stale; the store has the truth
            log.warning(
                "upload %s was taken over by another replica; its stream here stops",
                self.upload_id,
            )
            raise self._fenced_error() from None

    async def check_lease(self) -> None:
        """Make sure this replica still holds the upload's lease (a lease-checked write of
        `updated_at` only); WRITER_FENCED when another replica took it over."""

        async def touch(lease: Lease) -> None:
            try:
                await self._manager.sessions.update(lease, time.time())
            except Fenced:
                if self._released is not lease:
                    raise
                # It ended here meanwhile and gave the lease up: nobody took it over.

        await self._store_write(touch)

    async def _lease_before_s3(self) -> None:
        """Before a request to S3: with a shared session store (another replica may have taken
        the lease: AbortUpload does that to a live writer), or when this replica's heartbeat may
        have lapsed (it was frozen, or cut off from the store), check the lease first, so that a
        replica that lost it sends nothing more. A request already on its way when the lease is
        lost can still land: see "What fencing cannot stop" in the README."""
        if self._fenced:
            raise self._fenced_error()
        if self._manager.settings.shared_sessions or not self._manager.leases_surely_alive():
            await self.check_lease()

    async def _release_lease(self) -> None:
        lease = self.lease
        if lease is not None and not self._fenced:
            await self._manager.sessions.release(lease)
            self._released = lease

    async def _send_part(self) -> None:
        part = self._part
        assert part is not None
        writer = await self._writer_for_upload()
        if not self._store_upload_id:
            await self._start_multipart(writer)
        await self._slots.acquire()
        try:
            body = await part.seal()
        except BaseException:
            self._slots.release()
            raise
        self._part = None  # the task owns the part's memory and spool file from here on
        self._object_crc = combine_crc32c(self._object_crc, part.crc32c, part.size)
        digest = self._hash(body)
        task = asyncio.ensure_future(
            self._upload_part(writer, part, body, self._object_crc, digest)
        )
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _write_part(
        self,
        writer: ObjectWriter,
        part: PartBuffer,
        body: PartBody,
        object_crc: int,
        digest: asyncio.Future[bytes] | None,
    ) -> PartRecord:
        """Send one part to S3; its record, with the object's checksum state at its end."""
        await self._lease_before_s3()
        written = await writer.upload_part(
            self.spec.key, self._store_upload_id, part.number, body, part.crc32c
        )
        return PartRecord(
            number=part.number,
            etag=written.etag,
            size=written.size,
            crc32c=part.crc32c,
            object_crc32c=object_crc,
            sha256_state=await digest if digest is not None else b"",
        )

    async def _upload_part(
        self,
        writer: ObjectWriter,
        part: PartBuffer,
        body: PartBody,
        object_crc: int,
        digest: asyncio.Future[bytes] | None,
    ) -> None:
        started = time.monotonic()
        try:
            record = await self._write_part(writer, part, body, object_crc, digest)
            self._parts[part.number] = record
            if self.tail is not None and self.tail.number == part.number:
                self.tail = None  # rewritten as a regular part: the kept tail is gone
            _, committed = self._extended_prefix()
            # Durable first, then reported: GetUploadStatus never shows uncommitted bytes.
            await self._store_write(
                lambda lease: self._manager.sessions.save_part(
                    lease, record, committed, time.time()
                )
            )
            self._advance_prefix()
            self.updated_at = time.time()
            self._manager.metrics.parts_uploaded.inc()
            self._manager.metrics.bytes_committed.inc(record.size)
            self._manager.metrics.part_seconds.observe(time.monotonic() - started)
        except RecgwError as error:
            if self._background_error is None:
                self._background_error = error
        except Exception as exc:
            log.exception("part %d of upload %s failed", part.number, self.upload_id)
            if self._background_error is None:
                self._background_error = RecgwError(
                    ErrorKind.INTERNAL, f"writing part {part.number} failed ({type(exc).__name__})"
                )
        finally:
            if digest is not None:
                await asyncio.gather(digest, return_exceptions=True)
            part.release()
            self._slots.release()

    def _verify(self, expected: ObjectChecksums | None, computed: ObjectChecksums) -> None:
        if expected is None:
            return
        if expected.crc32c is not None and expected.crc32c != computed.crc32c:
            raise RecgwError(
                ErrorKind.DATA_LOSS,
                f"object CRC32C mismatch: the client sent {expected.crc32c:08x}, the gateway "
                f"received bytes with CRC32C {computed.crc32c or 0:08x}; the object was not "
                "created and the upload is still open (resume or abort it)",
                reason=Reason.OBJECT_CHECKSUM_MISMATCH,
            )
        if expected.sha256 and computed.sha256 and expected.sha256 != computed.sha256:
            raise RecgwError(
                ErrorKind.DATA_LOSS,
                "object SHA-256 mismatch between what the client sent and what the gateway "
                "received; the object was not created and the upload is still open (resume or "
                "abort it)",
                reason=Reason.OBJECT_CHECKSUM_MISMATCH,
            )

    async def _complete(self, send: Callable[[], Awaitable[WrittenObject]]) -> WrittenObject | None:
        """Send the completion, retrying when S3 cannot be reached.

        FINISHING is durable before the first attempt. Once a completion may have reached S3, a
        refusal that a completed object would cause (NoSuchUpload; 412 for If-None-Match) means
        "completed, not confirmed", returned as None, never "aborted".
        """
        settings = self._manager.settings
        if not self._completion_sent:
            await self._store_write(
                lambda lease: self._manager.sessions.update(
                    lease, time.time(), state=UploadState.FINISHING.value
                )
            )
        for attempt in range(1, settings.completion_attempts + 1):
            sent_before = self._completion_sent
            self._completion_sent = True
            try:
                return await send()
            except RecgwError as error:
                if sent_before and error.store_code in _UNCONFIRMED_CODES:
                    return None
                if error.kind is not ErrorKind.UNAVAILABLE or (
                    attempt == settings.completion_attempts
                ):
                    raise
                log.info(
                    "completing upload %s: attempt %d failed (%s); retrying",
                    self.upload_id,
                    attempt,
                    error.store_code,
                )
                await asyncio.sleep(settings.completion_backoff * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _finish(self, expected: ObjectChecksums | None) -> UploadResult:
        started = time.monotonic()
        self.state = UploadState.FINISHING
        expected_etag = ""
        try:
            writer = await self._writer_for_upload()
            # Still this replica's upload? A writer that was frozen while another replica took
            # over learns it here, before it sends anything more to S3.
            await self.check_lease()  # the state stays: FINISHING if a completion may be in S3
            if not self._store_upload_id:
                # Everything fits in one part: a single PutObject, no multipart upload at all.
                part = self._part or self._new_part()
                body = await part.seal()
                digest = self._hash(body)
                if digest is not None:
                    await digest
                self._object_crc = part.crc32c
                computed = ObjectChecksums(part.crc32c, await self._sha256_digest())
                self._verify(expected, computed)
                written = await self._complete(
                    lambda: writer.put_object(self.spec, body, part.crc32c)
                )
                self.committed = part.size
                self._drop_part()
                self._manager.metrics.bytes_committed.inc(self.committed)
                self._manager.metrics.part_seconds.observe(time.monotonic() - started)
                part_count = 0
            else:
                if self._part is not None and self._part.size:
                    await self._send_part()
                await asyncio.gather(*self._in_flight)
                if self._background_error is not None:
                    raise self._background_error
                computed = ObjectChecksums(self._object_crc, await self._sha256_digest())
                self._verify(expected, computed)
                parts = [
                    WrittenPart(p.number, p.etag, p.size, p.crc32c)
                    for p in sorted(self._parts.values(), key=lambda p: p.number)
                ]
                expected_etag = expected_multipart_etag([p.etag for p in parts])
                written = await self._complete(
                    lambda: writer.complete_multipart_upload(
                        self.spec, self._store_upload_id, parts, self._object_crc
                    )
                )
                part_count = len(parts)
        except RecgwError as error:
            self.state = UploadState.OPEN
            if error.store_code and not self._fenced:
                # S3 refused the completion: because another replica took over meanwhile (and
                # completed or aborted the upload)? Then that is what this stream must report.
                try:
                    await self.check_lease()
                except RecgwError as fenced:
                    if self._fenced:
                        error = fenced
                except Exception:
                    log.warning("upload %s: the lease could not be checked", self.upload_id)
            await self._end_stream(error)
            raise error from None
        except BaseException as exc:
            self.state = UploadState.OPEN
            await self._end_stream(
                RecgwError(ErrorKind.INTERNAL, f"finishing failed ({type(exc).__name__})")
            )
            raise
        if written is None:
            written = await self._confirm(writer, expected_etag)
        self.result = self._result(writer, written, computed, part_count, expected_etag)
        self.state = (
            UploadState.COMPLETION_UNCONFIRMED if self.result.unconfirmed else UploadState.COMPLETE
        )
        self.updated_at = time.time()
        size, record = self.result.size, result_to_record(self.result)
        outbox = self._outbox()
        await self._store_write(
            lambda lease: self._manager.sessions.update(
                lease,
                self.updated_at,
                outbox=outbox,
                state=self.state.value,
                committed_size=size,
                result=record,
            )
        )
        await self._release_lease()
        self._manager.on_events()
        self.attached = False
        self.terminal.set()
        self._manager.metrics.uploads_finished.labels(self.state.value).inc()
        return self.result

    async def _confirm(self, writer: ObjectWriter, expected_etag: str) -> WrittenObject | None:
        """After a lost completion answer: look at the object if the tenant allows a metadata
        read (HeadObject); None when it cannot be confirmed that way."""
        try:
            found = await writer.head_object(self.spec.key)
        except RecgwError as error:
            log.info(
                "completion of upload %s not confirmed: no metadata read (%s)",
                self.upload_id,
                error.store_code or error.kind.value,
            )
            return None
        if found is None:
            return None
        # A composite checksum ("...-N") cannot be compared with the whole object's CRC32C.
        crc_ok = (
            not found.crc32c or "-" in found.crc32c or found.crc32c == crc32c_b64(self._object_crc)
        )
        etag_ok = not expected_etag or found.etag == expected_etag
        if crc_ok and etag_ok:
            log.info("completion of upload %s confirmed by HeadObject", self.upload_id)
            return found
        return None

    def _result(
        self,
        writer: ObjectWriter,
        written: WrittenObject | None,
        computed: ObjectChecksums,
        part_count: int,
        expected_etag: str,
    ) -> UploadResult:
        return UploadResult(
            upload_id=self.upload_id,
            bucket=writer.bucket,
            key=self.spec.key,
            size=self.received,
            etag=written.etag if written is not None else expected_etag,
            version_id=written.version_id if written is not None else "",
            part_count=part_count,
            checksums=computed,
            unconfirmed=written is None,
        )

    async def _fail(self, error: RecgwError, final: UploadState) -> None:
        self.error_message = error.message
        self._drop_part()
        # Parts already on their way finish (their memory is in use until they do); then abort.
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._store_upload_id and not self._fenced:
            try:  # a fenced copy must not abort what the new writer is writing
                await self.check_lease()
            except RecgwError:
                if not self._fenced:
                    raise
        if self._store_upload_id and not self._fenced:  # a fenced copy leaves S3 to the new writer
            try:
                writer = await self._writer_for_upload()
                self.abort_outcome = await writer.abort_multipart_upload(
                    self.spec.key, self._store_upload_id
                )
            except RecgwError as lookup_error:
                log.warning(
                    "cannot abort upload %s in S3: %s", self.upload_id, lookup_error.message
                )
                self.abort_outcome = AbortOutcome.FAILED
            self._manager.metrics.multipart_aborts.labels(self.abort_outcome.value).inc()
            if self.abort_outcome is AbortOutcome.DENIED:
                log.info(
                    "AbortMultipartUpload was denied for upload %s (key %s); the incomplete "
                    "upload is left to the bucket's lifecycle rule",
                    self.upload_id,
                    self.spec.key,
                )
        else:
            self.abort_outcome = AbortOutcome.ABORTED  # nothing was ever started in S3
        self.state = final
        self.updated_at = time.time()
        outcome = self.abort_outcome
        outbox = self._outbox()
        try:
            await self._store_write(
                lambda lease: self._manager.sessions.update(
                    lease,
                    self.updated_at,
                    outbox=outbox,
                    state=final.value,
                    error_message=error.message,
                    abort_outcome=outcome.value,
                )
            )
            await self._release_lease()
        except RecgwError:
            if not self._fenced:
                raise
        self._manager.on_events()
        self.attached = False
        self._manager.metrics.uploads_finished.labels(final.value).inc()
        log.info("upload %s %s: %s", self.upload_id, final.value, error.message)
        self.terminal.set()

    def _outbox(self) -> Sequence[tuple[str, Event]]:
        """The event that reports the state this upload has just reached."""
        kind = _EVENT_TYPES[self.state]
        data: dict[str, Any] = {
            "upload_id": self.upload_id,
            "state": self.state.value,
            "key": self.spec.key,
            "bucket": self.record.bucket,
            "duration_seconds": round(time.time() - self.created_at, 3),
        }
        if self.result is not None:
            checksums = self.result.checksums
            data.update(
                bucket=self.result.bucket,
                size=self.result.size,
                etag=self.result.etag,
                version_id=self.result.version_id,
                part_count=self.result.part_count,
                crc32c=f"{checksums.crc32c or 0:08x}",
                sha256=(checksums.sha256 or b"").hex(),
                unconfirmed=self.result.unconfirmed,
            )
        if self.state in (UploadState.ABORTED, UploadState.EXPIRED):
            data.update(reason=self.error_message, committed_size=self.committed)
        return self._manager.outbox_for(Event(kind, self.tenant_id, data))


_EVENT_TYPES = {
    UploadState.COMPLETE: events.UPLOAD_COMPLETED,
    UploadState.COMPLETION_UNCONFIRMED: events.UPLOAD_COMPLETION_UNCONFIRMED,
    UploadState.ABORTED: events.UPLOAD_ABORTED,
    UploadState.EXPIRED: events.UPLOAD_EXPIRED,
    UploadState.SALVAGED: events.UPLOAD_SALVAGED,
}


def _update_all(sha: ResumableSha256, body: PartBody) -> None:
    for chunk in body.chunks():
        sha.update(chunk)


def crc32c_b64(value: int) -> str:
    import base64

    return base64.b64encode(value.to_bytes(4, "big")).decode()
