"""The upload manager: opens, resumes, aborts, expires and verifies uploads."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from recgw_server.credentials.base import CredentialsSource
from recgw_server.domain import (
    ErrorKind,
    Reason,
    RecgwError,
    TenantCredentials,
    build_object_key,
)
from recgw_server.events.model import CREDENTIALS_FAILING, Event
from recgw_server.events.webhooks import EventRouter, WebhookSettings
from recgw_server.metrics import GatewayMetrics
from recgw_server.pipeline.budget import MemoryBudget
from recgw_server.pipeline.buffers import Spool
from recgw_server.pipeline.heap import BudgetGovernor, HeapTrimmer
from recgw_server.pipeline.model import (
    DONE_STATES,
    ENDED_STATES,
    AbortReport,
    PipelineSettings,
    SalvageReport,
    StartRequest,
    UploadState,
    UploadStatus,
    upload_not_found,
    validate_start,
)
from recgw_server.pipeline.parts import plan_parts
from recgw_server.pipeline.uploads import Upload
from recgw_server.sessions.base import AlreadyCreated, Lease, SessionRecord, SessionStore
from recgw_server.storage.base import AbortOutcome, ObjectStore, ObjectWriter

log = logging.getLogger(__name__)
# RSS above start-up plus the memory budget in use that makes the spiller trim the heap.
HEAP_SLACK = 48 * 1024 * 1024
# States no replica ever changes again.
FINAL_STATES = ENDED_STATES | {UploadState.COMPLETE}

# At most this much of the shutdown grace is kept for detaching the streams still mid-part.
_DETACH_RESERVE = 2.0


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
        spool: Spool | None = None,
        events: EventRouter | None = None,
    ) -> None:
        self.credentials = credentials
        self.store = store
        self.sessions = sessions
        self.budget = budget
        self.spool = spool or Spool(Path(tempfile.mkdtemp(prefix="recgw-spool-")), 16 << 30)
        self.events = events or EventRouter(WebhookSettings())
        self.on_events: Callable[[], None] = lambda: None
        self._failing_tenants: set[str] = set()
        self.metrics = metrics
        self.settings = settings or PipelineSettings()
        self._uploads: OrderedDict[str, Upload] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Upload | None]] = {}
        self._starting: set[str] = set()
        self._cleanups: set[asyncio.Task[None]] = set()
        # Shutting down: no new streams; running ones end at their next part boundary.
        self.draining = False
        # Until then (time.monotonic()) every lease held here is surely alive: the replica's
        # heartbeat is recent. None: no heartbeat runs (a manager without a gateway).
        self._leases_alive_until: float | None = None

    async def _credentials(self, tenant_id: str) -> TenantCredentials:
        credentials = await self.credentials.get(tenant_id)
        if credentials is None:
            raise RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"tenant '{tenant_id}' has no S3 credentials; store them with SetCredentials first",
                reason=Reason.CREDENTIALS_NOT_FOUND,
            )
        return credentials

    def outbox_for(self, event: Event) -> Sequence[tuple[str, Event]]:
        """The deliveries of an event, to be written with the state change it reports."""
        return self.events.deliveries(event)

    async def credentials_failing(self, tenant_id: str, error: RecgwError) -> None:
        """Tell the tenant's backend once that S3 refuses its credentials (until they change)."""
        if tenant_id in self._failing_tenants:
            return
        self._failing_tenants.add(tenant_id)
        event = Event(
            CREDENTIALS_FAILING,
            tenant_id,
            {
                "reason": error.reason.value,
                "store_code": error.store_code,
                "message": error.message,
            },
        )
        deliveries = self.outbox_for(event)
        if deliveries:
            await self.sessions.enqueue(deliveries)
            self.on_events()

    def credentials_changed(self, tenant_id: str) -> None:
        self._failing_tenants.discard(tenant_id)

    async def salvages(self, tenant_id: str) -> bool:
        """Whether the tenant's abandoned-upload policy is `salvage`."""
        try:
            credentials = await self.credentials.get(tenant_id)
        except RecgwError:
            return False
        return credentials is not None and credentials.target.abandoned_uploads == "salvage"

    async def salvage(self, upload_id: str) -> SalvageReport:
        """Keep what an open upload has committed as its object (SalvageUpload)."""
        upload = await self._existing(upload_id)
        if upload.state is UploadState.OPEN and not upload.attached:
            upload = await self._lease_for_control(upload, force=False)
        result = await upload.salvage("salvaged on request (SalvageUpload)")
        return SalvageReport(upload.state, result)

    async def writer_for_tenant(self, tenant_id: str) -> ObjectWriter:
        return await self.store.writer_for(await self._credentials(tenant_id))

    async def start(
        self, request: StartRequest, stream: asyncio.Task[object] | None = None
    ) -> Upload:
        """Open a new upload, or attach to the existing one named by `request.upload_id`.

        `stream` is the task that drives the upload; a takeover or AbortUpload cancels it.
        """
        upload_id = validate_start(request)
        if self.draining:
            raise RecgwError(
                ErrorKind.UNAVAILABLE,
                "this gateway replica is shutting down and takes no new streams; retry on "
                "another replica (or after the restart)",
                reason=Reason.SHUTTING_DOWN,
            )
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
            if existing.committed == 0 and not existing.attached:
                existing.adopt_sha256(self._wants_sha256(request))
            await existing.attach(stream)
            if existing.attached:
                existing = await self._attach_lease(existing, stream)
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
            upload = await self._open(upload_id, request, stream)
        finally:
            self._starting.discard(upload_id)
        self.metrics.uploads_started.inc()
        log.info(
            "upload %s started: tenant=%s key=%s", upload_id, request.tenant_id, upload.spec.key
        )
        return upload

    def _wants_sha256(self, request: StartRequest) -> bool:
        return request.compute_sha256 or self.settings.sha256 == "always"

    async def _open(
        self, upload_id: str, request: StartRequest, stream: asyncio.Task[object] | None
    ) -> Upload:
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
            compute_sha256=self._wants_sha256(request),
        )
        # Durable before the stream may write: a restart must find every upload it acknowledged.
        try:
            lease = await self.sessions.create(record, self.settings.replica_id)
        except AlreadyCreated:
            raise RecgwError(
                ErrorKind.ABORTED,
                f"another stream, on another gateway replica, is starting upload {upload_id}; "
                "retry (the retry resumes it)",
                reason=Reason.ANOTHER_WRITER,
                details={"upload_id": upload_id},
            ) from None
        upload = Upload(self, record, writer)
        upload.lease = lease
        await upload.attach(stream)
        self._remember(upload)
        return upload

    async def _attach_lease(self, upload: Upload, stream: asyncio.Task[object] | None) -> Upload:
        """Take the writer lease for a stream attached to `upload`; returns the current copy."""
        try:
            lease = await self.sessions.attach(
                upload.upload_id, self.settings.replica_id, self.settings.lease_seconds
            )
            if lease is None:
                await self.sessions.request_release(upload.upload_id)
                raise RecgwError(
                    ErrorKind.ABORTED,
                    f"another gateway replica is writing upload {upload.upload_id}; it was asked "
                    "to let go: retry in a few seconds (a silent stream is released after "
                    f"{self.settings.takeover_after:g} s, a dead or frozen replica loses its "
                    f"uploads after {self.settings.lease_seconds:g} s)",
                    reason=Reason.ANOTHER_WRITER,
                    details={"upload_id": upload.upload_id},
                )
            current = await self._leased(upload, lease)
        except BaseException:
            upload.attached = False
            upload.release_stream()
            raise
        if current is not upload:
            upload.attached = False
            upload.release_stream()
            try:
                await current.attach(stream)
            except BaseException:
                await self.sessions.release(lease)
                raise
            if not current.attached:  # it completed elsewhere meanwhile
                await self.sessions.release(lease)
        return current

    async def _leased(self, upload: Upload, lease: Lease) -> Upload:
        """The copy of `upload` to write under the new `lease`.

        The copy in memory is current only if it held the previous lease itself; otherwise
        another replica may have written since, and a fresh copy is read from the store.
        """
        if upload.lease is not None and lease.generation == upload.lease.generation + 1:
            upload.lease = lease
            return upload
        record = await self.sessions.get(upload.upload_id)
        assert record is not None, "sessions are never deleted"
        current = Upload(self, record, None)
        current.lease = lease
        if self._uploads.get(upload.upload_id) is upload:
            self._uploads[upload.upload_id] = current
        return current

    async def _lease_for_control(self, upload: Upload, force: bool) -> Upload:
        """The lease for AbortUpload or SalvageUpload on an upload no stream here writes."""
        lease = await self.sessions.attach(
            upload.upload_id, self.settings.replica_id, self.settings.lease_seconds
        )
        if lease is None:
            record = await self.sessions.get(upload.upload_id)
            if not force or (record is not None and record.state == UploadState.FINISHING.value):
                raise RecgwError(
                    ErrorKind.ABORTED if not force else ErrorKind.FAILED_PRECONDITION,
                    f"upload {upload.upload_id} is being written or finished by another "
                    "gateway replica; retry later",
                    reason=Reason.ANOTHER_WRITER if not force else Reason.UPLOAD_FINISHING,
                )
            lease = await self.sessions.attach(
                upload.upload_id, self.settings.replica_id, self.settings.lease_seconds, True
            )
            assert lease is not None
        current = await self._leased(upload, lease)
        if current.state is not UploadState.OPEN:
            await self.sessions.release(lease)
        return current

    def heartbeat_sent(self, sent_at: float) -> None:
        """The replica heartbeat sent at `sent_at` (time.monotonic()) is durable: the leases
        held here live at least `lease_seconds` from then (half of it, to be safe)."""
        self._leases_alive_until = sent_at + self.settings.lease_seconds / 2

    def leases_surely_alive(self) -> bool:
        """False when this replica's heartbeat may have lapsed (it was frozen, or the store
        could not be reached): another replica may have taken its uploads over."""
        alive_until = self._leases_alive_until
        return alive_until is None or time.monotonic() < alive_until

    async def check_leases(self) -> None:
        """After a gap in the heartbeat: end at once every stream here whose upload another
        replica took over (WRITER_FENCED), without waiting for its next part."""
        for upload in [u for u in self._streaming() if not u.ending()]:
            try:
                await upload.check_lease()
            except RecgwError as error:
                upload.interrupt(error, unless_active=1.0)  # as AbortUpload does

    def forget(self, upload: Upload) -> None:
        """Drop a stale copy from memory; the next lookup reads the session store."""
        if self._uploads.get(upload.upload_id) is upload:
            del self._uploads[upload.upload_id]

    async def answer_release_requests(self) -> None:
        """Release leases other replicas asked for: of uploads no stream here is writing, and of
        streams silent for longer than the takeover time (the takeover rule across replicas)."""
        for upload_id in await self.sessions.release_requested(self.settings.replica_id):
            upload = self._uploads.get(upload_id)
            if upload is None or upload.lease is None or upload._fail_task is not None:
                continue
            if upload.attached:
                upload.take_over_if_silent()
            else:
                await self.sessions.release(upload.lease)

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

    async def _existing(self, upload_id: str) -> Upload:
        """The upload with this id, or NOT_FOUND."""
        upload = await self.find(upload_id)
        if upload is None:
            raise upload_not_found(upload_id)
        return upload

    async def status(self, upload_id: str) -> UploadStatus:
        """The upload's status; the store's, unless a stream here writes it.

        Another replica may have written the upload since this one cached it, so a copy that
        no stream here writes is read again (the store is the truth, memory only a cache).
        """
        upload = await self._existing(upload_id)
        if upload.busy or upload.state in FINAL_STATES:
            return upload.status()
        record = await self.sessions.get(upload_id)
        if record is None or upload.matches(record):
            return upload.status()
        fresh = Upload(self, record, None)
        # No await since the checks below: a stream cannot have attached the old copy since.
        if self._uploads.get(upload_id) is upload and not upload.busy:
            self._uploads[upload_id] = fresh
        return fresh.status()

    async def abort(self, upload_id: str) -> AbortReport:
        """Abort an upload that is not complete; report what is left in S3."""
        upload = await self._existing(upload_id)
        if upload.state is UploadState.FINISHING:
            raise RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"upload {upload_id} is already finishing and can no longer be aborted",
                reason=Reason.UPLOAD_FINISHING,
            )
        if upload.state is UploadState.OPEN and not upload.attached:
            # AbortUpload wins over a stream on another replica, unless that one is finishing.
            upload = await self._lease_for_control(upload, force=True)
        if upload.state is UploadState.OPEN:
            upload.abort_requested.set()
            error = upload.aborted_error()
            # The stream that drives the upload (if any) ends at once.
            upload.interrupt(error, unless_active=1.0)
            await upload.fail(error)
            await upload.terminal.wait()
        return _abort_report(upload)

    async def expire_idle(self, now: float | None = None) -> list[str]:
        """End open uploads idle longer than the idle timeout; returns their ids.

        Each is expired, salvaged (the tenant's policy) or, if its completion may have reached
        S3, completed again. Every replica runs this; a claim takes the lease, so no upload is
        handled twice.
        """
        now = time.time() if now is None else now
        cutoff = now - self.settings.idle_timeout
        ended: list[str] = []
        batch = 100
        more = True
        while more:
            leases = await self.sessions.claim_idle(
                (UploadState.OPEN.value, UploadState.FINISHING.value),
                cutoff,
                self.settings.replica_id,
                self.settings.lease_seconds,
                batch,
            )
            done = [lease.upload_id for lease in leases if await self._expire(lease, now, cutoff)]
            ended += done
            more = len(leases) == batch and bool(done)  # uploads kept come back in every claim
        return ended

    async def _expire(self, lease: Lease, now: float, cutoff: float) -> bool:
        """End a claimed idle upload unless it became busy; True when it ended."""
        found = await self.find(lease.upload_id)
        upload = None if found is None or found.attached else await self._leased(found, lease)
        if upload is None or upload.updated_at >= cutoff or upload.state is not UploadState.OPEN:
            await self.sessions.release(lease)
            return False
        why = f"expired after {(now - upload.updated_at) / 3600:.1f} h without data"
        try:
            if upload.completion_sent:
                # Its completion may have reached S3: never abort it, ask S3 again.
                await upload.complete_again()
            elif (upload.committed or upload.tail) and await self.salvages(upload.tenant_id):
                await upload.salvage(why)
            else:
                await upload.fail(RecgwError(ErrorKind.ABORTED, why), final=UploadState.EXPIRED)
                self.metrics.uploads_expired.inc()
        except RecgwError as error:
            log.warning("upload %s could not be ended: %s", lease.upload_id, error.message)
            await self.sessions.release(lease)
            return False
        return True

    async def spill_slow_parts(self) -> None:
        """Move parts that have been filling for too long to disk (run every second or so)."""
        now = time.monotonic()
        self.budget.reclaim_idle(now, self.settings.spill_after)
        for upload in self._streaming():
            await upload.spill_if_slow(now)

    async def run_spiller(self) -> None:
        """Until cancelled, every 0.1 s at most: lower the budget's limit by what RSS holds
        beyond the buffers, spill slow parts, and give freed heap back to the OS."""
        interval = min(0.1, max(0.05, self.settings.spill_after / 4))
        heap = HeapTrimmer(HEAP_SLACK)
        governor = BudgetGovernor(self.budget, HEAP_SLACK)
        trimming: asyncio.Future[None] | None = None
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    self.metrics.memory_limit_bytes.set(governor.update())
                    await self.spill_slow_parts()
                    # Not awaited: a trim of a large heap took up to 0.1 s (500 streams), and
                    # the limit must follow RSS meanwhile. One trim at a time.
                    if (trimming is None or trimming.done()) and heap.due(self.budget.capacity):
                        trimming = asyncio.ensure_future(asyncio.to_thread(heap.trim))
                except Exception:
                    log.exception("spilling slow parts failed; trying again")
        finally:
            if trimming is not None:  # a thread cannot be cancelled: let it end first
                await asyncio.gather(trimming, return_exceptions=True)

    def abandon(self, upload: Upload, error: RecgwError) -> None:
        """Handle a stream that is gone, in the background (its handler is being cancelled)."""
        task = asyncio.ensure_future(upload.stream_failed(error))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def shutting_down(self, upload: Upload) -> RecgwError:
        """The error that ends a stream because this replica shuts down, with where to resume."""
        return RecgwError(
            ErrorKind.UNAVAILABLE,
            f"the gateway replica is shutting down; resume upload {upload.upload_id} from its "
            f"committed size {upload.committed} on another replica (or after the restart)",
            reason=Reason.SHUTTING_DOWN,
            details={"upload_id": upload.upload_id, "committed_size": str(upload.committed)},
        )

    def _streaming(self) -> list[Upload]:
        return [u for u in self._uploads.values() if u.attached]

    async def drain(self, grace: float) -> None:
        """Shutdown: take no new streams and end the running ones within `grace` seconds.

        A stream that reaches a part boundary ends there once that part is committed, one that
        finishes meanwhile finishes; the rest are ended with SHUTTING_DOWN when the grace is
        nearly over, detached (uncommitted bytes dropped), their leases released, so that
        another replica can resume them at once.
        """
        self.draining = True
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        # The last part of the grace is for detaching: waiting for parts in flight, answering.
        reserve = min(_DETACH_RESERVE, grace / 4)
        await _wait_for_streams(self._streaming(), end - reserve - loop.time())
        left = [u for u in self._streaming() if u.state is UploadState.OPEN]
        if left:
            log.info("shutting down: detaching %d streams still mid-part", len(left))
        for upload in left:
            upload.interrupt(self.shutting_down(upload), unless_active=reserve / 2)
        await _wait_for_streams(left, end - loop.time())

    async def close(self) -> None:
        """Detach every stream and wait for all clean-up (on shutdown).

        Open uploads stay open in the session store, to be resumed after the restart. Only
        after this may the object store's threads be shut down.
        """
        self.draining = True
        while any(u.attached for u in self._uploads.values()) or self._cleanups:
            for upload in self._streaming():
                if upload.state is UploadState.OPEN:
                    self.abandon(upload, self.shutting_down(upload))
                elif upload._finish_task is not None:
                    await asyncio.gather(upload._finish_task, return_exceptions=True)
                    upload.attached = False
            await asyncio.gather(*self._cleanups, return_exceptions=True)


async def _wait_for_streams(uploads: list[Upload], seconds: float) -> None:
    """Wait until the streams writing `uploads` have ended, for at most `seconds`."""
    tasks = {u.stream_task for u in uploads if u.stream_task is not None}
    if tasks and seconds > 0:
        await asyncio.wait(tasks, timeout=seconds)


def _abort_report(upload: Upload) -> AbortReport:
    if upload.state in DONE_STATES:
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
