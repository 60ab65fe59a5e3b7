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
    crc32c: str = ""  # the store's base64 CRC32C of the object, when it reports one


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


class Body(Protocol):
    """A part's or object's bytes as the HTTP layer reads them: sized and rewindable."""

    def __len__(self) -> int: ...

    def read(self, size: int = -1) -> bytes | memoryview: ...

    def seek(self, offset: int, whence: int = 0) -> int: ...

    def tell(self) -> int: ...


class BytesBody:
    """A Body of bytes already in memory (small objects: checks, notes)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0

    def __len__(self) -> int:
        return len(self._data)

    def read(self, size: int = -1) -> bytes:
        chunk = self._data[self._position :]
        self._position = len(self._data)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        self._position = {0: offset, 1: self._position + offset, 2: len(self._data) + offset}[
            whence
        ]
        return self._position

    def tell(self) -> int:
        return self._position


class AbortOutcome(enum.Enum):
    ABORTED = "aborted"
    DENIED = "denied"  # expected under a PutObject-only policy
    FAILED = "failed"


class ObjectWriter(Protocol):
    """Writes objects into one tenant's bucket with that tenant's credentials."""

    @property
    def bucket(self) -> str: ...

    async def put_object(self, spec: ObjectSpec, body: Body, crc32c: int) -> WrittenObject:
        """One attempt of a single-request object write (the pipeline retries it itself)."""
        ...

    async def create_multipart_upload(self, spec: ObjectSpec) -> str:
        """Start a multipart upload; returns the store's upload id."""
        ...

    async def upload_part(
        self, key: str, store_upload_id: str, part_number: int, body: Body, crc32c: int
    ) -> WrittenPart: ...

    async def complete_multipart_upload(
        self,
        spec: ObjectSpec,
        store_upload_id: str,
        parts: Sequence[WrittenPart],
        object_crc32c: int,
    ) -> WrittenObject:
        """One attempt to complete (the pipeline retries it itself, knowing what it sent).

        S3 also checks `object_crc32c` where full-object checksums are on.
        """
        ...

    async def head_object(self, key: str) -> WrittenObject | None:
        """ETag and checksum of an object (HeadObject), or None when absent; an error without
        the optional s3:GetObject grant."""
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
