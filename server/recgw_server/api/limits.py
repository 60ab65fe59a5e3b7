"""Per-tenant limit on concurrent Upload streams, so one tenant cannot starve the others."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from recgw_server.domain import ErrorKind, Reason, RecgwError, quote_client


class TenantSlot:
    """One stream's place in its tenant's count; release it exactly once."""

    def __init__(self, owner: TenantUploadLimits, tenant_id: str) -> None:
        self._owner = owner
        self.tenant_id = tenant_id
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._owner._release(self.tenant_id)


class TenantUploadLimits:
    """Counts running Upload streams per tenant against `max_uploads(tenant_id)` (0: none)."""

    def __init__(self, max_uploads: Callable[[str], int]) -> None:
        self.max_uploads = max_uploads
        self._active: Counter[str] = Counter()

    def active(self, tenant_id: str) -> int:
        return self._active[tenant_id]

    def acquire(self, tenant_id: str) -> TenantSlot:
        """A slot for a new stream, or RESOURCE_EXHAUSTED (TENANT_LIMIT_EXCEEDED)."""
        limit = self.max_uploads(tenant_id)
        if limit and self._active[tenant_id] >= limit:
            raise RecgwError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"tenant {quote_client(tenant_id, 64)} already has {limit} uploads running, "
                f"its limit (max_uploads_per_tenant); retry when one has ended",
                reason=Reason.TENANT_LIMIT_EXCEEDED,
                details={"limit": "max_uploads_per_tenant", "limit_value": str(limit)},
            )
        self._active[tenant_id] += 1
        return TenantSlot(self, tenant_id)

    def _release(self, tenant_id: str) -> None:
        self._active[tenant_id] -= 1
        if self._active[tenant_id] <= 0:
            del self._active[tenant_id]
