"""Session-wide real services: OpenBao dev server, moto_server with IAM on, PostgreSQL, a gateway.

RECGW_TEST_S3=minio (`make test-s3compat`) puts MinIO in moto's place: the `moto` fixture is
then a MinioS3 with the same methods. Tests that rely on how moto differs from S3 are marked
`moto_only`; tests of what only a stricter S3 enforces are marked `minio_only`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from recgw_server.dev.minio import MinioS3, start_minio
from recgw_server.dev.stack import (
    MotoS3,
    OpenBao,
    PostgresCluster,
    VaultIdentities,
    bootstrap_vault,
    free_port,
    seed_policy,
    start_moto,
    start_openbao,
    start_postgres,
    wait_until,
)
from tests.harness import (
    ADMIN_TOKEN,
    AUDIT_FILES,
    UPLOADER_TOKEN,
    CapturedLogs,
    GatewayThread,
    ServedGateway,
    Tenant,
    assert_no_secrets,
    make_settings,
    register_canary,
    set_credentials,
)
from tests.proxy import CuttableProxy
from tests.served_config import serve_env, serve_toml

SHARED_BUCKET = "recgw-test-bucket"
S3_BACKEND = os.environ.get("RECGW_TEST_S3", "moto")
if S3_BACKEND not in ("moto", "minio"):
    raise pytest.UsageError(f"RECGW_TEST_S3 must be moto or minio, not {S3_BACKEND!r}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip what does not apply to the S3 backend of this run."""
    for item in items:
        for marker, backend in (("moto_only", "moto"), ("minio_only", "minio")):
            found = item.get_closest_marker(marker)
            if found is not None and backend != S3_BACKEND:
                reason = found.kwargs.get("reason") or (found.args[0] if found.args else "")
                item.add_marker(pytest.mark.skip(reason=f"{marker}: {reason}"))


@pytest.fixture(scope="session")
def service_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def openbao(service_logs: Path) -> Iterator[OpenBao]:
    bao = start_openbao(service_logs)
    register_canary(bao.root_token.reveal())
    yield bao
    bao.stop()


@pytest.fixture(scope="session")
def moto(service_logs: Path) -> Iterator[MotoS3 | MinioS3]:
    """The tests' S3: moto_server with IAM on, or MinIO (RECGW_TEST_S3=minio)."""
    s3: MotoS3 | MinioS3 = (
        start_minio(service_logs) if S3_BACKEND == "minio" else start_moto(service_logs)
    )
    s3.create_bucket(SHARED_BUCKET)
    yield s3
    s3.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster; tests take databases of their own from it."""
    cluster = start_postgres()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def identities(openbao: OpenBao) -> VaultIdentities:
    identities = bootstrap_vault(openbao)
    for identity in (identities.writer, identities.reader):
        assert identity.secret_id is not None
        register_canary(identity.secret_id.reveal())
    return identities


@pytest.fixture(scope="session")
def captured_logs() -> Iterator[CapturedLogs]:
    import logging

    handler = CapturedLogs()
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    # INFO everywhere, as in production, and DEBUG for the gateway's own code.
    root.setLevel(logging.INFO)
    logging.getLogger("recgw_server").setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(previous)


@pytest.fixture(scope="session")
def gateway(
    openbao: OpenBao, identities: VaultIdentities, captured_logs: CapturedLogs
) -> Iterator[GatewayThread]:
    thread = GatewayThread(make_settings(openbao, identities))
    yield thread
    thread.stop()


@pytest.fixture
def make_gateway(
    openbao: OpenBao, identities: VaultIdentities, captured_logs: CapturedLogs
) -> Iterator[Callable[..., GatewayThread]]:
    """A factory for gateways with their own settings; all are stopped after the test."""
    started: list[GatewayThread] = []

    def make(
        channel_credentials: grpc.ChannelCredentials | None = None, **overrides: Any
    ) -> GatewayThread:
        settings = make_settings(openbao, identities, **overrides)
        thread = GatewayThread(settings, channel_credentials=channel_credentials)
        started.append(thread)
        return thread

    yield make
    for thread in started:
        thread.stop()


@pytest.fixture
def make_replicas(
    make_gateway: Callable[..., GatewayThread], postgres: PostgresCluster
) -> Callable[..., tuple[str, list[GatewayThread]]]:
    """A factory for gateway replicas in this process, one per name (its replica id), over one
    fresh PostgreSQL database; returns the database URL and the replicas."""

    def make(
        *names: str, lease_seconds: float, heartbeat_seconds: float
    ) -> tuple[str, list[GatewayThread]]:
        url = postgres.create_database()
        sessions = {"url": url, "lease_seconds": lease_seconds}
        sessions["heartbeat_seconds"] = heartbeat_seconds
        replicas = [make_gateway(sessions={**sessions, "replica_id": name}) for name in names]
        return url, replicas

    return make


@pytest.fixture
def new_tenant(moto: MotoS3) -> Callable[..., Tenant]:
    """A tenant with its own IAM user holding exactly the given policy (default: the seed's).

    Unless a bucket is named, the tenant gets a new bucket of its own.
    """

    def make(
        policy: dict[str, Any] | None = None,
        bucket: str = "",
        prefix: str = "uploads/",
        gateway: GatewayThread | None = None,
        **target: Any,
    ) -> Tenant:
        suffix = uuid.uuid4().hex[:10]
        if not bucket:  # a bucket of its own, so object names never clash between tests
            bucket = f"recgw-{suffix}"
            moto.create_bucket(bucket)
        keys = moto.create_user(f"tenant-{suffix}", policy or seed_policy(bucket))
        tenant = Tenant(f"t-{suffix}", bucket, keys, prefix)
        if gateway is not None:
            set_credentials(gateway, tenant, endpoint_url=moto.endpoint_url, **target)
        return tenant

    return make


@pytest.fixture(scope="session", autouse=True)
def canaries_never_logged(captured_logs: CapturedLogs) -> Iterator[None]:
    """After the whole session: no secret any test used appears in any captured log line."""
    yield
    assert_no_secrets(captured_logs.text())
    for audit_file in AUDIT_FILES:
        if audit_file.exists():
            assert_no_secrets(audit_file.read_text())


@pytest.fixture
def served(
    tmp_path: Path, openbao: OpenBao, identities: VaultIdentities
) -> Iterator[ServedGateway]:
    port = free_port()
    config = tmp_path / "recgw.toml"
    tokens = {"uploader": UPLOADER_TOKEN, "admin": ADMIN_TOKEN}
    sections = "\n[uploads]\npart_size_mib = 5\n"
    config.write_text(
        serve_toml(port, tmp_path, openbao, identities, tokens=tokens, sections=sections)
    )
    env = serve_env(identities)
    gateway = ServedGateway(config, env, port, tmp_path / "serve.log")
    gateway.start()
    yield gateway
    gateway.stop()
    assert_no_secrets(gateway.log.read_text())
    if (tmp_path / "audit.jsonl").exists():
        assert_no_secrets((tmp_path / "audit.jsonl").read_text())


@pytest.fixture(autouse=True)
def no_memory_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test that used the shared gateway, all buffer memory is back in the budget."""
    yield
    if "gateway" not in request.fixturenames:
        return
    shared: GatewayThread = request.getfixturevalue("gateway")
    budget = shared.gateway.budget
    wait_until(lambda: budget.in_use == 0, 30, f"the memory budget to drain ({budget.in_use} B)")


@pytest.fixture
def proxy(gateway: GatewayThread) -> Iterator[CuttableProxy]:
    """A loopback TCP proxy in front of the shared gateway; the test can cut its connections."""
    cuttable = CuttableProxy(gateway.port)
    yield cuttable
    cuttable.close()
