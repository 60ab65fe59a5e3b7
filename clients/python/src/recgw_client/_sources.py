"""Turns every kind of upload source into an async iterator of chunks.

Blocking reads (files, pipes, stdin, plain iterators) run in a daemon thread
so that the event loop is never blocked, however long a live recording
pauses.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import threading
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import IO, Protocol, runtime_checkable

Buffer = bytes | bytearray | memoryview


@runtime_checkable
class Readable(Protocol):
    """A binary stream: a file opened with 'rb', stdin, a socket file.

    It is read in a daemon thread that may still be blocked in ``read()`` when
    the process exits. For stdin prefer ``open(0, "rb", buffering=0,
    closefd=False)`` over ``sys.stdin.buffer``, whose lock the interpreter
    needs at exit.
    """

    def read(self, size: int = ..., /) -> bytes | None: ...


Source = (
    str
    | os.PathLike[str]
    | bytes
    | bytearray
    | memoryview
    | Readable
    | AsyncIterable[Buffer]
    | Iterable[Buffer]
)
"""What can be uploaded: a path, bytes, a binary stream, or (async) iterable of chunks."""


class _BlockingSource(Protocol):
    def read(self) -> bytes:
        """The next bytes; b"" at the end."""
        ...

    def close(self) -> None: ...


def _read_chunk(stream: Readable, size: int) -> bytes:
    # read1 returns what a pipe holds right away instead of waiting for a
    # full chunk, so a live recording is forwarded as it arrives.
    read1 = getattr(stream, "read1", None)
    data = read1(size) if callable(read1) else stream.read(size)
    if data is None:
        raise TypeError("non-blocking streams are not supported; use a blocking binary stream")
    if isinstance(data, str):
        raise TypeError("the stream is in text mode; open it in binary mode ('rb')")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"the stream returned {type(data).__name__}, not bytes")
    return bytes(data)


class _StreamSource:
    def __init__(self, stream: Readable, chunk_size: int, skip: int = 0) -> None:
        self._stream = stream
        self._chunk_size = chunk_size
        self._skip = skip

    def read(self) -> bytes:
        if self._skip:
            # In the reader thread: seeking a stream may block like reading it.
            _seek(self._stream, self._skip)
            self._skip = 0
        return _read_chunk(self._stream, self._chunk_size)

    def close(self) -> None:
        """The caller owns the stream."""


class _FileSource:
    def __init__(self, path: str, chunk_size: int, skip: int = 0) -> None:
        self._path = path
        self._chunk_size = chunk_size
        self._skip = skip
        self._file: IO[bytes] | None = None

    def read(self) -> bytes:
        # Opened here, in the reader thread: opening a FIFO blocks until a writer appears.
        if self._file is None:
            self._file = open(self._path, "rb")  # noqa: SIM115 - closed by close()
            if self._skip:
                self._file.seek(self._skip)
        return _read_chunk(self._file, self._chunk_size)

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()


def _seek(stream: Readable, skip: int) -> None:
    seek = getattr(stream, "seek", None)
    if not callable(seek):
        raise TypeError("the stream cannot seek")
    seek(skip, os.SEEK_CUR)


def _is_seekable(stream: Readable) -> bool:
    seekable = getattr(stream, "seekable", None)
    try:
        return bool(seekable()) if callable(seekable) else False
    except (OSError, ValueError):
        return False


class _IterableSource:
    def __init__(self, chunks: Iterable[Buffer]) -> None:
        self._chunks: Iterator[Buffer] = iter(chunks)

    def read(self) -> bytes:
        for chunk in self._chunks:
            data = _as_bytes(chunk)
            if data:
                return data
        return b""

    def close(self) -> None:
        """The caller owns the iterable."""


class _ThreadedReader:
    """Runs a blocking source in a daemon thread, a few chunks ahead of the sender.

    A daemon thread rather than the default executor: a read may block as long
    as a live recording pauses, and neither cancellation nor interpreter exit
    should wait for it.
    """

    def __init__(self, source: _BlockingSource, depth: int = 2) -> None:
        self._source = source
        self._slots = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._started = False
        self._closed = False

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | Exception] = asyncio.Queue()
        self._started = True
        threading.Thread(
            target=self._pump, args=(loop, queue), name="recgw-upload-reader", daemon=True
        ).start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if not item:
                    return
                self._slots.release()
                yield item
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._started:
            self._source.close()
            return
        self._stop.set()
        self._slots.release()

    def _pump(
        self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes | Exception]
    ) -> None:
        try:
            while True:
                self._slots.acquire()
                if self._stop.is_set():
                    return
                item: bytes | Exception
                try:
                    item = self._source.read()
                except Exception as exc:
                    item = exc
                if self._stop.is_set():
                    return
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                except RuntimeError:  # the event loop is closed
                    return
                if isinstance(item, Exception) or not item:
                    return
        finally:
            self._source.close()


def _as_bytes(chunk: object) -> bytes:
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, bytearray | memoryview):
        return bytes(chunk)
    raise TypeError(f"upload chunks must be bytes, not {type(chunk).__name__}")


async def _sized(chunks: AsyncIterable[Buffer], chunk_size: int) -> AsyncGenerator[bytes, None]:
    """Non-empty chunks of at most chunk_size bytes; small chunks are not held back."""
    async for chunk in chunks:
        data = _as_bytes(chunk)
        if len(data) <= chunk_size:
            if data:
                yield data
            continue
        for start in range(0, len(data), chunk_size):
            yield data[start : start + chunk_size]


async def _buffer(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


class OpenedSource:
    """An upload source, before reading: its size if known and whether it can seek.

    A seekable source (a path of a regular file, bytes, a stream whose
    ``seekable()`` is true, positioned at the object's first byte) can start
    reading at any offset, so an upload can be continued from the gateway's
    committed size. Every other source is read once, as it produces: a live
    recording.
    """

    def __init__(self, source: Source, chunk_size: int) -> None:
        self._source = source
        self._chunk_size = chunk_size
        self.size: int | None = None
        self.seekable = False
        self._path: str | None = None
        self._reader: _ThreadedReader | None = None
        self._owned: list[AsyncGenerator[bytes, None]] = []
        self._opened = False
        if isinstance(source, str | os.PathLike):
            self._path = os.fspath(source)
        elif isinstance(source, bytes | bytearray | memoryview):
            self.size, self.seekable = len(source), True
        elif isinstance(source, Readable):
            self.seekable = _is_seekable(source)
        elif not isinstance(source, AsyncIterable | Iterable):
            raise TypeError(
                "source must be a path, bytes, a binary stream, or an (async) iterable of bytes, "
                f"not {type(source).__name__}"
            )

    async def check(self) -> None:
        """Fail before the upload starts for missing or unreadable files."""
        if self._path is None:
            return
        info = await asyncio.to_thread(os.stat, self._path)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), self._path)
        if not os.access(self._path, os.R_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), self._path)
        if stat.S_ISREG(info.st_mode):
            self.size, self.seekable = info.st_size, True

    def chunks(self, start: int = 0) -> AsyncIterator[bytes]:
        """The source's chunks from byte ``start`` on (> 0 only for a seekable source); once."""
        if self._opened:
            raise RuntimeError("a source is read once")
        self._opened = True
        if start and not self.seekable:
            raise ValueError("only a seekable source can start reading at an offset")
        source, chunk_size = self._source, self._chunk_size
        raw: AsyncIterable[Buffer]
        if self._path is not None:
            self._reader = _ThreadedReader(_FileSource(self._path, chunk_size, start))
        elif isinstance(source, bytes | bytearray | memoryview):
            raw = _buffer(bytes(source[start:]))
            self._owned.append(raw)
        elif isinstance(source, Readable):
            self._reader = _ThreadedReader(_StreamSource(source, chunk_size, start))
        elif isinstance(source, AsyncIterable):
            raw = source
        else:
            assert isinstance(source, Iterable) and not isinstance(source, str)
            self._reader = _ThreadedReader(_IterableSource(source))
        if self._reader is not None:
            raw = self._reader.chunks()
            self._owned.append(raw)
        sized = _sized(raw, chunk_size)
        self._owned.insert(0, sized)
        return sized

    async def aclose(self) -> None:
        for generator in self._owned:
            await generator.aclose()
        if self._reader is not None:
            self._reader.close()
