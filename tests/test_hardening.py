"""Input hardening: authentication before parsing, undecodable messages, escaped client strings,
JSON logs, and the audit trail of every credentials call."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from recgw.v1 import credentials_pb2, upload_pb2

from recgw_server.audit import AuditLog
from recgw_server.auth.tokens import hash_token
from recgw_server.dev.stack import AwsKeys, MotoS3
from recgw_server.domain import Secret
from recgw_server.logs import JsonFormatter
from tests.harness import (
    ADMIN,
    ADMIN_TOKEN,
    UPLOADER,
    UPLOADER_TOKEN,
    CapturedLogs,
    GatewayThread,
    Metadata,
    MiB,
    Tenant,
    assert_no_secrets,
    bearer,
    error_info,
    register_canary,
    set_credentials,
    upload_messages,
)

# Field 1, length-delimited, 127 bytes announced, 1 present: no protobuf decoder accepts it.
TRUNCATED = b"\x0a\x7f\x00"
# Field 1 (a string) holding bytes that are not UTF-8.
NOT_UTF8 = b"\x0a\x02\xc3\x28"

UNARY = {
    "/recgw.v1.UploadService/GetUploadStatus": UPLOADER,
    "/recgw.v1.UploadService/AbortUpload": UPLOADER,
    "/recgw.v1.UploadService/SalvageUpload": UPLOADER,
    "/recgw.v1.CredentialsService/SetCredentials": ADMIN,
    "/recgw.v1.CredentialsService/DescribeCredentials": ADMIN,
    "/recgw.v1.CredentialsService/DeleteCredentials": ADMIN,
    "/recgw.v1.CredentialsService/VerifyCredentials": ADMIN,
}
UPLOAD = "/recgw.v1.UploadService/Upload"


def raw_unary(channel: grpc.Channel, method: str, body: bytes, metadata: Metadata) -> grpc.RpcError:
    call: Any = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        call(body, metadata=metadata, timeout=10)
    return caught.value


def raw_stream(channel: grpc.Channel, bodies: list[bytes], metadata: Metadata) -> grpc.RpcError:
    call: Any = channel.stream_unary(UPLOAD, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        call(iter(bodies), metadata=metadata, timeout=10)
    return caught.value


@pytest.fixture
def new_log_lines(captured_logs: CapturedLogs) -> Iterator[Callable[[], list[str]]]:
    """The log records written since the test began."""
    start = len(captured_logs.lines)
    yield lambda: captured_logs.lines[start:]


def assert_no_tracebacks(lines: list[str]) -> None:
    assert not [line for line in lines if "Traceback" in line or line.startswith("ERROR")]


@pytest.mark.parametrize("body", [TRUNCATED, NOT_UTF8, b"\xff" * 64], ids=["cut", "utf8", "ff"])
def test_garbage_without_a_token_is_refused_before_parsing(
    gateway: GatewayThread, body: bytes, new_log_lines: Callable[[], list[str]]
) -> None:
    for method in UNARY:
        for metadata in ((), bearer("not-a-configured-token")):
            error = raw_unary(gateway.channel, method, body, metadata)
            # Had the body been parsed first, it would have failed as undecodable.
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, method
            assert error_info(error)[0] == "TOKEN_INVALID"
    error = raw_stream(gateway.channel, [body, body], ())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert_no_tracebacks(new_log_lines())


def test_garbage_with_the_wrong_role_is_permission_denied(gateway: GatewayThread) -> None:
    error = raw_unary(
        gateway.channel, "/recgw.v1.CredentialsService/SetCredentials", TRUNCATED, UPLOADER
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(error)[0] == "ROLE_NOT_ALLOWED"


@pytest.mark.parametrize("body", [TRUNCATED, NOT_UTF8, b"\xff" * 64], ids=["cut", "utf8", "ff"])
def test_undecodable_messages_from_token_holders_are_invalid_argument(
    gateway: GatewayThread, body: bytes, new_log_lines: Callable[[], list[str]]
) -> None:
    for method, metadata in UNARY.items():
        error = raw_unary(gateway.channel, method, body, metadata)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert error_info(error)[0] == "MESSAGE_UNDECODABLE"
        request_type = method.rsplit("/", 1)[1] + "Request"
        assert f"the request is not a valid recgw.v1.{request_type}" in str(error.details())
    error = raw_stream(gateway.channel, [body], UPLOADER)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error)[0] == "MESSAGE_UNDECODABLE"
    assert "message 1 of the stream" in str(error.details())
    assert_no_tracebacks(new_log_lines())


def test_undecodable_message_mid_stream_leaves_the_upload_resumable(
    gateway: GatewayThread, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(gateway=gateway)
    upload_id = str(uuid.uuid4())
    first = next(
        upload_messages(tenant.tenant_id, "mid.bin", b"x" * MiB, upload_id=upload_id, finish=False)
    )
    error = raw_stream(gateway.channel, [first.SerializeToString(), TRUNCATED], UPLOADER)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error)[0] == "MESSAGE_UNDECODABLE"
    assert "message 2 of the stream" in str(error.details())
    status = gateway.uploads.GetUploadStatus(
        upload_pb2.GetUploadStatusRequest(upload_id=upload_id), metadata=UPLOADER
    )
    assert status.state == upload_pb2.UPLOAD_STATE_OPEN


FORGED = "x\n2026-12-01 12:00:00 ERROR recgw_server forged\r\x1b[31m\u2028"


def test_client_strings_cannot_forge_log_lines(
    gateway: GatewayThread, new_log_lines: Callable[[], list[str]]
) -> None:
    messages: list[str] = []
    calls: list[tuple[Any, Any, Metadata]] = [
        (
            gateway.uploads.GetUploadStatus,
            upload_pb2.GetUploadStatusRequest(upload_id=FORGED),
            UPLOADER,
        ),
        (gateway.uploads.AbortUpload, upload_pb2.AbortUploadRequest(upload_id=FORGED), UPLOADER),
        (
            gateway.credentials.DescribeCredentials,
            credentials_pb2.DescribeCredentialsRequest(tenant_id=FORGED),
            ADMIN,
        ),
    ]
    for call, request, metadata in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call(request, metadata=metadata, timeout=10)
        messages.append(str(caught.value.details()))
    for start in (
        upload_pb2.UploadStart(tenant_id=FORGED, object_name="a"),
        upload_pb2.UploadStart(tenant_id="t-forge", object_name=FORGED),
        upload_pb2.UploadStart(tenant_id="t-forge", object_name="a", metadata={FORGED: "v"}),
        upload_pb2.UploadStart(tenant_id="t-forge", object_name="a", content_type=FORGED),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            gateway.uploads.Upload(iter([upload_pb2.UploadRequest(start=start)]), metadata=UPLOADER)
        messages.append(str(caught.value.details()))
    for text in messages + new_log_lines():
        assert not any(c in text for c in "\n\r\x1b\u2028"), text
    assert any("\\x0a2026-12-01" in text for text in messages)


def test_json_log_lines_hold_any_value() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord(
        "recgw_server.x", logging.INFO, __file__, 1, "id %s", (FORGED,), None
    )
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord(
            "recgw_server.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    for item in (record, failed):
        line = formatter.format(item)
        assert "\n" not in line and "\r" not in line and "\u2028" not in line
        parsed = json.loads(line)
        assert parsed["logger"] == "recgw_server.x" and parsed["time"].endswith("Z")
    assert json.loads(formatter.format(record))["message"] == "id " + FORGED
    assert "ValueError: boom" in json.loads(formatter.format(failed))["exception"]


# -- the audit trail ---------------------------------------------------------------------------


def read_audit(gateway: GatewayThread) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in Path(gateway.gateway.settings.audit.sink).read_text().splitlines()
    ]


def test_every_credentials_call_is_audited_without_secrets(
    make_gateway: Callable[..., GatewayThread], moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    scoped_token = register_canary("scoped-admin-CANARY-TOKEN-" + uuid.uuid4().hex)
    tokens = [
        {"name": "test-uploader", "role": "uploader", "sha256": hash_token(UPLOADER_TOKEN)},
        {"name": "test-admin", "role": "admin", "sha256": hash_token(ADMIN_TOKEN)},
        {"name": "scoped-admin", "role": "admin", "sha256": hash_token(scoped_token)},
    ]
    gateway = make_gateway(
        tokens=[
            {**t, "tenants": ["only-this-one" if t["name"] == "scoped-admin" else "*"]}
            for t in tokens
        ]
    )
    tenant = new_tenant()
    secret = register_canary("CANARY-SECRET-" + uuid.uuid4().hex)
    tenant.keys = AwsKeys(tenant.keys.access_key_id, Secret(secret))
    set_credentials(gateway, tenant, endpoint_url=moto.endpoint_url)  # 1 set, ok
    stub = gateway.credentials
    tenant_id = tenant.tenant_id
    describe = credentials_pb2.DescribeCredentialsRequest(tenant_id=tenant_id)
    stub.DescribeCredentials(describe, metadata=ADMIN)  # 2 describe, ok
    stub.VerifyCredentials(  # 3 verify, ok (the secret is wrong for moto: write_ok false)
        credentials_pb2.VerifyCredentialsRequest(tenant_id=tenant_id), metadata=ADMIN
    )
    bad_key = credentials_pb2.SetCredentialsRequest(
        tenant_id=tenant_id, access_key_id="short", secret_access_key=secret
    )
    failures = [
        (bad_key, ADMIN),  # 4 set, failed: invalid key id
        (bad_key, UPLOADER),  # 5 set, denied: wrong role
        (bad_key, ()),  # 6 set, denied: no token
        (bad_key, bearer(scoped_token)),  # 7 set, failed: tenant not allowed
    ]
    for request, metadata in failures:
        with pytest.raises(grpc.RpcError):
            stub.SetCredentials(request, metadata=metadata)
    delete = credentials_pb2.DeleteCredentialsRequest(tenant_id=tenant_id)
    stub.DeleteCredentials(delete, metadata=ADMIN)  # 8 delete, ok
    with pytest.raises(grpc.RpcError):
        stub.DeleteCredentials(delete, metadata=ADMIN)  # 9 delete, failed: not found
    pasted = credentials_pb2.SetCredentialsRequest(  # 10 set, failed: the secret pasted as id
        tenant_id=f"BAD TENANT {secret}", access_key_id="short", secret_access_key=secret
    )
    with pytest.raises(grpc.RpcError):
        stub.SetCredentials(pasted, metadata=ADMIN)

    records = read_audit(gateway)
    assert [(r["operation"], r["outcome"]) for r in records] == [
        ("set", "ok"),
        ("describe", "ok"),
        ("verify", "ok"),
        ("set", "failed"),
        ("set", "denied"),
        ("set", "denied"),
        ("set", "failed"),
        ("delete", "ok"),
        ("delete", "failed"),
        ("set", "failed"),
    ]
    set_ok, described, verified, invalid, wrong_role, anonymous, out_of_scope = records[:7]
    assert set_ok["caller"] == "test-admin" and set_ok["caller_kind"] == "token"
    assert set_ok["tenant_id"] == tenant_id and set_ok["code"] == "OK"
    assert set_ok["vault_version"] >= 1
    assert set_ok["access_key_id"] == "****" + tenant.keys.access_key_id[-4:]
    assert set_ok["time"].endswith("Z") and set_ok["peer"]
    assert described["vault_version"] == set_ok["vault_version"]
    assert verified["write_ok"] is False and verified["store_code"]
    assert (invalid["code"], invalid["reason"]) == ("INVALID_ARGUMENT", "INVALID_FIELD")
    assert (wrong_role["caller"], wrong_role["reason"]) == ("test-uploader", "ROLE_NOT_ALLOWED")
    assert (anonymous["caller"], anonymous["code"]) == ("", "UNAUTHENTICATED")
    assert wrong_role["tenant_id"] == anonymous["tenant_id"] == ""  # bodies never parsed
    assert (out_of_scope["caller"], out_of_scope["reason"]) == (
        "scoped-admin",
        "TENANT_NOT_ALLOWED",
    )
    assert records[-2]["code"] == "NOT_FOUND"
    assert records[-1]["tenant_id"] == "(invalid)"  # the caller's text is not recorded
    text = Path(gateway.gateway.settings.audit.sink).read_text()
    assert tenant.keys.access_key_id not in text
    assert_no_secrets(text)


def test_audit_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    audit = AuditLog("stdout")
    asyncio.run(audit.record(event="credentials", operation="set", tenant_id="a\nb", outcome="ok"))
    line = capsys.readouterr().out
    assert line.count("\n") == 1
    assert json.loads(line)["tenant_id"] == "a\nb"
