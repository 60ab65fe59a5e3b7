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
    """IAM policy for the gateway's user: write objects under `prefix`, nothing else.

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
            "Resource": object_arn(bucket, prefix),
        }
    ]
    if allow_confirm:
        statements.append(
            {
                "Sid": "RecgwConfirmCompletions",
                "Effect": "Allow",
                "Action": "s3:GetObject",
                "Resource": object_arn(bucket, prefix),
            }
        )
    return {"Version": POLICY_VERSION, "Statement": statements}


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
