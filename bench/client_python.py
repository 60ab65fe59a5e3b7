"""Upload throughput of the Python client (recgw_client) through a gateway, as a process of its
own like the other clients' bench commands: `python -m bench.client_python [MiB]
[--warmup-mib=N]` (an untimed upload of N MiB first, as the other clients' commands allow).

Reads the gateway, token and tenant from RECGW_E2E_ADDRESS, RECGW_E2E_UPLOADER_TOKEN and
RECGW_E2E_TENANT (plaintext, loopback). A live source of 1 MiB chunks, checksums on (the
client's defaults). Prints `client_python: uploading N MiB` when the upload begins, then
`client_python: N MiB in S s = R MiB/s, CPU C s`, C being this process's CPU time meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator

from recgw_client import upload

MiB = 1024 * 1024


async def live(total: int, block: bytes) -> AsyncIterator[bytes]:
    """`total` bytes in 1 MiB chunks, sliced once from `block` and repeated."""
    chunks = [block[at : at + MiB] for at in range(0, len(block), MiB)]
    sent = index = 0
    while sent < total:
        chunk = chunks[index % len(chunks)]
        if total - sent < len(chunk):
            chunk = chunk[: total - sent]
        yield chunk
        sent += len(chunk)
        index += 1


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


async def main(mib: int, warmup_mib: int) -> None:
    address = os.environ["RECGW_E2E_ADDRESS"]
    token = os.environ["RECGW_E2E_UPLOADER_TOKEN"]
    tenant = os.environ["RECGW_E2E_TENANT"]
    total = mib * MiB
    block = os.urandom(8 * MiB)
    if warmup_mib:
        warm = warmup_mib * MiB
        await upload(
            address, token, live(warm, block), tenant, f"bench/python-warmup-{uuid.uuid4()}"
        )
    print(f"client_python: uploading {mib} MiB", flush=True)
    cpu_before = cpu_seconds()
    began = time.perf_counter()
    result = await upload(
        address, token, live(total, block), tenant, f"bench/python-{uuid.uuid4()}.bin"
    )
    seconds = time.perf_counter() - began
    cpu = cpu_seconds() - cpu_before
    if result.size != total:
        raise SystemExit(f"stored {result.size} bytes, sent {total}")
    print(
        f"client_python: {mib} MiB in {seconds:.3f} s = {mib / seconds:.1f} MiB/s, "
        f"CPU {cpu:.3f} s (checksums on)",
        flush=True,
    )


if __name__ == "__main__":
    numbers = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    warmups = [arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("--warmup-mib=")]
    asyncio.run(main(int(numbers[0]) if numbers else 64, int(warmups[-1]) if warmups else 0))
