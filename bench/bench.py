"""`make bench`: the gateway beside raw gRPC, direct boto3, aws-crt and tusd, in one run.

Throughput: the same recording (unknown length, 1 MiB messages) goes, in interleaved rounds
(the order rotates each round), through every path:

- raw gRPC: streamed to a trivial grpc.aio server (another process) that discards it: the
  transport's ceiling;
- direct boto3: a multipart upload straight to S3 with the gateway's part size, parts in
  flight, CRC32C per part and unsigned payload, configured like the gateway's own client;
- aws-crt: awscrt.s3's client fed from a Python stream (a PUT of unknown length);
- tusd v2 (s3store), as shipped and tuned (8 MiB parts, no content hashes), driven by a tus
  client that uses creation-defer-length and 64 MiB PATCHes;
- the gateway (`recgw serve`) into S3 with its defaults (CRC32C end to end; SHA-256 only on
  request, and not requested), the same with the start message asking for SHA-256 (as the
  clients do), the gateway with a discarding ObjectStore (a separate process of its own, see
  bench.backends.NullStore), and the gateway with the stream broken and resumed 3 times;
- each client library (Go, TypeScript, Java, Python; bench.clients) in a process of its own,
  through the discarding-store gateway, checksums on (CRC32C + SHA-256), beside raw gRPC.

S3 is MinIO (single drive on tmpfs, its trash emptied between measurements) unless `--store
moto`. Every process's CPU is read from /proc around each transfer; the gateway's peak RSS is
its VmHWM, reset before each transfer. Then the scenarios, each on a fresh gateway: 64 and 500
concurrent streams (RSS above idle against the memory budget), 500 live calls at 1 Mbit/s
beside a bulk and a small upload, and the first upload of 16 new tenants at once. Before them,
one discarding-store gateway worker against two on one port (bench.workers).

Every process the bench starts is stopped at the end, on errors and on Ctrl-C; everything
listens on 127.0.0.1. Secrets go through environment variables and Python objects, never a
command line or the output.

Usage: `make bench BENCH_ARGS="--rounds 3 --json out.json"`; `--quick` for a short run;
`--only clients,workers` for some groups only (paths, clients, workers, scenarios).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from bench import backends, clients, paths, report, scenarios, workers
from bench.common import (
    PREFIX,
    STOPPING,
    TENANT,
    Child,
    Cleanup,
    KiB,
    Meter,
    MiB,
    Sample,
    Workload,
    memory_kib,
)

ALL_PATHS = tuple(report.PATHS)
GROUPS = ("paths", "clients", "workers", "scenarios")


@dataclass
class Options:
    size: int
    chunk: int
    part_size: int
    inflight: int
    boto3_concurrency: int
    memory_budget_mib: int
    rounds: int
    interruptions: int
    store: str
    paths: tuple[str, ...]
    tus_patch: int
    memory_streams: tuple[tuple[int, int], ...]  # (streams, bytes per stream) per memory run
    memory_channels: int
    rss_limit_mib: int
    scenario_timeout: float
    live_streams: int
    live_seconds: float
    live_message_bytes: int
    live_kbps: float
    live_channels: int
    live_bulk: int
    live_small: int
    live_grace: float
    first_clients: int
    first_size: int
    json_path: Path | None
    keep_logs: bool
    workers: bool = True
    worker_streams: int = 4
    scenarios: bool = True


@dataclass
class Stack:
    """What the measurements talk to."""

    store: backends.Store
    gateways: dict[str, backends.GatewayProcess]
    sink: Child
    sink_address: str
    tusds: dict[str, backends.Tusd]
    config: backends.GatewayConfig
    secret_ids: dict[str, str]
    workdir: Path
    uploader_token: str
    admin_token: str
    cleanup: Cleanup


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


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


def show(label: str, path: str, size: int, sample: Sample) -> None:
    info = report.PATHS[path]
    mib = size / MiB
    cpu = ", ".join(
        f"{name} {sample.cpu.get(name, 0.0) * 1000 / mib:.2f}" for name in info.processes
    )
    rss = f"  peak RSS {sample.peak_rss_kib / KiB:.0f} MiB" if sample.peak_rss_kib else ""
    print(
        f"{label} {path:<19} {mib / sample.seconds:8.1f} MiB/s  {sample.seconds:6.2f} s  "
        f"CPU ms/MiB: {cpu}; load {sample.load_average:.2f}{rss}",
        flush=True,
    )


class Rounds:
    """Runs one path once; knows the stack, the workload and the meter."""

    def __init__(self, stack: Stack, options: Options, workload: Workload) -> None:
        self.stack = stack
        self.options = options
        self.workload = workload
        self.crc32c = 0
        self.sha256 = b""
        pids = {"store": stack.store.pid, "sink": stack.sink.pid}
        pids.update({name: gateway.pid for name, gateway in stack.gateways.items()})
        pids.update({name: tusd.child.pid for name, tusd in stack.tusds.items()})
        self.meter = Meter(pids)
        self.gateway_parts = 0
        self.resumed: list[paths.Resumed] = []
        self._boto3: Any = None
        self._crt: paths.CrtUploader | None = None
        self.clients: dict[str, clients.Client] = {}

    async def prepare(self) -> None:
        self.crc32c = await asyncio.to_thread(self.workload.crc32c)
        self.sha256 = await asyncio.to_thread(self.workload.sha256)
        concurrency = self.options.boto3_concurrency
        self._boto3 = await asyncio.to_thread(paths.boto3_client, self.stack.store, concurrency)
        self._crt = paths.CrtUploader(self.stack.store, self.options.part_size)

    async def run(self, path: str, run: int, workload: Workload | None = None) -> Sample:
        workload = workload or self.workload
        stack, options, meter = self.stack, self.options, self.meter
        crc = self.crc32c if workload is self.workload else workload.crc32c()
        if path == "raw_grpc":
            return await paths.raw_grpc(stack.sink_address, workload, run, meter)
        if path in report.CLIENT_PATHS:
            gateway = stack.gateways["gateway_null"]
            return await asyncio.to_thread(
                clients.run,
                self.clients[path],
                gateway.address,
                stack.uploader_token,
                workload.size,
                gateway.pid,
                stack.workdir,
            )
        if path == "direct_boto3":
            return await asyncio.to_thread(
                paths.direct_boto3,
                self._boto3,
                stack.store,
                workload,
                run,
                options.part_size,
                options.boto3_concurrency,
                meter,
            )
        if path == "aws_crt":
            assert self._crt is not None
            return await asyncio.to_thread(self._crt.upload, workload, run, meter)
        if path.startswith("tusd"):
            tusd = stack.tusds[path]
            sample = await asyncio.to_thread(
                paths.tus_upload, tusd, workload, options.tus_patch, meter
            )
            await asyncio.to_thread(paths.assert_tus_object, stack.store, workload)
            await asyncio.to_thread(paths.tus_cleanup, stack.store)
            return sample
        if path == "gateway_resumed":
            gateway = stack.gateways["gateway"]
            sha = self.sha256 if workload is self.workload else workload.sha256()
            name = f"resumed-{run}.bin"
            resumed = await paths.resumed_upload(
                gateway.address,
                stack.uploader_token,
                workload,
                name,
                options.interruptions,
                sha,
                meter,
                gateway.pid,
            )
            if workload is self.workload:
                self.resumed.append(resumed)
            await asyncio.to_thread(stack.store.delete, PREFIX + name)
            return resumed.sample
        gateway = stack.gateways["gateway" if path == "gateway_sha256" else path]
        name = f"{path}-{run}.bin"
        sha = b""
        if path == "gateway_sha256":
            sha = self.sha256 if workload is self.workload else workload.sha256()
        sample, response = await paths.gateway_upload(
            gateway.address, stack.uploader_token, workload, name, crc, meter, gateway.pid, sha
        )
        if path == "gateway":
            self.gateway_parts = response.part_count
        if path != "gateway_null":
            await asyncio.to_thread(stack.store.delete, PREFIX + name)
        return sample


async def fresh_gateway(stack: Stack, name: str) -> backends.GatewayProcess:
    """A new gateway process (same settings, same Vault) for one scenario, warmed up with one
    small upload so that its idle RSS includes the S3 client."""
    gateway = backends.start_gateway(
        name, stack.config, free_port(), stack.secret_ids, stack.workdir
    )
    stack.cleanup.add(name, gateway.child.stop)
    await wait_ready(gateway.address, gateway.child)
    warm = Workload.make(1 * MiB, 256 * KiB, 1 * MiB)
    await paths.gateway_upload(
        gateway.address,
        stack.uploader_token,
        warm,
        f"{name}-warm.bin",
        warm.crc32c(),
        Meter({}),
        0,
    )
    await asyncio.to_thread(stack.store.delete, f"{PREFIX}{name}-warm.bin")
    return gateway


def free_port() -> int:
    from recgw_server.dev.stack import free_port

    return free_port()


async def measure(stack: Stack, options: Options) -> dict[str, Any]:
    try:
        return await measure_all(stack, options)
    except BaseException:
        STOPPING.set()
        raise


async def measure_all(stack: Stack, options: Options) -> dict[str, Any]:
    for gateway in stack.gateways.values():
        await wait_ready(gateway.address, gateway.child)
    await wait_ready(stack.sink_address, stack.sink)
    # Every gateway reads the same Vault: one SetCredentials serves them all.
    await scenarios.set_credentials(
        stack.gateways["gateway"].address, stack.admin_token, TENANT, stack.store
    )
    print(f"generating {options.size // MiB} MiB of test data and its checksums...", flush=True)
    workload = Workload.make(options.size, options.chunk)
    rounds = Rounds(stack, options, workload)
    await rounds.prepare()
    chosen = list(options.paths)
    skipped: dict[str, str] = {}
    for name in [path for path in chosen if path in report.CLIENT_PATHS]:
        print(f"building {name} (not timed)...", flush=True)
        client = await asyncio.to_thread(clients.build, name, stack.workdir)
        if client.skipped:
            skipped[name] = client.skipped
            print(f"  {name}: {client.skipped}", flush=True)
        else:
            rounds.clients[name] = client
    chosen = [path for path in chosen if path not in skipped]
    # Warm-up, not timed: Vault logins, credential caches, S3 clients, connection pools.
    warm = Workload.make(max(options.interruptions + 1, 2) * options.chunk, options.chunk, MiB)
    for path in list(chosen):
        try:
            await rounds.run(path, -1, warm)
        except RuntimeError as error:
            if path not in report.CLIENT_PATHS:
                raise
            skipped[path] = f"skipped: failed in the warm-up: {error}"
            print(f"  {path}: {skipped[path]}", flush=True)
            chosen.remove(path)
    await asyncio.to_thread(stack.store.settle)
    samples: dict[str, list[Sample]] = {path: [] for path in chosen}
    hashing: list[float] = []
    for run in range(options.rounds):
        label = f"[{run + 1}/{options.rounds}]"
        order = chosen[run % len(chosen) :] + chosen[: run % len(chosen)] if chosen else []
        for path in order:
            if path in skipped:
                continue
            try:
                sample = await rounds.run(path, run)
            except RuntimeError as error:  # a client that fails: its line says so
                if path not in report.CLIENT_PATHS:
                    raise
                skipped[path] = f"skipped: failed in round {run + 1}: {error}"
                print(f"{label} {path}: {skipped[path]}", flush=True)
                continue
            show(label, path, options.size, sample)
            samples[path].append(sample)
            await asyncio.to_thread(stack.store.settle)
            if path == "gateway_sha256":  # the hashing cost it is held to, in the same round
                hashing.append(await asyncio.to_thread(report.sha256_ms_per_mib))
    chosen = [path for path in chosen if path not in skipped]
    data: dict[str, Any] = {
        "paths": {
            path: report.summarise(samples[path], options.size, report.PATHS[path])
            for path in chosen
        },
        "gateway_parts": rounds.gateway_parts,
        "resume": [
            {
                "bytes_resent": run.data_sent - options.size,
                "refused_resumes": run.refused,
                "breaks": [cut.__dict__ for cut in run.interruptions],
            }
            for run in rounds.resumed
        ],
        "clients_skipped": skipped,
        "sha256_ms_per_mib_runs": hashing,
    }
    if options.workers:
        print(f"workers: one vs two on one port, {options.worker_streams} uploads...", flush=True)
        data["workers"] = await workers.workers_scenario(
            stack.config,
            stack.secret_ids,
            stack.workdir,
            stack.cleanup,
            stack.uploader_token,
            options.size,
            options.chunk,
            options.rounds,
            options.worker_streams,
        )
    if options.scenarios:
        await run_scenarios(stack, options, data)
    return data


async def run_scenarios(stack: Stack, options: Options, data: dict[str, Any]) -> None:
    if options.first_clients:
        print(f"first upload of {options.first_clients} new tenants at once...", flush=True)
        gateway = await fresh_gateway(stack, "gateway_first")
        data["first_upload"] = await scenarios.first_uploads(
            gateway.address,
            stack.uploader_token,
            stack.admin_token,
            stack.store,
            options.first_clients,
            options.first_size,
            secrets.token_hex(3),
        )
        gateway.child.stop()
    data["memory"] = []
    for count, stream_size in options.memory_streams:
        print(f"memory: {count} concurrent streams of {stream_size / MiB:g} MiB...", flush=True)
        gateway = await fresh_gateway(stack, f"gateway_memory_{count}_{stream_size // MiB}")
        result = await scenarios.memory_scenario(
            gateway.address,
            gateway.pid,
            stack.uploader_token,
            stack.store,
            count,
            stream_size,
            options.chunk,
            options.memory_channels,
            options.memory_budget_mib,
            options.rss_limit_mib,
            options.scenario_timeout,
        )
        data["memory"].append(result.as_dict())
        gateway.child.stop()
        await asyncio.to_thread(stack.store.settle)
    if options.live_streams:
        print(
            f"live: {options.live_streams} calls for {options.live_seconds:g} s beside a bulk "
            "and a small upload...",
            flush=True,
        )
        gateway = await fresh_gateway(stack, "gateway_live")
        live = await scenarios.live_scenario(
            gateway.address,
            gateway.pid,
            stack.uploader_token,
            stack.store,
            streams=options.live_streams,
            seconds=options.live_seconds,
            message_bytes=options.live_message_bytes,
            kbit_per_s=options.live_kbps,
            channel_count=options.live_channels,
            bulk_size=options.live_bulk,
            small_size=options.live_small,
            chunk=options.chunk,
            budget_mib=options.memory_budget_mib,
            rss_limit_mib=options.rss_limit_mib,
            grace=options.live_grace,
            store_pid=stack.store.pid,
        )
        data["live"] = live.as_dict()
        data["live"]["gateway_final_rss_mib"] = memory_kib(gateway.pid)["VmRSS"] / KiB
        gateway.child.stop()


def run_bench(options: Options) -> dict[str, Any]:
    from recgw_server.auth.tokens import hash_token
    from recgw_server.dev.minio import tmpfs_dir
    from recgw_server.dev.stack import bootstrap_vault, free_port, start_openbao

    workdir = Path(tempfile.mkdtemp(prefix="recgw-bench-"))  # mode 0700
    cleanup = Cleanup()
    keep = options.keep_logs
    started = time.time()
    try:
        print(f"starting OpenBao and {options.store}...", flush=True)
        bao = start_openbao(workdir)
        cleanup.add("OpenBao", bao.stop)
        store = backends.start_store(options.store, workdir)
        cleanup.add(options.store, store.stop)
        identities = bootstrap_vault(bao)
        assert identities.writer.secret_id and identities.reader.secret_id
        uploader_token = "upl_" + secrets.token_urlsafe(24)
        admin_token = "adm_" + secrets.token_urlsafe(24)
        config = backends.GatewayConfig(
            part_size=options.part_size,
            inflight=options.inflight,
            memory_budget_mib=options.memory_budget_mib,
            vault_address=bao.address,
            writer_role_id=identities.writer.role_id,
            reader_role_id=identities.reader.role_id,
            token_hashes={"uploader": hash_token(uploader_token), "admin": hash_token(admin_token)},
        )
        secret_ids = {
            "writer": identities.writer.secret_id.reveal(),
            "reader": identities.reader.secret_id.reveal(),
        }
        wanted = set(options.paths)
        print("starting the gateways, the raw gRPC sink and tusd...", flush=True)
        gateways: dict[str, backends.GatewayProcess] = {}
        variants: list[tuple[str, bool, dict[str, str]]] = [("gateway", False, {})]
        if "gateway_null" in wanted or wanted & set(report.CLIENT_PATHS):
            variants.append(("gateway_null", True, {}))
        for name, null_store, env in variants:
            gateway = backends.start_gateway(
                name, config, free_port(), secret_ids, workdir, null_store=null_store, env=env
            )
            cleanup.add(name, gateway.child.stop)
            gateways[name] = gateway
        sink_port = free_port()
        sink = backends.start_sink(sink_port, workdir)
        cleanup.add("sink", sink.stop)
        spool = tmpfs_dir("recgw-bench-spool-")
        cleanup.add("spool", lambda: shutil.rmtree(spool, ignore_errors=True))
        tusds: dict[str, backends.Tusd] = {}
        for name, tuned in (("tusd_defaults", False), ("tusd_tuned", True)):
            if name in wanted:
                tusd = backends.start_tusd(name, store, free_port(), tuned, spool / name, workdir)
                cleanup.add(name, tusd.child.stop)
                tusds[name] = tusd
        stack = Stack(
            store=store,
            gateways=gateways,
            sink=sink,
            sink_address=f"127.0.0.1:{sink_port}",
            tusds=tusds,
            config=config,
            secret_ids=secret_ids,
            workdir=workdir,
            uploader_token=uploader_token,
            admin_token=admin_token,
            cleanup=cleanup,
        )
        data = asyncio.run(measure(stack, options))
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
    data["config"] = {
        "size_mib": options.size / MiB,
        "chunk_kib": options.chunk // KiB,
        "part_size_mib": options.part_size // MiB,
        "inflight": options.inflight,
        "boto3_concurrency": options.boto3_concurrency,
        "memory_budget_mib": options.memory_budget_mib,
        "rounds": options.rounds,
        "interruptions": options.interruptions,
        "store": options.store,
        "store_data": "tmpfs" if options.store == "minio" else "moto's memory",
        "tus_patch_mib": options.tus_patch / MiB,
        "gateway_sha256": "only when the start message asks (uploads.sha256 = on_request)",
        "wall_seconds": time.time() - started,
    }
    loads = [load for info in data["paths"].values() for load in info["load_average"]]
    data["config"]["median_load_average"] = statistics.median(loads) if loads else None
    data["machine"] = report.machine_facts()
    data["ratios"] = report.ratios(data["paths"])
    data["clients"] = report.clients_summary(data, options.paths)
    data["goals"] = report.goals(data)
    return data


def memory_runs(spec: str, default_mib: float) -> tuple[tuple[int, int], ...]:
    """`64,500,64x64` as ((64, 16 MiB), (500, 16 MiB), (64, 64 MiB)) with a default of 16."""
    runs = []
    for item in (part.strip() for part in spec.split(",")):
        if item:
            count, _, mib = item.partition("x")
            runs.append((int(count), int(float(mib or default_mib) * MiB)))
    return tuple(runs)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Options]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add = parser.add_argument
    add("--size-mib", type=float, default=512, help="recording size per path and round (512)")
    add("--chunk-kib", type=int, default=1024, help="message size (1024)")
    add("--part-size-mib", type=int, default=8, help="S3 part size (8)")
    add("--inflight", type=int, default=4, help="gateway max_inflight_parts (4, its default)")
    add("--boto3-concurrency", type=int, default=0, help="direct boto3 parts in flight (inflight)")
    add("--memory-budget-mib", type=int, default=512, help="gateway memory budget (512)")
    add("--rounds", "--repeat", type=int, default=3, help="interleaved rounds (3)")
    add("--interruptions", type=int, default=3, help="breaks of the resumed upload (3)")
    add("--store", choices=("minio", "moto"), default="minio", help="the S3 (minio)")
    add("--paths", default=",".join(ALL_PATHS), help="comma-separated paths to measure (all)")
    add("--tus-patch-mib", type=int, default=64, help="bytes per tus PATCH (64 MiB)")
    add(
        "--memory-streams",
        default="64,500,64x64",
        help="memory runs: N streams of --memory-stream-mib each, or NxM: N streams of M MiB "
        "(64,500,64x64: the last shows RSS does not grow with stream length)",
    )
    add("--memory-stream-mib", type=float, default=16, help="size of each of those streams (16)")
    add("--memory-channels", type=int, default=0, help="channels for them (0: one per stream)")
    add("--rss-limit-mib", type=int, default=8192, help="stop a scenario above this RSS (8192)")
    add("--scenario-timeout", type=float, default=300, help="longest memory run, seconds (300)")
    add("--live-streams", type=int, default=500, help="live calls (500; 0 skips)")
    add("--live-seconds", type=float, default=60, help="length of each live call (60)")
    add("--live-message-bytes", type=int, default=8000, help="bytes per live message (8000)")
    add("--live-kbps", type=float, default=1000, help="kbit/s per live call (1000)")
    add("--live-channels", type=int, default=8, help="channels the live calls share (8)")
    add("--live-bulk-mib", type=float, default=256, help="bulk upload beside them (256)")
    add("--live-small-mib", type=float, default=4, help="small upload beside them (4)")
    add("--live-grace", type=float, default=120, help="time allowed past the calls' end (120)")
    add("--first-clients", type=int, default=16, help="new tenants uploading at once (16)")
    add("--first-size-kib", type=int, default=64, help="size of their first upload (64)")
    add("--worker-streams", type=int, default=4, help="concurrent uploads, workers line (4)")
    add(
        "--only",
        default=",".join(GROUPS),
        help="groups to run: paths (single uploads per --paths), clients (the four client "
        "libraries beside raw gRPC), workers (one vs two gateway workers), scenarios (all)",
    )
    add("--quick", action="store_true", help="a short run: 64 MiB, 1 round, small scenarios")
    add("--json", type=Path, default=None, help="write the results here")
    add("--keep-logs", action="store_true", help="keep the temp dir with logs")
    add("--sink-port", type=int, default=0, help=argparse.SUPPRESS)
    add("--null-gateway", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.rounds, args.memory_streams = 64, 1, "16"
        args.live_streams, args.live_seconds, args.live_bulk_mib = 50, 8, 64
        args.live_grace, args.first_clients = 60, 4
    size = int(args.size_mib * MiB)
    chunk = args.chunk_kib * KiB
    chosen = tuple(path.strip() for path in args.paths.split(",") if path.strip())
    if unknown := [path for path in chosen if path not in ALL_PATHS]:
        parser.error(f"unknown paths {unknown}; choose from {', '.join(ALL_PATHS)}")
    groups = {group.strip() for group in args.only.split(",") if group.strip()}
    if unknown_groups := groups - set(GROUPS):
        parser.error(f"unknown groups {sorted(unknown_groups)}; choose from {', '.join(GROUPS)}")
    singles = [p for p in chosen if p not in report.CLIENT_PATHS] if "paths" in groups else []
    if singles and "gateway" not in singles:
        singles.insert(0, "gateway")  # every ratio is about it
    client_paths = [p for p in chosen if p in report.CLIENT_PATHS] if "clients" in groups else []
    if client_paths and "raw_grpc" not in singles:
        singles.append("raw_grpc")  # the clients' ratios are to it
    chosen = tuple(p for p in ALL_PATHS if p in singles or p in client_paths)
    if args.worker_streams < 2 or args.worker_streams % 2:
        parser.error("--worker-streams must be even and at least 2")
    if not 0 < chunk <= 4 * MiB:
        parser.error("--chunk-kib must be between 1 and 4096")
    if size < 1 or args.rounds < 1 or args.inflight < 1 or args.interruptions < 1:
        parser.error("--size-mib, --rounds, --inflight and --interruptions must be positive")
    if -(-size // chunk) <= args.interruptions:
        parser.error("the recording needs more messages than --interruptions")
    options = Options(
        size=size,
        chunk=chunk,
        part_size=args.part_size_mib * MiB,
        inflight=args.inflight,
        boto3_concurrency=args.boto3_concurrency or args.inflight,
        memory_budget_mib=args.memory_budget_mib,
        rounds=args.rounds,
        interruptions=args.interruptions,
        store=args.store,
        paths=chosen,
        tus_patch=args.tus_patch_mib * MiB,
        memory_streams=memory_runs(str(args.memory_streams), args.memory_stream_mib),
        memory_channels=args.memory_channels,
        rss_limit_mib=args.rss_limit_mib,
        scenario_timeout=args.scenario_timeout,
        live_streams=args.live_streams,
        live_seconds=args.live_seconds,
        live_message_bytes=args.live_message_bytes,
        live_kbps=args.live_kbps,
        live_channels=max(1, args.live_channels),
        live_bulk=int(args.live_bulk_mib * MiB),
        live_small=int(args.live_small_mib * MiB),
        live_grace=args.live_grace,
        first_clients=args.first_clients,
        first_size=args.first_size_kib * KiB,
        json_path=args.json,
        keep_logs=args.keep_logs,
        workers="workers" in groups,
        worker_streams=args.worker_streams,
        scenarios="scenarios" in groups,
    )
    return args, options


def main(argv: list[str] | None = None) -> int:
    args, options = parse_args(argv)
    if args.sink_port:
        asyncio.run(backends.run_sink(args.sink_port))
        return 0
    if args.null_gateway:
        asyncio.run(backends.run_null_gateway(args.null_gateway))
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    try:
        data = run_bench(options)
    except KeyboardInterrupt:
        print("interrupted; everything the bench started was stopped", file=sys.stderr)
        return 130
    report.print_report(data)
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"results written to {options.json_path}")
    return 0
