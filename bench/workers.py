"""Issue 10's line: one gateway worker against two on the same port (server.reuse_port,
SO_REUSEPORT), sessions in PostgreSQL (a throwaway cluster), in one run.

Both workers are discarding-store gateways (bench.backends.NullStore): MinIO on the same two
cores would take a large share of the CPU a second worker needs, and in production the store is
remote. The kernel picks a worker per connection; the bench opens connections one at a time,
finds from /proc which worker accepted each, and keeps enough on each worker, so that "one
worker" means every upload on worker A and "two workers" means half of them on each: the same
uploads, the same bytes, the same client, in interleaved rounds, with both workers running
throughout.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

import grpc

from bench import backends
from bench.common import CLIENT, Cleanup, MiB, Workload, cpu_seconds
from bench.scenarios import upload_one

MAX_CONNECTIONS = 64  # opened at most to find enough on each worker


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _tcp_rows(state: str = "01") -> list[tuple[int, int, str]]:
    """(local port, remote port, inode) of every TCP socket in `state` (01 established, 0A
    listening), v4 and v6: gRPC listens on a dual-stack socket even for 127.0.0.1."""
    rows = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/self/net/{table}") as lines:
            for line in lines.readlines()[1:]:
                fields = line.split()
                if fields[3] == state:
                    local = int(fields[1].rsplit(":", 1)[1], 16)
                    remote = int(fields[2].rsplit(":", 1)[1], 16)
                    rows.append((local, remote, fields[9]))
    return rows


def _listening(pid: int, port: int) -> bool:
    mine = _socket_inodes(pid)
    return any(local == port and inode in mine for local, _, inode in _tcp_rows("0A"))


def _client_ports(port: int) -> set[int]:
    """Local ports of this process's connections to `port`."""
    mine = _socket_inodes(os.getpid())
    return {local for local, remote, inode in _tcp_rows() if remote == port and inode in mine}


def _acceptor(port: int, client_port: int, pids: list[int]) -> int:
    """The worker (pid) holding the accepted end of the connection from `client_port`."""
    ends = {inode for local, remote, inode in _tcp_rows() if (local, remote) == (port, client_port)}
    for pid in pids:
        if ends & _socket_inodes(pid):
            return pid
    return 0


def _tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its children (PostgreSQL: the postmaster and its backends)."""
    total = cpu_seconds(pid)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
            if int(fields[1]) == pid:
                total += cpu_seconds(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return total


async def _connections(
    address: str, port: int, pids: list[int], wanted: dict[int, int]
) -> dict[int, list[grpc.aio.Channel]]:
    """Channels (a connection each) until each worker pid has `wanted[pid]`; the rest closed."""
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", 8 * MiB)]
    found: dict[int, list[grpc.aio.Channel]] = {pid: [] for pid in pids}
    for _ in range(MAX_CONNECTIONS):
        if all(len(found[pid]) >= wanted[pid] for pid in pids):
            return found
        before = _client_ports(port)
        channel = grpc.aio.insecure_channel(address, options=options)
        await asyncio.wait_for(channel.channel_ready(), 30)
        new = _client_ports(port) - before
        pid = _acceptor(port, new.pop(), pids) if len(new) == 1 else 0
        if pid and len(found[pid]) < wanted[pid]:
            found[pid].append(channel)
        else:
            await channel.close()
    raise RuntimeError(f"{MAX_CONNECTIONS} connections did not reach both workers")


async def _round(
    channels: list[grpc.aio.Channel],
    token: str,
    workload: Workload,
    label: str,
    pids: dict[str, int],
) -> dict[str, Any]:
    """The uploads at once, one per channel: aggregate MiB/s and CPU of every process."""

    def snapshot() -> dict[str, float]:
        times = os.times()
        values = {CLIENT: times.user + times.system}
        for name, pid in pids.items():
            values[name] = _tree_cpu(pid) if name == "postgres" else cpu_seconds(pid)
        return values

    before = snapshot()
    started = time.perf_counter()
    responses = await asyncio.gather(
        *(
            upload_one(channel, token, workload, f"{label}-{index}.bin")
            for index, channel in enumerate(channels)
        )
    )
    seconds = time.perf_counter() - started
    after = snapshot()
    if any(response.size != workload.size for response in responses):
        raise RuntimeError("a worker stored other bytes than were sent")
    mib = len(channels) * workload.size / MiB
    cpu = {name: (after[name] - before[name]) * 1000 / mib for name in after}
    return {
        "mib_per_s": mib / seconds,
        "cpu_ms_per_mib": cpu,
        "cores": sum(after[name] - before[name] for name in after) / seconds,
    }


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    speeds = [result["mib_per_s"] for result in results]
    names = results[0]["cpu_ms_per_mib"]
    cpu = {n: statistics.median(r["cpu_ms_per_mib"][n] for r in results) for n in names}
    return {
        "mib_per_s": statistics.median(speeds),
        "runs": speeds,
        "cores": statistics.median(result["cores"] for result in results),
        "cpu_ms_per_mib": cpu,
        "total_cpu_ms_per_mib": sum(cpu.values()),
    }


async def workers_scenario(
    config: backends.GatewayConfig,
    secret_ids: dict[str, str],
    workdir: Path,
    cleanup: Cleanup,
    token: str,
    size: int,
    chunk: int,
    rounds: int,
    streams: int,
) -> dict[str, Any]:
    """One worker vs two: `streams` concurrent uploads of size/streams bytes each, per round."""
    from recgw_server.dev.stack import free_port, postgres_bindir, start_postgres, wait_until

    try:
        postgres_bindir()
    except Exception as error:  # no PostgreSQL server binaries on this machine
        return {"skipped": f"skipped: no PostgreSQL ({type(error).__name__}: {error})"}
    cluster = await asyncio.to_thread(start_postgres)
    cleanup.add("postgres", cluster.stop)
    url = await asyncio.to_thread(cluster.create_database, "recgw_bench")
    port = free_port()
    env = {"RECGW_SERVER__REUSE_PORT": "true", "RECGW_SESSIONS__URL": url}
    names = ("worker_a", "worker_b")
    workers = []
    for name in names:
        worker = backends.start_gateway(
            name, config, port, secret_ids, workdir, null_store=True, env=env
        )
        cleanup.add(name, worker.child.stop)
        workers.append(worker)

        # The port answers once the first worker listens: wait for this one's own socket.
        def bound(worker: backends.GatewayProcess = worker) -> bool:
            if not worker.child.alive():
                raise RuntimeError(f"{worker.name} exited; see {worker.child.log_path}")
            return _listening(worker.pid, port)

        await asyncio.to_thread(wait_until, bound, 60, worker.name)
    a, b = (worker.pid for worker in workers)
    half = streams // 2
    pool = await _connections(workers[0].address, port, [a, b], {a: streams, b: half})
    one_worker, two_workers = pool[a], pool[a][:half] + pool[b]
    with open(cluster.data_dir / "postmaster.pid") as pidfile:
        postmaster = int(pidfile.readline())
    pids = {"worker_a": a, "worker_b": b, "postgres": postmaster}
    per_stream = max(chunk, size // streams)
    workload = Workload.make(per_stream, chunk)
    warm = Workload.make(2 * chunk, chunk, MiB)
    try:
        await _round(one_worker + pool[b], token, warm, "workers-warm", pids)
        results: dict[str, list[dict[str, Any]]] = {"one": [], "two": []}
        for run in range(rounds):
            order = ("one", "two") if run % 2 == 0 else ("two", "one")
            for kind in order:
                chosen = one_worker if kind == "one" else two_workers
                result = await _round(chosen, token, workload, f"workers-{kind}-{run}", pids)
                results[kind].append(result)
                print(
                    f"[{run + 1}/{rounds}] workers: {kind:<3} {result['mib_per_s']:8.1f} MiB/s "
                    f"aggregate, {result['cores']:.2f} cores busy",
                    flush=True,
                )
    finally:
        for channel in pool[a] + pool[b]:
            await channel.close()
        for worker in workers:
            worker.child.stop()
        cluster.stop()
    one, two = _summary(results["one"]), _summary(results["two"])
    nproc = len(os.sched_getaffinity(0))
    return {
        "store": "discarding store",
        "sessions": "PostgreSQL",
        "streams": streams,
        "stream_mib": per_stream / MiB,
        "one_worker": one,
        "two_workers": two,
        "ratio": two["mib_per_s"] / one["mib_per_s"],
        "nproc": nproc,
        # What the CPU of this machine allows: every core busy at the two-worker run's total
        # CPU per MiB (client, both workers, PostgreSQL), against one worker's rate.
        "cpu_bound_ratio": nproc * 1000 / two["total_cpu_ms_per_mib"] / one["mib_per_s"],
    }
