"""Python client for recgw, the gateway that streams call recordings into S3.

The asyncio API (grpc.aio) is primary; ``recgw_client.sync`` wraps it for
blocking code. Every call needs a bearer token: role ``uploader`` for uploads,
``admin`` for credentials. Failures raise ``RecgwError`` with the gRPC code
and the gateway's structured reason. Uploads ride out outages by themselves
(``RetryPolicy``, ``outage_tolerance``), spilling a live source to a private
temporary file while the gateway is unreachable, and continue an existing
upload id from its committed size. TLS by default except on loopback
(``TlsConfig``, ``plaintext``). The ``recgw`` command is in
``recgw_client.cli`` (``pip install 'recgw-client[cli]'``).
"""

from recgw_client._channel import TlsConfig, is_loopback_target
from recgw_client._sources import Readable, Source
from recgw_client.admin import (
    AbandonedUploads,
    CredentialsAdmin,
    CredentialsView,
    ServerSideEncryption,
    StorageTarget,
    VerifyCheck,
    VerifyResult,
)
from recgw_client.checksums import Checksummer, ObjectChecksums, crc32c
from recgw_client.errors import RecgwError
from recgw_client.retry import (
    DEFAULT_OUTAGE_TOLERANCE,
    RetryCallback,
    RetryPolicy,
    is_retryable,
    retry_action,
)
from recgw_client.uploads import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_RETAIN_LIMIT,
    DEFAULT_SPILL_LIMIT,
    HEARTBEAT_INTERVAL,
    MAX_CHUNK_SIZE,
    UPLOAD_ID_HEADER,
    AbortResult,
    CommittedCallback,
    ProgressCallback,
    SalvageResult,
    UploadClient,
    UploadIdCallback,
    UploadResult,
    UploadState,
    UploadStatus,
    abort_upload,
    get_upload_status,
    salvage_upload,
    upload,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_OUTAGE_TOLERANCE",
    "DEFAULT_RETAIN_LIMIT",
    "DEFAULT_SPILL_LIMIT",
    "HEARTBEAT_INTERVAL",
    "MAX_CHUNK_SIZE",
    "UPLOAD_ID_HEADER",
    "AbandonedUploads",
    "AbortResult",
    "Checksummer",
    "CommittedCallback",
    "CredentialsAdmin",
    "CredentialsView",
    "ObjectChecksums",
    "ProgressCallback",
    "Readable",
    "RecgwError",
    "RetryCallback",
    "RetryPolicy",
    "SalvageResult",
    "ServerSideEncryption",
    "Source",
    "StorageTarget",
    "TlsConfig",
    "UploadClient",
    "UploadIdCallback",
    "UploadResult",
    "UploadState",
    "UploadStatus",
    "VerifyCheck",
    "VerifyResult",
    "abort_upload",
    "crc32c",
    "get_upload_status",
    "is_loopback_target",
    "is_retryable",
    "retry_action",
    "salvage_upload",
    "upload",
]
