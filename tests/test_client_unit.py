"""Unit tests of recgw_client and the client CLI against a fake in-process gateway.

The fake runs a grpc.aio server on its own event loop in a thread, so both
the asyncio API (asyncio.run in the test) and the CLI (which runs its own
loop) talk to it over loopback gRPC.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
import typer.testing
from google.protobuf import message as protobuf_message
from google.rpc import error_details_pb2, status_pb2
from recgw.v1 import credentials_pb2, credentials_pb2_grpc, upload_pb2, upload_pb2_grpc

import recgw_client
import recgw_client.sync
from recgw_client import (
    UPLOAD_ID_HEADER,
    CredentialsAdmin,
    RecgwError,
    UploadClient,
    UploadResult,
    UploadState,
    crc32c,
)
from recgw_client.cli import commands as cli_client
from recgw_server.dev.stack import free_port

app = cli_client.make_app(plugins=False)

TOKEN = "uploader-token-0123456789abcdef"
UPLOAD_ID = "0b0c3f3e-7a0c-4c55-9f3e-2d1f6a9c1e42"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
WAIT = 10.0  # seconds; only bounds a wait for an event that is expected to happen


def crc32c_bitwise(data: bytes) -> int:
    """Reference CRC32C, one bit at a time, independent of the client's tables."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# --- the fake gateway --------------------------------------------------------------------


def error_trailers(
    code: grpc.StatusCode, message: str, reason: str, details: dict[str, str] | None = None
) -> tuple[tuple[str, bytes], ...]:
    """The gateway's `grpc-status-details-bin` trailer: a Status with one ErrorInfo."""
    if not reason:
        return ()
    info = error_details_pb2.ErrorInfo(reason=reason, domain="recgw.v1", metadata=details or {})
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(info)
    return (("grpc-status-details-bin", status.SerializeToString()),)


async def abort(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    message: str,
    reason: str = "",
    **details: str,
) -> NoReturn:
    """End the call as the gateway does: code, message and ErrorInfo."""
    await context.abort(
        code, message, trailing_metadata=error_trailers(code, message, reason, details)
    )
    raise AssertionError("abort returned")


OPEN = upload_pb2.UPLOAD_STATE_OPEN
FINISHING = upload_pb2.UPLOAD_STATE_FINISHING
COMPLETE = upload_pb2.UPLOAD_STATE_COMPLETE
ABORTED = upload_pb2.UPLOAD_STATE_ABORTED
EXPIRED = upload_pb2.UPLOAD_STATE_EXPIRED


@dataclass
class RecordedUpload:
    """One Upload stream as the fake received it."""

    metadata: dict[str, str | bytes]
    requests: list[upload_pb2.UploadRequest] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)
    broken: bool = False
    # The status the fake ended the stream with, if it refused or broke it.
    refused: grpc.StatusCode | None = None

    @property
    def data(self) -> bytes:
        return b"".join(r.data for r in self.requests)


@dataclass
class Break:
    """How the fake ends one accepted stream early (streams take the breaks in order).

    ``at``: once the gateway has received this many bytes of the object; None: at
    finish_write, after doing ``at_finish`` to the upload: "complete" (only the reply
    is lost), "open" (the bytes after the committed size are lost), "finishing"
    (everything committed; the upload completes when the next stream opens).
    ``code``: the status to abort with; None cuts the TCP connection instead (the
    client must then connect through ``FakeServer.proxy_address``).
    ``before_header``: break on the start message, before the upload id header.
    ``stays_attached``: the next streams of the upload find the broken one still
    attached, as a gateway that has not yet noticed it is gone.
    ``forget``: the gateway forgets the upload (a restart without a session store).
    ``expire``: the upload expires instead of staying open.
    ``status_failures``: the next this many unary calls fail with UNAVAILABLE.
    ``reason``: the ErrorInfo reason of ``code``.
    ``unconfirmed``: with ``at_finish="complete"``, the completion is recorded as
    COMPLETION_UNCONFIRMED (S3's answer was lost, the object could not be checked).
    """

    at: int | None = 0
    code: grpc.StatusCode | None = grpc.StatusCode.UNAVAILABLE
    message: str = "the gateway went away"
    reason: str = ""
    unconfirmed: bool = False
    at_finish: str = "complete"
    before_header: bool = False
    stays_attached: int = 0
    forget: bool = False
    expire: bool = False
    status_failures: int = 0


@dataclass
class FakeSession:
    """An upload as the fake gateway's session store holds it."""

    start: upload_pb2.UploadStart
    state: int = OPEN
    committed: bytearray = field(default_factory=bytearray)
    # Received after the committed bytes; the first `in_flight` whole parts are being written.
    pending: bytearray = field(default_factory=bytearray)
    in_flight: int = 0
    # In-flight parts of a broken stream that land only when the next stream opens.
    late: bool = False
    writer: RecordedUpload | None = None
    stale_writers: int = 0
    finish_request: upload_pb2.UploadRequest | None = None
    result: upload_pb2.UploadResponse | None = None
    error_message: str = ""

    @property
    def received(self) -> int:
        return len(self.committed) + len(self.pending)


def _seeded_session() -> FakeSession:
    """A finished upload `u-1` for the status and abort tests."""
    session = FakeSession(
        start=upload_pb2.UploadStart(tenant_id="acme", object_name="a.webm", upload_id="u-1"),
        state=COMPLETE,
        committed=bytearray(b"hello world"),
    )
    session.result = upload_pb2.UploadResponse(
        upload_id="u-1", bucket="customer-bucket", key="uploads/a.webm", size=11
    )
    return session


class FakeGateway(
    upload_pb2_grpc.UploadServiceServicer, credentials_pb2_grpc.CredentialsServiceServicer
):
    """Checks the bearer token, records every message and answers like the gateway.

    Uploads are resumable: bytes become committed a whole part (``part_size``)
    at a time; up to ``max_in_flight`` whole parts wait uncommitted ("being
    written to S3"), one of which lands every ``polls_per_landing`` status
    queries. A broken stream loses its uncommitted bytes; its in-flight parts
    land at once, or with ``late_landing`` only when the next stream opens.
    """

    def __init__(self) -> None:
        self.uploads: list[RecordedUpload] = []
        self.sessions: dict[str, FakeSession] = {"u-1": _seeded_session()}
        self.unary_metadata: list[dict[str, str | bytes]] = []
        self.unary_requests: list[protobuf_message.Message] = []
        self.send_header = True
        # (number of messages received, code, details[, reason]): abort after that message.
        self.fail_after: tuple[Any, ...] | None = None
        self.unary_error: tuple[Any, ...] | None = None
        # The next this many unary calls fail with UNAVAILABLE.
        self.unary_failures = 0
        self.upload_started = threading.Event()
        self.data_received = threading.Event()
        # Offsets of the empty messages a stream sent to show it is alive.
        self.heartbeats: list[int] = []
        self.heartbeat = threading.Event()
        self.part_size = 1 << 40  # by default nothing commits before finish_write
        self.max_in_flight = 0
        self.polls_per_landing = 1
        self.late_landing = False
        self.breaks: collections.deque[Break] = collections.deque()
        self.status_queries = 0
        self.salvage_implemented = True
        self.max_lag = 0  # the most bytes received but not committed at any time
        self.cut: Callable[[], None] = lambda: None
        self._polls = 0

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str | bytes]:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("authorization") != f"Bearer {TOKEN}":
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token",
                "TOKEN_INVALID",
            )
        return metadata

    # --- parts --------------------------------------------------------------------------

    def _land(self, session: FakeSession, parts: int = 1) -> None:
        """In-flight parts become durable."""
        for _ in range(min(parts, session.in_flight)):
            session.committed += session.pending[: self.part_size]
            del session.pending[: self.part_size]
            session.in_flight -= 1

    def _take(self, session: FakeSession, data: bytes) -> None:
        session.pending += data
        while len(session.pending) >= (session.in_flight + 1) * self.part_size:
            session.in_flight += 1
        self.max_lag = max(self.max_lag, len(session.pending))
        self._land(session, session.in_flight - self.max_in_flight)

    def _detach(self, session: FakeSession, record: RecordedUpload, brk: Break | None) -> None:
        """The stream is gone: what was not committed is lost."""
        if session.writer is not record:
            return
        session.writer = None
        if session.state != OPEN:
            return
        if self.late_landing and session.in_flight:
            del session.pending[session.in_flight * self.part_size :]
            session.late = True
        else:
            self._land(session, session.in_flight)
            session.pending.clear()
        if brk is not None and record.broken:
            session.stale_writers = brk.stays_attached
            if brk.expire:
                session.state = EXPIRED
                session.error_message = "idle for too long"

    async def _break(
        self,
        brk: Break,
        session: FakeSession,
        record: RecordedUpload,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> NoReturn:
        record.broken = True
        self.unary_failures += brk.status_failures
        self._detach(session, record, brk)
        if brk.forget:
            del self.sessions[session.start.upload_id]
        if brk.code is None:
            self.cut()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection cut")
        await abort(context, brk.code, brk.message, brk.reason)

    # --- Upload -------------------------------------------------------------------------

    async def _refuse(
        self,
        record: RecordedUpload,
        context: grpc.aio.ServicerContext[Any, Any],
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        **details: str,
    ) -> NoReturn:
        record.refused = code
        await abort(context, code, message, reason, **details)

    async def _open(
        self,
        request: upload_pb2.UploadRequest,
        record: RecordedUpload,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> FakeSession:
        if not request.HasField("start"):
            await self._refuse(
                record,
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "send 'start' first",
                "STREAM_OUT_OF_ORDER",
            )
        start = upload_pb2.UploadStart()
        start.CopyFrom(request.start)
        upload_id = start.upload_id or UPLOAD_ID
        start.upload_id = upload_id
        session = self.sessions.get(upload_id)
        if session is None:
            session = FakeSession(start=start)
            self.sessions[upload_id] = session
        elif (session.start.tenant_id, session.start.object_name) != (
            start.tenant_id,
            start.object_name,
        ):
            # Like the gateway: the upload keeps what its first start said (expected_size...).
            await self._refuse(
                record,
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"upload id {upload_id} belongs to another tenant or object name",
                "UPLOAD_ID_CONFLICT",
            )
        if session.state == FINISHING and session.finish_request is not None:
            self._complete(session, session.finish_request)  # finished in the background
        if session.state in (COMPLETE, upload_pb2.UPLOAD_STATE_COMPLETION_UNCONFIRMED):
            if request.finish_write and request.write_offset == len(session.committed):
                return session
            await self._refuse(
                record,
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"upload {upload_id} is already complete",
                "UPLOAD_COMPLETE",
            )
        if session.state in (ABORTED, EXPIRED):
            await self._refuse(
                record,
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"upload {upload_id} has ended",
                "UPLOAD_ENDED",
            )
        if session.writer is not None or session.stale_writers:
            session.stale_writers = max(session.stale_writers - 1, 0)
            await self._refuse(
                record,
                context,
                grpc.StatusCode.ABORTED,
                f"another stream is writing upload {upload_id}; retry later",
                "ANOTHER_WRITER",
                upload_id=upload_id,
            )
        if session.late:
            self._land(session, session.in_flight)
            session.late = False
        if request.write_offset != session.received:
            await self._refuse(
                record,
                context,
                grpc.StatusCode.OUT_OF_RANGE,
                f"write_offset {request.write_offset} does not match the committed size "
                f"{session.received} of upload {upload_id}",
                "OFFSET_MISMATCH",
                upload_id=upload_id,
                committed_size=str(len(session.committed)),
                received_size=str(session.received),
                write_offset=str(request.write_offset),
            )
        session.writer = record
        return session

    def _complete(self, session: FakeSession, request: upload_pb2.UploadRequest) -> None:
        self._land(session, session.in_flight)
        session.committed += session.pending
        session.pending.clear()
        data = bytes(session.committed)
        start = session.start
        if start.HasField("expected_size") and start.expected_size != len(data):
            session.state = ABORTED
            raise ValueError(f"expected_size is {start.expected_size} but {len(data)} arrived")
        crc, sha = crc32c(data), hashlib.sha256(data).digest()
        if request.HasField("object_checksums"):
            sums = request.object_checksums
            if sums.crc32c != crc or sums.sha256 != sha:
                session.state = ABORTED
                raise ValueError("the object checksums do not match the bytes received")
        session.result = upload_pb2.UploadResponse(
            upload_id=start.upload_id,
            bucket="customer-bucket",
            key="uploads/" + start.object_name,
            size=len(data),
            etag='"0123abcd-2"',
            version_id="v1",
            part_count=2,
            checksums=upload_pb2.ObjectChecksums(crc32c=crc, sha256=sha),
        )
        session.state = COMPLETE
        session.writer = None

    async def _finish(
        self,
        session: FakeSession,
        request: upload_pb2.UploadRequest,
        record: RecordedUpload,
        brk: Break | None,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> upload_pb2.UploadResponse:
        if brk is not None and brk.at is None and brk.at_finish == "open":
            await self._break(brk, session, record, context)
        if brk is not None and brk.at is None and brk.at_finish == "finishing":
            self._land(session, session.in_flight)
            session.committed += session.pending
            session.pending.clear()
            session.state = FINISHING
            session.finish_request = request
            session.writer = None
            await self._break(brk, session, record, context)
        try:
            self._complete(session, request)
        except ValueError as err:
            await self._refuse(
                record, context, grpc.StatusCode.DATA_LOSS, str(err), "OBJECT_CHECKSUM_MISMATCH"
            )
        if brk is not None and brk.at is None:
            if brk.unconfirmed:
                session.state = upload_pb2.UPLOAD_STATE_COMPLETION_UNCONFIRMED
                assert session.result is not None
                session.result.unconfirmed = True
            await self._break(brk, session, record, context)
        assert session.result is not None
        return session.result

    async def Upload(
        self,
        request_iterator: AsyncIterator[upload_pb2.UploadRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> upload_pb2.UploadResponse:
        record = RecordedUpload(metadata=dict(context.invocation_metadata() or ()))
        self.uploads.append(record)
        session: FakeSession | None = None
        brk: Break | None = None
        try:
            await self._check(context)
            async for request in request_iterator:
                record.requests.append(request)
                if request.data:
                    self.data_received.set()
                elif not request.finish_write and not request.HasField("start"):
                    self.heartbeats.append(request.write_offset)
                    self.heartbeat.set()
                if session is None:
                    self.upload_started.set()
                    session = await self._open(request, record, context)
                    if session.writer is record and self.breaks:
                        brk = self.breaks.popleft()
                    if brk is not None and brk.before_header:
                        await self._break(brk, session, record, context)
                    if self.send_header:
                        await context.send_initial_metadata(
                            ((UPLOAD_ID_HEADER, session.start.upload_id),)
                        )
                    if session.state == COMPLETE:  # finishing again is idempotent
                        assert session.result is not None
                        return session.result
                elif request.HasField("start"):
                    await self._refuse(
                        record, context, grpc.StatusCode.INVALID_ARGUMENT, "a second start"
                    )
                if self.fail_after is not None and len(record.requests) >= self.fail_after[0]:
                    await abort(context, *self.fail_after[1:])
                if request.write_offset != session.received:
                    await self._refuse(
                        record,
                        context,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"write_offset {request.write_offset}, expected {session.received}",
                        "STREAM_OUT_OF_ORDER",
                    )
                if request.HasField("data_crc32c") and crc32c(request.data) != request.data_crc32c:
                    await self._refuse(
                        record,
                        context,
                        grpc.StatusCode.DATA_LOSS,
                        "data_crc32c does not match",
                        "CHUNK_CHECKSUM_MISMATCH",
                    )
                self._take(session, request.data)
                if brk is not None and brk.at is not None and session.received >= brk.at:
                    await self._break(brk, session, record, context)
                if request.finish_write:
                    return await self._finish(session, request, record, brk, context)
            await abort(
                context,
                grpc.StatusCode.ABORTED,
                "the stream ended without finish_write",
                "STREAM_ENDED_WITHOUT_FINISH",
            )
        finally:
            if session is not None:
                self._detach(session, record, brk)
            record.ended.set()

    # --- unary calls --------------------------------------------------------------------

    async def _unary(self, request: protobuf_message.Message, context: Any) -> None:
        self.unary_metadata.append(await self._check(context))
        self.unary_requests.append(request)
        if self.unary_failures > 0:
            self.unary_failures -= 1
            await abort(context, grpc.StatusCode.UNAVAILABLE, "status briefly unavailable")
        if self.unary_error is not None:
            await abort(context, *self.unary_error)

    async def GetUploadStatus(
        self,
        request: upload_pb2.GetUploadStatusRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> upload_pb2.GetUploadStatusResponse:
        await self._unary(request, context)
        self.status_queries += 1
        session = self.sessions.get(request.upload_id)
        if session is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no upload {request.upload_id}",
                "UPLOAD_NOT_FOUND",
                upload_id=request.upload_id,
            )
        if session.state == OPEN and session.in_flight and not session.late:
            self._polls += 1
            if self._polls >= self.polls_per_landing:
                self._polls = 0
                self._land(session)
        response = upload_pb2.GetUploadStatusResponse(
            upload_id=request.upload_id,
            state=session.state,  # type: ignore[arg-type]
            committed_size=len(session.committed),
            received_size=session.received,
            tenant_id=session.start.tenant_id,
            key="uploads/" + session.start.object_name,
            error_message=session.error_message,
        )
        if session.result is not None:
            response.result.CopyFrom(session.result)
        response.create_time.FromSeconds(1_800_000_000)
        return response

    async def AbortUpload(
        self, request: upload_pb2.AbortUploadRequest, context: Any
    ) -> upload_pb2.AbortUploadResponse:
        await self._unary(request, context)
        session = self.sessions.get(request.upload_id)
        if session is not None and session.state != COMPLETE:
            session.state = ABORTED
            session.error_message = "aborted by AbortUpload"
        return upload_pb2.AbortUploadResponse(
            state=upload_pb2.UPLOAD_STATE_ABORTED,
            storage_aborted=False,
            detail="AbortMultipartUpload was denied; the bucket's lifecycle rule removes the parts",
        )

    async def SalvageUpload(
        self, request: upload_pb2.SalvageUploadRequest, context: Any
    ) -> upload_pb2.SalvageUploadResponse:
        await self._unary(request, context)
        if not self.salvage_implemented:
            await abort(context, grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        session = self.sessions.get(request.upload_id)
        if session is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no such upload", "UPLOAD_NOT_FOUND")
        if session.state == OPEN:
            session.state = upload_pb2.UPLOAD_STATE_SALVAGED
            data = bytes(session.committed)
            session.result = upload_pb2.UploadResponse(
                upload_id=request.upload_id,
                bucket="customer-bucket",
                key="uploads/" + session.start.object_name + ".partial",
                size=len(data),
                checksums=upload_pb2.ObjectChecksums(
                    crc32c=crc32c(data), sha256=hashlib.sha256(data).digest()
                ),
            )
        return upload_pb2.SalvageUploadResponse(
            state=session.state,  # type: ignore[arg-type]
            result=session.result,
        )

    def _view(self, tenant_id: str, target: credentials_pb2.StorageTarget) -> Any:
        view = credentials_pb2.CredentialsView(
            tenant_id=tenant_id, version=3, access_key_id_hint="****MPLE", target=target
        )
        view.update_time.FromSeconds(1_800_000_000)
        return view

    async def SetCredentials(
        self, request: credentials_pb2.SetCredentialsRequest, context: Any
    ) -> credentials_pb2.SetCredentialsResponse:
        await self._unary(request, context)
        return credentials_pb2.SetCredentialsResponse(
            credentials=self._view(request.tenant_id, request.target)
        )

    async def DescribeCredentials(
        self, request: credentials_pb2.DescribeCredentialsRequest, context: Any
    ) -> credentials_pb2.DescribeCredentialsResponse:
        await self._unary(request, context)
        target = credentials_pb2.StorageTarget(
            region="us-west-1",
            bucket="customer-bucket",
            prefix="uploads/",
            encryption=credentials_pb2.ServerSideEncryption(
                mode=credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_KMS, kms_key_id="alias/rec"
            ),
        )
        return credentials_pb2.DescribeCredentialsResponse(
            credentials=self._view(request.tenant_id, target)
        )

    async def DeleteCredentials(
        self, request: credentials_pb2.DeleteCredentialsRequest, context: Any
    ) -> credentials_pb2.DeleteCredentialsResponse:
        await self._unary(request, context)
        return credentials_pb2.DeleteCredentialsResponse()

    async def VerifyCredentials(
        self, request: credentials_pb2.VerifyCredentialsRequest, context: Any
    ) -> credentials_pb2.VerifyCredentialsResponse:
        await self._unary(request, context)
        if request.tenant_id == "broken":
            return credentials_pb2.VerifyCredentialsResponse(
                ok=False,
                key="uploads/.recgw-verify",
                error_code="AccessDenied",
                error_message="the key may not s3:PutObject on customer-bucket/uploads/*",
                checks=[
                    credentials_pb2.CredentialsCheck(
                        name="create_multipart_upload",
                        result=credentials_pb2.CREDENTIALS_CHECK_RESULT_FAILED,
                        operation="CreateMultipartUpload",
                        error_code="AccessDenied",
                        missing_permission="s3:PutObject on arn:aws:s3:::customer-bucket/uploads/*",
                        fix="allow it in the policy of the IAM user of access key ****MPLE",
                    )
                ],
            )
        return credentials_pb2.VerifyCredentialsResponse(ok=True, key="uploads/.recgw-verify")


class TcpProxy:
    """Forwards TCP connections to the fake; cut() drops them all, like a lost network."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.cuts = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", free_port())
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._forward(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self._port
            )
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, upstream_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
            )
        finally:
            self._pairs.discard(pair)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    def cut(self) -> None:
        self.cuts += 1
        for client, upstream in list(self._pairs):
            client.transport.abort()
            upstream.transport.abort()
        self._pairs.clear()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class FakeServer:
    """The fake gateway on its own event loop thread, directly and through a TCP proxy."""

    def __init__(self) -> None:
        self.gateway = FakeGateway()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None
        self._proxy: TcpProxy | None = None
        self.address = ""
        self.proxy_address = ""

    async def _start(self) -> tuple[int, int]:
        self._server = grpc.aio.server()
        upload_pb2_grpc.add_UploadServiceServicer_to_server(self.gateway, self._server)
        credentials_pb2_grpc.add_CredentialsServiceServicer_to_server(self.gateway, self._server)
        port = self._server.add_insecure_port(f"127.0.0.1:{free_port()}")
        await self._server.start()
        self._proxy = TcpProxy(port)
        self.gateway.cut = self._proxy.cut
        return port, await self._proxy.start()

    async def _stop(self) -> None:
        if self._proxy is not None:
            await self._proxy.stop()
        if self._server is not None:
            await self._server.stop(None)

    def start(self) -> None:
        self._thread.start()
        port, proxy_port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(WAIT)
        self.address = f"127.0.0.1:{port}"
        self.proxy_address = f"127.0.0.1:{proxy_port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(WAIT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT)
        self._loop.close()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    server.start()
    yield server
    server.stop()


def upload_bytes(fake: FakeServer, source: recgw_client.Source, **kwargs: Any) -> UploadResult:
    async def run() -> UploadResult:
        return await recgw_client.upload(fake.address, TOKEN, source, "acme", "a.webm", **kwargs)

    return asyncio.run(run())


def chosen_id(upload: RecordedUpload) -> str:
    """The upload id the client chose for a stream: a uuid4."""
    upload_id = upload.requests[0].start.upload_id
    assert uuid.UUID(upload_id).version == 4
    return upload_id


def check_stream(
    upload: RecordedUpload, data: bytes, *, expected_size: int | None, checksums: bool = True
) -> None:
    """The protocol: start first, offsets = bytes sent before, finish last with checksums."""
    requests = upload.requests
    assert requests[0].HasField("start")
    assert requests[0].write_offset == 0
    assert all(not r.HasField("start") for r in requests[1:])
    assert requests[-1].finish_write
    assert all(not r.finish_write for r in requests[:-1])
    offset = 0
    for request in requests:
        assert request.write_offset == offset
        assert len(request.data) <= recgw_client.MAX_CHUNK_SIZE
        offset += len(request.data)
    assert upload.data == data
    start = requests[0].start
    if expected_size is None:
        assert not start.HasField("expected_size")
    else:
        assert start.expected_size == expected_size
    final = requests[-1]
    if checksums:
        assert final.object_checksums.crc32c == crc32c_bitwise(data)
        assert final.object_checksums.sha256 == hashlib.sha256(data).digest()
    else:
        assert not final.HasField("object_checksums")
    assert upload.metadata["authorization"] == f"Bearer {TOKEN}"


# --- CRC32C ---------------------------------------------------------------------------------


def test_crc32c_known_vectors() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of ones
    assert crc32c(bytes(range(32))) == 0x46DD794E  # RFC 3720 B.4: incrementing


def test_crc32c_matches_the_bitwise_reference() -> None:
    rng = random.Random(42)
    for size in (1, 255, 511, 512, 513, 1000, 4096, 65_537):
        data = rng.randbytes(size)
        assert crc32c(data) == crc32c_bitwise(data), size
    assert crc32c(bytearray(b"123456789")) == crc32c(memoryview(b"123456789")) == 0xE3069283


def test_crc32c_continues_like_zlib() -> None:
    data = random.Random(7).randbytes(10_000)
    for cut in (0, 1, 511, 512, 5000, 10_000):
        assert crc32c(data[cut:], crc32c(data[:cut])) == crc32c(data)


# --- uploads --------------------------------------------------------------------------------


def test_bytes_upload_sends_the_protocol_and_returns_the_result(fake: FakeServer) -> None:
    data = random.Random(1).randbytes(10_000)
    result = upload_bytes(
        fake,
        data,
        chunk_size=4096,
        content_type="video/webm",
        metadata={"call-id": "42"},
    )
    [upload] = fake.gateway.uploads
    check_stream(upload, data, expected_size=len(data))
    assert [len(r.data) for r in upload.requests] == [0, 4096, 4096, 1808, 0]
    start = upload.requests[0].start
    assert (start.tenant_id, start.object_name, start.content_type) == (
        "acme",
        "a.webm",
        "video/webm",
    )
    assert dict(start.metadata) == {"call-id": "42"}
    # The client chose the id, so it could ask about the upload even before the header.
    assert result.upload_id == chosen_id(upload)
    assert (result.bucket, result.key, result.size) == ("customer-bucket", "uploads/a.webm", 10_000)
    assert (result.etag, result.version_id, result.part_count) == ('"0123abcd-2"', "v1", 2)
    assert result.checksums.crc32c == crc32c_bitwise(data)
    assert result.checksums.sha256_hex == hashlib.sha256(data).hexdigest()


def test_empty_upload_and_client_chosen_upload_id(fake: FakeServer) -> None:
    ids: list[str] = []
    result = upload_bytes(fake, b"", upload_id="my-uuid", on_upload_id=ids.append)
    [upload] = fake.gateway.uploads
    check_stream(upload, b"", expected_size=0)
    assert upload.requests[0].start.upload_id == "my-uuid"
    assert ids == ["my-uuid"]
    assert result.size == 0


def test_file_source_sets_expected_size_and_reports_progress(
    fake: FakeServer, tmp_path: Path
) -> None:
    data = random.Random(2).randbytes(20_000)
    path = tmp_path / "call.webm"
    path.write_bytes(data)
    calls: list[tuple[int, int | None]] = []
    ids: list[str] = []
    result = upload_bytes(
        fake,
        path,
        chunk_size=3000,
        progress=lambda sent, total: calls.append((sent, total)),
        on_upload_id=ids.append,
    )
    [upload] = fake.gateway.uploads
    check_stream(upload, data, expected_size=20_000)
    assert ids == [chosen_id(upload)]
    assert result.size == 20_000
    sent = [s for s, _ in calls]
    assert sent == sorted(sent)
    assert calls[0] == (0, 20_000)
    assert calls[-1] == (20_000, 20_000)
    assert {total for _, total in calls} == {20_000}


def test_path_as_str_and_missing_file(fake: FakeServer, tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"abc")
    upload_bytes(fake, str(path))
    check_stream(fake.gateway.uploads[0], b"abc", expected_size=3)
    with pytest.raises(FileNotFoundError):
        upload_bytes(fake, tmp_path / "missing.bin")
    assert len(fake.gateway.uploads) == 1  # failed before calling the gateway


def test_explicit_expected_size_wins_and_checksums_can_be_skipped(fake: FakeServer) -> None:
    upload_bytes(fake, io.BytesIO(b"hello world"), expected_size=11, compute_checksums=False)
    check_stream(fake.gateway.uploads[0], b"hello world", expected_size=11, checksums=False)


def test_async_iterator_source_is_a_live_recording(fake: FakeServer) -> None:
    """The upload id arrives while the recording is still waiting for its first bytes."""
    pieces: list[bytes | bytearray | memoryview] = [
        b"a" * 10,
        b"",
        b"b" * 9000,
        bytearray(b"c" * 5),
        memoryview(b"d" * 3),
    ]

    async def run() -> tuple[UploadResult, list[str]]:
        got_id = asyncio.Event()
        ids: list[str] = []

        def on_upload_id(upload_id: str) -> None:
            ids.append(upload_id)
            got_id.set()

        async def recording() -> AsyncIterator[bytes | bytearray | memoryview]:
            await asyncio.wait_for(got_id.wait(), WAIT)
            for piece in pieces:
                yield piece

        result = await recgw_client.upload(
            fake.address,
            TOKEN,
            recording(),
            "acme",
            "live.webm",
            chunk_size=4096,
            on_upload_id=on_upload_id,
        )
        return result, ids

    result, ids = asyncio.run(run())
    data = b"".join(bytes(p) for p in pieces)
    [upload] = fake.gateway.uploads
    check_stream(upload, data, expected_size=None)
    # Chunks larger than chunk_size are split; small ones are sent at once, not held back.
    assert [len(r.data) for r in upload.requests] == [0, 10, 4096, 4096, 808, 5, 3, 0]
    assert ids == [chosen_id(upload)]
    assert result.size == len(data)


def test_stdin_like_pipe_never_blocks_the_event_loop(fake: FakeServer) -> None:
    """A pipe with no data yet: the loop still delivers the upload id, then the data streams."""
    read_fd, write_fd = os.pipe()
    got_id = threading.Event()
    writer_saw_id: list[bool] = []
    parts = [b"x" * 1000, b"y" * 70_000, b"z" * 10]

    def recorder() -> None:
        with open(write_fd, "wb", buffering=0) as pipe:
            writer_saw_id.append(got_id.wait(WAIT))
            for part in parts:
                pipe.write(part)

    thread = threading.Thread(target=recorder)
    thread.start()
    calls: list[tuple[int, int | None]] = []
    with open(read_fd, "rb") as stdin:
        upload_bytes(
            fake,
            stdin,
            on_upload_id=lambda _: got_id.set(),
            progress=lambda sent, total: calls.append((sent, total)),
        )
    thread.join(WAIT)
    assert writer_saw_id == [True]
    data = b"".join(parts)
    check_stream(fake.gateway.uploads[0], data, expected_size=None)
    assert calls[0] == (0, None)
    assert calls[-1] == (len(data), None)


def test_sync_iterable_source_and_sync_wrapper(fake: FakeServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"one "
        yield b""
        yield b"two"

    result = recgw_client.sync.upload(fake.address, TOKEN, chunks(), "acme", "a.txt")
    check_stream(fake.gateway.uploads[0], b"one two", expected_size=None)
    assert result.size == 7
    status = recgw_client.sync.get_upload_status(fake.address, TOKEN, result.upload_id)
    assert status.state is UploadState.COMPLETE
    assert status.committed_size == 7 and status.result == result


def test_bad_sources_and_arguments(fake: FakeServer) -> None:
    with pytest.raises(TypeError, match="binary mode"):
        upload_bytes(fake, io.StringIO("text"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be bytes"):
        upload_bytes(fake, iter(["text"]))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="source must be"):
        upload_bytes(fake, 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        upload_bytes(fake, b"x", chunk_size=4 * 1024 * 1024 + 1)
    with pytest.raises(ValueError, match="token") as caught:
        asyncio.run(recgw_client.upload(fake.address, "bad token", b"x", "acme", "a"))
    assert "bad token" not in str(caught.value)
    # The reading errors ended their streams unfinished (a stream cancelled right after
    # it opened may not even reach the gateway); the bad token never reached it.
    assert len(fake.gateway.uploads) <= 2
    for upload in fake.gateway.uploads:
        assert upload.metadata["authorization"] == f"Bearer {TOKEN}"
        assert upload.ended.wait(WAIT)
        assert not any(r.finish_write for r in upload.requests)


# --- errors ---------------------------------------------------------------------------------


def test_gateway_error_mid_stream_becomes_recgw_error(fake: FakeServer) -> None:
    fake.gateway.fail_after = (3, grpc.StatusCode.OUT_OF_RANGE, "more bytes than expected_size")
    with pytest.raises(RecgwError) as caught:
        upload_bytes(fake, random.Random(3).randbytes(50_000), chunk_size=1000)
    error = caught.value
    assert error.code is grpc.StatusCode.OUT_OF_RANGE
    assert error.message == "more bytes than expected_size"
    assert str(error) == "OUT_OF_RANGE: more bytes than expected_size"
    assert error.upload_id == chosen_id(fake.gateway.uploads[0])
    # Not the resume handshake (the first stream starts at 0): no retry, no status query.
    assert len(fake.gateway.uploads) == 1 and fake.gateway.status_queries == 0


def test_gateway_error_is_reported_while_a_live_source_is_idle(fake: FakeServer) -> None:
    fake.gateway.fail_after = (2, grpc.StatusCode.PERMISSION_DENIED, "tenant acme: no access")
    never = asyncio.Event()

    async def recording() -> AsyncIterator[bytes]:
        yield b"first"
        await never.wait()  # a recorder that stalls forever
        yield b"never sent"

    with pytest.raises(RecgwError) as caught:
        upload_bytes(fake, recording())
    assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED


def test_wrong_token_is_unauthenticated_and_never_shown(fake: FakeServer) -> None:
    wrong = "wrong-token-abcdefghijklmnop"
    with pytest.raises(RecgwError) as caught:
        asyncio.run(recgw_client.upload(fake.address, wrong, b"data", "acme", "a"))
    assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert wrong not in str(caught.value) and wrong not in repr(caught.value)
    assert fake.gateway.uploads[0].metadata["authorization"] == f"Bearer {wrong}"


def test_token_echoed_by_a_server_is_redacted(fake: FakeServer) -> None:
    fake.gateway.unary_error = (grpc.StatusCode.INTERNAL, f"bad header Bearer {TOKEN}")
    with pytest.raises(RecgwError) as caught:
        asyncio.run(recgw_client.get_upload_status(fake.address, TOKEN, UPLOAD_ID))
    assert TOKEN not in str(caught.value) and TOKEN not in repr(caught.value)
    assert "[REDACTED]" in caught.value.message

    async def client_repr() -> str:
        async with (
            UploadClient(fake.address, TOKEN) as client,
            CredentialsAdmin(fake.address, TOKEN) as admin,
        ):
            return repr(client) + repr(admin)

    assert TOKEN not in asyncio.run(client_repr())


class VirtualTime:
    """A clock and a sleep for RetryPolicy: sleeping advances the clock at once."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)

    def policy(self, **kwargs: Any) -> recgw_client.RetryPolicy:
        kwargs.setdefault("jitter", 0.0)
        return recgw_client.RetryPolicy(sleep=self.sleep, clock=self.clock, **kwargs)


def test_unreachable_gateway_is_given_up_after_the_outage_tolerance() -> None:
    server = FakeServer()
    server.start()
    address = server.address
    server.stop()
    time = VirtualTime()
    policy = time.policy(outage_tolerance=1.0)
    with pytest.raises(RecgwError) as caught:
        asyncio.run(recgw_client.upload(address, TOKEN, b"data", "acme", "a", retry_policy=policy))
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    # Retried with backoff (its status queries fail too) until 1 s passed without progress;
    # the last wait is cut short to end at the tolerance.
    assert time.sleeps == [0.2, 0.4, pytest.approx(0.4)]
    assert caught.value.attempts == 1 and caught.value.upload_id is not None


def test_failing_source_cancels_the_stream(fake: FakeServer) -> None:
    async def recording() -> AsyncIterator[bytes]:
        yield b"some bytes"
        # The next chunk is read while this one is sent: let it reach the gateway first.
        await asyncio.to_thread(fake.gateway.data_received.wait, WAIT)
        raise RuntimeError("recorder crashed")

    with pytest.raises(RuntimeError, match="recorder crashed"):
        upload_bytes(fake, recording())
    [upload] = fake.gateway.uploads
    assert upload.ended.wait(WAIT)
    assert upload.data == b"some bytes"
    assert not any(r.finish_write for r in upload.requests)
    assert fake.gateway.status_queries == 0  # a source error is not retried


def test_failing_upload_id_callback_cancels_the_stream(fake: FakeServer) -> None:
    def on_upload_id(upload_id: str) -> None:
        raise OSError("cannot record the upload id")

    async def recording() -> AsyncIterator[bytes]:
        yield b"a"
        await asyncio.Event().wait()
        yield b"b"

    with pytest.raises(OSError, match="cannot record"):
        upload_bytes(fake, recording(), on_upload_id=on_upload_id)
    [upload] = fake.gateway.uploads
    assert upload.ended.wait(WAIT)
    assert not any(r.finish_write for r in upload.requests)


# --- status, abort, credentials ------------------------------------------------------------


def test_status_and_abort(fake: FakeServer) -> None:
    async def run() -> tuple[recgw_client.UploadStatus, recgw_client.AbortResult]:
        async with UploadClient(fake.address, TOKEN) as client:
            return await client.get_upload_status("u-1"), await client.abort_upload("u-1")

    status, aborted = asyncio.run(run())
    assert status.state is UploadState.COMPLETE
    assert (status.committed_size, status.tenant_id, status.key) == (11, "acme", "uploads/a.webm")
    assert status.result is not None and status.result.size == 11
    assert status.create_time is not None and status.create_time.year == 2027
    assert status.update_time is None
    assert aborted.state is UploadState.ABORTED
    assert not aborted.storage_aborted and "lifecycle" in aborted.detail
    assert [m["authorization"] for m in fake.gateway.unary_metadata] == [f"Bearer {TOKEN}"] * 2


def test_credentials_admin(fake: FakeServer) -> None:
    async def run() -> tuple[Any, ...]:
        async with CredentialsAdmin(fake.address, TOKEN) as admin:
            view = await admin.set(
                "acme",
                "AKIAIOSFODNN7EXAMPLE",
                SECRET,
                "us-west-1",
                "customer-bucket",
                prefix="rec/",
                endpoint_url="https://s3.example.com",
                force_path_style=True,
                sse="aws:kms",
                kms_key_id="alias/rec",
                allow_overwrite=True,
                equal_part_sizes=True,
                abandoned_uploads="salvage",
            )
            described = await admin.describe("acme")
            await admin.delete("acme")
            verified = await admin.verify("acme")
            broken = await admin.verify("broken")
            wipeable = bytearray(SECRET.encode())
            await admin.set("acme", "AKIAIOSFODNN7EXAMPLE", wipeable, "us-west-1", "b")
            wipeable[:] = bytes(len(wipeable))  # the caller wipes its copy
            return view, described, verified, broken

    view, described, verified, broken = asyncio.run(run())
    set_request = fake.gateway.unary_requests[0]
    assert isinstance(set_request, credentials_pb2.SetCredentialsRequest)
    assert set_request.secret_access_key == SECRET
    target = set_request.target
    assert (target.region, target.bucket, target.prefix) == ("us-west-1", "customer-bucket", "rec/")
    assert target.endpoint_url == "https://s3.example.com"
    assert target.force_path_style and target.allow_overwrite and target.equal_part_sizes
    assert target.abandoned_uploads == credentials_pb2.ABANDONED_UPLOAD_POLICY_SALVAGE
    assert view.target.abandoned_uploads == "salvage"
    assert target.encryption.mode == credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_KMS
    assert target.encryption.kms_key_id == "alias/rec"
    assert view.target.sse == "aws:kms" and view.access_key_id_hint == "****MPLE"
    assert view.version == 3 and view.update_time is not None
    assert SECRET not in repr(view) and "AKIAIOSFODNN7EXAMPLE" not in repr(view)
    assert described.target.sse == "aws:kms"
    assert verified.ok and verified.key == "uploads/.recgw-verify"
    assert not broken.ok and broken.error_code == "AccessDenied"
    assert len(fake.gateway.unary_metadata) == 6
    from_bytes = fake.gateway.unary_requests[5]
    assert isinstance(from_bytes, credentials_pb2.SetCredentialsRequest)
    assert from_bytes.secret_access_key == SECRET


def test_credentials_errors_never_show_the_secret(fake: FakeServer) -> None:
    fake.gateway.unary_error = (grpc.StatusCode.INVALID_ARGUMENT, f"rejected {SECRET}")

    async def run() -> None:
        async with CredentialsAdmin(fake.address, TOKEN) as admin:
            await admin.set("acme", "AKIAIOSFODNN7EXAMPLE", SECRET, "us-west-1", "bucket")

    with pytest.raises(RecgwError) as caught:
        asyncio.run(run())
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert SECRET not in str(caught.value)

    async def bad_sse() -> None:
        async with CredentialsAdmin(fake.address, TOKEN) as admin:
            await admin.set("acme", "AK", SECRET, "r", "b", sse="bogus")  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="sse"):
        asyncio.run(bad_sse())


# --- CLI ------------------------------------------------------------------------------------


@pytest.fixture
def runner(fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> typer.testing.CliRunner:
    monkeypatch.setenv("RECGW_ADDRESS", fake.address)
    monkeypatch.setenv("RECGW_TOKEN", TOKEN)
    monkeypatch.delenv("RECGW_SECRET_ACCESS_KEY", raising=False)
    return typer.testing.CliRunner()


def invoke(
    runner: typer.testing.CliRunner, args: list[str], input: str | bytes | None = None
) -> Any:
    result = runner.invoke(app, args, input=input)
    assert TOKEN not in result.output
    assert SECRET not in result.output
    return result


def test_cli_upload_file_json(
    runner: typer.testing.CliRunner, fake: FakeServer, tmp_path: Path
) -> None:
    data = random.Random(4).randbytes(5000)
    path = tmp_path / "call.webm"
    path.write_bytes(data)
    result = invoke(
        runner,
        [
            "upload",
            str(path),
            "--tenant",
            "acme",
            "--name",
            "2026/call.webm",
            "--json",
            "--meta",
            "call-id=42",
            "--meta",
            "agent=bob",
            "--chunk-size",
            "1KiB",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["key"] == "uploads/2026/call.webm" and out["size"] == 5000
    assert out["sha256"] == hashlib.sha256(data).hexdigest()
    assert out["crc32c"] == f"{crc32c_bitwise(data):08x}"
    [upload] = fake.gateway.uploads
    assert out["upload_id"] == chosen_id(upload)
    check_stream(upload, data, expected_size=5000)
    start = upload.requests[0].start
    assert dict(start.metadata) == {"call-id": "42", "agent": "bob"}
    assert start.content_type == "video/webm"
    assert max(len(r.data) for r in upload.requests) == 1024


def test_cli_upload_stdin_with_token_file(
    runner: typer.testing.CliRunner,
    fake: FakeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RECGW_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    result = invoke(
        runner,
        [
            "upload",
            "-",
            "--tenant",
            "acme",
            "--name",
            "live.bin",
            "--token-file",
            str(token_file),
            "--content-type",
            "audio/ogg",
        ],
        input=b"streamed from a recorder",
    )
    assert result.exit_code == 0, result.output
    assert "uploaded s3://customer-bucket/uploads/live.bin" in result.stdout
    [upload] = fake.gateway.uploads
    assert f"upload id: {chosen_id(upload)}" in result.stderr
    check_stream(upload, b"streamed from a recorder", expected_size=None)
    assert upload.requests[0].start.content_type == "audio/ogg"


def test_cli_upload_error_exits_with_code_and_message(
    runner: typer.testing.CliRunner, fake: FakeServer
) -> None:
    fake.gateway.fail_after = (1, grpc.StatusCode.FAILED_PRECONDITION, "no credentials for acme")
    result = invoke(runner, ["upload", "-", "--tenant", "acme", "--name", "a", "-q"], input=b"x")
    assert result.exit_code == 1
    assert "FAILED_PRECONDITION: no credentials for acme" in result.stderr
    result = invoke(
        runner, ["upload", "-", "--tenant", "acme", "--name", "a", "--json"], input=b"x"
    )
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "FAILED_PRECONDITION"


def test_cli_needs_a_token_and_has_no_token_option(
    runner: typer.testing.CliRunner, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RECGW_TOKEN")
    result = invoke(runner, ["status", "u-1"])
    assert result.exit_code == 2 and "RECGW_TOKEN" in result.stderr
    result = invoke(runner, ["status", "u-1", "--token", TOKEN])
    assert result.exit_code == 2
    assert fake.gateway.unary_requests == []


def test_cli_status_and_abort(runner: typer.testing.CliRunner, fake: FakeServer) -> None:
    result = invoke(runner, ["status", "u-1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["state"] == "COMPLETE"
    result = invoke(runner, ["abort", "u-1"])
    assert result.exit_code == 0, result.output
    assert "ABORTED" in result.stdout and "lifecycle" in result.stdout


CREDS_ARGS = [
    "creds",
    "set",
    "--tenant",
    "acme",
    "--access-key-id",
    "AKIAIOSFODNN7EXAMPLE",
    "--region",
    "us-west-1",
    "--bucket",
    "customer-bucket",
    "--sse",
    "AES256",
]


def test_cli_creds_set_reads_the_secret_from_stdin(
    runner: typer.testing.CliRunner, fake: FakeServer
) -> None:
    result = invoke(
        runner,
        [*CREDS_ARGS, "--secret-stdin", "--json", "--abandoned-uploads", "salvage"],
        input=SECRET + "\n",
    )
    assert result.exit_code == 0, result.output
    [request] = fake.gateway.unary_requests
    assert isinstance(request, credentials_pb2.SetCredentialsRequest)
    assert request.secret_access_key == SECRET
    assert request.target.encryption.mode == credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_S3
    assert request.target.abandoned_uploads == credentials_pb2.ABANDONED_UPLOAD_POLICY_SALVAGE
    out = json.loads(result.stdout)
    assert out["access_key_id_hint"] == "****MPLE" and out["sse"] == "AES256"
    assert out["abandoned_uploads"] == "salvage"


def test_cli_creds_set_reads_the_secret_from_env(
    runner: typer.testing.CliRunner, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECGW_SECRET_ACCESS_KEY", SECRET)
    result = invoke(runner, CREDS_ARGS)
    assert result.exit_code == 0, result.output
    request = fake.gateway.unary_requests[0]
    assert isinstance(request, credentials_pb2.SetCredentialsRequest)
    assert request.secret_access_key == SECRET


def test_cli_creds_set_prompts_in_a_terminal(
    runner: typer.testing.CliRunner, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_client, "_stdin_is_tty", lambda: True)
    for extra in ([], ["--secret-stdin"]):  # typed by hand: hidden either way
        result = invoke(runner, [*CREDS_ARGS, *extra], input=SECRET + "\n")
        assert result.exit_code == 0, result.output
        assert "Secret access key" in result.output
    for request in fake.gateway.unary_requests:
        assert isinstance(request, credentials_pb2.SetCredentialsRequest)
        assert request.secret_access_key == SECRET
    assert len(fake.gateway.unary_requests) == 2


def test_cli_creds_set_never_takes_the_secret_from_argv(
    runner: typer.testing.CliRunner, fake: FakeServer
) -> None:
    attempts = (
        ["--secret-access-key", SECRET],
        [f"--secret-access-key={SECRET}"],
        [SECRET],
        ["--secret-stdin", SECRET],
    )
    for attempt in attempts:
        result = invoke(runner, [*CREDS_ARGS, *attempt])  # checks SECRET is not echoed
        assert result.exit_code == 2
    # Without stdin, env or a terminal there is no secret: refuse rather than guess.
    result = invoke(runner, CREDS_ARGS)
    assert result.exit_code == 2 and "--secret-stdin" in result.stderr
    assert fake.gateway.unary_requests == []
    # The only secret-related option is a flag.
    command = typer.main.get_command(app)
    creds = command.commands["creds"]  # type: ignore[attr-defined]
    params = creds.commands["set"].params
    secret_params = [p for p in params if "secret" in p.name]
    assert [(p.name, p.is_flag) for p in secret_params] == [("secret_stdin", True)]


def test_cli_creds_describe_delete_verify(
    runner: typer.testing.CliRunner, fake: FakeServer
) -> None:
    result = invoke(runner, ["creds", "describe", "--tenant", "acme"])
    assert result.exit_code == 0, result.output
    assert "aws:kms" in result.stdout and "****MPLE" in result.stdout
    result = invoke(runner, ["creds", "delete", "--tenant", "acme"])
    assert result.exit_code == 0 and "deleted" in result.stdout
    result = invoke(runner, ["creds", "verify", "--tenant", "acme", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"] is True
    result = invoke(runner, ["creds", "verify", "--tenant", "broken"])
    assert result.exit_code == 1 and "AccessDenied" in result.stdout
    fake.gateway.unary_error = (grpc.StatusCode.NOT_FOUND, "no credentials for tenant acme")
    result = invoke(runner, ["creds", "describe", "--tenant", "acme"])
    assert result.exit_code == 1
    assert "NOT_FOUND: no credentials for tenant acme" in result.stderr


def test_cli_upload_options_are_checked(
    runner: typer.testing.CliRunner, fake: FakeServer, tmp_path: Path
) -> None:
    base = ["upload", "-", "--tenant", "acme", "--name", "a.bin", "--json", "-q"]
    result = invoke(runner, [*base, "--size", "1KiB", "--chunk-size", "256"], input=b"x" * 1024)
    assert result.exit_code == 0, result.output
    [upload] = fake.gateway.uploads
    check_stream(upload, b"x" * 1024, expected_size=1024)
    assert max(len(r.data) for r in upload.requests) == 256
    for bad in (["--chunk-size", "5MiB"], ["--chunk-size", "lots"], ["--meta", "novalue"]):
        result = invoke(runner, [*base, *bad], input=b"x")
        assert result.exit_code == 2, bad
    result = invoke(runner, ["upload", str(tmp_path / "missing"), "--tenant", "a", "--name", "b"])
    assert result.exit_code == 2 and "no such file" in result.stderr
    assert len(fake.gateway.uploads) == 1


@pytest.mark.timeout(60)
def test_cli_streams_a_live_pipe_and_prints_the_upload_id_at_once(fake: FakeServer) -> None:
    """`recorder | recgw upload -`: the id is printed while the recording is still running."""
    recgw = str(Path(sys.executable).parent / "recgw")
    env = {**os.environ, "RECGW_ADDRESS": fake.address, "RECGW_TOKEN": TOKEN}
    process = subprocess.Popen(
        [recgw, "upload", "-", "--tenant", "acme", "--name", "live.webm", "--json"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None
    try:
        process.stdin.write(b"first bytes of the call")
        process.stdin.flush()
        line = process.stderr.readline()
        assert fake.gateway.upload_started.is_set()
        assert line == f"upload id: {chosen_id(fake.gateway.uploads[0])}\n".encode()
        process.stdin.write(b", and the rest")
        process.stdin.close()
        out = process.stdout.read()
        err = process.stderr.read()
        assert process.wait(WAIT) == 0, err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert json.loads(out)["size"] == len(b"first bytes of the call, and the rest")
    check_stream(
        fake.gateway.uploads[0], b"first bytes of the call, and the rest", expected_size=None
    )
    assert TOKEN.encode() not in out + err


@pytest.mark.timeout(60)
def test_cli_ctrl_c_cancels_the_upload_and_exits_130(fake: FakeServer) -> None:
    """Even with the reader thread blocked on stdin, Ctrl-C ends the process cleanly."""
    recgw = str(Path(sys.executable).parent / "recgw")
    env = {**os.environ, "RECGW_ADDRESS": fake.address, "RECGW_TOKEN": TOKEN}
    process = subprocess.Popen(
        [recgw, "upload", "-", "--tenant", "acme", "--name", "live.webm"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    assert process.stdin is not None and process.stderr is not None
    try:
        process.stdin.write(b"recording...")
        process.stdin.flush()
        assert fake.gateway.data_received.wait(WAIT)
        process.send_signal(signal.SIGINT)
        assert process.wait(3 * WAIT) == 130  # a fresh interpreter on a loaded CI machine
        assert "interrupted" in process.stderr.read().decode()
    finally:
        process.stdin.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    [upload] = fake.gateway.uploads
    assert upload.ended.wait(WAIT)
    assert upload.data == b"recording..."
    assert not any(r.finish_write for r in upload.requests)


def test_cli_creds_set_with_a_role_reads_no_secret(
    runner: typer.testing.CliRunner, fake: FakeServer
) -> None:
    role = "arn:aws:iam::123456789012:role/recgw-writer"
    args = ["creds", "set", "--tenant", "acme", "--bucket", "customer-bucket", "--json"]
    result = invoke(runner, [*args, "--role-arn", role, "--rotate-external-id"])
    assert result.exit_code == 0, result.output
    [request] = fake.gateway.unary_requests
    assert isinstance(request, credentials_pb2.SetCredentialsRequest)
    assert (request.role.role_arn, request.access_key_id, request.secret_access_key) == (
        role,
        "",
        "",
    )
    assert request.rotate_external_id and request.target.region == ""
    result = invoke(runner, [*args, "--role-arn", role, "--access-key-id", "AKIAIOSFODNN7EXAMPLE"])
    assert result.exit_code == 2 and "not both" in result.stderr


def test_cli_creds_verify_lists_the_checks(
    runner: typer.testing.CliRunner, fake: FakeServer
) -> None:
    result = invoke(runner, ["creds", "verify", "--tenant", "broken"])
    assert result.exit_code == 1
    assert "FAILED   create_multipart_upload  (CreateMultipartUpload)" in result.stdout
    assert "missing: s3:PutObject on arn:aws:s3:::customer-bucket/uploads/*" in result.stdout
    result = invoke(runner, ["creds", "verify", "--tenant", "broken", "--json"])
    [check] = json.loads(result.stdout)["checks"]
    assert (check["name"], check["result"]) == ("create_multipart_upload", "failed")
