"""Uploads through the real gateway into moto with the seed's PutObject-only policy."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable

import botocore.exceptions
import pytest
import requests
from awscrt import checksums
from recgw.v1 import credentials_pb2, upload_pb2

from recgw_server.dev.stack import MotoS3, free_port
from tests.conftest import SHARED_BUCKET
from tests.harness import (
    ADMIN,
    GatewayThread,
    MiB,
    Tenant,
    read_object,
    upload,
    upload_messages,
)


def test_small_upload_is_a_single_put_object(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(gateway=gateway)
    data = os.urandom(300_000)
    response = upload(
        gateway,
        upload_messages(
            tenant.tenant_id,
            "calls/small.webm",
            data,
            chunk=64 * 1024,
            content_type="video/webm",
            metadata={"call-id": "42"},
        ),
    )
    assert response.key == "uploads/calls/small.webm"
    assert response.bucket == tenant.bucket
    assert response.size == len(data)
    assert response.part_count == 0
    assert response.checksums.sha256 == hashlib.sha256(data).digest()
    assert response.checksums.crc32c == checksums.crc32c(data)
    assert read_object(moto, tenant.bucket, response.key) == data
    head = moto.client("s3").head_object(Bucket=tenant.bucket, Key=response.key)
    assert head["ContentType"] == "video/webm"
    assert head["Metadata"] == {"call-id": "42"}


def test_multipart_upload_is_byte_exact(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(gateway=gateway)
    data = os.urandom(12 * MiB + 12345)
    sums = upload_pb2.ObjectChecksums(
        crc32c=checksums.crc32c(data), sha256=hashlib.sha256(data).digest()
    )
    response = upload(
        gateway, upload_messages(tenant.tenant_id, "calls/big.webm", data, checksums=sums)
    )
    assert response.part_count == 3  # 5 MiB parts in the test gateway
    assert response.size == len(data)
    assert read_object(moto, tenant.bucket, response.key) == data


SEED_POLICY_VERBATIM = """
{
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "16933222-fba4-4de3-bf3e-427759b73a9d",
            "Effect": "Allow",
            "Action": "s3:PutObject",
            "Resource": "arn:aws:s3:::<REPLACE_BUCKET_NAME>/*"
        }
    ]
}
"""


def test_the_setup_guides_policy_is_all_it_takes(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    """The customer pastes the guide's policy as it is; single, multipart and verify all work."""
    policy = json.loads(SEED_POLICY_VERBATIM.replace("<REPLACE_BUCKET_NAME>", SHARED_BUCKET))
    tenant = new_tenant(policy=policy, bucket=SHARED_BUCKET, gateway=gateway)
    small = upload(gateway, upload_messages(tenant.tenant_id, "seed/small.bin", b"x" * 10))
    data = os.urandom(6 * MiB)
    large = upload(gateway, upload_messages(tenant.tenant_id, "seed/large.bin", data))
    assert (small.part_count, large.part_count) == (0, 2)
    assert read_object(moto, tenant.bucket, large.key) == data
    verify = gateway.credentials.VerifyCredentials(
        credentials_pb2.VerifyCredentialsRequest(tenant_id=tenant.tenant_id), metadata=ADMIN
    )
    assert verify.ok
    # and the tenant's keys really can do nothing else
    s3 = moto.client("s3", tenant.keys)
    with pytest.raises(botocore.exceptions.ClientError):
        s3.get_object(Bucket=tenant.bucket, Key=large.key)


def test_metrics_endpoint(
    make_gateway: Callable[..., GatewayThread], new_tenant: Callable[..., Tenant]
) -> None:
    port = free_port()
    observed = make_gateway(metrics_listen=f"127.0.0.1:{port}")
    tenant = new_tenant(gateway=observed)
    upload(observed, upload_messages(tenant.tenant_id, "metrics.bin", b"m" * 1000))
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert "recgw_bytes_received_total 1000.0" in text
    assert 'recgw_uploads_finished_total{outcome="complete"} 1.0' in text
    assert "recgw_memory_budget_bytes" in text
    assert tenant.tenant_id not in text  # no tenant data in labels


def test_s3_holds_the_whole_object_crc32c(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(gateway=gateway)
    data = os.urandom(11 * MiB)
    response = upload(gateway, upload_messages(tenant.tenant_id, "full-crc.bin", data))
    head = moto.client("s3").head_object(
        Bucket=tenant.bucket, Key=response.key, ChecksumMode="ENABLED"
    )
    assert head["ChecksumType"] == "FULL_OBJECT"
    expected = checksums.crc32c(data).to_bytes(4, "big")
    assert base64.b64decode(head["ChecksumCRC32C"]) == expected
    assert response.checksums.crc32c == checksums.crc32c(data)
