"""The session store contract: the gateway's own durable record of every upload.

The seed's PutObject-only policy grants no ListParts, so this record, not S3, is the source of
truth for which parts exist. A part counts as committed only once its record is durable.

Several gateway replicas may share one store. At most one of them writes an upload at a time:
the holder of its writer lease. A lease carries a fencing token (the generation, incremented on
every attach), and every write the pipeline makes names its lease; the store checks it in the
same statement that writes, so a replica that lost the lease (frozen, partitioned, slow) records
nothing after another one took over. Leases live as long as their holder's replica heartbeat:
one row per replica, stamped with the store's own clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from recgw_server.events.model import Event, Outbox


@dataclass(frozen=True)
class Lease:
    """The right of one replica (`holder`) to write one upload, as of `generation`."""

    upload_id: str
    holder: str
    generation: int


class Fenced(Exception):
    """A write named a lease that no longer holds: another replica took the upload over."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(
            f"the lease of upload {lease.upload_id} (generation {lease.generation}) is lost"
        )
        self.lease = lease


class AlreadyCreated(Exception):
    """`create` found a session with that upload id: another stream (perhaps on another
    replica) created it first."""

    def __init__(self, upload_id: str) -> None:
        super().__init__(f"upload {upload_id} exists already")
        self.upload_id = upload_id


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
    holder: str = ""  # replica holding the writer lease; empty when nobody does
    generation: int = 0  # fencing token of the latest lease
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


def part_json(part: PartRecord) -> str:
    """A part record as JSON (the kept tail of a session)."""
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


def part_from_json(text: str | Mapping[str, Any]) -> PartRecord:
    data = json.loads(text) if isinstance(text, str) else text
    return PartRecord(
        number=data["number"],
        etag=data["etag"],
        size=data["size"],
        crc32c=data["crc32c"],
        object_crc32c=data["object_crc32c"],
        sha256_state=bytes.fromhex(data["sha256_state"]),
    )


UPDATABLE_FIELDS = frozenset(
    {
        "state",
        "store_upload_id",
        "committed_size",
        "error_message",
        "result",
        "abort_outcome",
        "tail",
    }
)


class SessionStore(Outbox, Protocol):
    """Durable upload sessions. Every write is durable when its coroutine returns.

    Writes that take a Lease raise Fenced, and change nothing, when the lease no longer holds.
    """

    async def open(self) -> None:
        """Connect and bring the schema up to date (idempotent, safe from many replicas)."""
        ...

    async def create(self, record: SessionRecord, holder: str) -> Lease:
        """Store a new session, leased to `holder` at generation 1; AlreadyCreated when a
        session with its upload id exists."""
        ...

    async def get(self, upload_id: str) -> SessionRecord | None: ...

    async def attach(
        self, upload_id: str, holder: str, lease_seconds: float, force: bool = False
    ) -> Lease | None:
        """Take the writer lease with a new generation, or None when another live replica has it.

        The lease is taken when nobody holds it, when `holder` already does, when the holder's
        heartbeat is older than `lease_seconds` (a dead or frozen replica), or when `force`.
        None also when there is no such upload.
        """
        ...

    async def release(self, lease: Lease) -> bool:
        """Give the lease up if it still holds; False when it had already been lost."""
        ...

    async def request_release(self, upload_id: str) -> None:
        """Ask the lease holder (on another replica) to release the upload when it can."""
        ...

    async def release_requested(self, holder: str) -> list[str]:
        """Ids of uploads held by `holder` whose release another replica asked for."""
        ...

    async def heartbeat(self, holder: str) -> None:
        """Keep every lease of this replica alive: one row per replica, the store's clock."""
        ...

    async def save_part(
        self, lease: Lease, part: PartRecord, committed_size: int, updated_at: float
    ) -> None:
        """Record a part written to S3 (replacing one of the same number)."""
        ...

    async def drop_parts_after(self, lease: Lease, number: int) -> None:
        """Forget parts beyond the committed prefix (they will be written again)."""
        ...

    async def update(
        self,
        lease: Lease,
        updated_at: float,
        outbox: Sequence[tuple[str, Event]] = (),
        **fields: Any,
    ) -> None:
        """Change session fields (UPDATABLE_FIELDS: state, store_upload_id, result, ...) and add
        the `outbox` deliveries (endpoint URL, event), in one transaction. Without fields only
        `updated_at` changes: a check that the lease still holds."""
        ...

    async def enqueue(self, outbox: Sequence[tuple[str, Event]]) -> None:
        """Add deliveries that report no session change (credentials events)."""
        ...

    async def idle(self, states: Iterable[str], updated_before: float) -> list[str]:
        """Ids of sessions in these states not touched since `updated_before`."""
        ...

    async def claim_idle(
        self,
        states: Iterable[str],
        updated_before: float,
        holder: str,
        lease_seconds: float,
        limit: int,
    ) -> list[Lease]:
        """Lease up to `limit` idle sessions that no live replica holds, for expiring them.

        Replicas claiming at the same time get disjoint sets.
        """
        ...

    async def close(self) -> None: ...
