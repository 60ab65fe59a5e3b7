"""Domain types shared by the pipeline, the adapters and the gRPC layer.

Nothing here knows about gRPC, boto3 or hvac.
"""

from __future__ import annotations

import enum
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime

TENANT_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
DEFAULT_PREFIX = "uploads/"
MAX_KEY_BYTES = 1024
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
ACCESS_POINT_ARN = re.compile(
    r"arn:(?P<partition>aws[a-z-]*):(?P<service>s3|s3-object-lambda):(?P<region>[a-z0-9-]+):"
    r"(?P<account>\d{12}):accesspoint/(?P<name>[a-z0-9][a-z0-9-]{1,48}[a-z0-9])"
)
ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}")
ACCOUNT_ID = re.compile(r"\d{12}")
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}|[a-z0-9-]{1,32}")


class ErrorKind(enum.Enum):
    """What went wrong, independent of any transport; the gRPC layer maps it to a code."""

    INVALID_ARGUMENT = "invalid_argument"
    UNAUTHENTICATED = "unauthenticated"
    OUT_OF_RANGE = "out_of_range"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    ABORTED = "aborted"
    DATA_LOSS = "data_loss"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class Reason(enum.Enum):
    """Why a call failed: the `ErrorInfo.reason` clients act on (protos/recgw/v1/errors.proto).

    The names are the proto's `ErrorReason` values without their `ERROR_REASON_` prefix.
    """

    INVALID_FIELD = "INVALID_FIELD"
    STREAM_OUT_OF_ORDER = "STREAM_OUT_OF_ORDER"
    MESSAGE_UNDECODABLE = "MESSAGE_UNDECODABLE"
    TOKEN_INVALID = "TOKEN_INVALID"
    ROLE_NOT_ALLOWED = "ROLE_NOT_ALLOWED"
    TENANT_NOT_ALLOWED = "TENANT_NOT_ALLOWED"
    UPLOAD_NOT_FOUND = "UPLOAD_NOT_FOUND"
    CREDENTIALS_NOT_FOUND = "CREDENTIALS_NOT_FOUND"
    OFFSET_MISMATCH = "OFFSET_MISMATCH"
    SIZE_LIMIT_EXCEEDED = "SIZE_LIMIT_EXCEEDED"
    SIZE_INCOMPLETE = "SIZE_INCOMPLETE"
    CHUNK_CHECKSUM_MISMATCH = "CHUNK_CHECKSUM_MISMATCH"
    OBJECT_CHECKSUM_MISMATCH = "OBJECT_CHECKSUM_MISMATCH"
    STORAGE_CHECKSUM_REJECTED = "STORAGE_CHECKSUM_REJECTED"
    ANOTHER_WRITER = "ANOTHER_WRITER"
    STREAM_TAKEN_OVER = "STREAM_TAKEN_OVER"
    WRITER_FENCED = "WRITER_FENCED"
    STREAM_ENDED_WITHOUT_FINISH = "STREAM_ENDED_WITHOUT_FINISH"
    UPLOAD_ABORTED = "UPLOAD_ABORTED"
    UPLOAD_ENDED = "UPLOAD_ENDED"
    UPLOAD_COMPLETE = "UPLOAD_COMPLETE"
    UPLOAD_FINISHING = "UPLOAD_FINISHING"
    UPLOAD_ID_CONFLICT = "UPLOAD_ID_CONFLICT"
    OBJECT_EXISTS = "OBJECT_EXISTS"
    COMPLETION_UNCONFIRMED = "COMPLETION_UNCONFIRMED"
    CREDENTIALS_REJECTED = "CREDENTIALS_REJECTED"
    ACCESS_DENIED = "ACCESS_DENIED"
    BUCKET_NOT_FOUND = "BUCKET_NOT_FOUND"
    STORAGE_REJECTED = "STORAGE_REJECTED"
    ENCRYPTION_NOT_SUPPORTED = "ENCRYPTION_NOT_SUPPORTED"
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"
    VAULT_UNAVAILABLE = "VAULT_UNAVAILABLE"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    MEMORY_EXHAUSTED = "MEMORY_EXHAUSTED"
    TENANT_LIMIT_EXCEEDED = "TENANT_LIMIT_EXCEEDED"
    RATE_LIMITED = "RATE_LIMITED"
    SPOOL_EXHAUSTED = "SPOOL_EXHAUSTED"
    CANCELLED = "CANCELLED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


# The reason of an error raised without one; every other kind names its reason explicitly.
_DEFAULT_REASONS = {
    ErrorKind.INVALID_ARGUMENT: Reason.INVALID_FIELD,
    ErrorKind.UNAUTHENTICATED: Reason.TOKEN_INVALID,
    ErrorKind.UNAVAILABLE: Reason.STORAGE_UNAVAILABLE,
    ErrorKind.CANCELLED: Reason.CANCELLED,
    ErrorKind.INTERNAL: Reason.INTERNAL_ERROR,
    ErrorKind.RESOURCE_EXHAUSTED: Reason.MEMORY_EXHAUSTED,
    ErrorKind.DATA_LOSS: Reason.STORAGE_CHECKSUM_REJECTED,
    ErrorKind.ALREADY_EXISTS: Reason.OBJECT_EXISTS,
    ErrorKind.NOT_FOUND: Reason.UPLOAD_NOT_FOUND,
    ErrorKind.PERMISSION_DENIED: Reason.ACCESS_DENIED,
    ErrorKind.FAILED_PRECONDITION: Reason.STORAGE_REJECTED,
    ErrorKind.OUT_OF_RANGE: Reason.SIZE_LIMIT_EXCEEDED,
    ErrorKind.ABORTED: Reason.UPLOAD_ABORTED,
}


class RecgwError(Exception):
    """An error with a message meant for the caller. Never put a secret in it.

    `reason` and `details` travel to the client as a google.rpc.ErrorInfo; `details` holds
    facts a client can act on, such as `committed_size`.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        store_code: str = "",
        *,
        reason: Reason | None = None,
        details: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.store_code = store_code  # the object store's own error code, e.g. "AccessDenied"
        self.reason = reason or _DEFAULT_REASONS[kind]
        self.details = dict(details or {})


def invalid(message: str, field: str = "") -> RecgwError:
    return RecgwError(
        ErrorKind.INVALID_ARGUMENT,
        message,
        reason=Reason.INVALID_FIELD,
        details={"field": field} if field else None,
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def quote_client(value: str, limit: int = 80) -> str:
    """A client-supplied string made safe for a log line or an error message.

    Control characters (and line separators) appear as escapes, so no value can forge a log line
    or put raw control bytes into a status message; long values are cut at `limit` characters.
    """
    cut = value[:limit]
    escaped = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", cut.replace("\\", "\\\\"))
    return f"'{escaped}'" + ("..." if len(value) > limit else "")


class Secret:
    """Holds a secret value; its str() and repr() never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("secrets are not pickled")


def validate_tenant_id(tenant_id: str) -> str:
    if not TENANT_ID_PATTERN.fullmatch(tenant_id):
        raise invalid(
            "tenant_id must match [a-z0-9][a-z0-9_-]{0,62} "
            "(lowercase letters, digits, '_' and '-', at most 63 characters)"
        )
    return tenant_id


def mask_access_key_id(access_key_id: str) -> str:
    """Show only the last 4 characters, as a UI may."""
    return "****" + access_key_id[-4:] if len(access_key_id) > 4 else "****"


class EncryptionMode(enum.Enum):
    NONE = "none"
    S3 = "AES256"
    KMS = "aws:kms"


@dataclass(frozen=True)
class StorageTarget:
    """Where and how a tenant's objects are written. Holds no secret."""

    region: str
    bucket: str
    prefix: str = DEFAULT_PREFIX
    endpoint_url: str = ""
    force_path_style: bool = False
    encryption: EncryptionMode = EncryptionMode.NONE
    kms_key_id: str = ""
    allow_overwrite: bool = False
    equal_part_sizes: bool = False
    # "abort" or "salvage": the fate of an upload whose writer never comes back.
    abandoned_uploads: str = "abort"
    # The AWS account that must own the bucket (x-amz-expected-bucket-owner); empty: unchecked.
    expected_bucket_owner: str = ""

    def validated(self) -> StorageTarget:
        """Check every field; return a copy with defaults filled in.

        An empty region means "find it from the bucket" (HeadBucket's x-amz-bucket-region);
        an access point ARN's region is taken from the ARN.
        """
        if self.region and not _REGION.fullmatch(self.region):
            raise invalid("region must be an AWS region such as 'us-west-1', or empty to find it")
        access_point = ACCESS_POINT_ARN.fullmatch(self.bucket)
        if not (_BUCKET_NAME.fullmatch(self.bucket) or access_point):
            raise invalid(
                "bucket must be a bucket name (3-63 characters of a-z, 0-9, '.' and '-'), "
                "an access point alias, or an access point ARN"
            )
        if access_point:
            _check_access_point(access_point, self)
        if self.expected_bucket_owner and not ACCOUNT_ID.fullmatch(self.expected_bucket_owner):
            raise invalid(
                "expected_bucket_owner must be the 12-digit AWS account id that owns the bucket",
                "target.expected_bucket_owner",
            )
        prefix = self.prefix or DEFAULT_PREFIX
        if prefix.startswith("/") or not prefix.endswith("/") or len(prefix.encode()) > 512:
            raise invalid("prefix must not start with '/', must end with '/', at most 512 bytes")
        check_key_segments(prefix, what="prefix")
        if self.endpoint_url and not re.fullmatch(
            r"https?://[^\s/?#]+(/[^\s?#]*)?", self.endpoint_url
        ):
            raise invalid("endpoint_url must be an http(s) URL such as https://s3.example.com")
        if len(self.endpoint_url) > 512:
            raise invalid("endpoint_url must be at most 512 characters")
        if self.encryption is not EncryptionMode.KMS and self.kms_key_id:
            raise invalid("kms_key_id is only allowed with SSE-KMS encryption")
        if self.abandoned_uploads not in ("abort", "salvage"):
            raise invalid("abandoned_uploads must be 'abort' or 'salvage'", "abandoned_uploads")
        if len(self.kms_key_id) > 512:
            raise invalid("kms_key_id must be at most 512 characters")
        return StorageTarget(
            region=self.region,
            bucket=self.bucket,
            prefix=prefix,
            endpoint_url=self.endpoint_url,
            force_path_style=self.force_path_style,
            encryption=self.encryption,
            kms_key_id=self.kms_key_id,
            allow_overwrite=self.allow_overwrite,
            equal_part_sizes=self.equal_part_sizes,
            abandoned_uploads=self.abandoned_uploads,
            expected_bucket_owner=self.expected_bucket_owner,
        )


def _check_access_point(arn: re.Match[str], target: StorageTarget) -> None:
    """Refuse access point ARN set-ups that can never reach the access point."""
    if arn["service"] == "s3-object-lambda":
        raise invalid(
            "bucket is an S3 Object Lambda access point, which does not accept writes "
            "(PutObject); give the ARN of the supporting S3 access point instead",
            "target.bucket",
        )
    if target.endpoint_url:
        raise invalid(
            "an access point ARN cannot be used with a custom endpoint_url: requests would go to "
            f"'{arn['name']}-{arn['account']}.<endpoint host>', a host that does not exist; "
            "leave endpoint_url empty for AWS, or give an S3-compatible store its bucket name",
            "target.endpoint_url",
        )
    if target.force_path_style:
        raise invalid(
            "an access point ARN cannot be used with path-style addressing: access points "
            "answer only at their own host name "
            f"({arn['name']}-{arn['account']}.s3-accesspoint.{arn['region']}.amazonaws.com); "
            "turn force_path_style off",
            "target.force_path_style",
        )


def new_external_id() -> str:
    """A fresh external id for a tenant's role trust policy; the customer never chooses it."""
    return "recgw-" + secrets.token_hex(16)


def role_session_name(tenant_id: str) -> str:
    """The AssumeRole session name: names recgw and the tenant (CloudTrail shows it)."""
    return f"recgw-{tenant_id}"[:64]


@dataclass(frozen=True)
class TenantCredentials:
    """The S3 credentials of one tenant, as read from Vault by the upload path.

    Either an access key pair, or (with `role_arn`) a role the gateway assumes with
    `external_id`; then access_key_id is empty and there is no secret at all.
    """

    tenant_id: str
    access_key_id: str
    secret_access_key: Secret
    target: StorageTarget
    version: int = 0
    role_arn: str = ""
    external_id: str = ""

    @property
    def identity(self) -> str:
        """What the S3 client authenticates as: the access key id or the role ARN."""
        return self.role_arn or self.access_key_id


@dataclass(frozen=True)
class CredentialsInfo:
    """The non-secret view of stored credentials."""

    tenant_id: str
    version: int
    updated_at: datetime | None
    access_key_id_hint: str
    target: StorageTarget
    role_arn: str = ""
    external_id: str = ""


def check_key_segments(name: str, what: str = "object_name") -> None:
    # Also C1 controls and line separators: some log viewers break lines at them.
    if _CONTROL.search(name):
        raise invalid(f"{what} must not contain control characters or line separators")
    if "\\" in name:
        raise invalid(f"{what} must not contain '\\'; use '/' to separate segments")
    segments = name.split("/")
    if any(s in (".", "..") for s in segments):
        raise invalid(f"{what} must not contain '.' or '..' segments")


def build_object_key(prefix: str, object_name: str) -> str:
    """Join the tenant prefix and a caller's object name, refusing anything that could escape it."""
    if not object_name:
        raise invalid("object_name is required, for example '2026/11/28/call-42.webm'")
    if object_name.startswith("/"):
        raise invalid("object_name must be relative to the tenant prefix: remove the leading '/'")
    if "//" in object_name or object_name.endswith("/"):
        raise invalid("object_name must not contain empty segments ('//') or end with '/'")
    check_key_segments(object_name)
    key = prefix + object_name
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise invalid(
            f"object_name is too long: prefix and name together are "
            f"{len(key.encode('utf-8'))} bytes, the limit is {MAX_KEY_BYTES}"
        )
    return key


@dataclass
class ObjectChecksums:
    crc32c: int | None = None
    sha256: bytes | None = None


@dataclass
class UploadResult:
    upload_id: str
    bucket: str
    key: str
    size: int
    etag: str
    version_id: str
    part_count: int
    checksums: ObjectChecksums = field(default_factory=ObjectChecksums)
    # The completion's answer was lost and could not be confirmed; `etag` is the expected one.
    unconfirmed: bool = False
