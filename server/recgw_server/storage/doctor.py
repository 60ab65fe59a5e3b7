"""The setup doctor: proves, with a tenant's stored credentials, everything its uploads use.

Checks, in order: the role can be assumed (role tenants), the bucket's region, a multipart
upload (create, one part, complete) with the tenant's checksum (per-part CRC32C, FULL_OBJECT)
and encryption settings, and that the store refuses a conditional write (`If-None-Match: *`)
to an object that exists. The writes go through the same ObjectWriter the uploads use, so they
carry exactly the uploads' headers (SSE, checksums, expected bucket owner).

Only one small object is left behind: the multipart upload completes at
`<prefix>.recgw-write-check` without a condition (it overwrites the previous check's object),
and the conditional write then targets that same key and must be refused.

The gateway also runs the doctor periodically for tenants that uploaded recently, exports
`recgw_credentials_healthy{tenant}` and logs once whenever a tenant's result changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from recgw_server.credentials.base import CredentialsSource
from recgw_server.credentials.roles import ASSUME_ROLE, RoleAssumer
from recgw_server.domain import (
    EncryptionMode,
    ErrorKind,
    Reason,
    RecgwError,
    TenantCredentials,
    mask_access_key_id,
    validate_tenant_id,
)
from recgw_server.metrics import GatewayMetrics
from recgw_server.pipeline.digest import crc32c
from recgw_server.storage.access_points import objects_resource, parse_access_point
from recgw_server.storage.base import (
    AbortOutcome,
    BytesBody,
    ObjectSpec,
    ObjectStore,
    ObjectWriter,
)
from recgw_server.storage.endpoints import BucketProbe

log = logging.getLogger(__name__)

CHECK_OBJECT_NAME = ".recgw-write-check"
CHECK_BODY = b"recgw setup check: this object is overwritten by every VerifyCredentials call\n"
WRONG_REGION = "WrongRegion"
CONDITION_IGNORED = "ConditionalWriteIgnored"
_DENIED = {"AccessDenied", "AllAccessDisabled", "AccountProblem"}
# Every check with the operation it sends, in the order run.
CHECKS = (
    ("assume_role", ASSUME_ROLE),
    ("bucket_region", "HeadBucket"),
    ("create_multipart_upload", "CreateMultipartUpload"),
    ("upload_part", "UploadPart"),
    ("complete_multipart_upload", "CompleteMultipartUpload"),
    ("conditional_write", "PutObject"),
)


class CheckResult(enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Check:
    """One capability the doctor checked."""

    name: str
    result: CheckResult
    operation: str = ""
    error_code: str = ""
    missing_permission: str = ""
    fix: str = ""
    detail: str = ""


@dataclass(frozen=True)
class DoctorReport:
    tenant_id: str
    key: str
    checks: tuple[Check, ...]
    bucket_region: str = ""

    @property
    def ok(self) -> bool:
        return all(check.result is not CheckResult.FAILED for check in self.checks)

    @property
    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if c.result is CheckResult.FAILED), None)

    def summary(self) -> str:
        failed = self.first_failure
        if failed is None:
            return "all checks passed"
        text = f"{failed.name} failed"
        if failed.error_code:
            text += f" ({failed.error_code})"
        if failed.missing_permission:
            text += f": missing {failed.missing_permission}"
        return f"{text}; {failed.fix}" if failed.fix else text


def _encryption_detail(credentials: TenantCredentials) -> str:
    target = credentials.target
    if target.encryption is EncryptionMode.KMS:
        return f"SSE aws:kms (key {target.kms_key_id or 'the account default aws/s3'})"
    if target.encryption is EncryptionMode.S3:
        return "SSE AES256"
    return "the bucket's default encryption"


def _kms_key(credentials: TenantCredentials) -> str:
    return credentials.target.kms_key_id or "the S3 default key alias/aws/s3"


def _who(credentials: TenantCredentials) -> str:
    if credentials.role_arn:
        return f"the permission policy of role {credentials.role_arn}"
    hint = mask_access_key_id(credentials.access_key_id)
    return f"the policy of the IAM user of access key {hint}"


@dataclass
class _Run:
    """One examination in progress."""

    credentials: TenantCredentials
    full_object_checksum: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def kms(self) -> bool:
        return self.credentials.target.encryption is EncryptionMode.KMS

    def passed(self, name: str, operation: str, detail: str) -> None:
        self.checks.append(Check(name, CheckResult.PASSED, operation, detail=detail))

    def skipped(self, name: str, operation: str, detail: str) -> None:
        self.checks.append(Check(name, CheckResult.SKIPPED, operation, detail=detail))

    def skip_rest(self, detail: str) -> None:
        """Mark every check not run yet as skipped."""
        done = {check.name for check in self.checks}
        for name, operation in CHECKS:
            if name not in done:
                self.skipped(self.write_check_name(name), operation, detail)

    def write_check_name(self, name: str) -> str:
        if name == "conditional_write" and self.credentials.target.allow_overwrite:
            return "put_object"
        return name

    def report(self, bucket_region: str = "") -> DoctorReport:
        target = self.credentials.target
        key = target.prefix + CHECK_OBJECT_NAME
        return DoctorReport(self.credentials.tenant_id, key, tuple(self.checks), bucket_region)

    def failed(self, name: str, operation: str, error: RecgwError, *, after_put: bool) -> None:
        """Record a failed write, naming the missing permission in IAM terms.

        `after_put`: an earlier write of this run was allowed, so s3:PutObject itself is granted
        and an AccessDenied here points at KMS (UploadPart: kms:GenerateDataKey, completing:
        kms:Decrypt, which S3 needs to read the encrypted parts).
        """
        code = error.store_code or error.kind.value
        target = self.credentials.target
        missing = error.details.get("missing_permission", "")
        fix = error.message
        if code in _DENIED:
            put = f"s3:PutObject on {objects_resource(target.bucket, target.prefix)}"
            if not missing:
                if self.kms and after_put:
                    completing = operation == "CompleteMultipartUpload"
                    action = "kms:Decrypt" if completing else "kms:GenerateDataKey"
                    missing = f"{action} on {_kms_key(self.credentials)}"
                elif self.kms:
                    missing = f"{put} (and kms:GenerateDataKey on {_kms_key(self.credentials)})"
                else:
                    missing = put
            fix = f"allow {missing} in {_who(self.credentials)}"
            if self.kms:
                fix += " (SSE-KMS writes need kms:GenerateDataKey and kms:Decrypt on the key)"
            if parse_access_point(target.bucket):
                fix += (
                    "; through an access point, the access point policy and a bucket policy "
                    "delegating to access points must allow it too (recgw policy --access-point)"
                )
            if target.expected_bucket_owner:
                fix += (
                    f"; or the bucket is not owned by account {target.expected_bucket_owner} "
                    "(expected_bucket_owner), which S3 also answers with AccessDenied"
                )
        elif code in ("InvalidAccessKeyId", "InvalidClientTokenId"):
            fix = (
                "the access key id does not exist or is deactivated; set new keys with "
                "SetCredentials"
            )
        elif code == "SignatureDoesNotMatch":
            fix = (
                "the secret access key does not belong to the access key id; set both again with "
                "SetCredentials"
            )
        elif code == "NoSuchBucket":
            fix = f"bucket '{target.bucket}' does not exist; create it or fix the bucket name"
        elif code.startswith("KMS"):
            fix = (
                f"S3 could not use the KMS key {_kms_key(self.credentials)} ({code}): check that "
                "it exists, is enabled and is in the bucket's region"
            )
        elif error.kind is ErrorKind.UNAVAILABLE:
            fix = "the store could not be reached: check endpoint_url and the network"
        self.checks.append(
            Check(name, CheckResult.FAILED, operation, code, missing, fix, detail=error.message)
        )


class SetupDoctor:
    """Runs the checks, remembers each tenant's health, and re-checks active tenants."""

    def __init__(
        self,
        source: CredentialsSource,
        store: ObjectStore,
        metrics: GatewayMetrics,
        *,
        roles: RoleAssumer | None = None,
        full_object_checksum: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._store = store
        self._metrics = metrics
        self._roles = roles
        self._full_object_checksum = full_object_checksum
        self._clock = clock
        self._active: dict[str, float] = {}
        self._healthy: dict[str, bool] = {}
        self.runs = 0  # completed periodic rounds, for tests and logs

    # --- activity --------------------------------------------------------------------------

    def note_activity(self, tenant_id: str) -> None:
        """The upload path used this tenant's credentials now."""
        self._active[tenant_id] = self._clock()

    def active_tenants(self, window: float) -> list[str]:
        cutoff = self._clock() - window
        for tenant_id in [t for t, at in self._active.items() if at < cutoff]:
            del self._active[tenant_id]
        return sorted(self._active)

    # --- checks ----------------------------------------------------------------------------

    async def examine(self, tenant_id: str) -> DoctorReport:
        """Run every check for the tenant; NOT_FOUND when it has no credentials."""
        validate_tenant_id(tenant_id)
        credentials = await self._source.get(tenant_id)
        if credentials is None:
            self.forget(tenant_id)
            raise RecgwError(
                ErrorKind.NOT_FOUND,
                f"tenant '{tenant_id}' has no S3 credentials to verify",
                reason=Reason.CREDENTIALS_NOT_FOUND,
            )
        report = await self._examine(credentials)
        self._record(report)
        return report

    async def _examine(self, credentials: TenantCredentials) -> DoctorReport:
        key = credentials.target.prefix + CHECK_OBJECT_NAME
        run = _Run(credentials, self._full_object_checksum)
        if not credentials.role_arn:
            run.skipped("assume_role", ASSUME_ROLE, "the tenant uses an access key pair")
        elif not await self._check_role(run):
            run.skip_rest("needs the role's credentials")
            return run.report()
        try:
            writer = await self._store.writer_for(credentials)
        except RecgwError as error:
            self._raise_internal(error)
            run.failed("bucket_region", "HeadBucket", error, after_put=False)
            run.skip_rest("needs an S3 client")
            return run.report()
        bucket_region = await self._check_region(run, writer)
        if await self._check_multipart(run, writer, key):
            await self._check_conditional_write(run, writer, key)
        else:
            run.skip_rest("not run: an earlier check failed")
        return run.report(bucket_region)

    async def _check_role(self, run: _Run) -> bool:
        credentials = run.credentials
        if self._roles is None:
            run.checks.append(
                Check(
                    "assume_role",
                    CheckResult.FAILED,
                    ASSUME_ROLE,
                    fix="this gateway is not configured to assume roles (server configuration)",
                )
            )
            return False
        try:
            await asyncio.to_thread(self._roles.assume, credentials)
        except RecgwError as error:
            code = error.store_code
            fix = error.message
            if code == "AccessDenied":
                principal = self._roles.settings.gateway_principal_arn or "the gateway's principal"
                fix = (
                    f"the trust policy of {credentials.role_arn} must allow {principal} to call "
                    "sts:AssumeRole with the condition StringEquals sts:ExternalId "
                    f"'{credentials.external_id}' (recgw policy --role prints it), and the "
                    "gateway's own identity must be allowed sts:AssumeRole on the role"
                )
            run.checks.append(
                Check(
                    "assume_role",
                    CheckResult.FAILED,
                    ASSUME_ROLE,
                    code,
                    error.details.get("missing_permission", ""),
                    fix,
                    detail=error.message,
                )
            )
            return False
        run.passed(
            "assume_role",
            ASSUME_ROLE,
            f"assumed {credentials.role_arn} with external id {credentials.external_id}",
        )
        return True

    async def _check_region(self, run: _Run, writer: ObjectWriter) -> str:
        target = run.credentials.target
        access_point = parse_access_point(target.bucket)
        if access_point is not None:
            run.skipped(
                "bucket_region",
                "",
                f"access point ARN: requests go to its region {access_point.region}",
            )
            return access_point.region
        probe_bucket = getattr(writer, "probe_bucket", None)
        if probe_bucket is None:
            run.skipped("bucket_region", "HeadBucket", "not an S3 client")
            return ""
        probe: BucketProbe = await probe_bucket()
        signing = str(getattr(writer, "signing_region", ""))
        if probe.error_code in ("NoSuchBucket", "404"):
            run.checks.append(
                Check(
                    "bucket_region",
                    CheckResult.FAILED,
                    "HeadBucket",
                    "NoSuchBucket",
                    fix=f"bucket '{target.bucket}' does not exist; create it or fix its name",
                )
            )
        elif not probe.region:
            run.skipped(
                "bucket_region",
                "HeadBucket",
                f"the store did not say where the bucket is (HTTP {probe.status}); requests "
                f"are signed for {signing}",
            )
        elif target.region and probe.region != target.region:
            run.checks.append(
                Check(
                    "bucket_region",
                    CheckResult.FAILED,
                    "HeadBucket",
                    WRONG_REGION,
                    fix=f"the bucket is in region {probe.region}, not {target.region}: set "
                    f"region {probe.region} (or leave it empty to have it found)",
                    detail=f"x-amz-bucket-region: {probe.region}",
                )
            )
        elif not target.region:
            run.passed("bucket_region", "HeadBucket", f"found from the bucket: {probe.region}")
        else:
            run.passed("bucket_region", "HeadBucket", f"the bucket is in {probe.region}")
        return probe.region

    async def _check_multipart(self, run: _Run, writer: ObjectWriter, key: str) -> bool:
        spec = ObjectSpec(key, "text/plain", {}, if_none_match=False)
        checksum = "CRC32C per part" + (
            ", FULL_OBJECT CRC32C on completion" if run.full_object_checksum else ""
        )
        settings = f"{checksum}, {_encryption_detail(run.credentials)}"
        owner = run.credentials.target.expected_bucket_owner
        if owner:
            settings += f", expected bucket owner {owner}"
        try:
            upload_id = await writer.create_multipart_upload(spec)
        except RecgwError as error:
            self._raise_internal(error)
            run.failed("create_multipart_upload", "CreateMultipartUpload", error, after_put=False)
            return False
        run.passed("create_multipart_upload", "CreateMultipartUpload", settings)
        step = ("upload_part", "UploadPart")
        try:
            part = await writer.upload_part(
                key, upload_id, 1, BytesBody(CHECK_BODY), crc32c(CHECK_BODY)
            )
            run.passed(*step, f"part 1 of {len(CHECK_BODY)} bytes with its CRC32C")
            step = ("complete_multipart_upload", "CompleteMultipartUpload")
            await writer.complete_multipart_upload(spec, upload_id, [part], crc32c(CHECK_BODY))
        except RecgwError as error:
            self._raise_internal(error)
            run.failed(*step, error, after_put=True)
            outcome = await writer.abort_multipart_upload(key, upload_id)
            if outcome is not AbortOutcome.ABORTED:
                log.info(
                    "the doctor's multipart upload at %s is left to the bucket's lifecycle rule",
                    key,
                )
            return False
        run.passed(*step, f"the object at {key} is complete ({checksum})")
        return True

    async def _check_conditional_write(self, run: _Run, writer: ObjectWriter, key: str) -> None:
        body = CHECK_BODY
        if run.credentials.target.allow_overwrite:
            spec = ObjectSpec(key, "text/plain", {}, if_none_match=False)
            try:
                await writer.put_object(spec, BytesBody(body), crc32c(body))
            except RecgwError as error:
                self._raise_internal(error)
                run.failed("put_object", "PutObject", error, after_put=True)
                return
            run.passed(
                "put_object",
                "PutObject",
                "overwrites are allowed for this tenant, so uploads send no If-None-Match",
            )
            return
        spec = ObjectSpec(key, "text/plain", {}, if_none_match=True)
        try:
            await writer.put_object(spec, BytesBody(body), crc32c(body))
        except RecgwError as error:
            if error.kind is ErrorKind.ALREADY_EXISTS:
                run.passed(
                    "conditional_write",
                    "PutObject",
                    f"PutObject with If-None-Match: * on the existing {key} was refused "
                    f"({error.store_code}), so no upload can overwrite an object",
                )
                return
            self._raise_internal(error)
            run.failed("conditional_write", "PutObject", error, after_put=True)
            return
        run.checks.append(
            Check(
                "conditional_write",
                CheckResult.FAILED,
                "PutObject",
                CONDITION_IGNORED,
                fix="the store wrote over an existing object despite If-None-Match: *, so "
                "uploads could silently replace recordings: use a store with conditional writes, "
                "or set allow_overwrite to accept that",
                detail=f"PutObject with If-None-Match: * on the existing {key} succeeded",
            )
        )

    @staticmethod
    def _raise_internal(error: RecgwError) -> None:
        if error.kind is ErrorKind.INTERNAL:
            raise error

    # --- health ----------------------------------------------------------------------------

    def _record(self, report: DoctorReport) -> None:
        tenant_id = report.tenant_id
        healthy = report.ok
        self._metrics.credentials_healthy.labels(tenant_id).set(1 if healthy else 0)
        before = self._healthy.get(tenant_id)
        self._healthy[tenant_id] = healthy
        if before is healthy:
            return
        if not healthy:
            log.warning("credentials of tenant %s do not work: %s", tenant_id, report.summary())
        elif before is False:
            log.info("credentials of tenant %s work again", tenant_id)

    def forget(self, tenant_id: str) -> None:
        """Stop reporting a tenant (its credentials were deleted)."""
        self._healthy.pop(tenant_id, None)
        self._active.pop(tenant_id, None)
        with contextlib.suppress(KeyError):  # never recorded
            self._metrics.credentials_healthy.remove(tenant_id)

    async def examine_active(self, window: float) -> None:
        """One round over the tenants that uploaded within `window` seconds."""
        for tenant_id in self.active_tenants(window):
            try:
                await self.examine(tenant_id)
            except RecgwError as error:
                if error.kind is not ErrorKind.NOT_FOUND:
                    log.warning(
                        "checking the credentials of tenant %s failed: %s",
                        tenant_id,
                        error.message,
                    )
        self.runs += 1

    async def run_periodically(self, interval: float, window: float) -> None:
        """Every `interval` seconds, examine the recently active tenants."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.examine_active(window)
            except Exception:
                log.exception("checking tenant credentials failed; trying again later")


class ActivityTrackingSource:
    """A CredentialsSource that tells the doctor which tenants the upload path used."""

    def __init__(self, inner: CredentialsSource, doctor: SetupDoctor) -> None:
        self._inner = inner
        self._doctor = doctor

    async def get(self, tenant_id: str) -> TenantCredentials | None:
        credentials = await self._inner.get(tenant_id)
        if credentials is not None:
            self._doctor.note_activity(tenant_id)
        return credentials

    def invalidate_all(self) -> None:
        self._inner.invalidate_all()

    def invalidate(self, tenant_id: str) -> None:
        self._inner.invalidate(tenant_id)
