"""When an upload resumes after a failure, how long it waits, and when it gives up.

The decision follows testdata/retry_table.json, shared by every recgw client:
rules matched in order on the gRPC status code and the ErrorInfo reason
(``*`` matches anything, a missing reason too). ``resume``: wait the backoff,
ask GetUploadStatus and continue on a new stream from the committed size;
``fail``: final. Resumed, in short: connection losses (UNAVAILABLE,
DEADLINE_EXCEEDED, INTERNAL, UNKNOWN), ANOTHER_WRITER (the gateway has not yet
noticed the previous stream died), OFFSET_MISMATCH, CHUNK_CHECKSUM_MISMATCH and
the RESOURCE_EXHAUSTED reasons that clear with time.

Retries are bounded by time without progress, not by a count:
``RetryPolicy.outage_tolerance`` seconds (default 300) after the gateway last
committed more of the upload, the last error is final. Every time the committed
size grows, the clock and the backoff start again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import grpc

from recgw_client.errors import RecgwError

__all__ = [
    "DEFAULT_OUTAGE_TOLERANCE",
    "RETRY_RULES",
    "RetryAction",
    "RetryCallback",
    "RetryPolicy",
    "is_retryable",
    "retry_action",
]

RetryAction = Literal["resume", "fail"]

RETRY_RULES: tuple[tuple[str, str, RetryAction], ...] = (
    ("UNAVAILABLE", "*", "resume"),
    ("DEADLINE_EXCEEDED", "*", "resume"),
    ("INTERNAL", "*", "resume"),
    ("UNKNOWN", "*", "resume"),
    ("ABORTED", "ANOTHER_WRITER", "resume"),
    ("OUT_OF_RANGE", "OFFSET_MISMATCH", "resume"),
    ("DATA_LOSS", "CHUNK_CHECKSUM_MISMATCH", "resume"),
    ("RESOURCE_EXHAUSTED", "TENANT_LIMIT_EXCEEDED", "resume"),
    ("RESOURCE_EXHAUSTED", "RATE_LIMITED", "resume"),
    ("RESOURCE_EXHAUSTED", "SPOOL_EXHAUSTED", "resume"),
    ("*", "*", "fail"),
)
"""(code name, reason, action), matched in order: the rules of testdata/retry_table.json."""

DEFAULT_OUTAGE_TOLERANCE = 300.0
"""Seconds without the committed size growing after which an upload gives up."""

RetryCallback = Callable[[int, RecgwError, int], None]
"""Called as ``on_retry(attempt, error, committed_size)`` before a resumed stream opens.

``attempt`` is the number of the stream about to open (2 or more), ``error``
what ended the previous one, ``committed_size`` the byte at which it resumes.
"""


def retry_action(code: grpc.StatusCode, reason: str) -> RetryAction:
    """What an upload does after a failure with this status code and ErrorInfo reason."""
    for rule_code, rule_reason, action in RETRY_RULES:
        if rule_code in ("*", code.name) and rule_reason in ("*", reason):
            return action
    return "fail"  # pragma: no cover - the last rule matches everything


def is_retryable(error: RecgwError) -> bool:
    """Whether an upload resumes after ``error``; client-side errors never do."""
    return not error.from_client and retry_action(error.code, error.reason) == "resume"


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """How patiently an upload resumes.

    ``outage_tolerance``: seconds without progress (the gateway's committed size
    not growing) after which the last error is final; ``math.inf`` never gives
    up, 0 never resumes. The n-th retry in a row without progress waits
    ``initial_backoff * multiplier**(n-1)`` seconds, at most ``max_backoff``,
    varied by up to ``jitter`` (a fraction) either way, and never past the
    outage tolerance. ``sleep`` does the waiting (also while reading is paused
    for memory) and ``clock`` tells the time (monotonic seconds); tests pass a
    virtual clock and a sleep that advances it.
    """

    outage_tolerance: float = DEFAULT_OUTAGE_TOLERANCE
    initial_backoff: float = 0.2
    multiplier: float = 2.0
    max_backoff: float = 10.0
    jitter: float = 0.2
    sleep: Callable[[float], Awaitable[None]] = field(default=_sleep, compare=False)
    rand: Callable[[], float] = field(default=random.random, compare=False)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    def __post_init__(self) -> None:
        if not self.outage_tolerance >= 0:
            raise ValueError("outage_tolerance must not be negative")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff times must not be negative")
        if self.multiplier < 1:
            raise ValueError("the backoff multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before the ``retry``-th consecutive retry (1-based)."""
        exponent = max(retry - 1, 0)
        try:
            base = min(self.max_backoff, self.initial_backoff * self.multiplier**exponent)
        except OverflowError:
            base = self.max_backoff
        spread = base * self.jitter * (2 * self.rand() - 1)
        return max(0.0, min(self.max_backoff, base + spread))
