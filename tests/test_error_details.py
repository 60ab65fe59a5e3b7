"""Every error status carries a google.rpc.ErrorInfo whose reason clients decide on."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc
from recgw.v1 import errors_pb2, upload_pb2

from recgw_server.domain import Reason
from tests.harness import (
    UPLOADER,
    GatewayThread,
    Tenant,
    bearer,
    error_info,
    expect_error,
    upload_messages,
)


def test_reasons_match_the_proto() -> None:
    names = {
        name.removeprefix("ERROR_REASON_")
        for name in errors_pb2.ErrorReason.keys()  # noqa: SIM118
        if name != "ERROR_REASON_UNSPECIFIED"
    }
    assert names == {reason.value for reason in Reason}


def test_stream_out_of_order(gateway: GatewayThread) -> None:
    error = expect_error(gateway, [upload_pb2.UploadRequest(write_offset=0, data=b"abc")])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error)[0] == "STREAM_OUT_OF_ORDER"


def test_invalid_field_names_the_field(
    gateway: GatewayThread, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(gateway=gateway)
    messages = list(upload_messages(tenant.tenant_id, "a.bin", b"abc", upload_id="not-a-uuid"))
    error = expect_error(gateway, messages)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error) == ("INVALID_FIELD", {"field": "start.upload_id"})


def test_offset_mismatch_carries_the_committed_size(
    gateway: GatewayThread, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(gateway=gateway)
    upload_id = str(uuid.uuid4())
    messages = list(upload_messages(tenant.tenant_id, "b.bin", b"abcdef", upload_id=upload_id))
    messages[0].write_offset = 7
    error = expect_error(gateway, messages)
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    reason, metadata = error_info(error)
    assert reason == "OFFSET_MISMATCH"
    assert metadata == {
        "upload_id": upload_id,
        "committed_size": "0",
        "received_size": "0",
        "write_offset": "7",
    }


def test_unknown_token(gateway: GatewayThread) -> None:
    status = upload_pb2.GetUploadStatusRequest(upload_id=str(uuid.uuid4()))
    try:
        gateway.uploads.GetUploadStatus(status, metadata=bearer("not-a-token"), timeout=10)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(error)[0] == "TOKEN_INVALID"
    else:
        raise AssertionError("an unknown token was accepted")


def test_unknown_upload_id_is_escaped(gateway: GatewayThread) -> None:
    status = upload_pb2.GetUploadStatusRequest(upload_id="x\nFORGED line")
    try:
        gateway.uploads.GetUploadStatus(status, metadata=UPLOADER, timeout=10)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(error)[0] == "UPLOAD_NOT_FOUND"
        assert "\n" not in (error.details() or "")
        assert "x\\x0aFORGED line" in (error.details() or "")
    else:
        raise AssertionError("an unknown upload was found")


def test_tenant_without_credentials(gateway: GatewayThread) -> None:
    error = expect_error(
        gateway, upload_messages("no-such-tenant-" + uuid.uuid4().hex[:8], "c", b"x")
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(error)[0] == "CREDENTIALS_NOT_FOUND"
