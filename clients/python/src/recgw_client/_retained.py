"""The bytes an upload may still have to send again."""

from __future__ import annotations

import bisect


class RetainedBuffer:
    """Every byte read from the source from the gateway's committed size on.

    The source is read once (a live pipe cannot be rewound), so the bytes the
    gateway has received but not yet durably written are kept here, in the
    chunks they were read in, until a status query shows them committed. A
    resumed stream re-sends them from here.
    """

    def __init__(self) -> None:
        # (offset, data), in order; entries before _head are released.
        self._chunks: list[tuple[int, bytes]] = []
        self._head = 0
        self.start = 0
        self.end = 0
        self.high_water = 0

    @property
    def size(self) -> int:
        """Bytes held: ``end - start``."""
        return self.end - self.start

    def append(self, data: bytes) -> None:
        """Keep the next bytes read from the source."""
        if not data:
            return
        self._chunks.append((self.end, data))
        self.end += len(data)
        self.high_water = max(self.high_water, self.size)

    def release(self, offset: int) -> None:
        """Drop the bytes before ``offset``, committed by the gateway; no-op below ``start``."""
        if offset <= self.start:
            return
        if offset > self.end:
            raise ValueError(f"cannot release up to {offset}: only {self.end} bytes were read")
        chunks = self._chunks
        head = self._head
        while head < len(chunks):
            chunk_offset, data = chunks[head]
            chunk_end = chunk_offset + len(data)
            if chunk_end <= offset:
                head += 1
                continue
            if chunk_offset < offset:
                # Copy the tail so that the released head of the chunk is freed.
                chunks[head] = (offset, data[offset - chunk_offset :])
            break
        self.start = offset
        if head > 64 and head * 2 > len(chunks):
            del chunks[:head]
            head = 0
        self._head = head
        if head == len(chunks):
            chunks.clear()
            self._head = 0

    def read(self, offset: int, limit: int) -> bytes:
        """Up to ``limit`` bytes from ``offset``; ``start <= offset < end``."""
        if not self.start <= offset < self.end:
            raise ValueError(
                f"byte {offset} is not held; the retained bytes are {self.start} to {self.end}"
            )
        index = bisect.bisect_right(self._chunks, offset, lo=self._head, key=lambda c: c[0]) - 1
        chunk_offset, data = self._chunks[index]
        skip = offset - chunk_offset
        if skip == 0 and len(data) <= limit:
            return data
        return data[skip : skip + limit]
