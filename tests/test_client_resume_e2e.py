"""The Python client and the CLI resume by themselves: cut connections, a killed gateway."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from recgw_client import UploadResult
from recgw_client import sync as client
from recgw_client.retry import RetryPolicy
from recgw_server.dev.stack import MotoS3, wait_until
from tests.harness import (
    RECGW,
    UPLOADER_TOKEN,
    GatewayThread,
    MiB,
    ServedGateway,
    Tenant,
    read_object,
    set_credentials,
)
from tests.proxy import CuttableProxy
from tests.test_lifecycle import status
from tests.test_restart import _Channel, committed

FAST_RETRIES = RetryPolicy(initial_backoff=0.05, max_backoff=0.5, outage_tolerance=60)


class GatedSource:
    """A live recording: yields `data` in 1 MiB chunks, pausing before each gate offset."""

    def __init__(self, data: bytes, gates: list[int]) -> None:
        self.data = data
        self.gates = {offset: threading.Event() for offset in gates}
        self.reached = {offset: threading.Event() for offset in gates}
        self.reads = 0

    def __iter__(self) -> Iterator[bytes]:
        for offset in range(0, len(self.data), MiB):
            if offset in self.gates:
                self.reached[offset].set()
                assert self.gates[offset].wait(60)
            self.reads += 1
            yield self.data[offset : offset + MiB]


def start_upload(
    pool: ThreadPoolExecutor, address: str, tenant: Tenant, name: str, source: Any, **kw: Any
) -> tuple[str, Future[UploadResult], list[tuple[int, Any, int]]]:
    upload_id = str(uuid.uuid4())
    retries: list[tuple[int, Any, int]] = []
    future = pool.submit(
        client.upload,
        address,
        UPLOADER_TOKEN,
        source,
        tenant.tenant_id,
        name,
        upload_id=upload_id,
        retry_policy=FAST_RETRIES,
        on_retry=lambda attempt, error, size: retries.append((attempt, error, size)),
        **kw,
    )
    return upload_id, future, retries


def test_client_resumes_after_three_cut_connections(
    gateway: GatewayThread,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    proxy: CuttableProxy,
) -> None:
    tenant = new_tenant(gateway=gateway)
    data = os.urandom(24 * MiB)
    gates = [7 * MiB, 13 * MiB, 19 * MiB]
    source = GatedSource(data, gates)
    with ThreadPoolExecutor(1) as pool:
        upload_id, future, retries = start_upload(pool, proxy.address, tenant, "cut.bin", source)
        for gate in gates:
            assert source.reached[gate].wait(60)
            wait_until(
                lambda gate=gate: status(gateway, upload_id).received_size == gate,
                30,
                f"{gate} bytes at the gateway",
            )
            proxy.cut()
            source.gates[gate].set()
        result = future.result(timeout=120)
    assert result.size == len(data)
    assert result.checksums.sha256 == hashlib.sha256(data).digest()
    assert read_object(moto, tenant.bucket, result.key) == data
    assert len(retries) >= 3
    assert source.reads == 24  # the live source was read exactly once
    assert proxy.connections >= 4


def test_client_resumes_across_a_killed_gateway(
    served: ServedGateway, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant()
    admin = _Channel(served.port)
    set_credentials(admin, tenant, endpoint_url=moto.endpoint_url)
    data = os.urandom(17 * MiB)
    source = GatedSource(data, [12 * MiB])
    with ThreadPoolExecutor(1) as pool:
        upload_id, future, retries = start_upload(
            pool, f"127.0.0.1:{served.port}", tenant, "killed.bin", source
        )
        assert source.reached[12 * MiB].wait(60)
        wait_until(lambda: committed(admin.uploads, upload_id) >= 10 * MiB, 30, "two parts")
        admin.channel.close()
        served.kill()
        served.start()
        source.gates[12 * MiB].set()
        result = future.result(timeout=120)
    assert read_object(moto, tenant.bucket, result.key) == data
    assert result.checksums.sha256 == hashlib.sha256(data).digest()
    assert retries, "the client must have resumed"


def test_cli_resumes_a_stdin_stream(
    gateway: GatewayThread,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    proxy: CuttableProxy,
) -> None:
    tenant = new_tenant(gateway=gateway)
    data = os.urandom(12 * MiB)
    upload_id = str(uuid.uuid4())
    env = {**os.environ, "RECGW_ADDRESS": proxy.address, "RECGW_TOKEN": UPLOADER_TOKEN}
    process = subprocess.Popen(
        [
            RECGW,
            "upload",
            "-",
            "--tenant",
            tenant.tenant_id,
            "--name",
            "cli.bin",
            "--upload-id",
            upload_id,
            "--json",
            "-q",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdin is not None
    process.stdin.write(data[: 7 * MiB])
    process.stdin.flush()
    wait_until(lambda: status(gateway, upload_id).received_size == 7 * MiB, 30, "7 MiB")
    proxy.cut()
    process.stdin.write(data[7 * MiB :])
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()
    assert "resuming at byte" in stderr.decode()
    assert read_object(moto, tenant.bucket, "uploads/cli.bin") == data
    assert UPLOADER_TOKEN not in (stdout + stderr).decode()
    shown = subprocess.run(
        [RECGW, "status", upload_id, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    session = json.loads(shown.stdout)
    assert session["state"] == "COMPLETE"
    assert session["committed_size"] == len(data)
