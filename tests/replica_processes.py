"""Gateway replicas as real `recgw serve` processes sharing PostgreSQL, OpenBao and moto.

Each replica has its own replica id, port, data dir and log file, and reaches moto through an
S3FaultProxy of its own (the process's `HTTP_PROXY`; tenants' endpoint is `localhost:<moto>`,
which `NO_PROXY=127.0.0.1` does not exempt, while OpenBao and PostgreSQL on 127.0.0.1 are reached
directly). So a test knows which replica sent which S3 request and when, and can hold or answer
one replica's requests. Processes can be killed (SIGKILL), frozen (SIGSTOP/SIGCONT), stopped
(SIGTERM) and started again on the same port. Secrets reach them only in the environment.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from recgw.v1 import credentials_pb2_grpc, upload_pb2, upload_pb2_grpc

from recgw_server.dev.stack import MotoS3, OpenBao, VaultIdentities, free_port, wait_until
from tests.harness import (
    ADMIN_TOKEN,
    UPLOADER,
    UPLOADER_TOKEN,
    MiB,
    ServedGateway,
    assert_no_secrets,
)
from tests.s3_fault_proxy import S3FaultProxy
from tests.served_config import serve_toml

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "grpc_proxy")


@dataclass(frozen=True)
class ReplicaTimes:
    """Times scaled down for tests (seconds)."""

    lease: float = 2.0
    heartbeat: float = 0.25
    takeover_after: float = 1.0
    idle_timeout: float = 24 * 3600.0
    expiry_check: float = 300.0
    shutdown_grace: float = 2.0


def replica_config(
    port: int,
    root: Path,
    replica_id: str,
    sessions_url: str,
    bao: OpenBao,
    identities: VaultIdentities,
    times: ReplicaTimes,
) -> str:
    """The TOML of one replica; no secret in it (the AppRole secret ids are in the environment,
    the test cluster trusts loopback connections)."""
    tokens = {"uploader": UPLOADER_TOKEN, "admin": ADMIN_TOKEN}
    return serve_toml(
        port,
        root,
        bao,
        identities,
        tokens=tokens,
        shutdown_grace=times.shutdown_grace,
        sections=f"""
[sessions]
url = "{sessions_url}"
replica_id = "{replica_id}"
lease_seconds = {times.lease}
heartbeat_seconds = {times.heartbeat}

[uploads]
part_size_mib = 5
max_inflight_parts = 2
memory_budget_mib = 128
completion_backoff_seconds = 0.05
takeover_after_seconds = {times.takeover_after}
idle_timeout_seconds = {times.idle_timeout}
expiry_check_seconds = {times.expiry_check}

[s3]
max_attempts = 2
connect_timeout_seconds = 2
read_timeout_seconds = 60
""",
    )


@dataclass
class ReplicaProcess:
    """One `recgw serve` process with its own S3 recording proxy and gRPC stubs."""

    replica_id: str
    root: Path
    served: ServedGateway
    s3: S3FaultProxy
    frozen: bool = False
    channel: grpc.Channel = field(init=False)

    def __post_init__(self) -> None:
        options = [("grpc.max_send_message_length", 64 * MiB)]
        self.channel = grpc.insecure_channel(self.address, options=options)
        self.uploads = upload_pb2_grpc.UploadServiceStub(self.channel)
        self.credentials = credentials_pb2_grpc.CredentialsServiceStub(self.channel)

    @property
    def port(self) -> int:
        return self.served.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.served.process is not None
        return self.served.process.pid

    def running(self) -> bool:
        return self.served.process is not None and self.served.process.poll() is None

    def start(self) -> None:
        """Start (again) on the same port, data dir and log; returns once it serves."""
        self.served.start()

    def kill(self) -> None:
        """SIGKILL: the process dies at once, mid-whatever."""
        self.served.kill()
        self.frozen = False

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> float:
        """SIGCONT; returns the moment (time.monotonic()) just before it."""
        moment = time.monotonic()
        os.kill(self.pid, signal.SIGCONT)
        self.frozen = False
        return moment

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait for the exit; returns the exit status."""
        process = self.served.process
        assert process is not None
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout)

    def log_text(self) -> str:
        return self.served.log.read_text(errors="replace")

    def status(self, upload_id: str) -> upload_pb2.GetUploadStatusResponse:
        response: upload_pb2.GetUploadStatusResponse = self.uploads.GetUploadStatus(
            upload_pb2.GetUploadStatusRequest(upload_id=upload_id), metadata=UPLOADER, timeout=10
        )
        return response

    def upload(
        self, messages: Iterable[upload_pb2.UploadRequest], timeout: float = 60
    ) -> upload_pb2.UploadResponse:
        response: upload_pb2.UploadResponse = self.uploads.Upload(
            iter(messages), metadata=UPLOADER, timeout=timeout
        )
        return response

    def close(self) -> None:
        """Stop the process (thawed first) and the proxy; the log must hold no secret."""
        self.channel.close()
        if self.running():
            if self.frozen:
                os.kill(self.pid, signal.SIGCONT)
            self.served.stop()
        self.s3.close()
        assert_no_secrets(self.log_text())
        audit = self.root / "audit.jsonl"
        if audit.exists():
            assert_no_secrets(audit.read_text())


class ReplicaSet:
    """N replicas over one fresh PostgreSQL database; started by `start`, stopped by `close`."""

    def __init__(
        self,
        root: Path,
        sessions_url: str,
        bao: OpenBao,
        identities: VaultIdentities,
        moto: MotoS3,
        times: ReplicaTimes,
    ) -> None:
        self.root = root
        self.sessions_url = sessions_url
        self.moto = moto
        self.times = times
        self._bao = bao
        self._identities = identities
        self.replicas: list[ReplicaProcess] = []

    @property
    def tenant_endpoint(self) -> str:
        """The S3 endpoint to store for tenants: moto by a name the per-replica proxies see."""
        port = moto_port(self.moto)
        return f"http://localhost:{port}"

    def start(self, count: int) -> list[ReplicaProcess]:
        first = len(self.replicas)
        made = [self._make(f"replica-{chr(ord('a') + first + i)}") for i in range(count)]
        with ThreadPoolExecutor(len(made)) as pool:  # side by side: each waits to be serving
            list(pool.map(ReplicaProcess.start, made))
        return made

    def _make(self, replica_id: str) -> ReplicaProcess:
        root = self.root / replica_id
        root.mkdir(parents=True)
        taken = {replica.port for replica in self.replicas}
        port = free_port()
        while port in taken:  # not bound until the process starts: the kernel may hand it out again
            port = free_port()
        proxy = S3FaultProxy(self.moto.endpoint_url)
        config = root / "recgw.toml"
        config.write_text(
            replica_config(
                port,
                root,
                replica_id,
                self.sessions_url,
                self._bao,
                self._identities,
                self.times,
            )
        )
        writer, reader = self._identities.writer.secret_id, self._identities.reader.secret_id
        assert writer is not None and reader is not None
        env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARIABLES}
        env.update(
            {
                "RECGW_VAULT__WRITER__SECRET_ID": writer.reveal(),
                "RECGW_VAULT__READER__SECRET_ID": reader.reveal(),
                "HTTP_PROXY": proxy.endpoint_url,
                "NO_PROXY": "127.0.0.1",
            }
        )
        served = ServedGateway(config, env, port, root / "serve.log")
        replica = ReplicaProcess(replica_id, root, served, proxy)
        self.replicas.append(replica)
        return replica

    def close(self) -> None:
        for replica in self.replicas:  # SIGTERM all first: they drain side by side
            if replica.running():
                if replica.frozen:
                    replica.thaw()
                assert replica.served.process is not None
                replica.served.process.send_signal(signal.SIGTERM)
        errors: list[BaseException] = []
        for replica in self.replicas:
            try:
                replica.close()
            except BaseException as error:  # close every one, then report
                errors.append(error)
        if errors:
            raise errors[0]


def moto_port(moto: MotoS3) -> int:
    from urllib.parse import urlsplit

    port = urlsplit(moto.endpoint_url).port
    assert port is not None
    return port


def new_upload_id() -> str:
    return str(uuid.uuid4())


def stream_with_pause(
    messages: Iterable[upload_pb2.UploadRequest], pause_before_offset: int, resume: Any
) -> Iterator[upload_pb2.UploadRequest]:
    """Yield `messages`, waiting for `resume` (a threading.Event) before the first message at
    or after `pause_before_offset`."""
    paused = False
    for message in messages:
        if not paused and message.write_offset >= pause_before_offset:
            paused = True
            resume.wait(120)
        yield message


def sessions_row(url: str, upload_id: str) -> dict[str, Any]:
    """The sessions row as PostgreSQL has it (state, holder, generation, committed_size...)."""
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        row = conn.execute("SELECT * FROM sessions WHERE upload_id = %s", (upload_id,)).fetchone()
    assert row is not None, f"no session {upload_id}"
    return dict(row)


def part_numbers(url: str, upload_id: str) -> list[tuple[int, str]]:
    """(number, etag) of the parts PostgreSQL holds for the upload."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT number, etag FROM parts WHERE upload_id = %s ORDER BY number", (upload_id,)
        ).fetchall()
    return [(int(r[0]), str(r[1])) for r in rows]


def wait_for(check: Any, what: str, timeout: float = 60) -> None:
    """wait_until with the generous default a loaded 2-core machine needs."""
    wait_until(check, timeout, what)


def poll_status(
    replica: ReplicaProcess, upload_id: str, check: Any, what: str, timeout: float = 60
) -> upload_pb2.GetUploadStatusResponse:
    """Poll GetUploadStatus on `replica` until `check(status)`; NOT_FOUND counts as not yet."""
    seen: list[upload_pb2.GetUploadStatusResponse] = []

    def ready() -> bool:
        try:
            current = replica.status(upload_id)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return False
        seen[:] = [current]
        return bool(check(current))

    wait_until(ready, timeout, what)
    return seen[0]
