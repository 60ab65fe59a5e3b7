"""The narrow interfaces between the gateway and wherever tenant credentials live (Vault)."""

from __future__ import annotations

from typing import Protocol

from recgw_server.domain import CredentialsInfo, Secret, StorageTarget, TenantCredentials


class CredentialsAdmin(Protocol):
    """Write side (SetCredentials, DescribeCredentials, DeleteCredentials).

    Implementations use an identity that can write but never read a secret.
    """

    async def set(
        self,
        tenant_id: str,
        access_key_id: str,
        secret_access_key: Secret,
        target: StorageTarget,
        *,
        role_arn: str = "",
        rotate_external_id: bool = False,
    ) -> CredentialsInfo:
        """Create or overwrite; afterwards no older version's secret is readable.

        Either an access key pair, or `role_arn` (with an empty key id and secret) for a role
        the gateway assumes. The tenant's external id is generated at the first write and kept
        across overwrites, unless `rotate_external_id` asks for a new one.
        """
        ...

    async def describe(self, tenant_id: str) -> CredentialsInfo | None:
        """The non-secret view, without touching the secret; None when absent."""
        ...

    async def delete(self, tenant_id: str) -> bool:
        """Remove every version; False when there was nothing to delete."""
        ...


class CredentialsSource(Protocol):
    """Read side, used only by the upload path."""

    async def get(self, tenant_id: str) -> TenantCredentials | None:
        """The tenant's credentials, or None when none are stored."""
        ...

    def invalidate(self, tenant_id: str) -> None:
        """Forget anything cached for this tenant (after a Set/Delete on any replica)."""
        ...

    def invalidate_all(self) -> None:
        """Forget everything cached (a change of any tenant may have been missed)."""
        ...
