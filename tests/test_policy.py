"""The least-privilege documents of recgw_server.policy and `recgw policy`.

Identity policies are checked against moto_server with IAM enforcement on. moto (5.2) does not
evaluate bucket policies faithfully: it applies their Deny statements to every caller whatever
the Principal, treats a statement without Resource (NotResource) as no denial, and never grants
through an Allow. So the bucket policy is checked for structure, for being accepted, and with a
strict xfail that turns red once moto enforces it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import botocore.exceptions
import pytest
import typer.testing

from recgw_server.cli import app
from recgw_server.dev.stack import AwsKeys, MotoS3
from recgw_server.policy import (
    EXTERNAL_ID_PLACEHOLDER,
    GATEWAY_PRINCIPAL_PLACEHOLDER,
    PRINCIPAL_PLACEHOLDER,
    access_point_delegation_statement,
    access_point_policy,
    bucket_policy,
    identity_policy,
    lifecycle_rule,
    permission_policy,
    role_cloudformation,
    trust_policy,
)

PRINCIPAL = "arn:aws:iam::123456789012:user/recgw-uploader"
DENIED = {"AccessDenied", "403"}  # moto's bucket-policy denial is a bare 403, no error code


def statements(document: dict[str, Any]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = document["Statement"]
    return result


def actions(statement: dict[str, Any]) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else list(action)


def denied(call: Callable[..., object], **kwargs: Any) -> bool:
    """Whether `call(**kwargs)` fails with access denied."""
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        call(**kwargs)
    return caught.value.response["Error"]["Code"] in DENIED


# --- the documents -------------------------------------------------------------------------


def test_identity_policy_allows_only_put_object_under_the_prefix() -> None:
    document = identity_policy("videsk-storage-s3")
    assert document["Version"] == "2012-10-17"
    [statement] = statements(document)
    assert statement["Effect"] == "Allow"
    assert actions(statement) == ["s3:PutObject"]
    assert statement["Resource"] == "arn:aws:s3:::videsk-storage-s3/uploads/*"


def test_allow_abort_adds_abort_multipart_upload_on_the_same_resource() -> None:
    [statement] = statements(identity_policy("videsk-storage-s3", "calls/", allow_abort=True))
    assert sorted(actions(statement)) == ["s3:AbortMultipartUpload", "s3:PutObject"]
    assert statement["Resource"] == "arn:aws:s3:::videsk-storage-s3/calls/*"


def test_bucket_policy_denies_outside_the_prefix_with_not_resource() -> None:
    allow, deny = statements(bucket_policy("videsk-storage-s3", principal_arn=PRINCIPAL))
    assert allow["Effect"] == "Allow"
    assert allow["Principal"] == {"AWS": PRINCIPAL}
    assert actions(allow) == ["s3:PutObject"]
    assert allow["Resource"] == "arn:aws:s3:::videsk-storage-s3/uploads/*"
    assert deny["Effect"] == "Deny"
    assert deny["Principal"] == {"AWS": PRINCIPAL}
    assert actions(deny) == ["s3:PutObject"]
    assert deny["NotResource"] == "arn:aws:s3:::videsk-storage-s3/uploads/*"
    assert "Resource" not in deny


def test_bucket_policy_with_allow_abort_allows_it_and_still_denies_only_puts() -> None:
    allow, deny = statements(
        bucket_policy("videsk-storage-s3", principal_arn=PRINCIPAL, allow_abort=True)
    )
    assert sorted(actions(allow)) == ["s3:AbortMultipartUpload", "s3:PutObject"]
    assert actions(deny) == ["s3:PutObject"]


def test_bucket_policy_without_principal_carries_the_placeholder() -> None:
    for statement in statements(bucket_policy("videsk-storage-s3")):
        assert statement["Principal"] == {"AWS": PRINCIPAL_PLACEHOLDER}


@pytest.mark.parametrize(
    "document",
    [
        identity_policy("videsk-storage-s3", allow_abort=True),
        bucket_policy("videsk-storage-s3", principal_arn=PRINCIPAL, allow_abort=True),
        bucket_policy("videsk-storage-s3"),
    ],
)
def test_no_condition_and_no_s3_prefix_key_anywhere(document: dict[str, Any]) -> None:
    assert all("Condition" not in statement for statement in statements(document))
    assert "s3:prefix" not in json.dumps(document)


def test_lifecycle_rule_aborts_incomplete_uploads_under_the_prefix() -> None:
    assert lifecycle_rule("calls/", days=3) == {
        "Rules": [
            {
                "ID": "recgw-abort-incomplete-multipart-calls",
                "Status": "Enabled",
                "Filter": {"Prefix": "calls/"},
                "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 3},
            }
        ]
    }
    assert lifecycle_rule()["Rules"][0]["Filter"] == {"Prefix": "uploads/"}


@pytest.mark.parametrize(
    ("bucket", "message"),
    [
        ("b", "3-63 characters"),
        ("My_Bucket", "lowercase"),
        ("-bucket", "starting and ending"),
        ("my..bucket", "adjacent periods"),
        ("192.168.1.10", "IP address"),
        ("xn--bucket", "reserved"),
        ("bucket-s3alias", "reserved"),
        ("arn:aws:s3:us-east-1:123456789012:accesspoint/recordings", "not an ARN"),
        ("bucket/uploads", "lowercase"),
        ("bucket*", "lowercase"),
    ],
)
def test_bad_bucket_names_are_rejected(bucket: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        identity_policy(bucket)
    with pytest.raises(ValueError, match=message):
        bucket_policy(bucket, principal_arn=PRINCIPAL)


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("", "must not be empty"),
        ("uploads", "must end with '/', e.g. 'uploads/'"),
        ("/uploads/", "must not start with '/'"),
        ("uploads/../", "'..' segments"),
        ("./uploads/", "'.' and '..' segments"),
        ("uploads//x/", "empty"),
        ("uploads/*/", "wildcards"),
        ("up?oads/", "wildcards"),
        ("${aws:username}/", "policy variables"),
        ("uploads\\x/", "'\\\\'"),
        ("up\nloads/", "control characters"),
        ("x" * 512 + "/", "512 bytes"),
    ],
)
def test_bad_prefixes_are_rejected(prefix: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        identity_policy("videsk-storage-s3", prefix)
    with pytest.raises(ValueError, match=message):
        bucket_policy("videsk-storage-s3", prefix, PRINCIPAL)
    with pytest.raises(ValueError, match=message):
        lifecycle_rule(prefix)


@pytest.mark.parametrize(
    "principal",
    [
        "*",
        "arn:aws:iam::123456789012:root",
        "123456789012",
        "arn:aws:iam::ACCOUNT-ID:user/recgw",
        "arn:aws:iam::123456789012:user/*",
        "arn:aws:iam::123456789012:group/uploaders",
    ],
)
def test_bad_principals_are_rejected(principal: str) -> None:
    with pytest.raises(ValueError, match="ARN of the IAM user"):
        bucket_policy("videsk-storage-s3", principal_arn=principal)


def test_principals_with_a_path_or_a_role_are_accepted() -> None:
    for principal in (
        "arn:aws:iam::123456789012:user/integrations/recgw-uploader",
        "arn:aws:iam::123456789012:role/recgw",
        "arn:aws-cn:iam::123456789012:user/recgw",
    ):
        assert statements(bucket_policy("videsk-storage-s3", principal_arn=principal))


@pytest.mark.parametrize("days", [0, -1, True, 1.5])
def test_bad_lifecycle_days_are_rejected(days: Any) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        lifecycle_rule(days=days)


# --- against moto_server with IAM enforcement ------------------------------------------------


def unique(kind: str) -> str:
    return f"recgw-policy-{kind}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def bucket(moto: MotoS3) -> str:
    """A bucket of its own: moto applies a bucket policy to every caller, admin included."""
    name = unique("bucket")
    moto.create_bucket(name)
    return name


def writer(moto: MotoS3, bucket: str, *, allow_abort: bool = False) -> tuple[str, AwsKeys]:
    """An IAM user holding exactly the generated identity policy: its name and keys."""
    name = unique("user")
    return name, moto.create_user(name, identity_policy(bucket, allow_abort=allow_abort))


def test_generated_identity_policy_writes_under_the_prefix_only(moto: MotoS3, bucket: str) -> None:
    _, keys = writer(moto, bucket)
    s3 = moto.client("s3", keys)
    s3.put_object(Bucket=bucket, Key="uploads/2026/call-1.webm", Body=b"recording")
    stored = moto.client("s3").get_object(Bucket=bucket, Key="uploads/2026/call-1.webm")
    assert stored["Body"].read() == b"recording"

    for key in ("call-1.webm", "other/call-1.webm", "uploadsX/call-1.webm"):
        assert denied(s3.put_object, Bucket=bucket, Key=key, Body=b"x")
    assert denied(s3.get_object, Bucket=bucket, Key="uploads/2026/call-1.webm")
    assert denied(s3.list_objects_v2, Bucket=bucket)


def test_generated_identity_policy_allows_multipart_uploads_under_the_prefix(
    moto: MotoS3, bucket: str
) -> None:
    _, keys = writer(moto, bucket)
    s3 = moto.client("s3", keys)
    key = "uploads/2026/call-2.webm"
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = []
    for number, body in ((1, b"a" * (5 * 1024 * 1024)), (2, b"tail")):
        etag = s3.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
        )["ETag"]
        parts.append({"ETag": etag, "PartNumber": number})
    s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
    )
    size = moto.client("s3").head_object(Bucket=bucket, Key=key)["ContentLength"]
    assert size == 5 * 1024 * 1024 + 4

    assert denied(s3.create_multipart_upload, Bucket=bucket, Key="elsewhere.webm")


@pytest.mark.parametrize("allow_abort", [False, True])
def test_abort_multipart_upload_only_with_allow_abort(
    moto: MotoS3, bucket: str, allow_abort: bool
) -> None:
    _, keys = writer(moto, bucket, allow_abort=allow_abort)
    s3 = moto.client("s3", keys)
    key = "uploads/2026/call-3.webm"
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"part")

    abort = {"Bucket": bucket, "Key": key, "UploadId": upload_id}
    if allow_abort:
        s3.abort_multipart_upload(**abort)
        pending = moto.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert upload_id not in [upload["UploadId"] for upload in pending]
    else:
        assert denied(s3.abort_multipart_upload, **abort)


@pytest.mark.moto_only(
    "MinIO rejects a rule with AbortIncompleteMultipartUpload (400 InvalidArgument, malformed XML)"
)
def test_lifecycle_configuration_is_accepted_by_s3(moto: MotoS3, bucket: str) -> None:
    admin = moto.client("s3")
    admin.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration=lifecycle_rule(days=2)
    )
    [rule] = admin.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert rule["Filter"] == {"Prefix": "uploads/"}
    assert rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 2}


def user_arn(moto: MotoS3, name: str) -> str:
    return moto.user_arn(name)


def test_generated_bucket_policy_keeps_prefixed_writes_working(moto: MotoS3, bucket: str) -> None:
    """Accepted by S3, and with both documents in place the writer still writes under uploads/.

    In moto the outside-prefix denial here comes from the identity policy alone.
    """
    name, keys = writer(moto, bucket)
    moto.client("s3").put_bucket_policy(
        Bucket=bucket, Policy=json.dumps(bucket_policy(bucket, principal_arn=user_arn(moto, name)))
    )
    s3 = moto.client("s3", keys)
    s3.put_object(Bucket=bucket, Key="uploads/call-4.webm", Body=b"x")
    assert denied(s3.put_object, Bucket=bucket, Key="call-4.webm", Body=b"x")


@pytest.mark.moto_only("MinIO rejects the condition StringNotLikeIfExists (MalformedPolicy)")
def test_the_guides_bucket_policy_denies_even_writes_under_uploads(
    moto: MotoS3, bucket: str
) -> None:
    """The guide's Deny blocks the writes it means to allow.

    On AWS a PutObject carries no `s3:prefix` key, so `StringNotLikeIfExists` is true and the
    Deny matches every key. moto gets there differently (it skips conditions it does not
    know), so this shows the outcome, not AWS's reasoning.
    """
    name, keys = writer(moto, bucket)
    principal = {"AWS": user_arn(moto, name)}
    guide_policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "AllowPrefixedWrites",
                "Effect": "Allow",
                "Principal": principal,
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{bucket}/uploads/*",
            },
            {
                "Sid": "DenyNonPrefixedWrites",
                "Effect": "Deny",
                "Principal": principal,
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{bucket}/*",
                "Condition": {"StringNotLikeIfExists": {"s3:prefix": ["uploads/*"]}},
            },
        ],
    }
    moto.client("s3").put_bucket_policy(Bucket=bucket, Policy=json.dumps(guide_policy))
    s3 = moto.client("s3", keys)
    assert denied(s3.put_object, Bucket=bucket, Key="uploads/call-5.webm", Body=b"x")


@pytest.mark.xfail(
    raises=pytest.fail.Exception,  # only the missing denial, never a set-up error
    strict=True,
    reason="moto 5.2 ignores NotResource and Principal in bucket policies; MinIO applies bucket "
    "policies to anonymous requests only",
)
def test_generated_bucket_policy_alone_fences_a_broad_writer(moto: MotoS3, bucket: str) -> None:
    """On AWS the bucket policy's Deny stops a user whose own policy allows the whole bucket."""
    name = unique("user")
    broad = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/*"}
        ],
    }
    keys = moto.create_user(name, broad)
    moto.client("s3").put_bucket_policy(
        Bucket=bucket, Policy=json.dumps(bucket_policy(bucket, principal_arn=user_arn(moto, name)))
    )
    s3 = moto.client("s3", keys)
    s3.put_object(Bucket=bucket, Key="uploads/call-6.webm", Body=b"x")
    assert denied(s3.put_object, Bucket=bucket, Key="call-6.webm", Body=b"x")


# --- recgw policy ----------------------------------------------------------------------------


@pytest.fixture
def runner() -> typer.testing.CliRunner:
    return typer.testing.CliRunner()


def test_cli_prints_the_three_documents_as_one_json(runner: typer.testing.CliRunner) -> None:
    result = runner.invoke(app, ["policy", "--bucket", "videsk-storage-s3"])
    assert result.exit_code == 0, result.stderr
    output = json.loads(result.stdout)
    assert output == {
        "identity_policy": identity_policy("videsk-storage-s3"),
        "bucket_policy": bucket_policy("videsk-storage-s3"),
        "lifecycle_configuration": lifecycle_rule(days=7),
    }
    assert "put-user-policy" in result.stderr
    assert "put-bucket-lifecycle-configuration --bucket videsk-storage-s3" in result.stderr
    assert PRINCIPAL_PLACEHOLDER in result.stderr  # says what to replace


def test_cli_passes_every_option_through(runner: typer.testing.CliRunner) -> None:
    result = runner.invoke(
        app,
        [
            "policy",
            "--bucket",
            "videsk-storage-s3",
            "--prefix",
            "calls/",
            "--principal",
            PRINCIPAL,
            "--allow-abort",
            "--abort-after-days",
            "3",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {
        "identity_policy": identity_policy("videsk-storage-s3", "calls/", allow_abort=True),
        "bucket_policy": bucket_policy("videsk-storage-s3", "calls/", PRINCIPAL, allow_abort=True),
        "lifecycle_configuration": lifecycle_rule("calls/", days=3),
    }
    assert PRINCIPAL_PLACEHOLDER not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bucket", "My_Bucket"], "invalid bucket name"),
        (["--bucket", "videsk-storage-s3", "--prefix", "uploads"], "must end with '/'"),
        (["--bucket", "videsk-storage-s3", "--principal", "*"], "invalid principal"),
        (["--bucket", "videsk-storage-s3", "--abort-after-days", "0"], "at least 1"),
        ([], "--bucket"),
    ],
)
def test_cli_bad_input_exits_2_and_says_what_to_fix(
    runner: typer.testing.CliRunner, args: list[str], message: str
) -> None:
    result = runner.invoke(app, ["policy", *args])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert message in result.stderr


# --- roles and access points ----------------------------------------------------------------

GATEWAY = "arn:aws:iam::111122223333:role/recgw-gateway"
EXTERNAL_ID = "recgw-0123456789abcdef0123456789abcdef"
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
ACCESS_POINT = "arn:aws:s3:us-west-2:123456789012:accesspoint/recordings-ap"


def test_trust_policy_lets_only_the_gateway_assume_with_the_external_id() -> None:
    [statement] = statements(trust_policy(GATEWAY, EXTERNAL_ID))
    assert statement["Principal"] == {"AWS": GATEWAY}
    assert statement["Action"] == "sts:AssumeRole"
    assert statement["Condition"] == {"StringEquals": {"sts:ExternalId": EXTERNAL_ID}}
    [unedited] = statements(trust_policy(None, None))
    assert unedited["Principal"] == {"AWS": GATEWAY_PRINCIPAL_PLACEHOLDER}
    assert unedited["Condition"]["StringEquals"]["sts:ExternalId"] == EXTERNAL_ID_PLACEHOLDER


def test_permission_policy_adds_the_kms_actions_only_with_sse_kms() -> None:
    [put] = statements(permission_policy("videsk-storage-s3"))
    assert put == statements(identity_policy("videsk-storage-s3"))[0]
    put, kms = statements(permission_policy("videsk-storage-s3", kms_key_arn=KMS_KEY))
    assert actions(put) == ["s3:PutObject"]
    assert (actions(kms), kms["Resource"]) == (["kms:GenerateDataKey", "kms:Decrypt"], KMS_KEY)
    [through] = statements(permission_policy(ACCESS_POINT, "calls/"))
    assert through["Resource"] == f"{ACCESS_POINT}/object/calls/*"


def test_the_template_creates_the_role_with_both_policies() -> None:
    template = role_cloudformation("videsk-storage-s3", "uploads/", GATEWAY, EXTERNAL_ID)
    role = template["Resources"]["RecgwWriterRole"]
    assert role["Type"] == "AWS::IAM::Role"
    properties = role["Properties"]
    assert properties["AssumeRolePolicyDocument"] == trust_policy(GATEWAY, EXTERNAL_ID)
    [inline] = properties["Policies"]
    assert inline["PolicyDocument"] == permission_policy("videsk-storage-s3")
    assert template["Outputs"]["RoleArn"]["Value"] == {"Fn::GetAtt": ["RecgwWriterRole", "Arn"]}


def test_access_point_policy_and_the_delegating_bucket_statement() -> None:
    [statement] = statements(access_point_policy(ACCESS_POINT, "uploads/", PRINCIPAL))
    assert statement["Principal"] == {"AWS": PRINCIPAL}
    assert statement["Resource"] == f"{ACCESS_POINT}/object/uploads/*"
    delegation = access_point_delegation_statement("videsk-storage-s3", ACCESS_POINT)
    assert delegation["Resource"] == "arn:aws:s3:::videsk-storage-s3/uploads/*"
    assert delegation["Condition"] == {"StringEquals": {"s3:DataAccessPointArn": ACCESS_POINT}}


def test_cli_role_prints_trust_permission_and_template(runner: typer.testing.CliRunner) -> None:
    args = ["policy", "--bucket", "videsk-storage-s3", "--role", "--kms-key-arn", KMS_KEY]
    result = runner.invoke(
        app, [*args, "--gateway-principal", GATEWAY, "--external-id", EXTERNAL_ID]
    )
    assert result.exit_code == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["trust_policy"] == trust_policy(GATEWAY, EXTERNAL_ID)
    assert output["permission_policy"] == permission_policy(
        "videsk-storage-s3", kms_key_arn=KMS_KEY
    )
    assert output["cloudformation_template"] == role_cloudformation(
        "videsk-storage-s3", "uploads/", GATEWAY, EXTERNAL_ID, kms_key_arn=KMS_KEY
    )
    assert "aws cloudformation deploy" in result.stderr
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and EXTERNAL_ID_PLACEHOLDER in result.stderr


def test_cli_access_point_prints_its_policy_and_the_note(runner: typer.testing.CliRunner) -> None:
    args = ["policy", "--bucket", "videsk-storage-s3", "--access-point", ACCESS_POINT]
    result = runner.invoke(app, [*args, "--principal", PRINCIPAL])
    assert result.exit_code == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["identity_policy"] == permission_policy(ACCESS_POINT)
    assert output["access_point_policy"] == access_point_policy(ACCESS_POINT, "uploads/", PRINCIPAL)
    assert output["bucket_policy_statement"] == access_point_delegation_statement(
        "videsk-storage-s3", ACCESS_POINT
    )
    assert "does NOT grant writes through an" in result.stderr
    result = runner.invoke(app, [*args, "--role"])
    [statement] = json.loads(result.stdout)["access_point_policy"]["Statement"]
    assert statement["Principal"] == {"AWS": "arn:aws:iam::123456789012:role/recgw-writer"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", "--external-id", "x"], "invalid external id"),
        (["--role", "--gateway-principal", "*"], "invalid gateway principal"),
        (["--kms-key-arn", "arn:aws:kms:us-east-1:123456789012:alias/s3"], "invalid KMS key"),
        (["--access-point", "arn:aws:s3:::videsk-storage-s3"], "invalid access point ARN"),
    ],
)
def test_cli_bad_role_and_access_point_input_exits_2(
    runner: typer.testing.CliRunner, args: list[str], message: str
) -> None:
    result = runner.invoke(app, ["policy", "--bucket", "videsk-storage-s3", *args])
    assert result.exit_code == 2 and result.stdout == ""
    assert message in result.stderr
