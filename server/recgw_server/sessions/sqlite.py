"""SessionStore in one SQLite file: the embedded default for single-box deployments."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from recgw_server.events.model import Delivery, Event
from recgw_server.sessions.base import PartRecord, SessionRecord

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    upload_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    object_name TEXT NOT NULL,
    key TEXT NOT NULL,
    bucket TEXT NOT NULL,
    content_type TEXT NOT NULL,
    metadata TEXT NOT NULL,
    if_none_match INTEGER NOT NULL,
    expected_size INTEGER,
    credentials_version INTEGER NOT NULL,
    part_base_size INTEGER NOT NULL,
    part_growing INTEGER NOT NULL,
    growth_interval INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    store_upload_id TEXT NOT NULL DEFAULT '',
    committed_size INTEGER NOT NULL DEFAULT 0,
    error_message TEXT NOT NULL DEFAULT '',
    result TEXT,
    abort_outcome TEXT NOT NULL DEFAULT '',
    compute_sha256 INTEGER NOT NULL DEFAULT 1,
    tail TEXT
);
CREATE INDEX IF NOT EXISTS sessions_by_state ON sessions (state, updated_at);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint TEXT NOT NULL,
    event_id TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, next_attempt_at);
CREATE TABLE IF NOT EXISTS parts (
    upload_id TEXT NOT NULL REFERENCES sessions (upload_id) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    etag TEXT NOT NULL,
    size INTEGER NOT NULL,
    crc32c INTEGER NOT NULL,
    object_crc32c INTEGER NOT NULL,
    sha256_state BLOB NOT NULL,
    PRIMARY KEY (upload_id, number)
);
"""
_UPDATABLE = {
    "tail",
    "state",
    "store_upload_id",
    "committed_size",
    "error_message",
    "result",
    "abort_outcome",
}


class SqliteSessionStore:
    """SessionStore in one SQLite file, used from one dedicated thread (WAL, synchronous=FULL)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recgw-sessions")
        self._db: sqlite3.Connection | None = None
        self._executor.submit(self._open).result()

    def _open(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a committed part must survive a power cut
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
        if "compute_sha256" not in columns:  # data dirs from before SHA-256 became optional
            db.execute("ALTER TABLE sessions ADD COLUMN compute_sha256 INTEGER NOT NULL DEFAULT 1")
        self._db = db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._db is not None, "session store is closed"
            return fn(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def create(self, record: SessionRecord) -> None:
        row = _to_row(record)
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)

        # Column names come from _to_row, never from input.
        statement = f"INSERT INTO sessions ({columns}) VALUES ({marks})"  # noqa: S608

        def insert(db: sqlite3.Connection) -> None:
            with db:
                db.execute(statement, tuple(row.values()))

        await self._run(insert)

    async def get(self, upload_id: str) -> SessionRecord | None:
        def read(db: sqlite3.Connection) -> SessionRecord | None:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM sessions WHERE upload_id = ?", (upload_id,)).fetchone()
            if row is None:
                return None
            parts = db.execute(
                "SELECT * FROM parts WHERE upload_id = ? ORDER BY number", (upload_id,)
            ).fetchall()
            return _from_row(row, parts)

        return await self._run(read)

    async def save_part(
        self, upload_id: str, part: PartRecord, committed_size: int, updated_at: float
    ) -> None:
        def write(db: sqlite3.Connection) -> None:
            with db:
                db.execute(
                    "INSERT OR REPLACE INTO parts VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        upload_id,
                        part.number,
                        part.etag,
                        part.size,
                        part.crc32c,
                        part.object_crc32c,
                        part.sha256_state,
                    ),
                )
                db.execute(
                    "UPDATE sessions SET committed_size = ?, updated_at = ? WHERE upload_id = ?",
                    (committed_size, updated_at, upload_id),
                )

        await self._run(write)

    async def drop_parts_after(self, upload_id: str, number: int) -> None:
        def delete(db: sqlite3.Connection) -> None:
            with db:
                db.execute(
                    "DELETE FROM parts WHERE upload_id = ? AND number > ?", (upload_id, number)
                )

        await self._run(delete)

    async def update(
        self,
        upload_id: str,
        updated_at: float,
        outbox: Sequence[tuple[str, Event]] = (),
        **fields: Any,
    ) -> None:
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        if "tail" in fields and fields["tail"] is not None:
            fields["tail"] = _part_json(fields["tail"])
        assignments = ", ".join(f"{name} = ?" for name in fields)

        def write(db: sqlite3.Connection) -> None:
            with db:  # the state change and the events that report it, in one transaction
                db.execute(
                    f"UPDATE sessions SET {assignments}, updated_at = ? WHERE upload_id = ?",  # noqa: S608
                    (*fields.values(), updated_at, upload_id),
                )
                _insert_outbox(db, outbox)

        await self._run(write)

    async def enqueue(self, outbox: Sequence[tuple[str, Event]]) -> None:
        def write(db: sqlite3.Connection) -> None:
            with db:
                _insert_outbox(db, outbox)

        await self._run(write)

    async def due_deliveries(
        self, now: float, limit: int, claim_for: float = 60.0
    ) -> list[Delivery]:
        def claim(db: sqlite3.Connection) -> list[Delivery]:
            with db:
                rows = db.execute(
                    "SELECT id, endpoint, event_id, body, attempts FROM outbox "
                    "WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?",
                    (now, limit),
                ).fetchall()
                # Claimed: nobody else takes them until this attempt has had its time.
                db.executemany(
                    "UPDATE outbox SET next_attempt_at = ? WHERE id = ?",
                    [(now + claim_for, row[0]) for row in rows],
                )
            return [Delivery(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows]

        return await self._run(claim)

    async def delivered(self, delivery_id: int) -> None:
        await self._outbox_update(
            "UPDATE outbox SET status = 'delivered', attempts = attempts + 1 WHERE id = ?",
            (delivery_id,),
        )

    async def retry_later(
        self, delivery_id: int, next_attempt_at: float, attempts: int, error: str
    ) -> None:
        await self._outbox_update(
            "UPDATE outbox SET next_attempt_at = ?, attempts = ?, last_error = ? WHERE id = ?",
            (next_attempt_at, attempts, error, delivery_id),
        )

    async def dead_letter(self, delivery_id: int, attempts: int, error: str) -> None:
        await self._outbox_update(
            "UPDATE outbox SET status = 'dead', attempts = ?, last_error = ? WHERE id = ?",
            (attempts, error, delivery_id),
        )

    async def outbox_counts(self) -> dict[str, int]:
        def count(db: sqlite3.Connection) -> dict[str, int]:
            rows = db.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall()
            counts = {"pending": 0, "delivered": 0, "dead": 0}
            counts.update({str(r[0]): int(r[1]) for r in rows})
            return counts

        return await self._run(count)

    async def _outbox_update(self, statement: str, values: tuple[Any, ...]) -> None:
        def write(db: sqlite3.Connection) -> None:
            with db:
                db.execute(statement, values)

        await self._run(write)

    async def idle(self, states: Iterable[str], updated_before: float) -> list[str]:
        wanted = tuple(states)
        marks = ", ".join("?" for _ in wanted)

        def query(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                f"SELECT upload_id FROM sessions WHERE state IN ({marks}) AND updated_at < ?",  # noqa: S608
                (*wanted, updated_before),
            ).fetchall()
            return [str(row[0]) for row in rows]

        return await self._run(query)

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
        "tail": _part_json(record.tail) if record.tail is not None else None,
    }


def _insert_outbox(db: sqlite3.Connection, outbox: Sequence[tuple[str, Event]]) -> None:
    db.executemany(
        "INSERT INTO outbox (endpoint, event_id, body, created_at, next_attempt_at) "
        "VALUES (?, ?, ?, ?, ?)",
        [(url, e.id, e.body(), e.created_at, e.created_at) for url, e in outbox],
    )


def _part_json(part: PartRecord) -> str:
    return json.dumps(
        {
            "number": part.number,
            "etag": part.etag,
            "size": part.size,
            "crc32c": part.crc32c,
            "object_crc32c": part.object_crc32c,
            "sha256_state": part.sha256_state.hex(),
        }
    )


def _part_from_json(text: str) -> PartRecord:
    data = json.loads(text)
    return PartRecord(
        number=data["number"],
        etag=data["etag"],
        size=data["size"],
        crc32c=data["crc32c"],
        object_crc32c=data["object_crc32c"],
        sha256_state=bytes.fromhex(data["sha256_state"]),
    )


def _from_row(row: sqlite3.Row, parts: list[sqlite3.Row]) -> SessionRecord:
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
        compute_sha256=bool(row["compute_sha256"]),
        tail=_part_from_json(row["tail"]) if row["tail"] else None,
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
