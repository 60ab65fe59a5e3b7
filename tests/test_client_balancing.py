"""The Python client balances over several replicas' addresses (round_robin): the target it
builds, and end to end over two in-process replicas sharing real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from recgw_client import UploadClient
from recgw_client import sync as client
from recgw_client._channel import is_loopback_target, open_channel, target_for
from recgw_client.retry import RetryPolicy
from recgw_server.dev.stack import MotoS3, wait_until
from tests import test_nginx
from tests.harness import UPLOADER_TOKEN, GatewayThread, MiB, Tenant, read_object
from tests.test_client_resume_e2e import GatedSource
from tests.test_nginx import Replicas

replicas = test_nginx.replicas  # the fixture: two replicas over one PostgreSQL database
FAST_RETRIES = RetryPolicy(initial_backoff=0.05, max_backoff=0.5, outage_tolerance=60)


@pytest.mark.parametrize(
    ("addresses", "target"),
    [
        ("gw:50051", "gw:50051"),
        (["gw:50051"], "gw:50051"),
        (["10.0.0.11:50051", "10.0.0.12:50051"], "ipv4:10.0.0.11:50051,10.0.0.12:50051"),
        ("10.0.0.11:50051, 10.0.0.12:50051", "ipv4:10.0.0.11:50051,10.0.0.12:50051"),
        (["[fd00::1]:50051", "[fd00::2]:50051"], "ipv6:[fd00::1]:50051,[fd00::2]:50051"),
        ("ipv4:10.0.0.11:1,10.0.0.12:2", "ipv4:10.0.0.11:1,10.0.0.12:2"),
    ],
)
def test_target_for_one_or_several_addresses(addresses: str | list[str], target: str) -> None:
    assert target_for(addresses) == target


@pytest.mark.parametrize(
    ("addresses", "message"),
    [
        (["gw-a:50051", "gw-b:50051"], "must each be IP:port ('gw-a:50051' is not)"),
        (["10.0.0.11", "10.0.0.12:50051"], "('10.0.0.11' is not)"),
        (["10.0.0.11:50051", "[fd00::2]:50051"], "all IPv4 or all IPv6"),
        (["10.0.0.11:50051", ""], "an empty gateway address"),
        ([], "an empty gateway address"),
    ],
)
def test_target_for_refuses_what_grpc_cannot_balance(addresses: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        target_for(addresses)


def test_several_addresses_are_plaintext_by_default_only_if_all_are_loopback() -> None:
    assert is_loopback_target("ipv4:127.0.0.1:1,127.0.0.2:2")
    assert not is_loopback_target("ipv4:127.0.0.1:1,10.0.0.12:2")
    assert is_loopback_target("ipv6:[::1]:1,[::1]:2")


def test_tls_to_several_addresses_needs_the_certificates_name() -> None:
    with pytest.raises(ValueError, match=r"tls=TlsConfig\(server_name=...\)"):
        open_channel(["10.0.0.11:50051", "10.0.0.12:50051"])


def test_uploads_spread_over_both_replicas(
    replicas: Replicas, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(gateway=replicas.a)

    async def uploads() -> None:
        async with UploadClient([replicas.a.address, replicas.b.address], UPLOADER_TOKEN) as up:

            async def one(name: str) -> None:
                data = os.urandom(100_000)
                result = await up.upload(data, tenant.tenant_id, name)
                assert read_object(moto, tenant.bucket, result.key) == data

            # round_robin uses the replicas it is connected to; the second may connect later
            for index in range(20):
                if replicas.started(replicas.a) and replicas.started(replicas.b):
                    break
                await one(f"warm-{index}")
            before = replicas.started(replicas.a), replicas.started(replicas.b)
            assert all(before), "the client never connected to both replicas"
            for index in range(6):
                await one(f"rr-{index}")
            a = replicas.started(replicas.a) - before[0]
            b = replicas.started(replicas.b) - before[1]
            assert a >= 2 and b >= 2, f"round_robin sent {a:g} uploads to A and {b:g} to B"

    asyncio.run(uploads())


def test_an_upload_whose_replica_stops_completes_through_the_other(
    replicas: Replicas, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(gateway=replicas.a)
    data = os.urandom(17 * MiB)
    source = GatedSource(data, [12 * MiB])
    retries: list[tuple[int, object, int]] = []
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            client.upload,
            f"{replicas.a.address},{replicas.b.address}",  # the form RECGW_ADDRESS takes
            UPLOADER_TOKEN,
            source,
            tenant.tenant_id,
            "failover.bin",
            upload_id=str(uuid.uuid4()),
            retry_policy=FAST_RETRIES,
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
        stopped.stop()
        source.gates[12 * MiB].set()
        result = future.result(timeout=120)
    assert read_object(moto, tenant.bucket, result.key) == data
    assert result.checksums.sha256 == hashlib.sha256(data).digest()
    assert retries and retries[-1][2] == 10 * MiB  # resumed from the committed size
    resumed = other.gateway.metrics.registry.get_sample_value("recgw_uploads_resumed_total")
    assert resumed == 1
