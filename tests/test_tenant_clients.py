"""A burst of new tenants: each tenant's credentials are read from Vault once, and the S3 clients
are built once for all tenants of an endpoint and region, every request signed as its tenant."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import botocore.credentials
import pytest

from recgw_server.app import build_adapters
from recgw_server.credentials.base import CredentialsSource
from recgw_server.credentials.vault import CachedCredentialsSource
from recgw_server.dev.stack import MotoS3, OpenBao, VaultIdentities
from recgw_server.domain import (
    ErrorKind,
    Reason,
    RecgwError,
    Secret,
    StorageTarget,
    TenantCredentials,
)
from recgw_server.storage.s3 import S3ObjectStore, S3Settings, signed_as
from tests.harness import (
    CapturedLogs,
    GatewayThread,
    MiB,
    Tenant,
    make_settings,
    read_object,
    set_credentials,
    upload,
    upload_messages,
)


class CountingSource:
    """The Vault source with a count of its reads per tenant (what reaches Vault)."""

    def __init__(self, inner: CredentialsSource) -> None:
        self._inner = inner
        self.reads: Counter[str] = Counter()

    async def get(self, tenant_id: str) -> TenantCredentials | None:
        self.reads[tenant_id] += 1
        return await self._inner.get(tenant_id)

    def invalidate(self, tenant_id: str) -> None:
        self._inner.invalidate(tenant_id)

    def invalidate_all(self) -> None:
        self._inner.invalidate_all()


def test_a_burst_of_new_tenants_reads_vault_once_each_and_builds_clients_once(
    openbao: OpenBao,
    identities: VaultIdentities,
    captured_logs: CapturedLogs,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
) -> None:
    """Each tenant's IAM user may write only its own bucket, so an upload signed with another
    tenant's keys (a mix-up of the shared clients) would be refused by moto."""
    settings = make_settings(openbao, identities)
    adapters = build_adapters(settings)
    assert isinstance(adapters.source, CachedCredentialsSource)
    vault = CountingSource(adapters.source._inner)
    adapters = dataclasses.replace(
        adapters, source=CachedCredentialsSource(vault, settings.vault.cache_ttl_seconds)
    )
    gateway = GatewayThread(settings, adapters)
    try:
        tenants = [new_tenant(gateway=gateway) for _ in range(4)]
        small = os.urandom(100_000)
        large = os.urandom(6 * MiB)  # two parts: the single-attempt client completes it

        def one(job: tuple[Tenant, int]) -> tuple[Tenant, str, bytes]:
            tenant, n = job
            data = large if n == 0 else small
            response = upload(gateway, upload_messages(tenant.tenant_id, f"burst/{n}.bin", data))
            return tenant, response.key, data

        jobs = [(tenant, n) for tenant in tenants for n in range(3)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(one, jobs))
        for tenant, key, data in results:
            assert read_object(moto, tenant.bucket, key) == data
        assert vault.reads == Counter({t.tenant_id: 1 for t in tenants})
        store = adapters.store
        assert isinstance(store, S3ObjectStore)
        assert store.clients_built == 2  # one endpoint and region: retrying + single-attempt

        # New keys: read again, same clients, and the uploads sign with the new keys.
        rotated = new_tenant(bucket=tenants[0].bucket)
        tenants[0].keys = rotated.keys
        set_credentials(gateway, tenants[0], endpoint_url=moto.endpoint_url)
        response = upload(gateway, upload_messages(tenants[0].tenant_id, "after.bin", small))
        assert read_object(moto, tenants[0].bucket, response.key) == small
        assert vault.reads[tenants[0].tenant_id] == 2
        assert store.clients_built == 2
    finally:
        gateway.stop()


def test_shared_clients_sign_only_within_a_tenants_call() -> None:
    """No request goes out unsigned or with the placeholder keys the shared clients hold: both
    fail before anything is sent (the endpoint is unreachable on purpose)."""
    credentials = TenantCredentials(
        tenant_id="t-shared",
        access_key_id="AKIASHAREDCLIENT0001",
        secret_access_key=Secret("not-a-real-secret"),
        target=StorageTarget(region="us-east-1", bucket="b", endpoint_url="http://127.0.0.1:9"),
        version=1,
    )
    store = S3ObjectStore(S3Settings(max_attempts=1))
    try:
        writer = asyncio.run(store.writer_for(credentials))
        client, once = writer.clients
        for made in (client, once):
            with pytest.raises(Exception, match="outside of a tenant's call"):
                made.head_bucket(Bucket="b")

        # Should botocore stop honouring the per-request credentials, the request would be
        # signed with the placeholder keys: it is stopped before it is sent.
        def drop_request_credentials(request: Any, **_: Any) -> None:
            request.context["signing"].pop("request_credentials", None)

        once.meta.events.register_last("before-sign.s3", drop_request_credentials)
        tenant_keys = botocore.credentials.Credentials("AKIASHAREDCLIENT0001", "x")
        with pytest.raises(Exception, match="not signed with the tenant's credentials"):
            signed_as(tenant_keys, lambda: once.head_bucket(Bucket="b"))
    finally:
        store.close()


def test_a_directory_bucket_is_refused_before_any_request() -> None:
    """S3 Express signs with session credentials cached per bucket in the client: not with
    clients shared by tenants, so such a bucket gets a precise FAILED_PRECONDITION."""
    credentials = TenantCredentials(
        tenant_id="t-express",
        access_key_id="AKIASHAREDCLIENT0002",
        secret_access_key=Secret("not-a-real-secret"),
        target=StorageTarget(region="us-east-1", bucket="calls--use1-az4--x-s3").validated(),
        version=1,
    )
    store = S3ObjectStore()
    try:
        with pytest.raises(RecgwError) as caught:
            asyncio.run(store.writer_for(credentials))
        assert caught.value.kind is ErrorKind.FAILED_PRECONDITION
        assert caught.value.reason is Reason.STORAGE_REJECTED
        assert "directory bucket" in caught.value.message
        assert store.clients_built == 0
    finally:
        store.close()
