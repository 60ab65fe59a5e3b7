"""Turn the samples into figures (medians, spread, CPU per MiB, ratios, goals), as JSON for
comparing runs and as a table for people."""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any

from bench.common import CLIENT, MiB, Sample


@dataclass(frozen=True)
class PathInfo:
    label: str
    processes: tuple[str, ...]  # whose CPU counts for this path, besides nothing else
    uploader: str  # the process that does the uploading work (its CPU per MiB is the figure)


PATHS: dict[str, PathInfo] = {
    "raw_grpc": PathInfo("raw gRPC stream -> discarding grpc.aio server", (CLIENT, "sink"), "sink"),
    "direct_boto3": PathInfo(
        "direct boto3 multipart (8 MiB, 4 in flight, CRC32C per part and FULL_OBJECT, unsigned)",
        (CLIENT, "store"),
        CLIENT,
    ),
    "aws_crt": PathInfo("aws-crt S3 client from a Python stream", (CLIENT, "store"), CLIENT),
    "tusd_tuned": PathInfo(
        "tusd s3store, 8 MiB parts, content hashes off",
        (CLIENT, "tusd_tuned", "store"),
        "tusd_tuned",
    ),
    "tusd_defaults": PathInfo(
        "tusd s3store, defaults", (CLIENT, "tusd_defaults", "store"), "tusd_defaults"
    ),
    "gateway": PathInfo(
        "recgw gateway -> S3, defaults (CRC32C; SHA-256 only on request, not asked)",
        (CLIENT, "gateway", "store"),
        "gateway",
    ),
    "gateway_sha256": PathInfo(
        "recgw gateway -> S3, start asks compute_sha256 (as the clients do)",
        (CLIENT, "gateway", "store"),
        "gateway",
    ),
    "gateway_null": PathInfo(
        "recgw gateway -> discarding store, CRC32C (no SHA-256)",
        (CLIENT, "gateway_null"),
        "gateway_null",
    ),
    "gateway_resumed": PathInfo(
        "recgw gateway -> S3, broken and resumed", (CLIENT, "gateway", "store"), "gateway"
    ),
    **{
        f"client_{lang}": PathInfo(
            f"{label} client (own process) -> gateway -> discarding store, CRC32C + SHA-256",
            (f"client_{lang}", "gateway_null"),
            f"client_{lang}",
        )
        for lang, label in (
            ("go", "Go"),
            ("ts", "TypeScript/Node"),
            ("java", "Java"),
            ("python", "Python"),
        )
    },
}
CLIENT_PATHS = tuple(path for path in PATHS if path.startswith("client_"))


def summarise(samples: list[Sample], size: int, info: PathInfo) -> dict[str, Any]:
    mib = size / MiB
    speeds = [mib / sample.seconds for sample in samples]
    median = statistics.median(speeds)
    cpu_ms = {
        name: [sample.cpu.get(name, 0.0) * 1000 / mib for sample in samples]
        for name in info.processes
    }
    peaks = [sample.peak_rss_kib / 1024 for sample in samples if sample.peak_rss_kib]
    return {
        "label": info.label,
        "uploader": info.uploader,
        "mib_per_s": {
            "median": median,
            "min": min(speeds),
            "max": max(speeds),
            "spread": (max(speeds) - min(speeds)) / median,
            "runs": speeds,
        },
        "seconds": [sample.seconds for sample in samples],
        "cpu_ms_per_mib": {name: statistics.median(values) for name, values in cpu_ms.items()},
        "cpu_ms_per_mib_runs": cpu_ms,
        "uploader_cpu_ms_per_mib": statistics.median(cpu_ms[info.uploader]),
        "load_average": [sample.load_average for sample in samples],
        "other_cores": [s.other_cores for s in samples if s.other_cores is not None],
        "stolen_cores": [s.stolen_cores for s in samples if s.stolen_cores is not None],
        "gateway_peak_rss_mib": {"max": max(peaks), "runs": peaks} if peaks else None,
    }


def ratio(speeds: dict[str, Any], top: str, bottom: str) -> float | None:
    if top not in speeds or bottom not in speeds:
        return None
    return float(speeds[top]["mib_per_s"]["median"] / speeds[bottom]["mib_per_s"]["median"])


def ratios(paths: dict[str, Any]) -> dict[str, Any]:
    """The issues' ratios. The gateway's defaults compute no SHA-256 (only on request), so
    the default gateway is the one to set beside tusd with its content hashes off."""
    return {
        "gateway_over_direct_boto3": ratio(paths, "gateway", "direct_boto3"),
        "gateway_over_raw_grpc": ratio(paths, "gateway", "raw_grpc"),
        "gateway_over_tusd_defaults": ratio(paths, "gateway", "tusd_defaults"),
        "gateway_over_tusd_tuned": ratio(paths, "gateway", "tusd_tuned"),
        "gateway_sha256_over_gateway": ratio(paths, "gateway_sha256", "gateway"),
        "gateway_null_over_raw_grpc": ratio(paths, "gateway_null", "raw_grpc"),
        "gateway_over_aws_crt": ratio(paths, "gateway", "aws_crt"),
        "gateway_resumed_over_gateway": ratio(paths, "gateway_resumed", "gateway"),
        **{f"{path}_over_raw_grpc": ratio(paths, path, "raw_grpc") for path in CLIENT_PATHS},
    }


def clients_summary(data: dict[str, Any], wanted: tuple[str, ...]) -> dict[str, Any]:
    """Issue 8's line per client: MiB/s, CPU ms/MiB of the client and the gateway, and the
    ratio to raw gRPC in the same run; or why it was skipped."""
    paths, skipped = data["paths"], data.get("clients_skipped", {})
    out: dict[str, Any] = {}
    for path in CLIENT_PATHS:
        if path in paths:
            info = paths[path]
            out[path] = {
                "mib_per_s": info["mib_per_s"]["median"],
                "client_cpu_ms_per_mib": info["cpu_ms_per_mib"][path],
                "gateway_cpu_ms_per_mib": info["cpu_ms_per_mib"]["gateway_null"],
                "over_raw_grpc": data["ratios"].get(f"{path}_over_raw_grpc"),
            }
        elif path in skipped:
            out[path] = {"skipped": skipped[path]}
        elif path in wanted:
            out[path] = {"skipped": "skipped: not measured"}
    return out


def cpu_bound(
    paths: dict[str, Any], top: str, bottom: str, target: float, nproc: int
) -> dict[str, Any]:
    """What the machine's CPU allows for the throughput ratio `top` / `bottom` when both keep
    (nearly) every core busy, as client, server and store share them: the inverse ratio of
    the CPU ms per MiB all their processes spend together; and the uploader CPU of `top` that
    `target` would need with the other processes as they are. Empty when either path leaves
    cores idle (then something else, such as latency, bounds it)."""
    if top not in paths or bottom not in paths:
        return {}

    def total(path: str) -> float:
        return float(sum(paths[path]["cpu_ms_per_mib"].values()))

    def cores(path: str) -> float:
        return float(paths[path]["mib_per_s"]["median"] * total(path) / 1000)

    if min(cores(top), cores(bottom)) < 0.85 * nproc:
        return {}
    uploader = paths[top]["uploader_cpu_ms_per_mib"]
    return {
        "bound": total(bottom) / total(top),
        "cores_busy": {top: cores(top), bottom: cores(bottom)},
        "uploader_cpu_needed": total(bottom) / target - (total(top) - uploader),
        "uploader_cpu": uploader,
    }


OTHER_CORES_LIMIT = 0.25  # of a core, median over the paths' runs


def contention(data: dict[str, Any]) -> str:
    """Why the run's throughput is not to be trusted, or "" if it is: other processes (or
    other guests, through the hypervisor) took CPU while the paths ran. Measured from
    /proc/stat beside the paths' own processes; the 1-minute load average, which lags and
    counts the bench's own threads, only where that was not measured."""
    paths = data["paths"].values()
    other = [value for info in paths for value in info.get("other_cores", [])]
    stolen = [value for info in paths for value in info.get("stolen_cores", [])]
    if other:
        reasons = []
        if statistics.median(other) > OTHER_CORES_LIMIT:
            reasons.append(f"other processes kept {statistics.median(other):.2f} cores busy")
        if stolen and statistics.median(stolen) > OTHER_CORES_LIMIT:
            reasons.append(f"the hypervisor stole {statistics.median(stolen):.2f} cores")
        return " and ".join(reasons)
    load = data["config"].get("median_load_average")
    if load is not None and load > 1.5 * data["machine"]["nproc"]:
        return f"the load average was {load:.1f} on {data['machine']['nproc']} cores"
    return ""


def goals(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 11's goals, each with its target, this run's value, and whether it is met."""
    paths, found = data["paths"], data["ratios"]
    out: list[dict[str, Any]] = []
    busy = contention(data)
    nproc = int(data["machine"]["nproc"])

    def goal(
        name: str, value: float | None, target: float, higher: bool = True, ratio: bool = False
    ) -> None:
        met = None if value is None else (value >= target if higher else value <= target)
        # Under other load a throughput ratio says more about the scheduler than the paths.
        unreliable = ratio and bool(busy) and value is not None
        out.append(
            {
                "goal": name,
                "value": value,
                "target": target,
                "met": None if unreliable else met,
                "note": f"unreliable: {busy}" if unreliable else "",
            }
        )

    goal("gateway / direct boto3 >= 0.75", found["gateway_over_direct_boto3"], 0.75, ratio=True)
    out[-1]["cpu_bound"] = cpu_bound(paths, "gateway", "direct_boto3", 0.75, nproc)
    goal("gateway / tusd defaults >= 1.5", found["gateway_over_tusd_defaults"], 1.5, ratio=True)
    out[-1]["cpu_bound"] = cpu_bound(paths, "gateway", "tusd_defaults", 1.5, nproc)
    goal(
        "gateway (no SHA-256) / tusd tuned >= 0.9",
        found["gateway_over_tusd_tuned"],
        0.9,
        ratio=True,
    )
    out[-1]["cpu_bound"] = cpu_bound(paths, "gateway", "tusd_tuned", 0.9, nproc)
    goal(
        "null-store gateway / raw gRPC >= 0.8", found["gateway_null_over_raw_grpc"], 0.8, ratio=True
    )
    if all(k in paths for k in ("gateway", "raw_grpc", "direct_boto3")):
        budget = (
            paths["raw_grpc"]["uploader_cpu_ms_per_mib"]
            + paths["direct_boto3"]["uploader_cpu_ms_per_mib"]
        )
        out.append(
            {
                "goal": "gateway CPU ms/MiB <= raw gRPC sink's + direct boto3 client's",
                "value": paths["gateway"]["uploader_cpu_ms_per_mib"],
                "target": budget,
                "met": paths["gateway"]["uploader_cpu_ms_per_mib"] <= budget,
            }
        )
    # Measured after each gateway_sha256 run, so present exactly when that path ran.
    hashing_runs = data.get("sha256_ms_per_mib_runs")
    if hashing_runs and "gateway" in paths:
        hashing = statistics.median(hashing_runs)
        added = (
            paths["gateway_sha256"]["uploader_cpu_ms_per_mib"]
            - paths["gateway"]["uploader_cpu_ms_per_mib"]
        )
        goal(
            "SHA-256 adds <= hashing bytes from memory (CPU ms/MiB)",
            added,
            round(hashing, 2),
            higher=False,
        )
    memory_runs = data.get("memory", [])
    for memory in memory_runs:
        limit = memory["budget_mib"] + 64  # "the budget plus a small constant"
        goal(
            f"RSS above idle, {memory['streams']} streams x {memory['stream_mib']:g} MiB "
            "<= budget + 64 MiB",
            memory["above_idle_mib"] if not memory["stopped_by"] else None,
            limit,
            higher=False,
        )
    # "... and independent of stream length": the same streams, longer, hold no more.
    for long in memory_runs:
        for short in memory_runs:
            if long["streams"] == short["streams"] and long["stream_mib"] > short["stream_mib"]:
                both = not long["stopped_by"] and not short["stopped_by"]
                goal(
                    f"{long['streams']} streams x {long['stream_mib']:g} MiB hold <= 64 MiB "
                    f"more than x {short['stream_mib']:g} MiB",
                    long["above_idle_mib"] - short["above_idle_mib"] if both else None,
                    64.0,
                    higher=False,
                )
    live = data.get("live")
    if live:
        all_exact = live["verified"] == live["streams"]
        out.append(
            {
                "goal": f"{live['streams']} live calls all byte-exact, RSS < 1 GiB",
                "value": live["peak_rss_mib"],
                "target": 1024,
                "met": all_exact and live["peak_rss_mib"] < 1024,
            }
        )
        bulk = live.get("bulk", {})
        out.append(
            {
                "goal": "bulk upload beside live calls finishes (MiB/s)",
                "value": bulk.get("mib_per_s"),
                "target": 0,
                "met": "mib_per_s" in bulk and bool(bulk.get("verified")),
            }
        )
        small = live.get("small", {})
        goal("small upload beside live calls < 1 s", small.get("seconds"), 1.0, higher=False)
    first = data.get("first_upload")
    if first:
        goal("a new tenant's first upload adds < 100 ms", first["added_ms"], 100.0, higher=False)
    return out


def sha256_ms_per_mib(cached: bool = False) -> float:
    """What SHA-256 alone costs on this machine, in CPU ms per MiB: OpenSSL (hashlib uses the
    same libcrypto the gateway calls) over 1 MiB views, as the gateway hashes a part.

    The gateway meets each byte of a stream once, after it has left the CPU's caches, so the
    reference hashes 256 MiB once (about 1.0 ms/MiB here); `cached` hashes one 8 MiB buffer
    over and over instead, which its caches hold (about 0.65 ms/MiB here).
    """
    import hashlib
    import time

    block = os.urandom(8 * MiB)
    data = memoryview(block if cached else block * 32)  # distinct memory for every MiB
    rounds = 32 if cached else 1
    sha = hashlib.sha256()
    started = time.thread_time()
    for _ in range(rounds):
        for offset in range(0, len(data), MiB):
            sha.update(data[offset : offset + MiB])
    return (time.thread_time() - started) * 1000 / (rounds * len(data) // MiB)


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
        "cpu_model": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {
            name: version(name) for name in ("grpcio", "protobuf", "boto3", "awscrt", "moto")
        },
        "sha256_ms_per_mib": sha256_ms_per_mib(),
        "sha256_cached_ms_per_mib": sha256_ms_per_mib(cached=True),
    }


# -- the table -------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(data: dict[str, Any]) -> None:
    config, paths = data["config"], data["paths"]
    print()
    print(
        f"recgw bench: {config['size_mib']:g} MiB streams of unknown length, "
        f"{config['chunk_kib']} KiB messages, {config['part_size_mib']} MiB parts, "
        f"{config['inflight']} in flight, {config['rounds']} interleaved rounds, "
        f"store {config['store']} (data on {config['store_data']})"
    )
    machine = data["machine"]
    print(f"machine: nproc {machine['nproc']}, {machine['cpu_model']}, Python {machine['python']}")
    if "sha256_ms_per_mib" in machine:
        runs = data.get("sha256_ms_per_mib_runs") or []
        beside = (
            f" (after each gateway_sha256 run: {', '.join(f'{run:.2f}' for run in runs)})"
            if runs
            else ""
        )
        print(
            f"  SHA-256 alone: {machine['sha256_ms_per_mib']:.2f} CPU ms/MiB over bytes in memory "
            f"(as a stream's){beside}, {machine.get('sha256_cached_ms_per_mib', 0):.2f} over "
            "bytes in cache"
        )
    busy = contention(data)
    if busy:
        print(
            f"WARNING: {busy} while the paths ran: throughput and its ratios are not "
            "reliable in this run; CPU ms per MiB is less affected"
        )
    print(
        f"  {'path':<19} {'MiB/s':>7} {'min':>7} {'max':>7} {'load':>5} {'other':>5}  "
        "CPU ms per MiB"
    )
    for path, info in paths.items():
        cpu = ", ".join(f"{name} {value:.2f}" for name, value in info["cpu_ms_per_mib"].items())
        speeds = info["mib_per_s"]
        load = statistics.median(info["load_average"])
        other = info.get("other_cores")
        others = f"{statistics.median(other):5.2f}" if other else f"{'-':>5}"
        print(
            f"  {path:<19} {speeds['median']:7.1f} {speeds['min']:7.1f} {speeds['max']:7.1f} "
            f"{load:5.2f} {others}  {cpu}"
        )
    for path, info in paths.items():
        print(f"    {path}: {info['label']}")
    print(
        "    (client: the bench process, which runs every client but the client_* libraries, "
        "each in its own process; store: the S3 server; other: cores kept busy by processes "
        "not measured)"
    )
    for path, info in paths.items():
        peak = info.get("gateway_peak_rss_mib")
        if peak:
            runs = ", ".join(f"{value:.0f}" for value in peak["runs"])
            print(f"  peak RSS of {path}: {peak['max']:.0f} MiB (runs: {runs})")
    print("  ratios (medians):")
    for name, value in data["ratios"].items():
        if value is not None:  # paths not measured in this run have none
            print(f"    {name:<45} {fmt(value)}")
    print_clients(data)
    print_workers(data.get("workers"))
    for memory in data.get("memory", []):
        stop = f", stopped by {memory['stopped_by']}" if memory["stopped_by"] else ""
        print(
            f"  memory: {memory['streams']} streams x {memory['stream_mib']:g} MiB over "
            f"{memory['channels']} channels: RSS idle {memory['idle_rss_mib']:.0f} MiB, peak "
            f"{memory['peak_rss_mib']:.0f} MiB, above idle {memory['above_idle_mib']:.0f} MiB "
            f"= {memory['above_idle_over_budget']:.2f} x budget {memory['budget_mib']} MiB; "
            f"{memory['verified']}/{memory['streams']} byte-exact in {memory['seconds']:.1f} s "
            f"({memory['mib_per_s']:.0f} MiB/s){stop}"
        )
        for kind, count in memory["errors"].items():
            print(f"    {count} failed: {kind}")
    live = data.get("live")
    if live:
        window = live["live_only"]
        stop = f", stopped by {live['stopped_by']}" if live["stopped_by"] else ""
        print(
            f"  live: {live['streams']} calls x {live['seconds']:g} s, {live['message_bytes']} B "
            f"every {live['interval_ms']:.0f} ms, {live['channels']} channels: "
            f"{live['verified']}/{live['streams']} byte-exact{stop}; write lag median "
            f"{live['median_lag_s'] * 1000:.0f} ms, max {live['max_lag_s'] * 1000:.0f} ms"
        )
        for kind, count in live["errors"].items():
            print(f"    {count} calls failed: {kind}")
        print(
            f"    gateway RSS idle {live['idle_rss_mib']:.0f} MiB, peak {live['peak_rss_mib']:.0f}"
            f" MiB (budget {live['budget_mib']} MiB)"
        )
        if window:
            print(
                f"    live calls alone ({window['seconds']:.1f} s): gateway "
                f"{window['gateway_cores']:.2f} cores = "
                f"{window['gateway_cpu_ms_per_stream_second']:.2f} ms CPU per stream-second, "
                f"{window['gateway_cpu_us_per_message']:.0f} us per message "
                f"({window['messages_per_s']:.0f} messages/s of "
                f"{window['scheduled_messages_per_s']:.0f} scheduled); client "
                f"{window['client_cores']:.2f} cores, store {window['store_cores']:.2f} cores"
            )
        for name in ("bulk", "small"):
            result = live[name]
            if "error" in result:
                started = result.get("started_at_s")
                at = f", started at {started:.1f} s" if started is not None else ""
                print(f"    {name} upload beside them: {result['error']}{at}")
            else:
                print(
                    f"    {name} upload beside them: {result['size_mib']:g} MiB in "
                    f"{result['seconds']:.2f} s ({result['mib_per_s']:.1f} MiB/s), started at "
                    f"{result['started_at_s']:.1f} s, byte-exact {result['verified']}"
                )
    first = data.get("first_upload")
    if first:
        print(
            f"  first upload of {first['clients']} new tenants at once ({first['size_kib']:g} KiB):"
            f" median {first['first_ms']['median']:.0f} ms, max {first['first_ms']['max']:.0f} ms;"
            f" warm median {first['warm_ms']['median']:.0f} ms; adds {first['added_ms']:.0f} ms"
            f" (median of {first['clients'] * first.get('repeats', 1)} tenants' first minus warm;"
            f" by repeat: {', '.join(f'{v:.0f}' for v in first.get('added_ms_by_repeat', []))})"
        )
        if "process_warm_up_ms" in first:
            print(
                f"    before them, the fresh gateway's first {first['clients']} uploads at once"
                f" (a known tenant, not counted): median {first['process_warm_up_ms']:.0f} ms"
            )
    print("  goals of issue 11:")
    for item in data["goals"]:
        state = {True: "met", False: "NOT met", None: "not measured"}[item["met"]]
        if item.get("note"):
            state = item["note"]
        print(f"    {item['goal']:<62} {fmt(item['value'])} (target {item['target']:g}): {state}")
        bound = item.get("cpu_bound")
        if bound:
            busy = ", ".join(f"{path} {value:.2f}" for path, value in bound["cores_busy"].items())
            print(
                f"      this machine's CPU allows at most {bound['bound']:.2f} (cores busy: "
                f"{busy}); the target needs the gateway at <= "
                f"{bound['uploader_cpu_needed']:.2f} CPU ms/MiB (now {bound['uploader_cpu']:.2f})"
            )


def print_clients(data: dict[str, Any]) -> None:
    found = data.get("clients")
    if not found:
        return
    raw = data["paths"].get("raw_grpc", {}).get("mib_per_s", {}).get("median")
    print(
        "  clients -> gateway -> discarding store, CRC32C + SHA-256 (each its own process), "
        f"vs raw gRPC {fmt(raw, 1)} MiB/s:"
    )
    for path, line in found.items():
        if "skipped" in line:
            print(f"    {path:<14} {line['skipped']}")
            continue
        print(
            f"    {path:<14} {line['mib_per_s']:7.1f} MiB/s  CPU ms/MiB: client "
            f"{line['client_cpu_ms_per_mib']:.2f}, gateway {line['gateway_cpu_ms_per_mib']:.2f};"
            f" {fmt(line['over_raw_grpc'])} x raw gRPC"
        )


def print_workers(found: dict[str, Any] | None) -> None:
    if not found:
        return
    if "skipped" in found:
        print(f"  workers: {found['skipped']}")
        return
    one, two = found["one_worker"], found["two_workers"]
    print(
        f"  workers (reuse_port, PostgreSQL sessions, {found['store']}): "
        f"{found['streams']} concurrent uploads of {found['stream_mib']:g} MiB, "
        f"{found['streams'] // 2} on each worker with two"
    )
    for name, result in (("one worker", one), ("two workers", two)):
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in result["cpu_ms_per_mib"].items())
        print(
            f"    {name:<12} {result['mib_per_s']:7.1f} MiB/s (runs: "
            f"{', '.join(f'{v:.0f}' for v in result['runs'])}); {result['cores']:.2f} cores busy;"
            f" CPU ms/MiB: {cpu}"
        )
    print(
        f"    two workers / one = {fmt(found['ratio'])} (issue 10's goal on N free cores: >= 0.8 x "
        f"N = 1.6); this machine's CPU allows at most {fmt(found['cpu_bound_ratio'])}: "
        f"{found['nproc']} cores / {two['total_cpu_ms_per_mib']:.2f} CPU ms per MiB (client, "
        "workers, PostgreSQL together) vs one worker's rate"
    )
    if two["cores"] < 0.75 * found["nproc"]:
        print(
            f"    note: the two-worker run kept only {two['cores']:.2f} of {found['nproc']} cores "
            "busy: other load on the machine, or the one client process, limited it; the "
            "ratio then says little about the gateway"
        )
