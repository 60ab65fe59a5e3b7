"""The narrow interface between the upload pipeline and an object store (S3)."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from recgw_server.domain import TenantCredentials


@dataclass(frozen=True)
class WrittenObject:
    etag: str
    version_id: str


@dataclass(frozen=True)
class WrittenPart:
    part_number: int
    etag: str
    size: int
    crc32c: int


@dataclass(frozen=True)
class ObjectSpec:
    """What every write of one object carries besides its bytes."""

    key: str
    content_type: str
    metadata: Mapping[str, str]
    if_none_match: bool


class AbortOutcome(enum.Enum):
    ABORTED = "aborted"
    DENIED = "denied"  # expected under a PutObject-only policy
    FAILED = "failed"


class ObjectWriter(Protocol):
    """Writes objects into one tenant's bucket with that tenant's credentials."""

    @property
    def bucket(self) -> str: ...

    async def put_object(self, spec: ObjectSpec, body: bytes, crc32c: int) -> WrittenObject: ...

    async def create_multipart_upload(self, spec: ObjectSpec) -> str:
        """Start a multipart upload; returns the store's upload id."""
        ...

    async def upload_part(
        self, key: str, store_upload_id: str, part_number: int, body: bytes, crc32c: int
    ) -> WrittenPart: ...

    async def complete_multipart_upload(
        self,
        spec: ObjectSpec,
        store_upload_id: str,
        parts: Sequence[WrittenPart],
        object_crc32c: int,
    ) -> WrittenObject:
        """Complete; S3 also checks `object_crc32c` where full-object checksums are on."""
        ...

    async def abort_multipart_upload(self, key: str, store_upload_id: str) -> AbortOutcome: ...


class ObjectStore(Protocol):
    """Hands out writers bound to a tenant's credentials."""

    async def writer_for(self, credentials: TenantCredentials) -> ObjectWriter: ...

    def forget(self, tenant_id: str) -> None:
        """Drop anything cached for a tenant whose credentials changed."""
        ...

    def forget_all(self) -> None:
        """Drop everything cached for every tenant."""
        ...

    def close(self) -> None:
        """Release threads and connections (after the last writer call)."""
        ...
