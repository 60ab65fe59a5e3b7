"""Credentials the gateway accepts: bearer tokens, client certificate identities, their scopes."""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from recgw_server.domain import TENANT_ID_PATTERN


class Role(enum.Enum):
    UPLOADER = "uploader"
    ADMIN = "admin"


def hash_token(token: str) -> str:
    """The SHA-256 hex digest under which a token is configured."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


_PATTERN_CHARS = re.compile(r"[a-z0-9_*-]{1,63}")
IDENTITY_KINDS = ("dns", "uri", "cn")


def check_tenant_pattern(pattern: str) -> None:
    """A tenant id, or one with '*' standing for any run of characters ("acme-*", "*")."""
    if not _PATTERN_CHARS.fullmatch(pattern) or not (
        "*" in pattern or TENANT_ID_PATTERN.fullmatch(pattern)
    ):
        raise ValueError(
            "tenant patterns are tenant ids ([a-z0-9][a-z0-9_-]*) where '*' may stand for any "
            'characters, e.g. "acme", "acme-*" or "*"'
        )


def parse_client_identity(identity: str) -> tuple[str, str]:
    """("dns", "fleet.example.com") from "dns:fleet.example.com"; likewise uri: and cn:."""
    kind, sep, value = identity.partition(":")
    if not sep or kind not in IDENTITY_KINDS or not value or value != value.strip():
        raise ValueError(
            "client_identity must be 'dns:NAME', 'uri:URI' or 'cn:NAME' of the client certificate"
        )
    return kind, value


@dataclass(frozen=True)
class TenantScope:
    """The tenants a credential may act for: exact ids and patterns with '*'."""

    patterns: tuple[str, ...] = ()
    _compiled: tuple[re.Pattern[str], ...] = field(
        init=False, repr=False, compare=False, hash=False, default=()
    )

    def __post_init__(self) -> None:
        compiled = tuple(
            re.compile(".*".join(re.escape(part) for part in p.split("*"))) for p in self.patterns
        )
        object.__setattr__(self, "_compiled", compiled)

    def allows(self, tenant_id: str) -> bool:
        return any(pattern.fullmatch(tenant_id) for pattern in self._compiled)


@dataclass(frozen=True)
class TokenEntry:
    """One configured credential. `sha256_hex` empty: a client certificate alone."""

    name: str
    role: Role
    sha256_hex: str = ""
    client_identity: str = ""
    tenants: TenantScope = TenantScope()
    calls_per_second: float = 0.0  # 0: no rate limit
    burst: int = 1

    def grant(self) -> tuple[object, ...]:
        """What a running stream was admitted with; a reload that changes it ends the stream."""
        return (self.name, self.role, self.sha256_hex, self.client_identity, self.tenants)


class TokenVerifier:
    """Looks a presented token up among configured SHA-256 hashes, in constant time; finds
    certificate-only credentials by the certificate's identities."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self.entries = list(entries)
        self._hashed = [(bytes.fromhex(e.sha256_hex), e) for e in self.entries if e.sha256_hex]
        self._by_identity = {
            e.client_identity: e for e in self.entries if e.client_identity and not e.sha256_hex
        }

    def verify(self, token: str) -> TokenEntry | None:
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: TokenEntry | None = None
        # Compare against every entry, without stopping at a match, so timing tells nothing.
        for expected, entry in self._hashed:
            if hmac.compare_digest(digest, expected):
                found = entry
        return found

    def by_certificate(self, identities: Iterable[str]) -> TokenEntry | None:
        """The certificate-only credential for one of a client certificate's identities."""
        for identity in identities:
            entry = self._by_identity.get(identity)
            if entry is not None:
                return entry
        return None

    def grants(self) -> set[tuple[object, ...]]:
        return {e.grant() for e in self.entries}
