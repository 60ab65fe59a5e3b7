"""Bearer tokens with roles on every RPC; health needs none."""

from __future__ import annotations

import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recgw.v1 import credentials_pb2, upload_pb2

from recgw_server.auth.tokens import Role, TokenEntry, TokenVerifier, hash_token
from tests.harness import ADMIN, UPLOADER, GatewayThread, Metadata, bearer, details, upload_messages


def status_request() -> upload_pb2.GetUploadStatusRequest:
    return upload_pb2.GetUploadStatusRequest(upload_id=str(uuid.uuid4()))


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        bearer("not-a-configured-token"),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", "Bearer "),),
    ],
    ids=["none", "unknown", "basic", "empty"],
)
def test_missing_or_unknown_token_is_unauthenticated(
    gateway: GatewayThread, metadata: Metadata
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        gateway.uploads.GetUploadStatus(status_request(), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in details(caught.value)
    with pytest.raises(grpc.RpcError) as caught:
        gateway.uploads.Upload(upload_messages("t", "a", b"x"), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        gateway.credentials.DescribeCredentials(
            credentials_pb2.DescribeCredentialsRequest(tenant_id="t"), metadata=metadata
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_wrong_role_is_permission_denied(gateway: GatewayThread) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        gateway.uploads.Upload(upload_messages("t", "a", b"x"), metadata=ADMIN)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "needs role 'uploader'" in details(caught.value)
    with pytest.raises(grpc.RpcError) as caught:
        gateway.credentials.SetCredentials(
            credentials_pb2.SetCredentialsRequest(tenant_id="t"), metadata=UPLOADER
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "needs role 'admin'" in details(caught.value)


def test_health_needs_no_token(gateway: GatewayThread) -> None:
    health = health_pb2_grpc.HealthStub(gateway.channel)
    for service in ("", "recgw.v1.UploadService", "recgw.v1.CredentialsService"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_is_off_by_default(gateway: GatewayThread) -> None:
    call = gateway.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(call(iter([b""])))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_token_verifier_matches_hashes_only() -> None:
    verifier = TokenVerifier(
        [
            TokenEntry("a", Role.ADMIN, hash_token("alpha")),
            TokenEntry("u", Role.UPLOADER, hash_token("beta")),
        ]
    )
    assert verifier.verify("alpha") == TokenEntry("a", Role.ADMIN, hash_token("alpha"))
    entry = verifier.verify("beta")
    assert entry is not None and entry.role is Role.UPLOADER
    assert verifier.verify("gamma") is None
    assert verifier.verify(hash_token("alpha")) is None  # the hash itself is not a token
