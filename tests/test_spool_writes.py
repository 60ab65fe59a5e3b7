"""How a spilled part writes its spool file: small messages gathered into few system calls,
byte-exact, with the memory and disk budgets balanced (unit tests, no network)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from recgw_server.domain import RecgwError
from recgw_server.pipeline import buffers
from recgw_server.pipeline.budget import MemoryBudget
from recgw_server.pipeline.buffers import SPILL_FLUSH_BYTES, PartBuffer, Spool, SpoolFile
from recgw_server.pipeline.digest import crc32c

MESSAGE = 8000  # a live call's message


def count_pwritev(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The real os.pwritev, counting its calls (buffers per call)."""
    calls: list[int] = []
    real = os.pwritev

    def counted(fd: int, chunks: Any, offset: int) -> int:
        calls.append(len(chunks))
        return real(fd, chunks, offset)

    monkeypatch.setattr(os, "pwritev", counted)
    return calls


@pytest.mark.parametrize("encrypt", [False, True])
def test_a_spilled_part_writes_many_small_messages_in_few_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encrypt: bool
) -> None:
    calls = count_pwritev(monkeypatch)
    payload = os.urandom(100 * MESSAGE + 123)

    async def scenario() -> None:
        budget = MemoryBudget(1 << 30)
        spool = Spool(tmp_path / "spool", 1 << 30, encrypt=encrypt)
        part = PartBuffer(1, len(payload), budget, spool, "t", spill_after=60)
        await part.spill()
        assert part.spilled
        for start in range(0, len(payload), MESSAGE):
            piece = memoryview(payload)[start : start + MESSAGE]
            await part.append(piece if start % 2 else bytes(piece), crc32c(piece))
            # Only what has not been flushed yet is held in memory.
            assert budget.in_use < SPILL_FLUSH_BYTES + MESSAGE
            assert budget.in_use + spool.budget.in_use == start + len(piece)
        assert part.crc32c == crc32c(payload)
        body = await part.seal()
        assert budget.in_use == 0 and spool.budget.in_use == len(payload)
        assert b"".join(bytes(c) for c in body.chunks()) == payload
        if encrypt:
            assert payload[:64] not in Path(part._file.path).read_bytes()  # type: ignore[union-attr]
        part.release()
        assert spool.budget.in_use == 0 and not list(spool.directory.iterdir())

    asyncio.run(scenario())
    flushes = -(-len(payload) // SPILL_FLUSH_BYTES)
    assert len(calls) <= flushes + 1  # not one call per message (101 of them)
    assert sum(calls) == (len(calls) if encrypt else 101)


def test_batches_are_bounded_in_buffers_and_bytes() -> None:
    small = [b"x"] * 2500
    assert [len(b) for b in buffers._batches(small)] == [1024, 1024, 452]
    big = [bytes(400 * 1024)] * 5
    assert [len(b) for b in buffers._batches(big)] == [2, 2, 1]
    huge = [b"a", bytes(3 << 20), b"b"]
    assert [sum(map(len, b)) for b in buffers._batches(huge)] == [1, 3 << 20, 1]
    assert list(buffers._batches([])) == []


@pytest.mark.parametrize("encrypt", [False, True])
def test_a_short_write_is_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encrypt: bool
) -> None:
    """pwritev may write less than asked (a signal, a full disk's last block): the rest follows."""
    real = os.pwritev

    def short(fd: int, chunks: Any, offset: int) -> int:
        return real(fd, [memoryview(chunks[0])[:7]], offset)

    monkeypatch.setattr(os, "pwritev", short)
    file = SpoolFile(Spool(tmp_path / "spool", 1 << 20, encrypt=encrypt))
    pieces = [os.urandom(1000), os.urandom(3), os.urandom(2000)]
    file.append_all(pieces)
    file.append(b"tail")
    expected = b"".join(pieces) + b"tail"
    assert file.size == len(expected)
    assert file.read_at(0, len(expected)) == expected
    file.delete()


def test_a_message_waits_for_a_flush_under_way_and_keeps_its_place(tmp_path: Path) -> None:
    async def scenario() -> None:
        budget = MemoryBudget(1 << 20)
        spool = Spool(tmp_path / "spool", 1 << 20)
        part = PartBuffer(1, 1 << 20, budget, spool, "t", spill_after=60)
        await part.append(b"a" * 10, crc32c(b"a" * 10))
        async with part._lock:  # as a spill or flush holds it across its file write
            late = asyncio.ensure_future(part.append(b"b" * 5, crc32c(b"b" * 5)))
            await asyncio.sleep(0.01)
            assert not late.done() and part.size == 10
        await late
        await part.append(b"c", crc32c(b"c"))
        assert part.size == 16 and part.crc32c == crc32c(b"a" * 10 + b"b" * 5 + b"c")
        body = await part.seal()
        assert b"".join(bytes(c) for c in body.chunks()) == b"a" * 10 + b"b" * 5 + b"c"
        part.release()
        assert budget.in_use == 0

    asyncio.run(scenario())


def test_an_upload_that_ends_while_its_spool_file_opens_leaves_no_file(tmp_path: Path) -> None:
    async def scenario() -> None:
        budget = MemoryBudget(1 << 20)
        spool = Spool(tmp_path / "spool", 1 << 20)
        part = PartBuffer(1, 1 << 20, budget, spool, "t", spill_after=60)
        await part.append(b"a" * 10, crc32c(b"a" * 10))
        spilling = asyncio.ensure_future(part.spill())
        await asyncio.sleep(0)  # it now waits for the file to be opened in a worker thread
        part.release()
        await spilling
        assert not part.spilled and spool.spilled_parts == 0
        assert not list(spool.directory.iterdir())
        assert budget.in_use == 0 and spool.budget.in_use == 0
        with pytest.raises(RecgwError):
            await part.append(b"b", crc32c(b"b"))
        assert budget.in_use == 0

    asyncio.run(scenario())
