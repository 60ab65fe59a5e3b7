"""One process-wide memory budget for upload buffers, with a cap per tenant."""

from __future__ import annotations

import asyncio
import collections

from recgw_server.domain import ErrorKind, Reason, RecgwError


class MemoryBudget:
    """An asyncio byte semaphore, first come first served, reserved per message.

    Memory is reserved for exactly the bytes a stream holds. A stream that cannot get memory
    waits; because it then stops reading its gRPC stream, HTTP/2 flow control pushes back on the
    client instead of the gateway growing. Waiting always ends: memory held by parts in flight
    comes back when S3 answers, and memory held by parts still filling comes back when they
    complete or are spilled to disk (see buffers.py), which happens within seconds.

    `tenant_share` (a fraction of the capacity) caps what one tenant holds in memory; a tenant
    over its share spills its parts to disk instead of taking memory from the others.
    """

    def __init__(self, capacity: int, tenant_share: float = 1.0) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        if not 0 < tenant_share <= 1:
            raise ValueError("tenant_share must be in (0, 1]")
        self.capacity = capacity
        self.tenant_capacity = int(capacity * tenant_share)
        self.in_use = 0
        self.high_water = 0
        self._by_tenant: collections.Counter[str] = collections.Counter()
        self._waiters: collections.deque[tuple[int, str, asyncio.Future[None]]] = (
            collections.deque()
        )

    @property
    def waiting(self) -> int:
        """How many acquisitions are currently waiting for memory."""
        return len(self._waiters)

    def held_by(self, tenant_id: str) -> int:
        return self._by_tenant[tenant_id]

    def within_share(self, tenant_id: str, size: int) -> bool:
        """Whether the tenant may hold `size` more bytes in memory."""
        return self._by_tenant[tenant_id] + size <= self.tenant_capacity

    async def acquire(self, size: int, tenant_id: str = "") -> None:
        if size > self.capacity:
            raise RecgwError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"a buffer of {size} bytes exceeds the gateway's whole memory budget "
                f"({self.capacity} bytes); use smaller messages or parts, or raise the budget",
                reason=Reason.MEMORY_EXHAUSTED,
                details={"limit": "uploads.memory_budget_mib"},
            )
        if not self._waiters and self.in_use + size <= self.capacity:
            self._take(size, tenant_id)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, tenant_id, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(size, tenant_id)  # granted just as we were cancelled: give it back
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, size: int, tenant_id: str = "") -> None:
        self.in_use -= size
        self._by_tenant[tenant_id] -= size
        if not self._by_tenant[tenant_id]:
            del self._by_tenant[tenant_id]
        assert self.in_use >= 0, "released more memory than was acquired"
        self._wake()

    def _take(self, size: int, tenant_id: str) -> None:
        self.in_use += size
        self._by_tenant[tenant_id] += size
        self.high_water = max(self.high_water, self.in_use)

    def _wake(self) -> None:
        # Strict FIFO: a large request at the head is not starved by smaller ones behind it.
        while self._waiters and self.in_use + self._waiters[0][0] <= self.capacity:
            size, tenant_id, future = self._waiters.popleft()
            if not future.done():
                self._take(size, tenant_id)
                future.set_result(None)
