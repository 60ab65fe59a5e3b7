"""Unit tests of pure pieces: part plans, the memory budget, names, config."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recgw_server.config import ConfigError, load_settings
from recgw_server.domain import ErrorKind, RecgwError, Secret, build_object_key
from recgw_server.pipeline.budget import MemoryBudget, Reservation
from recgw_server.pipeline.parts import (
    MAX_OBJECT_SIZE,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    GiB,
    MiB,
    TiB,
    plan_parts,
)


def cumulative(plan_size: object, parts: int) -> int:
    return sum(plan_size(n) for n in range(1, parts + 1))  # type: ignore[operator]


def test_declared_size_fits_in_ten_thousand_parts() -> None:
    for size in (0, 1, 100 * MiB, 80 * GiB, 1 * TiB, MAX_OBJECT_SIZE):
        plan = plan_parts(8 * MiB, size, equal_sizes=False)
        part = plan.size_of(1)
        assert MIN_PART_SIZE <= part <= MAX_PART_SIZE
        assert -(-size // part) <= MAX_PARTS
        assert all(plan.size_of(n) == part for n in (2, 500, 9999))
    assert plan_parts(8 * MiB, 100 * MiB, equal_sizes=False).size_of(1) == 8 * MiB


def test_declared_size_over_five_tib_is_out_of_range() -> None:
    with pytest.raises(RecgwError) as caught:
        plan_parts(8 * MiB, MAX_OBJECT_SIZE + 1, equal_sizes=False)
    assert caught.value.kind is ErrorKind.OUT_OF_RANGE


def test_unknown_length_parts_grow_past_one_tib() -> None:
    plan = plan_parts(8 * MiB, None, equal_sizes=False)
    assert plan.size_of(1) == 8 * MiB  # a short recording keeps small parts
    assert plan.size_of(1000) == 8 * MiB
    assert plan.size_of(1001) == 16 * MiB
    assert cumulative(plan.size_of, MAX_PARTS) >= 1 * TiB
    assert all(plan.size_of(n) <= MAX_PART_SIZE for n in range(1, MAX_PARTS + 1, 97))
    assert plan.capacity >= 1 * TiB


def test_equal_part_sizes_setting() -> None:
    plan = plan_parts(16 * MiB, None, equal_sizes=True)
    assert {plan.size_of(n) for n in (1, 1001, 9999)} == {16 * MiB}
    assert plan.capacity == 16 * MiB * MAX_PARTS


def test_part_size_is_clamped_to_s3_limits() -> None:
    assert plan_parts(1, None, equal_sizes=True).size_of(1) == MIN_PART_SIZE


def test_budget_waits_in_order_and_never_exceeds_capacity() -> None:
    async def scenario() -> list[str]:
        budget = MemoryBudget(10)
        order: list[str] = []
        await budget.acquire(8)

        async def take(name: str, size: int) -> None:
            await budget.acquire(size)
            order.append(name)

        big = asyncio.ensure_future(take("big", 6))
        small = asyncio.ensure_future(take("small", 1))
        await asyncio.sleep(0)
        assert budget.waiting == 2  # FIFO: small waits behind big although 1 byte would fit
        budget.release(8)
        await asyncio.gather(big, small)
        assert budget.in_use == 7
        assert budget.high_water <= budget.capacity
        return order

    assert asyncio.run(scenario()) == ["big", "small"]


def test_budget_cancelled_waiter_gives_way() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(10)
        await budget.acquire(10)
        waiter = asyncio.ensure_future(budget.acquire(5))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert budget.waiting == 0
        budget.release(10)
        assert budget.in_use == 0

    asyncio.run(scenario())


def test_budget_refuses_more_than_capacity() -> None:
    with pytest.raises(RecgwError) as caught:
        asyncio.run(MemoryBudget(10).acquire(11))
    assert caught.value.kind is ErrorKind.RESOURCE_EXHAUSTED


def test_a_tenant_over_its_memory_share_spills_instead_of_taking_memory(tmp_path: Path) -> None:
    """A tenant may hold at most its share of the budget in memory: beyond it, its part moves to
    the spool disk and the memory stays free for the other tenants."""
    from recgw_server.pipeline.buffers import PartBuffer, Spool

    async def scenario() -> None:
        budget = MemoryBudget(100, tenant_share=0.5)
        spool = Spool(tmp_path / "spool", 1000)
        greedy = PartBuffer(1, 200, budget, spool, "greedy", spill_after=60)
        other = PartBuffer(1, 200, budget, spool, "other", spill_after=60)
        await greedy.append(b"g" * 40, 0)
        assert not greedy.spilled and budget.held_by("greedy") == 40
        await greedy.append(b"g" * 40, 0)  # 80 > 50: over its share
        assert greedy.spilled
        assert budget.held_by("greedy") < 50 and spool.budget.in_use >= 40
        await other.append(b"o" * 45, 0)  # the other tenant still gets memory at once
        assert not other.spilled and budget.held_by("other") == 45
        body = await greedy.seal()
        assert b"".join(bytes(c) for c in body.chunks()) == b"g" * 80
        greedy.release()
        other.release()
        assert budget.in_use == 0 and spool.budget.in_use == 0

    asyncio.run(scenario())


def test_a_stream_reserves_memory_for_its_next_message_before_reading(tmp_path: Path) -> None:
    """The memory for a message is taken before the message is read: a stream that waits for
    memory waits before its read (holding nothing gRPC assembled), the part takes the reserved
    bytes without waiting again, and a reservation of a read pending too long is reclaimed."""
    from recgw_server.pipeline.buffers import PartBuffer, Spool

    async def scenario() -> None:
        budget = MemoryBudget(100)
        spool = Spool(tmp_path / "spool", 1000)
        part = PartBuffer(1, 200, budget, spool, "t", spill_after=60)
        stream = Reservation(budget, "t")
        await stream.ensure(40)
        assert budget.in_use == 40 and budget.held_by("t") == 40
        await part.append(b"a" * 40, 0, stream)  # taken from the reservation: no new memory
        assert budget.in_use == 40 and stream.size == 0 and part.size == 40
        # Memory is short: the next reservation waits, before any read.
        other = Reservation(budget, "u")
        await other.ensure(50)
        waiting = asyncio.ensure_future(stream.ensure(40))
        await asyncio.sleep(0)
        assert not waiting.done() and budget.waiting == 1
        other.close()
        await asyncio.wait_for(waiting, 5)
        assert stream.size == 40 and budget.in_use == 80
        # The estimate was too small: the part acquires the message's memory itself, the
        # reservation stays, and the next ensure settles it.
        await stream.ensure(10)
        assert budget.in_use == 50
        await part.append(b"b" * 15, 0, stream)
        assert stream.size == 10 and budget.in_use == 65
        await stream.ensure(5)
        assert budget.in_use == 60
        # A read pending longer than `after` gives its reservation back; a fresh one does not.
        stream.reading()
        assert budget.reclaim_idle(time.monotonic(), after=60) == 0
        assert budget.reclaim_idle(time.monotonic() + 61, after=60) == 5
        assert stream.size == 0 and budget.in_use == 55
        stream.read_done()
        stream.close()
        stream.close()
        part.release()
        assert budget.in_use == 0 and not budget._reservations

    asyncio.run(scenario())


def test_object_keys() -> None:
    assert build_object_key("uploads/", "a/b.webm") == "uploads/a/b.webm"
    assert build_object_key("uploads/", "ünïcode name.webm") == "uploads/ünïcode name.webm"
    for bad in ("", "/a", "a/../b", "..", "a\tb", "a//b", "a/", "a\\b"):
        with pytest.raises(RecgwError):
            build_object_key("uploads/", bad)
    with pytest.raises(RecgwError):
        build_object_key("uploads/", "é" * 509)  # 1018 bytes + 8 of prefix > 1024


def test_secret_never_shows_itself() -> None:
    secret = Secret("CANARY-UNIT")
    assert "CANARY" not in repr(secret) and "CANARY" not in str(secret)
    assert "CANARY" not in f"{secret}" and "CANARY" not in repr([secret])
    assert secret.reveal() == "CANARY-UNIT"


MINIMAL = """
plaintext = true
[vault]
address = "http://127.0.0.1:8200"
[vault.writer]
method = "approle"
role_id = "writer-role"
[vault.reader]
method = "token"
"""


def test_config_file_with_environment_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "recgw.toml"
    config.write_text(MINIMAL + "\n[uploads]\npart_size_mib = 16\n")
    monkeypatch.setenv("RECGW_VAULT__WRITER__SECRET_ID", "CANARY-SECRET-ID")
    monkeypatch.setenv("RECGW_VAULT__READER__TOKEN", "CANARY-TOKEN")
    monkeypatch.setenv("RECGW_UPLOADS__MEMORY_BUDGET_MIB", "64")
    monkeypatch.setenv("RECGW_LISTEN", "127.0.0.1:6000")
    settings = load_settings(config)
    assert settings.listen == "127.0.0.1:6000"
    assert settings.uploads.part_size_mib == 16
    assert settings.uploads.memory_budget_mib == 64
    assert settings.vault.writer.role_id == "writer-role"
    assert settings.vault.writer.secret_id is not None
    assert settings.vault.writer.secret_id.get_secret_value() == "CANARY-SECRET-ID"
    assert "CANARY" not in repr(settings) and "CANARY" not in str(settings)


def test_config_errors_name_fields_not_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "recgw.toml"
    config.write_text(MINIMAL + "\n[uploads]\npart_size_mib = 2\n")
    monkeypatch.setenv("RECGW_VAULT__READER__TOKEN", "CANARY-TOKEN")
    monkeypatch.setenv("RECGW_VAULT__WRITER__ROLE_ID", "")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert "uploads.part_size_mib" in message
    assert "vault.writer" in message
    assert "CANARY" not in message


def in_a_fresh_interpreter(scenario: str) -> None:
    """Run `scenario` (a function of this module) in a new Python process and fail with its
    error. RSS and glibc's heap counts are process-wide: in the test process, freed heap that
    earlier tests left resident was reused without growing RSS, and other tests' threads
    (gateways still stopping, their S3 workers) freed memory meanwhile; CI saw both."""
    result = subprocess.run(
        [sys.executable, "-c", f"from tests.test_units import {scenario}; {scenario}()"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_heap_is_trimmed_when_much_freed_memory_stays_resident() -> None:
    in_a_fresh_interpreter("heap_trimming_scenario")


def test_the_budget_limit_falls_by_what_rss_holds_beyond_the_buffers() -> None:
    in_a_fresh_interpreter("governor_scenario")


def heap_trimming_scenario() -> None:
    """Real allocations: 256 MiB in 64 KiB blocks (below glibc's mmap threshold, so from the
    heap), all freed but every 16th, which keeps the heap from shrinking by itself."""
    from recgw_server.pipeline.heap import HeapTrimmer

    trimmer = HeapTrimmer(slack=48 * MiB)
    assert not trimmer.due(capacity=64 * MiB)  # just started: RSS is the baseline
    blocks = [b"x" * (64 * 1024) for _ in range(4096)]
    kept = blocks[::16]
    assert not trimmer.due(capacity=64 * MiB)  # in use, not freed
    del blocks
    assert trimmer.resident_free() > 200 * MiB
    assert not trimmer.due(capacity=4 * 1024 * MiB)  # below a quarter of a large budget
    assert trimmer.due(capacity=64 * MiB)
    trimmer.trim()
    assert trimmer.resident_free() < 48 * MiB
    assert not trimmer.due(capacity=64 * MiB)
    del kept


def governor_scenario() -> None:
    """The governor against the real RSS of a quiet process (its baseline moved by hand)."""
    from recgw_server.pipeline.budget import MemoryBudget, Reservation
    from recgw_server.pipeline.heap import BudgetGovernor

    budget = MemoryBudget(512 * MiB)
    governor = BudgetGovernor(budget, allowance=48 * MiB)
    assert governor.update() == 512 * MiB
    governor.baseline -= 148 * MiB  # as if RSS held 148 MiB more than at start
    near = 4 * MiB  # RSS moves a little meanwhile
    assert governor.update() == pytest.approx(412 * MiB, abs=near)  # 100 MiB beyond the allowance
    # Reserved for a read that has not started: counted by the budget, but no memory yet.
    reservation = Reservation(budget, "")
    assert reservation.try_ensure(100 * MiB)
    assert governor.update() == pytest.approx(412 * MiB, abs=near)
    reservation.reading()  # gRPC assembles the message now: the reservation explains RSS
    fallen = governor.update()
    assert fallen == pytest.approx(412 * MiB + 8 * MiB, abs=near)  # it rises by 1/64 per update
    rises = [governor.update() for _ in range(20)]
    steps = [after - before for before, after in zip([fallen, *rises], rises, strict=False)]
    assert max(steps) <= 8 * MiB
    assert rises[-1] == pytest.approx(512 * MiB, abs=near)  # 92 MiB back in 12 updates or so
    reservation.close()
    governor.baseline -= 2048 * MiB
    assert governor.update() == 64 * MiB  # it falls at once, never below an eighth of the budget
    assert budget.try_acquire(64 * MiB)
    assert not budget.try_acquire(1)
    budget.release(64 * MiB)
    budget.set_limit(0)
    assert budget.try_acquire(MiB)  # nothing held: granted whatever the limit
    assert not budget.try_acquire(1)


def test_free_ports_are_never_handed_out_twice_and_come_in_a_row_when_asked() -> None:
    from recgw_server.dev.stack import free_port

    first = free_port(consecutive=3)
    singles = {free_port() for _ in range(200)}
    assert len(singles) == 200
    assert not singles & {first, first + 1, first + 2}


def test_resumable_sha256_reads_views_in_place_and_resumes_from_its_state() -> None:
    """Message data arrives as views into gRPC's bytes, at odd offsets; hashing them in place
    (no copy) must give hashlib's digest, also after the state was saved and restored."""
    import hashlib

    from recgw_server.pipeline.digest import ResumableSha256

    raw = os.urandom(3 * MiB + 11)
    pieces: list[bytes | memoryview] = [
        memoryview(raw)[7 : MiB + 7],
        b"",
        memoryview(raw)[MiB + 7 : 3 * MiB + 1],
        memoryview(b""),
        raw[3 * MiB + 1 :],
    ]
    reference = hashlib.sha256()
    sha = ResumableSha256()
    for index, piece in enumerate(pieces):
        reference.update(piece)
        sha.update(piece)
        if index == 2:
            sha = ResumableSha256(sha.state())  # as after a restart
    assert sha.digest() == reference.digest()
