"""`recgw dev` (what `make run` runs): a complete local stack on embedded defaults.

OpenBao dev server as Vault, moto_server as S3 with IAM enforced, a demo bucket and a demo IAM
user holding exactly the setup guide's PutObject-only policy, and a gateway with fresh tokens.
With `--replicas N`, N `recgw serve` processes over a throwaway PostgreSQL cluster instead of
the one in-process gateway over SQLite.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from recgw.v1 import credentials_pb2, credentials_pb2_grpc

from recgw_server.app import Gateway
from recgw_server.auth.tokens import hash_token
from recgw_server.config import Settings
from recgw_server.dev.certs import DevTlsFiles, write_dev_tls
from recgw_server.dev.replicas import (
    DevStackError,
    Replica,
    replica_failure,
    start_dev_postgres,
    start_replica,
    stop_all,
)
from recgw_server.dev.stack import (
    MOTO_ACCOUNT,
    MotoS3,
    OpenBao,
    PostgresCluster,
    VaultIdentities,
    bootstrap_vault,
    gateway_identity_policy,
    seed_policy,
    start_moto,
    start_openbao,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevOptions:
    port: int = 50051
    s3_port: int = 5000
    vault_port: int = 8200
    metrics_port: int = 9464
    data_dir: Path = Path(".recgw-dev")
    tenant: str = "demo"
    bucket: str = "recgw-demo"
    # Where to write the stack's address, tokens and tenant as RECGW_* lines (for test runners).
    env_file: Path | None = None
    tls: str = ""  # "", "tls", or "mtls" (client certificates required)
    # 0: one gateway in this process over SQLite; N: N `recgw serve` processes over PostgreSQL.
    replicas: int = 0


@dataclass
class DevStack:
    bao: OpenBao
    moto: MotoS3
    gateway: Gateway | None
    uploader_token: str
    admin_token: str
    gateway_principal: str = ""
    tls: DevTlsFiles | None = None
    replicas: list[Replica] = field(default_factory=list)
    postgres: PostgresCluster | None = None
    postgres_url: str = ""

    @property
    def ports(self) -> list[int]:
        """The gateway's port, or every replica's, in order."""
        if self.gateway is not None:
            return [self.gateway.port]
        return [replica.port for replica in self.replicas]


async def start_dev_stack(options: DevOptions) -> DevStack:
    """Start OpenBao, moto and the gateway (or its replicas over PostgreSQL), and store the
    demo tenant's credentials."""
    logs = options.data_dir / "logs"
    # First, so that missing PostgreSQL binaries are reported before anything else starts.
    postgres = await asyncio.to_thread(start_dev_postgres) if options.replicas else None
    started: list[Any] = [postgres] if postgres is not None else []
    try:
        bao = await asyncio.to_thread(start_openbao, logs, options.vault_port)
        started.append(bao)
        moto = await asyncio.to_thread(start_moto, logs, options.s3_port)
        started.append(moto)
        stack = await _start_gateways(options, bao, moto, postgres)
    except BaseException:
        for service in reversed(started):
            await asyncio.to_thread(service.stop)
        raise
    return stack


async def _start_gateways(
    options: DevOptions, bao: OpenBao, moto: MotoS3, postgres: PostgresCluster | None
) -> DevStack:
    identities = await asyncio.to_thread(bootstrap_vault, bao)
    await asyncio.to_thread(moto.create_bucket, options.bucket)
    demo_keys = await asyncio.to_thread(
        moto.create_user, "recgw-demo-writer", seed_policy(options.bucket)
    )
    # The gateway's own AWS identity, for tenant roles, over the standard chain (environment)
    gateway_keys = await asyncio.to_thread(
        moto.create_user, "recgw-dev-gateway", gateway_identity_policy()
    )
    gateway_principal = f"arn:aws:iam::{MOTO_ACCOUNT}:user/recgw-dev-gateway"
    os.environ["AWS_ACCESS_KEY_ID"] = gateway_keys.access_key_id
    os.environ["AWS_SECRET_ACCESS_KEY"] = gateway_keys.secret_access_key.reveal()
    os.environ.pop("AWS_SESSION_TOKEN", None)
    uploader_token = "upl_" + secrets.token_urlsafe(24)
    admin_token = "adm_" + secrets.token_urlsafe(24)
    tls = await asyncio.to_thread(write_dev_tls, options.data_dir / "tls") if options.tls else None
    values = _settings_values(options, bao, moto, gateway_principal, tls)
    values["tokens"] = [
        {
            "name": "dev-uploader",
            "role": "uploader",
            "sha256": hash_token(uploader_token),
            "tenants": ["*"],
        },
        {"name": "dev-admin", "role": "admin", "sha256": hash_token(admin_token), "tenants": ["*"]},
    ]
    stack = DevStack(bao, moto, None, uploader_token, admin_token, gateway_principal, tls)
    stack.postgres = postgres
    if postgres is None:
        stack.gateway = await _start_in_process(options, values, identities)
    else:
        stack.postgres_url = await asyncio.to_thread(postgres.create_database, "recgw")
        stack.replicas = await _start_replicas(options, values, identities, stack)
    try:
        # The demo tenant's keys go in the way a customer's would: through SetCredentials.
        async with _channel(stack.ports[0], tls, options.tls == "mtls") as channel:
            await credentials_pb2_grpc.CredentialsServiceStub(channel).SetCredentials(
                credentials_pb2.SetCredentialsRequest(
                    tenant_id=options.tenant,
                    access_key_id=demo_keys.access_key_id,
                    secret_access_key=demo_keys.secret_access_key.reveal(),
                    target=credentials_pb2.StorageTarget(
                        region=moto.region,
                        bucket=options.bucket,
                        prefix="uploads/",
                        endpoint_url=moto.endpoint_url,
                        force_path_style=True,
                    ),
                ),
                metadata=(("authorization", f"Bearer {admin_token}"),),
            )
    except BaseException:
        await _stop_gateways(stack)
        raise
    return stack


def _settings_values(
    options: DevOptions,
    bao: OpenBao,
    moto: MotoS3,
    gateway_principal: str,
    tls: DevTlsFiles | None,
) -> dict[str, Any]:
    """The gateway's settings shared by the in-process gateway and the replicas (no secrets)."""
    values: dict[str, Any] = {"plaintext": True, "shutdown_grace_seconds": 5}
    if tls is not None:
        values = {
            "shutdown_grace_seconds": 5,
            "tls": {
                "cert_file": tls.server_cert,
                "key_file": tls.server_key,
                "client_ca_file": tls.ca_file if options.tls == "mtls" else None,
            },
        }
    values["vault"] = {
        "address": bao.address,
        "writer": {"method": "approle"},
        "reader": {"method": "approle"},
    }
    values["roles"] = {
        "sts_endpoint_url": moto.endpoint_url,
        "gateway_principal_arn": gateway_principal,
    }
    return values


async def _start_in_process(
    options: DevOptions, values: dict[str, Any], identities: VaultIdentities
) -> Gateway:
    vault = values["vault"]
    for kind, identity in (("writer", identities.writer), ("reader", identities.reader)):
        assert identity.secret_id is not None
        vault[kind] = {**vault[kind], "role_id": identity.role_id}
        vault[kind]["secret_id"] = identity.secret_id.reveal()
    settings = Settings(
        listen=f"127.0.0.1:{options.port}",
        metrics_listen=f"127.0.0.1:{options.metrics_port}" if options.metrics_port else "",
        data_dir=options.data_dir,
        audit={"sink": str(options.data_dir / "audit.jsonl")},
        **values,
    )
    gateway = Gateway(settings)
    await gateway.start()
    return gateway


async def _start_replicas(
    options: DevOptions, values: dict[str, Any], identities: VaultIdentities, stack: DevStack
) -> list[Replica]:
    """N `recgw serve` processes on consecutive ports, sharing PostgreSQL, OpenBao and moto."""
    assert identities.writer.secret_id and identities.reader.secret_id
    values["vault"]["writer"]["role_id"] = identities.writer.role_id
    values["vault"]["reader"]["role_id"] = identities.reader.role_id
    # Secrets through the environment only (AWS_* of the gateway's identity are set already).
    env = {
        **os.environ,
        "RECGW_VAULT__WRITER__SECRET_ID": identities.writer.secret_id.reveal(),
        "RECGW_VAULT__READER__SECRET_ID": identities.reader.secret_id.reveal(),
    }
    replicas: list[Replica] = []
    try:
        for index in range(options.replicas):
            name = f"replica-{index + 1}"
            home = options.data_dir / name
            port = options.port + index
            metrics = options.metrics_port + index if options.metrics_port else 0
            settings = {
                "listen": f"127.0.0.1:{port}",
                "metrics_listen": f"127.0.0.1:{metrics}" if metrics else "",
                "data_dir": home / "data",
                **values,
                "audit": {"sink": home / "audit.jsonl"},
                "sessions": {"url": stack.postgres_url, "replica_id": name},
            }
            replicas.append(start_replica(name, port, settings, env, home))
        for replica in replicas:
            await _wait_serving(replica, stack.tls, options.tls == "mtls")
    except BaseException:
        await asyncio.to_thread(stop_all, replicas)
        raise
    return replicas


async def _wait_serving(replica: Replica, tls: DevTlsFiles | None, mutual: bool) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = asyncio.get_running_loop().time() + 60
    async with _channel(replica.port, tls, mutual) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while replica.running() and asyncio.get_running_loop().time() < deadline:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.1)
    raise DevStackError(replica_failure(replica))


def _channel(port: int, tls: DevTlsFiles | None, mutual: bool) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    client = (tls.client_key.read_bytes(), tls.client_cert.read_bytes()) if mutual else (None, None)
    credentials = grpc.ssl_channel_credentials(tls.ca_file.read_bytes(), *client)
    return grpc.aio.secure_channel(f"{tls.server_name}:{port}", credentials)


async def _stop_gateways(stack: DevStack) -> None:
    if stack.gateway is not None:
        await stack.gateway.stop(grace=2)
    await asyncio.to_thread(stop_all, stack.replicas)


async def stop_dev_stack(stack: DevStack) -> None:
    await _stop_gateways(stack)
    await asyncio.to_thread(stack.moto.stop)
    await asyncio.to_thread(stack.bao.stop)
    if stack.postgres is not None:
        await asyncio.to_thread(stack.postgres.stop)


def banner(stack: DevStack, options: DevOptions) -> str:
    """What `make run` prints: where everything is and a command to copy."""
    recgw = Path(sys.executable).parent / "recgw"
    host = stack.tls.server_name if stack.tls is not None else "127.0.0.1"
    address = f"{host}:{stack.ports[0]}"
    transport = "plaintext, loopback only"
    tls_lines = ""
    if stack.tls is not None:
        mutual = options.tls == "mtls"
        transport = "mTLS: client certificates required" if mutual else "TLS"
        tls_lines = (
            f"  CA file        {stack.tls.ca_file}   (server name {stack.tls.server_name})\n"
        )
        if mutual:
            tls_lines += (
                f"  client cert    {stack.tls.client_cert}\n"
                f"  client key     {stack.tls.client_key}\n"
            )
        tls_lines += "                 (give these to the client's TLS options)\n"
    metrics = (
        f"  metrics        http://127.0.0.1:{options.metrics_port}/metrics\n"
        if options.metrics_port
        else ""
    )
    gateways = f"  gateway        {address}   (gRPC, {transport})\n"
    audit = str(options.data_dir / "audit.jsonl")
    if stack.replicas:
        gateways, metrics, audit = _replica_lines(stack, options, host, transport)
    top = f"""
recgw dev stack is up (Ctrl-C stops everything)

{gateways}{tls_lines}  uploader token {stack.uploader_token}
  admin token    {stack.admin_token}
  OpenBao        {stack.bao.address}   (dev server, in memory)
  S3 (moto)      {stack.moto.endpoint_url}   (IAM enforced; bucket '{options.bucket}')
  S3 browser     {stack.moto.endpoint_url}/moto-api/
{metrics}  tenant         '{options.tenant}' -> s3://{options.bucket}/uploads/ (PutObject only)
  roles          assumed as {stack.gateway_principal} (recgw policy --role)
  logs           {options.data_dir / "logs"}
  audit trail    {audit}

Upload a file (copy and paste into another terminal):

  RECGW_ADDRESS={address} RECGW_TOKEN={stack.uploader_token} \\
    {recgw} upload README.md --tenant {options.tenant} --name hello/README.md

Stream a live recording from stdin:

  head -c 20000000 /dev/urandom | RECGW_ADDRESS={address} RECGW_TOKEN={stack.uploader_token} \\
    {recgw} upload - --tenant {options.tenant} --name live/recording.bin
"""
    if not stack.replicas:
        return top
    other = f"{host}:{stack.ports[-1]}"
    return (
        top
        + f"""
Any replica resumes any upload. Note the "upload id" an upload prints, kill the replica that
writes it (kill -9 PID, or kill PID: it drains), then inspect or finish it through another:

  RECGW_ADDRESS={other} RECGW_TOKEN={stack.uploader_token} {recgw} status UPLOAD_ID
  RECGW_ADDRESS={other} RECGW_TOKEN={stack.uploader_token} \\
    {recgw} upload FILE --tenant {options.tenant} --name NAME --upload-id UPLOAD_ID
"""
    )


def _replica_lines(
    stack: DevStack, options: DevOptions, host: str, transport: str
) -> tuple[str, str, str]:
    """The banner's lines for the replicas: gateways, metrics, audit trails."""
    assert stack.postgres is not None
    lines = [
        f"  replica {index + 1}      {host}:{r.port}   (gRPC, {transport}; pid {r.pid}, "
        f"log {r.managed.log_path})\n"
        for index, r in enumerate(stack.replicas)
    ]
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in stack.ports)
    lines.append(
        f"  balanced       {target}\n"
        "                 (a gRPC target over every replica; with the round_robin policy,\n"
        '                 grpc.lb_policy_name = "round_robin", uploads spread over all)\n'
        f"  PostgreSQL     {stack.postgres_url}   (throwaway cluster, gone on exit)\n"
    )
    metrics = "".join(
        f"  metrics {index + 1}      http://127.0.0.1:{options.metrics_port + index}/metrics\n"
        for index in range(len(stack.replicas))
        if options.metrics_port
    )
    audit = str(options.data_dir / "replica-*" / "audit.jsonl")
    return "".join(lines), metrics, audit


def stack_environment(stack: DevStack, options: DevOptions) -> dict[str, str]:
    """What a test runner needs to use the stack, as RECGW_* variables (for --env-file)."""
    host = stack.tls.server_name if stack.tls is not None else "127.0.0.1"
    env = {
        "RECGW_ADDRESS": f"{host}:{stack.ports[0]}",
        "RECGW_TOKEN": stack.uploader_token,
        "RECGW_ADMIN_TOKEN": stack.admin_token,
        "RECGW_TENANT": options.tenant,
        "RECGW_BUCKET": options.bucket,
        "RECGW_S3_ENDPOINT": stack.moto.endpoint_url,
        "RECGW_VAULT_ADDRESS": stack.bao.address,
    }
    if stack.replicas:
        # RECGW_ADDRESS is replica 1; every replica's address, in order, and a balanced target.
        env["RECGW_ADDRESSES"] = ",".join(f"{host}:{port}" for port in stack.ports)
        env["RECGW_BALANCED_TARGET"] = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in stack.ports)
        env["RECGW_REPLICA_PIDS"] = ",".join(str(r.pid) for r in stack.replicas)
        env["RECGW_POSTGRES_URL"] = stack.postgres_url
        if stack.postgres is not None:
            env["RECGW_POSTGRES_DIR"] = str(stack.postgres.root)  # removed on exit
    if stack.tls is not None:
        env["RECGW_TLS_CA_FILE"] = str(stack.tls.ca_file)
        env["RECGW_TLS_SERVER_NAME"] = stack.tls.server_name
        if options.tls == "mtls":
            env["RECGW_TLS_CERT_FILE"] = str(stack.tls.client_cert)
            env["RECGW_TLS_KEY_FILE"] = str(stack.tls.client_key)
    return env


def write_env_file(path: Path, env: dict[str, str]) -> None:
    """KEY=value lines (values quoted for a shell), private to the user: it holds tokens."""
    import os
    import shlex

    # Written whole under another name, then renamed: whoever waits for the file (a script,
    # a test) never reads half of it.
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.writelines(f"{key}={shlex.quote(value)}\n" for key, value in env.items())
    os.replace(partial, path)


async def run_dev(options: DevOptions) -> None:
    """Start the stack, print the banner, wait for Ctrl-C or SIGTERM, stop everything."""
    stack = await start_dev_stack(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(banner(stack, options), flush=True)
        # Last: the env file says the stack is up and the banner is out.
        if options.env_file is not None:
            write_env_file(options.env_file, stack_environment(stack, options))
        await stop.wait()
        print("stopping...", flush=True)
    finally:
        await stop_dev_stack(stack)
