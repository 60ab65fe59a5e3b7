"""The upload pipeline: from streams of chunks to one object in the tenant's bucket.

It knows nothing of gRPC. A transport calls `UploadManager.start` (which opens a new upload or
attaches to an existing one to resume it), then `Upload.write` for each chunk and `Upload.finish`
at the end, or `Upload.stream_failed` when its stream breaks. Receiving and sending overlap:
while one part is on its way to S3 the next one is being filled.

Every upload is a durable session (see sessions.py). Bytes count as committed only once the part
that holds them is in S3 and recorded; a broken stream loses only uncommitted bytes, and a new
stream resumes at the committed size, also after a gateway restart.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from recgw_server.credentials.base import CredentialsSource
from recgw_server.domain import (
    ErrorKind,
    ObjectChecksums,
    Reason,
    RecgwError,
    TenantCredentials,
    UploadResult,
    build_object_key,
    invalid,
    quote_client,
    validate_tenant_id,
)
from recgw_server.metrics import GatewayMetrics
from recgw_server.pipeline.budget import MemoryBudget
from recgw_server.pipeline.digest import DigestState, ObjectDigest, crc32c
from recgw_server.pipeline.parts import GROWTH_INTERVAL, MiB, PartPlan, plan_parts
from recgw_server.sessions.base import PartRecord, SessionRecord, SessionStore
from recgw_server.storage.base import (
    AbortOutcome,
    ObjectSpec,
    ObjectStore,
    ObjectWriter,
    WrittenObject,
    WrittenPart,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_METADATA_KEY = re.compile(r"[a-z0-9][a-z0-9-]{0,127}")
_MAX_METADATA_BYTES = 2048  # S3's limit for all user metadata
_CONTENT_TYPE = re.compile(r"[\x21-\x7e]+/[\x21-\x7e]+( *;[\x20-\x7e]*)?")


def _is_terminal(error: RecgwError) -> bool:
    """Errors after which an upload can never complete: it is aborted, not left resumable."""
    return error.kind is ErrorKind.ALREADY_EXISTS or error.store_code == "NoSuchUpload"


class UploadState(enum.Enum):
    OPEN = "open"
    FINISHING = "finishing"
    COMPLETE = "complete"
    ABORTED = "aborted"
    EXPIRED = "expired"


@dataclass(frozen=True)
class PipelineSettings:
    part_size: int = 8 * MiB
    max_inflight_parts: int = 4
    growth_interval: int = GROWTH_INTERVAL
    idle_timeout: float = 24 * 3600.0
    memory_cache_size: int = 10_000


@dataclass(frozen=True)
class StartRequest:
    tenant_id: str
    object_name: str
    content_type: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    expected_size: int | None = None
    upload_id: str = ""


@dataclass(frozen=True)
class UploadStatus:
    upload_id: str
    state: UploadState
    committed_size: int
    received_size: int
    tenant_id: str
    key: str
    result: UploadResult | None
    error_message: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class AbortReport:
    state: UploadState
    storage_aborted: bool
    detail: str


def _validate_start(request: StartRequest) -> str:
    """Check a start request; return the upload id to use."""
    validate_tenant_id(request.tenant_id)
    if request.content_type and (
        len(request.content_type) > 255 or not _CONTENT_TYPE.fullmatch(request.content_type)
    ):
        raise invalid(
            "content_type must be a MIME type such as 'video/webm' (at most 255 chars)",
            "start.content_type",
        )
    size = 0
    for key, value in request.metadata.items():
        if not _METADATA_KEY.fullmatch(key):
            raise invalid(
                f"metadata key {quote_client(key, 40)} is invalid: use lowercase letters, digits "
                "and '-'",
                "start.metadata",
            )
        if any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
            raise invalid(
                f"metadata value of {quote_client(key, 40)} must be printable ASCII",
                "start.metadata",
            )
        size += len(key) + len(value)
    if size > _MAX_METADATA_BYTES:
        raise invalid(
            f"metadata is {size} bytes; S3 allows at most {_MAX_METADATA_BYTES}", "start.metadata"
        )
    if not request.upload_id:
        return str(uuid.uuid4())
    try:
        parsed = uuid.UUID(request.upload_id)
    except ValueError:
        raise invalid(
            "upload_id must be a UUID, or empty to let the gateway choose", "start.upload_id"
        ) from None
    if str(parsed) != request.upload_id.lower():
        raise invalid(
            "upload_id must be a UUID in canonical form (8-4-4-4-12 hex digits)", "start.upload_id"
        )
    return str(parsed)


def result_to_record(result: UploadResult) -> dict[str, Any]:
    return {
        "bucket": result.bucket,
        "key": result.key,
        "size": result.size,
        "etag": result.etag,
        "version_id": result.version_id,
        "part_count": result.part_count,
        "crc32c": result.checksums.crc32c,
        "sha256": (result.checksums.sha256 or b"").hex(),
    }


def result_from_record(upload_id: str, data: Mapping[str, Any]) -> UploadResult:
    return UploadResult(
        upload_id=upload_id,
        bucket=data["bucket"],
        key=data["key"],
        size=data["size"],
        etag=data["etag"],
        version_id=data["version_id"],
        part_count=data["part_count"],
        checksums=ObjectChecksums(data["crc32c"], bytes.fromhex(data["sha256"]) or None),
    )


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
        if self.state is UploadState.FINISHING:
            # The gateway stopped while finishing; finishing again is safe to try.
            self.state = UploadState.OPEN
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
        self.received = self.committed
        self._digest = self._digest_at_prefix()
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._reserved = 0  # budget held by the part being filled
        self._next_part = self._prefix + 1
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(manager.settings.max_inflight_parts)
        self._background_error: RecgwError | None = None
        self._fail_task: asyncio.Task[None] | None = None
        self._finish_task: asyncio.Task[UploadResult] | None = None
        self._detach_task: asyncio.Task[None] | None = None
        self.attached = False
        self.abort_requested = asyncio.Event()
        self.terminal = asyncio.Event()
        if self.state not in (UploadState.OPEN, UploadState.FINISHING):
            self.terminal.set()

    # -- attaching streams -------------------------------------------------------------------

    def attach(self) -> None:
        """Let one stream write; a second one at the same time is refused."""
        if self.state is UploadState.COMPLETE:
            return  # only an idempotent finish can follow; the transport checks it
        if self.state in (UploadState.ABORTED, UploadState.EXPIRED):
            raise RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"upload {self.upload_id} is {self.state.value} ({self.error_message}); start a "
                "new upload with a new upload id",
                reason=Reason.UPLOAD_ENDED,
            )
        if self.attached or self._fail_task is not None or self._detach_task is not None:
            raise RecgwError(
                ErrorKind.ABORTED,
                f"another stream is writing upload {self.upload_id}; retry after it has ended "
                "(a dropped connection is noticed within seconds)",
                reason=Reason.ANOTHER_WRITER,
                details={"upload_id": self.upload_id, "committed_size": str(self.committed)},
            )
        self.attached = True
        self._background_error = None

    async def stream_failed(self, error: RecgwError) -> None:
        """The attached stream ended with `error`: keep the upload resumable unless it cannot be."""
        if self._finish_task is not None and not self._finish_task.done():
            # Finishing runs to its end by itself and cleans up after itself if it fails.
            await asyncio.gather(self._finish_task, return_exceptions=True)
            return
        await self._end_stream(error)

    async def _end_stream(self, error: RecgwError) -> None:
        if self.state is UploadState.COMPLETE:
            return
        if self._fail_task is not None or self.abort_requested.is_set() or _is_terminal(error):
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
        try:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            beyond = [n for n in self._parts if n > self._prefix]
            for number in beyond:
                del self._parts[number]
            if beyond:
                await self._manager.sessions.drop_parts_after(self.upload_id, self._prefix)
            if self.state is UploadState.FINISHING:
                self.state = UploadState.OPEN
            self.updated_at = time.time()
            if self.state is UploadState.OPEN:
                await self._manager.sessions.update(
                    self.upload_id, self.updated_at, state=UploadState.OPEN.value
                )
        finally:
            # No await from here on: once GetUploadStatus shows received == committed, the
            # upload is ready for the next stream.
            self._chunks.clear()
            self._buffered = 0
            self._release_reservation()
            self._next_part = self._prefix + 1
            self._digest = self._digest_at_prefix()
            self._background_error = None
            self.attached = False
            self.abort_requested = asyncio.Event()
            self._detach_task = None
            self.received = self.committed

    # -- driven by the transport -------------------------------------------------------------

    async def guarded(self, awaitable: Awaitable[T]) -> T:
        """Await something on behalf of this upload, but stop at once when it is aborted."""
        if self.abort_requested.is_set():
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise self._aborted_error()
        work = asyncio.ensure_future(awaitable)
        abort = asyncio.ensure_future(self.abort_requested.wait())
        try:
            await asyncio.wait({work, abort}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abort.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():
            raise self._aborted_error()
        return work.result()

    async def write(self, write_offset: int, data: bytes, data_crc32c: int | None = None) -> None:
        """Accept the next chunk of the object."""
        self._check_writable()
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
        if data_crc32c is not None and crc32c(data) != data_crc32c:
            raise RecgwError(
                ErrorKind.DATA_LOSS,
                f"data_crc32c does not match the {len(data)} bytes at offset {write_offset}; "
                "the chunk was corrupted in transit, send it again",
                reason=Reason.CHUNK_CHECKSUM_MISMATCH,
                details={"upload_id": self.upload_id, "committed_size": str(self.committed)},
            )
        expected = self._plan.expected_size
        if expected is not None and self.received + len(data) > expected:
            raise RecgwError(
                ErrorKind.OUT_OF_RANGE,
                f"the upload declared expected_size {expected} but this message would bring it "
                f"to {self.received + len(data)} bytes",
                reason=Reason.SIZE_LIMIT_EXCEEDED,
            )
        capacity = self._plan.capacity
        if self.received + len(data) > capacity:
            raise RecgwError(
                ErrorKind.OUT_OF_RANGE,
                f"the upload would exceed {capacity} bytes, the most this tenant's part plan "
                "fits in 10,000 S3 parts; declare expected_size for very large objects",
                reason=Reason.SIZE_LIMIT_EXCEEDED,
            )
        view = memoryview(data)
        position = 0
        while position < len(view):
            if self._chunks and self._buffered == self._part_capacity():
                await self._send_buffered_part()
            if not self._chunks:
                await self._reserve_part()
            room = self._part_capacity() - self._buffered
            piece = view[position : position + room]
            # Whole messages are kept as they are; only a message that straddles parts is copied.
            self._chunks.append(data if len(piece) == len(data) else bytes(piece))
            self._buffered += len(piece)
            position += len(piece)
            self.received += len(piece)
        self._manager.metrics.bytes_received.inc(len(data))
        self.updated_at = time.time()

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
        if self.state in (UploadState.COMPLETE, UploadState.FINISHING):
            return
        if self._fail_task is None:
            self._fail_task = asyncio.ensure_future(self._fail(error, final))
        await asyncio.shield(self._fail_task)

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

    # -- internals ---------------------------------------------------------------------------

    def _aborted_error(self) -> RecgwError:
        return RecgwError(
            ErrorKind.ABORTED,
            f"upload {self.upload_id} was aborted by AbortUpload",
            reason=Reason.UPLOAD_ABORTED,
        )

    def _check_writable(self) -> None:
        if self._background_error is not None:
            raise self._background_error
        if self.abort_requested.is_set():
            raise self._aborted_error()
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

    def _digest_at_prefix(self) -> ObjectDigest:
        if self._prefix == 0:
            return ObjectDigest()
        last = self._parts[self._prefix]
        return ObjectDigest(DigestState(last.object_crc32c, last.sha256_state))

    def _part_capacity(self) -> int:
        return self._plan.size_of(self._next_part)

    async def _reserve_part(self) -> None:
        size = self._part_capacity()
        if self._plan.expected_size is not None:
            size = min(size, self._plan.expected_size - self.received)
        await self._manager.budget.acquire(size)
        self._reserved = size

    def _release_reservation(self) -> None:
        if self._reserved:
            self._manager.budget.release(self._reserved)
            self._reserved = 0

    async def _take_buffered(self) -> tuple[bytes, int, DigestState]:
        chunks = list(self._chunks)
        body, part_crc = await asyncio.to_thread(self._digest.join_and_add, chunks)
        self._chunks.clear()
        self._buffered = 0
        return body, part_crc, self._digest.saved()

    async def _writer_for_upload(self) -> ObjectWriter:
        if self._writer is None:
            self._writer = await self._manager.writer_for_tenant(self.tenant_id)
        return self._writer

    async def _send_buffered_part(self) -> None:
        writer = await self._writer_for_upload()
        if not self._store_upload_id:
            self._store_upload_id = await writer.create_multipart_upload(self.spec)
            await self._manager.sessions.update(
                self.upload_id, time.time(), store_upload_id=self._store_upload_id
            )
        await self._slots.acquire()
        try:
            body, part_crc, digest_after = await self._take_buffered()
        except BaseException:
            self._slots.release()
            raise
        number = self._next_part
        self._next_part += 1
        reserved, self._reserved = self._reserved, 0  # the task owns the memory from here on
        task = asyncio.ensure_future(
            self._upload_part(writer, number, body, part_crc, digest_after, reserved)
        )
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _upload_part(
        self,
        writer: ObjectWriter,
        number: int,
        body: bytes,
        part_crc: int,
        digest_after: DigestState,
        reserved: int,
    ) -> None:
        started = time.monotonic()
        try:
            part = await writer.upload_part(
                self.spec.key, self._store_upload_id, number, body, part_crc
            )
            record = PartRecord(
                number=number,
                etag=part.etag,
                size=part.size,
                crc32c=part.crc32c,
                object_crc32c=digest_after.crc32c,
                sha256_state=digest_after.sha256_state,
            )
            self._parts[number] = record
            _, committed = self._extended_prefix()
            # Durable first, then reported: GetUploadStatus never shows uncommitted bytes.
            await self._manager.sessions.save_part(self.upload_id, record, committed, time.time())
            self._advance_prefix()
            self.updated_at = time.time()
            self._manager.metrics.parts_uploaded.inc()
            self._manager.metrics.bytes_committed.inc(part.size)
            self._manager.metrics.part_seconds.observe(time.monotonic() - started)
        except RecgwError as error:
            if self._background_error is None:
                self._background_error = error
        except Exception as exc:
            log.exception("part %d of upload %s failed", number, self.upload_id)
            if self._background_error is None:
                self._background_error = RecgwError(
                    ErrorKind.INTERNAL, f"writing part {number} failed ({type(exc).__name__})"
                )
        finally:
            self._manager.budget.release(reserved)
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
        if expected.sha256 and expected.sha256 != computed.sha256:
            raise RecgwError(
                ErrorKind.DATA_LOSS,
                "object SHA-256 mismatch between what the client sent and what the gateway "
                "received; the object was not created and the upload is still open (resume or "
                "abort it)",
                reason=Reason.OBJECT_CHECKSUM_MISMATCH,
            )

    async def _finish(self, expected: ObjectChecksums | None) -> UploadResult:
        started = time.monotonic()
        self.state = UploadState.FINISHING
        try:
            writer = await self._writer_for_upload()
            await self._manager.sessions.update(
                self.upload_id, time.time(), state=UploadState.FINISHING.value
            )
            if not self._store_upload_id:
                # Everything fits in one part: a single PutObject, no multipart upload at all.
                body, body_crc, _ = await self._take_buffered()
                computed = ObjectChecksums(self._digest.crc32c, self._digest.sha256())
                self._verify(expected, computed)
                written = await writer.put_object(self.spec, body, body_crc)
                self._release_reservation()
                self.committed = len(body)
                self._manager.metrics.bytes_committed.inc(len(body))
                self._manager.metrics.part_seconds.observe(time.monotonic() - started)
                part_count = 0
            else:
                if self._chunks:
                    await self._send_buffered_part()
                await asyncio.gather(*self._in_flight)
                if self._background_error is not None:
                    raise self._background_error
                computed = ObjectChecksums(self._digest.crc32c, self._digest.sha256())
                self._verify(expected, computed)
                parts = [
                    WrittenPart(p.number, p.etag, p.size, p.crc32c)
                    for p in sorted(self._parts.values(), key=lambda p: p.number)
                ]
                written = await writer.complete_multipart_upload(
                    self.spec, self._store_upload_id, parts, self._digest.crc32c
                )
                part_count = len(parts)
        except RecgwError as error:
            self.state = UploadState.OPEN
            await self._end_stream(error)
            raise
        except BaseException as exc:
            self.state = UploadState.OPEN
            await self._end_stream(
                RecgwError(ErrorKind.INTERNAL, f"finishing failed ({type(exc).__name__})")
            )
            raise
        self.result = self._result(writer, written, computed, part_count)
        self.state = UploadState.COMPLETE
        self.updated_at = time.time()
        await self._manager.sessions.update(
            self.upload_id,
            self.updated_at,
            state=UploadState.COMPLETE.value,
            committed_size=self.result.size,
            result=result_to_record(self.result),
        )
        self.attached = False
        self.terminal.set()
        self._manager.metrics.uploads_finished.labels("complete").inc()
        return self.result

    def _result(
        self,
        writer: ObjectWriter,
        written: WrittenObject,
        computed: ObjectChecksums,
        part_count: int,
    ) -> UploadResult:
        return UploadResult(
            upload_id=self.upload_id,
            bucket=writer.bucket,
            key=self.spec.key,
            size=self.received,
            etag=written.etag,
            version_id=written.version_id,
            part_count=part_count,
            checksums=computed,
        )

    async def _fail(self, error: RecgwError, final: UploadState) -> None:
        self.error_message = error.message
        self._chunks.clear()
        self._buffered = 0
        self._release_reservation()
        # Parts already on their way finish (their memory is in use until they do); then abort.
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._store_upload_id:
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
        await self._manager.sessions.update(
            self.upload_id,
            self.updated_at,
            state=final.value,
            error_message=error.message,
            abort_outcome=self.abort_outcome.value,
        )
        self.attached = False
        self._manager.metrics.uploads_finished.labels(final.value).inc()
        log.info("upload %s %s: %s", self.upload_id, final.value, error.message)
        self.terminal.set()


class UploadManager:
    """Opens, resumes, aborts and expires uploads; keeps recent ones in memory."""

    def __init__(
        self,
        credentials: CredentialsSource,
        store: ObjectStore,
        sessions: SessionStore,
        budget: MemoryBudget,
        metrics: GatewayMetrics,
        settings: PipelineSettings | None = None,
    ) -> None:
        self.credentials = credentials
        self.store = store
        self.sessions = sessions
        self.budget = budget
        self.metrics = metrics
        self.settings = settings or PipelineSettings()
        self._uploads: OrderedDict[str, Upload] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Upload | None]] = {}
        self._starting: set[str] = set()
        self._cleanups: set[asyncio.Task[None]] = set()

    async def _credentials(self, tenant_id: str) -> TenantCredentials:
        credentials = await self.credentials.get(tenant_id)
        if credentials is None:
            raise RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"tenant '{tenant_id}' has no S3 credentials; store them with SetCredentials first",
                reason=Reason.CREDENTIALS_NOT_FOUND,
            )
        return credentials

    async def writer_for_tenant(self, tenant_id: str) -> ObjectWriter:
        return await self.store.writer_for(await self._credentials(tenant_id))

    async def start(self, request: StartRequest) -> Upload:
        """Open a new upload, or attach to the existing one named by `request.upload_id`."""
        upload_id = _validate_start(request)
        existing = await self.find(upload_id)
        if upload_id in self._starting:
            raise RecgwError(
                ErrorKind.ABORTED,
                f"another stream is starting upload {upload_id}; retry",
                reason=Reason.ANOTHER_WRITER,
            )
        if existing is not None:
            if (existing.tenant_id, existing.record.object_name) != (
                request.tenant_id,
                request.object_name,
            ):
                raise RecgwError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"upload id {upload_id} belongs to another tenant or object name; resume "
                    "with the same tenant_id and object_name, or choose a new upload id",
                    reason=Reason.UPLOAD_ID_CONFLICT,
                )
            existing.attach()
            if existing.state is UploadState.OPEN:
                self.metrics.uploads_resumed.inc()
                log.info("upload %s resumed at byte %d", upload_id, existing.committed)
            return existing
        if upload_id in self._uploads or upload_id in self._starting:
            raise RecgwError(
                ErrorKind.ABORTED,
                f"another stream is starting upload {upload_id}; retry",
                reason=Reason.ANOTHER_WRITER,
            )
        self._starting.add(upload_id)
        try:
            upload = await self._open(upload_id, request)
        finally:
            self._starting.discard(upload_id)
        self.metrics.uploads_started.inc()
        log.info(
            "upload %s started: tenant=%s key=%s", upload_id, request.tenant_id, upload.spec.key
        )
        return upload

    async def _open(self, upload_id: str, request: StartRequest) -> Upload:
        credentials = await self._credentials(request.tenant_id)
        target = credentials.target
        key = build_object_key(target.prefix, request.object_name)
        plan = plan_parts(
            self.settings.part_size,
            request.expected_size,
            target.equal_part_sizes,
            self.settings.growth_interval,
        )
        writer = await self.store.writer_for(credentials)
        now = time.time()
        record = SessionRecord(
            upload_id=upload_id,
            tenant_id=request.tenant_id,
            object_name=request.object_name,
            key=key,
            bucket=target.bucket,
            content_type=request.content_type,
            metadata=dict(request.metadata),
            if_none_match=not target.allow_overwrite,
            expected_size=request.expected_size,
            credentials_version=credentials.version,
            part_base_size=plan.base_size,
            part_growing=plan.growing,
            growth_interval=plan.growth_interval,
            state=UploadState.OPEN.value,
            created_at=now,
            updated_at=now,
        )
        # Durable before the stream may write: a restart must find every upload it acknowledged.
        await self.sessions.create(record)
        upload = Upload(self, record, writer)
        upload.attach()
        self._remember(upload)
        return upload

    def _remember(self, upload: Upload) -> None:
        self._uploads[upload.upload_id] = upload
        self._uploads.move_to_end(upload.upload_id)
        # Forget idle uploads beyond the cache size; the session store still has them.
        while len(self._uploads) > self.settings.memory_cache_size:
            oldest_id, oldest = next(iter(self._uploads.items()))
            if oldest.attached or (oldest._fail_task is not None and not oldest.terminal.is_set()):
                self._uploads.move_to_end(oldest_id)
                break
            del self._uploads[oldest_id]

    async def find(self, upload_id: str) -> Upload | None:
        """The upload with this id, from memory or from the session store."""
        upload = self._uploads.get(upload_id)
        if upload is not None:
            return upload
        loading = self._loading.get(upload_id)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[Upload | None] = asyncio.get_running_loop().create_future()
        self._loading[upload_id] = future
        try:
            record = await self.sessions.get(upload_id)
            # A stream may have opened this upload while the record was being read: the object
            # in memory is the one that counts.
            upload = self._uploads.get(upload_id)
            if upload is None and record is not None:
                upload = Upload(self, record, None)
                self._remember(upload)
            future.set_result(upload)
            return upload
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it, nobody else should log it
            raise
        finally:
            del self._loading[upload_id]

    async def status(self, upload_id: str) -> UploadStatus:
        upload = await self.find(upload_id)
        if upload is None:
            raise RecgwError(
                ErrorKind.NOT_FOUND,
                f"no upload with id {quote_client(upload_id, 64)}",
                reason=Reason.UPLOAD_NOT_FOUND,
            )
        return upload.status()

    async def abort(self, upload_id: str) -> AbortReport:
        """Abort an upload that is not complete; report what is left in S3."""
        upload = await self.find(upload_id)
        if upload is None:
            raise RecgwError(
                ErrorKind.NOT_FOUND,
                f"no upload with id {quote_client(upload_id, 64)}",
                reason=Reason.UPLOAD_NOT_FOUND,
            )
        if upload.state is UploadState.FINISHING:
            raise RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"upload {upload_id} is already finishing and can no longer be aborted",
                reason=Reason.UPLOAD_FINISHING,
            )
        if upload.state is UploadState.OPEN:
            upload.abort_requested.set()
            # The stream that drives the upload (if any) notices at once and ends.
            await upload.fail(upload._aborted_error())
            await upload.terminal.wait()
        return _abort_report(upload)

    async def expire_idle(self, now: float | None = None) -> list[str]:
        """Expire open uploads idle longer than the idle timeout; returns their ids."""
        now = time.time() if now is None else now
        cutoff = now - self.settings.idle_timeout
        expired: list[str] = []
        for upload_id in await self.sessions.idle(
            (UploadState.OPEN.value, UploadState.FINISHING.value), cutoff
        ):
            upload = await self.find(upload_id)
            if upload is None or upload.attached or upload.updated_at >= cutoff:
                continue
            idle_hours = (now - upload.updated_at) / 3600
            await upload.fail(
                RecgwError(
                    ErrorKind.ABORTED,
                    f"expired after {idle_hours:.1f} h without data",
                ),
                final=UploadState.EXPIRED,
            )
            self.metrics.uploads_expired.inc()
            expired.append(upload_id)
        return expired

    def abandon(self, upload: Upload, error: RecgwError) -> None:
        """Handle a stream that is gone, in the background (its handler is being cancelled)."""
        task = asyncio.ensure_future(upload.stream_failed(error))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def close(self) -> None:
        """Detach every stream and wait for all clean-up (on shutdown).

        Open uploads stay open in the session store, to be resumed after the restart. Only
        after this may the object store's threads be shut down.
        """
        shutting_down = RecgwError(
            ErrorKind.UNAVAILABLE, "the gateway is shutting down", reason=Reason.SHUTTING_DOWN
        )
        while any(u.attached for u in self._uploads.values()) or self._cleanups:
            for upload in [u for u in self._uploads.values() if u.attached]:
                if upload.state is UploadState.OPEN:
                    self.abandon(upload, shutting_down)
                elif upload._finish_task is not None:
                    await asyncio.gather(upload._finish_task, return_exceptions=True)
                    upload.attached = False
            await asyncio.gather(*self._cleanups, return_exceptions=True)


def _abort_report(upload: Upload) -> AbortReport:
    if upload.state is UploadState.COMPLETE:
        return AbortReport(upload.state, False, "the upload had already completed; not aborted")
    if upload.abort_outcome is AbortOutcome.DENIED:
        detail = (
            "aborted; S3 denied AbortMultipartUpload (expected with a PutObject-only policy), "
            "so the incomplete multipart upload is left to the bucket's lifecycle rule"
        )
        return AbortReport(upload.state, False, detail)
    if upload.abort_outcome is AbortOutcome.FAILED:
        return AbortReport(
            upload.state, False, "aborted; AbortMultipartUpload failed, S3 may keep the parts"
        )
    return AbortReport(upload.state, True, "aborted; nothing of it is left in S3")
