"""The thin gRPC layer: turns messages into pipeline calls and errors into status codes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf import timestamp_pb2
from recgw.v1 import credentials_pb2, credentials_pb2_grpc, upload_pb2, upload_pb2_grpc

from recgw_server.api.errors import STATUS_CODES, Context, abort_with
from recgw_server.api.limits import TenantSlot, TenantUploadLimits
from recgw_server.api.wire import UploadMessage
from recgw_server.audit import AuditLog
from recgw_server.auth.guard import current_caller
from recgw_server.credentials.base import CredentialsAdmin, CredentialsSource
from recgw_server.domain import (
    TENANT_ID_PATTERN,
    CredentialsInfo,
    EncryptionMode,
    ErrorKind,
    ObjectChecksums,
    Reason,
    RecgwError,
    Secret,
    StorageTarget,
    UploadResult,
    invalid,
    mask_access_key_id,
    validate_tenant_id,
)
from recgw_server.metrics import GatewayMetrics
from recgw_server.pipeline.budget import Reservation
from recgw_server.pipeline.manager import UploadManager
from recgw_server.pipeline.model import (
    DONE_STATES,
    StartRequest,
    UploadState,
    UploadStatus,
    upload_not_found,
)
from recgw_server.pipeline.uploads import Upload as ActiveUpload
from recgw_server.storage.doctor import CheckResult, DoctorReport, SetupDoctor

log = logging.getLogger(__name__)

UPLOAD_ID_HEADER = "x-recgw-upload-id"
UPLOAD_METHOD = "/recgw.v1.UploadService/Upload"
_M = TypeVar("_M")
# Memory reserved for a stream's first data message, before its size is known (clients send
# 1 MiB messages by default); later reads reserve the size of the message before.
FIRST_READ_ESTIMATE = 1024 * 1024
# A message being read costs about twice its size for a moment: gRPC assembles it in slices,
# then copies it into the bytes the pipeline keeps. Measured: 1.4-2 MiB of RSS per pending
# read of a 1 MiB message.
READ_RESERVE_FACTOR = 2
FIRST_READ_RESERVATION = FIRST_READ_ESTIMATE * READ_RESERVE_FACTOR


async def _read_reserved(messages: AsyncIterator[_M], reservation: Reservation) -> _M | None:
    """The next message (None at the end), read while `reservation` counts as a pending
    read, which the budget reclaims from a client that stays silent."""
    reservation.reading()
    try:
        return await anext(messages, None)
    finally:
        reservation.read_done()


_STATES = {
    UploadState.OPEN: upload_pb2.UPLOAD_STATE_OPEN,
    UploadState.FINISHING: upload_pb2.UPLOAD_STATE_FINISHING,
    UploadState.COMPLETE: upload_pb2.UPLOAD_STATE_COMPLETE,
    UploadState.ABORTED: upload_pb2.UPLOAD_STATE_ABORTED,
    UploadState.EXPIRED: upload_pb2.UPLOAD_STATE_EXPIRED,
    UploadState.COMPLETION_UNCONFIRMED: upload_pb2.UPLOAD_STATE_COMPLETION_UNCONFIRMED,
    UploadState.SALVAGED: upload_pb2.UPLOAD_STATE_SALVAGED,
}
_ENCRYPTION_TO_PROTO = {
    EncryptionMode.NONE: credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_UNSPECIFIED,
    EncryptionMode.S3: credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_S3,
    EncryptionMode.KMS: credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_KMS,
}
_ENCRYPTION_FROM_PROTO = {v: k for k, v in _ENCRYPTION_TO_PROTO.items()}
_ABANDONED_FROM_PROTO = {
    credentials_pb2.ABANDONED_UPLOAD_POLICY_UNSPECIFIED: "abort",
    credentials_pb2.ABANDONED_UPLOAD_POLICY_ABORT: "abort",
    credentials_pb2.ABANDONED_UPLOAD_POLICY_SALVAGE: "salvage",
}
_ABANDONED_TO_PROTO = {
    "abort": credentials_pb2.ABANDONED_UPLOAD_POLICY_ABORT,
    "salvage": credentials_pb2.ABANDONED_UPLOAD_POLICY_SALVAGE,
}
_CHECK_RESULTS = {
    CheckResult.PASSED: credentials_pb2.CREDENTIALS_CHECK_RESULT_PASSED,
    CheckResult.FAILED: credentials_pb2.CREDENTIALS_CHECK_RESULT_FAILED,
    CheckResult.SKIPPED: credentials_pb2.CREDENTIALS_CHECK_RESULT_SKIPPED,
}


def out_of_order(message: str) -> RecgwError:
    return RecgwError(ErrorKind.INVALID_ARGUMENT, message, reason=Reason.STREAM_OUT_OF_ORDER)


def _timestamp(seconds: float | datetime | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    if isinstance(seconds, datetime):
        stamp.FromDatetime(seconds.astimezone(UTC))
    else:
        stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _checksums_to_proto(checksums: ObjectChecksums) -> upload_pb2.ObjectChecksums:
    message = upload_pb2.ObjectChecksums(sha256=checksums.sha256 or b"")
    if checksums.crc32c is not None:
        message.crc32c = checksums.crc32c
    return message


def _result_to_proto(result: UploadResult) -> upload_pb2.UploadResponse:
    return upload_pb2.UploadResponse(
        upload_id=result.upload_id,
        bucket=result.bucket,
        key=result.key,
        size=result.size,
        etag=result.etag,
        version_id=result.version_id,
        part_count=result.part_count,
        checksums=_checksums_to_proto(result.checksums),
        unconfirmed=result.unconfirmed,
    )


def _status_to_proto(status: UploadStatus) -> upload_pb2.GetUploadStatusResponse:
    return upload_pb2.GetUploadStatusResponse(
        upload_id=status.upload_id,
        state=_STATES[status.state],
        committed_size=status.committed_size,
        received_size=status.received_size,
        tenant_id=status.tenant_id,
        key=status.key,
        result=_result_to_proto(status.result) if status.result else None,
        error_message=status.error_message,
        create_time=_timestamp(status.created_at),
        update_time=_timestamp(status.updated_at),
    )


def _start_request(start: upload_pb2.UploadStart) -> StartRequest:
    return StartRequest(
        tenant_id=start.tenant_id,
        object_name=start.object_name,
        content_type=start.content_type,
        metadata=dict(start.metadata),
        expected_size=start.expected_size if start.HasField("expected_size") else None,
        upload_id=start.upload_id,
        compute_sha256=start.compute_sha256,
    )


def _expected_checksums(message: upload_pb2.UploadRequest) -> ObjectChecksums | None:
    if not message.HasField("object_checksums"):
        return None
    sums = message.object_checksums
    if sums.sha256 and len(sums.sha256) != 32:
        raise invalid(
            "object_checksums.sha256 must be the 32-byte SHA-256 digest", "object_checksums.sha256"
        )
    return ObjectChecksums(
        crc32c=sums.crc32c if sums.HasField("crc32c") else None, sha256=sums.sha256 or None
    )


class UploadService(upload_pb2_grpc.UploadServiceServicer):
    """recgw.v1.UploadService over an UploadManager."""

    def __init__(
        self,
        manager: UploadManager,
        metrics: GatewayMetrics,
        tenant_limits: TenantUploadLimits | None = None,
    ) -> None:
        self._manager = manager
        self._metrics = metrics
        self._tenant_limits = tenant_limits or TenantUploadLimits(lambda tenant_id: 0)

    async def _visible_upload(self, upload_id: str) -> ActiveUpload:
        """The upload, if the caller may act for its tenant; NOT_FOUND alike for both cases."""
        upload = await self._manager.find(upload_id)
        if upload is None or not current_caller().may_act_for(upload.tenant_id):
            raise upload_not_found(upload_id)
        return upload

    async def Upload(
        self,
        request_iterator: AsyncIterator[upload_pb2.UploadRequest | UploadMessage],
        context: Context,
    ) -> upload_pb2.UploadResponse:
        """Messages come as UploadMessages (see api/wire.py) through the gateway's interceptor,
        as UploadRequests otherwise."""
        upload: ActiveUpload | None = None
        slot: TenantSlot | None = None
        log.debug("upload stream opened by %s", context.peer())
        messages = request_iterator
        # The first message is read into reserved memory too, before anyone knows its tenant.
        reservation = Reservation(self._manager.budget, "")
        try:
            await reservation.ensure(FIRST_READ_RESERVATION)
            opening = await _read_reserved(messages, reservation)
            if opening is None:
                raise out_of_order("the stream ended without a start message; send 'start' first")
            received = UploadMessage.of(opening)
            first = received.request
            if not first.HasField("start"):
                raise out_of_order(
                    "the first message must carry 'start' (tenant_id, object_name, ...); "
                    "data came before start"
                )
            tenant_id = validate_tenant_id(first.start.tenant_id)
            current_caller().require_tenant(tenant_id)
            reservation.assign(tenant_id)
            slot = self._tenant_limits.acquire(tenant_id)
            stream = asyncio.current_task()
            upload = await self._manager.start(_start_request(first.start), stream)
            await context.send_initial_metadata(((UPLOAD_ID_HEADER, upload.upload_id),))
            if upload.state in DONE_STATES:
                reservation.close()
                result = await self._repeat_finish(upload, received, messages)
            else:
                # No frame here keeps the first message's bytes while the stream runs.
                held = [received]
                del opening, received, first
                result = await self._receive(upload, held.pop(), messages, reservation)
            return _result_to_proto(result)
        except RecgwError as error:
            if upload is not None:
                await upload.stream_failed(error)
                error = self._after_detach(upload, error)
            await abort_with(context, self._metrics, error)
        except asyncio.CancelledError:
            interruption = upload.interruption() if upload is not None else None
            if upload is None or interruption is None:
                if upload is not None:
                    # The stream is gone; clean up in the background, the upload stays resumable.
                    reason = RecgwError(ErrorKind.CANCELLED, "the stream was cancelled")
                    self._manager.abandon(upload, reason)
                raise
            # Taken over by a newer stream, aborted, or shutting down: end with that reason.
            await upload.stream_failed(interruption)
            await abort_with(context, self._metrics, self._after_detach(upload, interruption))
        except Exception as exc:
            # Includes transport failures while reading (for example a message over the size
            # limit): uncommitted bytes are dropped, the upload stays resumable.
            if upload is not None:
                await upload.stream_failed(
                    RecgwError(ErrorKind.UNAVAILABLE, f"the stream failed ({type(exc).__name__})")
                )
            raise
        finally:
            reservation.close()
            if slot is not None:
                slot.release()

    def _after_detach(self, upload: ActiveUpload, error: RecgwError) -> RecgwError:
        """A shutdown's error names the committed size once the parts in flight have landed."""
        if error.reason is Reason.SHUTTING_DOWN and upload.state is UploadState.OPEN:
            return self._manager.shutting_down(upload)
        return error

    async def _repeat_finish(
        self,
        upload: ActiveUpload,
        received: UploadMessage,
        request_iterator: AsyncIterator[upload_pb2.UploadRequest | UploadMessage],
    ) -> UploadResult:
        """Finishing is idempotent: a repeated finish of a complete upload gets the same answer."""
        first = received.request
        if not first.finish_write or len(received.data):
            raise RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"upload {upload.upload_id} is already complete; only a repeated finish_write "
                "(without data) is accepted",
                reason=Reason.UPLOAD_COMPLETE,
            )
        if await anext(request_iterator, None) is not None:
            raise out_of_order("a message followed finish_write; finish_write must come last")
        return upload.finished_result(first.write_offset, _expected_checksums(first))

    async def _receive(
        self,
        upload: ActiveUpload,
        received: UploadMessage,
        request_iterator: AsyncIterator[upload_pb2.UploadRequest | UploadMessage],
        reservation: Reservation,
    ) -> UploadResult:
        """Memory for each message is reserved before it is read (see budget.Reservation),
        estimated as the size of the message before; no local keeps a message's bytes while
        the next reservation or read waits."""
        first = True
        estimate = FIRST_READ_ESTIMATE
        while True:
            message = received.request
            if not first and message.HasField("start"):
                raise out_of_order("only the first message may carry 'start'; this stream sent two")
            first = False
            crc = message.data_crc32c if message.HasField("data_crc32c") else None
            size = len(received.data)
            await upload.write(
                message.write_offset, received.data, crc, message.finish_write, reservation
            )
            if message.finish_write:
                expected = _expected_checksums(message)
                # Its bytes are in the part now, which gives their memory back once sent:
                # this frame must not keep them while the upload finishes.
                del message, received
                reservation.close()
                if await anext(request_iterator, None) is not None:
                    raise out_of_order(
                        "a message followed finish_write; finish_write must come last"
                    )
                return await upload.finish(expected)
            del message, received
            estimate = size or estimate
            wanted = estimate * READ_RESERVE_FACTOR
            if not reservation.try_ensure(wanted):
                # The part it fills goes to disk first: a stream that waits for memory holds
                # none, so streams that wait cannot keep each other (or themselves) waiting.
                await upload.spill_before_waiting()
                await reservation.ensure(wanted)
            following = await _read_reserved(request_iterator, reservation)
            if following is None:
                raise RecgwError(
                    ErrorKind.ABORTED,
                    "the stream ended without finish_write, so no object was created; the "
                    f"upload stays open: resume upload_id {upload.upload_id} from its committed "
                    "size (GetUploadStatus), or abort it",
                    reason=Reason.STREAM_ENDED_WITHOUT_FINISH,
                    details={
                        "upload_id": upload.upload_id,
                        "committed_size": str(upload.committed),
                    },
                )
            received = UploadMessage.of(following)
            del following

    async def GetUploadStatus(
        self, request: upload_pb2.GetUploadStatusRequest, context: Context
    ) -> upload_pb2.GetUploadStatusResponse:
        try:
            await self._visible_upload(request.upload_id)
            return _status_to_proto(await self._manager.status(request.upload_id))
        except RecgwError as error:
            await abort_with(context, self._metrics, error)

    async def SalvageUpload(
        self, request: upload_pb2.SalvageUploadRequest, context: Context
    ) -> upload_pb2.SalvageUploadResponse:
        try:
            await self._visible_upload(request.upload_id)
            report = await self._manager.salvage(request.upload_id)
        except RecgwError as error:
            await abort_with(context, self._metrics, error)
        return upload_pb2.SalvageUploadResponse(
            state=_STATES[report.state],
            result=_result_to_proto(report.result) if report.result else None,
        )

    async def AbortUpload(
        self, request: upload_pb2.AbortUploadRequest, context: Context
    ) -> upload_pb2.AbortUploadResponse:
        try:
            await self._visible_upload(request.upload_id)
            report = await self._manager.abort(request.upload_id)
        except RecgwError as error:
            await abort_with(context, self._metrics, error)
        return upload_pb2.AbortUploadResponse(
            state=_STATES[report.state],
            storage_aborted=report.storage_aborted,
            detail=report.detail,
        )


def _target_from_proto(target: credentials_pb2.StorageTarget) -> StorageTarget:
    encryption = _ENCRYPTION_FROM_PROTO.get(target.encryption.mode)
    if encryption is None:
        raise invalid(
            "encryption.mode is not a known ServerSideEncryptionMode", "target.encryption.mode"
        )
    return StorageTarget(
        region=target.region,
        bucket=target.bucket,
        prefix=target.prefix,
        endpoint_url=target.endpoint_url,
        force_path_style=target.force_path_style,
        encryption=encryption,
        kms_key_id=target.encryption.kms_key_id,
        allow_overwrite=target.allow_overwrite,
        equal_part_sizes=target.equal_part_sizes,
        abandoned_uploads=_ABANDONED_FROM_PROTO.get(target.abandoned_uploads, "?"),
        expected_bucket_owner=target.expected_bucket_owner,
    ).validated()


def _target_to_proto(target: StorageTarget) -> credentials_pb2.StorageTarget:
    return credentials_pb2.StorageTarget(
        region=target.region,
        bucket=target.bucket,
        prefix=target.prefix,
        endpoint_url=target.endpoint_url,
        force_path_style=target.force_path_style,
        encryption=credentials_pb2.ServerSideEncryption(
            mode=_ENCRYPTION_TO_PROTO[target.encryption], kms_key_id=target.kms_key_id
        ),
        allow_overwrite=target.allow_overwrite,
        equal_part_sizes=target.equal_part_sizes,
        abandoned_uploads=_ABANDONED_TO_PROTO[target.abandoned_uploads],
        expected_bucket_owner=target.expected_bucket_owner,
    )


def _view(info: CredentialsInfo, trusted_principal: str) -> credentials_pb2.CredentialsView:
    return credentials_pb2.CredentialsView(
        tenant_id=info.tenant_id,
        version=info.version,
        update_time=_timestamp(info.updated_at),
        access_key_id_hint=info.access_key_id_hint,
        target=_target_to_proto(info.target),
        role_arn=info.role_arn,
        external_id=info.external_id,
        trusted_principal=trusted_principal,
    )


def _report_to_proto(report: DoctorReport) -> credentials_pb2.VerifyCredentialsResponse:
    failed = report.first_failure
    return credentials_pb2.VerifyCredentialsResponse(
        ok=report.ok,
        key=report.key,
        error_code=failed.error_code if failed else "",
        error_message=report.summary() if failed else "",
        checks=[
            credentials_pb2.CredentialsCheck(
                name=check.name,
                result=_CHECK_RESULTS[check.result],
                operation=check.operation,
                error_code=check.error_code,
                missing_permission=check.missing_permission,
                fix=check.fix,
                detail=check.detail,
            )
            for check in report.checks
        ],
        bucket_region=report.bucket_region,
    )


def _validate_keys(access_key_id: str, secret_access_key: str) -> None:
    if not (16 <= len(access_key_id) <= 128) or not access_key_id.isascii():
        raise invalid(
            "access_key_id must be 16 to 128 ASCII characters, e.g. AKIA...", "access_key_id"
        )
    if not access_key_id.isalnum():
        raise invalid("access_key_id must contain only letters and digits", "access_key_id")
    if not secret_access_key:
        raise invalid("secret_access_key is required", "secret_access_key")
    if len(secret_access_key) > 256 or not secret_access_key.isascii():
        raise invalid("secret_access_key must be at most 256 ASCII characters", "secret_access_key")
    if any(c.isspace() for c in secret_access_key):
        raise invalid(
            "secret_access_key must not contain whitespace; check for a pasted newline",
            "secret_access_key",
        )


class CredentialsService(credentials_pb2_grpc.CredentialsServiceServicer):
    """recgw.v1.CredentialsService: write, describe, delete and verify; never read back.

    Every call leaves one audit record, whatever its outcome.
    """

    def __init__(
        self,
        admin: CredentialsAdmin,
        source: CredentialsSource,
        doctor: SetupDoctor,
        metrics: GatewayMetrics,
        forget_clients: Callable[[str], None] | None = None,
        publish: Callable[[str], Awaitable[None]] | None = None,
        trusted_principal: str = "",
        on_changed: Callable[[str], None] | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self._admin = admin
        self._source = source
        self._doctor = doctor
        self._metrics = metrics
        self._forget_clients = forget_clients
        self._publish = publish
        self._trusted_principal = trusted_principal
        self._on_changed = on_changed
        self._audit = audit or AuditLog("")

    async def _changed(self, tenant_id: str, operation: str) -> None:
        self._source.invalidate(tenant_id)
        if self._on_changed is not None:
            self._on_changed(tenant_id)
        if self._forget_clients is not None:
            self._forget_clients(tenant_id)
        self._metrics.credential_writes.labels(operation).inc()
        if self._publish is None or not TENANT_ID_PATTERN.fullmatch(tenant_id):
            return
        try:
            # Every other replica drops its cached credentials and clients of this tenant.
            await self._publish(tenant_id)
        except Exception as error:
            log.warning(
                "could not tell other replicas that the credentials of tenant %s changed (%s); "
                "they use the old ones until their cache expires",
                tenant_id,
                type(error).__name__,
            )

    def _authorized_tenant(self, tenant_id: str) -> str:
        validate_tenant_id(tenant_id)
        current_caller().require_tenant(tenant_id)
        return tenant_id

    @contextlib.asynccontextmanager
    async def _audited(
        self, operation: str, tenant_id: str, context: Context
    ) -> AsyncIterator[dict[str, Any]]:
        """One audit record for the call in the block; the block adds facts to the dict."""
        facts: dict[str, Any] = {}
        base = {
            "event": "credentials",
            "operation": operation,
            # An invalid tenant id is the caller's text, which may hold anything (a pasted
            # secret, say): the audit trail records that it was invalid, not what it was.
            "tenant_id": tenant_id if TENANT_ID_PATTERN.fullmatch(tenant_id) else "(invalid)",
            "peer": context.peer(),
            **current_caller().audit_fields(),
        }
        try:
            yield facts
        except RecgwError as error:
            await self._audit.record(
                **base,
                outcome="failed",
                code=STATUS_CODES[error.kind].name,
                reason=error.reason.value,
                message=error.message,
                **facts,
            )
            raise
        except Exception:
            await self._audit.record(**base, outcome="failed", code="INTERNAL", **facts)
            raise
        await self._audit.record(**base, outcome="ok", code="OK", **facts)

    async def SetCredentials(
        self, request: credentials_pb2.SetCredentialsRequest, context: Context
    ) -> credentials_pb2.SetCredentialsResponse:
        role_arn = request.role.role_arn if request.HasField("role") else ""
        try:
            async with self._audited("set", request.tenant_id, context) as facts:
                facts["access_key_id"] = mask_access_key_id(request.access_key_id)
                if role_arn:
                    facts["role_arn"] = role_arn
                tenant_id = self._authorized_tenant(request.tenant_id)
                if role_arn:
                    if request.access_key_id or request.secret_access_key:
                        raise invalid(
                            "give either role.role_arn or access_key_id and secret_access_key, "
                            "not both",
                            "role.role_arn",
                        )
                elif request.HasField("role"):
                    raise invalid("role.role_arn is required with role", "role.role_arn")
                else:
                    _validate_keys(request.access_key_id, request.secret_access_key)
                target = _target_from_proto(request.target)
                # Role set-ups and external id rotations take the same path as key changes, so
                # the audit trail records them too.
                try:
                    info = await self._admin.set(
                        tenant_id,
                        request.access_key_id,
                        Secret(request.secret_access_key),
                        target,
                        role_arn=role_arn,
                        rotate_external_id=request.rotate_external_id,
                    )
                finally:
                    await self._changed(tenant_id, "set")
                facts["vault_version"] = info.version
        except RecgwError as error:
            await abort_with(context, self._metrics, error)
        log.info(
            "credentials of tenant %s set: version=%d %s%s",
            tenant_id,
            info.version,
            f"role={role_arn}" if role_arn else f"key={mask_access_key_id(request.access_key_id)}",
            " (new external id)" if request.rotate_external_id else "",
        )
        return credentials_pb2.SetCredentialsResponse(
            credentials=_view(info, self._trusted_principal)
        )

    async def DescribeCredentials(
        self, request: credentials_pb2.DescribeCredentialsRequest, context: Context
    ) -> credentials_pb2.DescribeCredentialsResponse:
        try:
            async with self._audited("describe", request.tenant_id, context) as facts:
                info = await self._admin.describe(self._authorized_tenant(request.tenant_id))
                if info is None:
                    raise RecgwError(
                        ErrorKind.NOT_FOUND,
                        f"tenant '{request.tenant_id}' has no credentials",
                        reason=Reason.CREDENTIALS_NOT_FOUND,
                    )
                facts["vault_version"] = info.version
        except RecgwError as error:
            await abort_with(context, self._metrics, error)
        return credentials_pb2.DescribeCredentialsResponse(
            credentials=_view(info, self._trusted_principal)
        )

    async def DeleteCredentials(
        self, request: credentials_pb2.DeleteCredentialsRequest, context: Context
    ) -> credentials_pb2.DeleteCredentialsResponse:
        try:
            async with self._audited("delete", request.tenant_id, context):
                tenant_id = self._authorized_tenant(request.tenant_id)
                try:
                    existed = await self._admin.delete(tenant_id)
                finally:
                    await self._changed(tenant_id, "delete")
                    self._doctor.forget(tenant_id)
                if not existed:
                    raise RecgwError(
                        ErrorKind.NOT_FOUND,
                        f"tenant '{tenant_id}' has no credentials",
                        reason=Reason.CREDENTIALS_NOT_FOUND,
                    )
        except RecgwError as error:
            await abort_with(context, self._metrics, error)
        log.info("credentials of tenant %s deleted", tenant_id)
        return credentials_pb2.DeleteCredentialsResponse()

    async def VerifyCredentials(
        self, request: credentials_pb2.VerifyCredentialsRequest, context: Context
    ) -> credentials_pb2.VerifyCredentialsResponse:
        try:
            async with self._audited("verify", request.tenant_id, context) as facts:
                report = await self._doctor.examine(self._authorized_tenant(request.tenant_id))
                facts["write_ok"] = report.ok
                failure = report.first_failure
                if failure is not None and failure.error_code:
                    facts["store_code"] = failure.error_code
        except RecgwError as error:
            await abort_with(context, self._metrics, error)
        return _report_to_proto(report)
