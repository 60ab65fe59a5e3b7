"""Numbered schema migrations for both session stores.

Each store keeps the versions it applied in a `schema_migrations` table and applies the missing
ones in order, all in one transaction under a lock (a PostgreSQL advisory lock, SQLite's write
lock), so several replicas starting at once apply every step exactly once. Steps are only ever
appended; a released step is never edited.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


def pending(applied: Iterable[int], migrations: Sequence[Migration]) -> list[Migration]:
    """The migrations not applied yet, in order."""
    done = set(applied)
    return [m for m in migrations if m.version not in done]


SCHEMA_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at {timestamp} NOT NULL DEFAULT {now}
)
"""

POSTGRES_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "sessions and parts",
        (
            """
            CREATE TABLE sessions (
                upload_id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL,
                object_name TEXT NOT NULL,
                key TEXT NOT NULL,
                bucket TEXT NOT NULL,
                content_type TEXT NOT NULL,
                metadata JSONB NOT NULL,
                if_none_match BOOLEAN NOT NULL,
                expected_size BIGINT,
                credentials_version BIGINT NOT NULL,
                part_base_size BIGINT NOT NULL,
                part_growing BOOLEAN NOT NULL,
                growth_interval INTEGER NOT NULL,
                state TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                store_upload_id TEXT NOT NULL DEFAULT '',
                committed_size BIGINT NOT NULL DEFAULT 0,
                error_message TEXT NOT NULL DEFAULT '',
                result JSONB,
                abort_outcome TEXT NOT NULL DEFAULT ''
            )
            """,
            "CREATE INDEX sessions_by_state ON sessions (state, updated_at)",
            """
            CREATE TABLE parts (
                upload_id TEXT NOT NULL REFERENCES sessions (upload_id) ON DELETE CASCADE,
                number INTEGER NOT NULL,
                etag TEXT NOT NULL,
                size BIGINT NOT NULL,
                crc32c BIGINT NOT NULL,
                object_crc32c BIGINT NOT NULL,
                sha256_state BYTEA NOT NULL,
                PRIMARY KEY (upload_id, number)
            )
            """,
        ),
    ),
    Migration(
        2,
        "writer leases, fencing tokens and replica heartbeats",
        (
            "ALTER TABLE sessions ADD COLUMN holder TEXT",
            "ALTER TABLE sessions ADD COLUMN generation BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE sessions ADD COLUMN release_requested BOOLEAN NOT NULL DEFAULT false",
            "CREATE INDEX sessions_by_holder ON sessions (holder) WHERE holder IS NOT NULL",
            """
            CREATE TABLE replicas (
                holder TEXT PRIMARY KEY,
                heartbeat_at TIMESTAMPTZ NOT NULL
            )
            """,
        ),
    ),
    Migration(
        3,
        "optional SHA-256, kept tails for salvage, the event outbox",
        (
            "ALTER TABLE sessions ADD COLUMN compute_sha256 BOOLEAN NOT NULL DEFAULT true",
            "ALTER TABLE sessions ADD COLUMN tail JSONB",
            """
            CREATE TABLE outbox (
                id BIGSERIAL PRIMARY KEY,
                endpoint TEXT NOT NULL,
                event_id TEXT NOT NULL,
                body BYTEA NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                next_attempt_at DOUBLE PRECISION NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                status TEXT NOT NULL DEFAULT 'pending',
                last_error TEXT NOT NULL DEFAULT ''
            )
            """,
            "CREATE INDEX outbox_due ON outbox (status, next_attempt_at)",
        ),
    ),
)

SQLITE_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "sessions and parts",
        # IF NOT EXISTS: data dirs from before schema versioning already have these tables.
        (
            """
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
                abort_outcome TEXT NOT NULL DEFAULT ''
            )
            """,
            "CREATE INDEX IF NOT EXISTS sessions_by_state ON sessions (state, updated_at)",
            """
            CREATE TABLE IF NOT EXISTS parts (
                upload_id TEXT NOT NULL REFERENCES sessions (upload_id) ON DELETE CASCADE,
                number INTEGER NOT NULL,
                etag TEXT NOT NULL,
                size INTEGER NOT NULL,
                crc32c INTEGER NOT NULL,
                object_crc32c INTEGER NOT NULL,
                sha256_state BLOB NOT NULL,
                PRIMARY KEY (upload_id, number)
            )
            """,
        ),
    ),
    Migration(
        2,
        "writer leases, fencing tokens and replica heartbeats",
        (
            "ALTER TABLE sessions ADD COLUMN holder TEXT",
            "ALTER TABLE sessions ADD COLUMN generation INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE sessions ADD COLUMN release_requested INTEGER NOT NULL DEFAULT 0",
            "CREATE INDEX sessions_by_holder ON sessions (holder)",
            """
            CREATE TABLE replicas (
                holder TEXT PRIMARY KEY,
                heartbeat_at REAL NOT NULL
            )
            """,
        ),
    ),
    Migration(
        3,
        "optional SHA-256, kept tails for salvage, the event outbox",
        (
            "ALTER TABLE sessions ADD COLUMN compute_sha256 INTEGER NOT NULL DEFAULT 1",
            "ALTER TABLE sessions ADD COLUMN tail TEXT",
            """
            CREATE TABLE outbox (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                endpoint TEXT NOT NULL,
                event_id TEXT NOT NULL,
                body BLOB NOT NULL,
                created_at REAL NOT NULL,
                next_attempt_at REAL NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                status TEXT NOT NULL DEFAULT 'pending',
                last_error TEXT NOT NULL DEFAULT ''
            )
            """,
            "CREATE INDEX outbox_due ON outbox (status, next_attempt_at)",
        ),
    ),
)
