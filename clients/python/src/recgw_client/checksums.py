"""CRC32C (Castagnoli) and SHA-256 of an upload.

CRC32C comes from google-crc32c, Google's maintained binding of its C
library (hardware accelerated where the CPU has CRC32 instructions, with a
pure-Python fallback of its own when the extension cannot load). Pass
``compute_checksums=False`` to the upload functions to skip every checksum.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import google_crc32c

__all__ = ["Checksummer", "ObjectChecksums", "crc32c"]


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C of data; pass the CRC of the preceding bytes as ``crc`` to continue it.

    ``crc32c(b, crc32c(a)) == crc32c(a + b)``, like ``zlib.crc32``.
    """
    # google_crc32c takes read-only bytes only.
    return int(google_crc32c.extend(crc, data if isinstance(data, bytes) else bytes(data)))


@dataclass(frozen=True)
class ObjectChecksums:
    """Checksums of a whole object: CRC32C as an unsigned 32-bit int, SHA-256 digest."""

    crc32c: int | None = None
    sha256: bytes | None = None

    @property
    def crc32c_hex(self) -> str | None:
        """CRC32C as 8 hex digits, or None."""
        return None if self.crc32c is None else f"{self.crc32c:08x}"

    @property
    def sha256_hex(self) -> str | None:
        """SHA-256 as 64 hex digits, or None."""
        return None if self.sha256 is None else self.sha256.hex()


class Checksummer:
    """Running CRC32C and SHA-256 over the bytes of an upload."""

    def __init__(self) -> None:
        self._crc = 0
        self._sha256 = hashlib.sha256()

    def update(self, data: bytes) -> None:
        """Add the next bytes."""
        self._crc = crc32c(data, self._crc)
        self._sha256.update(data)

    def result(self) -> ObjectChecksums:
        """Checksums of everything added so far."""
        return ObjectChecksums(crc32c=self._crc, sha256=self._sha256.digest())
