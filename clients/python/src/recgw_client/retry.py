"""When an upload resumes after a failure, and how long it waits first.

An upload that loses its stream resumes on a new stream from the gateway's
committed size (see ``UploadClient.upload``). Whether it does depends on the
gRPC status:

* retried: UNAVAILABLE, DEADLINE_EXCEEDED and INTERNAL (connection losses,
  including grpc's "Internal error from Core"), and ABORTED when its message
  says that another stream is writing the upload (the gateway has not yet
  noticed that the previous stream died);
* final: every other status, for example INVALID_ARGUMENT, OUT_OF_RANGE,
  PERMISSION_DENIED, UNAUTHENTICATED, FAILED_PRECONDITION, ALREADY_EXISTS,
  DATA_LOSS, NOT_FOUND, and ABORTED for any other reason (AbortUpload).

Between attempts the client waits with exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from recgw_client.errors import RecgwError

__all__ = [
    "RETRYABLE_CODES",
    "RetryCallback",
    "RetryPolicy",
    "is_retryable",
]

RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
    }
)
"""Status codes after which an upload resumes."""

# The gateway refuses a second stream for an upload while it still considers an
# earlier one attached; that ABORTED clears once it notices the old stream is gone.
_CONCURRENT_WRITER = re.compile(r"another stream", re.IGNORECASE)

RetryCallback = Callable[[int, RecgwError, int], None]
"""Called as ``on_retry(attempt, error, committed_size)`` before a resumed stream opens.

``attempt`` is the number of the attempt about to start (2 or more), ``error``
what ended the previous one, ``committed_size`` the byte at which it resumes.
"""


def is_retryable(error: RecgwError) -> bool:
    """Whether an upload resumes after ``error``."""
    if error.code in RETRYABLE_CODES:
        return True
    return error.code is grpc.StatusCode.ABORTED and bool(_CONCURRENT_WRITER.search(error.message))


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently an upload resumes.

    ``max_attempts`` bounds the streams opened in a row without the gateway
    committing more of the upload: a stream that got more bytes committed
    before it broke starts the count again, so a long recording survives any
    number of separate outages while a gateway that makes no progress is given
    up after ``max_attempts`` streams. 1 disables resuming.

    The n-th consecutive retry waits ``initial_backoff * multiplier**(n-1)``
    seconds, at most ``max_backoff``, varied by up to ``jitter`` (a fraction)
    either way. ``sleep`` does the waiting (also while reading is paused for
    memory, see ``UploadClient.upload``); tests pass one that returns at once.
    """

    max_attempts: int = 8
    initial_backoff: float = 0.2
    multiplier: float = 2.0
    max_backoff: float = 10.0
    jitter: float = 0.2
    sleep: Callable[[float], Awaitable[None]] = field(default=_sleep, compare=False)
    rand: Callable[[], float] = field(default=random.random, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
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
