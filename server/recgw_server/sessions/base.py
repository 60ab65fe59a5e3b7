"""The session store contract: the gateway's own durable record of every upload.

The seed's PutObject-only policy grants no ListParts, so this record, not S3, is the source of
truth for which parts exist. A part counts as committed only once its record is durable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from recgw_server.events.model import Event, Outbox


@dataclass(frozen=True)
class PartRecord:
    """One part durably written to S3, with the object's checksum state at its end."""

    number: int
    etag: str
    size: int
    crc32c: int
    object_crc32c: int  # CRC32C of the object from byte 0 to the end of this part
    sha256_state: bytes  # SHA-256 state of the object at the end of this part


@dataclass(frozen=True)
class SessionRecord:
    """Everything needed to resume, finish, report or expire an upload."""

    upload_id: str
    tenant_id: str
    object_name: str
    key: str
    bucket: str
    content_type: str
    metadata: Mapping[str, str]
    if_none_match: bool
    expected_size: int | None
    credentials_version: int
    part_base_size: int
    part_growing: bool
    growth_interval: int
    state: str
    created_at: float
    updated_at: float
    store_upload_id: str = ""
    committed_size: int = 0
    error_message: str = ""
    result: Mapping[str, Any] | None = None
    abort_outcome: str = ""
    parts: tuple[PartRecord, ...] = field(default_factory=tuple)
    compute_sha256: bool = True
    # Bytes received after the committed prefix when the last stream ended, uploaded as a short
    # part for salvaging; not committed (a resuming stream writes that part again).
    tail: PartRecord | None = None

    def committed_parts(self) -> tuple[PartRecord, ...]:
        """The parts 1..k that are all present: only those count as committed."""
        by_number = {p.number: p for p in self.parts}
        prefix: list[PartRecord] = []
        while len(prefix) + 1 in by_number:
            prefix.append(by_number[len(prefix) + 1])
        return tuple(prefix)


class SessionStore(Outbox, Protocol):
    """Durable upload sessions. Every write is durable when its coroutine returns."""

    async def create(self, record: SessionRecord) -> None: ...

    async def get(self, upload_id: str) -> SessionRecord | None: ...

    async def save_part(
        self, upload_id: str, part: PartRecord, committed_size: int, updated_at: float
    ) -> None: ...

    async def drop_parts_after(self, upload_id: str, number: int) -> None:
        """Forget parts beyond the committed prefix (they will be written again)."""
        ...

    async def update(
        self,
        upload_id: str,
        updated_at: float,
        outbox: Sequence[tuple[str, Event]] = (),
        **fields: Any,
    ) -> None:
        """Change session fields (state, store_upload_id, error_message, result, ...) and add
        the `outbox` deliveries (endpoint URL, event) in the same transaction."""
        ...

    async def enqueue(self, outbox: Sequence[tuple[str, Event]]) -> None:
        """Add deliveries that report no session change (credentials events)."""
        ...

    async def idle(self, states: Iterable[str], updated_before: float) -> list[str]:
        """Ids of sessions in these states not touched since `updated_before`."""
        ...

    async def close(self) -> None: ...
