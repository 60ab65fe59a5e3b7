"""Give freed heap memory back to the OS when the process holds much more than it uses.

Messages are freed on other threads than the ones that allocated them (gRPC's, the event
loop's, the S3 workers'), so glibc keeps freed megabytes in its per-thread arenas: measured,
RSS grew by about a message per stream that had passed (150 MiB after 128 streams with an
8 MiB budget) although `malloc_trim` brought it back to +10 MiB. Trimming only when RSS is well
above what the budget holds leaves a fast single stream alone (no trims, no fresh page faults).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None  # not glibc
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    result: Callable[[int], int] = trim
    return result


def rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


class HeapTrimmer:
    """Trims the C heap when RSS exceeds the baseline by more than the budget explains."""

    def __init__(self, slack: int) -> None:
        self._trim = _malloc_trim()
        self.slack = slack
        self.baseline = rss_bytes() if self._trim is not None else 0
        self.trims = 0

    def due(self, in_use: int, capacity: int) -> bool:
        """Whether RSS is more than `slack` above what the budget holds (and above a quarter of
        the budget, which a few fast streams reach without waste)."""
        if self._trim is None:
            return False
        return rss_bytes() > self.baseline + max(in_use + self.slack, capacity // 4)

    def trim(self) -> None:
        """Blocking (walks the heap): run it in a worker thread."""
        if self._trim is not None:
            self._trim(0)
            self.trims += 1
