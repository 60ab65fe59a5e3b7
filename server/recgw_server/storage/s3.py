"""S3 adapter: ObjectStore/ObjectWriter over boto3, run in worker threads."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import re
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import botocore.config
import botocore.credentials
import botocore.exceptions
import botocore.handlers
import botocore.session

from recgw_server.credentials.roles import RoleAssumer
from recgw_server.domain import EncryptionMode, ErrorKind, Reason, RecgwError, TenantCredentials
from recgw_server.storage.base import AbortOutcome, Body, ObjectSpec, WrittenObject, WrittenPart
from recgw_server.storage.endpoints import (
    FALLBACK_REGION,
    REGION_HEADER,
    BucketProbe,
    access_point_region,
    discover_region,
    expect_bucket_owner,
    probe_bucket,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_REJECTED_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
}
_UNAVAILABLE = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
}
_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "412"}
_CORRUPT = {"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "InvalidChecksum"}
_WRONG_REGION = {"PermanentRedirect", "AuthorizationHeaderMalformed", "301"}
# AWS's wording when a policy lacks a permission, for S3's own and for KMS's denials.
_NOT_AUTHORIZED = re.compile(
    r"not authorized to perform: (?P<action>[a-z0-9-]{2,20}:[A-Za-z0-9*]{1,64}) on resource: "
    r"\"?(?P<resource>arn:[A-Za-z0-9:/_.*+=,@-]{1,400})"
)


def missing_permission(exc: botocore.exceptions.ClientError) -> str:
    """`action on resource` when S3's message names the permission it lacked, else ""."""
    match = _NOT_AUTHORIZED.search(str(exc.response.get("Error", {}).get("Message", "")))
    return f"{match['action']} on {match['resource']}" if match else ""


def _bucket_region(exc: botocore.exceptions.ClientError) -> str:
    headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    region = str(headers.get(REGION_HEADER) or exc.response.get("Error", {}).get("Region") or "")
    return region if re.fullmatch(r"[a-z0-9-]{1,32}", region) else ""


def crc32c_header(value: int) -> str:
    """S3's encoding of a CRC32C: base64 of the 4 big-endian bytes."""
    return base64.b64encode(value.to_bytes(4, "big")).decode()


_NOT_IMPLEMENTED = {"NotImplemented", "501"}
# KMS errors S3 passes on (AWS: KMS.<KMS exception name>; other stores vary the case): these
# clear by themselves, every other one needs the key or its policy fixed.
_KMS_TRANSIENT = ("throttl", "internal", "dependencytimeout", "keyunavailable", "limitexceeded")
_KMS_POLICY_HINT = (
    "the KMS key's policy and the tenant's IAM policy must allow kms:GenerateDataKey and "
    "kms:Decrypt on the tenant's key"
)


def _kms_error(
    exc: botocore.exceptions.ClientError, code: str, operation: str, where: str, key_id: str
) -> RecgwError:
    """A KMS error S3 answered a write with (KMS.NotFoundException, KMS.DisabledException,
    KMS.KMSInvalidStateException, KMS.AccessDeniedException, KMS.ThrottlingException...)."""
    lowered = code.lower()
    key = f"KMS key {key_id}" if key_id else "the bucket's default KMS key"
    if any(word in lowered for word in _KMS_TRANSIENT):
        return RecgwError(
            ErrorKind.UNAVAILABLE,
            f"KMS is unavailable or throttling ({code}) for {operation} on {where} after "
            "retries; retry later",
            reason=Reason.STORAGE_UNAVAILABLE,
        )
    if "accessdenied" in lowered:
        missing = missing_permission(exc)
        return RecgwError(
            ErrorKind.PERMISSION_DENIED,
            f"KMS denied the use of {key} for {operation} on {where} ({code}); "
            + (f"missing permission: {missing}" if missing else _KMS_POLICY_HINT),
            reason=Reason.ACCESS_DENIED,
            details={"missing_permission": missing} if missing else None,
        )
    if "notfound" in lowered:
        problem = "does not exist (check kms_key_id and its region: it must be the bucket's)"
    elif "disabled" in lowered:
        problem = "is disabled: enable it"
    elif "invalidstate" in lowered:
        problem = "is not usable in its state (pending deletion or import): cancel its deletion"
    elif "invalidkeyusage" in lowered:
        problem = "is not a symmetric encryption key"
    else:
        problem = "could not be used"
    return RecgwError(
        ErrorKind.FAILED_PRECONDITION,
        f"S3 refused {operation} on {where}: {key} {problem} ({code}); fix the key, or set "
        "another kms_key_id or encryption mode with SetCredentials (DescribeCredentials shows "
        "the current one)",
        reason=Reason.STORAGE_REJECTED,
    )


def translate_error(
    exc: Exception,
    operation: str,
    bucket: str,
    key: str,
    encryption: EncryptionMode = EncryptionMode.NONE,
    kms_key_id: str = "",
) -> RecgwError:
    """Turn a botocore error into a caller-facing error; S3's own message text is not copied.

    `encryption` and `kms_key_id` are what the request asked for (they explain a store's
    NotImplemented and KMS errors).
    """
    error = _translate(exc, operation, bucket, key, encryption, kms_key_id)
    if isinstance(exc, botocore.exceptions.ClientError):
        error.store_code = str(exc.response.get("Error", {}).get("Code", ""))
    else:
        error.store_code = type(exc).__name__
    error.details.update(store_code=error.store_code, operation=operation)
    return error


def _translate(
    exc: Exception,
    operation: str,
    bucket: str,
    key: str,
    encryption: EncryptionMode,
    kms_key_id: str,
) -> RecgwError:
    where = f"bucket '{bucket}', key '{key}'"
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "")) or str(
            exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        )
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code.lower().startswith("kms"):
            return _kms_error(exc, code, operation, where, kms_key_id)
        if code in ("AccessDenied", "AllAccessDisabled", "AccountProblem"):
            missing = missing_permission(exc)
            text = str(exc.response.get("Error", {}).get("Message", "")).lower()
            about_kms = "kms" in text or "master key" in text
            return RecgwError(
                ErrorKind.PERMISSION_DENIED,
                f"S3 denied {operation} on {where} ({code}); "
                + (
                    f"missing permission: {missing}"
                    if missing
                    else _KMS_POLICY_HINT
                    if about_kms
                    else "the tenant's IAM policy must allow s3:PutObject on this key: check "
                    "the prefix and the bucket policy"
                )
                + " (VerifyCredentials checks every permission uploads need)",
                reason=Reason.ACCESS_DENIED,
                details={"missing_permission": missing} if missing else None,
            )
        bucket_region = _bucket_region(exc)
        if code in _WRONG_REGION and bucket_region:
            return RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"bucket '{bucket}' is in region {bucket_region}, not in the tenant's region "
                f"({code}); set region {bucket_region} with SetCredentials, or leave it empty",
                reason=Reason.STORAGE_REJECTED,
                details={"bucket_region": bucket_region},
            )
        if code in _REJECTED_CREDENTIALS:
            return RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"credentials were rejected by S3 ({code}); overwrite them with SetCredentials",
                reason=Reason.CREDENTIALS_REJECTED,
            )
        if code == "NoSuchBucket":
            return RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"bucket '{bucket}' does not exist (NoSuchBucket); fix the bucket with "
                "SetCredentials",
                reason=Reason.BUCKET_NOT_FOUND,
            )
        if code in _CONFLICT:
            return RecgwError(
                ErrorKind.ALREADY_EXISTS,
                f"an object already exists at {where}; choose another object_name "
                "(overwriting is off for this tenant)",
                reason=Reason.OBJECT_EXISTS,
            )
        if code in _CORRUPT:
            return RecgwError(
                ErrorKind.DATA_LOSS,
                f"S3 refused corrupted data for {where} ({code})",
                reason=Reason.STORAGE_CHECKSUM_REJECTED,
            )
        if code == "NoSuchUpload":
            return RecgwError(
                ErrorKind.ABORTED,
                f"the multipart upload for {where} no longer exists in S3 (NoSuchUpload)",
                reason=Reason.UPLOAD_ENDED,
            )
        if code in _NOT_IMPLEMENTED or status == 501:
            if encryption is not EncryptionMode.NONE:
                return RecgwError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"the object store does not support server-side encryption "
                    f"{encryption.value} ({code} to {operation} on {where}); set an encryption "
                    "mode it supports with SetCredentials, or configure the store's KMS",
                    reason=Reason.ENCRYPTION_NOT_SUPPORTED,
                )
            return RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"the object store does not implement {operation} as the gateway sends it "
                f"({code}) for {where}; check that it is S3-compatible enough (multipart "
                "uploads, CRC32C checksums; turn s3.full_object_checksum off if it lacks "
                "full-object checksums)",
                reason=Reason.STORAGE_REJECTED,
            )
        if code in ("InvalidArgument", "InvalidEncryptionAlgorithmError"):
            return RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"S3 refused {operation} on {where} ({code}); check the tenant's encryption "
                "and bucket settings with DescribeCredentials",
                reason=Reason.STORAGE_REJECTED,
            )
        if code in _UNAVAILABLE or status >= 500:
            return RecgwError(
                ErrorKind.UNAVAILABLE,
                f"S3 is unavailable or throttling ({code}) for {operation} on {where} after "
                "retries; retry later",
                reason=Reason.STORAGE_UNAVAILABLE,
            )
        return RecgwError(
            ErrorKind.FAILED_PRECONDITION,
            f"S3 refused {operation} on {where} ({code})",
            reason=Reason.STORAGE_REJECTED,
        )
    if isinstance(
        exc,
        botocore.exceptions.EndpointConnectionError
        | botocore.exceptions.ConnectTimeoutError
        | botocore.exceptions.ReadTimeoutError
        | botocore.exceptions.ConnectionClosedError
        | botocore.exceptions.HTTPClientError,
    ):
        return RecgwError(
            ErrorKind.UNAVAILABLE,
            f"cannot reach the S3 endpoint for {operation} on {where} "
            f"({type(exc).__name__}); retry later",
            reason=Reason.STORAGE_UNAVAILABLE,
        )
    return RecgwError(
        ErrorKind.INTERNAL, f"unexpected error in {operation} on {where} ({type(exc).__name__})"
    )


@dataclass(frozen=True)
class S3Settings:
    max_attempts: int = 5
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    io_threads: int = 32
    client_cache_size: int = 256
    # CRC32C of the whole object on CompleteMultipartUpload (ChecksumType FULL_OBJECT); turn off
    # for S3-compatible stores that only know per-part checksums.
    full_object_checksum: bool = True
    # `Expect: 100-continue` on part and object writes: "auto" sends it except to loopback
    # endpoints, where a refusal costs nothing and the extra round trip is pure latency.
    expect_continue: str = "auto"


class S3Writer:
    """ObjectWriter for one tenant; every boto3 call runs in the shared I/O thread pool."""

    def __init__(
        self,
        clients: TenantClients,
        credentials: TenantCredentials,
        executor: ThreadPoolExecutor,
        full_object_checksum: bool = True,
    ):
        self._client = clients.retrying
        self._once = clients.once
        self._credentials = clients.credentials
        self._target = credentials.target
        self._executor = executor
        self._full_object_checksum = full_object_checksum

    @property
    def bucket(self) -> str:
        return self._target.bucket

    @property
    def clients(self) -> tuple[Any, Any]:
        """Both boto3 clients: the retrying one and the single-attempt one (shared with other
        tenants of the same endpoint and region: call them only through `signed_as`)."""
        return self._client, self._once

    @property
    def signing_region(self) -> str:
        """The region requests are signed for."""
        return str(self._client.meta.region_name)

    async def probe_bucket(self) -> BucketProbe:
        """HeadBucket, read for its region header (the setup doctor's region check)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor,
            functools.partial(
                signed_as, self._credentials, lambda: probe_bucket(self._client, self.bucket)
            ),
        )

    async def _run(self, operation: str, key: str, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(signed_as, self._credentials, fn)
            )
        except RecgwError:
            raise
        except Exception as exc:
            # Only these requests carry the encryption settings (parts inherit them).
            sends_encryption = operation in ("PutObject", "CreateMultipartUpload")
            raise translate_error(
                exc,
                operation,
                self.bucket,
                key,
                self._target.encryption if sends_encryption else EncryptionMode.NONE,
                self._target.kms_key_id,
            ) from None

    def _write_args(self, spec: ObjectSpec) -> dict[str, Any]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": spec.key}
        if spec.content_type:
            args["ContentType"] = spec.content_type
        if spec.metadata:
            args["Metadata"] = dict(spec.metadata)
        encryption = self._target.encryption
        if encryption is not EncryptionMode.NONE:
            args["ServerSideEncryption"] = encryption.value
            if encryption is EncryptionMode.KMS and self._target.kms_key_id:
                args["SSEKMSKeyId"] = self._target.kms_key_id
        return args

    async def put_object(self, spec: ObjectSpec, body: Body, crc32c: int) -> WrittenObject:
        body.seek(0)  # the pipeline may send the same body again after a failed attempt
        args = self._write_args(spec)
        args.update(Body=body, ChecksumCRC32C=crc32c_header(crc32c))
        client = self._client
        if spec.if_none_match:
            args["IfNoneMatch"] = "*"
            # botocore must not repeat a conditional write whose answer was lost: the repeat would
            # be refused (412) by the object the first attempt made. The pipeline retries itself.
            client = self._once
        response = await self._run(
            "PutObject", spec.key, functools.partial(client.put_object, **args)
        )
        return WrittenObject(response.get("ETag", ""), response.get("VersionId", ""))

    async def create_multipart_upload(self, spec: ObjectSpec) -> str:
        args = self._write_args(spec)
        args["ChecksumAlgorithm"] = "CRC32C"
        if self._full_object_checksum:
            args["ChecksumType"] = "FULL_OBJECT"
        response = await self._run(
            "CreateMultipartUpload",
            spec.key,
            functools.partial(self._client.create_multipart_upload, **args),
        )
        return str(response["UploadId"])

    async def upload_part(
        self, key: str, store_upload_id: str, part_number: int, body: Body, crc32c: int
    ) -> WrittenPart:
        body.seek(0)
        call = functools.partial(
            self._client.upload_part,
            Bucket=self.bucket,
            Key=key,
            UploadId=store_upload_id,
            PartNumber=part_number,
            Body=body,
            ChecksumCRC32C=crc32c_header(crc32c),
        )
        response = await self._run("UploadPart", key, call)
        return WrittenPart(part_number, response["ETag"], len(body), crc32c)

    async def complete_multipart_upload(
        self,
        spec: ObjectSpec,
        store_upload_id: str,
        parts: Sequence[WrittenPart],
        object_crc32c: int,
    ) -> WrittenObject:
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": spec.key,
            "UploadId": store_upload_id,
            "MultipartUpload": {
                "Parts": [
                    {
                        "PartNumber": p.part_number,
                        "ETag": p.etag,
                        "ChecksumCRC32C": crc32c_header(p.crc32c),
                    }
                    for p in parts
                ]
            },
        }
        if spec.if_none_match:
            args["IfNoneMatch"] = "*"
        if self._full_object_checksum:
            # S3 checks the whole object's CRC32C against the parts it holds.
            args["ChecksumCRC32C"] = crc32c_header(object_crc32c)
            args["ChecksumType"] = "FULL_OBJECT"
        # One attempt only: a repeat after a lost answer would meet NoSuchUpload or 412 for the
        # object the first attempt made. The pipeline retries itself, knowing what it sent.
        response = await self._run(
            "CompleteMultipartUpload",
            spec.key,
            functools.partial(self._once.complete_multipart_upload, **args),
        )
        return WrittenObject(response.get("ETag", ""), response.get("VersionId", ""))

    async def head_object(self, key: str) -> WrittenObject | None:
        call = functools.partial(
            self._client.head_object, Bucket=self.bucket, Key=key, ChecksumMode="ENABLED"
        )
        try:
            found = await self._run("HeadObject", key, call)
        except RecgwError as error:
            if error.store_code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return WrittenObject(
            str(found.get("ETag", "")),
            str(found.get("VersionId", "")),
            str(found.get("ChecksumCRC32C", "")),
        )

    async def abort_multipart_upload(self, key: str, store_upload_id: str) -> AbortOutcome:
        call = functools.partial(
            self._client.abort_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            UploadId=store_upload_id,
        )
        try:
            await self._run("AbortMultipartUpload", key, call)
        except RecgwError as error:
            if error.kind is ErrorKind.PERMISSION_DENIED:
                return AbortOutcome.DENIED
            if error.kind is ErrorKind.ABORTED:  # NoSuchUpload: nothing left to abort
                return AbortOutcome.ABORTED
            log.warning("AbortMultipartUpload failed for key=%s: %s", key, error.message)
            return AbortOutcome.FAILED
        return AbortOutcome.ABORTED


# The credentials the current worker thread signs with: set around each call of a writer, so
# that clients can be shared by every tenant with the same endpoint and region.
_signing = threading.local()


class _Unsigned(Exception):
    """A request was about to go out without, or with other than, the caller's credentials."""


def _sign_as_caller(request: Any, **_: Any) -> None:
    """before-sign: sign with the credentials of the call running in this thread."""
    credentials = getattr(_signing, "credentials", None)
    if credentials is None:
        raise _Unsigned("an S3 request was made outside of a tenant's call")
    request.context.setdefault("signing", {})["request_credentials"] = credentials


def _check_signed_as_caller(request: Any, **_: Any) -> None:
    """before-send: the request carries the caller's access key id, never the placeholder one
    the shared client was built with (fails closed should botocore stop honouring the
    per-request credentials)."""
    credentials = getattr(_signing, "credentials", None)
    authorization = request.headers.get("Authorization", b"")
    if isinstance(authorization, bytes):
        authorization = authorization.decode("ascii", "replace")
    if credentials is None or (
        f"Credential={credentials.get_frozen_credentials().access_key}/" not in authorization
    ):
        raise _Unsigned("an S3 request was not signed with the tenant's credentials")


def signed_as(credentials: Any, fn: Callable[[], T]) -> T:
    """Run `fn` (blocking boto3 calls on shared clients) signing as `credentials`."""
    previous = getattr(_signing, "credentials", None)
    _signing.credentials = credentials
    try:
        return fn()
    finally:
        _signing.credentials = previous


@dataclass(frozen=True)
class TenantClients:
    """What one tenant's credentials version writes with: the shared clients of its endpoint
    and region, and the tenant's own botocore credentials that every request is signed with.

    `once` makes a single attempt: it sends the requests that must not be repeated blindly
    (CompleteMultipartUpload, conditional PutObject).
    """

    retrying: Any
    once: Any
    credentials: Any  # botocore Credentials (static keys) or RefreshableCredentials (a role)


DIRECTORY_BUCKET_SUFFIX = "--x-s3"

# What a shared client depends on besides credentials: region, endpoint, path style, expected
# bucket owner, attempts.
_Shape = tuple[str, str, bool, str, int]


class S3ObjectStore:
    """ObjectStore over boto3.

    Building a botocore client costs about 10 ms of CPU, so a burst of new tenants would queue
    behind client builds: clients are shared by all tenants with the same endpoint, region and
    bucket owner (built once each), and every request is signed with the calling tenant's own
    credentials (see `signed_as`). Each tenant's credentials are made once per credentials
    version (for a role: its first AssumeRole).
    """

    def __init__(
        self, settings: S3Settings | None = None, roles: RoleAssumer | None = None
    ) -> None:
        self._settings = settings or S3Settings()
        self._roles = roles
        self._executor = ThreadPoolExecutor(
            max_workers=self._settings.io_threads, thread_name_prefix="recgw-s3"
        )
        self._clients: OrderedDict[tuple[str, int, str], asyncio.Future[TenantClients]] = (
            OrderedDict()
        )
        self._shared: OrderedDict[_Shape, Any] = OrderedDict()
        self._session = botocore.session.get_session()
        # botocore sessions are not thread-safe: shared clients are made one at a time.
        self._session_lock = threading.Lock()
        self.clients_built = 0  # shared clients made so far (tests count them)
        # Loading the S3 service model takes a few hundred milliseconds: do it once, now, in a
        # thread, so no tenant's first upload pays for it.
        self._warm = self._executor.submit(self._session.get_service_model, "s3")

    async def writer_for(self, credentials: TenantCredentials) -> S3Writer:
        # The identity (access key id or role ARN) is part of the cache key so that a store which
        # does not bump versions (or a cache race) can never reuse credentials of another version.
        cache_key = (credentials.tenant_id, credentials.version, credentials.identity)
        building = self._clients.get(cache_key)
        if building is None:
            # Concurrent first streams of a tenant share one build.
            loop = asyncio.get_running_loop()
            building = asyncio.ensure_future(
                loop.run_in_executor(
                    self._executor, functools.partial(self._make_clients, credentials)
                )
            )
            self._clients[cache_key] = building
            while len(self._clients) > self._settings.client_cache_size:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(cache_key)
        try:
            clients = await asyncio.shield(building)
        except BaseException:
            if building.done() and self._clients.get(cache_key) is building:
                del self._clients[cache_key]  # a failed build is not cached
            raise
        return S3Writer(clients, credentials, self._executor, self._settings.full_object_checksum)

    def forget(self, tenant_id: str) -> None:
        """Drop cached clients of a tenant (after its credentials changed)."""
        for cache_key in [k for k in self._clients if k[0] == tenant_id]:
            del self._clients[cache_key]

    def forget_all(self) -> None:
        """Drop every cached client."""
        self._clients.clear()

    def _expect_continue(self, endpoint_url: str) -> bool:
        if self._settings.expect_continue != "auto":
            return self._settings.expect_continue == "on"
        host = urllib.parse.urlsplit(endpoint_url).hostname or ""
        return not (host in ("localhost", "::1") or host.startswith("127."))

    def _botocore_credentials(self, credentials: TenantCredentials) -> Any:
        if not credentials.role_arn:
            return botocore.credentials.Credentials(
                credentials.access_key_id, credentials.secret_access_key.reveal()
            )
        if self._roles is None:
            raise RecgwError(
                ErrorKind.INTERNAL,
                "the tenant's credentials are a role, but this gateway assumes no roles",
            )
        return self._roles.credentials_for(credentials)

    def _config(self, force_path_style: bool, max_attempts: int) -> botocore.config.Config:
        addressing: Any = {  # the stubs lack use_arn_region
            "addressing_style": "path" if force_path_style else "auto",
            # The payload is not hashed for SigV4: the CRC32C that S3 verifies (its header is
            # signed) protects it, over HTTPS and plain HTTP alike.
            "payload_signing_enabled": False,
            # An access point ARN in another region than the client's is reached there.
            "use_arn_region": True,
        }
        return botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=self._settings.connect_timeout,
            read_timeout=self._settings.read_timeout,
            max_pool_connections=self._settings.io_threads,
            s3=addressing,
            # We send our own CRC32C with every write; no second checksum is needed.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )

    def _shared_client(self, shape: _Shape) -> Any:
        """The client of one shape, built at its first use; it signs as the caller."""
        with self._session_lock:  # also: botocore sessions are not thread-safe
            made = self._shared.get(shape)
            if made is not None:
                self._shared.move_to_end(shape)
                return made
            region, endpoint_url, force_path_style, owner, max_attempts = shape
            made = self._session.create_client(
                "s3",
                region_name=region,
                endpoint_url=endpoint_url or None,
                config=self._config(force_path_style, max_attempts),
                # Placeholders, never used to sign: botocore must not look for credentials of
                # its own (the gateway's environment), and every request gets the tenant's.
                aws_access_key_id="RECGW-SIGNS-PER-REQUEST",
                aws_secret_access_key="unused",
            )
            made.meta.events.register("before-sign.s3", _sign_as_caller)
            made.meta.events.register("before-send.s3", _check_signed_as_caller)
            if owner:
                expect_bucket_owner(made, owner)
            if not self._expect_continue(endpoint_url):
                for operation in ("PutObject", "UploadPart"):
                    made.meta.events.unregister(
                        f"before-call.s3.{operation}", botocore.handlers.add_expect_header
                    )
            self._shared[shape] = made
            self.clients_built += 1
            while len(self._shared) > self._settings.client_cache_size:
                self._shared.popitem(last=False)  # writers still holding it keep it alive
            return made

    def _make_clients(self, credentials: TenantCredentials) -> TenantClients:
        self._warm.result()
        target = credentials.target
        if target.bucket.endswith(DIRECTORY_BUCKET_SUFFIX):
            # botocore signs these with session credentials cached per bucket in the client,
            # which a client shared by tenants must not do (and the signing check refuses).
            raise RecgwError(
                ErrorKind.FAILED_PRECONDITION,
                f"bucket '{target.bucket}' is a directory bucket (S3 Express One Zone), which "
                "the gateway does not write to; set a general purpose bucket with "
                "SetCredentials",
                reason=Reason.STORAGE_REJECTED,
            )
        signing = self._botocore_credentials(credentials)

        def client(region: str, max_attempts: int) -> Any:
            shape = (
                region,
                target.endpoint_url,
                target.force_path_style,
                target.expected_bucket_owner,
                max_attempts,
            )
            return self._shared_client(shape)

        region = target.region or access_point_region(target.bucket)
        if not region:
            probe_client = client(FALLBACK_REGION, self._settings.max_attempts)
            region = signed_as(signing, lambda: discover_region(probe_client, target))
        return TenantClients(
            client(region, self._settings.max_attempts), client(region, 1), signing
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
