"""The four client libraries as upload paths: each client's own bench command (Go
`cmd/recgw-bench`, TypeScript `test/bench.ts`, Java `bench.sh` / `Bench.java`, Python
`bench.client_python`) runs as a process of its own against the discarding-store gateway.

Each is built once before the rounds (not timed). A run is timed by the client itself (from
the start of its upload to the result), which also reports its own process's CPU time
meanwhile, so a JVM's or Node's start-up is not counted; the gateway's CPU is read from /proc
when the client prints that its upload begins and when it prints the result. Checksums are the
clients' defaults: CRC32C per message and CRC32C + SHA-256 of the whole object, and each
client asks the gateway to compute its SHA-256 (start.compute_sha256) to compare.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import TENANT, MiB, Sample, cpu_seconds

REPO = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 900.0  # a cold Go or Maven build on 2 cores takes a few minutes
RUN_TIMEOUT = 900.0
# Each client's process first uploads this much untimed, as a long-running media server would
# have done: the JVM's JIT and V8 have compiled the hot path by the timed upload (32 MiB left
# the JVM's C2 compiling netty during the timed upload, about 40 % of the Java client's CPU).
WARMUP = "--warmup-mib=256"
RESULT = re.compile(r"(\d+(?:\.\d+)?) MiB in (\d+(?:\.\d+)?) s .*CPU (\d+(?:\.\d+)?) s")


@dataclass
class Client:
    """One client's bench command, once built; `skipped` says why it cannot run."""

    name: str
    cwd: Path
    argv: Callable[[int], list[str]] = field(default=lambda mib: [])
    skipped: str = ""


def _missing(*tools: str) -> str:
    absent = [tool for tool in tools if shutil.which(tool) is None]
    return f"skipped: {', '.join(absent)} not found" if absent else ""


def _run_build(name: str, steps: list[list[str]], cwd: Path, log_dir: Path) -> str:
    """Run the build steps; '' when they all succeed, else why (the log has the rest)."""
    log_path = log_dir / f"{name}-build.log"
    with log_path.open("ab") as log:
        for step in steps:
            try:
                done = subprocess.run(
                    step,
                    cwd=cwd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=BUILD_TIMEOUT,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                return f"skipped: `{' '.join(step)}` took longer than {BUILD_TIMEOUT:g} s"
            if done.returncode != 0:
                return f"skipped: `{' '.join(step)}` failed (exit {done.returncode}; {log_path})"
    return ""


def build(name: str, workdir: Path) -> Client:
    """Build one client's bench command (not timed)."""
    if name == "client_go":
        cwd = REPO / "clients" / "go"
        binary = workdir / "recgw-bench-go"
        skipped = _missing("go") or _run_build(
            name, [["go", "build", "-o", str(binary), "./cmd/recgw-bench"]], cwd, workdir
        )
        return Client(name, cwd, lambda mib: [str(binary), "-mib", str(mib), WARMUP], skipped)
    if name == "client_ts":
        cwd = REPO / "clients" / "ts"
        steps = (
            [] if (cwd / "node_modules").is_dir() else [["npm", "ci", "--no-audit", "--no-fund"]]
        )
        steps += [
            ["npm", "run", "build"],
            ["npx", "--no-install", "tsc", "-p", "test/tsconfig.json"],
        ]
        skipped = _missing("node", "npm", "npx") or _run_build(name, steps, cwd, workdir)
        return Client(
            name,
            cwd,
            lambda mib: ["node", "dist-test/bench.js", "--mib", str(mib), WARMUP],
            skipped,
        )
    if name == "client_java":
        cwd = REPO / "clients" / "java"
        skipped = _missing("java", "mvn", "bash") or _run_build(
            name, [["bash", "bench.sh", "--build-only"]], cwd, workdir
        )
        argv = ["bash", "bench.sh", "--no-build"]
        return Client(name, cwd, lambda mib: [*argv, str(mib), WARMUP], skipped)
    if name == "client_python":
        try:
            import recgw_client  # noqa: F401
        except ImportError as error:
            return Client(name, REPO, skipped=f"skipped: recgw_client not importable ({error})")
        return Client(
            name, REPO, lambda mib: [sys.executable, "-m", "bench.client_python", str(mib)]
        )
    raise ValueError(f"unknown client {name}")


def run(
    client: Client, address: str, token: str, size: int, gateway_pid: int, log_dir: Path
) -> Sample:
    """One upload of about `size` bytes (whole MiB) by the client's bench command; the
    sample's seconds and the client's CPU are its own report, the gateway's CPU is read around
    the upload."""
    mib = max(1, round(size / MiB))
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("RECGW_")}
    env = {
        **inherited,
        "RECGW_E2E_ADDRESS": address,
        "RECGW_E2E_DIRECT_ADDRESS": address,
        "RECGW_E2E_UPLOADER_TOKEN": token,  # by environment: never on a command line
        "RECGW_E2E_TENANT": TENANT,
    }
    log_path = log_dir / f"{client.name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            client.argv(mib),
            cwd=client.cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            assert process.stdout is not None
            gateway_before = gateway_after = -1.0
            found: re.Match[str] | None = None
            for raw in process.stdout:
                line = raw.decode(errors="replace")
                log.write(raw)
                if gateway_before < 0 and "uploading" in line:
                    gateway_before = cpu_seconds(gateway_pid)
                elif found is None and (found := RESULT.search(line)):
                    gateway_after = cpu_seconds(gateway_pid)
            code = process.wait(RUN_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    if code != 0 or found is None or gateway_before < 0:
        raise RuntimeError(f"{client.name} failed (exit {code}); see {log_path}")
    # As if the client had sent `size` bytes at its rate (the same when size is whole MiB).
    scale = size / (float(found.group(1)) * MiB)
    return Sample(
        float(found.group(2)) * scale,
        {
            client.name: float(found.group(3)) * scale,
            "gateway_null": (gateway_after - gateway_before) * scale,
        },
        os.getloadavg()[0],
    )
