"""What every part of the bench shares: the bytes, child processes, CPU and memory meters."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from awscrt import checksums
from recgw.v1 import upload_pb2

MiB = 1024 * 1024
KiB = 1024
HEADER_SIZE = 16  # every chunk starts with its index and offset, so no two chunks are equal
# Room for the other fields of an UploadRequest beside its data (as the gateway allows).
MESSAGE_OVERHEAD = 64 * KiB
RPC_TIMEOUT = 900.0
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

    def crc32c(self) -> int:
        value = 0
        for chunk in self.chunks():
            value = checksums.crc32c(chunk, value)
        return int(value)


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
            # The gateway computes SHA-256 only when asked; a verified SHA-256 needs it.
            message.start.compute_sha256 = bool(sha256) or start.compute_sha256
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


def spawn(
    name: str, args: list[str], env: dict[str, str], log_dir: Path, cwd: Path | None = None
) -> Child:
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
            cwd=cwd,
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


def reset_peak_rss(pid: int) -> bool:
    """Set VmHWM back to the current RSS (`5` to clear_refs), so a peak belongs to one
    measurement; False where the kernel does not allow it (then VmHWM is the process's)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine has been busy (all processes, the kernel's interrupt work
    included) and stolen by the hypervisor for other guests, from the first line of /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(field) for field in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


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


# -- meters ----------------------------------------------------------------------------------

CLIENT = "client"  # the bench process itself: every client of every path runs in it


@dataclass(frozen=True)
class Sample:
    """One timed transfer: wall seconds, the CPU seconds each process spent meanwhile, the
    1-minute load average at its end, the gateway's peak RSS during it (0: no gateway), and
    how many cores other processes kept busy and the hypervisor stole meanwhile (None: not
    measured)."""

    seconds: float
    cpu: dict[str, float]
    load_average: float = 0.0
    peak_rss_kib: int = 0
    other_cores: float | None = None
    stolen_cores: float | None = None


class Meter:
    """Wall clock and CPU time of the bench process and of the named child processes."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = dict(pids)
        self._started = 0.0
        self._machine = (0.0, 0.0)
        self._cpu: dict[str, float] = {}
        self._rss_pid = 0

    def _snapshot(self) -> dict[str, float]:
        times = os.times()
        values = {CLIENT: times.user + times.system}
        for name, pid in self._pids.items():
            values[name] = cpu_seconds(pid)
        return values

    def start(self, rss_pid: int = 0) -> None:
        """Start timing; with `rss_pid` the sample also carries that process's peak RSS."""
        self._rss_pid = rss_pid
        if rss_pid:
            reset_peak_rss(rss_pid)
        self._cpu = self._snapshot()
        self._machine = machine_cpu_seconds()
        self._started = time.perf_counter()

    def stop(self) -> Sample:
        seconds = time.perf_counter() - self._started
        now = self._snapshot()
        busy, stolen = machine_cpu_seconds()
        peak = memory_kib(self._rss_pid)["VmHWM"] if self._rss_pid else 0
        cpu = {name: now[name] - self._cpu[name] for name in now}
        # What the machine did besides the measured processes (ticks are 10 ms: not below 0).
        other = max(0.0, busy - self._machine[0] - sum(cpu.values()))
        return Sample(
            seconds,
            cpu,
            os.getloadavg()[0],
            peak,
            other / seconds,
            (stolen - self._machine[1]) / seconds,
        )
