"""`recgw migrate`: bring the session store's schema up to date, or copy SQLite into PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import psycopg_pool

from recgw_server.config import StoreSettings
from recgw_server.sessions.base import SessionRecord
from recgw_server.sessions.postgres import ImportRefused, PostgresSessionStore
from recgw_server.sessions.sqlite import connect_sqlite, migrate_sqlite, read_sqlite_sessions

SQLITE_FILE = "sessions.sqlite3"


class MigrateError(Exception):
    """The migration cannot be done; the message says why and names no secret."""


def _applied(where: str, versions: list[int]) -> str:
    if not versions:
        return f"{where}: schema already up to date"
    return f"{where}: applied schema migrations {', '.join(map(str, versions))}"


def _migrate_sqlite_file(path: Path) -> list[int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = connect_sqlite(path)
    try:
        return migrate_sqlite(db)
    finally:
        db.close()


def _read_sqlite(path: Path) -> tuple[Path, list[SessionRecord]]:
    source = path / SQLITE_FILE if path.is_dir() else path
    return source, read_sqlite_sessions(source)


async def migrate_store(settings: StoreSettings, from_sqlite: Path | None = None) -> list[str]:
    """Migrate the configured store; with `from_sqlite`, copy that SQLite store into it.

    Returns report lines for the operator.
    """
    url = settings.sessions.postgres_url
    if not url:
        if from_sqlite is not None:
            raise MigrateError(
                "--from-sqlite copies into PostgreSQL: set sessions.url (or "
                "RECGW_SESSIONS__URL) to a postgresql:// URL first"
            )
        path = settings.data_dir / SQLITE_FILE
        return [_applied(f"SQLite {path}", await asyncio.to_thread(_migrate_sqlite_file, path))]
    store = PostgresSessionStore(url, min_connections=1, max_connections=2)
    try:
        await store.open()
        report = [_applied("PostgreSQL", store.applied_migrations)]
        if from_sqlite is not None:
            source, records = await asyncio.to_thread(_read_sqlite, from_sqlite)
            copied = await store.import_sessions(records)
            report.append(
                f"copied {copied.sessions} sessions and {copied.parts} parts from {source}"
            )
        return report
    except (ImportRefused, FileNotFoundError) as error:
        raise MigrateError(str(error)) from None
    except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
        raise MigrateError(f"PostgreSQL: {type(error).__name__}: {error}") from None
    finally:
        await store.close()
