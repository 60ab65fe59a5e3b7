"""A gateway process killed with SIGKILL mid-upload comes back with its sessions."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from recgw.v1 import credentials_pb2_grpc, upload_pb2, upload_pb2_grpc

from recgw_server.dev.stack import MotoS3, wait_until
from tests.harness import (
    UPLOADER,
    MiB,
    ServedGateway,
    Tenant,
    read_object,
    resume_messages,
    set_credentials,
    upload_messages,
)

RECGW = str(Path(sys.executable).parent / "recgw")


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
