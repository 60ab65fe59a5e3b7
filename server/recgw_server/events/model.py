"""Events: what happened to an upload or a tenant's credentials, told to the customer's backend.

An event is written to the outbox of the session store in the same transaction as the state
change it reports, then delivered at least once (see webhooks.py). Events never carry a secret:
only ids, keys, sizes, checksums and states.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

UPLOAD_COMPLETED = "upload.completed"
UPLOAD_COMPLETION_UNCONFIRMED = "upload.completion_unconfirmed"
UPLOAD_ABORTED = "upload.aborted"
UPLOAD_EXPIRED = "upload.expired"
UPLOAD_SALVAGED = "upload.salvaged"
CREDENTIALS_FAILING = "credentials.failing"


@dataclass(frozen=True)
class Event:
    """One event; `id` is the idempotency key receivers de-duplicate on."""

    type: str
    tenant_id: str
    data: dict[str, Any]
    id: str = field(default_factory=lambda: "evt_" + uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)

    def body(self) -> bytes:
        """The JSON body POSTed to receivers."""
        return json.dumps(
            {
                "id": self.id,
                "type": self.type,
                "created_at": round(self.created_at, 3),
                "tenant_id": self.tenant_id,
                "data": self.data,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()


@dataclass(frozen=True)
class Delivery:
    """One event due for one endpoint, as the outbox hands it out."""

    id: int
    endpoint: str
    event_id: str
    body: bytes
    attempts: int


class Outbox(Protocol):
    """The durable queue of deliveries, kept in the session store."""

    async def due_deliveries(self, now: float, limit: int, claim_for: float) -> list[Delivery]:
        """Deliveries whose next attempt is due, oldest first, claimed for `claim_for` seconds
        (no other dispatcher takes them meanwhile; a crashed one's claims simply run out)."""
        ...

    async def delivered(self, delivery_id: int) -> None: ...

    async def retry_later(
        self, delivery_id: int, next_attempt_at: float, attempts: int, error: str
    ) -> None: ...

    async def dead_letter(self, delivery_id: int, attempts: int, error: str) -> None:
        """Give up on a delivery; it stays in the store, marked dead, for operators."""
        ...

    async def outbox_counts(self) -> dict[str, int]:
        """How many deliveries are pending, delivered and dead."""
        ...
