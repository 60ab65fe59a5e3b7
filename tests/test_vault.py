"""The Vault adapter against a real OpenBao: KV v2 layout, identities, failures, secrecy, cache."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import re
import socket
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from recgw_server.credentials.vault import (
    CachedCredentialsSource,
    VaultAuth,
    VaultConnection,
    VaultCredentialsAdmin,
    VaultCredentialsSource,
)
from recgw_server.dev.stack import (
    OpenBao,
    VaultIdentities,
    bootstrap_vault,
    free_port,
    reader_policy,
    start_openbao,
    writer_policy,
)
from recgw_server.domain import (
    EncryptionMode,
    ErrorKind,
    RecgwError,
    Secret,
    StorageTarget,
    TenantCredentials,
)

BASE = "recgw/tenants"
TARGET = StorageTarget(region="us-east-1", bucket="recordings-bucket")
FULL_TARGET = StorageTarget(
    region="eu-central-1",
    bucket="acme-calls",
    prefix="calls/acme/",
    endpoint_url="https://s3.example.com",
    force_path_style=True,
    encryption=EncryptionMode.KMS,
    kms_key_id="arn:aws:kms:eu-central-1:123456789012:key/abcd",
    allow_overwrite=True,
    equal_part_sizes=True,
    expected_bucket_owner="123456789012",
)


# --- secrecy ------------------------------------------------------------------------------


@dataclass(repr=False)  # a failing test must not print the secrets it holds
class LeakCheck:
    """Collects every secret a test handles; at teardown none may appear in logs or errors."""

    secrets: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def canary(self) -> Secret:
        value = "CANARY-SECRET-" + uuid.uuid4().hex
        self.secrets.append(value)
        return Secret(value)

    def hide(self, *values: str) -> None:
        self.secrets.extend(v for v in values if v)

    def raises(self, kind: ErrorKind, fn: Callable[[], object]) -> RecgwError:
        with pytest.raises(RecgwError) as caught:
            fn()
        assert caught.value.kind is kind, caught.value.message
        self.errors.append(caught.value)
        return caught.value

    def assert_clean(self, text: str, where: str) -> None:
        __tracebackhide__ = True  # pytest would print `text`, and so the secret, in the report
        leaked = [i for i, s in enumerate(self.secrets) if s in text]
        # the secret itself is not printed, only which one leaked
        assert not leaked, f"secret #{leaked} leaked into {where}"


@pytest.fixture
def leaks(caplog: pytest.LogCaptureFixture) -> Iterator[LeakCheck]:
    caplog.set_level(logging.DEBUG)
    check = LeakCheck()
    yield check
    # in teardown caplog.text holds only the teardown's records
    formatter = logging.Formatter()
    for when in ("setup", "call"):
        for record in caplog.get_records(when):
            check.assert_clean(formatter.format(record), "the log")
    for error in check.errors:
        check.assert_clean(str(error), "an exception text")
        check.assert_clean(repr(error), "an exception repr")
        check.assert_clean("".join(traceback.format_exception(error)), "a traceback")
        # the hvac exception (its text can hold response bodies) is not even kept as context
        assert error.__cause__ is None
        assert error.__context__ is None


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def identities(openbao: OpenBao) -> VaultIdentities:
    bootstrap_vault(openbao)
    return bootstrap_vault(openbao)  # idempotent: a second run on the same server works


@pytest.fixture
def writer(
    openbao: OpenBao, identities: VaultIdentities, leaks: LeakCheck
) -> Iterator[VaultConnection]:
    assert identities.writer.secret_id is not None
    leaks.hide(identities.writer.secret_id.reveal(), openbao.root_token.reveal())
    conn = VaultConnection(openbao.address, identities.writer)
    yield conn
    conn.close()


@pytest.fixture
def reader(
    openbao: OpenBao, identities: VaultIdentities, leaks: LeakCheck
) -> Iterator[VaultConnection]:
    assert identities.reader.secret_id is not None
    leaks.hide(identities.reader.secret_id.reveal(), openbao.root_token.reveal())
    conn = VaultConnection(openbao.address, identities.reader)
    yield conn
    conn.close()


@pytest.fixture
def admin(writer: VaultConnection) -> VaultCredentialsAdmin:
    return VaultCredentialsAdmin(writer)


@pytest.fixture
def source(reader: VaultConnection) -> VaultCredentialsSource:
    return VaultCredentialsSource(reader)


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def login(openbao: OpenBao, auth: VaultAuth) -> hvac.Client:
    """A plain hvac client logged in as this identity, to ask Vault itself what it allows."""
    assert auth.secret_id is not None
    client = hvac.Client(url=openbao.address)
    client.auth.approle.login(role_id=auth.role_id, secret_id=auth.secret_id.reveal())
    return client


def token_of(conn: VaultConnection) -> dict[str, Any]:
    """lookup-self of the connection's current token, without its id (the token itself)."""
    data: dict[str, Any] = run(conn.call(lambda c: c.auth.token.lookup_self()["data"]))
    data.pop("id")
    return data


def root_readable_versions(openbao: OpenBao, tenant: str, upto: int) -> list[int]:
    root = openbao.root_client()
    readable = []
    for version in range(1, upto + 1):
        try:
            root.secrets.kv.v2.read_secret_version(
                path=f"{BASE}/{tenant}", version=version, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            continue
        readable.append(version)
    return readable


# --- admin and source round trips ---------------------------------------------------------


def test_set_then_describe_round_trip(
    admin: VaultCredentialsAdmin, tenant: str, leaks: LeakCheck
) -> None:
    secret = leaks.canary()
    info = run(admin.set(tenant, "AKIAROUNDTRIP0WXYZ", secret, FULL_TARGET))
    assert info.tenant_id == tenant
    assert info.version == 1
    assert info.access_key_id_hint == "****WXYZ"
    assert info.target == FULL_TARGET
    assert info.updated_at is not None and info.updated_at.tzinfo is not None
    described = run(admin.describe(tenant))
    assert described == info
    for text in (repr(info), repr(described)):
        leaks.assert_clean(text, "a CredentialsInfo")
        assert "AKIAROUNDTRIP0" not in text


def test_defaults_round_trip_and_target_is_validated(
    admin: VaultCredentialsAdmin, source: VaultCredentialsSource, tenant: str, leaks: LeakCheck
) -> None:
    info = run(admin.set(tenant, "AKIADEFAULTS", leaks.canary(), StorageTarget("us-east-1", "b-1")))
    assert info.target.prefix == "uploads/"  # filled in by StorageTarget.validated()
    assert run(admin.describe(tenant)).target == info.target
    assert run(source.get(tenant)).target == info.target


def test_reader_gets_the_full_credentials(
    admin: VaultCredentialsAdmin, source: VaultCredentialsSource, tenant: str, leaks: LeakCheck
) -> None:
    secret = leaks.canary()
    run(admin.set(tenant, "AKIAREADER0001", secret, FULL_TARGET))
    credentials = run(source.get(tenant))
    assert re.fullmatch(r"recgw-[0-9a-f]{32}", credentials.external_id)
    assert credentials == TenantCredentials(
        tenant, "AKIAREADER0001", secret, FULL_TARGET, 1, external_id=credentials.external_id
    )
    assert credentials.secret_access_key.reveal() == secret.reveal()
    leaks.assert_clean(repr(credentials), "TenantCredentials' repr")


def test_a_role_is_stored_without_any_secret_and_keeps_its_external_id(
    admin: VaultCredentialsAdmin, source: VaultCredentialsSource, tenant: str, leaks: LeakCheck
) -> None:
    """The external id is made at the first set, survives overwrites (also a switch from keys
    to a role) and changes only on rotation; the writer keeps it without reading the data."""
    role_arn = "arn:aws:iam::123456789012:role/recgw-writer"
    keys = run(admin.set(tenant, "AKIABEFOREROLE", leaks.canary(), TARGET))
    info = run(admin.set(tenant, "", Secret(""), TARGET, role_arn=role_arn))
    assert (info.role_arn, info.access_key_id_hint) == (role_arn, "")
    assert info.external_id == keys.external_id
    assert run(admin.describe(tenant)) == info
    credentials = run(source.get(tenant))
    assert credentials is not None
    assert (credentials.role_arn, credentials.external_id) == (role_arn, info.external_id)
    assert (credentials.access_key_id, credentials.secret_access_key.reveal()) == ("", "")
    assert credentials.identity == role_arn
    rotated = run(
        admin.set(tenant, "", Secret(""), TARGET, role_arn=role_arn, rotate_external_id=True)
    )
    assert rotated.external_id != info.external_id
    assert run(source.get(tenant)).external_id == rotated.external_id
    for bad in ("arn:aws:iam::123456789012:user/someone", "recgw-writer"):
        set_bad = admin.set(tenant, "", Secret(""), TARGET, role_arn=bad)
        leaks.raises(ErrorKind.INVALID_ARGUMENT, functools.partial(run, set_bad))
    leaks.raises(
        ErrorKind.INVALID_ARGUMENT,
        lambda: run(admin.set(tenant, "AKIABOTH", leaks.canary(), TARGET, role_arn=role_arn)),
    )
    run(admin.delete(tenant))
    again = run(admin.set(tenant, "", Secret(""), TARGET, role_arn=role_arn))
    assert again.external_id != rotated.external_id  # a deleted tenant starts afresh


def test_unknown_tenant_is_none(
    admin: VaultCredentialsAdmin, source: VaultCredentialsSource, tenant: str
) -> None:
    assert run(admin.describe(tenant)) is None
    assert run(source.get(tenant)) is None


def test_overwrite_destroys_every_older_version(
    openbao: OpenBao,
    admin: VaultCredentialsAdmin,
    source: VaultCredentialsSource,
    tenant: str,
    leaks: LeakCheck,
) -> None:
    for expected_version in range(1, 5):
        secret = leaks.canary()
        info = run(admin.set(tenant, f"AKIAOVERWRITE{expected_version}", secret, TARGET))
        assert info.version == expected_version
        assert run(admin.describe(tenant)).version == expected_version
        got = run(source.get(tenant))
        assert got.secret_access_key == secret and got.version == expected_version
        # with the root token: only the current version is readable
        assert root_readable_versions(openbao, tenant, expected_version) == [expected_version]
    root = openbao.root_client()
    meta = root.secrets.kv.v2.read_secret_metadata(path=f"{BASE}/{tenant}")["data"]
    assert meta["max_versions"] == 1
    live = [v for v, m in meta["versions"].items() if not m["destroyed"]]
    assert live == ["4"]
    # the non-secret metadata names no older (nor current) secret
    leaks.assert_clean(str(meta), "the key's metadata")


def test_overwrite_destroys_older_versions_even_when_the_mount_keeps_more(
    openbao: OpenBao, tenant: str, leaks: LeakCheck
) -> None:
    # A mount's max_versions larger than the key's wins: destroying explicitly is what counts.
    mount = f"kv-{uuid.uuid4().hex[:8]}"
    root = openbao.root_client()
    root.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
    root.secrets.kv.v2.configure(max_versions=5, mount_point=mount)
    ids = bootstrap_vault(openbao, mount=mount, role_suffix=f"-{mount}")
    assert ids.writer.secret_id is not None
    leaks.hide(ids.writer.secret_id.reveal())
    conn = VaultConnection(openbao.address, ids.writer)
    admin = VaultCredentialsAdmin(conn, mount=mount)
    for _ in range(3):
        run(admin.set(tenant, "AKIAMOUNTKEEPS", leaks.canary(), TARGET))
    readable = []
    for version in (1, 2, 3):
        try:
            root.secrets.kv.v2.read_secret_version(
                path=f"{BASE}/{tenant}",
                version=version,
                mount_point=mount,
                raise_on_deleted_version=True,
            )
            readable.append(version)
        except hvac.exceptions.InvalidPath:
            pass
    assert readable == [3]
    meta = root.secrets.kv.v2.read_secret_metadata(path=f"{BASE}/{tenant}", mount_point=mount)
    versions = meta["data"]["versions"]
    assert {v for v, m in versions.items() if m["destroyed"]} == {"1", "2"}


def test_delete_removes_every_version(
    openbao: OpenBao,
    admin: VaultCredentialsAdmin,
    source: VaultCredentialsSource,
    tenant: str,
    leaks: LeakCheck,
) -> None:
    run(admin.set(tenant, "AKIADELETE01", leaks.canary(), TARGET))
    run(admin.set(tenant, "AKIADELETE02", leaks.canary(), TARGET))
    assert run(admin.delete(tenant)) is True
    assert run(admin.describe(tenant)) is None
    assert run(source.get(tenant)) is None
    root = openbao.root_client()
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.secrets.kv.v2.read_secret_metadata(path=f"{BASE}/{tenant}")
    assert root_readable_versions(openbao, tenant, 2) == []
    assert run(admin.delete(tenant)) is False


def test_delete_of_a_missing_tenant_is_false(admin: VaultCredentialsAdmin, tenant: str) -> None:
    assert run(admin.delete(tenant)) is False


def test_set_again_after_delete(
    admin: VaultCredentialsAdmin, source: VaultCredentialsSource, tenant: str, leaks: LeakCheck
) -> None:
    run(admin.set(tenant, "AKIAAGAIN001", leaks.canary(), TARGET))
    run(admin.delete(tenant))
    secret = leaks.canary()
    assert run(admin.set(tenant, "AKIAAGAIN002", secret, TARGET)).version == 1
    assert run(source.get(tenant)).secret_access_key == secret


# --- what Vault itself allows each identity -----------------------------------------------


def test_vault_refuses_the_writer_a_read_of_the_secret(
    openbao: OpenBao,
    identities: VaultIdentities,
    admin: VaultCredentialsAdmin,
    writer: VaultConnection,
    tenant: str,
    leaks: LeakCheck,
) -> None:
    run(admin.set(tenant, "AKIAWRITERNOREAD", leaks.canary(), TARGET))
    client = login(openbao, identities.writer)
    leaks.hide(client.token)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.kv.v2.read_secret_version(
            path=f"{BASE}/{tenant}", raise_on_deleted_version=True
        )
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.kv.v2.read_secret_version(
            path=f"{BASE}/{tenant}", version=1, raise_on_deleted_version=True
        )
    # through the adapter: a misconfiguration naming the identity and the path
    error = leaks.raises(
        ErrorKind.INTERNAL,
        lambda: run(
            writer.call(
                lambda c: c.secrets.kv.v2.read_secret_version(
                    path=f"{BASE}/{tenant}", raise_on_deleted_version=True
                )
            )
        ),
    )
    assert "recgw-writer" in error.message
    assert f"/v1/secret/data/{BASE}/{tenant}" in error.message


def test_vault_refuses_the_reader_writes_and_metadata(
    openbao: OpenBao, identities: VaultIdentities, tenant: str, leaks: LeakCheck
) -> None:
    client = login(openbao, identities.reader)
    leaks.hide(client.token)
    kv = client.secrets.kv.v2
    with pytest.raises(hvac.exceptions.Forbidden):
        kv.create_or_update_secret(path=f"{BASE}/{tenant}", secret={"x": "y"})
    with pytest.raises(hvac.exceptions.Forbidden):
        kv.read_secret_metadata(path=f"{BASE}/{tenant}")
    with pytest.raises(hvac.exceptions.Forbidden):
        kv.delete_metadata_and_all_versions(path=f"{BASE}/{tenant}")


def test_policies_are_what_the_identities_get() -> None:
    writer = writer_policy("secret", "recgw/tenants/")
    assert 'path "secret/data/recgw/tenants/*"' in writer
    assert '"read"' not in writer.split('path "secret/metadata')[0]
    assert reader_policy("kv", "x").count("path ") == 1


def test_describe_needs_only_the_metadata(
    openbao: OpenBao,
    admin: VaultCredentialsAdmin,
    tenant: str,
    leaks: LeakCheck,
) -> None:
    info = run(admin.set(tenant, "AKIAMETAONLY", leaks.canary(), FULL_TARGET))
    root = openbao.root_client()
    name = f"metadata-reader-{tenant}"
    root.sys.create_or_update_policy(
        name=name,
        policy=f'path "secret/metadata/{BASE}/*" {{\n  capabilities = ["read"]\n}}\n',
    )
    token = root.auth.token.create(policies=[name], ttl="5m")["auth"]["client_token"]
    leaks.hide(token)
    conn = VaultConnection(
        openbao.address, VaultAuth(method="token", token=Secret(token), name=name)
    )
    assert run(VaultCredentialsAdmin(conn).describe(tenant)) == info


def test_describe_reports_an_interrupted_set(
    openbao: OpenBao, admin: VaultCredentialsAdmin, tenant: str, leaks: LeakCheck
) -> None:
    run(admin.set(tenant, "AKIAINTERRUPT", leaks.canary(), TARGET))
    # a new version whose metadata was never recorded, as after a crash mid-set
    openbao.root_client().secrets.kv.v2.create_or_update_secret(
        path=f"{BASE}/{tenant}", secret={"access_key_id": "x", "secret_access_key": "y"}
    )
    leaks.raises(ErrorKind.ABORTED, lambda: run(admin.describe(tenant)))


# --- input validation ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "A", "a/b", "", "a" * 64, "-a", "a b", "é"])
def test_malformed_tenant_ids_are_refused_before_vault(
    admin: VaultCredentialsAdmin,
    source: VaultCredentialsSource,
    writer: VaultConnection,
    reader: VaultConnection,
    leaks: LeakCheck,
    bad: str,
) -> None:
    secret = leaks.canary()
    leaks.raises(
        ErrorKind.INVALID_ARGUMENT, lambda: run(admin.set(bad, "AKIABADTENANT", secret, TARGET))
    )
    leaks.raises(ErrorKind.INVALID_ARGUMENT, lambda: run(admin.describe(bad)))
    leaks.raises(ErrorKind.INVALID_ARGUMENT, lambda: run(admin.delete(bad)))
    leaks.raises(ErrorKind.INVALID_ARGUMENT, lambda: run(source.get(bad)))
    # nothing reached Vault: every call logs in first, and none did
    assert writer.login_count == 0 and reader.login_count == 0


def test_longest_tenant_id_is_accepted(admin: VaultCredentialsAdmin, leaks: LeakCheck) -> None:
    tenant = uuid.uuid4().hex + "x" * 31
    assert len(tenant) == 63
    assert run(admin.set(tenant, "AKIALONGTENANT", leaks.canary(), TARGET)).version == 1
    assert run(admin.delete(tenant)) is True


@pytest.mark.parametrize(
    ("access_key_id", "with_secret", "target"),
    [
        ("", True, TARGET),
        ("AKIA WITH SPACE", True, TARGET),
        ("AKIA" + "X" * 200, True, TARGET),
        ("AKIAOK", False, TARGET),
        ("AKIAOK", True, StorageTarget(region="us-east-1", bucket="Bad_Bucket")),
        ("AKIAOK", True, StorageTarget(region="us-east-1", bucket="b-1", endpoint_url="ftp://x")),
    ],
)
def test_invalid_set_arguments_write_nothing(
    admin: VaultCredentialsAdmin,
    writer: VaultConnection,
    tenant: str,
    leaks: LeakCheck,
    access_key_id: str,
    with_secret: bool,
    target: StorageTarget,
) -> None:
    secret = leaks.canary() if with_secret else Secret("")
    leaks.raises(
        ErrorKind.INVALID_ARGUMENT, lambda: run(admin.set(tenant, access_key_id, secret, target))
    )
    assert writer.login_count == 0
    assert run(admin.describe(tenant)) is None


def test_a_missing_mount_is_a_misconfiguration_not_a_missing_tenant(
    openbao: OpenBao, tenant: str, leaks: LeakCheck
) -> None:
    root = VaultConnection(
        openbao.address, VaultAuth(method="token", token=openbao.root_token, name="root")
    )
    admin = VaultCredentialsAdmin(root, mount="no-such-mount")
    error = leaks.raises(ErrorKind.INTERNAL, lambda: run(admin.describe(tenant)))
    assert "/v1/no-such-mount/metadata/" in error.message
    leaks.raises(
        ErrorKind.INTERNAL, lambda: run(VaultCredentialsSource(root, "no-such-mount").get(tenant))
    )


# --- tokens: re-login and renewal ---------------------------------------------------------


def test_approle_logs_in_again_after_its_token_is_revoked(
    openbao: OpenBao,
    admin: VaultCredentialsAdmin,
    source: VaultCredentialsSource,
    writer: VaultConnection,
    reader: VaultConnection,
    tenant: str,
    leaks: LeakCheck,
) -> None:
    secret = leaks.canary()
    run(admin.set(tenant, "AKIARELOGIN01", secret, TARGET))
    assert run(source.get(tenant)).secret_access_key == secret
    root = openbao.root_client()
    for conn in (writer, reader):
        root.auth.token.revoke_accessor(token_of(conn)["accessor"])
    assert writer.login_count == reader.login_count == 1
    assert run(source.get(tenant)).secret_access_key == secret
    assert run(admin.describe(tenant)) is not None
    assert writer.login_count == reader.login_count == 2


def test_token_is_renewed_when_due(openbao: OpenBao, tenant: str, leaks: LeakCheck) -> None:
    ids = bootstrap_vault(openbao, token_ttl="30s", role_suffix="-short")
    assert ids.reader.secret_id is not None
    leaks.hide(ids.reader.secret_id.reveal())
    # renew_margin=1.0: a renewal is due as soon as any time has passed since the last one
    conn = VaultConnection(openbao.address, ids.reader, renew_margin=1.0)
    source = VaultCredentialsSource(conn)
    assert run(source.get(tenant)) is None
    assert (conn.login_count, conn.renewal_count) == (1, 0)
    accessor = token_of(conn)["accessor"]  # a call too: it renews
    assert (conn.login_count, conn.renewal_count) == (1, 1)
    root = openbao.root_client()

    def renewed_at() -> datetime:
        token = root.auth.token.lookup_accessor(accessor)["data"]
        assert 28 <= token["ttl"] <= 30
        return datetime.fromisoformat(token["last_renewal"])

    first = renewed_at()
    assert run(source.get(tenant)) is None
    assert (conn.login_count, conn.renewal_count) == (1, 2)
    assert renewed_at() > first
    # with the default margin of 0.5 nothing is due for 15 s
    fresh = VaultConnection(openbao.address, ids.reader)
    for _ in range(3):
        run(VaultCredentialsSource(fresh).get(tenant))
    assert (fresh.login_count, fresh.renewal_count) == (1, 0)


def test_renewal_refused_falls_back_to_a_new_login(
    openbao: OpenBao, tenant: str, leaks: LeakCheck
) -> None:
    ids = bootstrap_vault(openbao, token_ttl="30s", role_suffix="-short")
    assert ids.reader.secret_id is not None
    leaks.hide(ids.reader.secret_id.reveal())
    conn = VaultConnection(openbao.address, ids.reader, renew_margin=1.0)
    source = VaultCredentialsSource(conn)
    run(source.get(tenant))
    openbao.root_client().auth.token.revoke_accessor(token_of(conn)["accessor"])
    assert run(source.get(tenant)) is None
    assert conn.login_count == 2


def test_token_auth_cannot_log_in_again(openbao: OpenBao, tenant: str, leaks: LeakCheck) -> None:
    root = openbao.root_client()
    root.sys.create_or_update_policy(
        name="recgw-reader-by-token", policy=reader_policy("secret", BASE)
    )
    created = root.auth.token.create(policies=["recgw-reader-by-token"], ttl="5m")["auth"]
    leaks.hide(created["client_token"])
    conn = VaultConnection(
        openbao.address, VaultAuth(method="token", token=Secret(created["client_token"]))
    )
    source = VaultCredentialsSource(conn)
    assert run(source.get(tenant)) is None
    root.auth.token.revoke_accessor(created["accessor"])
    error = leaks.raises(ErrorKind.INTERNAL, lambda: run(source.get(tenant)))
    assert "token" in error.message
    assert conn.login_count == 1


def test_wrong_secret_id_is_a_misconfiguration(
    openbao: OpenBao, identities: VaultIdentities, tenant: str, leaks: LeakCheck
) -> None:
    wrong = leaks.canary()
    auth = VaultAuth(
        method="approle", role_id=identities.reader.role_id, secret_id=wrong, name="recgw-reader"
    )
    conn = VaultConnection(openbao.address, auth)
    error = leaks.raises(ErrorKind.INTERNAL, lambda: run(VaultCredentialsSource(conn).get(tenant)))
    assert "recgw-reader" in error.message and "secret_id" in error.message
    leaks.assert_clean(repr(conn) + repr(auth), "a repr")


# --- Vault unavailable --------------------------------------------------------------------


def test_unreachable_vault_is_unavailable(identities: VaultIdentities, leaks: LeakCheck) -> None:
    assert identities.reader.secret_id is not None
    leaks.hide(identities.reader.secret_id.reveal())
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    conn = VaultConnection(address, identities.reader, timeout=2)
    admin = VaultCredentialsAdmin(VaultConnection(address, identities.writer, timeout=2))
    error = leaks.raises(
        ErrorKind.UNAVAILABLE, lambda: run(VaultCredentialsSource(conn).get("tenant-1"))
    )
    assert "retry later" in error.message
    leaks.raises(ErrorKind.UNAVAILABLE, lambda: run(admin.describe("tenant-1")))
    leaks.raises(
        ErrorKind.UNAVAILABLE,
        lambda: run(admin.set("tenant-1", "AKIAUNREACH", leaks.canary(), TARGET)),
    )


def test_vault_not_answering_in_time_is_unavailable(
    identities: VaultIdentities, leaks: LeakCheck
) -> None:
    assert identities.reader.secret_id is not None
    leaks.hide(identities.reader.secret_id.reveal())
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        conn = VaultConnection(address, identities.reader, timeout=0.3)
        error = leaks.raises(
            ErrorKind.UNAVAILABLE, lambda: run(VaultCredentialsSource(conn).get("tenant-1"))
        )
    assert "in time" in error.message


def test_sealed_vault_is_unavailable(tmp_path: Path, leaks: LeakCheck) -> None:
    bao = start_openbao(tmp_path / "sealed")  # its own server: the shared one stays unsealed
    try:
        leaks.hide(bao.root_token.reveal())
        ids = bootstrap_vault(bao)
        for auth in (ids.reader, ids.writer):
            assert auth.secret_id is not None
            leaks.hide(auth.secret_id.reveal())
        admin = VaultCredentialsAdmin(VaultConnection(bao.address, ids.writer))
        reader = VaultConnection(bao.address, ids.reader)
        source = VaultCredentialsSource(reader)
        run(admin.set("sealed-tenant", "AKIASEALED01", leaks.canary(), TARGET))
        assert run(source.get("sealed-tenant")) is not None
        bao.root_client().sys.seal()
        error = leaks.raises(ErrorKind.UNAVAILABLE, lambda: run(source.get("sealed-tenant")))
        assert "sealed" in error.message
        leaks.raises(ErrorKind.UNAVAILABLE, lambda: run(admin.describe("sealed-tenant")))
        leaks.raises(
            ErrorKind.UNAVAILABLE,
            lambda: run(admin.set("sealed-tenant", "AKIASEALED02", leaks.canary(), TARGET)),
        )
        # a fresh login against the sealed server fails the same way
        fresh = VaultCredentialsSource(VaultConnection(bao.address, ids.reader))
        leaks.raises(ErrorKind.UNAVAILABLE, lambda: run(fresh.get("sealed-tenant")))
    finally:
        bao.stop()


# --- threads ------------------------------------------------------------------------------


def test_calls_run_off_the_event_loop_thread(
    openbao: OpenBao, identities: VaultIdentities, leaks: LeakCheck
) -> None:
    assert identities.reader.secret_id is not None
    leaks.hide(identities.reader.secret_id.reveal())

    async def thread_of_call(conn: VaultConnection) -> tuple[int, str]:
        return threading.get_ident(), await conn.call(lambda c: threading.current_thread().name)

    loop_thread, call_thread = run(
        thread_of_call(VaultConnection(openbao.address, identities.reader))
    )
    assert call_thread != threading.current_thread().name
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vault-io") as pool:
        conn = VaultConnection(openbao.address, identities.reader, executor=pool)
        _, call_thread = run(thread_of_call(conn))
    assert call_thread.startswith("vault-io")
    assert loop_thread == threading.get_ident()


def test_concurrent_calls_share_one_login(
    openbao: OpenBao, identities: VaultIdentities, tenant: str, leaks: LeakCheck
) -> None:
    assert identities.reader.secret_id is not None
    leaks.hide(identities.reader.secret_id.reveal())
    conn = VaultConnection(openbao.address, identities.reader)
    source = VaultCredentialsSource(conn)

    async def many() -> list[TenantCredentials | None]:
        return await asyncio.gather(*(source.get(tenant) for _ in range(8)))

    assert run(many()) == [None] * 8
    assert conn.login_count == 1


# --- cache --------------------------------------------------------------------------------


class FakeSource:
    """A CredentialsSource counting its reads; `gate` (when set) holds every read until opened."""

    def __init__(self) -> None:
        self.stored: dict[str, TenantCredentials] = {}
        self.reads = 0
        self.invalidated: list[str] = []
        self.gate: asyncio.Event | None = None

    async def get(self, tenant_id: str) -> TenantCredentials | None:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.stored.get(tenant_id)

    def invalidate(self, tenant_id: str) -> None:
        self.invalidated.append(tenant_id)

    def invalidate_all(self) -> None:
        self.invalidated.append("*")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def creds(tenant: str, secret: str = "s", version: int = 1) -> TenantCredentials:
    return TenantCredentials(tenant, "AKIAFAKE", Secret(secret), TARGET, version)


def test_cache_serves_hits_within_ttl_and_reloads_after() -> None:
    inner, clock = FakeSource(), FakeClock()
    inner.stored["a"] = creds("a")
    cache = CachedCredentialsSource(inner, ttl_seconds=30, clock=clock)
    assert run(cache.get("a")) == creds("a")
    clock.now += 29.9
    assert run(cache.get("a")) == creds("a")
    assert inner.reads == 1
    clock.now += 0.2
    inner.stored["a"] = creds("a", "s2", 2)
    assert run(cache.get("a")) == creds("a", "s2", 2)
    assert inner.reads == 2


def test_cache_invalidate_forces_a_reload_of_that_tenant_only() -> None:
    inner, clock = FakeSource(), FakeClock()
    inner.stored = {"a": creds("a"), "b": creds("b")}
    cache = CachedCredentialsSource(inner, ttl_seconds=30, clock=clock)
    run(cache.get("a"))
    run(cache.get("b"))
    inner.stored["a"] = creds("a", "new", 2)
    cache.invalidate("a")
    assert inner.invalidated == ["a"]
    assert run(cache.get("a")) == creds("a", "new", 2)
    run(cache.get("b"))
    assert inner.reads == 3


def test_cache_does_not_keep_misses() -> None:
    inner, clock = FakeSource(), FakeClock()
    cache = CachedCredentialsSource(inner, ttl_seconds=30, clock=clock)
    assert run(cache.get("a")) is None
    inner.stored["a"] = creds("a")  # set through another instance: no invalidate here
    assert run(cache.get("a")) == creds("a")
    assert inner.reads == 2


def test_cache_does_not_keep_errors() -> None:
    class Failing(FakeSource):
        async def get(self, tenant_id: str) -> TenantCredentials | None:
            self.reads += 1
            if self.reads == 1:
                raise RecgwError(ErrorKind.UNAVAILABLE, "down")
            return creds(tenant_id)

    inner = Failing()
    cache = CachedCredentialsSource(inner, ttl_seconds=30, clock=FakeClock())
    with pytest.raises(RecgwError):
        run(cache.get("a"))
    assert run(cache.get("a")) == creds("a")


def test_cache_coalesces_concurrent_loads() -> None:
    inner, clock = FakeSource(), FakeClock()
    inner.stored["a"] = creds("a")
    cache = CachedCredentialsSource(inner, ttl_seconds=30, clock=clock)

    async def scenario() -> list[TenantCredentials | None]:
        inner.gate = asyncio.Event()
        waiting = [asyncio.create_task(cache.get("a")) for _ in range(5)]
        await asyncio.sleep(0)
        # one caller giving up does not cancel the load the others wait for
        waiting[0].cancel()
        inner.gate.set()
        return await asyncio.gather(*waiting[1:])

    assert run(scenario()) == [creds("a")] * 4
    assert inner.reads == 1


def test_cache_does_not_store_a_load_that_an_invalidate_overtook() -> None:
    inner, clock = FakeSource(), FakeClock()
    inner.stored["a"] = creds("a", "old")
    cache = CachedCredentialsSource(inner, ttl_seconds=30, clock=clock)

    async def scenario() -> TenantCredentials | None:
        inner.gate = asyncio.Event()
        loading = asyncio.create_task(cache.get("a"))
        while inner.reads == 0:  # the read of the old value is under way
            await asyncio.sleep(0)
        inner.stored["a"] = creds("a", "new", 2)
        cache.invalidate("a")
        inner.gate.set()
        await loading
        return await cache.get("a")

    assert run(scenario()) == creds("a", "new", 2)
    assert inner.reads == 2


def test_cached_vault_source_after_overwrite_and_invalidate(
    admin: VaultCredentialsAdmin, source: VaultCredentialsSource, tenant: str, leaks: LeakCheck
) -> None:
    cache = CachedCredentialsSource(source, ttl_seconds=300)
    first, second = leaks.canary(), leaks.canary()
    run(admin.set(tenant, "AKIACACHE01", first, TARGET))
    assert run(cache.get(tenant)).secret_access_key == first
    run(admin.set(tenant, "AKIACACHE02", second, TARGET))
    assert run(cache.get(tenant)).secret_access_key == first  # still cached
    cache.invalidate(tenant)
    got = run(cache.get(tenant))
    assert got.secret_access_key == second and got.version == 2
