"""A real gateway in a background thread: real gRPC over loopback, real OpenBao and moto."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Coroutine, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recgw.v1 import credentials_pb2, credentials_pb2_grpc, upload_pb2, upload_pb2_grpc

from recgw_server.app import Adapters, Gateway
from recgw_server.auth.tokens import hash_token
from recgw_server.config import Settings
from recgw_server.dev.stack import (
    AwsKeys,
    MotoS3,
    OpenBao,
    VaultIdentities,
    free_port,
    wait_until,
)

T = TypeVar("T")
MiB = 1024 * 1024
UPLOADER_TOKEN = "uploader-CANARY-TOKEN-" + uuid.uuid4().hex
ADMIN_TOKEN = "admin-CANARY-TOKEN-" + uuid.uuid4().hex
# Every secret value a test hands to the system; none may ever show up in logs or responses.
CANARIES: set[str] = {UPLOADER_TOKEN, ADMIN_TOKEN}
# The audit trails the test gateways write; the session's end scans them for secrets.
AUDIT_FILES: list[Path] = []
# OpenBao/Vault token formats: service tokens (s./hvs.), batch tokens (b./hvb.).
VAULT_TOKEN_PATTERN = re.compile(r"\b(hv[sb]|[sb])\.[A-Za-z0-9_-]{20,}")


def register_canary(value: str) -> str:
    CANARIES.add(value)
    return value


def assert_no_secrets(text: str) -> None:
    for canary in CANARIES:
        assert canary not in text, "a secret value leaked"
    match = VAULT_TOKEN_PATTERN.search(text)
    assert match is None, "something that looks like a Vault token leaked"


class CapturedLogs(logging.Handler):
    """Keeps every formatted log record (with exception text) for secret scans."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)


def auth_secret_to_setting(identity: Any) -> dict[str, Any]:
    setting: dict[str, Any] = {"method": identity.method, "mount_point": identity.mount_point}
    if identity.method == "token":
        setting["token"] = identity.token.reveal()
    else:
        setting["role_id"] = identity.role_id
        setting["secret_id"] = identity.secret_id.reveal()
    return setting


def make_settings(
    bao: OpenBao,
    identities: VaultIdentities,
    vault_address: str = "",
    data_dir: Path | None = None,
    **overrides: Any,
) -> Settings:
    """Gateway settings for tests: port 0, the test tokens, small defaults."""
    uploads = {
        "part_size_mib": 5,
        "max_inflight_parts": 2,
        "memory_budget_mib": 128,
        "completion_backoff_seconds": 0.05,
    }
    uploads.update(overrides.pop("uploads", {}))
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="recgw-test-"))
    audit_file = data_dir / "audit.jsonl"
    AUDIT_FILES.append(audit_file)
    values: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",  # see free_port: never reused
        "plaintext": "tls" not in overrides,
        "data_dir": data_dir,
        "shutdown_grace_seconds": 1.0,
        "audit": {"sink": str(audit_file)},
        "tokens": [
            {
                "name": "test-uploader",
                "role": "uploader",
                "sha256": hash_token(UPLOADER_TOKEN),
                "tenants": ["*"],
            },
            {
                "name": "test-admin",
                "role": "admin",
                "sha256": hash_token(ADMIN_TOKEN),
                "tenants": ["*"],
            },
        ],
        "vault": {
            "address": vault_address or bao.address,
            "cache_ttl_seconds": 30.0,
            "writer": auth_secret_to_setting(identities.writer),
            "reader": auth_secret_to_setting(identities.reader),
        },
        "uploads": uploads,
        "s3": {"max_attempts": 2, "connect_timeout_seconds": 2, "read_timeout_seconds": 30},
    }
    values.update(overrides)
    return Settings(**values)


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port` now."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class GatewayThread:
    """Runs a Gateway on its own event loop in a daemon thread."""

    def __init__(
        self,
        settings: Settings,
        adapters: Adapters | None = None,
        *,
        channel_credentials: grpc.ChannelCredentials | None = None,
        config_file: Path | None = None,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.gateway = self.run(self._build(settings, adapters, config_file))
        self.port = self.run(self.gateway.start())
        self.address = f"127.0.0.1:{self.port}"
        options: list[tuple[str, Any]] = [("grpc.max_send_message_length", 64 * MiB)]
        if channel_credentials is None:
            self.channel = grpc.insecure_channel(self.address, options=options)
        else:  # TLS: the test certificates are issued for "localhost"
            options.append(("grpc.ssl_target_name_override", "localhost"))
            self.channel = grpc.secure_channel(self.address, channel_credentials, options=options)
        self.uploads = upload_pb2_grpc.UploadServiceStub(self.channel)
        self.credentials = credentials_pb2_grpc.CredentialsServiceStub(self.channel)

    @staticmethod
    async def _build(
        settings: Settings, adapters: Adapters | None, config_file: Path | None
    ) -> Gateway:
        return Gateway(settings, adapters, config_file)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def call_soon(self, fn: Any) -> None:
        self.loop.call_soon_threadsafe(fn)

    def stop(self, grace: float = 1.0) -> None:
        if not self._thread.is_alive():
            return
        self.channel.close()
        self.run(self.gateway.stop(grace=grace), timeout=grace + 60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def details(error: grpc.RpcError) -> str:
    """The status message of a failed call."""
    return str(error.details() or "")


def error_info(error: grpc.RpcError) -> tuple[str, dict[str, str]]:
    """The ErrorInfo reason and metadata of a failed call ("" and {} when it has none)."""
    from google.rpc import error_details_pb2, status_pb2

    trailers: Any = error.trailing_metadata()
    for key, value in trailers or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    assert info.domain == "recgw.v1"
                    return info.reason, dict(info.metadata)
    return "", {}


UPLOADER = bearer(UPLOADER_TOKEN)
ADMIN = bearer(ADMIN_TOKEN)


@dataclass
class Tenant:
    tenant_id: str
    bucket: str
    keys: AwsKeys
    prefix: str = "uploads/"
    extra: dict[str, Any] = field(default_factory=dict)


class HasCredentialsStub(Protocol):
    credentials: credentials_pb2_grpc.CredentialsServiceStub


def set_credentials(
    gateway: HasCredentialsStub,
    tenant: Tenant,
    *,
    region: str = "us-east-1",
    endpoint_url: str,
    **target: Any,
) -> credentials_pb2.SetCredentialsResponse:
    register_canary(tenant.keys.secret_access_key.reveal())
    request = credentials_pb2.SetCredentialsRequest(
        tenant_id=tenant.tenant_id,
        access_key_id=tenant.keys.access_key_id,
        secret_access_key=tenant.keys.secret_access_key.reveal(),
        target=credentials_pb2.StorageTarget(
            region=region,
            bucket=tenant.bucket,
            prefix=tenant.prefix,
            endpoint_url=endpoint_url,
            force_path_style=True,
            **target,
        ),
    )
    response: credentials_pb2.SetCredentialsResponse = gateway.credentials.SetCredentials(
        request, metadata=ADMIN
    )
    return response


def upload_messages(
    tenant_id: str,
    object_name: str,
    data: bytes,
    *,
    chunk: int = 1 * MiB,
    expected_size: int | None = None,
    checksums: upload_pb2.ObjectChecksums | None = None,
    upload_id: str = "",
    finish: bool = True,
    content_type: str = "application/octet-stream",
    metadata: dict[str, str] | None = None,
    compute_sha256: bool = True,
) -> Iterator[upload_pb2.UploadRequest]:
    """The messages of a well-formed upload stream (asking for SHA-256 unless told not to)."""
    start = upload_pb2.UploadStart(
        tenant_id=tenant_id,
        object_name=object_name,
        content_type=content_type,
        metadata=metadata or {},
        upload_id=upload_id,
        compute_sha256=compute_sha256,
    )
    if expected_size is not None:
        start.expected_size = expected_size
    offset = 0
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        message = upload_pb2.UploadRequest(write_offset=offset, data=piece)
        if index == 0:
            message.start.CopyFrom(start)
        if last and finish:
            message.finish_write = True
            if checksums is not None:
                message.object_checksums.CopyFrom(checksums)
        offset += len(piece)
        yield message


def resume_messages(
    tenant: Tenant, object_name: str, data: bytes, upload_id: str, offset: int, **options: Any
) -> Iterator[upload_pb2.UploadRequest]:
    """A stream that resumes `upload_id` at `offset` and sends the rest of `data`."""
    messages = list(
        upload_messages(
            tenant.tenant_id, object_name, data[offset:], upload_id=upload_id, **options
        )
    )
    start = messages[0].start
    for message in messages:
        message.write_offset += offset
    messages[0].start.CopyFrom(start)
    return iter(messages)


def upload(
    gateway: GatewayThread, messages: Iterable[upload_pb2.UploadRequest], timeout: float = 120
) -> upload_pb2.UploadResponse:
    response: upload_pb2.UploadResponse = gateway.uploads.Upload(
        iter(messages), metadata=UPLOADER, timeout=timeout
    )
    return response


def expect_error(
    gateway: GatewayThread, messages: Iterable[upload_pb2.UploadRequest]
) -> grpc.RpcError:
    """The error an upload stream of these messages ends with (it must fail)."""
    with pytest.raises(grpc.RpcError) as caught:
        upload(gateway, messages)
    return caught.value


def object_exists(moto: MotoS3, bucket: str, key: str) -> bool:
    import botocore.exceptions

    try:
        moto.client("s3").head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def read_object(moto: MotoS3, bucket: str, key: str) -> bytes:
    body: bytes = moto.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


RECGW = str(Path(sys.executable).parent / "recgw")


class _Exited(Exception):
    """The process ended before it served."""


@dataclass
class ServedGateway:
    """`recgw serve` as a separate process that can be killed and started again."""

    config: Path
    env: dict[str, str]
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process; returns once it serves, or fails with the end of its log."""
        logged_before = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [RECGW, "serve", "--config", str(self.config)],
                env=self.env,
                stdout=out,
                stderr=out,
            )
        process = self.process
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                if process.poll() is not None:
                    raise _Exited()
                request = health_pb2.HealthCheckRequest(service="recgw.v1.UploadService")
                try:
                    reply = health.Check(request, timeout=1)
                except grpc.RpcError:
                    return False
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            try:
                wait_until(serving, 30, "recgw serve", stop_on=(_Exited,))
            except (TimeoutError, _Exited) as error:
                with self.log.open("rb") as log:
                    log.seek(logged_before)
                    tail = log.read().decode(errors="replace")[-3000:]
                state = f"exited with {process.returncode}" if process.poll() is not None else ""
                raise AssertionError(
                    f"recgw serve on port {self.port} did not serve {state}; its log:\n{tail}"
                ) from error

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def set_role_credentials(
    gateway: HasCredentialsStub,
    tenant_id: str,
    bucket: str,
    role_arn: str,
    *,
    endpoint_url: str,
    region: str = "us-east-1",
    prefix: str = "uploads/",
    rotate_external_id: bool = False,
    **target: Any,
) -> credentials_pb2.SetCredentialsResponse:
    """SetCredentials with a role instead of an access key pair."""
    request = credentials_pb2.SetCredentialsRequest(
        tenant_id=tenant_id,
        role=credentials_pb2.IamRole(role_arn=role_arn),
        rotate_external_id=rotate_external_id,
        target=credentials_pb2.StorageTarget(
            region=region,
            bucket=bucket,
            prefix=prefix,
            endpoint_url=endpoint_url,
            force_path_style=True,
            **target,
        ),
    )
    response: credentials_pb2.SetCredentialsResponse = gateway.credentials.SetCredentials(
        request, metadata=ADMIN
    )
    return response


def verify_credentials(
    gateway: HasCredentialsStub, tenant_id: str
) -> credentials_pb2.VerifyCredentialsResponse:
    response: credentials_pb2.VerifyCredentialsResponse = gateway.credentials.VerifyCredentials(
        credentials_pb2.VerifyCredentialsRequest(tenant_id=tenant_id), metadata=ADMIN
    )
    return response


def check_results(report: credentials_pb2.VerifyCredentialsResponse) -> dict[str, str]:
    """Each check's name and result, e.g. {"upload_part": "PASSED"}."""
    return {
        check.name: credentials_pb2.CredentialsCheckResult.Name(check.result).rsplit("_", 1)[-1]
        for check in report.checks
    }
