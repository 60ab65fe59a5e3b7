"""Tenant scopes: a token reaches only its tenants, for every RPC, in both directions."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from recgw.v1 import credentials_pb2, upload_pb2

from recgw_server.auth.tokens import TenantScope, check_tenant_pattern, hash_token
from recgw_server.dev.stack import MotoS3, OpenBao, VaultIdentities, seed_policy, wait_until
from tests.harness import (
    ADMIN,
    ADMIN_TOKEN,
    GatewayThread,
    Metadata,
    MiB,
    Tenant,
    bearer,
    error_info,
    make_settings,
    object_exists,
    register_canary,
    set_credentials,
    upload_messages,
)

TOKENS = {
    name: register_canary(f"{name}-CANARY-TOKEN-{uuid.uuid4().hex}")
    for name in ("uploader-a", "uploader-b", "admin-a")
}


def as_(name: str) -> Metadata:
    return bearer(TOKENS[name])


@dataclass
class Scoped:
    gateway: GatewayThread
    a: Tenant
    b: Tenant
    moto: MotoS3


def _tenant(moto: MotoS3, label: str) -> Tenant:
    suffix = uuid.uuid4().hex[:10]
    bucket = f"recgw-scope-{suffix}"
    moto.create_bucket(bucket)
    keys = moto.create_user(f"scope-{suffix}", seed_policy(bucket))
    return Tenant(f"{label}-{suffix}", bucket, keys)


@pytest.fixture(scope="module")
def scoped(openbao: OpenBao, identities: VaultIdentities, moto: MotoS3) -> Iterator[Scoped]:
    a, b = _tenant(moto, "a"), _tenant(moto, "b")
    tokens = [
        {"name": "uploader-a", "role": "uploader", "tenants": [a.tenant_id]},
        {"name": "uploader-b", "role": "uploader", "tenants": ["b-*"]},  # a pattern
        {"name": "admin-a", "role": "admin", "tenants": [a.tenant_id]},
        {"name": "admin", "role": "admin", "tenants": ["*"], "sha256": hash_token(ADMIN_TOKEN)},
    ]
    for token in tokens:
        if "sha256" not in token:
            token["sha256"] = hash_token(TOKENS[str(token["name"])])
    gateway = GatewayThread(make_settings(openbao, identities, tokens=tokens))
    for tenant in (a, b):
        set_credentials(gateway, tenant, endpoint_url=moto.endpoint_url)
    yield Scoped(gateway, a, b, moto)
    gateway.stop()


def _upload(
    scoped: Scoped, token: str, tenant: Tenant, name: str, data: bytes = b"abc", **options: object
) -> upload_pb2.UploadResponse:
    response: upload_pb2.UploadResponse = scoped.gateway.uploads.Upload(
        upload_messages(tenant.tenant_id, name, data, **options),  # type: ignore[arg-type]
        metadata=as_(token),
        timeout=60,
    )
    return response


def _error(call: object, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value


@pytest.mark.parametrize(
    ("token", "own", "other"), [("uploader-a", "a", "b"), ("uploader-b", "b", "a")]
)
def test_upload_only_for_own_tenants(scoped: Scoped, token: str, own: str, other: str) -> None:
    mine, theirs = getattr(scoped, own), getattr(scoped, other)
    assert _upload(scoped, token, mine, f"{token}/ok.bin").size == 3
    error = _error(_upload, scoped, token, theirs, f"{token}/denied.bin")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    reason, details = error_info(error)
    assert reason == "TENANT_NOT_ALLOWED"
    assert details["tenant_id"] == theirs.tenant_id
    assert f"'{token}' may not act for tenant '{theirs.tenant_id}'" in str(error.details())
    assert not object_exists(scoped.moto, theirs.bucket, f"uploads/{token}/denied.bin")


def _open_upload(scoped: Scoped, token: str, tenant: Tenant) -> tuple[str, threading.Event, object]:
    """An upload of `tenant` left open (its stream held) and the future of that stream."""
    upload_id = str(uuid.uuid4())
    release = threading.Event()

    def held() -> Iterator[upload_pb2.UploadRequest]:
        for message in upload_messages(
            tenant.tenant_id, f"open/{upload_id}", os.urandom(2 * MiB), upload_id=upload_id
        ):
            if message.finish_write:
                release.wait(30)
            yield message

    pool = ThreadPoolExecutor(1)
    future = pool.submit(scoped.gateway.uploads.Upload, held(), metadata=as_(token), timeout=60)
    pool.shutdown(wait=False)

    def visible() -> bool:
        request = upload_pb2.GetUploadStatusRequest(upload_id=upload_id)
        status = scoped.gateway.uploads.GetUploadStatus(request, metadata=as_(token))
        return bool(status.received_size > 0)

    wait_until(visible, 30, "the open upload")
    return upload_id, release, future


def test_other_tenants_uploads_are_not_found(scoped: Scoped) -> None:
    uploads = scoped.gateway.uploads
    upload_id, release, future = _open_upload(scoped, "uploader-b", scoped.b)
    try:
        unknown = str(uuid.uuid4())
        for method, request_type in (
            (uploads.GetUploadStatus, upload_pb2.GetUploadStatusRequest),
            (uploads.AbortUpload, upload_pb2.AbortUploadRequest),
            (uploads.SalvageUpload, upload_pb2.SalvageUploadRequest),
        ):
            foreign = _error(method, request_type(upload_id=upload_id), metadata=as_("uploader-a"))
            missing = _error(method, request_type(upload_id=unknown), metadata=as_("uploader-a"))
            assert foreign.code() == missing.code() == grpc.StatusCode.NOT_FOUND
            assert error_info(foreign) == error_info(missing) == ("UPLOAD_NOT_FOUND", {})
            assert str(foreign.details()).replace(upload_id, unknown) == missing.details()
        # Nothing happened to it: its own tenant's token still sees it open, and may abort it.
        status = uploads.GetUploadStatus(
            upload_pb2.GetUploadStatusRequest(upload_id=upload_id), metadata=as_("uploader-b")
        )
        assert status.state == upload_pb2.UPLOAD_STATE_OPEN
        assert status.tenant_id == scoped.b.tenant_id
        aborted = uploads.AbortUpload(
            upload_pb2.AbortUploadRequest(upload_id=upload_id), metadata=as_("uploader-b")
        )
        assert aborted.state == upload_pb2.UPLOAD_STATE_ABORTED
    finally:
        release.set()
    error = _error(future.result)  # type: ignore[attr-defined]
    assert error.code() == grpc.StatusCode.ABORTED


def test_resuming_another_tenants_upload_is_denied(scoped: Scoped) -> None:
    done = _upload(scoped, "uploader-b", scoped.b, "resume/b.bin")
    # Naming tenant B is refused before the upload id is looked at.
    error = _error(
        _upload, scoped, "uploader-a", scoped.b, "resume/b.bin", upload_id=done.upload_id
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(error)[0] == "TENANT_NOT_ALLOWED"


def _credentials_calls(tenant: Tenant) -> dict[str, tuple[str, Any]]:
    keys = tenant.keys
    return {
        "set": (
            "SetCredentials",
            credentials_pb2.SetCredentialsRequest(
                tenant_id=tenant.tenant_id,
                access_key_id=keys.access_key_id,
                secret_access_key=keys.secret_access_key.reveal(),
                target=credentials_pb2.StorageTarget(region="us-east-1", bucket=tenant.bucket),
            ),
        ),
        "describe": (
            "DescribeCredentials",
            credentials_pb2.DescribeCredentialsRequest(tenant_id=tenant.tenant_id),
        ),
        "verify": (
            "VerifyCredentials",
            credentials_pb2.VerifyCredentialsRequest(tenant_id=tenant.tenant_id),
        ),
        "delete": (
            "DeleteCredentials",
            credentials_pb2.DeleteCredentialsRequest(tenant_id=tenant.tenant_id),
        ),
    }


def test_admin_scoped_to_a_cannot_touch_bs_credentials(scoped: Scoped) -> None:
    stub = scoped.gateway.credentials
    describe_b = credentials_pb2.DescribeCredentialsRequest(tenant_id=scoped.b.tenant_id)
    before = stub.DescribeCredentials(describe_b, metadata=ADMIN).credentials
    for operation, (method, request) in _credentials_calls(scoped.b).items():
        error = _error(getattr(stub, method), request, metadata=as_("admin-a"))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, operation
        assert error_info(error)[0] == "TENANT_NOT_ALLOWED", operation
    after = stub.DescribeCredentials(describe_b, metadata=ADMIN).credentials
    assert after == before  # same version, same target: nothing was written or deleted
    # ... while for A, the same admin token may do all of it.
    own = _credentials_calls(scoped.a)
    for operation in ("describe", "verify"):
        method, request = own[operation]
        getattr(stub, method)(request, metadata=as_("admin-a"))
    assert stub.VerifyCredentials(own["verify"][1], metadata=as_("admin-a")).ok


def test_scoped_admin_may_replace_and_delete_its_own_tenant(scoped: Scoped, moto: MotoS3) -> None:
    stub = scoped.gateway.credentials
    c = Tenant(
        scoped.a.tenant_id,
        scoped.a.bucket,
        moto.create_user(f"scope-c-{uuid.uuid4().hex[:8]}", seed_policy(scoped.a.bucket)),
    )
    try:
        calls = _credentials_calls(c)
        stub.SetCredentials(calls["set"][1], metadata=as_("admin-a"))
        stub.DeleteCredentials(calls["delete"][1], metadata=as_("admin-a"))
        error = _error(stub.DescribeCredentials, calls["describe"][1], metadata=ADMIN)
        assert error.code() == grpc.StatusCode.NOT_FOUND
    finally:
        set_credentials(scoped.gateway, scoped.a, endpoint_url=moto.endpoint_url)


@pytest.mark.parametrize(
    ("patterns", "allowed", "refused"),
    [
        (("acme",), ["acme"], ["acme2", "xacme", "acm", ""]),
        (("acme-*",), ["acme-", "acme-eu", "acme-eu-1"], ["acme", "acmex", "x-acme-eu"]),
        (("*",), ["acme", "b", "z-9"], []),
        (("a*z", "solo"), ["az", "abcz", "solo"], ["a", "za", "solo2"]),
        ((), [], ["acme", "*"]),
    ],
)
def test_tenant_scope_patterns(
    patterns: tuple[str, ...], allowed: list[str], refused: list[str]
) -> None:
    scope = TenantScope(patterns)
    for tenant_id in allowed:
        assert scope.allows(tenant_id), tenant_id
    for tenant_id in refused:
        assert not scope.allows(tenant_id), tenant_id


@pytest.mark.parametrize("pattern", ["", "ACME", "a.b", "a?", "a[b]", "-a", "a" * 64, "a b"])
def test_tenant_patterns_are_checked(pattern: str) -> None:
    with pytest.raises(ValueError, match="tenant patterns"):
        check_tenant_pattern(pattern)
