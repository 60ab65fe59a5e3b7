"""Streaming uploads, upload status and abort (asyncio, grpc.aio)."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from recgw.v1 import upload_pb2, upload_pb2_grpc

from recgw_client._channel import DEFAULT_TIMEOUT, ChannelOrTarget, bearer_metadata, open_channel
from recgw_client._sources import Source, open_source
from recgw_client.checksums import Checksummer, ObjectChecksums
from recgw_client.errors import RecgwError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "UPLOAD_ID_HEADER",
    "AbortResult",
    "ProgressCallback",
    "UploadClient",
    "UploadIdCallback",
    "UploadResult",
    "UploadState",
    "UploadStatus",
    "abort_upload",
    "get_upload_status",
    "upload",
]

MiB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 1 * MiB
MAX_CHUNK_SIZE = 4 * MiB
DEFAULT_CONTENT_TYPE = "application/octet-stream"
UPLOAD_ID_HEADER = "x-recgw-upload-id"

ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes sent so far, total size or None) after each chunk."""
UploadIdCallback = Callable[[str], None]
"""Called with the upload id as soon as the gateway accepted the start message."""


class UploadState(enum.Enum):
    """Life-cycle state of an upload."""

    UNSPECIFIED = 0
    OPEN = 1
    FINISHING = 2
    COMPLETE = 3
    ABORTED = 4
    EXPIRED = 5

    @classmethod
    def _from_proto(cls, value: int) -> UploadState:
        try:
            return cls(value)
        except ValueError:
            return cls.UNSPECIFIED


@dataclass(frozen=True)
class UploadResult:
    """The finished object; ``checksums`` are those the gateway computed and verified."""

    upload_id: str
    bucket: str
    key: str
    size: int
    etag: str
    version_id: str
    part_count: int
    checksums: ObjectChecksums


@dataclass(frozen=True)
class UploadStatus:
    """What GetUploadStatus reports about an upload."""

    upload_id: str
    state: UploadState
    committed_size: int
    received_size: int
    tenant_id: str
    key: str
    result: UploadResult | None
    error_message: str
    create_time: datetime | None
    update_time: datetime | None


@dataclass(frozen=True)
class AbortResult:
    """What AbortUpload did; ``detail`` explains anything left in S3."""

    state: UploadState
    storage_aborted: bool
    detail: str


def _checksums(message: upload_pb2.ObjectChecksums) -> ObjectChecksums:
    return ObjectChecksums(
        crc32c=message.crc32c if message.HasField("crc32c") else None,
        sha256=message.sha256 or None,
    )


def _result(response: upload_pb2.UploadResponse, upload_id: str | None = None) -> UploadResult:
    return UploadResult(
        upload_id=response.upload_id or upload_id or "",
        bucket=response.bucket,
        key=response.key,
        size=response.size,
        etag=response.etag,
        version_id=response.version_id,
        part_count=response.part_count,
        checksums=_checksums(response.checksums),
    )


def _time(stamp: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    return stamp.ToDatetime(tzinfo=UTC) if present else None


_CORE_INTERNAL_DETAILS = "Internal error from Core"
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}

_UploadCall = grpc.aio.StreamUnaryCall[upload_pb2.UploadRequest, upload_pb2.UploadResponse]


class _StatusLog:
    """Every status the call was given, in order: works around grpc/grpc#36066.

    When a write fails because the gateway is ending the RPC (an abort while
    data is still flowing), grpc.aio replaces the gateway's status with
    INTERNAL "Internal error from Core". The gateway's own status is also set
    on the call, before or after that, and is kept here. grpc has no public
    way to read it from a done callback, hence the private attribute; without
    it the INTERNAL error is reported unchanged.
    """

    def __init__(self, call: _UploadCall) -> None:
        self._statuses: list[tuple[grpc.StatusCode, str]] = []
        call.add_done_callback(self._record)

    def _record(self, call: object) -> None:
        status = getattr(getattr(call, "_cython_call", None), "_status", None)
        if status is None:
            return
        code = _STATUS_CODES.get(status.code())
        if code is not None:
            self._statuses.append((code, status.details() or ""))

    def resolve(self, error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
        """The gateway's status behind ``error``."""
        code, details = error.code(), error.details() or ""
        if code is grpc.StatusCode.INTERNAL and details == _CORE_INTERNAL_DETAILS:
            for logged in self._statuses:
                if logged != (grpc.StatusCode.INTERNAL, _CORE_INTERNAL_DETAILS):
                    return logged
        return code, details


class _UploadIdWatch:
    """Reports the upload id from the response header as soon as it arrives."""

    def __init__(
        self,
        call: _UploadCall,
        callback: UploadIdCallback | None,
    ) -> None:
        self._call = call
        self._callback = callback
        self.upload_id: str | None = None
        self.callback_error: Exception | None = None

    async def run(self) -> None:
        try:
            metadata = await self._call.initial_metadata()
        except Exception:
            return  # the call failed; its status is reported by the upload itself
        value = metadata.get(UPLOAD_ID_HEADER) if metadata is not None else None
        if value is None:
            return
        self.upload_id = value.decode() if isinstance(value, bytes) else value
        if self._callback is None:
            return
        try:
            self._callback(self.upload_id)
        except Exception as exc:
            # Whoever needed the id (to resume later) did not get it: give up.
            self.callback_error = exc
            self._call.cancel()


class _Sender:
    """Writes the stream: start, the data chunks, then finish_write with the checksums."""

    def __init__(
        self,
        call: _UploadCall,
        total: int | None,
        progress: ProgressCallback | None,
        checksummer: Checksummer | None,
    ) -> None:
        self._call = call
        self._total = total
        self._progress = progress
        self._checksummer = checksummer
        # Set once every byte is handed to gRPC and finish_write is being sent.
        self.finishing = False

    async def run(self, start: upload_pb2.UploadStart, chunks: AsyncIterator[bytes]) -> None:
        call, progress, checksummer = self._call, self._progress, self._checksummer
        offset = 0
        try:
            if progress is not None:
                progress(0, self._total)
            await call.write(upload_pb2.UploadRequest(start=start, write_offset=0))
            async for chunk in chunks:
                request = upload_pb2.UploadRequest(write_offset=offset, data=chunk)
                if checksummer is None:
                    await call.write(request)
                else:
                    # Hash in a thread while gRPC sends: the pure-Python CRC32C is slow.
                    await asyncio.gather(
                        call.write(request), asyncio.to_thread(checksummer.update, chunk)
                    )
                offset += len(chunk)
                if progress is not None:
                    progress(offset, self._total)
            final = upload_pb2.UploadRequest(write_offset=offset, finish_write=True)
            if checksummer is not None:
                sums = checksummer.result()
                final.object_checksums.crc32c = sums.crc32c or 0
                final.object_checksums.sha256 = sums.sha256 or b""
            self.finishing = True
            await call.write(final)
            await call.done_writing()
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
            pass  # The call has ended; awaiting it gives the gateway's status.


async def _response(call: _UploadCall) -> upload_pb2.UploadResponse:
    return await call


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class UploadClient:
    """Client of UploadService; one instance may run many uploads at once.

    ``channel_or_target`` is a ``grpc.aio.Channel`` (not closed by this client)
    or an address such as ``"gateway:50051"`` (a channel the client owns;
    plaintext unless ``channel_credentials`` are given). ``token`` is the
    bearer token of an ``uploader``.
    """

    def __init__(
        self,
        channel_or_target: ChannelOrTarget,
        token: str,
        *,
        channel_credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self._metadata = bearer_metadata(token)
        self._secrets = (token.strip(),)
        self._channel, self._owns_channel = open_channel(channel_or_target, channel_credentials)
        self._stub = upload_pb2_grpc.UploadServiceStub(self._channel)
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channel={self._channel!r})"

    async def close(self) -> None:
        """Close the channel if this client opened it."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> UploadClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def upload(
        self,
        source: Source,
        tenant_id: str,
        object_name: str,
        *,
        content_type: str = DEFAULT_CONTENT_TYPE,
        metadata: Mapping[str, str] | None = None,
        expected_size: int | None = None,
        upload_id: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: ProgressCallback | None = None,
        compute_checksums: bool = True,
        on_upload_id: UploadIdCallback | None = None,
    ) -> UploadResult:
        """Stream ``source`` into the tenant's bucket as ``object_name``.

        ``source`` is a path (its size becomes ``expected_size``), bytes, a
        binary stream such as ``sys.stdin.buffer`` (read in a thread), or an
        (async) iterable of byte chunks such as a live recording. With
        ``compute_checksums`` the CRC32C and SHA-256 of the bytes sent go with
        the last message and the gateway verifies them before the object
        becomes visible. Raises RecgwError with the gateway's status code.
        """
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE} bytes")
        if expected_size is not None and expected_size < 0:
            raise ValueError("expected_size must not be negative")
        async with open_source(source, chunk_size) as (chunks, known_size):
            total = known_size if expected_size is None else expected_size
            start = upload_pb2.UploadStart(
                tenant_id=tenant_id,
                object_name=object_name,
                content_type=content_type,
                metadata=dict(metadata or {}),
                expected_size=total,
                upload_id=upload_id or "",
            )
            checksummer = Checksummer() if compute_checksums else None
            return await self._stream(start, chunks, total, progress, checksummer, on_upload_id)

    async def _stream(
        self,
        start: upload_pb2.UploadStart,
        chunks: AsyncIterator[bytes],
        total: int | None,
        progress: ProgressCallback | None,
        checksummer: Checksummer | None,
        on_upload_id: UploadIdCallback | None,
    ) -> UploadResult:
        call = self._stub.Upload(metadata=self._metadata)
        statuses = _StatusLog(call)
        watch = _UploadIdWatch(call, on_upload_id)
        writer = _Sender(call, total, progress, checksummer)
        watcher = asyncio.ensure_future(watch.run())
        sender = asyncio.ensure_future(writer.run(start, chunks))
        responder = asyncio.ensure_future(_response(call))
        try:
            # Wait for either: a live source may be idle for long, and a gateway
            # error must not wait for its next chunk.
            await asyncio.wait((sender, responder), return_when=asyncio.FIRST_COMPLETED)
            if sender.done():
                sender.result()  # raises the source's error, if any
            elif writer.finishing:
                # The response can overtake the completion of the last write.
                await asyncio.gather(sender, return_exceptions=True)
            else:
                await _cancel(sender)
            response = await responder
            await watcher
        except BaseException as exc:
            call.cancel()
            await _cancel(sender, responder, watcher)
            if watch.callback_error is not None:
                raise watch.callback_error from None
            if isinstance(exc, grpc.aio.AioRpcError):
                code, details = statuses.resolve(exc)
                raise RecgwError.from_status(
                    code, details, upload_id=watch.upload_id, secrets=self._secrets
                ) from None
            raise
        if not writer.finishing:
            raise RecgwError(
                grpc.StatusCode.UNKNOWN,
                "the gateway ended the upload before all data was sent",
                upload_id=watch.upload_id,
            )
        return _result(response, watch.upload_id)

    async def get_upload_status(self, upload_id: str) -> UploadStatus:
        """The state and committed size of an upload."""
        try:
            response = await self._stub.GetUploadStatus(
                upload_pb2.GetUploadStatusRequest(upload_id=upload_id),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise RecgwError.from_rpc_error(
                err, upload_id=upload_id, secrets=self._secrets
            ) from None
        return UploadStatus(
            upload_id=response.upload_id,
            state=UploadState._from_proto(response.state),
            committed_size=response.committed_size,
            received_size=response.received_size,
            tenant_id=response.tenant_id,
            key=response.key,
            result=_result(response.result) if response.HasField("result") else None,
            error_message=response.error_message,
            create_time=_time(response.create_time, response.HasField("create_time")),
            update_time=_time(response.update_time, response.HasField("update_time")),
        )

    async def abort_upload(self, upload_id: str) -> AbortResult:
        """Cancel an upload; nothing of it becomes visible."""
        try:
            response = await self._stub.AbortUpload(
                upload_pb2.AbortUploadRequest(upload_id=upload_id),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise RecgwError.from_rpc_error(
                err, upload_id=upload_id, secrets=self._secrets
            ) from None
        return AbortResult(
            state=UploadState._from_proto(response.state),
            storage_aborted=response.storage_aborted,
            detail=response.detail,
        )


async def upload(
    channel_or_target: ChannelOrTarget,
    token: str,
    source: Source,
    tenant_id: str,
    object_name: str,
    *,
    content_type: str = DEFAULT_CONTENT_TYPE,
    metadata: Mapping[str, str] | None = None,
    expected_size: int | None = None,
    upload_id: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: ProgressCallback | None = None,
    compute_checksums: bool = True,
    on_upload_id: UploadIdCallback | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
) -> UploadResult:
    """Stream one object; see ``UploadClient.upload``."""
    async with UploadClient(
        channel_or_target, token, channel_credentials=channel_credentials
    ) as client:
        return await client.upload(
            source,
            tenant_id,
            object_name,
            content_type=content_type,
            metadata=metadata,
            expected_size=expected_size,
            upload_id=upload_id,
            chunk_size=chunk_size,
            progress=progress,
            compute_checksums=compute_checksums,
            on_upload_id=on_upload_id,
        )


async def get_upload_status(
    channel_or_target: ChannelOrTarget,
    token: str,
    upload_id: str,
    *,
    channel_credentials: grpc.ChannelCredentials | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - a gRPC deadline the gateway sees
) -> UploadStatus:
    """The state and committed size of an upload."""
    async with UploadClient(
        channel_or_target, token, channel_credentials=channel_credentials, timeout=timeout
    ) as client:
        return await client.get_upload_status(upload_id)


async def abort_upload(
    channel_or_target: ChannelOrTarget,
    token: str,
    upload_id: str,
    *,
    channel_credentials: grpc.ChannelCredentials | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - a gRPC deadline the gateway sees
) -> AbortResult:
    """Cancel an upload; nothing of it becomes visible."""
    async with UploadClient(
        channel_or_target, token, channel_credentials=channel_credentials, timeout=timeout
    ) as client:
        return await client.abort_upload(upload_id)
