"""Python client for recgw, the gateway that streams call recordings into S3.

The asyncio API (grpc.aio) is primary; ``recgw_client.sync`` wraps it for
blocking code. Every call needs a bearer token: role ``uploader`` for uploads,
``admin`` for credentials. Failures raise ``RecgwError`` with the gRPC code.
Uploads resume by themselves after connection losses (``RetryPolicy``).
"""

from recgw_client._sources import Readable, Source
from recgw_client.admin import (
    CredentialsAdmin,
    CredentialsView,
    ServerSideEncryption,
    StorageTarget,
    VerifyCheck,
    VerifyResult,
)
from recgw_client.checksums import Checksummer, ObjectChecksums, crc32c
from recgw_client.errors import RecgwError
from recgw_client.retry import RetryCallback, RetryPolicy, is_retryable
from recgw_client.uploads import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_RETAIN_LIMIT,
    MAX_CHUNK_SIZE,
    UPLOAD_ID_HEADER,
    AbortResult,
    ProgressCallback,
    UploadClient,
    UploadIdCallback,
    UploadResult,
    UploadState,
    UploadStatus,
    abort_upload,
    get_upload_status,
    upload,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_RETAIN_LIMIT",
    "MAX_CHUNK_SIZE",
    "UPLOAD_ID_HEADER",
    "AbortResult",
    "Checksummer",
    "CredentialsAdmin",
    "CredentialsView",
    "ObjectChecksums",
    "ProgressCallback",
    "Readable",
    "RecgwError",
    "RetryCallback",
    "RetryPolicy",
    "ServerSideEncryption",
    "Source",
    "StorageTarget",
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
    "is_retryable",
    "upload",
]
