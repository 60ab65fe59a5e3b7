"""Keep RSS near what the memory budget counts: give freed heap back to the OS, and lower the
budget's limit by what RSS holds beyond the buffers.

Messages are freed on other threads than the ones that allocated them (gRPC's, the event
loop's, the S3 workers'), and glibc keeps freed megabytes resident in its arenas: measured,
with 500 streams of 1 MiB messages and a 512 MiB budget, up to 700 MiB freed but resident
beside 650-800 MiB in use (gRPC core's per-connection buffers on top of the budget's),
2x the budget above idle; `malloc_trim` gives the freed part back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable
from typing import Any

from recgw_server.pipeline.budget import MemoryBudget

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


# Once, at import: find_library runs `ldconfig -p` in a subprocess, which must not happen on
# the event loop (each HeapTrimmer looks up two functions, and the spiller makes one there).
_libc = _load_libc()


def _libc_function(symbol: str) -> Any:
    """`symbol` from the C library, or None where it has none (not glibc, or too old)."""
    return getattr(_libc, symbol, None) if _libc is not None else None


def _malloc_trim() -> Callable[[int], int] | None:
    trim = _libc_function("malloc_trim")
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    result: Callable[[int], int] = trim
    return result


def rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_in_use() -> Callable[[], int] | None:
    """glibc's count of the bytes malloc has handed out and not had back (mallinfo2, glibc
    2.33 and later)."""
    mallinfo2 = _libc_function("mallinfo2")
    if mallinfo2 is None:
        return None
    mallinfo2.argtypes = []
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return in_use


class HeapTrimmer:
    """Trims the C heap when it keeps much freed memory resident."""

    def __init__(self, slack: int) -> None:
        self._trim = _malloc_trim()
        self._in_use = _heap_in_use()
        self.slack = slack
        self.baseline = rss_bytes()
        self._heap_baseline = self._in_use() if self._in_use is not None else 0
        self.trims = 0

    def resident_free(self, rss: int | None = None) -> int:
        """Bytes RSS (now, or `rss`) has grown by beyond what malloc has handed out: freed
        but resident."""
        if self._in_use is None:
            return 0
        grown = (rss if rss is not None else rss_bytes()) - self.baseline
        return grown - (self._in_use() - self._heap_baseline)

    def due(self, capacity: int) -> bool:
        """Whether RSS is above a quarter of the budget (a few fast streams reach that without
        waste: they are left alone, no trims and fresh page faults) and more than `slack` of
        it is freed memory."""
        rss = rss_bytes()
        if self._trim is None or rss <= self.baseline + capacity // 4:
            return False
        return self.resident_free(rss) > self.slack

    def trim(self) -> None:
        """Blocking (walks the heap): run it in a worker thread."""
        if self._trim is not None:
            self._trim(0)
            self.trims += 1


class BudgetGovernor:
    """Makes the memory budget bound the process's RSS, not only the buffers it counts.

    Each `update` measures what RSS holds beyond the buffers in use (gRPC's buffers, freed
    heap not yet trimmed) and lowers the budget's limit by it, less `allowance`: buffers plus
    the rest then stay within the budget plus the allowance. Memory reserved for reads that
    have not started is counted by the budget but is no memory yet, so it explains nothing.
    The limit falls at once but rises by at most 1/64 of the budget per update: raised at
    once, it let hundreds of waiting streams in together, and RSS overshot by 100-200 MiB
    before the next update saw it (500 streams: 1.22-1.31 x the budget above idle, and
    0.96-1.02 x with the slow rise). The limit stays at an eighth of the budget or more: RSS
    may grow for reasons buffering cannot undo (S3 clients of many tenants, other code in the
    process), and buffering must not stop for them.
    """

    def __init__(self, budget: MemoryBudget, allowance: int) -> None:
        self._budget = budget
        self.allowance = allowance
        self.baseline = rss_bytes()

    def update(self) -> int:
        """Set the budget's limit from RSS now; returns the limit."""
        above = rss_bytes() - self.baseline
        held = self._budget.in_use - self._budget.reserved_unread()
        excess = max(0, above - held - self.allowance)
        capacity = self._budget.capacity
        target = max(capacity // 8, capacity - excess)
        current = self._budget.limit
        if target > current:
            target = min(target, current + capacity // 64)
        self._budget.set_limit(target)
        return self._budget.limit
