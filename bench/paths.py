"""The upload paths measured side by side: each sends the same Workload and is timed from its
first request to its last response, with the CPU of every process read meanwhile."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from awscrt import checksums
from recgw.v1 import upload_pb2, upload_pb2_grpc

from bench.backends import Store, Tusd
from bench.common import (
    BUCKET,
    PREFIX,
    RPC_TIMEOUT,
    STOPPING,
    TENANT,
    Meter,
    Sample,
    Workload,
    upload_requests,
)

DETACH_TIMEOUT = 60.0  # longest wait for the gateway to let go of a broken stream
POLL_INTERVAL = 0.005  # between GetUploadStatus calls while waiting for that
MAX_REFUSED = 20  # resumes refused because the old stream was still attached, per upload
UPLOAD_ID_HEADER = "x-recgw-upload-id"  # sent by the gateway once a stream is attached


def crc32c_header(value: int) -> str:
    """S3's encoding of a CRC32C: base64 of the 4 big-endian bytes."""
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# -- gRPC: the raw sink and the gateway ------------------------------------------------------


async def rpc_status(call: Any) -> str:
    """Status code and details of a finished call (a write after the end only says "finished")."""
    return f"{(await call.code()).name}: {await call.details()}"


async def stream(
    address: str,
    token: str,
    workload: Workload,
    start: upload_pb2.UploadStart,
    meter: Meter,
    rss_pid: int = 0,
    sha256: bytes = b"",
) -> tuple[Sample, upload_pb2.UploadResponse]:
    """One client-streaming Upload, timed from the first message to the response."""
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = upload_pb2_grpc.UploadServiceStub(channel)
        meter.start(rss_pid)
        call = stub.Upload(metadata=bearer(token), timeout=RPC_TIMEOUT)
        try:
            for message in upload_requests(workload, start, sha256=sha256):
                await call.write(message)
            await call.done_writing()
            response: upload_pb2.UploadResponse = await call
        except asyncio.InvalidStateError:  # a write after the server ended the call
            raise RuntimeError(f"the upload failed: {await rpc_status(call)}") from None
        return meter.stop(), response


async def raw_grpc(address: str, workload: Workload, run: int, meter: Meter) -> Sample:
    start = upload_pb2.UploadStart(tenant_id=TENANT, object_name=f"raw-{run}.bin")
    sample, response = await stream(address, "unused", workload, start, meter)
    if response.size != workload.size:
        raise RuntimeError(f"the sink received {response.size} of {workload.size} bytes")
    return sample


async def gateway_upload(
    address: str,
    token: str,
    workload: Workload,
    name: str,
    expected_crc32c: int,
    meter: Meter,
    rss_pid: int,
    sha256: bytes = b"",
) -> tuple[Sample, upload_pb2.UploadResponse]:
    """A recording of unknown length through a gateway; the response's CRC32C and size must
    be those of the bytes sent. With `sha256` the start asks the gateway for its SHA-256 and the
    finish sends this one to verify, as the clients do."""
    start = upload_pb2.UploadStart(
        tenant_id=TENANT, object_name=name, content_type="application/octet-stream"
    )  # no expected_size: a live recording of unknown length
    sample, response = await stream(address, token, workload, start, meter, rss_pid, sha256)
    if response.size != workload.size or response.checksums.crc32c != expected_crc32c:
        raise RuntimeError("the gateway stored other bytes than were sent")
    if sha256 and response.checksums.sha256 != sha256:
        raise RuntimeError("the gateway's SHA-256 is not that of the bytes sent")
    return sample, response


@dataclass(frozen=True)
class Interruption:
    """One broken stream of the resumed upload."""

    sent: int  # bytes of data the client had written when it cancelled the stream
    committed: int  # GetUploadStatus.committed_size once detached: where the next stream starts
    detach_seconds: float  # from the cancel to the status showing the upload detached
    polls: int  # GetUploadStatus calls until then


@dataclass(frozen=True)
class Resumed:
    """An upload interrupted at `cuts` and resumed each time: timed from the first message of
    the first stream to the response of the last, detaching and status polls included."""

    sample: Sample
    interruptions: list[Interruption]
    data_sent: int  # bytes of data written on all streams; beyond the size they were re-sent
    refused: int  # resumes the gateway refused because the old stream was still attached


def cut_points(workload: Workload, interruptions: int) -> list[int]:
    """Where the streams break: after the message that reaches k/(n+1) of the chunks."""
    count = workload.chunk_count
    return [
        min(count * k // (interruptions + 1) * workload.chunk, workload.size)
        for k in range(1, interruptions + 1)
    ]


async def wait_detached(
    stub: upload_pb2_grpc.UploadServiceAsyncStub,
    upload_id: str,
    metadata: tuple[tuple[str, str], ...],
) -> tuple[int, int]:
    """Poll GetUploadStatus until the upload is detached (received == committed): returns the
    committed size and the number of polls."""
    deadline = time.monotonic() + DETACH_TIMEOUT
    polls = 0
    while True:
        polls += 1
        try:
            status = await stub.GetUploadStatus(
                upload_pb2.GetUploadStatusRequest(upload_id=upload_id),
                metadata=metadata,
                timeout=30,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return 0, polls  # the start never reached the gateway: begin again at byte 0
        if status.state != upload_pb2.UPLOAD_STATE_OPEN:
            state = upload_pb2.UploadState.Name(status.state)
            raise RuntimeError(f"the interrupted upload is {state}: {status.error_message}")
        if status.received_size == status.committed_size:
            return status.committed_size, polls
        if time.monotonic() > deadline:
            raise TimeoutError(f"the upload did not detach within {DETACH_TIMEOUT:g} s")
        await asyncio.sleep(POLL_INTERVAL)


async def resumed_upload(
    address: str,
    token: str,
    workload: Workload,
    name: str,
    interruptions: int,
    sha256: bytes,
    meter: Meter,
    rss_pid: int,
) -> Resumed:
    """One upload whose stream the client cancels `interruptions` times; after each break it
    polls GetUploadStatus until the gateway has detached the stream, then resumes with a new
    stream at the committed size. The last stream sends finish_write with the whole object's
    SHA-256, which the gateway verifies.

    received == committed also holds before the gateway has noticed a break (0 == 0, or at a part
    boundary with nothing in flight), and then the resume is refused with ABORTED: another stream
    is writing. A resumed stream therefore waits for the upload id header, which the gateway
    sends once the stream is attached, before it writes more: a refusal then shows as ABORTED
    (a write after the call has ended would hide it behind INTERNAL, grpc/grpc#36066), and the
    bench polls again and retries.
    """
    start = upload_pb2.UploadStart(
        tenant_id=TENANT,
        object_name=name,
        content_type="application/octet-stream",
        upload_id=str(uuid.uuid4()),  # chosen by the client, so it is known before any byte
    )
    metadata = bearer(token)
    pending = cut_points(workload, interruptions)
    breaks: list[Interruption] = []
    offset = data_sent = refused = 0
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = upload_pb2_grpc.UploadServiceStub(channel)
        meter.start(rss_pid)
        while True:
            until = pending[0] if pending else None
            call = stub.Upload(metadata=metadata, timeout=RPC_TIMEOUT)
            sent = offset
            try:
                for message in upload_requests(workload, start, offset, until, sha256):
                    await call.write(message)
                    sent += len(message.data)
                    data_sent += len(message.data)
                    if message.HasField("start") and breaks:
                        headers = await call.initial_metadata()
                        if UPLOAD_ID_HEADER not in dict(headers or ()):
                            await call  # the call ended: raises its status
                if until is None:
                    await call.done_writing()
                    response: upload_pb2.UploadResponse = await call
                    break
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                retry = (grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE)
                if await call.code() not in retry or refused >= MAX_REFUSED:
                    raise RuntimeError(f"the upload failed: {await rpc_status(call)}") from None
                refused += 1
                await asyncio.sleep(POLL_INTERVAL)
                offset, _ = await wait_detached(stub, start.upload_id, metadata)
                continue
            call.cancel()  # the break: the client drops the stream mid-upload
            broke = time.perf_counter()
            pending.pop(0)
            offset, polls = await wait_detached(stub, start.upload_id, metadata)
            breaks.append(Interruption(sent, offset, time.perf_counter() - broke, polls))
        resumed = Resumed(meter.stop(), breaks, data_sent, refused)
    if response.size != workload.size or response.checksums.sha256 != sha256:
        raise RuntimeError("the resumed upload stored other bytes than were sent")
    if len(breaks) != interruptions:
        raise RuntimeError(f"the upload broke {len(breaks)} times, not {interruptions}")
    return resumed


# -- direct boto3 ----------------------------------------------------------------------------


def boto3_client(store: Store, concurrency: int) -> Any:
    """A boto3 client configured as the gateway configures its own (recgw_server.storage.s3):
    unsigned payload (explicitly, so also over plain HTTP), no second checksum, path style."""
    import boto3
    import botocore.config

    config = botocore.config.Config(
        region_name=store.region,
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=max(concurrency, 1),
        s3={"addressing_style": "path", "payload_signing_enabled": False},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3",
        aws_access_key_id=store.tenant_keys.access_key_id,
        aws_secret_access_key=store.tenant_keys.secret_access_key.reveal(),
        endpoint_url=store.endpoint_url,
        config=config,
    )


def direct_boto3(
    client: Any,
    store: Store,
    workload: Workload,
    run: int,
    part_size: int,
    concurrency: int,
    meter: Meter,
) -> Sample:
    """Multipart upload with boto3: `concurrency` parts in flight, CRC32C on each part and
    on the whole object (FULL_OBJECT, combined from the parts' CRC32Cs), as the gateway does.

    Parts are cut and checksummed while earlier ones are on their way, like the gateway does;
    timed from CreateMultipartUpload to the CompleteMultipartUpload response.
    """
    key = f"{PREFIX}direct-{run}.bin"
    part_crcs: dict[int, tuple[int, int]] = {}

    def send(number: int, body: bytes) -> dict[str, Any]:
        crc = checksums.crc32c(body)
        part_crcs[number] = (crc, len(body))
        part_crc = crc32c_header(crc)
        response = client.upload_part(
            Bucket=BUCKET,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
            ChecksumCRC32C=part_crc,
        )
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32C": part_crc}

    meter.start()
    upload_id = client.create_multipart_upload(
        Bucket=BUCKET,
        Key=key,
        ContentType="application/octet-stream",
        ChecksumAlgorithm="CRC32C",
        ChecksumType="FULL_OBJECT",
    )["UploadId"]
    slots = threading.BoundedSemaphore(concurrency)
    futures: list[Future[dict[str, Any]]] = []
    with ThreadPoolExecutor(concurrency, thread_name_prefix="bench-s3") as pool:
        try:
            for number, body in enumerate(workload.parts(part_size), start=1):
                slots.acquire()
                future = pool.submit(send, number, body)
                future.add_done_callback(lambda _: slots.release())
                futures.append(future)
            parts = [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    whole = 0
    for number in sorted(part_crcs):
        crc, length = part_crcs[number]
        whole = checksums.combine_crc32c(whole, crc, length)
    client.complete_multipart_upload(
        Bucket=BUCKET,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": parts},
        ChecksumCRC32C=crc32c_header(whole),
        ChecksumType="FULL_OBJECT",
    )
    sample = meter.stop()
    head = store.admin_client().head_object(Bucket=BUCKET, Key=key)
    if head["ContentLength"] != workload.size:
        raise RuntimeError(f"direct upload stored {head['ContentLength']} bytes")
    store.delete(key)
    return sample


# -- aws-crt's S3 client ---------------------------------------------------------------------


class WorkloadStream(io.RawIOBase):
    """The workload as a readable stream of unknown length, fed chunk by chunk."""

    def __init__(self, workload: Workload) -> None:
        self._chunks: Iterator[bytes] = workload.chunks()
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target):
            if not self._pending:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._pending = memoryview(chunk)
            count = min(len(target) - filled, len(self._pending))
            target[filled : filled + count] = self._pending[:count]
            self._pending = self._pending[count:]
            filled += count
        return filled


class CrtUploader:
    """awscrt.s3.S3Client as one process would keep it: a PUT of unknown length becomes a
    multipart upload of `part_size` parts, CRC32C per part, unsigned payload."""

    def __init__(self, store: Store, part_size: int) -> None:
        from awscrt import auth, s3
        from awscrt import io as crt_io

        self._s3 = s3
        self._store = store
        endpoint = urllib.parse.urlsplit(store.endpoint_url)
        self._host = endpoint.netloc
        event_loops = crt_io.EventLoopGroup(2)
        resolver = crt_io.DefaultHostResolver(event_loops)
        bootstrap = crt_io.ClientBootstrap(event_loops, resolver)
        credentials = auth.AwsCredentialsProvider.new_static(
            store.tenant_keys.access_key_id, store.tenant_keys.secret_access_key.reveal()
        )
        self._client = s3.S3Client(
            bootstrap=bootstrap,
            region=store.region,
            credential_provider=credentials,
            tls_mode=s3.S3RequestTlsMode.DISABLED,
            part_size=part_size,
            throughput_target_gbps=10.0,
        )

    def upload(self, workload: Workload, run: int, meter: Meter) -> Sample:
        from awscrt import http

        key = f"{PREFIX}crt-{run}.bin"
        headers = http.HttpHeaders(
            [("Host", self._host), ("Content-Type", "application/octet-stream")]
        )
        request = http.HttpRequest("PUT", f"/{BUCKET}/{key}", headers, WorkloadStream(workload))
        checksum = self._s3.S3ChecksumConfig(
            algorithm=self._s3.S3ChecksumAlgorithm.CRC32C,
            location=self._s3.S3ChecksumLocation.HEADER,
        )
        meter.start()
        made = self._client.make_request(
            type=self._s3.S3RequestType.PUT_OBJECT, request=request, checksum_config=checksum
        )
        made.finished_future.result(RPC_TIMEOUT)
        sample = meter.stop()
        head = self._store.admin_client().head_object(Bucket=BUCKET, Key=key)
        if head["ContentLength"] != workload.size:
            raise RuntimeError(f"aws-crt stored {head['ContentLength']} bytes")
        self._store.delete(key)
        return sample


# -- tus -------------------------------------------------------------------------------------


def tus_upload(tusd: Tusd, workload: Workload, patch_size: int, meter: Meter) -> Sample:
    """The tus protocol as a live recording needs it: creation with Upload-Defer-Length, then
    PATCHes of `patch_size` bytes; the last one declares Upload-Length. tusd finishes the S3
    multipart upload before it answers that last PATCH."""
    connection = http.client.HTTPConnection("127.0.0.1", tusd.port, timeout=RPC_TIMEOUT)
    try:
        meter.start()
        connection.request(
            "POST",
            "/files/",
            headers={
                "Tus-Resumable": "1.0.0",
                "Upload-Defer-Length": "1",
                "Content-Length": "0",
            },
        )
        response = connection.getresponse()
        response.read()
        if response.status != 201:
            raise RuntimeError(f"tusd refused the creation: HTTP {response.status}")
        location = urllib.parse.urlsplit(response.headers["Location"]).path
        chunks = workload.chunks()
        carry = b""
        offset = 0
        while offset < workload.size:
            length = min(patch_size, workload.size - offset)
            headers = {
                "Tus-Resumable": "1.0.0",
                "Upload-Offset": str(offset),
                "Content-Type": "application/offset+octet-stream",
                "Content-Length": str(length),
            }
            if offset + length == workload.size:
                headers["Upload-Length"] = str(workload.size)
            body, carry = take(chunks, carry, length)
            connection.request("PATCH", location, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 204:
                raise RuntimeError(f"tusd refused a PATCH at {offset}: HTTP {response.status}")
            offset = int(response.headers["Upload-Offset"])
        return meter.stop()
    finally:
        connection.close()


def take(chunks: Iterator[bytes], carry: bytes, length: int) -> tuple[Iterator[bytes], bytes]:
    """`length` bytes from `carry` and then `chunks`, as an iterator of pieces for http.client;
    also returns what is left over of the last chunk (the carry of the next PATCH)."""
    pieces: list[bytes] = []
    remaining = length
    if carry:
        pieces.append(carry[:remaining])
        carry = carry[remaining:]
        remaining -= len(pieces[-1])
    while remaining > 0:
        if STOPPING.is_set():
            raise KeyboardInterrupt("the bench is stopping")
        chunk = next(chunks)
        pieces.append(chunk[:remaining])
        carry = chunk[remaining:]
        remaining -= len(pieces[-1])
    return iter(pieces), carry


def tus_cleanup(store: Store) -> None:
    """tusd leaves the object, its .info and maybe a .part under its prefix."""
    from bench.backends import TUSD_PREFIX

    store.delete_prefix(TUSD_PREFIX)


def assert_tus_object(store: Store, workload: Workload) -> None:
    from bench.backends import TUSD_PREFIX

    client = store.admin_client()
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=TUSD_PREFIX).get("Contents", [])
    sizes = [item["Size"] for item in listing if not item["Key"].endswith((".info", ".part"))]
    if sizes != [workload.size]:
        raise RuntimeError(f"tusd stored objects of {sizes} bytes, not one of {workload.size}")
