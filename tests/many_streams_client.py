"""A client process for test_memory.py: opens many upload streams at once (its own process,
so that the gateway's RSS in the test process does not include the client's buffers).

    python -m tests.many_streams_client ADDRESS TENANT STREAMS MESSAGE_BYTES [NAME_PREFIX]

The bearer token comes in RECGW_TEST_TOKEN. Each stream sends a start message without data,
then one message of MESSAGE_BYTES (data of stream i: random.Random(i)) with finish_write.
Prints one JSON line: the responses' (size, crc32c, key) by stream index, or the errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys

import grpc
from recgw.v1 import upload_pb2, upload_pb2_grpc


def stream_data(index: int, size: int) -> bytes:
    return random.Random(index).randbytes(size)


async def main(address: str, tenant: str, streams: int, size: int, prefix: str) -> None:
    metadata = (("authorization", f"Bearer {os.environ['RECGW_TEST_TOKEN']}"),)
    options = [("grpc.max_send_message_length", 64 << 20)]

    async def one(index: int) -> dict[str, object]:
        # One channel per stream: one HTTP/2 connection each, as many separate callers have.
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            stub = upload_pb2_grpc.UploadServiceStub(channel)
            start = upload_pb2.UploadStart(tenant_id=tenant, object_name=f"{prefix}{index}.bin")
            call = stub.Upload(metadata=metadata, timeout=120)
            await call.write(upload_pb2.UploadRequest(start=start))
            data = stream_data(index, size)
            await call.write(upload_pb2.UploadRequest(write_offset=0, data=data, finish_write=True))
            await call.done_writing()
            response = await call
            return {"size": response.size, "crc32c": response.checksums.crc32c, "key": response.key}

    results = await asyncio.gather(*(one(i) for i in range(streams)), return_exceptions=True)
    print(json.dumps([r if isinstance(r, dict) else {"error": repr(r)} for r in results]))


if __name__ == "__main__":
    address, tenant, streams, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    asyncio.run(main(address, tenant, streams, size, sys.argv[5] if len(sys.argv) > 5 else "many/"))
