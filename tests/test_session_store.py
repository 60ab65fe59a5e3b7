"""One contract for both session stores (SQLite and a real PostgreSQL): records, leases, fencing.

Every test runs against both; PostgreSQL-only tests prove what only a shared database can get
wrong (a check and a write in separate statements, claimers blocking each other).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from typer.testing import CliRunner

from recgw_server import cli
from recgw_server.config import ConfigError, load_store_settings
from recgw_server.dev.stack import PostgresCluster
from recgw_server.sessions.base import (
    AlreadyCreated,
    Fenced,
    Lease,
    PartRecord,
    SessionRecord,
    SessionStore,
)
from recgw_server.sessions.migrations import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from recgw_server.sessions.postgres import PostgresSessionStore, migrate_postgres
from recgw_server.sessions.sqlite import SqliteSessionStore, connect_sqlite, migrate_sqlite
from tests.harness import RECGW, register_canary

T = TypeVar("T")
MiB = 1024 * 1024
LONG = 60.0  # a lease time no test outlives: the holder stays live


@dataclass
class Backend:
    name: str
    factory: Callable[[], SessionStore]
    url: str = ""

    async def open(self) -> SessionStore:
        store = self.factory()
        await store.open()
        return store


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "sessions.sqlite3"
        return Backend("sqlite", lambda: SqliteSessionStore(path))
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    url = cluster.create_database()
    return Backend("postgres", lambda: PostgresSessionStore(url), url)


@pytest.fixture
def pg_url(postgres: PostgresCluster) -> str:
    return postgres.create_database()


def run(scenario: Callable[[SessionStore], Coroutine[Any, Any, T]], backend: Backend) -> T:
    async def main() -> T:
        store = await backend.open()
        try:
            return await scenario(store)
        finally:
            await store.close()

    return asyncio.run(main())


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 10) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await check()
        if result is not None:
            return result
        await asyncio.sleep(0.02)
    raise TimeoutError(what)


def session(state: str = "open", updated_at: float = 1001.5, **fields: Any) -> SessionRecord:
    record = SessionRecord(
        upload_id=str(uuid.uuid4()),
        tenant_id="tenant-a",
        object_name="calls/1.webm",
        key="uploads/calls/1.webm",
        bucket="bucket-a",
        content_type="video/webm",
        metadata={"call-id": "1", "leg": "b"},
        if_none_match=True,
        expected_size=None,
        credentials_version=3,
        part_base_size=8 * MiB,
        part_growing=True,
        growth_interval=1000,
        state=state,
        created_at=1000.5,
        updated_at=updated_at,
    )
    return replace(record, **fields)


def part(number: int, etag: str = "") -> PartRecord:
    return PartRecord(
        number,
        etag or f'"etag-{number}"',
        8 * MiB,
        number * 11,
        number * 111,
        bytes([number]) * 112,
    )


def test_round_trip_survives_reopening(backend: Backend) -> None:
    record = session(expected_size=16 * MiB)
    parts = [part(1), part(2)]

    async def write(store: SessionStore) -> Lease:
        await store.heartbeat("a")
        lease = await store.create(record, "a")
        assert lease == Lease(record.upload_id, "a", 1)
        await store.update(lease, 1002.0, store_upload_id="s3-upload-id")
        for p in parts:
            await store.save_part(lease, p, p.number * 8 * MiB, 1003.0)
        await store.update(lease, 1004.0, state="complete", result={"etag": "x", "n": 2})
        return lease

    async def read(store: SessionStore) -> SessionRecord | None:
        return await store.get(record.upload_id)

    run(write, backend)
    loaded = run(read, backend)
    assert loaded is not None
    assert loaded.parts == tuple(parts) == loaded.committed_parts()
    assert (loaded.store_upload_id, loaded.committed_size) == ("s3-upload-id", 16 * MiB)
    assert (loaded.state, loaded.result, loaded.updated_at) == (
        "complete",
        {"etag": "x", "n": 2},
        1004.0,
    )
    unchanged = {"store_upload_id", "parts", "committed_size", "state", "result", "updated_at"}
    unchanged |= {"holder", "generation"}
    expected = {n: getattr(record, n) for n in record.__dataclass_fields__ if n not in unchanged}
    assert {n: getattr(loaded, n) for n in expected} == expected
    assert run(lambda store: store.get(str(uuid.uuid4())), backend) is None


def test_parts_are_replaced_and_dropped(backend: Backend) -> None:
    async def scenario(store: SessionStore) -> None:
        record = session()
        lease = await store.create(record, "a")
        for number in (1, 2, 3, 5):
            await store.save_part(lease, part(number), number * 8 * MiB, 1002.0)
        await store.save_part(lease, part(2, '"second-try"'), 24 * MiB, 1003.0)
        loaded = await store.get(record.upload_id)
        assert loaded is not None
        assert [p.etag for p in loaded.parts] == [
            '"etag-1"',
            '"second-try"',
            '"etag-3"',
            '"etag-5"',
        ]
        assert [p.number for p in loaded.committed_parts()] == [1, 2, 3]
        assert (loaded.committed_size, loaded.updated_at) == (24 * MiB, 1003.0)
        await store.drop_parts_after(lease, 1)
        loaded = await store.get(record.upload_id)
        assert loaded is not None and [p.number for p in loaded.parts] == [1]
        with pytest.raises(ValueError, match="cannot update"):
            await store.update(lease, 1004.0, tenant_id="other")

    run(scenario, backend)


def test_idle_sessions(backend: Backend) -> None:
    async def scenario(store: SessionStore) -> None:
        old_open = session(updated_at=100.0)
        old_finishing = session(state="finishing", updated_at=200.0)
        recent = session(updated_at=5000.0)
        complete = session(state="complete", updated_at=100.0)
        for record in (old_open, old_finishing, recent, complete):
            await store.create(record, "a")
        idle = await store.idle(("open", "finishing"), 1000.0)
        assert sorted(idle) == sorted([old_open.upload_id, old_finishing.upload_id])
        assert await store.idle(("open",), 150.0) == [old_open.upload_id]

    run(scenario, backend)


def test_attach_refused_while_the_holder_lives_taken_when_its_heartbeat_is_stale(
    backend: Backend,
) -> None:
    async def scenario(store: SessionStore) -> None:
        record = session()
        await store.heartbeat("a")
        await store.heartbeat("b")
        first = await store.create(record, "a")
        assert await store.attach(record.upload_id, "b", LONG) is None
        again = await store.attach(record.upload_id, "a", LONG)  # the holder itself may
        assert again == Lease(record.upload_id, "a", 2)
        # "a" stops beating: with a short lease time, "b" takes over once a's beat is stale.
        taken = await eventually(
            lambda: store.attach(record.upload_id, "b", 0.2), "a's heartbeat going stale"
        )
        assert taken == Lease(record.upload_id, "b", 3)
        await store.heartbeat("b")
        forced = await store.attach(record.upload_id, "a", LONG, force=True)
        assert forced == Lease(record.upload_id, "a", 4)
        assert await store.release(first) is False  # long lost: changes nothing
        assert await store.release(taken) is False
        loaded = await store.get(record.upload_id)
        assert loaded is not None and (loaded.holder, loaded.generation) == ("a", 4)
        assert await store.release(forced) is True
        loaded = await store.get(record.upload_id)
        assert loaded is not None and (loaded.holder, loaded.generation) == ("", 4)
        assert await store.attach(record.upload_id, "b", LONG) == Lease(record.upload_id, "b", 5)
        assert await store.attach(str(uuid.uuid4()), "b", LONG) is None  # no such upload

    run(scenario, backend)


def test_a_second_create_of_one_upload_id_is_refused_and_changes_nothing(
    backend: Backend,
) -> None:
    async def scenario(store: SessionStore) -> None:
        record = session()
        await store.heartbeat("a")
        assert await store.create(record, "a") == Lease(record.upload_id, "a", 1)
        with pytest.raises(AlreadyCreated):
            await store.create(replace(record, object_name="other.webm"), "b")
        loaded = await store.get(record.upload_id)
        assert loaded is not None
        assert (loaded.holder, loaded.generation, loaded.object_name) == ("a", 1, "calls/1.webm")

    run(scenario, backend)


def test_an_update_without_fields_checks_the_lease_and_touches_only_updated_at(
    backend: Backend,
) -> None:
    async def scenario(store: SessionStore) -> None:
        record = session(state="finishing")
        await store.heartbeat("a")
        lease = await store.create(record, "a")
        await store.update(lease, 2002.5)
        loaded = await store.get(record.upload_id)
        assert loaded is not None and (loaded.state, loaded.updated_at) == ("finishing", 2002.5)
        taken = await store.attach(record.upload_id, "b", LONG, force=True)
        assert taken is not None
        with pytest.raises(Fenced):
            await store.update(lease, 3003.5)
        loaded = await store.get(record.upload_id)
        assert loaded is not None and loaded.updated_at == 2002.5

    run(scenario, backend)


def test_release_requests_reach_the_holder(backend: Backend) -> None:
    async def scenario(store: SessionStore) -> None:
        held, other = session(), session()
        await store.heartbeat("a")
        lease = await store.create(held, "a")
        await store.create(other, "a")
        assert await store.release_requested("a") == []
        await store.request_release(held.upload_id)
        assert await store.release_requested("a") == [held.upload_id]
        assert await store.release_requested("b") == []
        assert await store.attach(held.upload_id, "b", LONG) is None  # asking is not taking
        assert await store.release(lease)
        assert await store.release_requested("a") == []
        assert await store.attach(held.upload_id, "b", LONG) == Lease(held.upload_id, "b", 2)

    run(scenario, backend)


def test_a_stale_lease_can_write_nothing(backend: Backend) -> None:
    async def scenario(store: SessionStore) -> None:
        record = session()
        stale = await store.create(record, "a")
        await store.save_part(stale, part(1), 8 * MiB, 1002.0)
        current = await store.attach(record.upload_id, "b", LONG, force=True)
        assert current is not None
        with pytest.raises(Fenced):
            await store.save_part(stale, part(2), 16 * MiB, 1003.0)
        with pytest.raises(Fenced):
            await store.save_part(stale, part(1, '"overwrite"'), 8 * MiB, 1003.0)
        with pytest.raises(Fenced):
            await store.drop_parts_after(stale, 0)
        changes: list[dict[str, Any]] = [
            {"state": "complete"},
            {"state": "aborted"},
            {"store_upload_id": "x"},
        ]
        for fields in changes:
            with pytest.raises(Fenced):
                await store.update(stale, 1003.0, **fields)
        loaded = await store.get(record.upload_id)
        assert loaded is not None
        assert (loaded.state, loaded.store_upload_id, loaded.updated_at) == ("open", "", 1002.0)
        assert loaded.parts == (part(1),) and loaded.committed_size == 8 * MiB
        # the new holder writes as usual
        await store.save_part(current, part(2), 16 * MiB, 1004.0)
        await store.drop_parts_after(current, 1)
        await store.update(current, 1005.0, state="aborted")
        loaded = await store.get(record.upload_id)
        assert loaded is not None and (loaded.state, len(loaded.parts)) == ("aborted", 1)

    run(scenario, backend)


def _write_of(operation: str, store: SessionStore, lease: Lease) -> Awaitable[None]:
    if operation == "save_part":
        return store.save_part(lease, part(2), 16 * MiB, 1003.0)
    if operation == "drop_parts_after":
        return store.drop_parts_after(lease, 0)
    return store.update(lease, 1003.0, state="complete")


async def _wait_for_lock_wait(conn: psycopg.AsyncConnection[Any]) -> None:
    async def blocked() -> bool | None:
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        )
        row = await cursor.fetchone()
        return True if row and row[0] else None

    await eventually(blocked, "the write to wait for the row lock")


@pytest.mark.parametrize("operation", ["save_part", "drop_parts_after", "update"])
def test_postgres_fences_in_the_statement_that_writes(pg_url: str, operation: str) -> None:
    """A takeover that commits while a stale write is under way still fences it.

    The takeover's UPDATE is held open in another transaction; a write that checked the lease
    with a separate SELECT would see the old generation (uncommitted changes are invisible)
    and go ahead. Checked in the same statement, the write waits for the row and re-checks it.
    """

    async def scenario() -> None:
        store = PostgresSessionStore(pg_url)
        await store.open()
        record = session()
        stale = await store.create(record, "a")
        await store.save_part(stale, part(1), 8 * MiB, 1002.0)
        async with await psycopg.AsyncConnection.connect(pg_url) as takeover:
            await takeover.execute(
                "UPDATE sessions SET holder = 'b', generation = generation + 1 "
                "WHERE upload_id = %s",
                (record.upload_id,),
            )
            write = asyncio.ensure_future(_write_of(operation, store, stale))
            async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as watch:
                await _wait_for_lock_wait(watch)
            assert not write.done()
            await takeover.commit()
        with pytest.raises(Fenced):
            await write
        loaded = await store.get(record.upload_id)
        await store.close()
        assert loaded is not None
        assert (loaded.state, loaded.parts, loaded.generation) == ("open", (part(1),), 2)

    asyncio.run(scenario())


def test_claim_idle_takes_free_and_stale_leases_only(backend: Backend) -> None:
    async def scenario(store: SessionStore) -> None:
        await store.heartbeat("live")
        await store.heartbeat("a")
        free = session(updated_at=100.0)
        held_by_live = session(updated_at=100.0)
        held_by_dead = session(updated_at=120.0)  # "dead" never beat at all
        recent = session(updated_at=5000.0)
        complete = session(state="complete", updated_at=100.0)
        finishing = session(state="finishing", updated_at=150.0)
        holders = {held_by_live.upload_id: "live", held_by_dead.upload_id: "dead"}
        for record in (free, held_by_live, held_by_dead, recent, complete, finishing):
            lease = await store.create(record, holders.get(record.upload_id, "nobody"))
            if record.upload_id not in holders:
                await store.release(lease)
        claimed = await store.claim_idle(("open", "finishing"), 1000.0, "a", LONG, 10)
        expected = {free.upload_id, held_by_dead.upload_id, finishing.upload_id}
        assert {c.upload_id for c in claimed} == expected
        assert all(c.holder == "a" and c.generation == 2 for c in claimed)
        await store.heartbeat("b")
        assert await store.claim_idle(("open", "finishing"), 1000.0, "b", LONG, 10) == []
        for lease in claimed:
            await store.release(lease)
        first = await store.claim_idle(("open", "finishing"), 1000.0, "b", LONG, 1)
        assert [c.upload_id for c in first] == [free.upload_id]  # oldest first, at most 1

    run(scenario, backend)


def test_concurrent_claimers_get_disjoint_sets(backend: Backend) -> None:
    async def scenario() -> None:
        stores = [await backend.open(), await backend.open()]
        if backend.name == "sqlite":  # one process per SQLite file: share the one store
            await stores[1].close()
            stores[1] = stores[0]
        records = [session(updated_at=100.0 + i) for i in range(40)]
        for record in records:
            await stores[0].release(await stores[0].create(record, "creator"))
        for holder, store in zip(("a", "b"), stores, strict=True):
            await store.heartbeat(holder)
        rounds = await asyncio.gather(
            *(
                store.claim_idle(("open",), 1000.0, holder, LONG, 25)
                for holder, store in zip(("a", "b"), stores, strict=True)
            )
        )
        claimed = [[lease.upload_id for lease in leases] for leases in rounds]
        assert not set(claimed[0]) & set(claimed[1])
        assert len(claimed[0]) + len(claimed[1]) == 40
        for store in {id(s): s for s in stores}.values():
            await store.close()

    asyncio.run(scenario())


def test_postgres_claimers_skip_rows_locked_by_another(pg_url: str) -> None:
    async def scenario() -> None:
        store = PostgresSessionStore(pg_url)
        await store.open()
        await store.heartbeat("a")
        records = [session(updated_at=100.0 + i) for i in range(5)]
        for record in records:
            await store.release(await store.create(record, "creator"))
        async with await psycopg.AsyncConnection.connect(pg_url) as other:
            await other.execute(
                "SELECT 1 FROM sessions WHERE upload_id = %s FOR UPDATE", (records[0].upload_id,)
            )
            # Without SKIP LOCKED this would wait for `other` until the timeout.
            claimed = await asyncio.wait_for(
                store.claim_idle(("open",), 1000.0, "a", LONG, 10), timeout=10
            )
            await other.rollback()
        assert {c.upload_id for c in claimed} == {r.upload_id for r in records[1:]}
        await store.close()

    asyncio.run(scenario())


def test_postgres_migrations_are_idempotent_and_safe_to_run_at_once(pg_url: str) -> None:
    async def migrate() -> list[int]:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            return await migrate_postgres(conn)

    async def scenario() -> None:
        everything = [m.version for m in POSTGRES_MIGRATIONS]
        results = await asyncio.gather(*(migrate() for _ in range(3)))
        assert sorted(results) == [[], [], everything]
        assert await migrate() == []
        async with await psycopg.AsyncConnection.connect(pg_url) as conn:
            cursor = await conn.execute("SELECT version FROM schema_migrations ORDER BY version")
            assert [row[0] for row in await cursor.fetchall()] == everything

    asyncio.run(scenario())


def test_sqlite_migrations_are_idempotent_and_safe_to_run_at_once(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    results: list[list[int]] = []
    start = threading.Barrier(3)

    def migrate() -> None:
        db = connect_sqlite(path)
        start.wait()
        results.append(migrate_sqlite(db))
        db.close()

    threads = [threading.Thread(target=migrate) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == [[], [], [m.version for m in SQLITE_MIGRATIONS]]
    store = SqliteSessionStore(path)
    assert store.applied_migrations == []
    asyncio.run(store.close())


def test_a_data_dir_from_before_schema_versions_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    old = session()
    db = sqlite3.connect(path)
    for statement in SQLITE_MIGRATIONS[0].statements:  # the schema as it was before versions
        db.execute(statement)
    db.execute(
        "INSERT INTO sessions (upload_id, tenant_id, object_name, key, bucket, content_type, "
        "metadata, if_none_match, credentials_version, part_base_size, part_growing, "
        "growth_interval, state, created_at, updated_at) "
        "VALUES (?, 't', 'o', 'uploads/o', 'b', '', '{}', 1, 1, 5242880, 1, 1000, 'open', 1, 2)",
        (old.upload_id,),
    )
    db.commit()
    db.close()

    async def scenario(store: SessionStore) -> None:
        loaded = await store.get(old.upload_id)
        assert loaded is not None and (loaded.state, loaded.holder, loaded.generation) == (
            "open",
            "",
            0,
        )
        lease = await store.attach(old.upload_id, "a", LONG)
        assert lease == Lease(old.upload_id, "a", 1)
        await store.save_part(lease, part(1), 8 * MiB, 3.0)

    store = SqliteSessionStore(path)
    assert store.applied_migrations == [1, 2, 3]
    asyncio.run(store.close())
    run(scenario, Backend("sqlite", lambda: SqliteSessionStore(path)))


@pytest.fixture
def sqlite_data_dir(tmp_path: Path) -> tuple[Path, list[SessionRecord]]:
    """A data dir as `recgw serve` on SQLite leaves it: an open and a complete upload."""
    data_dir = tmp_path / "data"
    open_one, complete = session(), session(state="open", updated_at=1500.0)

    async def fill(store: SessionStore) -> None:
        lease = await store.create(open_one, "old-process")
        for number in (1, 2):
            await store.save_part(lease, part(number), number * 8 * MiB, 1600.0)
        lease = await store.create(complete, "old-process")
        await store.save_part(lease, part(1), 8 * MiB, 1700.0)
        await store.update(lease, 1800.0, state="complete", result={"etag": "done"})

    run(fill, Backend("sqlite", lambda: SqliteSessionStore(data_dir / "sessions.sqlite3")))
    store = SqliteSessionStore(data_dir / "sessions.sqlite3")

    async def read_all() -> list[SessionRecord]:
        try:
            return [r for r in [await store.get(x.upload_id) for x in (open_one, complete)] if r]
        finally:
            await store.close()

    return data_dir, asyncio.run(read_all())


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def _migrate(url: str, *args: str, process: bool = False) -> Ran:
    """`recgw migrate ARGS` with RECGW_SESSIONS__URL=url: as a process, or in this one."""
    if process:
        env = {**os.environ, "RECGW_SESSIONS__URL": url}
        done = subprocess.run(
            [RECGW, "migrate", *args], env=env, capture_output=True, text=True, timeout=60
        )
        return Ran(done.returncode, done.stdout, done.stderr)
    result = CliRunner().invoke(cli.app, ["migrate", *args], env={"RECGW_SESSIONS__URL": url})
    return Ran(result.exit_code, result.stdout, result.stderr)


def test_migrate_from_sqlite_copies_once(
    pg_url: str, sqlite_data_dir: tuple[Path, list[SessionRecord]]
) -> None:
    data_dir, originals = sqlite_data_dir
    first = _migrate(pg_url, "--from-sqlite", str(data_dir), process=True)
    assert first.returncode == 0, first.stderr
    assert "applied schema migrations 1, 2" in first.stdout
    assert "copied 2 sessions and 3 parts" in first.stdout

    async def copies() -> list[SessionRecord | None]:
        store = PostgresSessionStore(pg_url)
        await store.open()
        try:
            return [await store.get(r.upload_id) for r in originals]
        finally:
            await store.close()

    copied = asyncio.run(copies())
    assert copied == originals  # every field, parts included; no lease holder on either side
    again = _migrate(pg_url, "--from-sqlite", str(data_dir / "sessions.sqlite3"))
    assert again.returncode == 1
    assert "2 of the 2 sessions already exist" in again.stderr
    assert "nothing was copied" in again.stderr
    assert asyncio.run(copies()) == originals
    plain = _migrate(pg_url)
    assert (plain.returncode, plain.stdout.strip()) == (0, "PostgreSQL: schema already up to date")


def test_copied_sessions_resume_under_a_new_lease(
    pg_url: str, sqlite_data_dir: tuple[Path, list[SessionRecord]]
) -> None:
    data_dir, originals = sqlite_data_dir
    assert _migrate(pg_url, "--from-sqlite", str(data_dir)).returncode == 0

    async def scenario(store: SessionStore) -> None:
        await store.heartbeat("new")
        lease = await store.attach(originals[0].upload_id, "new", LONG)
        assert lease is not None and lease.generation == originals[0].generation + 1
        await store.save_part(lease, part(3), 24 * MiB, 1900.0)

    run(scenario, Backend("postgres", lambda: PostgresSessionStore(pg_url), pg_url))


def test_migrate_sqlite_data_dir(tmp_path: Path) -> None:
    config = tmp_path / "recgw.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    result = _migrate("", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "applied schema migrations 1, 2" in result.stdout
    refused = _migrate("", "--config", str(config), "--from-sqlite", str(tmp_path / "data"))
    assert refused.returncode == 1 and "set sessions.url" in refused.stderr


def test_a_password_in_the_sessions_url_stays_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    password = register_canary("pg-CANARY-" + uuid.uuid4().hex)
    monkeypatch.setenv("RECGW_SESSIONS__URL", f"mysql://recgw:{password}@db/recgw")
    with pytest.raises(ConfigError) as caught:
        load_store_settings()
    assert "sessions.url" in str(caught.value) and password not in str(caught.value)
    monkeypatch.setenv("RECGW_SESSIONS__URL", f"postgresql://recgw:{password}@db/recgw")
    settings = load_store_settings()
    assert settings.sessions.postgres_url.endswith("@db/recgw")
    assert password not in repr(settings) and password not in str(settings.model_dump())


def test_tail_and_sha256_flag_round_trip(backend: Backend) -> None:
    record = session(compute_sha256=False)

    async def scenario(store: SessionStore) -> SessionRecord | None:
        await store.heartbeat("a")
        lease = await store.create(record, "a")
        await store.update(lease, 1002.0, tail=part(3))
        return await store.get(record.upload_id)

    loaded = run(scenario, backend)
    assert loaded is not None
    assert loaded.compute_sha256 is False
    assert loaded.tail == part(3)


def test_outbox_is_written_with_the_state_and_claimed_once(backend: Backend) -> None:
    """Events are written in the state change's transaction (a fenced change writes none),
    claimed by one dispatcher at a time, and counted by status."""
    from recgw_server.events.model import Event

    record = session()
    done = Event("upload.completed", "tenant-a", {"upload_id": record.upload_id})

    async def scenario(store: SessionStore) -> None:
        await store.heartbeat("a")
        lease = await store.create(record, "a")
        await store.update(lease, 1002.0, outbox=[("http://h/1", done)], state="complete")
        stale = Lease(record.upload_id, "a", lease.generation - 1)
        ghost = Event("upload.aborted", "tenant-a", {})
        with pytest.raises(Fenced):
            await store.update(stale, 1003.0, outbox=[("http://h/1", ghost)], state="aborted")
        await store.enqueue([("http://h/2", done)])
        now = done.created_at + 1
        first = await store.due_deliveries(now, 10, 30.0)
        assert [(d.endpoint, d.event_id, d.attempts) for d in first] == [
            ("http://h/1", done.id, 0),
            ("http://h/2", done.id, 0),
        ]
        assert first[0].body == done.body()
        assert await store.due_deliveries(now, 10, 30.0) == []  # claimed
        await store.delivered(first[0].id)
        await store.retry_later(first[1].id, now + 5, 1, "HTTP 500")
        assert await store.due_deliveries(now + 1, 10, 30.0) == []
        again = await store.due_deliveries(now + 31, 10, 30.0)
        assert [(d.id, d.attempts) for d in again] == [(first[1].id, 1)]
        await store.dead_letter(first[1].id, 2, "HTTP 500")
        assert await store.outbox_counts() == {"pending": 0, "delivered": 1, "dead": 1}

    run(scenario, backend)
