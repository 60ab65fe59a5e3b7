"""SessionStore on PostgreSQL (psycopg 3, asyncio pool): one store shared by many replicas.

Selected with `sessions.url = "postgresql://..."`. The schema migrates itself at start-up
(`recgw migrate` does the same by hand) under an advisory lock, so replicas may start together.

Durability. A part counts as committed when the statement that records it has committed, and
every write here is one autocommitted statement (or one transaction). That is only as durable as
the server makes a commit:
- `synchronous_commit = on` (the default; `remote_apply` is fine too): a commit returns only
  once its WAL is flushed. With `off` a crash of the server can forget recent commits, so a
  committed size reported to a client could go backwards; the store warns at start-up.
- `fsync = on` and `full_page_writes = on` (the defaults).
- For failover, a synchronous standby (`synchronous_standby_names` naming at least one standby,
  with `synchronous_commit = on` or `remote_apply`): otherwise promoting an asynchronous standby
  loses the commits it had not received, parts included.

Fencing. Every write names a Lease and checks `holder` and `generation` in the statement that
writes (an UPDATE's WHERE, an INSERT fed by that UPDATE, a row lock taken in the same statement),
so it cannot land after another replica's attach committed. Lease liveness is the holder's
heartbeat row compared with the database's `now()`, never a replica's clock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

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
from recgw_server.sessions.migrations import (
    POSTGRES_MIGRATIONS,
    SCHEMA_MIGRATIONS_TABLE,
    pending,
)

log = logging.getLogger(__name__)

_HOLDER_IS_LIVE = (
    "EXISTS (SELECT 1 FROM replicas r WHERE r.holder = s.holder "
    "AND r.heartbeat_at > now() - make_interval(secs => %(lease_seconds)s))"
)
_LEASED = "upload_id = %(upload_id)s AND holder = %(holder)s AND generation = %(generation)s"
_SESSION_COLUMNS = (
    "upload_id",
    "tenant_id",
    "object_name",
    "key",
    "bucket",
    "content_type",
    "metadata",
    "if_none_match",
    "expected_size",
    "credentials_version",
    "part_base_size",
    "part_growing",
    "growth_interval",
    "state",
    "created_at",
    "updated_at",
    "store_upload_id",
    "committed_size",
    "error_message",
    "result",
    "abort_outcome",
    "holder",
    "generation",
    "compute_sha256",
    "tail",
)
_INSERT_SESSION = (
    f"INSERT INTO sessions ({', '.join(_SESSION_COLUMNS)}) "
    f"VALUES ({', '.join(f'%({c})s' for c in _SESSION_COLUMNS)})"
)
_INSERT_PART = (
    "INSERT INTO parts (upload_id, number, etag, size, crc32c, object_crc32c, sha256_state) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s)"
)
_SYNCHRONOUS_COMMITS = ("on", "remote_apply")


class ImportRefused(Exception):
    """`recgw migrate --from-sqlite` would overwrite sessions that already exist."""


@dataclass(frozen=True)
class ImportReport:
    sessions: int
    parts: int


async def migrate_postgres(conn: psycopg.AsyncConnection[Any]) -> list[int]:
    """Apply the missing migrations in one transaction under an advisory lock.

    Returns the versions applied now (empty when the schema was up to date).
    """
    async with conn.transaction():
        # Held until the transaction ends: concurrent migrators wait, then find nothing to do.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('recgw.schema_migrations'))")
        await conn.execute(
            SCHEMA_MIGRATIONS_TABLE.format(timestamp="TIMESTAMPTZ", now="now()").encode()
        )
        cursor = await conn.execute("SELECT version FROM schema_migrations")
        applied = [int(row[0]) for row in await cursor.fetchall()]
        done = []
        for migration in pending(applied, POSTGRES_MIGRATIONS):
            for statement in migration.statements:
                await conn.execute(statement.encode())
            await conn.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)",
                (migration.version, migration.description),
            )
            done.append(migration.version)
    return done


async def schema_version(conn: psycopg.AsyncConnection[Any]) -> int:
    cursor = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


class PostgresSessionStore:
    """SessionStore on a PostgreSQL database shared by every replica."""

    def __init__(
        self,
        conninfo: str,
        *,
        min_connections: int = 1,
        max_connections: int = 10,
        application_name: str = "recgw",
    ) -> None:
        self.applied_migrations: list[int] = []
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            conninfo,
            min_size=min_connections,
            max_size=max_connections,
            kwargs={"autocommit": True, "application_name": application_name},
            open=False,
            name="recgw-sessions",
        )

    async def open(self) -> None:
        await self.pool.open(wait=True)
        async with self.pool.connection() as conn:
            self.applied_migrations = await migrate_postgres(conn)
            # Every process start adds a replica row; rows this old belong to nobody any more
            # (a missing row counts as a dead replica, as a stale one does).
            await conn.execute(
                "DELETE FROM replicas WHERE heartbeat_at < now() - interval '7 days'"
            )
            cursor = await conn.execute("SHOW synchronous_commit")
            row = await cursor.fetchone()
            if row is not None and row[0] not in _SYNCHRONOUS_COMMITS:
                log.warning(
                    "PostgreSQL synchronous_commit is '%s': a server crash may forget committed "
                    "parts; set it to 'on' (see the README, operating section)",
                    row[0],
                )
        if self.applied_migrations:
            log.info("session store schema migrated: applied %s", self.applied_migrations)

    async def create(self, record: SessionRecord, holder: str) -> Lease:
        row = _to_row(replace(record, holder=holder, generation=1))
        try:
            async with self.pool.connection() as conn:
                await conn.execute(_INSERT_SESSION.encode(), row)
        except psycopg.errors.UniqueViolation:
            raise AlreadyCreated(record.upload_id) from None
        return Lease(record.upload_id, holder, 1)

    async def get(self, upload_id: str) -> SessionRecord | None:
        async with self.pool.connection() as conn, conn.transaction():
            # One snapshot for the session and its parts.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute("SELECT * FROM sessions WHERE upload_id = %s", (upload_id,))
            row = await cursor.fetchone()
            if row is None:
                return None
            await cursor.execute(
                "SELECT * FROM parts WHERE upload_id = %s ORDER BY number", (upload_id,)
            )
            parts = await cursor.fetchall()
        return _from_row(row, parts)

    async def attach(
        self, upload_id: str, holder: str, lease_seconds: float, force: bool = False
    ) -> Lease | None:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "UPDATE sessions AS s SET holder = %(holder)s, generation = s.generation + 1, "
                "release_requested = false WHERE s.upload_id = %(upload_id)s AND (%(force)s "
                f"OR s.holder IS NULL OR s.holder = %(holder)s OR NOT {_HOLDER_IS_LIVE}) "
                "RETURNING s.generation",
                {
                    "holder": holder,
                    "upload_id": upload_id,
                    "force": force,
                    "lease_seconds": lease_seconds,
                },
            )
            row = await cursor.fetchone()
        return None if row is None else Lease(upload_id, holder, int(row[0]))

    async def release(self, lease: Lease) -> bool:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                f"UPDATE sessions SET holder = NULL, release_requested = false WHERE {_LEASED}",
                _lease_params(lease),
            )
        return cursor.rowcount == 1

    async def request_release(self, upload_id: str) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE sessions SET release_requested = true "
                "WHERE upload_id = %s AND holder IS NOT NULL",
                (upload_id,),
            )

    async def release_requested(self, holder: str) -> list[str]:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT upload_id FROM sessions WHERE holder = %s AND release_requested",
                (holder,),
            )
            return [str(row[0]) for row in await cursor.fetchall()]

    async def heartbeat(self, holder: str) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO replicas (holder, heartbeat_at) VALUES (%s, now()) "
                "ON CONFLICT (holder) DO UPDATE SET heartbeat_at = now()",
                (holder,),
            )

    async def save_part(
        self, lease: Lease, part: PartRecord, committed_size: int, updated_at: float
    ) -> None:
        # The part is inserted only from the row the lease-checked UPDATE returned.
        statement = f"""
            WITH leased AS (
                UPDATE sessions SET committed_size = %(committed_size)s,
                    updated_at = %(updated_at)s
                WHERE {_LEASED}
                RETURNING upload_id
            )
            INSERT INTO parts (upload_id, number, etag, size, crc32c, object_crc32c, sha256_state)
            SELECT upload_id, %(number)s, %(etag)s, %(size)s, %(crc32c)s, %(object_crc32c)s,
                %(sha256_state)s
            FROM leased
            ON CONFLICT (upload_id, number) DO UPDATE SET etag = excluded.etag,
                size = excluded.size, crc32c = excluded.crc32c,
                object_crc32c = excluded.object_crc32c, sha256_state = excluded.sha256_state
            RETURNING number
        """
        params = {
            **_lease_params(lease),
            "committed_size": committed_size,
            "updated_at": updated_at,
            "number": part.number,
            "etag": part.etag,
            "size": part.size,
            "crc32c": part.crc32c,
            "object_crc32c": part.object_crc32c,
            "sha256_state": part.sha256_state,
        }
        async with self.pool.connection() as conn:
            cursor = await conn.execute(statement.encode(), params)
            if await cursor.fetchone() is None:
                raise Fenced(lease)

    async def drop_parts_after(self, lease: Lease, number: int) -> None:
        # The row lock makes a concurrent attach wait, or makes this statement see its result.
        statement = f"""
            WITH leased AS (
                SELECT upload_id FROM sessions WHERE {_LEASED} FOR NO KEY UPDATE
            ), dropped AS (
                DELETE FROM parts WHERE upload_id IN (SELECT upload_id FROM leased)
                    AND number > %(number)s
                RETURNING 1
            )
            SELECT count(*) FROM leased
        """
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                statement.encode(), {**_lease_params(lease), "number": number}
            )
            row = await cursor.fetchone()
        if row is None or row[0] != 1:
            raise Fenced(lease)

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
        if fields.get("result") is not None:
            fields["result"] = Jsonb(fields["result"])
        if fields.get("tail") is not None:
            fields["tail"] = Jsonb(json.loads(part_json(fields["tail"])))
        assignments = "".join(f"{name} = %({name})s, " for name in fields)
        # Field names are checked against UPDATABLE_FIELDS above, never taken from input.
        statement = f"UPDATE sessions SET {assignments}updated_at = %(updated_at)s WHERE {_LEASED}"
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                statement.encode(), {**fields, **_lease_params(lease), "updated_at": updated_at}
            )
            if cursor.rowcount != 1:
                raise Fenced(lease)  # rolls back: no event for a change that did not happen
            # The state change and the events that report it, in one transaction.
            await _insert_outbox(conn, outbox)

    async def enqueue(self, outbox: Sequence[tuple[str, Event]]) -> None:
        async with self.pool.connection() as conn, conn.transaction():
            await _insert_outbox(conn, outbox)

    async def due_deliveries(self, now: float, limit: int, claim_for: float) -> list[Delivery]:
        async with self.pool.connection() as conn:
            # SKIP LOCKED: replicas polling at once claim disjoint deliveries.
            cursor = await conn.execute(
                "UPDATE outbox SET next_attempt_at = %s WHERE id IN (SELECT id FROM outbox "
                "WHERE status = 'pending' AND next_attempt_at <= %s ORDER BY id LIMIT %s "
                "FOR UPDATE SKIP LOCKED) RETURNING id, endpoint, event_id, body, attempts",
                (now + claim_for, now, limit),
            )
            rows = await cursor.fetchall()
        return sorted(
            (Delivery(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows), key=lambda d: d.id
        )

    async def delivered(self, delivery_id: int) -> None:
        await self._outbox_write(
            "UPDATE outbox SET status = 'delivered', attempts = attempts + 1 WHERE id = %s",
            (delivery_id,),
        )

    async def retry_later(
        self, delivery_id: int, next_attempt_at: float, attempts: int, error: str
    ) -> None:
        await self._outbox_write(
            "UPDATE outbox SET next_attempt_at = %s, attempts = %s, last_error = %s WHERE id = %s",
            (next_attempt_at, attempts, error, delivery_id),
        )

    async def dead_letter(self, delivery_id: int, attempts: int, error: str) -> None:
        await self._outbox_write(
            "UPDATE outbox SET status = 'dead', attempts = %s, last_error = %s WHERE id = %s",
            (attempts, error, delivery_id),
        )

    async def outbox_counts(self) -> dict[str, int]:
        async with self.pool.connection() as conn:
            cursor = await conn.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status")
            rows = await cursor.fetchall()
        return {"pending": 0, "delivered": 0, "dead": 0, **{r[0]: int(r[1]) for r in rows}}

    async def _outbox_write(self, statement: str, values: tuple[Any, ...]) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(statement.encode(), values)

    async def idle(self, states: Iterable[str], updated_before: float) -> list[str]:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT upload_id FROM sessions WHERE state = ANY(%s) AND updated_at < %s",
                (list(states), updated_before),
            )
            return [str(row[0]) for row in await cursor.fetchall()]

    async def claim_idle(
        self,
        states: Iterable[str],
        updated_before: float,
        holder: str,
        lease_seconds: float,
        limit: int,
    ) -> list[Lease]:
        # SKIP LOCKED: rows another replica is claiming (or writing) right now are left to it.
        statement = f"""
            UPDATE sessions SET holder = %(holder)s, generation = generation + 1,
                release_requested = false
            WHERE upload_id IN (
                SELECT upload_id FROM sessions AS s
                WHERE state = ANY(%(states)s) AND updated_at < %(updated_before)s
                    AND (holder IS NULL OR NOT {_HOLDER_IS_LIVE})
                ORDER BY updated_at
                LIMIT %(limit)s
                FOR NO KEY UPDATE SKIP LOCKED
            )
            RETURNING upload_id, generation
        """
        params = {
            "holder": holder,
            "states": list(states),
            "updated_before": updated_before,
            "lease_seconds": lease_seconds,
            "limit": limit,
        }
        async with self.pool.connection() as conn:
            cursor = await conn.execute(statement.encode(), params)
            rows = await cursor.fetchall()
        return [Lease(str(row[0]), holder, int(row[1])) for row in rows]

    async def import_sessions(self, records: Sequence[SessionRecord]) -> ImportReport:
        """Copy sessions (with their parts) in one transaction; refuse if any already exists.

        Imported sessions have no lease holder: any replica may attach to them.
        """
        ids = [r.upload_id for r in records]
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "SELECT upload_id FROM sessions WHERE upload_id = ANY(%s) ORDER BY upload_id",
                (ids,),
            )
            existing = [str(row[0]) for row in await cursor.fetchall()]
            if existing:
                raise ImportRefused(
                    f"{len(existing)} of the {len(ids)} sessions already exist in PostgreSQL "
                    f"(first: {existing[0]}); nothing was copied"
                )
            async with conn.cursor() as writer:
                await writer.executemany(
                    _INSERT_SESSION.encode(), [_to_row(replace(r, holder="")) for r in records]
                )
                parts = [
                    (
                        r.upload_id,
                        p.number,
                        p.etag,
                        p.size,
                        p.crc32c,
                        p.object_crc32c,
                        p.sha256_state,
                    )
                    for r in records
                    for p in r.parts
                ]
                await writer.executemany(_INSERT_PART, parts)
        return ImportReport(len(records), len(parts))

    async def close(self) -> None:
        await self.pool.close()


def _lease_params(lease: Lease) -> dict[str, Any]:
    return {"upload_id": lease.upload_id, "holder": lease.holder, "generation": lease.generation}


def _to_row(record: SessionRecord) -> dict[str, Any]:
    return {
        "upload_id": record.upload_id,
        "tenant_id": record.tenant_id,
        "object_name": record.object_name,
        "key": record.key,
        "bucket": record.bucket,
        "content_type": record.content_type,
        "metadata": Jsonb(dict(record.metadata)),
        "if_none_match": record.if_none_match,
        "expected_size": record.expected_size,
        "credentials_version": record.credentials_version,
        "part_base_size": record.part_base_size,
        "part_growing": record.part_growing,
        "growth_interval": record.growth_interval,
        "state": record.state,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "store_upload_id": record.store_upload_id,
        "committed_size": record.committed_size,
        "error_message": record.error_message,
        "result": Jsonb(dict(record.result)) if record.result is not None else None,
        "abort_outcome": record.abort_outcome,
        "holder": record.holder or None,
        "generation": record.generation,
        "compute_sha256": record.compute_sha256,
        "tail": Jsonb(json.loads(part_json(record.tail))) if record.tail is not None else None,
    }


async def _insert_outbox(
    conn: psycopg.AsyncConnection[Any], outbox: Sequence[tuple[str, Event]]
) -> None:
    if not outbox:
        return
    async with conn.cursor() as cursor:
        await cursor.executemany(
            "INSERT INTO outbox (endpoint, event_id, body, created_at, next_attempt_at) "
            "VALUES (%s, %s, %s, %s, %s)",
            [(url, e.id, e.body(), e.created_at, e.created_at) for url, e in outbox],
        )


def _from_row(row: Mapping[str, Any], parts: Iterable[Mapping[str, Any]]) -> SessionRecord:
    return SessionRecord(
        upload_id=row["upload_id"],
        tenant_id=row["tenant_id"],
        object_name=row["object_name"],
        key=row["key"],
        bucket=row["bucket"],
        content_type=row["content_type"],
        metadata=dict(row["metadata"]),
        if_none_match=row["if_none_match"],
        expected_size=row["expected_size"],
        credentials_version=row["credentials_version"],
        part_base_size=row["part_base_size"],
        part_growing=row["part_growing"],
        growth_interval=row["growth_interval"],
        state=row["state"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        store_upload_id=row["store_upload_id"],
        committed_size=row["committed_size"],
        error_message=row["error_message"],
        result=row["result"],
        abort_outcome=row["abort_outcome"],
        holder=row["holder"] or "",
        generation=row["generation"],
        compute_sha256=row["compute_sha256"],
        tail=part_from_json(row["tail"]) if row["tail"] else None,
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
