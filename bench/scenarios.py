"""Scenarios beyond one upload at a time: many concurrent streams (memory), live calls at
1 Mbit/s beside a bulk upload and a small one (latency), and the first upload of new tenants.

Each runs against a gateway process of its own, started fresh so that its idle RSS is a
baseline; every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import grpc
from awscrt import checksums
from recgw.v1 import credentials_pb2, credentials_pb2_grpc, upload_pb2, upload_pb2_grpc

from bench.backends import Store
from bench.common import (
    BUCKET,
    PREFIX,
    RPC_TIMEOUT,
    TENANT,
    KiB,
    MiB,
    Workload,
    cpu_seconds,
    memory_kib,
    upload_requests,
)
from bench.paths import bearer

RSS_POLL = 0.02  # seconds between RSS samples of the gateway


# -- shared pieces ---------------------------------------------------------------------------


def channels(address: str, count: int) -> list[grpc.aio.Channel]:
    """`count` channels with a connection each (no shared subchannel pool)."""
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", 8 * MiB)]
    return [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]


class RssWatch:
    """Samples the gateway's RSS until stopped; trips `exceeded` above `limit_kib`."""

    def __init__(self, pid: int, limit_kib: int) -> None:
        self.pid = pid
        self.limit_kib = limit_kib
        self.peak_kib = 0
        self.exceeded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            rss = memory_kib(self.pid)["VmRSS"]
            self.peak_kib = max(self.peak_kib, rss)
            if rss > self.limit_kib:
                self.exceeded.set()
            await asyncio.sleep(RSS_POLL)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.peak_kib = max(self.peak_kib, memory_kib(self.pid)["VmHWM"])


async def bounded(
    work: list[Awaitable[Any]], watch: RssWatch, timeout: float
) -> tuple[list[Any], str]:
    """Run `work` concurrently until done, `timeout` or the RSS limit; returns the results (an
    exception where one failed or was cancelled) and why it stopped ("" when all finished)."""
    tasks = [asyncio.ensure_future(item) for item in work]
    tripped = asyncio.ensure_future(watch.exceeded.wait())
    everything = asyncio.ensure_future(asyncio.wait(tasks))
    done, _ = await asyncio.wait(
        {everything, tripped}, timeout=timeout, return_when="FIRST_COMPLETED"
    )
    reason = "" if everything in done else ("rss_limit" if tripped in done else "timeout")
    for task in tasks:
        task.cancel()
    tripped.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(everything, tripped, return_exceptions=True)
    return results, reason


def failures(results: list[Any]) -> dict[str, int]:
    """How many of `results` failed, by kind: the gRPC status and the start of its message,
    or the exception type ("cancelled" for what the deadline stopped)."""
    kinds: dict[str, int] = {}
    for result in results:
        if not isinstance(result, BaseException):
            continue
        if isinstance(result, asyncio.CancelledError):
            kind = "cancelled"
        elif isinstance(result, grpc.aio.AioRpcError):
            kind = f"{result.code().name}: {(result.details() or '')[:120]}"
        else:
            kind = f"{type(result).__name__}: {str(result)[:120]}"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def verify_stored(store: Store, key: str, size: int, crc32c: int) -> bool:
    """Byte-exact as far as S3 can tell: the stored length, and S3's own CRC32C of the object
    (FULL_OBJECT for multipart uploads, the PutObject's for small ones)."""
    head = store.admin_client().head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    stored_crc = head.get("ChecksumCRC32C")
    if head["ContentLength"] != size:
        return False
    if stored_crc is None:  # a store without checksums (moto without crc32c): length only
        return True
    return bool(base64.b64decode(stored_crc) == crc32c.to_bytes(4, "big"))


def delete_quietly(store: Store, key: str) -> None:
    try:
        store.delete(key)
    except Exception as exc:  # counted as not verified already; the store is reset at the end
        print(f"  warning: could not delete {key} ({type(exc).__name__})")


async def trash_emptier(store: Store, interval: float = 2.0) -> None:
    """Deleted objects go to MinIO's trash, on tmpfs: empty it while a scenario runs."""
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(store.settle)


# -- memory: many concurrent streams of unknown length ---------------------------------------


@dataclass
class MemoryResult:
    streams: int
    stream_mib: float
    channels: int
    seconds: float
    completed: int
    verified: int
    stopped_by: str  # "" when every stream finished
    errors: dict[str, int]
    idle_rss_mib: float
    peak_rss_mib: float
    budget_mib: int
    gateway_cpu_s: float

    @property
    def above_idle_mib(self) -> float:
        return self.peak_rss_mib - self.idle_rss_mib

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "above_idle_mib": self.above_idle_mib,
            "above_idle_over_budget": self.above_idle_mib / self.budget_mib,
            "mib_per_s": self.completed * self.stream_mib / self.seconds if self.seconds else 0,
        }


async def upload_one(
    channel: grpc.aio.Channel, token: str, workload: Workload, name: str
) -> upload_pb2.UploadResponse:
    stub = upload_pb2_grpc.UploadServiceStub(channel)
    start = upload_pb2.UploadStart(
        tenant_id=TENANT, object_name=name, content_type="application/octet-stream"
    )
    call = stub.Upload(metadata=bearer(token), timeout=RPC_TIMEOUT)
    for message in upload_requests(workload, start):
        await call.write(message)
    await call.done_writing()
    response: upload_pb2.UploadResponse = await call
    return response


async def memory_scenario(
    address: str,
    pid: int,
    token: str,
    store: Store,
    streams: int,
    stream_size: int,
    chunk: int,
    channel_count: int,
    budget_mib: int,
    rss_limit_mib: int,
    timeout: float,
) -> MemoryResult:
    """`streams` uploads of unknown length at once, each as fast as the gateway takes it."""
    workload = Workload.make(stream_size, chunk)
    crc = workload.crc32c()
    channel_count = channel_count or streams
    pool = channels(address, channel_count)
    idle = memory_kib(pid)["VmRSS"]
    watch = RssWatch(pid, rss_limit_mib * KiB)
    emptier = asyncio.ensure_future(trash_emptier(store))
    verified = 0

    async def one(index: int) -> bool:
        nonlocal verified
        name = f"memory-{streams}-{index}.bin"
        response = await upload_one(pool[index % channel_count], token, workload, name)
        good = response.size == stream_size and await asyncio.to_thread(
            verify_stored, store, PREFIX + name, stream_size, crc
        )
        verified += good
        await asyncio.to_thread(delete_quietly, store, PREFIX + name)
        return good

    try:
        cpu_before = cpu_seconds(pid)
        watch.start()
        started = time.perf_counter()
        results, stopped_by = await bounded([one(i) for i in range(streams)], watch, timeout)
        seconds = time.perf_counter() - started
        await watch.stop()
        cpu = cpu_seconds(pid) - cpu_before
    finally:
        emptier.cancel()
        await asyncio.gather(emptier, return_exceptions=True)
        for channel in pool:
            await channel.close()
    completed = sum(1 for result in results if result is True or result is False)
    return MemoryResult(
        streams=streams,
        stream_mib=stream_size / MiB,
        channels=channel_count,
        seconds=seconds,
        completed=completed,
        verified=verified,
        stopped_by=stopped_by,
        errors=failures(results),
        idle_rss_mib=idle / KiB,
        peak_rss_mib=watch.peak_kib / KiB,
        budget_mib=budget_mib,
        gateway_cpu_s=cpu,
    )


# -- live calls ------------------------------------------------------------------------------


@dataclass
class LiveStream:
    """What one live call sent and how it went."""

    name: str
    sent: int = 0
    messages: int = 0
    crc32c: int = 0
    max_lag: float = 0.0  # how late a write started against its schedule, at worst (not
    # counting the first, which also opens the stream)
    response: upload_pb2.UploadResponse | None = None


@dataclass
class LiveResult:
    streams: int
    seconds: float
    message_bytes: int
    interval_ms: float
    channels: int
    completed: int
    verified: int
    stopped_by: str
    errors: dict[str, int]
    messages: int
    idle_rss_mib: float
    peak_rss_mib: float
    budget_mib: int
    live_only: dict[str, float]  # CPU over the window before the bulk upload started
    whole: dict[str, float]
    max_lag_s: float
    median_lag_s: float
    bulk: dict[str, Any] = field(default_factory=dict)
    small: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "above_idle_mib": self.peak_rss_mib - self.idle_rss_mib}


async def live_scenario(
    address: str,
    pid: int,
    token: str,
    store: Store,
    *,
    streams: int,
    seconds: float,
    message_bytes: int,
    kbit_per_s: float,
    channel_count: int,
    bulk_size: int,
    small_size: int,
    chunk: int,
    budget_mib: int,
    rss_limit_mib: int,
    grace: float,
    store_pid: int,
) -> LiveResult:
    """`streams` live calls, each a message of `message_bytes` every `interval` (so
    `kbit_per_s`), of unknown length for `seconds`; a bulk upload of `bulk_size` starts after a
    quarter of that time, a small upload of `small_size` at half; all are verified in S3."""
    interval = message_bytes * 8 / (kbit_per_s * 1000)
    block = os.urandom(1 * MiB)
    pool = channels(address, channel_count)
    calls = [LiveStream(f"live-{i}.bin") for i in range(streams)]
    idle = memory_kib(pid)["VmRSS"]
    watch = RssWatch(pid, rss_limit_mib * KiB)
    emptier = asyncio.ensure_future(trash_emptier(store))
    message_count = 0
    t0 = time.perf_counter() + 0.5  # every stream has opened by then
    end = t0 + seconds

    async def live(index: int) -> None:
        nonlocal message_count
        call_state = calls[index]
        stub = upload_pb2_grpc.UploadServiceStub(pool[index % channel_count])
        start = upload_pb2.UploadStart(
            tenant_id=TENANT, object_name=call_state.name, content_type="audio/wav"
        )
        call = stub.Upload(metadata=bearer(token), timeout=RPC_TIMEOUT)
        due = t0 + interval * index / streams  # spread the streams over one interval
        at = (index * 7919) % (len(block) - message_bytes)
        while True:
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            elif call_state.messages:
                call_state.max_lag = max(call_state.max_lag, now - due)
            last = due + interval >= end
            data = block[at : at + message_bytes]
            message = upload_pb2.UploadRequest(write_offset=call_state.sent, data=data)
            if call_state.messages == 0:
                message.start.CopyFrom(start)
            if last:
                message.finish_write = True
            await call.write(message)
            call_state.crc32c = checksums.crc32c(data, call_state.crc32c)
            call_state.sent += len(data)
            call_state.messages += 1
            message_count += 1
            at = (at + message_bytes) % (len(block) - message_bytes)
            due += interval
            if last:
                break
        await call.done_writing()
        call_state.response = await call

    async def timed_upload(name: str, size: int, delay: float, state: dict[str, Any]) -> None:
        """One upload beside the live calls; `state` keeps what is known if it is cancelled."""
        await asyncio.sleep(max(0.0, delay - time.perf_counter()))
        workload = Workload.make(size, chunk)
        crc = await asyncio.to_thread(workload.crc32c)
        begun = time.perf_counter()
        state.update(size_mib=size / MiB, started_at_s=begun - t0, begun=begun)
        async with grpc.aio.insecure_channel(address) as channel:
            response = await upload_one(channel, token, workload, name)
        took = time.perf_counter() - begun
        good = response.size == size and await asyncio.to_thread(
            verify_stored, store, PREFIX + name, size, crc
        )
        await asyncio.to_thread(delete_quietly, store, PREFIX + name)
        state.update(seconds=took, mib_per_s=size / MiB / took, verified=good)

    bulk_at = t0 + seconds / 4
    small_at = t0 + seconds / 2
    window: dict[str, float] = {}

    async def live_window() -> None:
        """CPU of gateway, client and store while only the live calls run."""
        await asyncio.sleep(max(0.0, t0 + 1.0 - time.perf_counter()))
        before = (cpu_seconds(pid), own_cpu(), cpu_seconds(store_pid), message_count)
        began = time.perf_counter()
        await asyncio.sleep(max(0.1, bulk_at - time.perf_counter()))
        took = time.perf_counter() - began
        count = message_count - before[3]
        gateway = cpu_seconds(pid) - before[0]
        window.update(
            seconds=took,
            messages=count,
            gateway_cpu_s=gateway,
            gateway_cores=gateway / took,
            gateway_cpu_ms_per_stream_second=gateway * 1000 / (streams * took),
            gateway_cpu_us_per_message=gateway * 1e6 / count if count else 0.0,
            messages_per_s=count / took,
            scheduled_messages_per_s=streams / interval,
            client_cores=(own_cpu() - before[1]) / took,
            store_cores=(cpu_seconds(store_pid) - before[2]) / took,
        )

    work: list[Awaitable[Any]] = [live(i) for i in range(streams)]
    bulk: dict[str, Any] = {}
    small: dict[str, Any] = {}
    work.append(timed_upload("live-bulk.bin", bulk_size, bulk_at, bulk))
    work.append(timed_upload("live-small.bin", small_size, small_at, small))
    window_task = asyncio.ensure_future(live_window())
    try:
        cpu_before = cpu_seconds(pid)
        watch.start()
        results, stopped_by = await bounded(work, watch, seconds + grace)
        ended = time.perf_counter()
        took = ended - t0
        await watch.stop()
        gateway_cpu = cpu_seconds(pid) - cpu_before
        await asyncio.gather(window_task, return_exceptions=True)
    finally:
        window_task.cancel()
        emptier.cancel()
        await asyncio.gather(emptier, return_exceptions=True)
        for channel in pool:
            await channel.close()

    completed = verified = 0
    for state in calls:
        if state.response is None:
            continue
        completed += 1
        good = state.response.size == state.sent and await asyncio.to_thread(
            verify_stored, store, PREFIX + state.name, state.sent, state.crc32c
        )
        verified += good
        await asyncio.to_thread(delete_quietly, store, PREFIX + state.name)
    await asyncio.to_thread(store.settle)
    for beside, result in ((bulk, results[-2]), (small, results[-1])):
        begun = beside.pop("begun", None)
        if isinstance(result, asyncio.CancelledError):
            waited = f" after {ended - begun:.1f} s" if begun is not None else ", never started"
            beside["error"] = f"unfinished at the scenario's deadline{waited}"
        elif isinstance(result, BaseException):
            beside["error"] = f"{type(result).__name__}: {result}"[:300]
    lags = [state.max_lag for state in calls]
    return LiveResult(
        streams=streams,
        seconds=seconds,
        message_bytes=message_bytes,
        interval_ms=interval * 1000,
        channels=channel_count,
        completed=completed,
        verified=verified,
        stopped_by=stopped_by,
        errors=failures(results[:streams]),
        messages=message_count,
        idle_rss_mib=idle / KiB,
        peak_rss_mib=watch.peak_kib / KiB,
        budget_mib=budget_mib,
        live_only=window,
        whole={
            "seconds": took,
            "gateway_cpu_s": gateway_cpu,
            "gateway_cpu_us_per_message": gateway_cpu * 1e6 / message_count
            if message_count
            else 0.0,
        },
        max_lag_s=max(lags) if lags else 0.0,
        median_lag_s=statistics.median(lags) if lags else 0.0,
        bulk=bulk,
        small=small,
    )


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system


# -- first uploads of new tenants ------------------------------------------------------------


async def set_credentials(
    address: str, admin_token: str, tenant_id: str, store: Store, endpoint_url: str = ""
) -> None:
    """A tenant's keys go in as a customer's would: through SetCredentials."""
    async with grpc.aio.insecure_channel(address) as channel:
        await credentials_pb2_grpc.CredentialsServiceStub(channel).SetCredentials(
            credentials_pb2.SetCredentialsRequest(
                tenant_id=tenant_id,
                access_key_id=store.tenant_keys.access_key_id,
                secret_access_key=store.tenant_keys.secret_access_key.reveal(),
                target=credentials_pb2.StorageTarget(
                    region=store.region,
                    bucket=BUCKET,
                    prefix=PREFIX,
                    endpoint_url=endpoint_url or store.endpoint_url,
                    force_path_style=True,
                ),
            ),
            metadata=bearer(admin_token),
            timeout=30,
        )


async def first_uploads(
    address: str,
    token: str,
    admin_token: str,
    store: Store,
    clients: int,
    size: int,
    run: str,
    repeats: int = 3,
) -> dict[str, Any]:
    """`clients` new tenants (each its own credentials through SetCredentials, not timed)
    upload at once, each from a new channel, once the gateway has served as many uploads at once
    for a known tenant: their first upload's latency, then a second round of the same tenants
    (warm). Repeated `repeats` times with new tenants; what a first upload adds is the median
    of the paired differences (a tenant's first minus its warm upload), which a few slow
    uploads in one round do not move the way they move a round's median."""
    workload = Workload.make(size, min(size, 64 * KiB))

    async def one(tenant: str, round_name: str) -> float:
        name = f"{tenant}-{round_name}.bin"
        start = upload_pb2.UploadStart(tenant_id=tenant, object_name=name)
        async with grpc.aio.insecure_channel(address) as channel:
            await channel.channel_ready()
            begun = time.perf_counter()
            stub = upload_pb2_grpc.UploadServiceStub(channel)
            call = stub.Upload(metadata=bearer(token), timeout=60)
            for message in upload_requests(workload, start):
                await call.write(message)
            await call.done_writing()
            response = await call
            took = time.perf_counter() - begun
        if response.size != size:
            raise RuntimeError(f"the first upload of {tenant} stored {response.size} bytes")
        await asyncio.to_thread(delete_quietly, store, PREFIX + name)
        return took

    # The gateway's pools (S3 connections, worker threads) first grow to this concurrency with
    # a tenant it already knows: that is the process warming up, not a new tenant's cost.
    warm_up = await asyncio.gather(*(one(TENANT, f"warm-up-{i}") for i in range(clients)))
    first: list[float] = []
    warm: list[float] = []
    pairs: list[float] = []  # each tenant's first upload minus its warm one
    added_by_repeat: list[float] = []
    for repeat in range(repeats):
        tenants = [f"first-{run}-{repeat}-{i}" for i in range(clients)]
        for tenant in tenants:
            await set_credentials(address, admin_token, tenant, store)
        firsts = list(await asyncio.gather(*(one(tenant, "first") for tenant in tenants)))
        warms = list(await asyncio.gather(*(one(tenant, "warm") for tenant in tenants)))
        differences = [f - w for f, w in zip(firsts, warms, strict=True)]
        first += firsts
        warm += warms
        pairs += differences
        added_by_repeat.append(statistics.median(differences) * 1000)
    return {
        "clients": clients,
        "repeats": repeats,
        "size_kib": size / KiB,
        "first_ms": {"median": statistics.median(first) * 1000, "max": max(first) * 1000},
        "warm_ms": {"median": statistics.median(warm) * 1000, "max": max(warm) * 1000},
        "added_ms": statistics.median(pairs) * 1000,
        "added_ms_by_repeat": added_by_repeat,
        "process_warm_up_ms": statistics.median(warm_up) * 1000,
        "first_runs_ms": [value * 1000 for value in first],
    }
