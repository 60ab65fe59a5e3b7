"""`make bench`: gateway throughput against raw gRPC streaming and direct boto3, in one run.

Four measurements of the same bytes on the same machine:

1. gateway: a client-streaming Upload of one recording (unknown length, 1 MiB messages) through
   a real `recgw serve` process into moto_server (IAM on, a tenant with the setup guide's
   PutObject-only policy, credentials in an OpenBao dev server);
2. direct boto3: the same bytes uploaded straight to the same moto with boto3 multipart, the
   same part size and as many parts in flight as the gateway allows, the same CRC32C per part,
   with the tenant's own keys;
3. raw gRPC: the same messages streamed to a trivial grpc.aio server (another process) that
   discards them: the ceiling of the transport;
4. gateway, resumed: the gateway upload again, but the client cancels its stream `--interruptions`
   times (3: after the message that reaches 25%, 50% and 75% of the bytes), polls
   GetUploadStatus until the gateway has detached it (received_size == committed_size) and
   resumes with a new stream at committed_size, re-sending what was not committed. Timed like 1,
   from the first message to the final response, breaks and polls included; the result is its
   throughput over that of 1. finish_write carries the whole object's SHA-256 (in 1 as well), so
   the gateway verifies it, and so does the bench against the response.

The gateway runs as `recgw serve --config <tmp>/recgw.toml` (its own process and GIL; the TOML
holds only token hashes and Vault role ids, the AppRole secret ids go in RECGW_* variables) and
gets the tenant's keys through SetCredentials; its session store (data_dir) is in the temp dir
too. The client side of 1, 3 and 4 (grpc.aio) and all of 2 run in the bench process. Each
transfer is timed from its first message (or CreateMultipartUpload) to the response, and the CPU
time every process spent meanwhile is read from /proc, to show which one is busy. The gateway's
peak RSS is its VmHWM.

Every process the bench starts (OpenBao, moto_server, the gateway, the sink) is stopped at the
end, on errors and on Ctrl-C. Secrets (Vault token and secret ids, AWS secret key, bearer
tokens) go through environment variables and Python objects, never a command line or output.

Usage: `make bench BENCH_ARGS="--size-mib 512 --repeat 3 --json out.json"`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from types import FrameType
from typing import IO, Any

import grpc
from recgw.v1 import credentials_pb2, credentials_pb2_grpc, upload_pb2, upload_pb2_grpc

MiB = 1024 * 1024
KiB = 1024
HEADER_SIZE = 16  # every chunk starts with its index and offset, so no two chunks are equal
# Room for the other fields of an UploadRequest beside its data (as the gateway allows).
MESSAGE_OVERHEAD = 64 * KiB
RPC_TIMEOUT = 900.0
DETACH_TIMEOUT = 60.0  # longest wait for the gateway to let go of a broken stream
POLL_INTERVAL = 0.005  # between GetUploadStatus calls while waiting for that
MAX_REFUSED = 20  # resumes refused because the old stream was still attached, per upload
UPLOAD_ID_HEADER = "x-recgw-upload-id"  # sent by the gateway once a stream is attached
# Set when the bench is interrupted: worker threads (boto3 parts, checksums) stop at once
# instead of running on while asyncio.run waits for them.
STOPPING = threading.Event()
TENANT = "bench"
BUCKET = "recgw-bench"
PREFIX = "uploads/"


# -- the bytes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A recording of `size` bytes in `chunk`-sized messages, made from one random block.

    The block is generated once; each chunk is its slice of the block behind a 16-byte header
    (chunk index and offset), so every chunk and every part differs while nothing but the
    block stays in memory.
    """

    size: int
    chunk: int
    block: bytes

    @classmethod
    def make(cls, size: int, chunk: int, block_size: int = 8 * MiB) -> Workload:
        block_size = max(block_size, chunk) // chunk * chunk
        return cls(size, chunk, os.urandom(block_size))

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk)

    def chunks(self, start: int = 0) -> Iterator[bytes]:
        """The bytes from offset `start` on, cut at the chunk boundaries (so the first piece is
        shorter when `start` falls inside a chunk, as when a resume starts at a part boundary)."""
        view = memoryview(self.block)
        for index in range(start // self.chunk, self.chunk_count):
            if STOPPING.is_set():
                raise KeyboardInterrupt("the bench is stopping")
            offset = index * self.chunk
            length = min(self.chunk, self.size - offset)
            header = index.to_bytes(8, "big") + offset.to_bytes(8, "big")
            if length <= HEADER_SIZE:
                piece = header[:length]
            else:
                at = offset % len(self.block)
                piece = b"".join((header, view[at + HEADER_SIZE : at + length]))
            yield piece[start - offset :] if offset < start else piece

    def parts(self, part_size: int) -> Iterator[bytes]:
        """The same bytes cut into parts of `part_size` (the last one may be shorter).

        Like the gateway, each part is one join of its chunks; only a chunk that straddles
        two parts is copied first.
        """
        pending: list[bytes] = []
        filled = 0
        for chunk in self.chunks():
            while chunk:
                room = part_size - filled
                piece, chunk = chunk[:room], chunk[room:]
                pending.append(piece)
                filled += len(piece)
                if filled == part_size:
                    yield b"".join(pending)
                    pending.clear()
                    filled = 0
        if pending:
            yield b"".join(pending)

    def sha256(self) -> bytes:
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
        return digest.digest()


def upload_requests(
    workload: Workload,
    start: upload_pb2.UploadStart,
    offset: int = 0,
    until: int | None = None,
    sha256: bytes = b"",
) -> Iterator[upload_pb2.UploadRequest]:
    """The messages of one upload stream from byte `offset`: `start` first; `finish_write` (and
    the whole object's SHA-256 to verify, if given) on the last, unless the stream is to stop
    early, after the message that reaches byte `until`."""
    first = True
    for chunk in workload.chunks(offset):
        message = upload_pb2.UploadRequest(write_offset=offset, data=chunk)
        if first:
            message.start.CopyFrom(start)
            first = False
        offset += len(chunk)
        if offset == workload.size:
            message.finish_write = True
            if sha256:
                message.object_checksums.sha256 = sha256
        yield message
        if until is not None and offset >= until:
            return


# -- processes -------------------------------------------------------------------------------


@dataclass
class Child:
    """A process the bench started; `stop()` is safe to call more than once."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.log_file.closed:
            self.log_file.close()


def spawn(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> Child:
    """Start a process in its own session (Ctrl-C reaches the bench only, which stops it).

    RECGW_* variables of the caller are not passed on: the bench's own configuration holds.
    """
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("RECGW_")}
    log_path = log_dir / f"{name}.log"
    log_file = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
    try:
        process = subprocess.Popen(
            args,
            env={**inherited, **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except BaseException:
        log_file.close()
        raise
    return Child(name, process, log_path, log_file)


def script(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found; run `make install` first")
    return found


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, from /proc/<pid>/status."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


class Cleanup:
    """Everything to stop at the end, last started first."""

    def __init__(self) -> None:
        self._stops: list[tuple[str, Callable[[], None]]] = []

    def add(self, name: str, stop: Callable[[], None]) -> None:
        self._stops.append((name, stop))

    def run(self) -> None:
        while self._stops:
            name, stop = self._stops.pop()
            try:
                stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: stopping {name} failed ({type(exc).__name__})", file=sys.stderr)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- the trivial sink server (runs as a separate process: `bench.py --sink-port PORT`) --------


async def discard(
    request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
) -> upload_pb2.UploadResponse:
    """Reads a whole Upload stream and throws the bytes away."""
    size = 0
    async for message in request_iterator:
        size += len(message.data)
    return upload_pb2.UploadResponse(size=size)


async def run_sink(port: int, max_message: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.so_reuseport", 0),
        ]
    )
    handler = grpc.stream_unary_rpc_method_handler(
        discard,
        request_deserializer=upload_pb2.UploadRequest.FromString,
        response_serializer=upload_pb2.UploadResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("recgw.v1.UploadService", {"Upload": handler}),)
    )
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise RuntimeError(f"sink cannot listen on port {port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


# -- measurements ----------------------------------------------------------------------------


@dataclass
class Options:
    size: int
    chunk: int
    part_size: int
    inflight: int
    boto3_concurrency: int
    memory_budget_mib: int
    repeat: int
    interruptions: int
    json_path: Path | None
    keep_logs: bool


@dataclass
class Stack:
    """What the measurements talk to."""

    gateway_address: str
    sink_address: str
    gateway: Child
    moto: Any  # recgw_server.devstack.MotoS3
    tenant_keys: Any  # recgw_server.devstack.AwsKeys
    uploader_token: str
    admin_token: str


KINDS = ("raw_grpc", "direct_boto3", "gateway", "gateway_resumed")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    """One timed transfer: wall seconds, and the CPU seconds each process spent meanwhile."""

    seconds: float
    cpu: dict[str, float]


class Meter:
    """Wall clock and CPU time of the bench client and its child processes."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._started = 0.0
        self._cpu: dict[str, float] = {}

    def _snapshot(self) -> dict[str, float]:
        times = os.times()
        values = {"bench client": times.user + times.system}
        for name, pid in self._pids.items():
            values[name] = cpu_seconds(pid)
        return values

    def start(self) -> None:
        self._cpu = self._snapshot()
        self._started = time.perf_counter()

    def stop(self) -> Sample:
        seconds = time.perf_counter() - self._started
        now = self._snapshot()
        return Sample(seconds, {name: now[name] - self._cpu[name] for name in now})


@dataclass
class Results:
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {k: [] for k in KINDS})
    gateway_idle_kib: int = 0
    gateway_peak_kib: int = 0
    gateway_parts: int = 0
    resumed: list[Resumed] = field(default_factory=list)


async def stream(
    address: str,
    token: str,
    workload: Workload,
    start: upload_pb2.UploadStart,
    meter: Meter,
    sha256: bytes = b"",
) -> tuple[Sample, upload_pb2.UploadResponse]:
    """One client-streaming Upload, timed from the first message to the response."""
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = upload_pb2_grpc.UploadServiceStub(channel)
        meter.start()
        call = stub.Upload(metadata=(("authorization", f"Bearer {token}"),), timeout=RPC_TIMEOUT)
        try:
            for message in upload_requests(workload, start, sha256=sha256):
                await call.write(message)
            await call.done_writing()
            response: upload_pb2.UploadResponse = await call
        except asyncio.InvalidStateError:  # a write after the server ended the call
            raise RuntimeError(f"the upload failed: {await rpc_status(call)}") from None
        return meter.stop(), response


async def rpc_status(call: Any) -> str:
    """Status code and details of a finished call (a write after the end only says "finished")."""
    return f"{(await call.code()).name}: {await call.details()}"


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


async def resumed_stream(
    address: str,
    token: str,
    workload: Workload,
    start: upload_pb2.UploadStart,
    cuts: list[int],
    sha256: bytes,
    meter: Meter,
) -> tuple[Resumed, upload_pb2.UploadResponse]:
    """One upload whose stream the client cancels at each of `cuts`; after each break it polls
    GetUploadStatus until the gateway has detached the stream, then resumes with a new stream at
    the committed size. The last stream sends finish_write with the whole object's SHA-256.

    received == committed also holds before the gateway has noticed a break (0 == 0, or at a part
    boundary with nothing in flight), and then the resume is refused with ABORTED: another stream
    is writing. A resumed stream therefore waits for the upload id header, which the gateway
    sends once the stream is attached, before it writes more: a refusal then shows as ABORTED
    (a write after the call has ended would hide it behind INTERNAL, grpc/grpc#36066), and the
    bench polls again and retries.
    """
    metadata = (("authorization", f"Bearer {token}"),)
    pending = list(cuts)
    interruptions: list[Interruption] = []
    offset = data_sent = refused = 0
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = upload_pb2_grpc.UploadServiceStub(channel)
        meter.start()
        while True:
            until = pending[0] if pending else None
            call = stub.Upload(metadata=metadata, timeout=RPC_TIMEOUT)
            sent = offset
            try:
                for message in upload_requests(workload, start, offset, until, sha256):
                    await call.write(message)
                    sent += len(message.data)
                    data_sent += len(message.data)
                    if message.HasField("start") and interruptions:
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
            interruptions.append(Interruption(sent, offset, time.perf_counter() - broke, polls))
        return Resumed(meter.stop(), interruptions, data_sent, refused), response


async def measure_raw_grpc(stack: Stack, workload: Workload, run: int, meter: Meter) -> Sample:
    start = upload_pb2.UploadStart(tenant_id=TENANT, object_name=f"raw-{run}.bin")
    sample, response = await stream(stack.sink_address, "unused", workload, start, meter)
    if response.size != workload.size:
        raise RuntimeError(f"the sink received {response.size} of {workload.size} bytes")
    return sample


async def measure_gateway(
    stack: Stack,
    workload: Workload,
    run: int,
    expected_sha256: bytes,
    results: Results,
    meter: Meter,
) -> Sample:
    name = f"gateway-{run}.bin"
    start = upload_pb2.UploadStart(
        tenant_id=TENANT, object_name=name, content_type="application/octet-stream"
    )  # no expected_size: a live recording of unknown length
    sample, response = await stream(
        stack.gateway_address, stack.uploader_token, workload, start, meter, expected_sha256
    )
    if response.size != workload.size or response.checksums.sha256 != expected_sha256:
        raise RuntimeError("the gateway stored other bytes than were sent")
    results.gateway_parts = response.part_count
    await asyncio.to_thread(delete_object, stack, PREFIX + name)
    return sample


async def measure_resumed(
    stack: Stack,
    workload: Workload,
    run: int,
    expected_sha256: bytes,
    interruptions: int,
    meter: Meter,
) -> Resumed:
    """The gateway upload again, broken `interruptions` times and resumed after each break."""
    name = f"resumed-{run}.bin"
    start = upload_pb2.UploadStart(
        tenant_id=TENANT,
        object_name=name,
        content_type="application/octet-stream",
        upload_id=str(uuid.uuid4()),  # chosen by the client, so it is known before any byte
    )
    resumed, response = await resumed_stream(
        stack.gateway_address,
        stack.uploader_token,
        workload,
        start,
        cut_points(workload, interruptions),
        expected_sha256,
        meter,
    )
    if response.size != workload.size or response.checksums.sha256 != expected_sha256:
        raise RuntimeError("the resumed upload stored other bytes than were sent")
    if len(resumed.interruptions) != interruptions:
        raise RuntimeError(
            f"the upload broke {len(resumed.interruptions)} times, not {interruptions}"
        )
    await asyncio.to_thread(delete_object, stack, PREFIX + name)
    return resumed


def s3_client(stack: Stack, options: Options) -> Any:
    """A boto3 client configured as the gateway configures its own (see recgw_server.storage.s3)."""
    import boto3
    import botocore.config

    config = botocore.config.Config(
        region_name=stack.moto.region,
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=max(options.boto3_concurrency, 1),
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3",
        aws_access_key_id=stack.tenant_keys.access_key_id,
        aws_secret_access_key=stack.tenant_keys.secret_access_key.reveal(),
        endpoint_url=stack.moto.endpoint_url,
        config=config,
    )


def direct_upload(
    client: Any, key: str, workload: Workload, options: Options, meter: Meter
) -> Sample:
    """Multipart upload with boto3: `boto3_concurrency` parts in flight, CRC32C on each part.

    Parts are cut and checksummed while earlier ones are on their way, like the gateway does;
    timed from CreateMultipartUpload to the CompleteMultipartUpload response.
    """
    from recgw_server.pipeline.digest import crc32c
    from recgw_server.storage.s3 import crc32c_header

    def send(number: int, body: bytes) -> dict[str, Any]:
        part_crc = crc32c_header(crc32c(body))
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
        Bucket=BUCKET, Key=key, ContentType="application/octet-stream", ChecksumAlgorithm="CRC32C"
    )["UploadId"]
    slots = threading.BoundedSemaphore(options.boto3_concurrency)
    futures: list[Future[dict[str, Any]]] = []
    with ThreadPoolExecutor(options.boto3_concurrency, thread_name_prefix="bench-s3") as pool:
        try:
            for number, body in enumerate(workload.parts(options.part_size), start=1):
                slots.acquire()
                future = pool.submit(send, number, body)
                future.add_done_callback(lambda _: slots.release())
                futures.append(future)
            parts = [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    client.complete_multipart_upload(
        Bucket=BUCKET, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
    )
    return meter.stop()


def delete_object(stack: Stack, key: str) -> None:
    """Keep moto's memory flat between runs (with the admin keys: the tenant may only put)."""
    stack.moto.client("s3").delete_object(Bucket=BUCKET, Key=key)


def measure_direct(
    stack: Stack, client: Any, workload: Workload, run: int, options: Options, meter: Meter
) -> Sample:
    key = f"{PREFIX}direct-{run}.bin"
    sample = direct_upload(client, key, workload, options, meter)
    head = stack.moto.client("s3").head_object(Bucket=BUCKET, Key=key)
    if head["ContentLength"] != workload.size:
        raise RuntimeError(f"direct upload stored {head['ContentLength']} bytes")
    delete_object(stack, key)
    return sample


async def wait_ready(address: str, child: Child, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        while True:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited early; see {child.log_path}")
            try:
                await asyncio.wait_for(channel.channel_ready(), 0.5)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{child.name} not ready after {timeout}s") from None


async def set_tenant_credentials(stack: Stack) -> None:
    """The tenant's keys go in as a customer's would: through SetCredentials."""
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
        await credentials_pb2_grpc.CredentialsServiceStub(channel).SetCredentials(
            credentials_pb2.SetCredentialsRequest(
                tenant_id=TENANT,
                access_key_id=stack.tenant_keys.access_key_id,
                secret_access_key=stack.tenant_keys.secret_access_key.reveal(),
                target=credentials_pb2.StorageTarget(
                    region=stack.moto.region,
                    bucket=BUCKET,
                    prefix=PREFIX,
                    endpoint_url=stack.moto.endpoint_url,
                    force_path_style=True,
                ),
            ),
            metadata=(("authorization", f"Bearer {stack.admin_token}"),),
            timeout=30,
        )


async def measure(
    stack: Stack, sink: Child, workload: Workload, options: Options, results: Results
) -> None:
    try:
        await measure_runs(stack, sink, workload, options, results)
    except BaseException:
        STOPPING.set()
        raise


async def measure_runs(
    stack: Stack, sink: Child, workload: Workload, options: Options, results: Results
) -> None:
    await wait_ready(stack.gateway_address, stack.gateway)
    await wait_ready(stack.sink_address, sink)
    await set_tenant_credentials(stack)
    print("checksumming the workload (not timed)...", flush=True)
    expected_sha256 = await asyncio.to_thread(workload.sha256)
    meter = Meter(
        {"gateway": stack.gateway.pid, "moto": stack.moto.managed.process.pid, "sink": sink.pid}
    )
    # Warm-up (not timed): the gateway's Vault login, credentials cache and S3 client; boto3's
    # connection pool and lazily loaded parts.
    warm = Workload.make(1 * MiB, workload.chunk, 1 * MiB)
    warm_sha256 = await asyncio.to_thread(warm.sha256)
    await measure_gateway(stack, warm, -1, warm_sha256, results, meter)
    client = await asyncio.to_thread(s3_client, stack, options)
    await asyncio.to_thread(measure_direct, stack, client, warm, -1, options, meter)
    # and the resume path (GetUploadStatus, attaching to a session), with a few chunks
    warm = Workload.make((options.interruptions + 1) * workload.chunk, workload.chunk, 1 * MiB)
    warm_sha256 = await asyncio.to_thread(warm.sha256)
    await measure_resumed(stack, warm, -1, warm_sha256, options.interruptions, meter)
    results.gateway_idle_kib = memory_kib(stack.gateway.pid)["VmRSS"]
    for run in range(options.repeat):
        label = f"[{run + 1}/{options.repeat}]"
        sample = await measure_raw_grpc(stack, workload, run, meter)
        show(label, "raw gRPC", workload.size, sample)
        results.samples["raw_grpc"].append(sample)
        sample = await asyncio.to_thread(
            measure_direct, stack, client, workload, run, options, meter
        )
        show(label, "direct boto3", workload.size, sample)
        results.samples["direct_boto3"].append(sample)
        sample = await measure_gateway(stack, workload, run, expected_sha256, results, meter)
        show(label, "gateway", workload.size, sample)
        results.samples["gateway"].append(sample)
        resumed = await measure_resumed(
            stack, workload, run, expected_sha256, options.interruptions, meter
        )
        show(label, "gateway resumed", workload.size, resumed.sample)
        results.samples["gateway_resumed"].append(resumed.sample)
        results.resumed.append(resumed)
    results.gateway_peak_kib = memory_kib(stack.gateway.pid)["VmHWM"]


def mib_per_s(size: int, seconds: float) -> float:
    return size / MiB / seconds


def busy(sample: Sample) -> dict[str, float]:
    """CPU cores each process kept busy on average during a transfer."""
    return {name: cpu / sample.seconds for name, cpu in sample.cpu.items()}


def format_busy(cores: dict[str, float]) -> str:
    shown = [f"{name} {value:.2f}" for name, value in cores.items() if value >= 0.01]
    return ", ".join(shown) + f" (sum {sum(cores.values()):.2f})"


def show(label: str, kind: str, size: int, sample: Sample) -> None:
    speed = mib_per_s(size, sample.seconds)
    print(
        f"{label} {kind:<15} {speed:8.1f} MiB/s  {sample.seconds:6.2f} s  "
        f"CPU cores: {format_busy(busy(sample))}",
        flush=True,
    )


# -- set-up ----------------------------------------------------------------------------------


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def gateway_config(
    port: int,
    options: Options,
    vault_address: str,
    identities: Any,
    token_hashes: dict[str, str],
    data_dir: Path,
) -> str:
    """The gateway's TOML: no secrets (those go in RECGW_* variables), only token hashes; its
    session store (SQLite) in `data_dir`, inside the bench's temp dir."""
    tokens = "".join(
        f"""
[[tokens]]
name = "bench-{role}"
role = "{role}"
sha256 = {toml_string(digest)}
tenants = ["*"]
"""
        for role, digest in token_hashes.items()
    )
    return f"""\
listen = {toml_string(f"127.0.0.1:{port}")}
plaintext = true
metrics_listen = ""
shutdown_grace_seconds = 2
log_level = "INFO"
data_dir = {toml_string(str(data_dir))}

[vault]
address = {toml_string(vault_address)}

[vault.writer]
method = "approle"
role_id = {toml_string(identities.writer.role_id)}

[vault.reader]
method = "approle"
role_id = {toml_string(identities.reader.role_id)}

[uploads]
part_size_mib = {options.part_size // MiB}
max_inflight_parts = {options.inflight}
memory_budget_mib = {options.memory_budget_mib}
{tokens}"""


def machine_facts() -> dict[str, Any]:
    def version(package: str) -> str:
        try:
            return importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            return "?"

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "grpcio": version("grpcio"),
        "boto3": version("boto3"),
        "moto": version("moto"),
    }


def run_bench(options: Options) -> dict[str, Any]:
    from recgw_server.auth.tokens import hash_token
    from recgw_server.dev.stack import (
        bootstrap_vault,
        free_port,
        seed_policy,
        start_moto,
        start_openbao,
    )

    workdir = Path(tempfile.mkdtemp(prefix="recgw-bench-"))  # mode 0700
    cleanup = Cleanup()
    keep = options.keep_logs
    results = Results()
    try:
        print("starting OpenBao and moto_server...", flush=True)
        bao = start_openbao(workdir)
        cleanup.add("OpenBao", bao.stop)
        moto = start_moto(workdir)
        cleanup.add("moto_server", moto.stop)
        identities = bootstrap_vault(bao)
        moto.create_bucket(BUCKET)
        tenant_keys = moto.create_user("recgw-bench-writer", seed_policy(BUCKET))
        uploader_token = "upl_" + secrets.token_urlsafe(24)
        admin_token = "adm_" + secrets.token_urlsafe(24)

        gateway_port = free_port()
        config = workdir / "recgw.toml"
        text = gateway_config(
            gateway_port,
            options,
            bao.address,
            identities,
            {"uploader": hash_token(uploader_token), "admin": hash_token(admin_token)},
            workdir / "gateway-data",
        )
        with os.fdopen(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(text)
        assert identities.writer.secret_id and identities.reader.secret_id
        print("starting the gateway (recgw serve) and the raw gRPC sink...", flush=True)
        gateway = spawn(
            "gateway",
            [script("recgw"), "serve", "--config", str(config)],
            {
                "RECGW_VAULT__WRITER__SECRET_ID": identities.writer.secret_id.reveal(),
                "RECGW_VAULT__READER__SECRET_ID": identities.reader.secret_id.reveal(),
            },
            workdir,
        )
        cleanup.add("gateway", gateway.stop)
        sink_port = free_port()
        sink = spawn(
            "sink",
            [sys.executable, str(Path(__file__).resolve()), "--sink-port", str(sink_port)],
            {},
            workdir,
        )
        cleanup.add("sink", sink.stop)
        stack = Stack(
            gateway_address=f"127.0.0.1:{gateway_port}",
            sink_address=f"127.0.0.1:{sink_port}",
            gateway=gateway,
            moto=moto,
            tenant_keys=tenant_keys,
            uploader_token=uploader_token,
            admin_token=admin_token,
        )
        print(f"generating {options.size // MiB} MiB of test data...", flush=True)
        workload = Workload.make(options.size, options.chunk)
        asyncio.run(measure(stack, sink, workload, options, results))
    except KeyboardInterrupt:
        raise
    except BaseException:
        keep = True  # for the logs; the directory is private (0700)
        raise
    finally:
        cleanup.run()
        if keep:
            print(f"logs kept in {workdir} (private; openbao.log shows its dev root token)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return report(options, results)


def report(options: Options, results: Results) -> dict[str, Any]:
    speeds: dict[str, Any] = {}
    for kind in KINDS:
        samples = results.samples[kind]
        runs = [mib_per_s(options.size, sample.seconds) for sample in samples]
        cores = [busy(sample) for sample in samples]
        speeds[kind] = {
            "median": statistics.median(runs),
            "runs": runs,
            "seconds": [sample.seconds for sample in samples],
            "cpu_seconds": [sample.cpu for sample in samples],
            "median_cores_busy": {
                name: statistics.median(c[name] for c in cores) for name in cores[0]
            },
        }
    gateway = speeds["gateway"]["median"]
    peak_mib = results.gateway_peak_kib / KiB
    resent = [run.data_sent - options.size for run in results.resumed]
    return {
        "machine": machine_facts(),
        "config": {
            "size_mib": options.size / MiB,
            "chunk_kib": options.chunk // KiB,
            "part_size_mib": options.part_size // MiB,
            "max_inflight_parts": options.inflight,
            "boto3_concurrency": options.boto3_concurrency,
            "memory_budget_mib": options.memory_budget_mib,
            "repeat": options.repeat,
            "gateway_parts": results.gateway_parts,
            "interruptions": options.interruptions,
        },
        "mib_per_s": speeds,
        "ratios": {
            "gateway_over_raw_grpc": gateway / speeds["raw_grpc"]["median"],
            "gateway_over_direct_boto3": gateway / speeds["direct_boto3"]["median"],
            "gateway_resumed_over_gateway": speeds["gateway_resumed"]["median"] / gateway,
        },
        # The gateway upload broken `interruptions` times by the client (call.cancel()) and
        # resumed at GetUploadStatus.committed_size each time; finish_write carries the SHA-256.
        "resume": {
            "interruptions": options.interruptions,
            "median_bytes_resent": statistics.median(resent),
            "runs": [
                {
                    "bytes_resent": extra,
                    "refused_resumes": run.refused,
                    "sha256_verified": True,  # the gateway checked it and so did the bench
                    "breaks": [
                        {
                            "bytes_sent": cut.sent,
                            "committed_size": cut.committed,
                            "detach_seconds": cut.detach_seconds,
                            "status_polls": cut.polls,
                        }
                        for cut in run.interruptions
                    ],
                }
                for run, extra in zip(results.resumed, resent, strict=True)
            ],
        },
        "gateway_memory": {
            "idle_rss_mib": results.gateway_idle_kib / KiB,
            "peak_rss_mib": peak_mib,
            "memory_budget_mib": options.memory_budget_mib,
            "peak_over_budget": peak_mib / options.memory_budget_mib,
            # One upload holds at most its in-flight parts plus the one being filled.
            "one_upload_budget_mib": (options.inflight + 1) * options.part_size / MiB,
        },
    }


def print_report(data: dict[str, Any]) -> None:
    machine, config = data["machine"], data["config"]
    speeds, ratios, memory = data["mib_per_s"], data["ratios"], data["gateway_memory"]
    concurrency = config["boto3_concurrency"]
    mode = "sequential" if concurrency == 1 else f"{concurrency} parts in flight"
    labels = {
        "raw_grpc": "raw gRPC ceiling (discarding grpc.aio server)",
        "direct_boto3": f"direct boto3 -> moto ({mode})",
        "gateway": f"gateway -> moto ({config['gateway_parts']} parts, unknown length)",
        "gateway_resumed": f"gateway -> moto, interrupted {config['interruptions']}x and resumed",
    }
    print()
    print(
        f"recgw bench: {config['size_mib']:g} MiB, {config['chunk_kib']} KiB messages, "
        f"{config['part_size_mib']} MiB parts, {config['max_inflight_parts']} parts in flight, "
        f"repeat {config['repeat']}"
    )
    print(
        f"machine: nproc {machine['nproc']}, {machine['cpu_model']}, Python {machine['python']}, "
        f"grpcio {machine['grpcio']}, boto3 {machine['boto3']}, moto {machine['moto']}"
    )
    for kind in KINDS:
        runs = ", ".join(f"{value:.1f}" for value in speeds[kind]["runs"])
        print(f"  {labels[kind]:<50} {speeds[kind]['median']:8.1f} MiB/s  (runs: {runs})")
    print(f"  {'gateway / raw gRPC':<50} {ratios['gateway_over_raw_grpc']:8.2f}")
    print(f"  {'gateway / direct boto3':<50} {ratios['gateway_over_direct_boto3']:8.2f}")
    resume = data["resume"]
    print(
        f"  {'gateway resumed / uninterrupted':<50} "
        f"{ratios['gateway_resumed_over_gateway']:8.2f}  "
        f"({speeds['gateway_resumed']['median']:.1f} vs {speeds['gateway']['median']:.1f} MiB/s; "
        f"{resume['interruptions']} breaks, {resume['median_bytes_resent'] / MiB:.1f} MiB re-sent, "
        f"SHA-256 verified)"
    )
    print(
        f"  gateway RSS: peak (VmHWM) {memory['peak_rss_mib']:.0f} MiB, "
        f"idle {memory['idle_rss_mib']:.0f} MiB; memory budget {memory['memory_budget_mib']} MiB "
        f"(peak RSS is {memory['peak_over_budget']:.0%} of the budget)"
    )
    print(
        f"    of that budget one upload reserves at most (in flight + filling) x part size = "
        f"{memory['one_upload_budget_mib']:g} MiB; RSS above idle was "
        f"{memory['peak_rss_mib'] - memory['idle_rss_mib']:.0f} MiB"
    )
    print(f"  CPU cores kept busy (median over runs; the machine has {machine['nproc']}):")
    for kind in KINDS:
        print(f"    {kind:<15} {format_busy(speeds[kind]['median_cores_busy'])}")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Options]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=float, default=256, help="recording size (256)")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="message size (1024)")
    parser.add_argument("--part-size-mib", type=int, default=8, help="S3 part size (8)")
    parser.add_argument(
        "--inflight", type=int, default=4, help="gateway max_inflight_parts (4, its default)"
    )
    parser.add_argument(
        "--boto3-concurrency",
        type=int,
        default=0,
        help="parts in flight for direct boto3 (default: the same as --inflight; 1: sequential)",
    )
    parser.add_argument(
        "--memory-budget-mib", type=int, default=512, help="gateway memory budget (512)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement (1)")
    parser.add_argument(
        "--interruptions",
        type=int,
        default=3,
        help="breaks of the resumed gateway upload, evenly spread over its bytes (3)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with logs")
    parser.add_argument("--sink-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = int(args.size_mib * MiB)
    chunk = args.chunk_kib * KiB
    if not 0 < chunk <= 4 * MiB:
        parser.error("--chunk-kib must be between 1 and 4096")
    if size < 1:
        parser.error("--size-mib must be positive")
    if args.repeat < 1 or args.inflight < 1 or args.interruptions < 1:
        parser.error("--repeat, --inflight and --interruptions must be at least 1")
    if -(-size // chunk) <= args.interruptions:
        parser.error("the recording needs more messages than --interruptions")
    options = Options(
        size=size,
        chunk=chunk,
        part_size=args.part_size_mib * MiB,
        inflight=args.inflight,
        boto3_concurrency=args.boto3_concurrency or args.inflight,
        memory_budget_mib=args.memory_budget_mib,
        repeat=args.repeat,
        interruptions=args.interruptions,
        json_path=args.json,
        keep_logs=args.keep_logs,
    )
    return args, options


def main(argv: list[str] | None = None) -> int:
    args, options = parse_args(argv)
    if args.sink_port:
        asyncio.run(run_sink(args.sink_port, 4 * MiB + MESSAGE_OVERHEAD))
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    try:
        data = run_bench(options)
    except KeyboardInterrupt:
        print("interrupted; everything the bench started was stopped", file=sys.stderr)
        return 130
    print_report(data)
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"results written to {options.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
