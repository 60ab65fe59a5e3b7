"""Memory stays within the budget however many streams wait for it (real gRPC, moto)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from awscrt import checksums

from recgw_server.dev.stack import MotoS3, wait_until
from tests.harness import (
    UPLOADER_TOKEN,
    GatewayThread,
    Tenant,
    read_object,
    upload,
    upload_messages,
)
from tests.many_streams_client import stream_data

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_many_streams_waiting_for_memory_hold_no_message_outside_the_budget(
    make_gateway: Callable[..., GatewayThread], moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    """128 streams (one connection each, the client in its own process) each send a 1 MiB
    message to a gateway with an 8 MiB budget, so nearly all of them wait for memory at once.
    A stream that waits must hold neither the message it read nor a pending read (gRPC would
    assemble the message outside the budget), and a finishing stream must not keep its last
    message once the part has given its memory back (it did: 50-130 MiB of RSS above the
    budget, which looked like gRPC's per-connection buffers). Python's heap (tracemalloc) and
    RSS grow by about the budget. Every object arrives byte-exact."""
    streams, size, budget_mib = 128, 1 * MiB, 8
    gateway = make_gateway(uploads={"memory_budget_mib": budget_mib, "tenant_memory_share": 1.0})
    tenant = new_tenant(gateway=gateway)
    budget = gateway.gateway.manager.budget
    # Warm up (S3 client, threads) with a stream like the others, so idle RSS includes them.
    warm = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.many_streams_client",
            gateway.address,
            tenant.tenant_id,
            "4",
            str(size),
            "warm/",
        ],
        cwd=REPO,
        env={**os.environ, "RECGW_TEST_TOKEN": UPLOADER_TOKEN},
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert warm.returncode == 0, warm.stderr[-2000:]
    idle = rss_mib()
    peak = idle
    tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    most_waiting = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, most_waiting
        while not done.wait(0.01):
            peak = max(peak, rss_mib())
            most_waiting = max(most_waiting, budget.waiting)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        client = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.many_streams_client",
                gateway.address,
                tenant.tenant_id,
                str(streams),
                str(size),
            ],
            cwd=REPO,
            env={**os.environ, "RECGW_TEST_TOKEN": UPLOADER_TOKEN},
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
    finally:
        done.set()
        sampler.join()
        traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert client.returncode == 0, client.stderr[-2000:]
    results = json.loads(client.stdout)
    assert [r.get("error") for r in results if "error" in r] == []
    assert most_waiting >= streams // 16, "the scenario must make streams wait for memory"
    assert budget.high_water <= budget_mib * MiB
    python_growth = (traced_peak - traced_before) / MiB
    assert python_growth < budget_mib + 16, f"Python's heap grew by {python_growth:.0f} MiB"
    growth = peak - idle
    assert growth < budget_mib + 56, f"RSS grew by {growth:.0f} MiB with {most_waiting} waiting"
    for index, result in enumerate(results):
        data = stream_data(index, size)
        assert result["size"] == size and result["crc32c"] == checksums.crc32c(data)
        assert read_object(moto, tenant.bucket, str(result["key"])) == data


def test_rss_the_buffers_do_not_explain_lowers_what_they_may_hold_and_uploads_go_on(
    make_gateway: Callable[..., GatewayThread], moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    """200 MiB held elsewhere in the process (as gRPC's connection buffers would be) make the
    running gateway lower its 64 MiB budget's limit to its floor of 8 MiB; an upload still
    completes byte-exact; once the memory is freed (and trimmed) the limit comes back."""
    from recgw_server.pipeline.heap import HeapTrimmer

    # Freed heap that earlier tests left resident would take the ballast without growing RSS.
    HeapTrimmer(slack=0).trim()
    gateway = make_gateway(uploads={"memory_budget_mib": 64, "tenant_memory_share": 1.0})
    tenant = new_tenant(gateway=gateway)
    budget = gateway.gateway.manager.budget
    wait_until(lambda: budget.limit == 64 * MiB, 30, "the whole budget while nothing else grew")
    ballast = [os.urandom(1) * MiB for _ in range(200)]  # resident: every byte written
    wait_until(lambda: budget.limit == 8 * MiB, 30, "the limit at its floor")
    data = os.urandom(12 * MiB)
    budget.high_water = budget.in_use
    response = upload(gateway, upload_messages(tenant.tenant_id, "governed.bin", data))
    assert read_object(moto, tenant.bucket, response.key) == data
    assert budget.high_water <= 8 * MiB  # the part went to disk rather than past the limit
    del ballast
    wait_until(lambda: budget.limit == 64 * MiB, 30, "the whole budget again")
