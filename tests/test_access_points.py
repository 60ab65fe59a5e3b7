"""Access points: set-ups that cannot work are refused; the ones that can reach the right host.

moto does not route access points (requests for `NAME-ACCOUNT.s3-accesspoint.REGION...` never
reach it), so the request construction is tested instead: the gateway's own S3 client prepares
each request, and a botocore `before-send` hook records its URL, Host and signature scope and
answers it without sending anything. That covers what the gateway decides (host, region, path,
headers); whether AWS then accepts the write is for the policies (`recgw policy --access-point`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from recgw.v1 import credentials_pb2

from recgw_server.domain import Secret, StorageTarget, TenantCredentials
from recgw_server.pipeline.digest import crc32c
from recgw_server.storage.base import BytesBody, ObjectSpec
from recgw_server.storage.s3 import S3ObjectStore
from tests.harness import ADMIN, GatewayThread, details, error_info

ARN = "arn:aws:s3:us-west-2:123456789012:accesspoint/recordings-ap"
ALIAS = "recordings-ap-a1b2c3d4e5f6g7h8i9j0k1l2m3n4o-s3alias"


def set_request(bucket: str, **target: Any) -> credentials_pb2.SetCredentialsRequest:
    return credentials_pb2.SetCredentialsRequest(
        tenant_id=f"t-ap-{uuid.uuid4().hex[:8]}",
        access_key_id="AKIAACCESSPOINT0TEST",
        secret_access_key="CANARY-" + uuid.uuid4().hex,
        target=credentials_pb2.StorageTarget(bucket=bucket, **target),
    )


@pytest.mark.parametrize(
    ("bucket", "target", "field", "hint"),
    [
        (ARN, {"endpoint_url": "https://s3.example.com"}, "target.endpoint_url", "does not exist"),
        (ARN, {"force_path_style": True}, "target.force_path_style", "path-style"),
        (
            "arn:aws:s3-object-lambda:us-west-2:123456789012:accesspoint/transform",
            {},
            "target.bucket",
            "does not accept writes",
        ),
    ],
)
def test_set_credentials_refuses_what_cannot_work(
    gateway: GatewayThread, bucket: str, target: dict[str, Any], field: str, hint: str
) -> None:
    """INVALID_ARGUMENT with the reason, never the UNAVAILABLE of an unresolvable host."""
    with pytest.raises(grpc.RpcError) as caught:
        gateway.credentials.SetCredentials(set_request(bucket, **target), metadata=ADMIN)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, facts = error_info(caught.value)
    assert (reason, facts["field"]) == ("INVALID_FIELD", field)
    assert hint in details(caught.value)


def test_an_access_point_arn_for_aws_is_accepted(gateway: GatewayThread) -> None:
    request = set_request(ARN)
    view = gateway.credentials.SetCredentials(request, metadata=ADMIN).credentials
    assert (view.target.bucket, view.target.region) == (ARN, "")


@dataclass
class Sent:
    url: str
    host: str
    scope: str
    headers: dict[str, str] = field(default_factory=dict)


class _Body:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


def prepared_requests(bucket: str, region: str, **target: Any) -> tuple[list[Sent], list[Sent]]:
    """The PutObject and UploadPart requests the gateway's client prepares; none is sent."""
    credentials = TenantCredentials(
        tenant_id="t-ap",
        access_key_id="AKIAACCESSPOINT0TEST",
        secret_access_key=Secret("not-a-real-secret"),
        target=StorageTarget(region=region, bucket=bucket, **target).validated(),
        version=1,
    )
    store = S3ObjectStore()
    sent: list[Sent] = []

    def record(request: AWSPreparedRequest, **_: Any) -> AWSResponse:
        headers = {
            name.lower(): value.decode() if isinstance(value, bytes) else str(value)
            for name, value in request.headers.items()
        }
        credential = headers["authorization"].split("Credential=", 1)[1].split(",", 1)[0]
        sent.append(Sent(request.url, headers["host"], credential.split("/", 1)[1], headers))
        answer: Any = {"ETag": '"abc"'}
        return AWSResponse(request.url, 200, answer, _Body(b""))

    async def write() -> None:
        writer = await store.writer_for(credentials)
        for client in writer.clients:
            client.meta.events.register("before-send.s3", record)
        spec = ObjectSpec("uploads/2026/call.webm", "audio/webm", {}, if_none_match=True)
        await writer.put_object(spec, BytesBody(b"x"), crc32c(b"x"))
        await writer.upload_part(
            "uploads/2026/call.webm", "upload-1", 1, BytesBody(b"y"), crc32c(b"y")
        )

    try:
        asyncio.run(write())
    finally:
        store.close()
    return sent[:1], sent[1:]


def test_writes_through_an_access_point_arn_go_to_its_host_and_region() -> None:
    """Also when the configured region is another one: use_arn_region sends them to the ARN's."""
    for region in ("", "us-east-1"):
        [put], [part] = prepared_requests(ARN, region, expected_bucket_owner="123456789012")
        host = "recordings-ap-123456789012.s3-accesspoint.us-west-2.amazonaws.com"
        assert put.url == f"https://{host}/uploads/2026/call.webm"
        assert part.url.startswith(f"https://{host}/uploads/2026/call.webm?")
        assert put.host == part.host == host
        assert put.scope.endswith("/us-west-2/s3/aws4_request")
        assert put.headers["if-none-match"] == "*"
        assert put.headers["x-amz-expected-bucket-owner"] == "123456789012"


def test_writes_to_an_access_point_alias_go_to_the_regional_endpoint() -> None:
    [put], _ = prepared_requests(ALIAS, "eu-central-1")
    assert put.url == f"https://{ALIAS}.s3.eu-central-1.amazonaws.com/uploads/2026/call.webm"
    assert put.scope.endswith("/eu-central-1/s3/aws4_request")
