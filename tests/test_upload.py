"""Uploads through the real gateway into moto with the seed's PutObject-only policy."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from awscrt import checksums
from recgw.v1 import upload_pb2

from recgw_server.devstack import MotoS3
from tests.harness import (
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
