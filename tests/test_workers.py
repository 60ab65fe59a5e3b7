"""Several `recgw serve` workers on one port (server.reuse_port) over PostgreSQL sessions:
real processes, real PostgreSQL, real OpenBao, real gRPC connections spread by the kernel."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from recgw_server.config import Settings
from recgw_server.dev.stack import (
    OpenBao,
    PostgresCluster,
    VaultIdentities,
    free_port,
    wait_until,
)
from tests.harness import RECGW, ServedGateway, make_settings
from tests.served_config import serve_env, serve_toml

CONNECTIONS = 16  # all on one worker by chance: 2 in 2**16


def established_from(pid: int, port: int) -> int:
    """Connections accepted on `port` that process `pid` holds open (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):  # gRPC listens on a dual-stack socket even for 127.0.0.1
        with open(f"/proc/{pid}/net/{table}") as rows:
            for line in rows.readlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01" and fields[9] in inodes:
                    count += 1
    return count


def worker_config(tmp_path: Path, port: int, bao: OpenBao, identities: VaultIdentities) -> Path:
    config = tmp_path / "recgw.toml"
    sections = "\n[server]\nreuse_port = true\n"
    config.write_text(
        serve_toml(
            port,
            tmp_path,
            bao,
            identities,
            tokens={},
            data_dir=False,
            audit=False,
            sections=sections,
        )
    )
    return config


def test_two_workers_share_one_port_and_both_serve(
    tmp_path: Path, openbao: OpenBao, identities: VaultIdentities, postgres: PostgresCluster
) -> None:
    """Both bind the port, the kernel gives each some of 16 new connections, and each answers
    the health checks on its own; a third worker on a held data_dir refuses to start."""
    port = free_port()
    config = worker_config(tmp_path, port, openbao, identities)
    env = serve_env(identities, RECGW_SESSIONS__URL=postgres.create_database())
    workers = [
        ServedGateway(
            config, {**env, "RECGW_DATA_DIR": str(tmp_path / f"w{n}")}, port, tmp_path / f"w{n}.log"
        )
        for n in (1, 2)
    ]
    try:
        for worker in workers:
            worker.start()  # waits for a health check that the other worker may answer: so
            wait_until(lambda w=worker: "recgw listening on" in w.log.read_text(), 30, "bound")
        channels = [
            grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(CONNECTIONS)
        ]
        try:
            request = health_pb2.HealthCheckRequest(service="recgw.v1.UploadService")
            for channel in channels:
                reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=30)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            pids = [worker.process.pid for worker in workers if worker.process]
            spread = [established_from(pid, port) for pid in pids]
        finally:
            for channel in channels:
                channel.close()
        assert sum(spread) == CONNECTIONS and min(spread) > 0, spread
        third = subprocess.run(
            [RECGW, "serve", "--config", str(config)],
            env={**env, "RECGW_DATA_DIR": str(tmp_path / "w1")},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert third.returncode == 2
        assert "in use by another recgw worker" in third.stderr
    finally:
        for worker in workers:
            worker.stop()


def test_reuse_port_refuses_sqlite_sessions(
    openbao: OpenBao, identities: VaultIdentities, tmp_path: Path
) -> None:
    """SQLite in data_dir serves one process: several workers need PostgreSQL."""
    with pytest.raises(ValidationError, match=r"reuse_port needs sessions\.url"):
        make_settings(openbao, identities, data_dir=tmp_path, server={"reuse_port": True})
    fine = make_settings(
        openbao,
        identities,
        data_dir=tmp_path,
        server={"reuse_port": True},
        sessions={"url": "postgresql://recgw@127.0.0.1:1/recgw"},
    )
    assert isinstance(fine, Settings) and fine.server.reuse_port
