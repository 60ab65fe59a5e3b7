"""Part buffers: the bytes of a part between the stream and S3, in memory or spooled to disk.

A part fills in memory while its stream is fast. Memory is reserved per message, for exactly the
bytes held, so a slow live call holds only what it has sent since its part started. A part that
has been filling for longer than `spill_after` seconds (a slow stream), or whose tenant is over
its share of the memory budget, moves to a spool file on local disk, as tusd's s3store spools
parts; it is then uploaded from the file. Spool files are customer data: private (0600 in a 0700
directory), optionally encrypted with a per-process key, deleted as soon as the part is in S3, and
the spool directory is emptied at start-up, so nothing is left behind after a crash.

Nothing here blocks the event loop: file writes and reads run in worker threads, and small
writes to a spilled part are gathered in memory first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from awscrt.checksums import combine_crc32c

from recgw_server.domain import ErrorKind, Reason, RecgwError
from recgw_server.pipeline.budget import MemoryBudget, Reservation

# A spilled part gathers writes up to this size in memory before each file write.
SPILL_FLUSH_BYTES = 256 * 1024
# Bytes handed to the HTTP layer per read when a part is sent from its spool file.
FILE_READ_BYTES = 1024 * 1024
# Per pwritev call: at most this many buffers (Linux's IOV_MAX is 1024) and, past the first,
# bytes (which bounds the copy an encrypted batch makes).
_BATCH_BUFFERS = 1024
_BATCH_BYTES = 1024 * 1024


class SpoolCipher:
    """AES-256-CTR with a key that lives only in this process's memory.

    Each spool file gets its own nonce; the position in the file selects the counter, so a part
    can be encrypted in pieces and read back from any offset.
    """

    def __init__(self) -> None:
        self._key = os.urandom(32)

    def transform(self, nonce: bytes, offset: int, data: bytes | memoryview) -> bytes:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        block, skip = divmod(offset, 16)
        counter = (int.from_bytes(nonce, "big") + block) % (1 << 128)
        cipher = Cipher(algorithms.AES(self._key), modes.CTR(counter.to_bytes(16, "big")))
        transform = cipher.encryptor()
        if skip:
            transform.update(bytes(skip))
        return transform.update(data) + transform.finalize()  # a view is read in place


class DiskBudget:
    """Bytes of spool files; a spill that does not fit is refused at once (never waits)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0

    def take(self, size: int) -> None:
        if self.in_use + size > self.capacity:
            raise RecgwError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"the gateway's spool disk is full ({self.capacity} bytes in use for slow "
                "streams); retry later",
                reason=Reason.SPOOL_EXHAUSTED,
                details={"limit": "spool.disk_budget"},
            )
        self.in_use += size

    def release(self, size: int) -> None:
        self.in_use -= size
        assert self.in_use >= 0, "released more spool space than was taken"


class Spool:
    """The spool directory, its disk budget and (optionally) its cipher."""

    def __init__(self, directory: Path, disk_budget: int, encrypt: bool = False) -> None:
        self.directory = directory
        self.budget = DiskBudget(disk_budget)
        self.cipher = SpoolCipher() if encrypt else None
        self.spilled_parts = 0
        # Whatever a previous process left behind belongs to streams that are gone.
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)

    def create(self) -> tuple[Path, BinaryIO]:
        path = self.directory / f"{uuid.uuid4().hex}.part"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        return path, os.fdopen(fd, "r+b", buffering=0)


class PartBody:
    """A part's bytes as the HTTP layer reads them: whole chunks, no copies, rewindable.

    `read()` ignores the size it is asked for and hands out the next whole chunk (a message as
    it arrived, or a slice of the spool file), so each chunk goes to the socket in one sendall.
    """

    def __init__(
        self, chunks: list[bytes | memoryview] | None, file: SpoolFile | None, size: int
    ) -> None:
        self._chunks = chunks
        self._file = file
        self._size = size
        self._index = 0
        self._position = 0

    def __len__(self) -> int:
        return self._size

    def read(self, size: int = -1) -> bytes | memoryview:
        if self._position >= self._size:
            return b""
        if self._chunks is not None:
            chunk = self._chunks[self._index]
            self._index += 1
        else:
            assert self._file is not None
            chunk = self._file.read_at(self._position, FILE_READ_BYTES)
        self._position += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        target = {0: offset, 1: self._position + offset, 2: self._size + offset}[whence]
        if target not in (0, self._size):
            raise OSError("a part body can only be rewound or moved to its end")
        self._position = target
        self._index = 0 if target == 0 else len(self._chunks or ())
        return target

    def tell(self) -> int:
        return self._position

    def chunks(self) -> Iterator[bytes | memoryview]:
        """Every chunk once, from the start (for hashing in a worker thread)."""
        if self._chunks is not None:
            yield from self._chunks
            return
        assert self._file is not None
        position = 0
        while position < self._size:
            chunk = self._file.read_at(position, FILE_READ_BYTES)
            position += len(chunk)
            yield chunk


class SpoolFile:
    """One spilled part on disk."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self.path, self._handle = spool.create()
        self._nonce = os.urandom(16)
        self.size = 0

    def append(self, data: bytes | memoryview) -> None:
        """Runs in a worker thread."""
        self.append_all([data])

    def append_all(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Write `chunks` at the end of the file, a batch of them per system call (and per
        cipher set-up, which costs more than encrypting a small message). Runs in a worker
        thread."""
        for batch in _batches(chunks):
            if self._spool.cipher is not None:
                batch = [self._spool.cipher.transform(self._nonce, self.size, b"".join(batch))]
            self._write_at_end(batch)

    def _write_at_end(self, batch: list[bytes | memoryview]) -> None:
        fd = self._handle.fileno()
        expected = sum(len(chunk) for chunk in batch)
        written = os.pwritev(fd, batch, self.size)
        if written < expected:  # a short write (rare for regular files): write the rest
            rest = memoryview(b"".join(batch))[written:]
            while rest:
                count = os.pwrite(fd, rest, self.size + written)
                written += count
                rest = rest[count:]
        self.size += written

    def read_at(self, offset: int, size: int) -> bytes:
        """Runs in a worker thread (the HTTP layer's or the hasher's)."""
        data = os.pread(self._handle.fileno(), min(size, self.size - offset), offset)
        if self._spool.cipher is not None:
            data = self._spool.cipher.transform(self._nonce, offset, data)
        return data

    def delete(self) -> None:
        self._handle.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class PartBuffer:
    """The part being filled (and then sent) of one upload."""

    def __init__(
        self,
        number: int,
        capacity: int,
        budget: MemoryBudget,
        spool: Spool,
        tenant_id: str,
        spill_after: float,
    ) -> None:
        self.number = number
        self.capacity = capacity
        self.size = 0
        self.crc32c = 0
        self.started = time.monotonic()
        self.spill_after = spill_after
        self._budget = budget
        self._spool = spool
        self._tenant_id = tenant_id
        self._chunks: list[bytes | memoryview] = []
        self._memory = 0  # budget held by _chunks
        self._file: SpoolFile | None = None
        self._disk = 0  # spool budget held by _file
        self._lock = asyncio.Lock()
        self._released = False

    @property
    def room(self) -> int:
        return self.capacity - self.size

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def slow(self, now: float | None = None) -> bool:
        """Filling for longer than `spill_after`: its bytes belong on disk."""
        return ((now or time.monotonic()) - self.started) > self.spill_after

    async def append(
        self, data: bytes | memoryview, crc32c: int, prepaid: Reservation | None = None
    ) -> None:
        """Add `data` (with its CRC32C); the caller keeps `len(data) <= room`. Its memory comes
        from `prepaid` if that holds enough, else from the budget."""
        size = len(data)
        if self._file is None and (
            self.slow() or not self._budget.within_share(self._tenant_id, size)
        ):
            await self.spill()
        if prepaid is None or not prepaid.take(size):
            await self._budget.acquire(size, self._tenant_id)
        if self._lock.locked():  # a spill, flush or seal is under way: add after it
            async with self._lock:
                self._add(data, crc32c, size)
                if self._file is not None and self._memory >= SPILL_FLUSH_BYTES:
                    await self._flush()
            return
        # Most messages: nothing awaits between the check above and the change, so nothing
        # else can be half-way through the part meanwhile; the lock is taken only to flush.
        self._add(data, crc32c, size)
        if self._file is not None and self._memory >= SPILL_FLUSH_BYTES:
            async with self._lock:
                if self._file is not None and self._memory >= SPILL_FLUSH_BYTES:
                    await self._flush()

    def _add(self, data: bytes | memoryview, crc32c: int, size: int) -> None:
        if self._released:  # the upload ended (AbortUpload) while this waited for memory
            self._budget.release(size, self._tenant_id)
            raise RecgwError(
                ErrorKind.ABORTED, "the upload has ended", reason=Reason.UPLOAD_ABORTED
            )
        self._chunks.append(data)
        self._memory += size
        self.size += size
        self.crc32c = combine_crc32c(self.crc32c, crc32c, size)

    async def spill(self) -> None:
        """Move the bytes held in memory to a spool file; later bytes go there too."""
        async with self._lock:
            if self._file is None and not self._released:
                file = await asyncio.to_thread(SpoolFile, self._spool)  # open() may block
                if self._released:  # the upload ended meanwhile
                    file.delete()
                    return
                self._file = file
                self._spool.spilled_parts += 1
                await self._flush()

    async def _flush(self) -> None:
        assert self._file is not None
        chunks, held = self._chunks, self._memory
        if not chunks:
            return
        self._spool.budget.take(held)
        self._disk += held
        self._chunks = []
        try:
            await asyncio.to_thread(self._file.append_all, chunks)
        finally:
            self._memory -= held
            self._budget.release(held, self._tenant_id)

    async def seal(self) -> PartBody:
        """The part is full or last: flush it and hand out its body."""
        async with self._lock:
            if self._file is None:
                return PartBody(list(self._chunks), None, self.size)
            await self._flush()
            return PartBody(None, self._file, self.size)

    def release(self) -> None:
        """Give back its memory and disk; delete its spool file. Safe to call twice."""
        if self._released:
            return
        self._released = True
        if self._memory:
            self._budget.release(self._memory, self._tenant_id)
            self._memory = 0
        self._chunks = []
        if self._file is not None:
            self._file.delete()
            self._spool.budget.release(self._disk)
            self._disk = 0


def _batches(chunks: Sequence[bytes | memoryview]) -> Iterator[list[bytes | memoryview]]:
    """`chunks` in order, in lists of at most _BATCH_BUFFERS buffers and (unless one chunk is
    larger) _BATCH_BYTES bytes."""
    batch: list[bytes | memoryview] = []
    size = 0
    for chunk in chunks:
        if batch and (len(batch) == _BATCH_BUFFERS or size + len(chunk) > _BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(chunk)
        size += len(chunk)
    if batch:
        yield batch
