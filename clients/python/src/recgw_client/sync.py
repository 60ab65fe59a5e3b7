"""Blocking wrappers around the asyncio API, for scripts without an event loop.

Each call runs its own event loop and channel, so pass an address, not a
channel. Inside a running event loop use the asyncio API instead.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping, Sequence

import grpc

from recgw_client._channel import DEFAULT_TIMEOUT, TlsConfig
from recgw_client._sources import Buffer, Readable
from recgw_client.retry import RetryCallback, RetryPolicy
from recgw_client.uploads import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CONTENT_TYPE,
    DEFAULT_RETAIN_LIMIT,
    DEFAULT_SPILL_LIMIT,
    HEARTBEAT_INTERVAL,
    AbortResult,
    CommittedCallback,
    ProgressCallback,
    SalvageResult,
    UploadIdCallback,
    UploadResult,
    UploadStatus,
)
from recgw_client.uploads import abort_upload as _abort_upload
from recgw_client.uploads import get_upload_status as _get_upload_status
from recgw_client.uploads import salvage_upload as _salvage_upload
from recgw_client.uploads import upload as _upload

__all__ = ["SyncSource", "abort_upload", "get_upload_status", "salvage_upload", "upload"]

SyncSource = str | os.PathLike[str] | bytes | bytearray | memoryview | Readable | Iterable[Buffer]
"""A path, bytes, a binary stream (read in a thread), or an iterable of chunks."""


def upload(
    target: str | Sequence[str],
    token: str,
    source: SyncSource,
    tenant_id: str,
    object_name: str,
    *,
    content_type: str = DEFAULT_CONTENT_TYPE,
    metadata: Mapping[str, str] | None = None,
    expected_size: int | None = None,
    upload_id: str | None = None,
    source_offset: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: ProgressCallback | None = None,
    on_committed: CommittedCallback | None = None,
    compute_checksums: bool = True,
    on_upload_id: UploadIdCallback | None = None,
    outage_tolerance: float | None = None,
    retain_limit: int = DEFAULT_RETAIN_LIMIT,
    spill_limit: int = DEFAULT_SPILL_LIMIT,
    spill_dir: str | os.PathLike[str] | None = None,
    on_retry: RetryCallback | None = None,
    retry_policy: RetryPolicy | None = None,
    heartbeat_interval: float = HEARTBEAT_INTERVAL,
    tls: TlsConfig | None = None,
    plaintext: bool | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
) -> UploadResult:
    """Blocking ``recgw_client.upload``; it rides out outages the same way."""
    return asyncio.run(
        _upload(
            target,
            token,
            source,
            tenant_id,
            object_name,
            content_type=content_type,
            metadata=metadata,
            expected_size=expected_size,
            upload_id=upload_id,
            source_offset=source_offset,
            chunk_size=chunk_size,
            progress=progress,
            on_committed=on_committed,
            compute_checksums=compute_checksums,
            on_upload_id=on_upload_id,
            outage_tolerance=outage_tolerance,
            retain_limit=retain_limit,
            spill_limit=spill_limit,
            spill_dir=spill_dir,
            on_retry=on_retry,
            retry_policy=retry_policy,
            heartbeat_interval=heartbeat_interval,
            tls=tls,
            plaintext=plaintext,
            channel_credentials=channel_credentials,
        )
    )


def get_upload_status(
    target: str | Sequence[str],
    token: str,
    upload_id: str,
    *,
    tls: TlsConfig | None = None,
    plaintext: bool | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> UploadStatus:
    """Blocking ``recgw_client.get_upload_status``."""
    return asyncio.run(
        _get_upload_status(
            target,
            token,
            upload_id,
            tls=tls,
            plaintext=plaintext,
            channel_credentials=channel_credentials,
            timeout=timeout,
        )
    )


def abort_upload(
    target: str | Sequence[str],
    token: str,
    upload_id: str,
    *,
    tls: TlsConfig | None = None,
    plaintext: bool | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> AbortResult:
    """Blocking ``recgw_client.abort_upload``."""
    return asyncio.run(
        _abort_upload(
            target,
            token,
            upload_id,
            tls=tls,
            plaintext=plaintext,
            channel_credentials=channel_credentials,
            timeout=timeout,
        )
    )


def salvage_upload(
    target: str | Sequence[str],
    token: str,
    upload_id: str,
    *,
    tls: TlsConfig | None = None,
    plaintext: bool | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> SalvageResult:
    """Blocking ``recgw_client.salvage_upload``."""
    return asyncio.run(
        _salvage_upload(
            target,
            token,
            upload_id,
            tls=tls,
            plaintext=plaintext,
            channel_credentials=channel_credentials,
            timeout=timeout,
        )
    )
