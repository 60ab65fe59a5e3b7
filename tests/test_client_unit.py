"""Unit tests of recgw_client and the client CLI against a fake in-process gateway.

The fake runs a grpc.aio server on its own event loop in a thread, so both
the asyncio API (asyncio.run in the test) and the CLI (which runs its own
loop) talk to it over loopback gRPC.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import typer.testing
from google.protobuf import message as protobuf_message
from recgw.v1 import credentials_pb2, credentials_pb2_grpc, upload_pb2, upload_pb2_grpc

import recgw_client
import recgw_client.sync
from recgw_client import (
    CredentialsAdmin,
    RecgwError,
    UploadClient,
    UploadResult,
    UploadState,
    crc32c,
)
from recgw_client.checksums import _crc32c_table
from recgw_server import cli_client
from recgw_server.cli import app

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


@dataclass
class RecordedUpload:
    metadata: dict[str, str | bytes]
    requests: list[upload_pb2.UploadRequest] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def data(self) -> bytes:
        return b"".join(r.data for r in self.requests)


class FakeGateway(
    upload_pb2_grpc.UploadServiceServicer, credentials_pb2_grpc.CredentialsServiceServicer
):
    """Checks the bearer token, records every message and answers like the gateway."""

    def __init__(self) -> None:
        self.uploads: list[RecordedUpload] = []
        self.unary_metadata: list[dict[str, str | bytes]] = []
        self.unary_requests: list[protobuf_message.Message] = []
        self.send_header = True
        # (number of messages received, code, details): abort after that message.
        self.fail_after: tuple[int, grpc.StatusCode, str] | None = None
        self.unary_error: tuple[grpc.StatusCode, str] | None = None
        self.upload_started = threading.Event()
        self.data_received = threading.Event()

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str | bytes]:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("authorization") != f"Bearer {TOKEN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        return metadata

    async def Upload(
        self,
        request_iterator: AsyncIterator[upload_pb2.UploadRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> upload_pb2.UploadResponse:
        record = RecordedUpload(metadata=dict(context.invocation_metadata() or ()))
        self.uploads.append(record)
        try:
            await self._check(context)
            async for request in request_iterator:
                record.requests.append(request)
                if request.data:
                    self.data_received.set()
                if len(record.requests) == 1:
                    self.upload_started.set()
                    if self.send_header:
                        upload_id = request.start.upload_id or UPLOAD_ID
                        await context.send_initial_metadata((("x-recgw-upload-id", upload_id),))
                if self.fail_after is not None and len(record.requests) >= self.fail_after[0]:
                    await context.abort(self.fail_after[1], self.fail_after[2])
                if request.finish_write:
                    break
            else:
                await context.abort(
                    grpc.StatusCode.ABORTED, "the stream ended without finish_write"
                )
            data = record.data
            start = record.requests[0].start
            return upload_pb2.UploadResponse(
                upload_id=start.upload_id or UPLOAD_ID,
                bucket="customer-bucket",
                key="uploads/" + start.object_name,
                size=len(data),
                etag='"0123abcd-2"',
                version_id="v1",
                part_count=2,
                checksums=upload_pb2.ObjectChecksums(
                    crc32c=crc32c(data), sha256=hashlib.sha256(data).digest()
                ),
            )
        finally:
            record.ended.set()

    async def _unary(self, request: protobuf_message.Message, context: Any) -> None:
        self.unary_metadata.append(await self._check(context))
        self.unary_requests.append(request)
        if self.unary_error is not None:
            await context.abort(*self.unary_error)

    async def GetUploadStatus(
        self, request: upload_pb2.GetUploadStatusRequest, context: Any
    ) -> upload_pb2.GetUploadStatusResponse:
        await self._unary(request, context)
        response = upload_pb2.GetUploadStatusResponse(
            upload_id=request.upload_id,
            state=upload_pb2.UPLOAD_STATE_COMPLETE,
            committed_size=11,
            received_size=11,
            tenant_id="acme",
            key="uploads/a.webm",
            result=upload_pb2.UploadResponse(
                upload_id=request.upload_id, bucket="customer-bucket", key="uploads/a.webm", size=11
            ),
        )
        response.create_time.FromSeconds(1_800_000_000)
        return response

    async def AbortUpload(
        self, request: upload_pb2.AbortUploadRequest, context: Any
    ) -> upload_pb2.AbortUploadResponse:
        await self._unary(request, context)
        return upload_pb2.AbortUploadResponse(
            state=upload_pb2.UPLOAD_STATE_ABORTED,
            storage_aborted=False,
            detail="AbortMultipartUpload was denied; the bucket's lifecycle rule removes the parts",
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
            )
        return credentials_pb2.VerifyCredentialsResponse(ok=True, key="uploads/.recgw-verify")


class FakeServer:
    """The fake gateway on its own event loop thread."""

    def __init__(self) -> None:
        self.gateway = FakeGateway()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None
        self.address = ""

    async def _start(self) -> int:
        self._server = grpc.aio.server()
        upload_pb2_grpc.add_UploadServiceServicer_to_server(self.gateway, self._server)
        credentials_pb2_grpc.add_CredentialsServiceServicer_to_server(self.gateway, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def start(self) -> None:
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(WAIT)
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(None), self._loop).result(WAIT)
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


def test_crc32c_fast_path_matches_the_table_and_bitwise_reference() -> None:
    rng = random.Random(42)
    for size in (1, 255, 511, 512, 513, 1000, 4096, 65_537):
        data = rng.randbytes(size)
        assert crc32c(data) == _crc32c_table(data, 0) == crc32c_bitwise(data), size
    big = rng.randbytes(1 << 20)
    assert crc32c(big) == _crc32c_table(big, 0)


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
    assert start.upload_id == ""
    assert result.upload_id == UPLOAD_ID
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
    assert ids == [UPLOAD_ID]
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
    assert ids == [UPLOAD_ID]
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
    status = recgw_client.sync.get_upload_status(fake.address, TOKEN, UPLOAD_ID)
    assert status.state is UploadState.COMPLETE


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
    # The reading errors ended their streams unfinished; the bad token never reached the gateway.
    assert len(fake.gateway.uploads) == 2
    for upload in fake.gateway.uploads:
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
    assert error.upload_id == UPLOAD_ID


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


def test_unreachable_gateway_is_unavailable() -> None:
    server = FakeServer()
    server.start()
    address = server.address
    server.stop()
    with pytest.raises(RecgwError) as caught:
        asyncio.run(recgw_client.upload(address, TOKEN, b"data", "acme", "a"))
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE


def test_failing_source_cancels_the_stream(fake: FakeServer) -> None:
    async def recording() -> AsyncIterator[bytes]:
        yield b"some bytes"
        raise RuntimeError("recorder crashed")

    with pytest.raises(RuntimeError, match="recorder crashed"):
        upload_bytes(fake, recording())
    [upload] = fake.gateway.uploads
    assert upload.ended.wait(WAIT)
    assert not any(r.finish_write for r in upload.requests)


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
            )
            described = await admin.describe("acme")
            await admin.delete("acme")
            verified = await admin.verify("acme")
            broken = await admin.verify("broken")
            return view, described, verified, broken

    view, described, verified, broken = asyncio.run(run())
    set_request = fake.gateway.unary_requests[0]
    assert isinstance(set_request, credentials_pb2.SetCredentialsRequest)
    assert set_request.secret_access_key == SECRET
    target = set_request.target
    assert (target.region, target.bucket, target.prefix) == ("us-west-1", "customer-bucket", "rec/")
    assert target.endpoint_url == "https://s3.example.com"
    assert target.force_path_style and target.allow_overwrite and target.equal_part_sizes
    assert target.encryption.mode == credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_KMS
    assert target.encryption.kms_key_id == "alias/rec"
    assert view.target.sse == "aws:kms" and view.access_key_id_hint == "****MPLE"
    assert view.version == 3 and view.update_time is not None
    assert SECRET not in repr(view) and "AKIAIOSFODNN7EXAMPLE" not in repr(view)
    assert described.target.sse == "aws:kms"
    assert verified.ok and verified.key == "uploads/.recgw-verify"
    assert not broken.ok and broken.error_code == "AccessDenied"
    assert len(fake.gateway.unary_metadata) == 5


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
    assert out["upload_id"] == UPLOAD_ID
    [upload] = fake.gateway.uploads
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
    assert f"upload id: {UPLOAD_ID}" in result.stderr
    [upload] = fake.gateway.uploads
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
    result = invoke(runner, [*CREDS_ARGS, "--secret-stdin", "--json"], input=SECRET + "\n")
    assert result.exit_code == 0, result.output
    [request] = fake.gateway.unary_requests
    assert isinstance(request, credentials_pb2.SetCredentialsRequest)
    assert request.secret_access_key == SECRET
    assert request.target.encryption.mode == credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_S3
    out = json.loads(result.stdout)
    assert out["access_key_id_hint"] == "****MPLE" and out["sse"] == "AES256"


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
        assert process.stderr.readline() == f"upload id: {UPLOAD_ID}\n".encode()
        assert fake.gateway.upload_started.is_set()
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
        assert process.wait(WAIT) == 130
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
