"""The upload pipeline: from a stream of chunks to one object in the tenant's bucket.

It knows nothing of gRPC. A transport calls `UploadManager.start`, then `Upload.write` for each
chunk and `Upload.finish` at the end, or `Upload.fail` when the stream breaks. Receiving and
sending overlap: while one part is on its way to S3 the next one is being filled.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from awscrt import checksums as crt_checksums

from recgw_server.budget import MemoryBudget
from recgw_server.credentials import CredentialsSource
from recgw_server.domain import (
    ErrorKind,
    ObjectChecksums,
    RecgwError,
    UploadResult,
    build_object_key,
    invalid,
    validate_tenant_id,
)
from recgw_server.metrics import GatewayMetrics
from recgw_server.parts import MiB, PartPlan, plan_parts
from recgw_server.storage import (
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


def crc32c(data: bytes | memoryview, previous: int = 0) -> int:
    return int(crt_checksums.crc32c(data, previous))


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
    finished_retention: int = 10_000


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
class VerifyReport:
    ok: bool
    key: str
    error_code: str = ""
    error_message: str = ""


VERIFY_OBJECT_NAME = ".recgw-write-check"
VERIFY_BODY = b"recgw write check: this object is overwritten by every VerifyCredentials call\n"


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
        raise invalid("content_type must be a MIME type such as 'video/webm' (at most 255 chars)")
    size = 0
    for key, value in request.metadata.items():
        if not _METADATA_KEY.fullmatch(key):
            raise invalid(
                f"metadata key {key[:40]!r} is invalid: use lowercase letters, digits and '-'"
            )
        if any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
            raise invalid(f"metadata value of {key!r} must be printable ASCII")
        size += len(key) + len(value)
    if size > _MAX_METADATA_BYTES:
        raise invalid(f"metadata is {size} bytes; S3 allows at most {_MAX_METADATA_BYTES}")
    if not request.upload_id:
        return str(uuid.uuid4())
    try:
        parsed = uuid.UUID(request.upload_id)
    except ValueError:
        raise invalid("upload_id must be a UUID, or empty to let the gateway choose") from None
    if str(parsed) != request.upload_id.lower():
        raise invalid("upload_id must be a UUID in canonical form (8-4-4-4-12 hex digits)")
    return str(parsed)


class _Digest:
    """Running whole-object checksums; updated in a worker thread, one part at a time."""

    def __init__(self) -> None:
        self.crc32c = 0
        self.sha256 = hashlib.sha256()

    def join_and_add(self, chunks: list[bytes]) -> tuple[bytes, int]:
        """Join a part's chunks and fold them into the object checksums.

        Returns the part's bytes and its own CRC32C.
        """
        body = b"".join(chunks)
        part_crc = crc32c(body)
        self.crc32c = crc32c(body, self.crc32c)
        self.sha256.update(body)
        return body, part_crc


class Upload:
    """One upload in progress. Driven by exactly one stream at a time."""

    def __init__(
        self,
        manager: UploadManager,
        upload_id: str,
        tenant_id: str,
        spec: ObjectSpec,
        writer: ObjectWriter,
        plan: PartPlan,
    ) -> None:
        self.upload_id = upload_id
        self.tenant_id = tenant_id
        self.spec = spec
        self.state = UploadState.OPEN
        self.received = 0
        self.committed = 0
        self.result: UploadResult | None = None
        self.error_message = ""
        self.abort_outcome: AbortOutcome | None = None
        self.created_at = time.time()
        self.updated_at = self.created_at
        self.abort_requested = asyncio.Event()
        self.terminal = asyncio.Event()
        self._manager = manager
        self._writer = writer
        self._plan = plan
        self._digest = _Digest()
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._reserved = 0  # budget held by the part being filled
        self._part_number = 0  # parts handed to S3 so far
        self._store_upload_id = ""
        self._parts: list[WrittenPart] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(manager.settings.max_inflight_parts)
        self._background_error: RecgwError | None = None
        self._fail_task: asyncio.Task[None] | None = None
        self._finish_task: asyncio.Task[UploadResult] | None = None

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
                f"write_offset is {write_offset} but {self.received} bytes were received so far; "
                f"send the bytes from offset {self.received}",
            )
        if data_crc32c is not None and crc32c(data) != data_crc32c:
            raise RecgwError(
                ErrorKind.DATA_LOSS,
                f"data_crc32c does not match the {len(data)} bytes at offset {write_offset}; "
                "the chunk was corrupted in transit, send it again",
            )
        expected = self._plan.expected_size
        if expected is not None and self.received + len(data) > expected:
            raise RecgwError(
                ErrorKind.OUT_OF_RANGE,
                f"the upload declared expected_size {expected} but this message would bring it "
                f"to {self.received + len(data)} bytes",
            )
        capacity = self._plan.capacity()
        if self.received + len(data) > capacity:
            raise RecgwError(
                ErrorKind.OUT_OF_RANGE,
                f"the upload would exceed {capacity} bytes, the most this tenant's part plan "
                "fits in 10,000 S3 parts; declare expected_size for very large objects",
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
            )
        self.state = UploadState.FINISHING
        self._finish_task = asyncio.ensure_future(self._finish(expected))
        # Completing an object must not be interrupted halfway: shield it from cancellation of
        # the stream, so the outcome is either a whole object or none (GetUploadStatus tells).
        return await asyncio.shield(self._finish_task)

    async def fail(self, error: RecgwError) -> None:
        """End the upload without an object; safe to call more than once and concurrently."""
        if self.state in (UploadState.COMPLETE, UploadState.FINISHING):
            return
        if self._fail_task is None:
            self._fail_task = asyncio.ensure_future(self._fail(error))
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
        return RecgwError(ErrorKind.ABORTED, f"upload {self.upload_id} was aborted by AbortUpload")

    def _check_writable(self) -> None:
        if self._background_error is not None:
            raise self._background_error
        if self.abort_requested.is_set():
            raise self._aborted_error()
        if self._fail_task is not None:
            raise RecgwError(
                ErrorKind.ABORTED, f"upload {self.upload_id} has ended: {self.error_message}"
            )
        if self.state is not UploadState.OPEN:
            raise RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"upload {self.upload_id} is {self.state.value}; no more data is accepted",
            )

    def _part_capacity(self) -> int:
        return self._plan.size_of(self._part_number + 1)

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

    async def _take_buffered(self) -> tuple[bytes, int]:
        chunks = list(self._chunks)
        # Joining and hashing a whole part takes milliseconds: keep it off the event loop.
        body, part_crc = await asyncio.to_thread(self._digest.join_and_add, chunks)
        self._chunks.clear()
        self._buffered = 0
        return body, part_crc

    async def _send_buffered_part(self) -> None:
        if not self._store_upload_id:
            self._store_upload_id = await self._writer.create_multipart_upload(self.spec)
        await self._slots.acquire()
        try:
            body, part_crc = await self._take_buffered()
        except BaseException:
            self._slots.release()
            raise
        self._part_number += 1
        reserved, self._reserved = self._reserved, 0  # the task owns the memory from here on
        task = asyncio.ensure_future(self._upload_part(self._part_number, body, part_crc, reserved))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _upload_part(self, number: int, body: bytes, part_crc: int, reserved: int) -> None:
        started = time.monotonic()
        try:
            part = await self._writer.upload_part(
                self.spec.key, self._store_upload_id, number, body, part_crc
            )
            self._parts.append(part)
            self.committed += part.size
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

    def _verify(self, expected: ObjectChecksums | None) -> ObjectChecksums:
        computed = ObjectChecksums(self._digest.crc32c, self._digest.sha256.digest())
        if expected is None:
            return computed
        if expected.crc32c is not None and expected.crc32c != computed.crc32c:
            raise RecgwError(
                ErrorKind.DATA_LOSS,
                f"object CRC32C mismatch: the client sent {expected.crc32c:08x}, the gateway "
                f"received bytes with CRC32C {computed.crc32c:08x}; the object was not created",
            )
        if expected.sha256 and expected.sha256 != computed.sha256:
            raise RecgwError(
                ErrorKind.DATA_LOSS,
                "object SHA-256 mismatch between what the client sent and what the gateway "
                "received; the object was not created",
            )
        return computed

    async def _finish(self, expected: ObjectChecksums | None) -> UploadResult:
        started = time.monotonic()
        try:
            if not self._store_upload_id:
                # Everything fits in one part: a single PutObject, no multipart upload at all.
                body, body_crc = await self._take_buffered()
                computed = self._verify(expected)
                written = await self._writer.put_object(self.spec, body, body_crc)
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
                computed = self._verify(expected)
                parts = sorted(self._parts, key=lambda p: p.part_number)
                written = await self._writer.complete_multipart_upload(
                    self.spec, self._store_upload_id, parts
                )
                part_count = len(parts)
        except RecgwError as error:
            self.state = UploadState.OPEN  # let fail() run its clean-up
            await self.fail(error)
            raise
        except BaseException as exc:
            self.state = UploadState.OPEN
            await self.fail(
                RecgwError(ErrorKind.INTERNAL, f"finishing failed ({type(exc).__name__})")
            )
            raise
        self.result = self._result(written, computed, part_count)
        self.state = UploadState.COMPLETE
        self.updated_at = time.time()
        self._manager.metrics.uploads_finished.labels("complete").inc()
        self._manager.retire(self)
        return self.result

    def _result(
        self, written: WrittenObject, computed: ObjectChecksums, part_count: int
    ) -> UploadResult:
        return UploadResult(
            upload_id=self.upload_id,
            bucket=self._writer.bucket,
            key=self.spec.key,
            size=self.received,
            etag=written.etag,
            version_id=written.version_id,
            part_count=part_count,
            checksums=computed,
        )

    async def _fail(self, error: RecgwError) -> None:
        self.error_message = error.message
        self.updated_at = time.time()
        self._chunks.clear()
        self._buffered = 0
        self._release_reservation()
        # Parts already on their way finish (their memory is in use until they do); then abort.
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._store_upload_id:
            self.abort_outcome = await self._writer.abort_multipart_upload(
                self.spec.key, self._store_upload_id
            )
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
        self.state = UploadState.ABORTED
        self._manager.metrics.uploads_finished.labels("aborted").inc()
        log.info("upload %s aborted: %s", self.upload_id, error.message)
        self._manager.retire(self)


class UploadManager:
    """Starts uploads and keeps track of them (in memory, for this process)."""

    def __init__(
        self,
        credentials: CredentialsSource,
        store: ObjectStore,
        budget: MemoryBudget,
        metrics: GatewayMetrics,
        settings: PipelineSettings | None = None,
    ) -> None:
        self.credentials = credentials
        self.store = store
        self.budget = budget
        self.metrics = metrics
        self.settings = settings or PipelineSettings()
        self._active: dict[str, Upload] = {}
        self._finished: OrderedDict[str, Upload] = OrderedDict()
        self._cleanups: set[asyncio.Task[None]] = set()

    async def start(self, request: StartRequest) -> Upload:
        """Validate a start request, look up the tenant's credentials and open an upload."""
        upload_id = _validate_start(request)
        if upload_id in self._active or upload_id in self._finished:
            raise RecgwError(
                ErrorKind.ALREADY_EXISTS,
                f"upload id {upload_id} is already in use; choose a new upload id",
            )
        credentials = await self.credentials.get(request.tenant_id)
        if credentials is None:
            raise RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"tenant '{request.tenant_id}' has no S3 credentials; store them with "
                "SetCredentials first",
            )
        target = credentials.target
        key = build_object_key(target.prefix, request.object_name)
        plan = plan_parts(self.settings.part_size, request.expected_size, target.equal_part_sizes)
        writer = await self.store.writer_for(credentials)
        spec = ObjectSpec(
            key=key,
            content_type=request.content_type,
            metadata=dict(request.metadata),
            if_none_match=not target.allow_overwrite,
        )
        if upload_id in self._active:  # another stream took the id while we awaited
            raise RecgwError(ErrorKind.ALREADY_EXISTS, f"upload id {upload_id} is already in use")
        upload = Upload(self, upload_id, request.tenant_id, spec, writer, plan)
        self._active[upload_id] = upload
        self.metrics.uploads_started.inc()
        self.metrics.active_uploads.inc()
        log.info("upload %s started: tenant=%s key=%s", upload_id, request.tenant_id, key)
        return upload

    def retire(self, upload: Upload) -> None:
        if self._active.pop(upload.upload_id, None) is not None:
            self.metrics.active_uploads.dec()
        self._finished[upload.upload_id] = upload
        while len(self._finished) > self.settings.finished_retention:
            self._finished.popitem(last=False)
        upload.terminal.set()

    def find(self, upload_id: str) -> Upload | None:
        return self._active.get(upload_id) or self._finished.get(upload_id)

    def status(self, upload_id: str) -> UploadStatus:
        upload = self.find(upload_id)
        if upload is None:
            raise RecgwError(ErrorKind.NOT_FOUND, f"no upload with id '{upload_id[:64]}'")
        return upload.status()

    async def abort(self, upload_id: str) -> AbortReport:
        """Abort an upload that is still receiving data; report what is left in S3."""
        upload = self.find(upload_id)
        if upload is None:
            raise RecgwError(ErrorKind.NOT_FOUND, f"no upload with id '{upload_id[:64]}'")
        if upload.state is UploadState.FINISHING:
            raise RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"upload {upload_id} is already finishing and can no longer be aborted",
            )
        if upload.state is UploadState.OPEN:
            upload.abort_requested.set()
            # The stream that drives the upload notices at once and runs the clean-up; fail()
            # here as well in case that stream is gone.
            await upload.fail(upload._aborted_error())
            await upload.terminal.wait()
        return _abort_report(upload)

    async def verify_write(self, tenant_id: str) -> VerifyReport:
        """Prove the stored credentials can write, with one PutObject at a fixed key.

        The key is the same every time and the write is unconditional, so nothing accumulates;
        PutObject is all the seed's least-privilege policy needs to allow.
        """
        validate_tenant_id(tenant_id)
        credentials = await self.credentials.get(tenant_id)
        if credentials is None:
            raise RecgwError(
                ErrorKind.NOT_FOUND, f"tenant '{tenant_id}' has no S3 credentials to verify"
            )
        key = credentials.target.prefix + VERIFY_OBJECT_NAME
        spec = ObjectSpec(key, "text/plain", {}, if_none_match=False)
        try:
            writer = await self.store.writer_for(credentials)
            await writer.put_object(spec, VERIFY_BODY, crc32c(VERIFY_BODY))
        except RecgwError as error:
            if error.kind is ErrorKind.INTERNAL:
                raise
            return VerifyReport(False, key, error.store_code or error.kind.value, error.message)
        return VerifyReport(True, key)

    def abandon(self, upload: Upload, error: RecgwError) -> None:
        """Fail an upload whose stream is gone, in the background (the caller is cancelled)."""
        task = asyncio.ensure_future(upload.fail(error))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def close(self) -> None:
        """Abort every upload still open and wait for every clean-up (on shutdown).

        Only after this may the object store's threads be shut down.
        """
        shutting_down = RecgwError(ErrorKind.UNAVAILABLE, "the gateway is shutting down")
        while self._active or self._cleanups:
            for upload in list(self._active.values()):
                self.abandon(upload, shutting_down)
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
