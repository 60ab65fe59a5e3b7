"""How the object store's errors reach the caller: status, reason and an actionable message.

The end-to-end tests put tests/s3_fault_proxy.py between the gateway and moto: moto neither
lacks SSE support (MinIO without a KMS answers 501 NotImplemented to SSE writes) nor has KMS keys
that are disabled or pending deletion, so the proxy answers those requests as MinIO and AWS do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import botocore.exceptions
import grpc
import pytest
from recgw.v1 import credentials_pb2

from recgw_server.dev.stack import MotoS3
from recgw_server.domain import EncryptionMode, ErrorKind, Reason
from recgw_server.storage.s3 import translate_error
from tests.harness import (
    GatewayThread,
    MiB,
    Tenant,
    error_info,
    expect_error,
    set_credentials,
    upload_messages,
)
from tests.s3_fault_proxy import Rule, S3FaultProxy, s3_error

KMS_ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def _client_error(code: str, status: int, message: str = "") -> botocore.exceptions.ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return botocore.exceptions.ClientError(response, "PutObject")


# (store code, HTTP status, store message, encryption asked for) ->
# (kind, reason, words the message must contain)
TABLE: list[tuple[str, int, str, EncryptionMode, ErrorKind, Reason, str]] = [
    # MinIO without a KMS, to SSE-S3 and SSE-KMS writes
    (
        "NotImplemented",
        501,
        "Server side encryption specified but KMS is not configured",
        EncryptionMode.S3,
        ErrorKind.FAILED_PRECONDITION,
        Reason.ENCRYPTION_NOT_SUPPORTED,
        "does not support server-side encryption AES256",
    ),
    (
        "NotImplemented",
        501,
        "",
        EncryptionMode.KMS,
        ErrorKind.FAILED_PRECONDITION,
        Reason.ENCRYPTION_NOT_SUPPORTED,
        "aws:kms",
    ),
    # 501 without encryption: not retryable either, but not about encryption
    (
        "NotImplemented",
        501,
        "",
        EncryptionMode.NONE,
        ErrorKind.FAILED_PRECONDITION,
        Reason.STORAGE_REJECTED,
        "does not implement PutObject",
    ),
    # AWS's KMS errors, passed on by S3, in AWS's case and in others
    *[
        (
            code,
            400,
            "",
            EncryptionMode.KMS,
            ErrorKind.FAILED_PRECONDITION,
            Reason.STORAGE_REJECTED,
            words,
        )
        for code, words in [
            ("KMS.NotFoundException", "does not exist"),
            ("kms.notfoundexception", "does not exist"),
            ("KMS.DisabledException", "is disabled"),
            ("KMS.KMSInvalidStateException", "pending deletion"),
            ("kms:KMSInvalidStateException", "pending deletion"),
            ("KMS.InvalidKeyUsageException", "not a symmetric encryption key"),
            ("KMS.SomethingNew", "could not be used"),
        ]
    ],
    (
        "KMS.AccessDeniedException",
        400,
        "",
        EncryptionMode.KMS,
        ErrorKind.PERMISSION_DENIED,
        Reason.ACCESS_DENIED,
        "kms:GenerateDataKey and kms:Decrypt",
    ),
    *[
        (
            code,
            503,
            "",
            EncryptionMode.KMS,
            ErrorKind.UNAVAILABLE,
            Reason.STORAGE_UNAVAILABLE,
            "KMS is unavailable or throttling",
        )
        for code in (
            "KMS.ThrottlingException",
            "KMS.KMSInternalException",
            "KMS.KeyUnavailableException",
            "KMS.DependencyTimeoutException",
            "kms.limitexceededexception",
        )
    ],
    # AccessDenied whose text is about KMS but names no permission
    (
        "AccessDenied",
        403,
        "The ciphertext refers to a customer master key that does not exist, does not exist "
        "in this region, or you are not allowed to access.",
        EncryptionMode.KMS,
        ErrorKind.PERMISSION_DENIED,
        Reason.ACCESS_DENIED,
        "KMS key's policy",
    ),
    (
        "SlowDown",
        503,
        "",
        EncryptionMode.NONE,
        ErrorKind.UNAVAILABLE,
        Reason.STORAGE_UNAVAILABLE,
        "retry later",
    ),
]


@pytest.mark.parametrize(
    ("code", "status", "message", "encryption", "kind", "reason", "words"),
    TABLE,
    ids=[f"{row[0]}-{row[3].value}" for row in TABLE],
)
def test_store_errors_map_to_a_status_and_reason(
    code: str,
    status: int,
    message: str,
    encryption: EncryptionMode,
    kind: ErrorKind,
    reason: Reason,
    words: str,
) -> None:
    error = translate_error(
        _client_error(code, status, message), "PutObject", "b", "uploads/k", encryption, KMS_ARN
    )
    assert (error.kind, error.reason) == (kind, reason)
    assert words in error.message
    assert error.details["store_code"] == code
    assert message not in error.message or not message  # S3's own text is not copied


def test_kms_access_denied_names_the_missing_permission() -> None:
    text = (
        "User: arn:aws:iam::123456789012:user/t is not authorized to perform: "
        f"kms:GenerateDataKey on resource: {KMS_ARN}"
    )
    error = translate_error(
        _client_error("KMS.AccessDeniedException", 400, text),
        "CreateMultipartUpload",
        "b",
        "uploads/k",
        EncryptionMode.KMS,
        KMS_ARN,
    )
    assert error.reason is Reason.ACCESS_DENIED
    assert error.details["missing_permission"] == f"kms:GenerateDataKey on {KMS_ARN}"


# -- end to end, through the gateway ------------------------------------------------------


@pytest.fixture
def s3proxy(moto: MotoS3) -> Iterator[S3FaultProxy]:
    proxy = S3FaultProxy(moto.endpoint_url)
    yield proxy
    proxy.close()


def _encrypted_tenant(
    gateway: GatewayThread,
    new_tenant: Callable[..., Tenant],
    proxy: S3FaultProxy,
    mode: Any,
    kms_key_id: str = "",
) -> Tenant:
    tenant = new_tenant()
    set_credentials(
        gateway,
        tenant,
        endpoint_url=proxy.endpoint_url,
        encryption=credentials_pb2.ServerSideEncryption(mode=mode, kms_key_id=kms_key_id),
    )
    return tenant


def test_a_store_without_sse_support_is_a_failed_precondition_not_an_outage(
    gateway: GatewayThread, new_tenant: Callable[..., Tenant], s3proxy: S3FaultProxy
) -> None:
    """As MinIO without a KMS: 501 NotImplemented to the SSE-S3 write, once (not retried)."""
    tenant = _encrypted_tenant(
        gateway, new_tenant, s3proxy, credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_S3
    )
    s3proxy.add(
        Rule(
            "PutObject",
            "answer",
            times=None,
            status=501,
            body=s3_error(
                "NotImplemented", "Server side encryption specified but KMS is not configured"
            ),
        )
    )
    error = expect_error(gateway, upload_messages(tenant.tenant_id, "sse.bin", b"x" * 1000))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    reason, metadata = error_info(error)
    assert reason == "ENCRYPTION_NOT_SUPPORTED"
    assert metadata["store_code"] == "NotImplemented"
    assert "SetCredentials" in str(error.details())
    assert s3proxy.count("PutObject") == 1


def test_a_kms_key_pending_deletion_fails_the_upload_with_what_to_fix(
    gateway: GatewayThread, new_tenant: Callable[..., Tenant], s3proxy: S3FaultProxy
) -> None:
    """As AWS when the tenant's key is pending deletion: 400 KMS.KMSInvalidStateException to
    CreateMultipartUpload."""
    tenant = _encrypted_tenant(
        gateway, new_tenant, s3proxy, credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_KMS, KMS_ARN
    )
    s3proxy.add(
        Rule(
            "CreateMultipartUpload",
            "answer",
            times=None,
            status=400,
            body=s3_error("KMS.KMSInvalidStateException", f"{KMS_ARN} is pending deletion."),
        )
    )
    data = os.urandom(6 * MiB)  # more than a part: a multipart upload
    error = expect_error(gateway, upload_messages(tenant.tenant_id, "kms.bin", data))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    reason, metadata = error_info(error)
    assert reason == "STORAGE_REJECTED"
    assert metadata["store_code"] == "KMS.KMSInvalidStateException"
    assert "pending deletion" in str(error.details()) and KMS_ARN in str(error.details())
    assert s3proxy.count("CreateMultipartUpload") == 1
