"""One process-wide memory budget for upload buffers, with a cap per tenant."""

from __future__ import annotations

import asyncio
import collections
import time

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

    `limit` is what may be held now: the capacity, less what the process's RSS holds beyond the
    buffers (see heap.BudgetGovernor). Whatever the limit, an acquisition is granted when
    nothing is held, so every wait still ends.
    """

    def __init__(self, capacity: int, tenant_share: float = 1.0) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        if not 0 < tenant_share <= 1:
            raise ValueError("tenant_share must be in (0, 1]")
        self.capacity = capacity
        self.limit = capacity
        self.tenant_capacity = int(capacity * tenant_share)
        self.in_use = 0
        self.high_water = 0
        self._by_tenant: collections.Counter[str] = collections.Counter()
        self._waiters: collections.deque[tuple[int, str, asyncio.Future[None]]] = (
            collections.deque()
        )
        self._reservations: set[Reservation] = set()

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
        if self.try_acquire(size, tenant_id):
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

    def try_acquire(self, size: int, tenant_id: str = "") -> bool:
        """Take `size` bytes if that needs no wait."""
        if not self._waiters and self._fits(size):
            self._take(size, tenant_id)
            return True
        return False

    def release(self, size: int, tenant_id: str = "") -> None:
        self.in_use -= size
        self._by_tenant[tenant_id] -= size
        if not self._by_tenant[tenant_id]:
            del self._by_tenant[tenant_id]
        assert self.in_use >= 0, "released more memory than was acquired"
        self._wake()

    def reclaim_idle(self, now: float, after: float) -> int:
        """Give back what streams reserved for a read that has been pending for more than
        `after` seconds (a silent client): a reservation never holds memory indefinitely, so
        every wait for memory still ends. Returns the bytes given back."""
        reclaimed = 0
        for reservation in list(self._reservations):
            since = reservation.reading_since
            if since is not None and now - since > after and reservation.size:
                reclaimed += reservation.size
                reservation.ensure_nowait(0)
        return reclaimed

    def reserved_unread(self) -> int:
        """Bytes reserved for reads that are not pending yet: counted, but not yet memory."""
        return sum(r.size for r in self._reservations if r.reading_since is None)

    def set_limit(self, limit: int) -> None:
        """Let at most `limit` bytes (at most the capacity) be held from now on; what is held
        beyond it is not taken back, it only makes new acquisitions wait."""
        self.limit = max(0, min(limit, self.capacity))
        self._wake()

    def _fits(self, size: int) -> bool:
        return self.in_use + size <= self.limit or self.in_use == 0

    def _take(self, size: int, tenant_id: str) -> None:
        self.in_use += size
        self._by_tenant[tenant_id] += size
        self.high_water = max(self.high_water, self.in_use)

    def _wake(self) -> None:
        # Strict FIFO: a large request at the head is not starved by smaller ones behind it.
        while self._waiters and self._fits(self._waiters[0][0]):
            size, tenant_id, future = self._waiters.popleft()
            if not future.done():
                self._take(size, tenant_id)
                future.set_result(None)


class Reservation:
    """Memory a stream reserves for its next message BEFORE it asks gRPC for it.

    While a read is pending, gRPC opens the stream's flow-control window to the incoming
    message's size and assembles the whole message; a stream that first reads and only then
    waits for memory holds a message the budget never counted. Reserving first keeps a stream
    that waits for memory without a pending read (gRPC keeps its window at the initial 64 KiB)
    and without a message in hand. The pipeline turns the reservation into the message's own
    memory with `take`; what the estimate got wrong is settled by the next `ensure`.
    """

    __slots__ = ("_budget", "_tenant_id", "reading_since", "size")

    def __init__(self, budget: MemoryBudget, tenant_id: str) -> None:
        self._budget = budget
        self._tenant_id = tenant_id
        self.size = 0
        self.reading_since: float | None = None
        budget._reservations.add(self)

    def try_ensure(self, size: int) -> bool:
        """Hold exactly `size` bytes if that needs no wait; False (holding what it held) if it
        would."""
        if size <= self.size:
            self.ensure_nowait(size)
            return True
        if self._budget.try_acquire(size - self.size, self._tenant_id):
            self.size = size
            return True
        return False

    async def ensure(self, size: int) -> None:
        """Hold exactly `size` bytes (waits for memory if that is more than held).

        A stream that has to wait gives back what it holds first: nothing is held while
        waiting, so reservations cannot block each other."""
        if self.try_ensure(size):
            return
        self.ensure_nowait(0)
        await self._budget.acquire(size, self._tenant_id)
        self.size = size

    def assign(self, tenant_id: str) -> None:
        """Count what is held for `tenant_id` from now on (the first message is reserved for
        before the stream has said whose it is)."""
        if tenant_id != self._tenant_id:
            counts = self._budget._by_tenant
            counts[self._tenant_id] -= self.size
            counts[tenant_id] += self.size
            self._tenant_id = tenant_id

    def ensure_nowait(self, size: int) -> None:
        """Hold at most `size` bytes: give back the rest."""
        if size < self.size:
            self._budget.release(self.size - size, self._tenant_id)
            self.size = size

    def reading(self) -> None:
        """A read is now pending (a silent client's reservation is reclaimed after a while)."""
        self.reading_since = time.monotonic()

    def read_done(self) -> None:
        self.reading_since = None

    def take(self, size: int) -> bool:
        """Turn `size` reserved bytes into memory held by the caller (who releases it to the
        budget as if acquired); False, taking nothing, if fewer are reserved."""
        if size > self.size:
            return False
        self.size -= size
        return True

    def close(self) -> None:
        """Give back whatever is still reserved. Safe to call twice."""
        self.ensure_nowait(0)
        self.reading_since = None
        self._budget._reservations.discard(self)
