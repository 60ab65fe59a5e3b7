"""Least-privilege AWS documents for the customer's bucket: IAM policy, bucket policy, lifecycle.

Pure functions: each returns a dict ready for json.dumps and raises ValueError with a
message that says what to fix.

The customer guide's bucket policy denies with `StringNotLikeIfExists` on `s3:prefix`.
PutObject requests carry no `s3:prefix` key, so that condition is always true and the Deny
blocks every write, the ones under `uploads/` included. Here the Deny names what stays
allowed with `NotResource` instead, and no condition key is used at all.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from recgw_server.domain import DEFAULT_PREFIX
from recgw_server.storage.access_points import parse_access_point

POLICY_VERSION = "2012-10-17"
PRINCIPAL_PLACEHOLDER = "arn:aws:iam::<ACCOUNT-ID>:user/<IAM-USER-NAME>"
MAX_PREFIX_BYTES = 512  # as for a tenant's prefix in the gateway
MAX_RULE_ID = 255

_BUCKET_CHARS = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
_PRINCIPAL_ARN = re.compile(
    r"arn:aws(-cn|-us-gov)?:iam::[0-9]{12}:(user|role)"
    r"(/[A-Za-z0-9_+=,.@-]+)*/[A-Za-z0-9_+=,.@-]{1,64}"
)


def validate_bucket(bucket: str) -> str:
    """Return `bucket` if it is a general purpose bucket name, else raise ValueError."""
    if bucket.startswith("arn:"):
        raise ValueError(
            f"bucket must be a bucket name, not an ARN ({bucket!r}); "
            "pass the name of the bucket the access point or ARN refers to"
        )
    problem = ""
    if not _BUCKET_CHARS.fullmatch(bucket):
        problem = (
            "3-63 characters of lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    elif ".." in bucket:
        problem = "no two adjacent periods"
    elif _is_ip_address(bucket):
        problem = "not formatted as an IP address"
    elif bucket.startswith(_RESERVED_BUCKET_PREFIXES) or bucket.endswith(_RESERVED_BUCKET_SUFFIXES):
        problem = "no reserved prefix (xn--, sthree-, ...) or suffix (-s3alias, --ol-s3, ...)"
    if problem:
        raise ValueError(f"invalid bucket name {bucket!r}: it must have {problem}")
    return bucket


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if it is a safe key prefix for a policy resource, else raise ValueError."""
    fix = ""
    if not prefix:
        fix = f"it must not be empty; use for example {DEFAULT_PREFIX!r}"
    elif prefix.startswith("/") or not prefix.endswith("/"):
        suggestion = prefix.strip("/") + "/" if prefix.strip("/") else DEFAULT_PREFIX
        fix = f"it must not start with '/' and must end with '/', e.g. {suggestion!r}"
    elif len(prefix.encode()) > MAX_PREFIX_BYTES:
        fix = f"shorten it to at most {MAX_PREFIX_BYTES} bytes"
    elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in prefix):
        fix = "remove the control characters"
    elif "\\" in prefix:
        fix = "use '/' instead of '\\' to separate segments"
    elif any(segment in ("", ".", "..") for segment in prefix[:-1].split("/")):
        fix = "remove empty ('//'), '.' and '..' segments"
    elif any(c in prefix for c in "*?$"):
        # In a policy resource '*' and '?' are wildcards and '${...}' a policy variable:
        # any of them would widen the grant beyond the literal prefix.
        fix = "remove '*', '?' and '$': IAM reads them as wildcards or policy variables"
    if fix:
        raise ValueError(f"invalid prefix {prefix!r}: {fix}")
    return prefix


def validate_principal(principal_arn: str) -> str:
    """Return the ARN if it names one IAM user or role, else raise ValueError."""
    if not _PRINCIPAL_ARN.fullmatch(principal_arn):
        # With an account root or '*' the Deny would fence the whole account or everyone.
        raise ValueError(
            f"invalid principal {principal_arn!r}: give the ARN of the IAM user (or role) "
            "the gateway uses, e.g. arn:aws:iam::123456789012:user/recgw-uploader "
            "(aws iam get-user --user-name NAME --query User.Arn)"
        )
    return principal_arn


def object_arn(bucket: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The ARN matching every object key under `prefix` in `bucket`."""
    return f"arn:aws:s3:::{validate_bucket(bucket)}/{validate_prefix(prefix)}*"


def _writer_actions(allow_abort: bool) -> str | list[str]:
    # CreateMultipartUpload, UploadPart and CompleteMultipartUpload are all s3:PutObject.
    return ["s3:PutObject", "s3:AbortMultipartUpload"] if allow_abort else "s3:PutObject"


def identity_policy(
    bucket: str,
    prefix: str = DEFAULT_PREFIX,
    allow_abort: bool = False,
    allow_confirm: bool = False,
) -> dict[str, Any]:
    """IAM policy for the gateway's user: write objects under `prefix`, nothing else."""
    return permission_policy(
        validate_bucket(bucket), prefix, allow_abort=allow_abort, allow_confirm=allow_confirm
    )


def bucket_policy(
    bucket: str,
    prefix: str = DEFAULT_PREFIX,
    principal_arn: str | None = None,
    *,
    allow_abort: bool = False,
) -> dict[str, Any]:
    """Bucket policy: the principal may write under `prefix` and is denied writes anywhere else.

    Without `principal_arn` the Principal is PRINCIPAL_PLACEHOLDER, which S3 rejects as an
    invalid principal, so an unedited copy can never be applied by mistake.
    """
    principal = {
        "AWS": validate_principal(principal_arn) if principal_arn else PRINCIPAL_PLACEHOLDER
    }
    resource = object_arn(bucket, prefix)
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            {
                "Sid": "RecgwAllowWritesUnderPrefix",
                "Effect": "Allow",
                "Principal": principal,
                "Action": _writer_actions(allow_abort),
                "Resource": resource,
            },
            {
                "Sid": "RecgwDenyWritesOutsidePrefix",
                "Effect": "Deny",
                "Principal": principal,
                "Action": "s3:PutObject",
                "NotResource": resource,
            },
        ],
    }


def lifecycle_rule(prefix: str = DEFAULT_PREFIX, days: int = 7) -> dict[str, Any]:
    """Lifecycle configuration aborting multipart uploads under `prefix` left incomplete."""
    validate_prefix(prefix)
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a whole number of days, at least 1 (got {days!r})")
    return {
        "Rules": [
            {
                "ID": f"recgw-abort-incomplete-multipart-{prefix.rstrip('/')}"[:MAX_RULE_ID],
                "Status": "Enabled",
                "Filter": {"Prefix": prefix},
                "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": days},
            }
        ]
    }


# --- IAM roles (the gateway assumes a role in the customer's account) ------------------------

GATEWAY_PRINCIPAL_PLACEHOLDER = "arn:aws:iam::<GATEWAY-ACCOUNT-ID>:role/<GATEWAY-ROLE>"
EXTERNAL_ID_PLACEHOLDER = "<EXTERNAL-ID-FROM-recgw-creds-describe>"
DEFAULT_ROLE_NAME = "recgw-writer"
_GATEWAY_PRINCIPAL = re.compile(
    r"arn:aws(-cn|-us-gov)?:iam::[0-9]{12}:(root|(user|role)(/[A-Za-z0-9_+=,.@-]+)*"
    r"/[A-Za-z0-9_+=,.@-]{1,64})"
)
_EXTERNAL_ID = re.compile(r"[\w+=,.@:/-]{2,1224}")
_KMS_KEY_ARN = re.compile(r"arn:aws(-cn|-us-gov)?:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]{1,64}")
_ROLE_NAME = re.compile(r"[\w+=,.@-]{1,64}")


def validate_gateway_principal(principal_arn: str) -> str:
    """The gateway's AWS principal for a trust policy: a role, a user, or an account root."""
    if not _GATEWAY_PRINCIPAL.fullmatch(principal_arn):
        raise ValueError(
            f"invalid gateway principal {principal_arn!r}: give the ARN of the role or user the "
            "gateway runs as (DescribeCredentials shows it as trusted_principal), e.g. "
            "arn:aws:iam::111122223333:role/recgw-gateway"
        )
    return principal_arn


def validate_external_id(external_id: str) -> str:
    if not _EXTERNAL_ID.fullmatch(external_id):
        raise ValueError(
            f"invalid external id {external_id!r}: copy it from `recgw creds describe` "
            "(2-1224 characters of letters, digits and +=,.@:/-)"
        )
    return external_id


def validate_kms_key_arn(key_arn: str) -> str:
    if not _KMS_KEY_ARN.fullmatch(key_arn):
        raise ValueError(
            f"invalid KMS key ARN {key_arn!r}: give the key's ARN, "
            "e.g. arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab "
            "(an alias ARN does not grant use of the key)"
        )
    return key_arn


def trust_policy(gateway_principal: str | None, external_id: str | None) -> dict[str, Any]:
    """Who may assume the role: only the gateway, and only with the tenant's external id.

    The external id guards against the confused deputy: another recgw customer cannot make
    the gateway write with this role, because the gateway sends each tenant's own id.
    """
    principal = (
        validate_gateway_principal(gateway_principal)
        if gateway_principal
        else GATEWAY_PRINCIPAL_PLACEHOLDER
    )
    condition = validate_external_id(external_id) if external_id else EXTERNAL_ID_PLACEHOLDER
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            {
                "Sid": "RecgwAssumesWithExternalId",
                "Effect": "Allow",
                "Principal": {"AWS": principal},
                "Action": "sts:AssumeRole",
                "Condition": {"StringEquals": {"sts:ExternalId": condition}},
            }
        ],
    }


def writes_resource(bucket: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The object resource of writes under `prefix`, for a bucket name or an access point ARN."""
    access_point = parse_access_point(bucket)
    if access_point is not None:
        return access_point.objects_arn(validate_prefix(prefix))
    return object_arn(bucket, prefix)


def permission_policy(
    bucket: str,
    prefix: str = DEFAULT_PREFIX,
    kms_key_arn: str | None = None,
    *,
    allow_abort: bool = False,
    allow_confirm: bool = False,
) -> dict[str, Any]:
    """The writer's permissions: PutObject under the prefix, plus the KMS key use of SSE-KMS.

    SSE-KMS multipart uploads need kms:GenerateDataKey (to encrypt each part) and kms:Decrypt
    (S3 reads the encrypted parts to complete the upload).

    `allow_confirm` adds s3:GetObject, with which the gateway confirms (by HeadObject: ETag and
    CRC32C, never the bytes) a completion whose answer was lost. AWS has no metadata-only
    permission: HeadObject and GetObjectAttributes both need s3:GetObject, which would also
    allow reading the recordings, so it stays optional.
    """
    statements: list[dict[str, Any]] = [
        {
            "Sid": "RecgwWriteUnderPrefix",
            "Effect": "Allow",
            "Action": _writer_actions(allow_abort),
            "Resource": writes_resource(bucket, prefix),
        }
    ]
    if allow_confirm:
        statements.append(
            {
                "Sid": "RecgwConfirmCompletions",
                "Effect": "Allow",
                "Action": "s3:GetObject",
                "Resource": writes_resource(bucket, prefix),
            }
        )
    if kms_key_arn:
        statements.append(
            {
                "Sid": "RecgwUseTheBucketKey",
                "Effect": "Allow",
                "Action": ["kms:GenerateDataKey", "kms:Decrypt"],
                "Resource": validate_kms_key_arn(kms_key_arn),
            }
        )
    return {"Version": POLICY_VERSION, "Statement": statements}


def role_cloudformation(
    bucket: str,
    prefix: str = DEFAULT_PREFIX,
    gateway_principal: str | None = None,
    external_id: str | None = None,
    *,
    role_name: str = DEFAULT_ROLE_NAME,
    kms_key_arn: str | None = None,
    allow_abort: bool = False,
) -> dict[str, Any]:
    """A CloudFormation template creating the role with both policies in one step."""
    if not _ROLE_NAME.fullmatch(role_name):
        raise ValueError(f"invalid role name {role_name!r}: 1-64 letters, digits and +=,.@_-")
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": f"IAM role that recgw assumes to write recordings under {prefix}",
        "Resources": {
            "RecgwWriterRole": {
                "Type": "AWS::IAM::Role",
                "Properties": {
                    "RoleName": role_name,
                    "MaxSessionDuration": 3600,
                    "AssumeRolePolicyDocument": trust_policy(gateway_principal, external_id),
                    "Policies": [
                        {
                            "PolicyName": "recgw-write-recordings",
                            "PolicyDocument": permission_policy(
                                bucket, prefix, kms_key_arn, allow_abort=allow_abort
                            ),
                        }
                    ],
                },
            }
        },
        "Outputs": {
            "RoleArn": {
                "Description": "Give this ARN to recgw (SetCredentials role.role_arn)",
                "Value": {"Fn::GetAtt": ["RecgwWriterRole", "Arn"]},
            }
        },
    }


# --- access points ---------------------------------------------------------------------------


def access_point_policy(
    access_point_arn: str, prefix: str = DEFAULT_PREFIX, principal_arn: str | None = None
) -> dict[str, Any]:
    """The access point's own policy: the principal may write objects under `prefix` through it."""
    access_point = parse_access_point(access_point_arn)
    if access_point is None:
        raise ValueError(
            f"invalid access point ARN {access_point_arn!r}: expected "
            "arn:aws:s3:REGION:ACCOUNT-ID:accesspoint/NAME"
        )
    principal = validate_principal(principal_arn) if principal_arn else PRINCIPAL_PLACEHOLDER
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            {
                "Sid": "RecgwWriteThroughAccessPoint",
                "Effect": "Allow",
                "Principal": {"AWS": principal},
                "Action": "s3:PutObject",
                "Resource": access_point.objects_arn(validate_prefix(prefix)),
            }
        ],
    }


def access_point_delegation_statement(
    bucket: str, access_point_arn: str, prefix: str = DEFAULT_PREFIX
) -> dict[str, Any]:
    """The bucket policy statement that lets the access point's policy decide about writes.

    Without it (or an equivalent grant on the bucket) S3 refuses writes through the access
    point even when the identity and access point policies allow them.
    """
    access_point = parse_access_point(access_point_arn)
    if access_point is None:
        raise ValueError(f"invalid access point ARN {access_point_arn!r}")
    return {
        "Sid": "RecgwDelegateWritesToTheAccessPoint",
        "Effect": "Allow",
        "Principal": {"AWS": "*"},
        "Action": "s3:PutObject",
        "Resource": object_arn(bucket, prefix),
        "Condition": {"StringEquals": {"s3:DataAccessPointArn": access_point.arn}},
    }
