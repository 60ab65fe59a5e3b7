"""What the pipeline is asked and what it answers: requests, states, reports, their checks."""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from recgw_server.domain import (
    ErrorKind,
    ObjectChecksums,
    Reason,
    RecgwError,
    UploadResult,
    invalid,
    quote_client,
    validate_tenant_id,
)
from recgw_server.pipeline.parts import GROWTH_INTERVAL, MiB

_METADATA_KEY = re.compile(r"[a-z0-9][a-z0-9-]{0,127}")
_MAX_METADATA_BYTES = 2048  # S3's limit for all user metadata
_CONTENT_TYPE = re.compile(r"[\x21-\x7e]+/[\x21-\x7e]+( *;[\x20-\x7e]*)?")


def is_terminal(error: RecgwError) -> bool:
    """Errors after which an upload can never complete: it is aborted, not left resumable."""
    return error.kind is ErrorKind.ALREADY_EXISTS or error.store_code == "NoSuchUpload"


class UploadState(enum.Enum):
    OPEN = "open"
    FINISHING = "finishing"  # durably recorded before the completion is sent to S3
    COMPLETE = "complete"
    COMPLETION_UNCONFIRMED = "completion_unconfirmed"
    ABORTED = "aborted"
    EXPIRED = "expired"
    SALVAGED = "salvaged"


ENDED_STATES = frozenset({UploadState.ABORTED, UploadState.EXPIRED, UploadState.SALVAGED})
DONE_STATES = frozenset({UploadState.COMPLETE, UploadState.COMPLETION_UNCONFIRMED})


@dataclass(frozen=True)
class PipelineSettings:
    part_size: int = 8 * MiB
    max_inflight_parts: int = 4
    growth_interval: int = GROWTH_INTERVAL
    idle_timeout: float = 24 * 3600.0
    memory_cache_size: int = 10_000
    # A part still filling after this many seconds (a slow, live stream) moves to disk.
    spill_after: float = 2.0
    # A new stream takes over an upload whose writer has been silent this long.
    takeover_after: float = 5.0
    # SHA-256 of every object ("always"), or only when a client asks ("on_request").
    sha256: str = "on_request"
    # Attempts at the completion request (CompleteMultipartUpload or the single PutObject)
    # when S3 cannot be reached; the gateway, not botocore, repeats it, knowing what it sent.
    completion_attempts: int = 5
    completion_backoff: float = 0.5
    # This replica's name on the writer leases of the session store, and how long they last.
    replica_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    lease_seconds: float = 15.0
    # Other replicas share the session store and may take a lease at any time (AbortUpload on
    # another replica takes it from a live writer): check it before every request to S3.
    shared_sessions: bool = False


@dataclass(frozen=True)
class StartRequest:
    tenant_id: str
    object_name: str
    content_type: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    expected_size: int | None = None
    upload_id: str = ""
    compute_sha256: bool = False


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


@dataclass(frozen=True)
class SalvageReport:
    state: UploadState
    result: UploadResult | None


def upload_not_found(upload_id: str) -> RecgwError:
    """The NOT_FOUND of an unknown upload id (also given for another tenant's upload)."""
    return RecgwError(
        ErrorKind.NOT_FOUND,
        f"no upload with id {quote_client(upload_id, 64)}",
        reason=Reason.UPLOAD_NOT_FOUND,
    )


def validate_start(request: StartRequest) -> str:
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
        "unconfirmed": result.unconfirmed,
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
        unconfirmed=bool(data.get("unconfirmed", False)),
    )
