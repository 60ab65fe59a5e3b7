"""One process-wide memory budget for upload buffers."""

from __future__ import annotations

import asyncio
import collections

from recgw_server.domain import ErrorKind, RecgwError


class MemoryBudget:
    """An asyncio byte semaphore, first come first served.

    A stream that cannot get memory simply waits; because it then stops reading its
    gRPC stream, HTTP/2 flow control pushes back on the client instead of the gateway growing.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.in_use = 0
        self.high_water = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        """How many acquisitions are currently waiting for memory."""
        return len(self._waiters)

    async def acquire(self, size: int) -> None:
        if size > self.capacity:
            raise RecgwError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"a part of {size} bytes exceeds the gateway's whole memory budget "
                f"({self.capacity} bytes); use a smaller part size or raise the budget",
            )
        if not self._waiters and self.in_use + size <= self.capacity:
            self._take(size)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(size)  # granted just as we were cancelled: give it back
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, size: int) -> None:
        self.in_use -= size
        assert self.in_use >= 0, "released more memory than was acquired"
        self._wake()

    def _take(self, size: int) -> None:
        self.in_use += size
        self.high_water = max(self.high_water, self.in_use)

    def _wake(self) -> None:
        # Strict FIFO: a large request at the head is not starved by smaller ones behind it.
        while self._waiters and self.in_use + self._waiters[0][0] <= self.capacity:
            size, future = self._waiters.popleft()
            if not future.done():
                self._take(size)
                future.set_result(None)
