"""A gateway process killed with SIGKILL mid-upload comes back with its sessions."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recgw.v1 import credentials_pb2_grpc, upload_pb2, upload_pb2_grpc

from recgw_server.auth import hash_token
from recgw_server.devstack import MotoS3, OpenBao, VaultIdentities, free_port, wait_until
from tests.harness import (
    ADMIN_TOKEN,
    UPLOADER,
    UPLOADER_TOKEN,
    MiB,
    Tenant,
    assert_no_secrets,
    read_object,
    resume_messages,
    set_credentials,
    upload_messages,
)

RECGW = str(Path(sys.executable).parent / "recgw")


@dataclass
class ServedGateway:
    """`recgw serve` as a separate process that can be killed and started again."""

    config: Path
    env: dict[str, str]
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [RECGW, "serve", "--config", str(self.config)],
                env=self.env,
                stdout=out,
                stderr=out,
            )
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                assert self.process is not None and self.process.poll() is None, self.log
                request = health_pb2.HealthCheckRequest(service="recgw.v1.UploadService")
                reply = health.Check(request, timeout=1)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            wait_until(serving, 30, "recgw serve")

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


@pytest.fixture
def served(
    tmp_path: Path, openbao: OpenBao, identities: VaultIdentities
) -> Iterator[ServedGateway]:
    port = free_port()
    config = tmp_path / "recgw.toml"
    config.write_text(
        f"""
listen = "127.0.0.1:{port}"
data_dir = "{tmp_path / "data"}"
shutdown_grace_seconds = 2

[[tokens]]
name = "uploader"
role = "uploader"
sha256 = "{hash_token(UPLOADER_TOKEN)}"

[[tokens]]
name = "admin"
role = "admin"
sha256 = "{hash_token(ADMIN_TOKEN)}"

[vault]
address = "{openbao.address}"

[vault.writer]
method = "approle"
role_id = "{identities.writer.role_id}"

[vault.reader]
method = "approle"
role_id = "{identities.reader.role_id}"

[uploads]
part_size_mib = 5
"""
    )
    assert identities.writer.secret_id and identities.reader.secret_id
    env = {
        **os.environ,
        "RECGW_VAULT__WRITER__SECRET_ID": identities.writer.secret_id.reveal(),
        "RECGW_VAULT__READER__SECRET_ID": identities.reader.secret_id.reveal(),
    }
    gateway = ServedGateway(config, env, port, tmp_path / "serve.log")
    gateway.start()
    yield gateway
    gateway.stop()
    assert_no_secrets(gateway.log.read_text())


class _Channel:
    """Just enough of GatewayThread for the harness helpers: stubs on one channel."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.uploads = upload_pb2_grpc.UploadServiceStub(self.channel)
        self.credentials = credentials_pb2_grpc.CredentialsServiceStub(self.channel)


def committed(stub: upload_pb2_grpc.UploadServiceStub, upload_id: str) -> int:
    request = upload_pb2.GetUploadStatusRequest(upload_id=upload_id)
    return int(stub.GetUploadStatus(request, metadata=UPLOADER, timeout=5).committed_size)


def test_sigkill_mid_upload_then_resume_byte_exact(
    served: ServedGateway, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    client = _Channel(served.port)
    tenant = new_tenant()
    set_credentials(client, tenant, endpoint_url=moto.endpoint_url)
    data = os.urandom(17 * MiB)
    upload_id = str(uuid.uuid4())
    hold = threading.Event()

    def first_stream() -> Iterator[upload_pb2.UploadRequest]:
        messages = upload_messages(tenant.tenant_id, "killed.webm", data, upload_id=upload_id)
        for message in messages:
            if message.write_offset == 12 * MiB:
                hold.wait(60)  # the gateway is killed while this stream is open
                return
            yield message

    call = client.uploads.Upload.future(first_stream(), metadata=UPLOADER, timeout=60)
    wait_until(lambda: committed(client.uploads, upload_id) >= 10 * MiB, 30, "two parts")
    served.kill()
    hold.set()
    with pytest.raises(grpc.RpcError):
        call.result()
    client.channel.close()

    served.start()
    restarted = _Channel(served.port)
    status = restarted.uploads.GetUploadStatus(
        upload_pb2.GetUploadStatusRequest(upload_id=upload_id), metadata=UPLOADER, timeout=5
    )
    assert status.state == upload_pb2.UPLOAD_STATE_OPEN
    assert status.committed_size == 10 * MiB
    assert status.key == "uploads/killed.webm"
    response = restarted.uploads.Upload(
        resume_messages(tenant, "killed.webm", data, upload_id, status.committed_size),
        metadata=UPLOADER,
        timeout=60,
    )
    assert response.size == len(data)
    assert read_object(moto, tenant.bucket, "uploads/killed.webm") == data
    assert response.checksums.sha256 == hashlib.sha256(data).digest()
    # after another restart the finished upload still reports its object
    restarted.channel.close()
    served.kill()
    served.start()
    final = _Channel(served.port)
    done = final.uploads.GetUploadStatus(
        upload_pb2.GetUploadStatusRequest(upload_id=upload_id), metadata=UPLOADER, timeout=5
    )
    assert done.state == upload_pb2.UPLOAD_STATE_COMPLETE
    assert done.result == response
    final.channel.close()
