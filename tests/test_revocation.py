"""Revoking a token by editing the configuration: the file watch and SIGHUP, without a restart."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from recgw.v1 import upload_pb2, upload_pb2_grpc

from recgw_server.auth.tokens import hash_token
from recgw_server.config import load_settings
from recgw_server.dev.stack import MotoS3, OpenBao, VaultIdentities, free_port, wait_until
from tests.harness import (
    ADMIN_TOKEN,
    UPLOADER,
    UPLOADER_TOKEN,
    CapturedLogs,
    GatewayThread,
    Metadata,
    MiB,
    ServedGateway,
    Tenant,
    assert_no_secrets,
    bearer,
    error_info,
    read_object,
    register_canary,
    resume_messages,
    upload_messages,
)
from tests.secure import config_toml, token_toml

DOOMED_TOKEN = register_canary("doomed-CANARY-TOKEN-" + uuid.uuid4().hex)
DOOMED = bearer(DOOMED_TOKEN)


def tokens(with_doomed: bool) -> str:
    text = token_toml("keep", "uploader", ["*"], sha256=hash_token(UPLOADER_TOKEN))
    text += token_toml("admin", "admin", ["*"], sha256=hash_token(ADMIN_TOKEN))
    if with_doomed:
        text += token_toml("doomed", "uploader", ["*"], sha256=hash_token(DOOMED_TOKEN))
    return text


def status_code(stub: upload_pb2_grpc.UploadServiceStub, metadata: Metadata) -> grpc.StatusCode:
    request = upload_pb2.GetUploadStatusRequest(upload_id=str(uuid.uuid4()))
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetUploadStatus(request, metadata=metadata, timeout=5)
    return caught.value.code()


def held_stream(
    gateway: GatewayThread,
    tenant: Tenant,
    data: bytes,
    metadata: Metadata,
    pool: ThreadPoolExecutor,
) -> tuple[str, threading.Event, Future[upload_pb2.UploadResponse]]:
    """A stream that sends 6 MiB (one committed part) and then waits for the event."""
    upload_id = str(uuid.uuid4())
    release = threading.Event()

    def messages() -> Iterator[upload_pb2.UploadRequest]:
        for message in upload_messages(tenant.tenant_id, upload_id, data, upload_id=upload_id):
            if message.write_offset == 6 * MiB:
                release.wait(60)
            yield message

    future = pool.submit(gateway.uploads.Upload, messages(), metadata=metadata, timeout=90)

    def committed() -> bool:
        request = upload_pb2.GetUploadStatusRequest(upload_id=upload_id)
        status = gateway.uploads.GetUploadStatus(request, metadata=UPLOADER, timeout=5)
        return status.committed_size == 5 * MiB and status.received_size == 6 * MiB

    wait_until(committed, 30, "the first part of the held stream")
    return upload_id, release, future


def test_revoked_token_is_refused_and_its_stream_ends_cleanly(
    tmp_path: Path,
    openbao: OpenBao,
    identities: VaultIdentities,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    captured_logs: CapturedLogs,
) -> None:
    config = tmp_path / "recgw.toml"

    def write(doomed: bool) -> None:
        top = "reload_check_seconds = 0.05"
        config.write_text(config_toml(0, tmp_path, openbao, identities, tokens(doomed), top=top))

    write(True)
    first_line = len(captured_logs.lines)
    gateway = GatewayThread(load_settings(config), config_file=config)
    releases: list[threading.Event] = []
    try:
        tenant = new_tenant(gateway=gateway)
        data = os.urandom(8 * MiB)
        with ThreadPoolExecutor(2) as pool:
            doomed_id, doomed_release, doomed_stream = held_stream(
                gateway, tenant, data, DOOMED, pool
            )
            keep_id, keep_release, keep_stream = held_stream(gateway, tenant, data, UPLOADER, pool)
            releases += [doomed_release, keep_release]
            assert status_code(gateway.uploads, DOOMED) == grpc.StatusCode.NOT_FOUND

            write(False)  # the file watch notices within 50 ms
            with pytest.raises(grpc.RpcError) as ended:
                doomed_stream.result(30)
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error_info(ended.value)[0] == "TOKEN_INVALID"
            assert "'doomed' was revoked" in str(ended.value.details())
            assert status_code(gateway.uploads, DOOMED) == grpc.StatusCode.UNAUTHENTICATED

            # The other token's stream was not disturbed.
            keep_release.set()
            assert keep_stream.result(60).size == len(data)
        # The revoked stream's upload stays open and resumes with a valid token.
        request = upload_pb2.GetUploadStatusRequest(upload_id=doomed_id)
        status = gateway.uploads.GetUploadStatus(request, metadata=UPLOADER)
        assert status.state == upload_pb2.UPLOAD_STATE_OPEN
        resumed = gateway.uploads.Upload(
            resume_messages(tenant, doomed_id, data, doomed_id, status.committed_size),
            metadata=UPLOADER,
            timeout=60,
        )
        assert resumed.size == len(data)
        assert read_object(moto, tenant.bucket, f"uploads/{doomed_id}") == data
        assert read_object(moto, tenant.bucket, f"uploads/{keep_id}") == data
        lines = captured_logs.lines[first_line:]
        assert any("removed ['doomed']" in line for line in lines)
        assert not [line for line in lines if line.startswith("ERROR") or "Traceback" in line]
    finally:
        for release in releases:
            release.set()
        gateway.stop()


_GRPC_CORE_LINE = re.compile(r"^[IWEF]\d{4} ")


def test_sighup_reloads_and_a_broken_file_keeps_the_old_tokens(
    tmp_path: Path, openbao: OpenBao, identities: VaultIdentities
) -> None:
    port = free_port()
    config = tmp_path / "recgw.toml"

    def write(doomed: bool) -> None:
        text = config_toml(
            port,
            tmp_path / "data",
            openbao,
            identities,
            tokens(doomed),
            top='reload_check_seconds = 0\nlog_format = "json"',
            with_secrets=False,
        )
        config.write_text(text)

    write(True)
    assert identities.writer.secret_id and identities.reader.secret_id
    env = {
        **os.environ,
        "RECGW_VAULT__WRITER__SECRET_ID": identities.writer.secret_id.reveal(),
        "RECGW_VAULT__READER__SECRET_ID": identities.reader.secret_id.reveal(),
    }
    served = ServedGateway(config, env, port, tmp_path / "serve.log")
    served.start()
    try:
        assert served.process is not None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = upload_pb2_grpc.UploadServiceStub(channel)
            write(False)
            # No file watch here: the token stays valid until SIGHUP.
            assert status_code(stub, DOOMED) == grpc.StatusCode.NOT_FOUND

            config.write_text("tokens = [this is not TOML")
            served.process.send_signal(signal.SIGHUP)
            wait_until(lambda: "not reloaded" in served.log.read_text(), 10, "the failed reload")
            assert status_code(stub, DOOMED) == grpc.StatusCode.NOT_FOUND

            write(False)
            served.process.send_signal(signal.SIGHUP)
            wait_until(
                lambda: status_code(stub, DOOMED) == grpc.StatusCode.UNAUTHENTICATED,
                10,
                "the token to be revoked",
            )
            assert status_code(stub, UPLOADER) == grpc.StatusCode.NOT_FOUND
    finally:
        served.stop()
    text = served.log.read_text()
    assert_no_secrets(text)
    records = [
        json.loads(line)
        for line in text.splitlines()
        if line.strip() and not _GRPC_CORE_LINE.match(line)
    ]  # every line the gateway wrote is one JSON object
    assert any("configuration reloaded" in r["message"] for r in records if "message" in r)
