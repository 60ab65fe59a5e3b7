"""Property-based fuzzing (hypothesis): request validation, and raw bytes sent to a live gateway.

`make test` runs a short, derandomized pass; `make fuzz` a long random one
(RECGW_FUZZ_EXAMPLES sets the number of examples per target).
"""

from __future__ import annotations

import fnmatch
import os
import re
import socket
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from recgw.v1 import upload_pb2

from recgw_server.api.services import _expected_checksums, _validate_keys
from recgw_server.auth.certs import certificate_identities
from recgw_server.auth.tokens import TenantScope
from recgw_server.domain import (
    ErrorKind,
    RecgwError,
    StorageTarget,
    build_object_key,
    quote_client,
    validate_tenant_id,
)
from recgw_server.pipeline.model import StartRequest
from recgw_server.pipeline.model import validate_start as _validate_start
from tests.harness import ADMIN, UPLOADER, CapturedLogs, GatewayThread, Metadata

EXAMPLES = int(os.environ.get("RECGW_FUZZ_EXAMPLES", "0"))
LONG = EXAMPLES > 0
settings.register_profile(
    "recgw",
    deadline=None,
    derandomize=not LONG,  # the short pass is the same on every run
    # the long pass remembers failing examples and replays them first
    database=DirectoryBasedExampleDatabase(".hypothesis/examples") if LONG else None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("recgw")


def examples(short: int) -> settings:
    return settings(max_examples=EXAMPLES or short)


CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
MESSAGE_LIMIT = 600  # characters: a status message stays readable, whatever the input


def assert_clean_message(message: str) -> None:
    assert not CONTROL.search(message), message
    assert len(message) <= MESSAGE_LIMIT, message


def outcome(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except RecgwError as error:
        assert_clean_message(error.message)
        return error


text = st.text(max_size=80)
wild_text = st.text(st.characters(codec="utf-8"), max_size=120)


# -- request validation ------------------------------------------------------------------------


@examples(100)
@given(
    tenant_id=text,
    object_name=wild_text,
    content_type=text,
    metadata=st.dictionaries(text, wild_text, max_size=3),
    expected_size=st.none() | st.integers(min_value=-(2**63), max_value=2**64),
    upload_id=st.one_of(text, st.uuids().map(str), st.uuids().map(lambda u: str(u).upper())),
)
def test_start_validation_never_crashes(
    tenant_id: str,
    object_name: str,
    content_type: str,
    metadata: dict[str, str],
    expected_size: int | None,
    upload_id: str,
) -> None:
    request = StartRequest(tenant_id, object_name, content_type, metadata, expected_size, upload_id)
    result = outcome(lambda: _validate_start(request))
    if isinstance(result, RecgwError):
        assert result.kind is ErrorKind.INVALID_ARGUMENT
    else:
        assert str(uuid.UUID(result)) == result
        assert validate_tenant_id(tenant_id) == tenant_id


@examples(150)
@given(prefix=st.sampled_from(["uploads/", "a/b/", "x" * 500 + "/"]), name=wild_text)
def test_object_keys_stay_under_the_prefix(prefix: str, name: str) -> None:
    key = outcome(lambda: build_object_key(prefix, name))
    if isinstance(key, RecgwError):
        return
    assert key.startswith(prefix) and key[len(prefix) :] == name
    assert not CONTROL.search(key)  # it is logged as it is
    assert len(key.encode()) <= 1024
    assert not {".", ".."} & set(key.split("/"))
    assert "//" not in key and not key.endswith("/") and "\\" not in key


@examples(150)
@given(
    region=text,
    bucket=text,
    prefix=wild_text,
    endpoint_url=st.one_of(text, st.just("https://s3.example.com"), text.map("http://{}".format)),
    kms_key_id=text,
)
def test_storage_targets_validate_or_refuse(
    region: str, bucket: str, prefix: str, endpoint_url: str, kms_key_id: str
) -> None:
    target = StorageTarget(region, bucket, prefix, endpoint_url, kms_key_id=kms_key_id)
    checked = outcome(target.validated)
    if not isinstance(checked, RecgwError):
        assert checked.prefix.endswith("/") and not checked.prefix.startswith("/")
        assert not CONTROL.search(checked.prefix)


@examples(150)
@given(key_id=text, secret=wild_text, sha256=st.binary(max_size=40), crc=st.integers(0, 2**32 - 1))
def test_keys_and_checksums_validate_or_refuse(
    key_id: str, secret: str, sha256: bytes, crc: int
) -> None:
    error = outcome(lambda: _validate_keys(key_id, secret))
    if error is None:
        assert key_id.isascii() and key_id.isalnum() and secret.isascii()
    message = upload_pb2.UploadRequest(
        object_checksums=upload_pb2.ObjectChecksums(sha256=sha256, crc32c=crc)
    )
    checked = outcome(lambda: _expected_checksums(message))
    assert isinstance(checked, RecgwError) == (len(sha256) not in (0, 32))


@examples(200)
@given(value=st.text(max_size=300), limit=st.integers(1, 200))
def test_quoted_client_strings_are_clean(value: str, limit: int) -> None:
    quoted = quote_client(value, limit)
    assert not CONTROL.search(quoted)
    assert len(quoted) <= 4 * limit + 5


@examples(200)
@given(
    pattern=st.text("ab-*", min_size=1, max_size=8).filter(lambda p: p[0] != "-"),
    tenant_id=st.text("ab-", min_size=1, max_size=8).filter(lambda t: t[0] != "-"),
)
def test_tenant_patterns_match_like_shell_globs(pattern: str, tenant_id: str) -> None:
    assert TenantScope((pattern,)).allows(tenant_id) == fnmatch.fnmatchcase(tenant_id, pattern)


@examples(200)
@given(
    pem=st.binary(max_size=300)
    | st.binary(max_size=300).map(
        lambda b: b"-----BEGIN CERTIFICATE-----\n" + b + b"\n-----END CERTIFICATE-----\n"
    )
)
def test_certificate_parsing_never_raises(pem: bytes) -> None:
    assert isinstance(certificate_identities(pem), tuple)


# -- raw bytes against a live gateway ----------------------------------------------------------

UNARY = {
    "/recgw.v1.UploadService/GetUploadStatus": UPLOADER,
    "/recgw.v1.UploadService/AbortUpload": UPLOADER,
    "/recgw.v1.UploadService/SalvageUpload": UPLOADER,
    "/recgw.v1.CredentialsService/SetCredentials": ADMIN,
    "/recgw.v1.CredentialsService/DescribeCredentials": ADMIN,
    "/recgw.v1.CredentialsService/DeleteCredentials": ADMIN,
    "/recgw.v1.CredentialsService/VerifyCredentials": ADMIN,
}
# What a token holder may get for arbitrary bytes; never UNKNOWN or INTERNAL.
EXPECTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
}


def call_raw(gateway: GatewayThread, method: str, body: bytes, metadata: Metadata) -> Any:
    call: Any = gateway.channel.unary_unary(method)
    try:
        call(body, metadata=metadata, timeout=20)
    except grpc.RpcError as error:
        assert_clean_message(str(error.details() or ""))
        return error.code()
    return grpc.StatusCode.OK


def no_tracebacks_since(captured: CapturedLogs, start: int) -> None:
    """No ERROR, no traceback, and no raw control character in what the gateway logged."""
    lines = captured.lines[start:]
    assert not [line for line in lines if "Traceback" in line or line.startswith("ERROR")], lines
    assert not [line for line in lines if CONTROL.search(line)]


def test_raw_unary_bodies(gateway: GatewayThread, captured_logs: CapturedLogs) -> None:
    start = len(captured_logs.lines)

    @examples(60)
    @given(method=st.sampled_from(sorted(UNARY)), body=st.binary(max_size=200))
    def run(method: str, body: bytes) -> None:
        assert call_raw(gateway, method, body, ()) == grpc.StatusCode.UNAUTHENTICATED
        assert call_raw(gateway, method, body, UNARY[method]) in EXPECTED | {grpc.StatusCode.OK}

    run()
    no_tracebacks_since(captured_logs, start)


def test_raw_upload_streams(gateway: GatewayThread, captured_logs: CapturedLogs) -> None:
    start = len(captured_logs.lines)
    valid_start = st.builds(
        lambda tenant, name, ctype, meta, finish: upload_pb2.UploadRequest(
            start=upload_pb2.UploadStart(
                tenant_id=tenant, object_name=name, content_type=ctype, metadata=meta
            ),
            data=b"x",
            finish_write=finish,
        ).SerializeToString(),
        st.sampled_from(["no-credentials", "t-" + uuid.uuid4().hex[:8]]) | text,
        wild_text,
        text,
        st.dictionaries(text, text, max_size=3),
        st.booleans(),
    )

    @examples(60)
    @given(bodies=st.lists(st.binary(max_size=120) | valid_start, min_size=0, max_size=3))
    def run(bodies: list[bytes]) -> None:
        call: Any = gateway.channel.stream_unary("/recgw.v1.UploadService/Upload")
        for metadata, allowed in (
            ((), {grpc.StatusCode.UNAUTHENTICATED}),
            (UPLOADER, EXPECTED | {grpc.StatusCode.ABORTED}),
        ):
            try:
                call(iter(bodies), metadata=metadata, timeout=20)
            except grpc.RpcError as error:
                assert error.code() in allowed, (error.code(), error.details())
                assert_clean_message(str(error.details() or ""))
            else:
                raise AssertionError("a fuzzed stream created an object")

    run()
    no_tracebacks_since(captured_logs, start)


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def test_raw_tcp_bytes_leave_the_gateway_healthy(
    gateway: GatewayThread, captured_logs: CapturedLogs
) -> None:
    start = len(captured_logs.lines)

    @examples(40)
    @given(preface=st.booleans(), junk=st.binary(min_size=1, max_size=512))
    def run(preface: bool, junk: bytes) -> None:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
            sock.sendall((HTTP2_PREFACE if preface else b"") + junk)
            sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass

    run()
    health = health_pb2_grpc.HealthStub(gateway.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
    no_tracebacks_since(captured_logs, start)
