"""Credentials changes, told to every replica at once.

After SetCredentials or DeleteCredentials succeeds on one replica, every replica must drop that
tenant's cached credentials and S3 clients (OpenBao has no event stream to watch). A subscriber
gets the tenant id, or None meaning "a change may have been missed: drop everything". The cache
TTL stays as a backstop for anything a notification cannot reach. The PostgreSQL implementation
(LISTEN/NOTIFY) is in postgres_changes.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

ChangeCallback = Callable[[str | None], None]


class CredentialsChanges(Protocol):
    def subscribe(self, callback: ChangeCallback) -> None:
        """Call `callback(tenant_id)` on every change, `callback(None)` to drop everything."""
        ...

    async def start(self) -> None:
        """Start listening; changes published after this returns are seen."""
        ...

    async def publish(self, tenant_id: str) -> None:
        """Tell every replica (this one included) that this tenant's credentials changed."""
        ...

    async def close(self) -> None: ...


class Subscribers:
    """The subscriber list both implementations share."""

    def __init__(self) -> None:
        self._callbacks: list[ChangeCallback] = []

    def subscribe(self, callback: ChangeCallback) -> None:
        self._callbacks.append(callback)

    def notify(self, tenant_id: str | None) -> None:
        for callback in self._callbacks:
            try:
                callback(tenant_id)
            except Exception:
                log.exception("a credentials change subscriber failed")


class LocalCredentialsChanges(Subscribers):
    """One process (the SQLite deployment): publishing calls the subscribers directly."""

    async def start(self) -> None:
        """Nothing to connect to."""

    async def publish(self, tenant_id: str) -> None:
        self.notify(tenant_id)

    async def close(self) -> None:
        """Nothing to close."""
