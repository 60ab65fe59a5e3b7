"""The processes the bench measures: the S3 store (MinIO or moto), tusd, the gateways and the
raw gRPC sink, and the discarding ObjectStore the null-store gateway runs with."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import requests
from recgw.v1 import upload_pb2

from bench.common import BUCKET, MESSAGE_OVERHEAD, Child, MiB, spawn

REPO = Path(__file__).resolve().parent.parent


# -- the S3 store ----------------------------------------------------------------------------


@dataclass
class Store:
    """The S3 the gateway, boto3, aws-crt and tusd write to, and its admin-side helpers."""

    kind: str  # "minio" or "moto"
    service: Any  # recgw_server.dev.minio.MinioS3 or recgw_server.dev.stack.MotoS3
    tenant_keys: Any  # AwsKeys of a user holding the setup guide's PutObject-only policy

    @property
    def endpoint_url(self) -> str:
        return str(self.service.endpoint_url)

    @property
    def region(self) -> str:
        return str(self.service.region)

    @property
    def pid(self) -> int:
        return int(self.service.managed.process.pid)

    def admin_client(self) -> Any:
        return self.service.client("s3")

    def delete(self, key: str) -> None:
        self.admin_client().delete_object(Bucket=BUCKET, Key=key)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix` (tusd's objects and .info files); returns how many."""
        client = self.admin_client()
        count = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})
                count += len(keys)
        return count

    def settle(self) -> None:
        """Between measurements: MinIO's trash (deleted data, on tmpfs) is emptied."""
        if self.kind == "minio":
            self.service.empty_trash()

    def stop(self) -> None:
        self.service.stop()


def start_store(kind: str, workdir: Path) -> Store:
    from recgw_server.dev.stack import seed_policy, start_moto

    service: Any
    if kind == "minio":
        from recgw_server.dev.minio import start_minio

        service = start_minio(workdir)
    else:
        service = start_moto(workdir)
    try:
        service.create_bucket(BUCKET)
        keys = service.create_user("recgw-bench-writer", seed_policy(BUCKET))
    except BaseException:
        service.stop()
        raise
    return Store(kind, service, keys)


# -- tusd ------------------------------------------------------------------------------------

TUS_VERSION = "1.0.0"
TUSD_PREFIX = "tusd/"


@dataclass
class Tusd:
    """tusd v2 with its s3store against the bench's S3 (root keys, in the environment)."""

    name: str
    child: Child
    port: int
    flags: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/files/"

    def ready(self) -> bool:
        if not self.child.alive():
            raise RuntimeError(f"{self.name} exited; see {self.child.log_path}")
        response = requests.options(self.url, timeout=1)
        return response.headers.get("Tus-Version", "").startswith(TUS_VERSION)


def start_tusd(
    name: str, store: Store, port: int, tuned: bool, spool_dir: Path, log_dir: Path
) -> Tusd:
    """tusd as shipped (50 MiB parts, MD5 and SHA-256 of every part) or tuned like the gateway
    (8 MiB parts, content hashes off). Its part spool files go to `spool_dir` (tmpfs)."""
    from recgw_server.dev.minio import tool_binary
    from recgw_server.dev.stack import wait_until

    flags = ["-s3-part-size", str(8 * MiB), "-s3-disable-content-hashes"] if tuned else []
    spool_dir.mkdir(mode=0o700, exist_ok=True)
    admin = store.service.admin
    child = spawn(
        name,
        [
            tool_binary("tusd"),
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-s3-bucket",
            BUCKET,
            "-s3-endpoint",
            store.endpoint_url,
            "-s3-object-prefix",
            TUSD_PREFIX,
            "-disable-download",
            "-expose-metrics=false",
            "-verbose=false",
            "-show-startup-logs=false",
            *flags,
        ],
        {
            "AWS_ACCESS_KEY_ID": admin.access_key_id,
            "AWS_SECRET_ACCESS_KEY": admin.secret_access_key.reveal(),
            "AWS_REGION": store.region,
            "TMPDIR": str(spool_dir),
        },
        log_dir,
    )
    tusd = Tusd(name, child, port, flags)
    try:
        wait_until(tusd.ready, 30, name)
    except BaseException:
        child.stop()
        raise
    return tusd


# -- the gateways ----------------------------------------------------------------------------


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


@dataclass(frozen=True)
class GatewayConfig:
    part_size: int
    inflight: int
    memory_budget_mib: int
    vault_address: str
    writer_role_id: str
    reader_role_id: str
    token_hashes: dict[str, str]  # role -> SHA-256 of the bearer token


def gateway_toml(config: GatewayConfig, port: int, data_dir: Path) -> str:
    """The gateway's TOML: no secrets (those go in RECGW_* variables), only token hashes; its
    session store (SQLite) in `data_dir`, inside the bench's temp dir."""
    tokens = "".join(
        f"""
[[tokens]]
name = "bench-{role}"
role = "{role}"
sha256 = {toml_string(digest)}
tenants = ["*"]
"""
        for role, digest in config.token_hashes.items()
    )
    return f"""\
listen = {toml_string(f"127.0.0.1:{port}")}
plaintext = true
metrics_listen = ""
shutdown_grace_seconds = 2
log_level = "WARNING"
data_dir = {toml_string(str(data_dir))}

[vault]
address = {toml_string(config.vault_address)}

[vault.writer]
method = "approle"
role_id = {toml_string(config.writer_role_id)}

[vault.reader]
method = "approle"
role_id = {toml_string(config.reader_role_id)}

[uploads]
part_size_mib = {config.part_size // MiB}
max_inflight_parts = {config.inflight}
memory_budget_mib = {config.memory_budget_mib}
{tokens}"""


@dataclass
class GatewayProcess:
    name: str
    child: Child
    address: str

    @property
    def pid(self) -> int:
        return self.child.pid


def start_gateway(
    name: str,
    config: GatewayConfig,
    port: int,
    secret_ids: dict[str, str],
    workdir: Path,
    *,
    null_store: bool = False,
    env: dict[str, str] | None = None,
) -> GatewayProcess:
    """`recgw serve` in its own process, or with `null_store` the same gateway with a discarding
    store (`python -m bench --null-gateway CONFIG`). AppRole secret ids go by environment."""
    path = workdir / f"{name}.toml"
    text = gateway_toml(config, port, workdir / f"{name}-data")
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(text)
    if null_store:
        args = [sys.executable, "-m", "bench", "--null-gateway", str(path)]
    else:
        from bench.common import script

        args = [script("recgw"), "serve", "--config", str(path)]
    child = spawn(
        name,
        args,
        {
            "RECGW_VAULT__WRITER__SECRET_ID": secret_ids["writer"],
            "RECGW_VAULT__READER__SECRET_ID": secret_ids["reader"],
            **(env or {}),
        },
        workdir,
        cwd=REPO,
    )
    return GatewayProcess(name, child, f"127.0.0.1:{port}")


# -- the null store --------------------------------------------------------------------------


class NullWriter:
    """An ObjectWriter that accepts every write and keeps nothing: the gateway without S3."""

    def __init__(self) -> None:
        self.bytes_discarded = 0

    @property
    def bucket(self) -> str:
        return BUCKET

    def _drain(self, body: Any) -> int:
        """Read the body as the HTTP layer would (chunk by chunk, no copies) and drop it."""
        size = 0
        body.seek(0)
        while chunk := body.read():
            size += len(chunk)
        return size

    async def put_object(self, spec: Any, body: Any, crc32c: int) -> Any:
        from recgw_server.storage.base import WrittenObject

        self.bytes_discarded += self._drain(body)
        return WrittenObject(f'"null-{uuid.uuid4().hex}"', "")

    async def create_multipart_upload(self, spec: Any) -> str:
        return uuid.uuid4().hex

    async def upload_part(
        self, key: str, store_upload_id: str, part_number: int, body: Any, crc32c: int
    ) -> Any:
        from recgw_server.storage.base import WrittenPart

        size = self._drain(body)
        self.bytes_discarded += size
        return WrittenPart(part_number, f'"{uuid.uuid4().hex}"', size, crc32c)

    async def complete_multipart_upload(
        self, spec: Any, store_upload_id: str, parts: Sequence[Any], object_crc32c: int
    ) -> Any:
        from recgw_server.storage.base import WrittenObject

        return WrittenObject(f'"null-{store_upload_id}-{len(parts)}"', "")

    async def abort_multipart_upload(self, key: str, store_upload_id: str) -> Any:
        from recgw_server.storage.base import AbortOutcome

        return AbortOutcome.ABORTED

    async def head_object(self, key: str) -> Any:
        return None


class NullStore:
    """An ObjectStore whose writers discard: what the gateway costs without any S3 client."""

    def __init__(self) -> None:
        self._writer = NullWriter()

    async def writer_for(self, credentials: Any) -> NullWriter:
        return self._writer

    def forget(self, tenant_id: str) -> None:
        pass

    def forget_all(self) -> None:
        pass

    def close(self) -> None:
        pass


async def run_null_gateway(config_file: Path) -> None:
    """The real gateway (Vault, sessions, pipeline, gRPC) with NullStore injected through
    recgw_server.app.Adapters; runs until SIGTERM."""
    from recgw_server.app import Gateway, build_adapters
    from recgw_server.config import load_settings

    settings = load_settings(config_file)
    adapters = build_adapters(settings)
    adapters.store.close()  # the S3 store it built is never used
    gateway = Gateway(settings, replace(adapters, store=NullStore()))
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.stop(1)


# -- the raw gRPC sink -----------------------------------------------------------------------


async def discard(
    request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
) -> upload_pb2.UploadResponse:
    """Reads a whole Upload stream and throws the bytes away."""
    size = 0
    async for message in request_iterator:
        size += len(message.data)
    return upload_pb2.UploadResponse(size=size)


async def run_sink(port: int) -> None:
    """A trivial grpc.aio server with the gateway's Upload method: the transport's ceiling."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 4 * MiB + MESSAGE_OVERHEAD),
            ("grpc.so_reuseport", 0),
        ]
    )
    handler = grpc.stream_unary_rpc_method_handler(
        discard,
        request_deserializer=upload_pb2.UploadRequest.FromString,
        response_serializer=upload_pb2.UploadResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("recgw.v1.UploadService", {"Upload": handler}),)
    )
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise RuntimeError(f"sink cannot listen on port {port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def start_sink(port: int, workdir: Path) -> Child:
    return spawn(
        "sink", [sys.executable, "-m", "bench", "--sink-port", str(port)], {}, workdir, REPO
    )
