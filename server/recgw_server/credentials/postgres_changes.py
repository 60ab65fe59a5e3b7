"""Credentials changes over PostgreSQL LISTEN/NOTIFY, for replicas sharing one database."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from recgw_server.credentials.changes import Subscribers

log = logging.getLogger(__name__)

CHANNEL = "recgw_credentials"


class PostgresCredentialsChanges(Subscribers):
    """LISTEN/NOTIFY on the shared PostgreSQL database.

    Listens on a dedicated connection. When that connection is lost, notifications may have been
    missed: subscribers are told to drop everything, and again once listening has resumed (a
    load that ran in between may have cached credentials that changed meanwhile).
    """

    def __init__(
        self,
        conninfo: str,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
        *,
        application_name: str = "recgw-credentials-listener",
        retry_seconds: float = 1.0,
    ) -> None:
        super().__init__()
        self._conninfo = conninfo
        self._pool = pool  # for publishing; the listening connection is never shared
        self._application_name = application_name
        self._retry_seconds = retry_seconds
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.reconnects = 0

    async def _listen(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, application_name=self._application_name
        )
        try:
            await conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def start(self) -> None:
        self._conn = await self._listen()
        self._task = asyncio.create_task(self._run(), name="recgw-credentials-listener")

    async def _run(self) -> None:
        while True:
            try:
                if self._conn is None:
                    self._conn = await self._listen()
                    self.reconnects += 1
                    log.info("credentials notifications: listening again")
                    self.notify(None)
                async for notification in self._conn.notifies():
                    self.notify(notification.payload)
            except psycopg.Error as error:
                if self._conn is None:  # reconnecting failed; try again after a pause
                    await asyncio.sleep(self._retry_seconds)
                    continue
                log.warning(
                    "credentials notifications: connection lost (%s); dropping every cached "
                    "credential and reconnecting",
                    type(error).__name__,
                )
                self.notify(None)
                await self._close_connection()

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    async def publish(self, tenant_id: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, tenant_id))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._close_connection()
