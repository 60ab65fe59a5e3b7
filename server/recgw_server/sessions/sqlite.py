"""SessionStore in one SQLite file: the embedded default for single-box deployments.

One gateway process uses the file: opening it voids the leases of earlier processes, and
heartbeats use the process clock. Every write runs in a `BEGIN IMMEDIATE` transaction whose
statements carry the lease check themselves.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from recgw_server.events.model import Delivery, Event
from recgw_server.sessions.base import (
    UPDATABLE_FIELDS,
    AlreadyCreated,
    Fenced,
    Lease,
    PartRecord,
    SessionRecord,
    part_from_json,
    part_json,
)
from recgw_server.sessions.migrations import SCHEMA_MIGRATIONS_TABLE, SQLITE_MIGRATIONS, pending

T = TypeVar("T")

# A lease is "held" when the holder's heartbeat is newer than the lease time.
_HOLDER_IS_LIVE = (
    "EXISTS (SELECT 1 FROM replicas r WHERE r.holder = s.holder AND r.heartbeat_at > ?)"
)
_LEASED = "upload_id = ? AND holder = ? AND generation = ?"


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that holds SQLite's write lock from its first statement."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def migrate_sqlite(db: sqlite3.Connection) -> list[int]:
    """Apply the missing SQLite migrations; returns the versions applied now."""
    with _transaction(db):
        db.execute(SCHEMA_MIGRATIONS_TABLE.format(timestamp="TEXT", now="CURRENT_TIMESTAMP"))
        applied = [row[0] for row in db.execute("SELECT version FROM schema_migrations")]
        done = []
        for migration in pending(applied, SQLITE_MIGRATIONS):
            for statement in migration.statements:
                db.execute(statement)
            db.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (?, ?)",
                (migration.version, migration.description),
            )
            done.append(migration.version)
    return done


def connect_sqlite(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # a committed part must survive a power cut
    db.execute("PRAGMA foreign_keys=ON")
    return db


class SqliteSessionStore:
    """SessionStore in one SQLite file, used from one dedicated thread (WAL, synchronous=FULL)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recgw-sessions")
        self._db: sqlite3.Connection | None = None
        self.applied_migrations: list[int] = self._executor.submit(self._open).result()

    def _open(self) -> list[int]:
        db = connect_sqlite(self.path)
        try:
            applied = migrate_sqlite(db)
            # The file belongs to one process, this one: leases of earlier processes are void.
            with _transaction(db):
                db.execute("UPDATE sessions SET holder = NULL, release_requested = 0")
                db.execute("DELETE FROM replicas")
        except BaseException:
            db.close()
            raise
        db.row_factory = sqlite3.Row
        self._db = db
        return applied

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._db is not None, "session store is closed"
            return fn(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self) -> None:
        """Nothing to do: the schema was brought up to date when the file was opened."""

    async def create(self, record: SessionRecord, holder: str) -> Lease:
        row = _to_row(record)
        row.update(holder=holder, generation=1, release_requested=0)
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)

        # Column names come from _to_row, never from input.
        statement = f"INSERT INTO sessions ({columns}) VALUES ({marks})"

        def insert(db: sqlite3.Connection) -> None:
            try:
                with _transaction(db):
                    db.execute(statement, tuple(row.values()))
            except sqlite3.IntegrityError as exc:
                if exc.sqlite_errorname != "SQLITE_CONSTRAINT_PRIMARYKEY":
                    raise
                raise AlreadyCreated(record.upload_id) from None

        await self._run(insert)
        return Lease(record.upload_id, holder, 1)

    async def get(self, upload_id: str) -> SessionRecord | None:
        def read(db: sqlite3.Connection) -> SessionRecord | None:
            row = db.execute("SELECT * FROM sessions WHERE upload_id = ?", (upload_id,)).fetchone()
            if row is None:
                return None
            parts = db.execute(
                "SELECT * FROM parts WHERE upload_id = ? ORDER BY number", (upload_id,)
            ).fetchall()
            return record_from_sqlite_row(row, parts)

        return await self._run(read)

    async def attach(
        self, upload_id: str, holder: str, lease_seconds: float, force: bool = False
    ) -> Lease | None:
        def take(db: sqlite3.Connection) -> Lease | None:
            with _transaction(db):
                row = db.execute(
                    "UPDATE sessions AS s SET holder = ?, generation = generation + 1, "
                    "release_requested = 0 WHERE upload_id = ? AND (? OR holder IS NULL "
                    f"OR holder = ? OR NOT {_HOLDER_IS_LIVE}) RETURNING generation",
                    (holder, upload_id, force, holder, self._clock() - lease_seconds),
                ).fetchone()
            return None if row is None else Lease(upload_id, holder, int(row[0]))

        return await self._run(take)

    async def release(self, lease: Lease) -> bool:
        def give_up(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                cursor = db.execute(
                    f"UPDATE sessions SET holder = NULL, release_requested = 0 WHERE {_LEASED}",
                    (lease.upload_id, lease.holder, lease.generation),
                )
            return cursor.rowcount == 1

        return await self._run(give_up)

    async def request_release(self, upload_id: str) -> None:
        def ask(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute(
                    "UPDATE sessions SET release_requested = 1 "
                    "WHERE upload_id = ? AND holder IS NOT NULL",
                    (upload_id,),
                )

        await self._run(ask)

    async def release_requested(self, holder: str) -> list[str]:
        def query(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT upload_id FROM sessions WHERE holder = ? AND release_requested = 1",
                (holder,),
            ).fetchall()
            return [str(row[0]) for row in rows]

        return await self._run(query)

    async def heartbeat(self, holder: str) -> None:
        def beat(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute(
                    "INSERT INTO replicas (holder, heartbeat_at) VALUES (?, ?) "
                    "ON CONFLICT (holder) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                    (holder, self._clock()),
                )

        await self._run(beat)

    async def save_part(
        self, lease: Lease, part: PartRecord, committed_size: int, updated_at: float
    ) -> None:
        leased = (lease.upload_id, lease.holder, lease.generation)

        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                cursor = db.execute(
                    "INSERT OR REPLACE INTO parts SELECT ?, ?, ?, ?, ?, ?, ? "
                    f"WHERE EXISTS (SELECT 1 FROM sessions WHERE {_LEASED})",
                    (
                        lease.upload_id,
                        part.number,
                        part.etag,
                        part.size,
                        part.crc32c,
                        part.object_crc32c,
                        part.sha256_state,
                        *leased,
                    ),
                )
                if cursor.rowcount != 1:
                    raise Fenced(lease)
                db.execute(
                    f"UPDATE sessions SET committed_size = ?, updated_at = ? WHERE {_LEASED}",
                    (committed_size, updated_at, *leased),
                )

        await self._run(write)

    async def drop_parts_after(self, lease: Lease, number: int) -> None:
        leased = (lease.upload_id, lease.holder, lease.generation)

        def delete(db: sqlite3.Connection) -> None:
            with _transaction(db):
                if db.execute(f"SELECT 1 FROM sessions WHERE {_LEASED}", leased).fetchone() is None:
                    raise Fenced(lease)
                db.execute(
                    "DELETE FROM parts WHERE number > ? AND upload_id = "
                    f"(SELECT upload_id FROM sessions WHERE {_LEASED})",
                    (number, *leased),
                )

        await self._run(delete)

    async def update(
        self,
        lease: Lease,
        updated_at: float,
        outbox: Sequence[tuple[str, Event]] = (),
        **fields: Any,
    ) -> None:
        unknown = set(fields) - UPDATABLE_FIELDS
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        if "tail" in fields and fields["tail"] is not None:
            fields["tail"] = part_json(fields["tail"])
        assignments = "".join(f"{name} = ?, " for name in fields)
        # Field names are checked against UPDATABLE_FIELDS above, never taken from input.
        statement = f"UPDATE sessions SET {assignments}updated_at = ? WHERE {_LEASED}"

        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                cursor = db.execute(
                    statement,
                    (*fields.values(), updated_at, lease.upload_id, lease.holder, lease.generation),
                )
                if cursor.rowcount != 1:
                    raise Fenced(lease)
                # The state change and the events that report it, in one transaction.
                _insert_outbox(db, outbox)

        await self._run(write)

    async def enqueue(self, outbox: Sequence[tuple[str, Event]]) -> None:
        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                _insert_outbox(db, outbox)

        await self._run(write)

    async def due_deliveries(self, now: float, limit: int, claim_for: float) -> list[Delivery]:
        def claim(db: sqlite3.Connection) -> list[Delivery]:
            with _transaction(db):
                rows = db.execute(
                    "UPDATE outbox SET next_attempt_at = ? WHERE id IN (SELECT id FROM outbox "
                    "WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?) "
                    "RETURNING id, endpoint, event_id, body, attempts",
                    (now + claim_for, now, limit),
                ).fetchall()
            return sorted(
                (Delivery(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows), key=lambda d: d.id
            )

        return await self._run(claim)

    async def delivered(self, delivery_id: int) -> None:
        await self._outbox_write(
            "UPDATE outbox SET status = 'delivered', attempts = attempts + 1 WHERE id = ?",
            (delivery_id,),
        )

    async def retry_later(
        self, delivery_id: int, next_attempt_at: float, attempts: int, error: str
    ) -> None:
        await self._outbox_write(
            "UPDATE outbox SET next_attempt_at = ?, attempts = ?, last_error = ? WHERE id = ?",
            (next_attempt_at, attempts, error, delivery_id),
        )

    async def dead_letter(self, delivery_id: int, attempts: int, error: str) -> None:
        await self._outbox_write(
            "UPDATE outbox SET status = 'dead', attempts = ?, last_error = ? WHERE id = ?",
            (attempts, error, delivery_id),
        )

    async def outbox_counts(self) -> dict[str, int]:
        def count(db: sqlite3.Connection) -> dict[str, int]:
            rows = db.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall()
            return {"pending": 0, "delivered": 0, "dead": 0, **{r[0]: r[1] for r in rows}}

        return await self._run(count)

    async def _outbox_write(self, statement: str, values: tuple[Any, ...]) -> None:
        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute(statement, values)

        await self._run(write)

    async def idle(self, states: Iterable[str], updated_before: float) -> list[str]:
        wanted = tuple(states)
        marks = ", ".join("?" for _ in wanted)

        def query(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                f"SELECT upload_id FROM sessions WHERE state IN ({marks}) AND updated_at < ?",
                (*wanted, updated_before),
            ).fetchall()
            return [str(row[0]) for row in rows]

        return await self._run(query)

    async def claim_idle(
        self,
        states: Iterable[str],
        updated_before: float,
        holder: str,
        lease_seconds: float,
        limit: int,
    ) -> list[Lease]:
        wanted = tuple(states)
        marks = ", ".join("?" for _ in wanted)

        def claim(db: sqlite3.Connection) -> list[Lease]:
            with _transaction(db):
                rows = db.execute(
                    "UPDATE sessions SET holder = ?, generation = generation + 1, "
                    "release_requested = 0 WHERE upload_id IN (SELECT upload_id FROM sessions AS s "
                    f"WHERE state IN ({marks}) AND updated_at < ? AND (holder IS NULL OR NOT "
                    f"{_HOLDER_IS_LIVE}) ORDER BY updated_at LIMIT ?) "
                    "RETURNING upload_id, generation",
                    (holder, *wanted, updated_before, self._clock() - lease_seconds, limit),
                ).fetchall()
            return [Lease(str(row[0]), holder, int(row[1])) for row in rows]

        return await self._run(claim)

    async def close(self) -> None:
        def close(db: sqlite3.Connection) -> None:
            db.close()
            self._db = None

        if self._db is not None:
            await self._run(close)
        self._executor.shutdown(wait=True)


def _to_row(record: SessionRecord) -> dict[str, Any]:
    return {
        "upload_id": record.upload_id,
        "tenant_id": record.tenant_id,
        "object_name": record.object_name,
        "key": record.key,
        "bucket": record.bucket,
        "content_type": record.content_type,
        "metadata": json.dumps(dict(record.metadata), sort_keys=True),
        "if_none_match": int(record.if_none_match),
        "expected_size": record.expected_size,
        "credentials_version": record.credentials_version,
        "part_base_size": record.part_base_size,
        "part_growing": int(record.part_growing),
        "growth_interval": record.growth_interval,
        "state": record.state,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "store_upload_id": record.store_upload_id,
        "committed_size": record.committed_size,
        "error_message": record.error_message,
        "result": json.dumps(record.result) if record.result is not None else None,
        "abort_outcome": record.abort_outcome,
        "compute_sha256": int(record.compute_sha256),
        "tail": part_json(record.tail) if record.tail is not None else None,
    }


def _insert_outbox(db: sqlite3.Connection, outbox: Sequence[tuple[str, Event]]) -> None:
    db.executemany(
        "INSERT INTO outbox (endpoint, event_id, body, created_at, next_attempt_at) "
        "VALUES (?, ?, ?, ?, ?)",
        [(url, e.id, e.body(), e.created_at, e.created_at) for url, e in outbox],
    )


def record_from_sqlite_row(
    row: sqlite3.Row | dict[str, Any], parts: Iterable[sqlite3.Row | dict[str, Any]]
) -> SessionRecord:
    """A SessionRecord from SQLite rows (also rows of a schema before leases)."""
    columns = row.keys()
    record = SessionRecord(
        upload_id=row["upload_id"],
        tenant_id=row["tenant_id"],
        object_name=row["object_name"],
        key=row["key"],
        bucket=row["bucket"],
        content_type=row["content_type"],
        metadata=json.loads(row["metadata"]),
        if_none_match=bool(row["if_none_match"]),
        expected_size=row["expected_size"],
        credentials_version=row["credentials_version"],
        part_base_size=row["part_base_size"],
        part_growing=bool(row["part_growing"]),
        growth_interval=row["growth_interval"],
        state=row["state"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        store_upload_id=row["store_upload_id"],
        committed_size=row["committed_size"],
        error_message=row["error_message"],
        result=json.loads(row["result"]) if row["result"] else None,
        abort_outcome=row["abort_outcome"],
        holder=(row["holder"] or "") if "holder" in columns else "",
        generation=row["generation"] if "generation" in columns else 0,
        compute_sha256=bool(row["compute_sha256"]) if "compute_sha256" in columns else True,
        tail=part_from_json(row["tail"]) if "tail" in columns and row["tail"] else None,
    )
    return replace(
        record,
        parts=tuple(
            PartRecord(
                number=p["number"],
                etag=p["etag"],
                size=p["size"],
                crc32c=p["crc32c"],
                object_crc32c=p["object_crc32c"],
                sha256_state=bytes(p["sha256_state"]),
            )
            for p in parts
        ),
    )


def read_sqlite_sessions(path: Path) -> list[SessionRecord]:
    """Every session with its parts, read without changing the file (for copying elsewhere)."""
    if not path.is_file():
        raise FileNotFoundError(f"no SQLite session store at {path}")
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        parts: dict[str, list[sqlite3.Row]] = {}
        for part in db.execute("SELECT * FROM parts ORDER BY upload_id, number"):
            parts.setdefault(part["upload_id"], []).append(part)
        return [
            record_from_sqlite_row(row, parts.get(row["upload_id"], []))
            for row in db.execute("SELECT * FROM sessions ORDER BY created_at, upload_id")
        ]
    finally:
        db.close()
