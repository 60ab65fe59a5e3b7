"""Tenant credentials in HashiCorp Vault / OpenBao (KV v2), behind the credentials Protocols.

hvac is blocking, so every Vault request runs in a worker thread. Two identities are used: a
writer that can create, describe and delete but never read a secret, and a reader for the
upload path. No token, secret_id or secret access key ever reaches a message, log line,
exception text or repr: hvac exceptions (whose text can hold response bodies) are translated
into RecgwError outside of the `except` block, so they are not even kept as `__context__`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests
import requests.adapters

from recgw_server.credentials.base import CredentialsSource
from recgw_server.domain import (
    ROLE_ARN,
    CredentialsInfo,
    EncryptionMode,
    ErrorKind,
    Reason,
    RecgwError,
    Secret,
    StorageTarget,
    TenantCredentials,
    invalid,
    mask_access_key_id,
    new_external_id,
    validate_tenant_id,
)

T = TypeVar("T")

log = logging.getLogger(__name__)

_UNAVAILABLE_STATUSES = (
    hvac.exceptions.VaultDown,  # 503: sealed, or a standby without an active node
    hvac.exceptions.VaultNotInitialized,
    hvac.exceptions.BadGateway,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.RateLimitExceeded,
)
_DENIED = (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized)
_ACCESS_KEY_ID = re.compile(r"[\x21-\x7e]{1,128}")
_MAX_SECRET_BYTES = 4096
_MAX_METADATA_VALUE_BYTES = 512  # Vault's limit for a custom_metadata value


@dataclass(frozen=True)
class VaultAuth:
    """How one identity logs in to Vault: a fixed token, or an AppRole role_id/secret_id."""

    method: Literal["token", "approle"]
    token: Secret | None = None
    role_id: str = ""
    secret_id: Secret | None = None
    mount_point: str = "approle"
    name: str = ""  # shown in error messages, e.g. "recgw-writer"

    def describe(self) -> str:
        if self.name:
            return f"identity {self.name!r}"
        if self.method == "approle":
            return f"the AppRole identity at auth/{self.mount_point}"
        return "the configured Vault token"


def _unavailable(detail: str) -> RecgwError:
    return RecgwError(
        ErrorKind.UNAVAILABLE,
        f"credential store (Vault) is unavailable ({detail}); retry later",
        reason=Reason.VAULT_UNAVAILABLE,
    )


def _request_path(exc: hvac.exceptions.VaultError) -> str:
    """`GET /v1/secret/data/...` from an hvac error, without host or query string."""
    path = urlsplit(exc.url).path if exc.url else "?"
    return f"{(exc.method or '').upper()} {path}".strip()


class VaultConnection:
    """One hvac client for one identity: lazy login, token renewal, re-login, error mapping."""

    def __init__(
        self,
        address: str,
        auth: VaultAuth,
        timeout: float = 5.0,
        renew_margin: float = 0.5,
        *,
        executor: concurrent.futures.Executor | None = None,
        threads: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`threads`: run calls in a pool of this many threads of its own, each with a kept
        connection (a burst of new tenants' reads then neither queues in asyncio's small
        default pool nor behind other work there); 0 uses `executor`, or asyncio's pool."""
        if auth.method == "token" and not auth.token:
            raise ValueError("token auth needs a token")
        if auth.method == "approle" and not (auth.role_id and auth.secret_id):
            raise ValueError("AppRole auth needs a role_id and a secret_id")
        self.address = address
        self._auth = auth
        self._renew_margin = renew_margin
        self._own_executor: concurrent.futures.ThreadPoolExecutor | None = None
        session = requests.Session()
        if threads > 0 and executor is None:
            executor = self._own_executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="recgw-vault"
            )
            adapter = requests.adapters.HTTPAdapter(pool_maxsize=threads)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self._executor = executor
        self._clock = clock
        self._client = hvac.Client(url=address, timeout=timeout, session=session)
        # Logins go through a token-less client: no stale token is presented to the login
        # endpoint, and calls in flight on other threads keep a token until the new one is set.
        self._login_client = hvac.Client(url=address, timeout=timeout)
        self._lock = threading.Lock()
        self._logged_in = False
        # bumped at every login, so that threads denied with the same old token re-login once
        self._generation = 0
        self._token_ttl = 0.0
        self._expires_at = 0.0
        self._renewable = False
        self.login_count = 0
        self.renewal_count = 0

    def __repr__(self) -> str:
        return f"VaultConnection({self.address!r}, {self._auth.describe()})"

    @property
    def identity(self) -> str:
        return self._auth.describe()

    async def call(self, fn: Callable[[hvac.Client], T]) -> T:
        """Run `fn(client)` logged in, in a worker thread; Vault errors become RecgwError."""
        if self._executor is None:
            return await asyncio.to_thread(self._call_sync, fn)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._call_sync, fn))

    def close(self) -> None:
        self._client.adapter.close()
        self._login_client.adapter.close()
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=False, cancel_futures=True)

    def _call_sync(self, fn: Callable[[hvac.Client], T]) -> T:
        try:
            generation = self._ensure_token()
            try:
                return fn(self._client)
            except _DENIED:
                # Vault says 403 both for a missing policy and for an expired or revoked token.
                if self._auth.method != "approle":
                    raise
                log.info("%s was denied; logging in again and retrying once", self.identity)
            self._login_again(generation)
            return fn(self._client)
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as exc:
            error = self._translate(exc)
        raise error

    def _translate(self, exc: Exception) -> RecgwError:
        # Only the class name is logged: hvac exception texts can contain response bodies.
        log.warning("Vault request by %s failed: %s", self.identity, type(exc).__name__)
        if isinstance(exc, requests.exceptions.Timeout):
            return _unavailable(f"no answer from {self.address} in time")
        if isinstance(exc, requests.exceptions.RequestException):
            return _unavailable(f"cannot reach {self.address}")
        if isinstance(exc, hvac.exceptions.VaultDown):
            return _unavailable("sealed or without an active node")
        if isinstance(exc, _UNAVAILABLE_STATUSES):
            return _unavailable(f"{type(exc).__name__} from Vault")
        assert isinstance(exc, hvac.exceptions.VaultError)
        if isinstance(exc, _DENIED):
            hint = (
                # it has just logged in again, so the policy is what is missing
                "its Vault policy does not allow this"
                if self._auth.method == "approle"
                else "the token is expired or revoked, or its Vault policy does not allow this"
            )
            return RecgwError(
                ErrorKind.INTERNAL,
                f"Vault denied {self.identity} the request {_request_path(exc)}: "
                f"{hint} (server misconfiguration)",
            )
        return RecgwError(
            ErrorKind.INTERNAL,
            f"Vault refused {_request_path(exc)} by {self.identity} "
            f"({type(exc).__name__}); check the Vault mount and path configuration",
        )

    def _ensure_token(self) -> int:
        with self._lock:
            if not self._logged_in:
                self._login_locked()
            elif self._renewal_due():
                self._renew_locked()
            return self._generation

    def _login_again(self, generation: int) -> None:
        with self._lock:
            if self._generation == generation:
                self._login_locked()

    def _renewal_due(self) -> bool:
        if not self._renewable or self._token_ttl <= 0:
            return False
        return self._expires_at - self._clock() < self._renew_margin * self._token_ttl

    def _login_locked(self) -> None:
        auth = self._auth
        if auth.method == "token":
            assert auth.token is not None
            self._client.token = auth.token.reveal()
            self._renewable = False  # lifetime unknown: no login response to learn it from
        else:
            assert auth.secret_id is not None
            self._logged_in = False
            error: RecgwError | None = None
            try:
                response = self._login_client.auth.approle.login(
                    role_id=auth.role_id,
                    secret_id=auth.secret_id.reveal(),
                    mount_point=auth.mount_point,
                    use_token=False,
                )
            except (hvac.exceptions.InvalidRequest, *_DENIED):
                error = RecgwError(
                    ErrorKind.INTERNAL,
                    f"AppRole login of {self.identity} at auth/{auth.mount_point} was refused; "
                    "check its role_id and secret_id (server misconfiguration)",
                )
            else:
                self._client.token = response["auth"]["client_token"]
                self._remember_lease(response["auth"], login=True)
            if error is not None:
                raise error
        self._logged_in = True
        self._generation += 1
        self.login_count += 1
        log.info("%s logged in to Vault", self.identity)

    def _renew_locked(self) -> None:
        try:
            response = self._client.auth.token.renew_self()
        except (*_DENIED, hvac.exceptions.InvalidRequest):
            response = None
        if response is None:
            log.info("renewing the token of %s failed; logging in again", self.identity)
            self._login_locked()
            return
        self.renewal_count += 1
        if float(response["auth"]["lease_duration"]) < self._token_ttl:
            # capped by the token's max TTL: renewing again would only shrink it further
            log.info("the token of %s reached its max TTL; logging in again", self.identity)
            self._login_locked()
            return
        self._remember_lease(response["auth"], login=False)
        log.debug("%s renewed its Vault token", self.identity)

    def _remember_lease(self, auth: Mapping[str, Any], *, login: bool) -> None:
        lease = float(auth.get("lease_duration") or 0)
        if login:
            self._token_ttl = lease
        self._renewable = bool(auth.get("renewable")) and lease > 0
        self._expires_at = self._clock() + lease


def _is_missing_secret(exc: hvac.exceptions.InvalidPath) -> bool:
    """KV v2 answers 404 without error text for a missing key, with text for a missing mount."""
    return not exc.errors


def _target_fields(target: StorageTarget) -> dict[str, str]:
    """The StorageTarget as strings; empty values are left out (Vault refuses empty metadata)."""
    fields = {
        "region": target.region,
        "bucket": target.bucket,
        "prefix": target.prefix,
        "endpoint_url": target.endpoint_url,
        "force_path_style": str(target.force_path_style).lower(),
        "encryption": target.encryption.value,
        "kms_key_id": target.kms_key_id,
        "allow_overwrite": str(target.allow_overwrite).lower(),
        "equal_part_sizes": str(target.equal_part_sizes).lower(),
        "abandoned_uploads": target.abandoned_uploads,
        "expected_bucket_owner": target.expected_bucket_owner,
    }
    return {key: value for key, value in fields.items() if value}


def _parse_bool(value: object) -> bool:
    if value in ("true", True):
        return True
    if value in ("false", False, None, ""):
        return False
    raise ValueError("not a boolean")


def _target_from_fields(fields: Mapping[str, Any]) -> StorageTarget:
    return StorageTarget(
        region=str(fields.get("region") or ""),
        bucket=str(fields["bucket"]),
        prefix=str(fields.get("prefix") or ""),
        endpoint_url=str(fields.get("endpoint_url") or ""),
        force_path_style=_parse_bool(fields.get("force_path_style")),
        encryption=EncryptionMode(fields.get("encryption") or EncryptionMode.NONE.value),
        kms_key_id=str(fields.get("kms_key_id") or ""),
        allow_overwrite=_parse_bool(fields.get("allow_overwrite")),
        equal_part_sizes=_parse_bool(fields.get("equal_part_sizes")),
        abandoned_uploads=str(fields.get("abandoned_uploads") or "abort"),
        expected_bucket_owner=str(fields.get("expected_bucket_owner") or ""),
    )


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _malformed(tenant_id: str, what: str) -> RecgwError:
    return RecgwError(
        ErrorKind.INTERNAL,
        f"the {what} stored in Vault for tenant {tenant_id!r} is malformed; "
        "set the credentials again",
    )


class VaultCredentialsAdmin:
    """CredentialsAdmin on KV v2, for the writer identity (it needs no read of the secret)."""

    def __init__(
        self, conn: VaultConnection, mount: str = "secret", base_path: str = "recgw/tenants"
    ) -> None:
        self._conn = conn
        self._mount = mount
        self._base_path = base_path.strip("/")

    def _path(self, tenant_id: str) -> str:
        return f"{self._base_path}/{validate_tenant_id(tenant_id)}"

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
        """Write a new version, record the non-secret view as metadata, destroy older versions.

        The external id lives in the data (the upload path's reader needs it) and in the
        metadata (the writer may read that, never the data), so that an overwrite keeps it.
        """
        path = self._path(tenant_id)
        if role_arn:
            if access_key_id or secret_access_key:
                raise invalid(
                    "give either role_arn or an access key pair, not both", "role.role_arn"
                )
            if not ROLE_ARN.fullmatch(role_arn):
                raise invalid(
                    "role_arn must be an IAM role ARN such as "
                    "arn:aws:iam::123456789012:role/recgw-writer",
                    "role.role_arn",
                )
            credential_fields = {"role_arn": role_arn}
            hint = ""
        else:
            if not _ACCESS_KEY_ID.fullmatch(access_key_id):
                raise RecgwError(
                    ErrorKind.INVALID_ARGUMENT,
                    "access_key_id is required: 1-128 printable characters without spaces",
                )
            secret = secret_access_key.reveal()
            if not secret or len(secret.encode()) > _MAX_SECRET_BYTES:
                raise RecgwError(
                    ErrorKind.INVALID_ARGUMENT,
                    f"secret_access_key is required, at most {_MAX_SECRET_BYTES} bytes",
                )
            credential_fields = {"access_key_id": access_key_id, "secret_access_key": secret}
            hint = mask_access_key_id(access_key_id)
        target = target.validated()
        fields = _target_fields(target)
        for key, value in {**fields, **({"role_arn": role_arn} if role_arn else {})}.items():
            if len(value.encode()) > _MAX_METADATA_VALUE_BYTES:
                raise RecgwError(
                    ErrorKind.INVALID_ARGUMENT,
                    f"{key} must be at most {_MAX_METADATA_VALUE_BYTES} bytes",
                )
        mount = self._mount

        def write(client: hvac.Client) -> tuple[dict[str, Any], str]:
            kv = client.secrets.kv.v2
            existing = self._read_metadata(path, client) or {}
            external_id = str((existing.get("custom_metadata") or {}).get("external_id") or "")
            if rotate_external_id or not external_id:
                external_id = new_external_id()
            data = {**credential_fields, "external_id": external_id, **fields}
            written: dict[str, Any] = kv.create_or_update_secret(
                path=path, secret=data, mount_point=mount
            )["data"]
            version = int(written["version"])
            # The version is recorded so that describe can tell a metadata record that belongs
            # to another version (an interrupted or concurrent set) from the current one.
            custom = {**fields, "external_id": external_id, "version": str(version)}
            if hint:
                custom["access_key_id_hint"] = hint
            if role_arn:
                custom["role_arn"] = role_arn
            kv.update_metadata(path=path, max_versions=1, mount_point=mount, custom_metadata=custom)
            # max_versions=1 alone is not enough: a mount's max_versions larger than the key's
            # wins, and the key's setting only applies from the next write on.
            listed = kv.read_secret_metadata(path=path, mount_point=mount)["data"]["versions"]
            older = sorted(
                int(v)
                for v, meta in listed.items()
                if int(v) < version and not meta.get("destroyed")
            )
            if older:
                kv.destroy_secret_versions(path=path, versions=older, mount_point=mount)
            return written, external_id

        written, external_id = await self._conn.call(write)
        return CredentialsInfo(
            tenant_id=tenant_id,
            version=int(written["version"]),
            updated_at=_parse_time(written.get("created_time")),
            access_key_id_hint=hint,
            target=target,
            role_arn=role_arn,
            external_id=external_id,
        )

    async def describe(self, tenant_id: str) -> CredentialsInfo | None:
        """The non-secret view, from the metadata path only."""
        path = self._path(tenant_id)
        meta = await self._conn.call(functools.partial(self._read_metadata, path))
        if meta is None:
            return None
        version = int(meta.get("current_version") or 0)
        current = (meta.get("versions") or {}).get(str(version)) or {}
        if not current or current.get("destroyed") or current.get("deletion_time"):
            return None
        custom = meta.get("custom_metadata") or {}
        if custom.get("version") != str(version):
            raise RecgwError(
                ErrorKind.ABORTED,
                f"the credentials of tenant {tenant_id!r} are being changed, or an earlier change "
                "was interrupted; retry, and if this persists set them again",
                reason=Reason.VAULT_UNAVAILABLE,
            )
        try:
            target = _target_from_fields(custom)
        except (KeyError, ValueError):
            raise _malformed(tenant_id, "metadata") from None
        return CredentialsInfo(
            tenant_id=tenant_id,
            version=version,
            updated_at=_parse_time(current.get("created_time") or meta.get("updated_time")),
            access_key_id_hint=str(
                custom.get("access_key_id_hint", "" if custom.get("role_arn") else "****")
            ),
            target=target,
            role_arn=str(custom.get("role_arn") or ""),
            external_id=str(custom.get("external_id") or ""),
        )

    async def delete(self, tenant_id: str) -> bool:
        """Delete the metadata and every version; False when nothing was stored."""
        path = self._path(tenant_id)
        mount = self._mount

        def delete(client: hvac.Client) -> bool:
            if self._read_metadata(path, client) is None:
                return False
            client.secrets.kv.v2.delete_metadata_and_all_versions(path=path, mount_point=mount)
            return True

        return await self._conn.call(delete)

    def _read_metadata(self, path: str, client: hvac.Client) -> dict[str, Any] | None:
        try:
            response = client.secrets.kv.v2.read_secret_metadata(path=path, mount_point=self._mount)
        except hvac.exceptions.InvalidPath as exc:
            if not _is_missing_secret(exc):
                raise
            return None
        data: dict[str, Any] = response["data"]
        return data


class VaultCredentialsSource:
    """CredentialsSource on KV v2, for the reader identity."""

    def __init__(
        self, conn: VaultConnection, mount: str = "secret", base_path: str = "recgw/tenants"
    ) -> None:
        self._conn = conn
        self._mount = mount
        self._base_path = base_path.strip("/")

    async def get(self, tenant_id: str) -> TenantCredentials | None:
        """The current version's credentials; None when absent, deleted or destroyed."""
        path = f"{self._base_path}/{validate_tenant_id(tenant_id)}"
        mount = self._mount

        def read(client: hvac.Client) -> dict[str, Any] | None:
            try:
                response = client.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=mount, raise_on_deleted_version=True
                )
            except hvac.exceptions.InvalidPath as exc:
                # deleted and destroyed versions are 404s without error text too
                if not _is_missing_secret(exc):
                    raise
                return None
            body: dict[str, Any] | None = response.get("data")
            return body

        body = await self._conn.call(read)
        if not body or not body.get("data"):
            return None
        data = body["data"]
        try:
            role_arn = str(data.get("role_arn") or "")
            return TenantCredentials(
                tenant_id=tenant_id,
                access_key_id="" if role_arn else str(data["access_key_id"]),
                secret_access_key=Secret("" if role_arn else str(data["secret_access_key"])),
                target=_target_from_fields(data),
                version=int((body.get("metadata") or {}).get("version") or 0),
                role_arn=role_arn,
                external_id=str(data.get("external_id") or ""),
            )
        except (KeyError, ValueError, TypeError):
            # the message names no value: the data holds the secret
            error = _malformed(tenant_id, "secret")
        raise error

    def invalidate(self, tenant_id: str) -> None:
        """Nothing is cached here."""

    def invalidate_all(self) -> None:
        """Nothing is cached here."""


class CachedCredentialsSource:
    """Caches another CredentialsSource's hits for `ttl_seconds`; concurrent loads coalesce."""

    def __init__(
        self,
        inner: CredentialsSource,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._ttl = ttl_seconds
        self._clock = clock
        self._hits: dict[str, tuple[float, TenantCredentials]] = {}
        self._loading: dict[str, asyncio.Task[TenantCredentials | None]] = {}
        # bumped by invalidate, so that a load that started before it is not cached
        self._generations: dict[str, int] = {}

    async def get(self, tenant_id: str) -> TenantCredentials | None:
        """Cached credentials, or the inner source's answer."""
        hit = self._hits.get(tenant_id)
        if hit is not None:
            expires_at, credentials = hit
            if self._clock() < expires_at:
                return credentials
            del self._hits[tenant_id]
        task = self._loading.get(tenant_id)
        if task is None:
            task = asyncio.create_task(self._load(tenant_id))
            self._loading[tenant_id] = task
            task.add_done_callback(lambda done: self._forget_load(tenant_id, done))
        # shield: one caller giving up must not cancel the load the others wait for
        return await asyncio.shield(task)

    async def _load(self, tenant_id: str) -> TenantCredentials | None:
        generation = self._generations.get(tenant_id, 0)
        credentials = await self._inner.get(tenant_id)
        # Misses are not cached: a tenant whose credentials were just set (maybe through
        # another gateway instance, which cannot invalidate us) must work at once, and
        # coalescing already limits a burst of uploads for an unknown tenant to one read.
        if credentials is not None and self._generations.get(tenant_id, 0) == generation:
            self._hits[tenant_id] = (self._clock() + self._ttl, credentials)
        return credentials

    def _forget_load(self, tenant_id: str, task: asyncio.Task[TenantCredentials | None]) -> None:
        if self._loading.get(tenant_id) is task:
            del self._loading[tenant_id]
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it when nobody awaited

    def invalidate(self, tenant_id: str) -> None:
        """Drop this tenant's cached credentials, and ignore any load already under way."""
        self._hits.pop(tenant_id, None)
        self._loading.pop(tenant_id, None)
        self._generations[tenant_id] = self._generations.get(tenant_id, 0) + 1
        self._inner.invalidate(tenant_id)

    def invalidate_all(self) -> None:
        """Drop every cached credential, and ignore every load already under way."""
        for tenant_id in {*self._hits, *self._loading}:
            self.invalidate(tenant_id)
        self._inner.invalidate_all()
