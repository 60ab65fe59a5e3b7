"""CredentialsService over real gRPC, Vault and moto: write-only, never read back."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from recgw.v1 import credentials_pb2, upload_pb2

from recgw_server.credentials.vault import CachedCredentialsSource
from recgw_server.dev.stack import AwsKeys, MotoS3, OpenBao, seed_policy, wait_until
from recgw_server.domain import Secret
from tests.conftest import SHARED_BUCKET
from tests.harness import (
    ADMIN,
    UPLOADER,
    GatewayThread,
    Tenant,
    details,
    object_exists,
    read_object,
    set_credentials,
    upload,
    upload_messages,
)


def describe(gateway: GatewayThread, tenant_id: str) -> credentials_pb2.CredentialsView:
    response = gateway.credentials.DescribeCredentials(
        credentials_pb2.DescribeCredentialsRequest(tenant_id=tenant_id), metadata=ADMIN
    )
    view: credentials_pb2.CredentialsView = response.credentials
    return view


def verify(gateway: GatewayThread, tenant_id: str) -> credentials_pb2.VerifyCredentialsResponse:
    response: credentials_pb2.VerifyCredentialsResponse = gateway.credentials.VerifyCredentials(
        credentials_pb2.VerifyCredentialsRequest(tenant_id=tenant_id), metadata=ADMIN
    )
    return response


def test_set_returns_only_what_a_ui_may_show(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant()
    response = set_credentials(gateway, tenant, endpoint_url=moto.endpoint_url)
    secret = tenant.keys.secret_access_key.reveal()
    assert secret.encode() not in response.SerializeToString()
    assert tenant.keys.access_key_id.encode() not in response.SerializeToString()
    view = response.credentials
    assert view.access_key_id_hint == "****" + tenant.keys.access_key_id[-4:]
    assert view.version >= 1
    assert view.target.bucket == tenant.bucket
    assert view.target.prefix == "uploads/"
    assert view.update_time.seconds > 0
    described = describe(gateway, tenant.tenant_id)
    assert described == view
    assert secret.encode() not in described.SerializeToString()


def test_prefix_defaults_to_uploads(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(prefix="")
    response = set_credentials(gateway, tenant, endpoint_url=moto.endpoint_url)
    assert response.credentials.target.prefix == "uploads/"


def test_overwrite_takes_effect_for_the_next_upload(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant], openbao: OpenBao
) -> None:
    tenant = new_tenant()
    good = tenant.keys
    tenant.keys = AwsKeys(good.access_key_id, Secret("CANARY-WRONG-" + uuid.uuid4().hex))
    first = set_credentials(gateway, tenant, endpoint_url=moto.endpoint_url)
    with pytest.raises(grpc.RpcError) as caught:
        upload(gateway, upload_messages(tenant.tenant_id, "before.bin", b"abc"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    tenant.keys = good
    second = set_credentials(gateway, tenant, endpoint_url=moto.endpoint_url)
    assert second.credentials.version == first.credentials.version + 1
    response = upload(gateway, upload_messages(tenant.tenant_id, "after.bin", b"abc"))
    assert read_object(moto, tenant.bucket, response.key) == b"abc"
    # The older version's secret is gone from Vault itself.
    root = openbao.root_client()
    path = f"recgw/tenants/{tenant.tenant_id}"
    old = root.secrets.kv.v2.read_secret_metadata(path=path, mount_point="secret")["data"]
    for version, info in old["versions"].items():
        if int(version) < second.credentials.version:
            assert info["destroyed"]


def test_delete_removes_credentials(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(gateway=gateway)
    upload(gateway, upload_messages(tenant.tenant_id, "del.bin", b"abc"))
    gateway.credentials.DeleteCredentials(
        credentials_pb2.DeleteCredentialsRequest(tenant_id=tenant.tenant_id), metadata=ADMIN
    )
    with pytest.raises(grpc.RpcError) as caught:
        describe(gateway, tenant.tenant_id)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        upload(gateway, upload_messages(tenant.tenant_id, "del2.bin", b"abc"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as caught:
        gateway.credentials.DeleteCredentials(
            credentials_pb2.DeleteCredentialsRequest(tenant_id=tenant.tenant_id), metadata=ADMIN
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_verify_with_the_seed_policy(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(gateway=gateway)
    first = verify(gateway, tenant.tenant_id)
    second = verify(gateway, tenant.tenant_id)
    assert first.ok and second.ok
    assert first.key == second.key == "uploads/.recgw-write-check"
    assert object_exists(moto, tenant.bucket, first.key)


def test_verify_reports_the_s3_error_code(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant()
    tenant.keys = AwsKeys(tenant.keys.access_key_id, Secret("CANARY-WRONG-" + uuid.uuid4().hex))
    set_credentials(gateway, tenant, endpoint_url=moto.endpoint_url)
    report = verify(gateway, tenant.tenant_id)
    assert not report.ok
    assert report.error_code == "SignatureDoesNotMatch"
    assert "SetCredentials" in report.error_message
    denied = new_tenant(
        policy=seed_policy(SHARED_BUCKET, "uploads/*"), bucket=SHARED_BUCKET, prefix="other/"
    )
    set_credentials(gateway, denied, endpoint_url=moto.endpoint_url)
    report = verify(gateway, denied.tenant_id)
    assert (report.ok, report.error_code) == (False, "AccessDenied")


def test_verify_unknown_tenant(gateway: GatewayThread) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        verify(gateway, "unknown-" + uuid.uuid4().hex[:8])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("change", "hint"),
    [
        ({"tenant_id": "Bad/Id"}, "tenant_id must match"),
        ({"access_key_id": ""}, "access_key_id"),
        ({"secret_access_key": ""}, "secret_access_key is required"),
        ({"secret_access_key": "has space"}, "whitespace"),
        ({"region": "Not A Region"}, "region must be"),
        ({"bucket": "Not_A_Bucket"}, "bucket must be"),
        ({"prefix": "/abs/"}, "prefix must not start with '/'"),
        ({"prefix": "noslash"}, "must end with '/'"),
        ({"prefix": "a/../b/"}, "'..'"),
        ({"endpoint_url": "ftp://x"}, "endpoint_url"),
    ],
)
def test_set_rejects_bad_input(gateway: GatewayThread, change: dict[str, str], hint: str) -> None:
    fields = {
        "tenant_id": "bad-input-" + uuid.uuid4().hex[:6],
        "access_key_id": "AKIAEXAMPLE000000000",
        "secret_access_key": "CANARY-" + uuid.uuid4().hex,
        "region": "us-east-1",
        "bucket": "some-bucket",
        "prefix": "uploads/",
        "endpoint_url": "",
    }
    fields.update(change)
    request = credentials_pb2.SetCredentialsRequest(
        tenant_id=fields["tenant_id"],
        access_key_id=fields["access_key_id"],
        secret_access_key=fields["secret_access_key"],
        target=credentials_pb2.StorageTarget(
            region=fields["region"],
            bucket=fields["bucket"],
            prefix=fields["prefix"],
            endpoint_url=fields["endpoint_url"],
        ),
    )
    with pytest.raises(grpc.RpcError) as caught:
        gateway.credentials.SetCredentials(request, metadata=ADMIN)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert hint in details(caught.value)
    if fields["secret_access_key"]:
        assert fields["secret_access_key"] not in details(caught.value)


def test_there_is_no_rpc_that_returns_a_secret() -> None:
    """Every response message of the API, field by field: none can carry a secret."""
    from recgw.v1 import credentials_pb2 as c
    from recgw.v1 import upload_pb2 as u

    services = [
        c.DESCRIPTOR.services_by_name["CredentialsService"],
        u.DESCRIPTOR.services_by_name["UploadService"],
    ]
    seen: set[str] = set()

    def field_names(descriptor: object) -> None:
        for field in descriptor.fields:  # type: ignore[attr-defined]
            assert "secret" not in field.name, f"{descriptor.full_name}.{field.name}"  # type: ignore[attr-defined]
            assert "token" not in field.name
            if field.message_type is not None and field.message_type.full_name not in seen:
                seen.add(field.message_type.full_name)
                field_names(field.message_type)

    for service in services:
        for method in service.methods:
            field_names(method.output_type)
    assert "recgw.v1.CredentialsView" in seen


def test_upload_status_needs_uploader_role(gateway: GatewayThread) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        gateway.uploads.GetUploadStatus(
            upload_pb2.GetUploadStatusRequest(upload_id=str(uuid.uuid4())), metadata=ADMIN
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as caught:
        gateway.credentials.DescribeCredentials(
            credentials_pb2.DescribeCredentialsRequest(tenant_id="x"), metadata=UPLOADER
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_set_credentials_reads_them_ahead_for_the_first_upload(
    make_gateway: Callable[..., GatewayThread],
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After SetCredentials the gateway reads the new credentials back (with the reader
    identity, as an upload would) and builds the tenant's S3 clients, so the tenant's first
    upload does not wait for Vault; the upload itself then reads nothing more."""
    gateway = make_gateway()
    source = gateway.gateway.adapters.source
    assert isinstance(source, CachedCredentialsSource)
    vault_reads: list[str] = []
    inner = source._inner
    read = inner.get

    async def counted(tenant_id: str) -> Any:
        vault_reads.append(tenant_id)
        return await read(tenant_id)

    monkeypatch.setattr(inner, "get", counted)
    tenant = new_tenant(gateway=gateway)
    wait_until(lambda: vault_reads == [tenant.tenant_id], 10, "the read-ahead")
    response = upload(gateway, upload_messages(tenant.tenant_id, "ahead.bin", b"abc"))
    assert read_object(moto, tenant.bucket, response.key) == b"abc"
    assert vault_reads == [tenant.tenant_id]
