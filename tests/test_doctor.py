"""The setup doctor (VerifyCredentials) against moto with IAM enforcement, through a proxy.

moto checks s3:PutObject (with the key's ARN) for CreateMultipartUpload, UploadPart,
CompleteMultipartUpload and PutObject, and refuses `If-None-Match: *` on an existing object
with 412 every time (a repeated CompleteMultipartUpload of the same upload id is answered as
idempotent). It does not: check KMS permissions (a write with SSE-KMS needs none there),
send x-amz-bucket-region with a 403, look at x-amz-expected-bucket-owner, or care which
region a request is signed for. Where a test needs AWS's behaviour in those places, the
recording proxy (tests/http_proxy.py) supplies it, and the test says so.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import botocore.exceptions
import grpc
import pytest
from recgw.v1 import credentials_pb2

from recgw_server.dev.stack import MotoS3, seed_policy, wait_until
from recgw_server.domain import ErrorKind, Reason
from recgw_server.storage.s3 import translate_error
from tests.conftest import SHARED_BUCKET
from tests.harness import (
    CapturedLogs,
    GatewayThread,
    MiB,
    Tenant,
    check_results,
    details,
    error_info,
    set_credentials,
    upload,
    upload_messages,
    verify_credentials,
)
from tests.http_proxy import RecordingProxy, Request, Response

ALL_PASSED_BY_KEYS = {
    "assume_role": "SKIPPED",
    "bucket_region": "SKIPPED",  # moto's 403 to HeadBucket carries no region
    "create_multipart_upload": "PASSED",
    "upload_part": "PASSED",
    "complete_multipart_upload": "PASSED",
    "conditional_write": "PASSED",
}


@pytest.fixture
def s3_proxy(moto: MotoS3) -> Iterator[RecordingProxy]:
    """A recording proxy in front of moto, for the tenant's endpoint_url."""
    recording = RecordingProxy(moto.endpoint_url)
    yield recording
    recording.close()


def check(report: credentials_pb2.VerifyCredentialsResponse, name: str) -> Any:
    [found] = [c for c in report.checks if c.name == name]
    return found


def writes_to(proxy: RecordingProxy, bucket: str) -> list[Request]:
    return proxy.recorded(
        lambda r: r.method in ("PUT", "POST") and r.path.startswith(f"/{bucket}/")
    )


def test_every_capability_is_proven_and_one_object_stays(
    gateway: GatewayThread,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    s3_proxy: RecordingProxy,
) -> None:
    tenant = new_tenant()
    set_credentials(
        gateway,
        tenant,
        endpoint_url=s3_proxy.url,
        encryption=credentials_pb2.ServerSideEncryption(
            mode=credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_S3
        ),
    )
    first = verify_credentials(gateway, tenant.tenant_id)
    second = verify_credentials(gateway, tenant.tenant_id)
    for report in (first, second):
        assert report.ok, report
        assert (report.key, report.error_code) == ("uploads/.recgw-write-check", "")
        assert check_results(report) == ALL_PASSED_BY_KEYS
    detail = check(first, "create_multipart_upload").detail
    assert "CRC32C per part" in detail and "FULL_OBJECT" in detail and "AES256" in detail

    writes = writes_to(s3_proxy, tenant.bucket)
    create = [w for w in writes if "uploads" in w.query and w.method == "POST"]
    parts = [w for w in writes if "partNumber" in w.query]
    complete = [w for w in writes if "uploadId" in w.query and w.method == "POST"]
    conditional = [w for w in writes if w.headers.get("if-none-match") == "*"]
    assert len(create) == len(parts) == len(complete) == len(conditional) == 2
    for request in create:
        assert request.headers["x-amz-checksum-algorithm"] == "CRC32C"
        assert request.headers["x-amz-checksum-type"] == "FULL_OBJECT"
        assert request.headers["x-amz-server-side-encryption"] == "AES256"
    assert all("x-amz-checksum-crc32c" in p.headers for p in parts)
    assert all(c.headers["x-amz-checksum-type"] == "FULL_OBJECT" for c in complete)
    assert all("if-none-match" not in c.headers for c in complete)  # overwrites the check object
    listed = moto.client("s3").list_objects_v2(Bucket=tenant.bucket, Prefix="uploads/")
    assert [o["Key"] for o in listed["Contents"]] == ["uploads/.recgw-write-check"]


def test_a_missing_put_permission_is_named(
    gateway: GatewayThread, new_tenant: Callable[..., Tenant], s3_proxy: RecordingProxy
) -> None:
    tenant = new_tenant(
        policy=seed_policy(SHARED_BUCKET, "uploads/*"), bucket=SHARED_BUCKET, prefix="other/"
    )
    set_credentials(gateway, tenant, endpoint_url=s3_proxy.url)
    report = verify_credentials(gateway, tenant.tenant_id)
    assert not report.ok and report.error_code == "AccessDenied"
    create = check(report, "create_multipart_upload")
    assert create.missing_permission == f"s3:PutObject on arn:aws:s3:::{SHARED_BUCKET}/other/*"
    assert f"****{tenant.keys.access_key_id[-4:]}" in create.fix
    assert create.missing_permission in report.error_message
    assert check_results(report) == {
        **ALL_PASSED_BY_KEYS,
        "create_multipart_upload": "FAILED",
        "upload_part": "SKIPPED",
        "complete_multipart_upload": "SKIPPED",
        "conditional_write": "SKIPPED",
    }


def test_completing_without_kms_decrypt_is_named(
    gateway: GatewayThread,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    s3_proxy: RecordingProxy,
) -> None:
    """Short recordings pass and long ones fail: PutObject needs only kms:GenerateDataKey,
    completing a multipart upload also kms:Decrypt. moto checks no KMS permission, so the proxy
    answers CompleteMultipartUpload with S3's bare 403 AccessDenied, as AWS does then."""
    key_arn = moto.client("kms").create_key()["KeyMetadata"]["Arn"]
    tenant = new_tenant()

    def deny_completion(request: Request) -> Response | None:
        if request.method == "POST" and "uploadId" in request.query:
            return Response(
                403,
                {"Content-Type": "application/xml"},
                b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>",
            )
        return None

    s3_proxy.answer = deny_completion
    set_credentials(
        gateway,
        tenant,
        endpoint_url=s3_proxy.url,
        encryption=credentials_pb2.ServerSideEncryption(
            mode=credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_KMS, kms_key_id=key_arn
        ),
    )
    report = verify_credentials(gateway, tenant.tenant_id)
    assert check_results(report) == {
        **ALL_PASSED_BY_KEYS,
        "complete_multipart_upload": "FAILED",
        "conditional_write": "SKIPPED",
    }
    complete = check(report, "complete_multipart_upload")
    assert complete.error_code == "AccessDenied"
    assert complete.missing_permission == f"kms:Decrypt on {key_arn}"
    assert "kms:GenerateDataKey and kms:Decrypt" in complete.fix
    [create] = [w for w in writes_to(s3_proxy, tenant.bucket) if "uploads" in w.query]
    assert create.headers["x-amz-server-side-encryption"] == "aws:kms"
    assert create.headers["x-amz-server-side-encryption-aws-kms-key-id"] == key_arn


def test_a_store_that_ignores_if_none_match_is_found(
    gateway: GatewayThread, new_tenant: Callable[..., Tenant], s3_proxy: RecordingProxy
) -> None:
    """moto refuses the conditional write (412); the proxy turns that into the 200 of a store
    without conditional writes. A tenant that allows overwrites is checked without one."""

    def ignore_condition(request: Request, response: Response) -> Response:
        if request.headers.get("if-none-match") == "*" and response.status == 412:
            return Response(200, {"ETag": '"0123456789abcdef0123456789abcdef"'})
        return response

    s3_proxy.rewrite = ignore_condition
    tenant = new_tenant()
    set_credentials(gateway, tenant, endpoint_url=s3_proxy.url)
    report = verify_credentials(gateway, tenant.tenant_id)
    assert (report.ok, report.error_code) == (False, "ConditionalWriteIgnored")
    assert "allow_overwrite" in check(report, "conditional_write").fix

    lenient = new_tenant()
    set_credentials(gateway, lenient, endpoint_url=s3_proxy.url, allow_overwrite=True)
    report = verify_credentials(gateway, lenient.tenant_id)
    assert report.ok, report
    assert check(report, "put_object").result == credentials_pb2.CREDENTIALS_CHECK_RESULT_PASSED
    sent = writes_to(s3_proxy, lenient.bucket)
    assert sent and all("if-none-match" not in w.headers for w in sent)


def test_the_region_is_found_from_the_bucket_and_a_wrong_one_is_named(
    gateway: GatewayThread,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    s3_proxy: RecordingProxy,
) -> None:
    """AWS answers HeadBucket with x-amz-bucket-region even when it denies it (403), and a
    PutObject-only identity is denied; moto's 403 lacks the header, so the proxy adds the
    region moto keeps for the bucket."""
    bucket = f"recgw-eu-{uuid.uuid4().hex[:10]}"
    moto.client("s3").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )

    def add_region(request: Request, response: Response) -> Response:
        if request.method == "HEAD" and request.path.strip("/") == bucket:
            assert response.status == 403  # write-only: HeadBucket itself is denied
            return Response(403, {**response.headers, "x-amz-bucket-region": "eu-west-1"})
        return response

    s3_proxy.rewrite = add_region
    wrong = new_tenant(bucket=bucket)
    set_credentials(gateway, wrong, endpoint_url=s3_proxy.url, region="us-east-1")
    report = verify_credentials(gateway, wrong.tenant_id)
    assert (report.ok, report.error_code, report.bucket_region) == (
        False,
        "WrongRegion",
        "eu-west-1",
    )
    assert "set region eu-west-1" in check(report, "bucket_region").fix

    found = new_tenant(bucket=bucket)
    view = set_credentials(gateway, found, endpoint_url=s3_proxy.url, region="").credentials
    assert view.target.region == ""
    report = verify_credentials(gateway, found.tenant_id)
    assert report.ok and report.bucket_region == "eu-west-1"
    assert check(report, "bucket_region").detail == "found from the bucket: eu-west-1"
    upload(gateway, upload_messages(found.tenant_id, "eu/call.bin", b"in europe"))
    writes = [w for w in writes_to(s3_proxy, bucket) if w.access_key_id == found.keys.access_key_id]
    assert writes and {w.signing_region for w in writes} == {"eu-west-1"}


def test_the_expected_bucket_owner_goes_with_every_request(
    gateway: GatewayThread, new_tenant: Callable[..., Tenant], s3_proxy: RecordingProxy
) -> None:
    """moto ignores x-amz-expected-bucket-owner (AWS answers 403 when another account owns the
    bucket), so the test asserts from the proxy's record that every request carried it."""
    tenant = new_tenant()
    owner = "123456789012"  # moto's account
    set_credentials(gateway, tenant, endpoint_url=s3_proxy.url, expected_bucket_owner=owner)
    assert verify_credentials(gateway, tenant.tenant_id).ok
    upload(gateway, upload_messages(tenant.tenant_id, "owned.bin", b"o" * (6 * MiB)))
    sent = s3_proxy.recorded(lambda r: r.path.strip("/").split("/")[0] == tenant.bucket)
    assert {"PUT", "POST", "HEAD"} <= {r.method for r in sent}
    assert all(r.headers.get("x-amz-expected-bucket-owner") == owner for r in sent)

    with pytest.raises(grpc.RpcError) as caught:
        set_credentials(gateway, tenant, endpoint_url=s3_proxy.url, expected_bucket_owner="12345")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value)[1]["field"] == "target.expected_bucket_owner"
    assert "12-digit" in details(caught.value)


def healthy(gateway: GatewayThread, tenant_id: str) -> float | None:
    value = gateway.gateway.metrics.registry.get_sample_value(
        "recgw_credentials_healthy", {"tenant": tenant_id}
    )
    return None if value is None else float(value)


def test_active_tenants_are_rechecked_and_a_change_is_logged_once(
    moto: MotoS3,
    make_gateway: Callable[..., GatewayThread],
    new_tenant: Callable[..., Tenant],
    captured_logs: CapturedLogs,
) -> None:
    gateway = make_gateway(doctor={"interval_seconds": 0.1, "active_window_seconds": 60})
    doctor = gateway.gateway.doctor
    idle = new_tenant(gateway=gateway)  # has credentials but never uploads: not rechecked
    tenant = new_tenant(gateway=gateway)
    upload(gateway, upload_messages(tenant.tenant_id, "active.bin", b"recent upload"))
    wait_until(lambda: healthy(gateway, tenant.tenant_id) == 1.0, 10, "a first recheck")

    user = "tenant-" + tenant.tenant_id.removeprefix("t-")
    iam = moto.client("iam")
    iam.delete_user_policy(UserName=user, PolicyName=f"{user}-policy")
    wait_until(lambda: healthy(gateway, tenant.tenant_id) == 0.0, 10, "the failure noticed")
    rounds = doctor.runs
    wait_until(lambda: doctor.runs >= rounds + 3, 10, "three more rounds")

    def lines(text: str) -> list[str]:
        return [line for line in captured_logs.lines if f"tenant {tenant.tenant_id} {text}" in line]

    [warning] = lines("do not work")
    assert warning.startswith("WARNING") and "s3:PutObject on arn:aws:s3:::" in warning

    iam.put_user_policy(
        UserName=user,
        PolicyName=f"{user}-policy",
        PolicyDocument=json.dumps(seed_policy(tenant.bucket)),
    )
    wait_until(lambda: healthy(gateway, tenant.tenant_id) == 1.0, 10, "the recovery noticed")
    assert len(lines("work again")) == 1
    assert healthy(gateway, idle.tenant_id) is None


def test_s3_naming_the_missing_permission_is_passed_on() -> None:
    """AWS's AccessDenied text names the action and resource; it becomes `missing_permission`.
    A wrong region's redirect becomes `bucket_region`."""
    denied: Any = {
        "Error": {
            "Code": "AccessDenied",
            "Message": "User: arn:aws:sts::123456789012:assumed-role/recgw-writer/recgw-t1 "
            "is not authorized to perform: kms:Decrypt on resource: "
            "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd because no "
            "identity-based policy allows the kms:Decrypt action",
        },
        "ResponseMetadata": {"HTTPStatusCode": 403},
    }
    kms_denial = botocore.exceptions.ClientError(denied, "CompleteMultipartUpload")
    error = translate_error(kms_denial, "CompleteMultipartUpload", "b", "uploads/k")
    assert (error.kind, error.reason) == (ErrorKind.PERMISSION_DENIED, Reason.ACCESS_DENIED)
    assert error.details["missing_permission"] == (
        "kms:Decrypt on arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd"
    )
    moved: Any = {
        "Error": {"Code": "PermanentRedirect", "Message": "use the right endpoint"},
        "ResponseMetadata": {
            "HTTPStatusCode": 301,
            "HTTPHeaders": {"x-amz-bucket-region": "ap-southeast-2"},
        },
    }
    redirect = botocore.exceptions.ClientError(moved, "PutObject")
    error = translate_error(redirect, "PutObject", "b", "uploads/k")
    assert error.reason is Reason.STORAGE_REJECTED
    assert error.details["bucket_region"] == "ap-southeast-2"
    assert "region ap-southeast-2" in error.message
