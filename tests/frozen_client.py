"""A client process that opens an upload stream, sends a little, then freezes itself (SIGSTOP).

Its kernel keeps the TCP connection alive (ACKs, no FIN), but the process never answers an
HTTP/2 ping: what a hung media server looks like to the gateway.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator

import grpc
from recgw.v1 import upload_pb2, upload_pb2_grpc


def main() -> None:
    address, token, tenant, upload_id = sys.argv[1:5]
    stub = upload_pb2_grpc.UploadServiceStub(grpc.insecure_channel(address))

    def messages() -> Iterator[upload_pb2.UploadRequest]:
        start = upload_pb2.UploadStart(
            tenant_id=tenant, object_name="frozen.bin", upload_id=upload_id
        )
        yield upload_pb2.UploadRequest(start=start, data=b"x" * 1000)
        print("sent", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(600)

    stub.Upload(messages(), metadata=(("authorization", f"Bearer {token}"),), timeout=600)


if __name__ == "__main__":
    main()
