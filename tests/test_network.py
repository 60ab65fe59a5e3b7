"""A dropped TCP connection mid-upload, through a loopback proxy the test controls."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest
from recgw.v1 import upload_pb2, upload_pb2_grpc

from recgw_server.dev.stack import MotoS3
from tests.harness import (
    UPLOADER,
    GatewayThread,
    MiB,
    Tenant,
    read_object,
    resume_messages,
    upload_messages,
)
from tests.proxy import CuttableProxy
from tests.test_lifecycle import status, wait_for_status


def test_dropped_connection_then_resume(
    gateway: GatewayThread,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    proxy: CuttableProxy,
) -> None:
    tenant = new_tenant(gateway=gateway)
    data = os.urandom(14 * MiB)
    upload_id = str(uuid.uuid4())
    hold = threading.Event()

    def stream() -> Iterator[upload_pb2.UploadRequest]:
        for message in upload_messages(tenant.tenant_id, "dropped.bin", data, upload_id=upload_id):
            if message.write_offset == 7 * MiB:
                hold.wait(60)
            yield message

    with grpc.insecure_channel(proxy.address) as channel:
        stub = upload_pb2_grpc.UploadServiceStub(channel)
        call = stub.Upload.future(stream(), metadata=UPLOADER, timeout=60)
        wait_for_status(gateway, upload_id, lambda s: s.received_size == 7 * MiB, "7 MiB")
        proxy.cut()
        with pytest.raises(grpc.RpcError) as caught:
            call.result()
        hold.set()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # The gateway notices the dead connection by itself and detaches the stream.
    after = wait_for_status(
        gateway, upload_id, lambda s: s.received_size == s.committed_size, "the detach"
    )
    assert after.state == upload_pb2.UPLOAD_STATE_OPEN
    assert after.committed_size == 5 * MiB
    with grpc.insecure_channel(proxy.address) as channel:
        stub = upload_pb2_grpc.UploadServiceStub(channel)
        response = stub.Upload(
            resume_messages(tenant, "dropped.bin", data, upload_id, after.committed_size),
            metadata=UPLOADER,
            timeout=60,
        )
    assert read_object(moto, tenant.bucket, response.key) == data
    assert status(gateway, upload_id).state == upload_pb2.UPLOAD_STATE_COMPLETE
