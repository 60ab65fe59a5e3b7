"""nginx (Debian's, `grpc_pass`) in front of two replicas over real PostgreSQL, with the shipped
example configuration `examples/nginx/recgw.conf`.

The test replaces only the example's replica addresses and listen port, and wraps it in a main
configuration of its own (pid file, error log, temp paths in a temp dir; nginx stays in the
foreground as a child of the test). The replicas run in this process, as in test_replicas.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from recgw.v1 import upload_pb2, upload_pb2_grpc

from recgw_client import RecgwError, UploadResult
from recgw_client import sync as client
from recgw_client.retry import RetryPolicy
from recgw_server.dev.stack import MotoS3, wait_until
from tests.harness import (
    UPLOADER,
    UPLOADER_TOKEN,
    GatewayThread,
    MiB,
    Tenant,
    read_object,
    upload_messages,
)
from tests.test_client_resume_e2e import GatedSource

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "nginx" / "recgw.conf"
REPLICA_ADDRESSES = ("10.0.0.11:50051", "10.0.0.12:50051")
LISTEN = "listen 50051 http2;"
BODY_SIZE = "client_max_body_size 0;"
LEASE_SECONDS = 3.0
FAST_RETRIES = RetryPolicy(initial_backoff=0.05, max_backoff=0.5, outage_tolerance=60)


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.skip("nginx is not installed (.ci/run installs Debian's nginx-light)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def replace_once(text: str, old: str, new: str) -> str:
    """Replace `old`, which the example must hold exactly once (so it cannot drift silently)."""
    assert text.count(old) == 1, f"examples/nginx/recgw.conf must contain {old!r} exactly once"
    return text.replace(old, new)


def example_config(
    port: int,
    upstreams: list[str],
    *,
    keep_body_size: bool = True,
    timeouts: dict[str, str] | None = None,
) -> str:
    """The shipped example with this test's addresses; optionally without the body size, or
    with some timeouts scaled down."""
    text = EXAMPLE.read_text()
    text = replace_once(text, LISTEN, f"listen 127.0.0.1:{port} http2;")
    for placeholder, address in zip(REPLICA_ADDRESSES, upstreams, strict=True):
        text = replace_once(text, f"server {placeholder} ", f"server {address} ")
    if not keep_body_size:
        text = replace_once(text, BODY_SIZE, "")
    for directive, value in (timeouts or {}).items():
        text, count = re.subn(rf"\n(\s+){directive}\s+\w+;", rf"\n\1{directive} {value};", text)
        assert count == 1, f"examples/nginx/recgw.conf must set {directive} once"
    return text


class Nginx:
    """A real nginx master process in the foreground, with everything in its own temp dir."""

    def __init__(self, site: str) -> None:
        binary = nginx_binary()
        self.port = int(re.search(r"listen 127\.0\.0\.1:(\d+)", site)[1])  # type: ignore[index]
        self.address = f"127.0.0.1:{self.port}"
        # mkdtemp is 0700; nginx's workers (nobody, when the test runs as root) need to reach
        # their temp dirs, which the master creates and hands to them.
        self.root = Path(tempfile.mkdtemp(prefix="recgw-nginx-"))
        self.root.chmod(0o755)
        (self.root / "recgw.conf").write_text(site)
        temp = "\n".join(
            f"    {kind}_temp_path {self.root}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (self.root / "nginx.conf").write_text(
            f"""daemon off;
worker_processes 1;
pid {self.root}/nginx.pid;
error_log {self.root}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {self.root}/access.log;
{temp}
    include {self.root}/recgw.conf;
}}
"""
        )
        conf = ["-p", str(self.root), "-c", str(self.root / "nginx.conf"), "-e", "stderr"]
        check = subprocess.run([binary, "-t", *conf], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.process = subprocess.Popen(
            [binary, *conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def listening() -> bool:
            assert self.process.poll() is None, self.errors()
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_until(listening, 20, "nginx")

    def errors(self) -> str:
        path = self.root / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: nginx's fast shutdown, the workers with it
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


class Replicas:
    def __init__(self, a: GatewayThread, b: GatewayThread) -> None:
        self.a, self.b = a, b

    def started(self, gateway: GatewayThread) -> float:
        value = gateway.gateway.metrics.registry.get_sample_value("recgw_uploads_started_total")
        return value or 0.0


@pytest.fixture
def replicas(make_replicas: Callable[..., tuple[str, list[GatewayThread]]]) -> Replicas:
    _, (a, b) = make_replicas(
        "replica-a", "replica-b", lease_seconds=LEASE_SECONDS, heartbeat_seconds=0.25
    )
    return Replicas(a, b)


@pytest.fixture
def start_nginx(replicas: Replicas) -> Iterator[Callable[..., Nginx]]:
    started: list[Nginx] = []

    def start(**options: Any) -> Nginx:
        site = example_config(free_port(), [replicas.a.address, replicas.b.address], **options)
        started.append(Nginx(site))
        return started[-1]

    yield start
    for nginx in started:
        nginx.stop()


def client_upload(
    nginx: Nginx, tenant: Tenant, name: str, source: object, **options: object
) -> UploadResult:
    return client.upload(
        nginx.address,
        UPLOADER_TOKEN,
        source,  # type: ignore[arg-type]
        tenant.tenant_id,
        name,
        retry_policy=FAST_RETRIES,
        **options,  # type: ignore[arg-type]
    )


def test_multipart_upload_with_4_mib_messages_through_nginx_is_byte_exact(
    replicas: Replicas,
    start_nginx: Callable[..., Nginx],
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
) -> None:
    nginx = start_nginx()
    tenant = new_tenant(gateway=replicas.a)
    data = os.urandom(14 * MiB)  # three parts of 5 MiB, in 4 MiB messages
    retries: list[object] = []
    result = client_upload(
        nginx,
        tenant,
        "big.bin",
        data,
        chunk_size=4 * MiB,
        on_retry=lambda *args: retries.append(args),
    )
    assert retries == []  # no 413 or anything else on the way
    assert (result.size, result.part_count) == (len(data), 3)
    assert result.checksums.sha256 == hashlib.sha256(data).digest()
    assert read_object(moto, tenant.bucket, result.key) == data


def test_uploads_spread_over_both_replicas(
    replicas: Replicas,
    start_nginx: Callable[..., Nginx],
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
) -> None:
    nginx = start_nginx()
    tenant = new_tenant(gateway=replicas.a)
    payloads = {f"spread-{i}.bin": os.urandom(256 * 1024 + i) for i in range(6)}
    for name, data in payloads.items():
        result = client_upload(nginx, tenant, name, data)
        assert read_object(moto, tenant.bucket, result.key) == data
    a, b = replicas.started(replicas.a), replicas.started(replicas.b)
    assert a + b == len(payloads)
    assert a >= 2 and b >= 2, f"nginx sent {a:g} uploads to A and {b:g} to B"


def test_upload_cut_by_a_stopped_replica_resumes_through_nginx_on_the_other(
    replicas: Replicas,
    start_nginx: Callable[..., Nginx],
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
) -> None:
    nginx = start_nginx()
    tenant = new_tenant(gateway=replicas.a)
    data = os.urandom(17 * MiB)
    source = GatedSource(data, [12 * MiB])
    upload_id = str(uuid.uuid4())
    retries: list[tuple[int, object, int]] = []
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            client_upload,
            nginx,
            tenant,
            "stopped.bin",
            source,
            upload_id=upload_id,
            on_retry=lambda attempt, error, size: retries.append((attempt, error, size)),
        )
        assert source.reached[12 * MiB].wait(60)

        def writer() -> GatewayThread | None:
            for replica in (replicas.a, replicas.b):
                committed = replica.gateway.metrics.registry.get_sample_value(
                    "recgw_bytes_committed_total"
                )
                if committed and committed >= 10 * MiB:
                    return replica
            return None

        wait_until(writer, 60, "two parts committed on one replica")
        stopped = writer()
        assert stopped is not None
        other = replicas.b if stopped is replicas.a else replicas.a
        stopped.stop()  # its stream ends; nginx now finds only the other replica
        source.gates[12 * MiB].set()
        result = future.result(timeout=120)
    assert read_object(moto, tenant.bucket, result.key) == data
    assert result.checksums.sha256 == hashlib.sha256(data).digest()
    assert retries, "the client must have resumed"
    assert retries[-1][2] == 10 * MiB  # it resumed from the committed size
    assert other.gateway.metrics.registry.get_sample_value("recgw_uploads_resumed_total") == 1


def test_without_client_max_body_size_0_large_uploads_fail_with_413(
    replicas: Replicas, start_nginx: Callable[..., Nginx], new_tenant: Callable[..., Tenant]
) -> None:
    """The failure the example's comment warns of: nginx's default 1m limit counts the whole
    stream, so an upload of more than 1 MiB fails, even in small messages."""
    nginx = start_nginx(keep_body_size=False)
    tenant = new_tenant(gateway=replicas.a)
    data = os.urandom(6 * MiB)
    with grpc.insecure_channel(nginx.address) as channel:
        stub = upload_pb2_grpc.UploadServiceStub(channel)
        small = stub.Upload(
            upload_messages(tenant.tenant_id, "small.bin", os.urandom(512 * 1024)),
            metadata=UPLOADER,
            timeout=60,
        )
        assert small.size == 512 * 1024  # nginx itself works
        with pytest.raises(grpc.RpcError) as failed:
            stub.Upload(
                upload_messages(tenant.tenant_id, "large.bin", data, chunk=4 * MiB),
                metadata=UPLOADER,
                timeout=60,
            )
    # gRPC maps an HTTP 413 to UNKNOWN; the retrying clients would retry it in vain
    assert failed.value.code() == grpc.StatusCode.UNKNOWN
    assert "status: 413" in str(failed.value.details())
    # ... counting the whole stream, not one message
    assert "client intended to send too large chunked body" in nginx.errors()


def beating_upload(
    nginx: Nginx, tenant: Tenant, name: str, pause: float
) -> tuple[bytes, UploadResult | grpc.RpcError, list[object]]:
    """A live source that pauses for `pause` seconds after 1 MiB; the client sends heartbeats
    every 0.25 s meanwhile. Returns the data, the result (or the first failure) and retries."""
    data = os.urandom(2 * MiB)
    source = GatedSource(data, [MiB])
    failures: list[object] = []
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            client_upload,
            nginx,
            tenant,
            name,
            source,
            heartbeat_interval=0.25,
            on_retry=lambda attempt, error, size: failures.append(error),
        )
        assert source.reached[MiB].wait(60)
        threading.Event().wait(pause)
        source.gates[MiB].set()
        return data, future.result(timeout=60), failures


def test_a_silence_longer_than_client_body_timeout_cuts_the_stream_unless_the_client_beats(
    replicas: Replicas,
    start_nginx: Callable[..., Nginx],
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
) -> None:
    """Why client_body_timeout must exceed the longest silence between messages: scaled down to
    1 s, a stream silent for 2.5 s is cut (INTERNAL), while the client's heartbeats carry a
    paused live source through the same pause."""
    nginx = start_nginx(timeouts={"client_body_timeout": "1s"})
    tenant = new_tenant(gateway=replicas.a)

    def silent() -> Iterator[upload_pb2.UploadRequest]:
        first, rest = upload_messages(tenant.tenant_id, "silent.bin", os.urandom(2 * MiB))
        yield first
        threading.Event().wait(2.5)
        yield rest

    with grpc.insecure_channel(nginx.address) as channel, pytest.raises(grpc.RpcError) as cut:
        upload_pb2_grpc.UploadServiceStub(channel).Upload(silent(), metadata=UPLOADER, timeout=60)
    assert cut.value.code() == grpc.StatusCode.INTERNAL
    assert "RST_STREAM" in str(cut.value.details())  # nginx reset it

    data, result, failures = beating_upload(nginx, tenant, "beating.bin", 2.5)
    assert failures == []
    assert isinstance(result, UploadResult)
    assert read_object(moto, tenant.bucket, result.key) == data


def test_heartbeats_do_not_reset_grpc_read_timeout(
    replicas: Replicas,
    start_nginx: Callable[..., Nginx],
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
) -> None:
    """Why grpc_read_timeout must exceed the longest pause of a recording, not only the longest
    silence between messages: it waits for the replica, which sends nothing while only
    heartbeats arrive (flow-control updates come only after enough data), so a pause longer
    than it cuts the stream. The client resumes, so nothing is lost, but every such pause costs
    a resume."""
    nginx = start_nginx(timeouts={"grpc_read_timeout": "1s"})
    tenant = new_tenant(gateway=replicas.a)
    data, result, failures = beating_upload(nginx, tenant, "paused.bin", 2.5)
    assert failures, "the stream should have been cut"
    assert all(isinstance(f, RecgwError) and f.code == grpc.StatusCode.INTERNAL for f in failures)
    assert isinstance(result, UploadResult)
    assert read_object(moto, tenant.bucket, result.key) == data
