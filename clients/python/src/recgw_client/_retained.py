"""The bytes an upload may still have to send again, in memory and, beyond a limit, on disk."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from recgw_client.errors import RETAIN_LIMIT_EXCEEDED, RecgwError

_T = TypeVar("_T")


@dataclass
class _Segment:
    offset: int  # in the object
    length: int
    data: bytes | None  # None: on disk
    file_offset: int = 0


class RetainedBuffer:
    """Every byte read from the source from the gateway's committed size on.

    The source is read once (a live pipe cannot be rewound), so the bytes the
    gateway has not yet durably written are kept here, in the chunks they were
    read in, until a status query shows them committed; a resumed stream
    re-sends them from here. Up to ``memory_limit`` bytes are held in memory;
    beyond it, up to ``spill_limit`` bytes go to a spill file: created 0600 in
    a private (0700) temporary directory under ``spill_dir`` and unlinked at
    once (on POSIX), so nothing of it is left behind, whatever ends the
    process. The file is emptied whenever nothing on it is needed any more.
    """

    def __init__(
        self,
        start: int = 0,
        *,
        memory_limit: int = 1 << 62,
        spill_limit: int = 0,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._segments: list[_Segment] = []
        self._head = 0  # segments before it are released
        self.start = start
        self.end = start
        self.memory_limit = memory_limit
        self.spill_limit = spill_limit
        self._spill_dir = spill_dir
        self.memory_size = 0
        self.high_water = 0
        self.disk_high_water = 0
        self._fd: int | None = None
        self._directory: str | None = None
        self.spill_path: str | None = None  # while it has a name (non-POSIX systems)
        self._file_end = 0  # bytes of the spill file in use, including released ones
        self._disk_held = 0
        # Reads and writes of the spill file under way in threads: they outlive a cancelled
        # caller, and the file is closed only after them.
        self._io: set[asyncio.Future[Any]] = set()
        self._closed = False

    def begin_at(self, offset: int) -> None:
        """Start (empty) at ``offset``: the first byte the source will give."""
        if self.end != self.start:
            raise ValueError("the buffer already holds bytes")
        self.start = self.end = offset

    @property
    def size(self) -> int:
        """Bytes held: ``end - start``."""
        return self.end - self.start

    @property
    def disk_size(self) -> int:
        """Bytes of the spill file in use (counts against ``spill_limit``)."""
        return self._file_end

    @property
    def spill_fd(self) -> int | None:
        """The spill file's descriptor, while there is one (for tests and diagnostics)."""
        return self._fd

    async def append(self, data: bytes) -> None:
        """Keep the next bytes read from the source, in memory if they fit, else on disk.

        Raises RecgwError RESOURCE_EXHAUSTED (RETAIN_LIMIT_EXCEEDED) when neither has room.
        """
        if not data or self._closed:
            return
        if self.memory_size + len(data) <= self.memory_limit:
            self._segments.append(_Segment(self.end, len(data), data))
            self.memory_size += len(data)
        else:
            await self._spill(data)
        self.end += len(data)
        self.high_water = max(self.high_water, self.size)

    async def _spill(self, data: bytes) -> None:
        if self._file_end + len(data) > self.spill_limit:
            raise RecgwError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the source produced more than the client may hold while the gateway could "
                f"not take it: {self.memory_size} bytes in memory (retain_limit "
                f"{self.memory_limit}) and {self._file_end} on disk (spill_limit "
                f"{self.spill_limit}); raise the limits, or give the source a way to wait",
                reason=RETAIN_LIMIT_EXCEEDED,
            )
        try:
            fd = self._fd if self._fd is not None else self._open()
        except OSError as err:
            raise self._disk_error(err) from None
        file_offset = self._file_end
        self._file_end += len(data)
        # Held from now on: emptying the file while it is written would lose these bytes.
        self._disk_held += len(data)
        self.disk_high_water = max(self.disk_high_water, self._file_end)
        try:
            await self._in_thread(_write_all, fd, data, file_offset)
        except BaseException as err:
            self._disk_held -= len(data)
            if isinstance(err, OSError):
                raise self._disk_error(err) from None
            raise
        self._segments.append(_Segment(self.end, len(data), None, file_offset))

    def _disk_error(self, err: OSError) -> RecgwError:
        where = os.fspath(self._spill_dir) if self._spill_dir is not None else tempfile.gettempdir()
        return RecgwError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"cannot spill the retained bytes to a file in {where}: {err.strerror or err}; "
            f"{self.memory_size} bytes are held in memory (retain_limit {self.memory_limit})",
            reason=RETAIN_LIMIT_EXCEEDED,
        )

    async def _in_thread(self, function: Callable[..., _T], *args: object) -> _T:
        future = asyncio.get_running_loop().run_in_executor(None, function, *args)
        self._io.add(future)
        future.add_done_callback(self._io.discard)
        return await asyncio.shield(future)

    def _open(self) -> int:
        directory = tempfile.mkdtemp(prefix="recgw-spill-", dir=self._spill_dir)  # 0700
        path = os.path.join(directory, "retained.bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.unlink(path)
            os.rmdir(directory)
        except OSError:  # an open file cannot be removed (Windows): removed by close()
            self.spill_path, self._directory = path, directory
        self._fd = fd
        return fd

    def release(self, offset: int) -> None:
        """Drop the bytes before ``offset``, committed by the gateway; no-op below ``start``."""
        if offset <= self.start:
            return
        if offset > self.end:
            raise ValueError(f"cannot release up to {offset}: only {self.end} bytes were read")
        segments = self._segments
        head = self._head
        while head < len(segments):
            segment = segments[head]
            segment_end = segment.offset + segment.length
            if segment_end <= offset:
                self._forget(segment, segment.length)
                head += 1
                continue
            if segment.offset < offset:
                skip = offset - segment.offset
                self._forget(segment, skip)
                if segment.data is not None:
                    # Copy the tail so that the released head of the chunk is freed.
                    segment.data = segment.data[skip:]
                else:
                    segment.file_offset += skip
                segment.offset, segment.length = offset, segment.length - skip
            break
        self.start = offset
        if head > 64 and head * 2 > len(segments):
            del segments[:head]
            head = 0
        self._head = head
        if head == len(segments):
            segments.clear()
            self._head = 0
        self._reclaim_disk()

    def _forget(self, segment: _Segment, length: int) -> None:
        if segment.data is not None:
            self.memory_size -= length
        else:
            self._disk_held -= length

    def _reclaim_disk(self) -> None:
        """Empty the spill file once nothing on it is held (and no write is under way)."""
        if self._fd is not None and self._disk_held == 0 and not self._io and self._file_end:
            os.ftruncate(self._fd, 0)
            self._file_end = 0

    async def read(self, offset: int, limit: int) -> bytes:
        """Up to ``limit`` bytes from ``offset``; ``start <= offset < end``."""
        if not self.start <= offset < self.end:
            raise ValueError(
                f"byte {offset} is not held; the retained bytes are {self.start} to {self.end}"
            )
        index = bisect.bisect_right(self._segments, offset, lo=self._head, key=_offset) - 1
        segment = self._segments[index]
        skip = offset - segment.offset
        length = min(limit, segment.length - skip)
        if segment.data is not None:
            if skip == 0 and length == segment.length:
                return segment.data
            return segment.data[skip : skip + length]
        assert self._fd is not None
        return await self._in_thread(_read_all, self._fd, length, segment.file_offset + skip)

    async def aclose(self) -> None:
        """Drop everything and delete the spill file (after any write under way)."""
        self._closed = True
        if self._io:
            await asyncio.gather(*self._io, return_exceptions=True)
        self._segments.clear()
        self._head = 0
        self.memory_size = self._disk_held = self._file_end = 0
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = self.spill_path = None


def check_spill_dir(path: str | os.PathLike[str]) -> None:
    """Fail early, not in the middle of an outage, for a spill directory that cannot serve."""
    if not os.path.isdir(path):
        raise ValueError(f"spill_dir {os.fspath(path)} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"spill_dir {os.fspath(path)} is not writable")


_offset: Callable[[_Segment], int] = lambda segment: segment.offset  # noqa: E731


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _read_all(fd: int, length: int, offset: int) -> bytes:
    parts = []
    while length > 0:
        data = os.pread(fd, length, offset)
        if not data:
            raise OSError(f"the spill file ended early, at byte {offset}")
        parts.append(data)
        length, offset = length - len(data), offset + len(data)
    return b"".join(parts)
