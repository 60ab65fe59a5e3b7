"""`recgw dev` (what `make run` runs): a complete local stack on embedded defaults.

OpenBao dev server as Vault, moto_server as S3 with IAM enforced, a demo bucket and a demo IAM
user holding exactly the setup guide's PutObject-only policy, and a gateway with fresh tokens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from recgw.v1 import credentials_pb2, credentials_pb2_grpc

from recgw_server.app import Gateway
from recgw_server.auth.tokens import hash_token
from recgw_server.config import Settings
from recgw_server.dev.certs import DevTlsFiles, write_dev_tls
from recgw_server.dev.stack import (
    MOTO_ACCOUNT,
    MotoS3,
    OpenBao,
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


@dataclass
class DevStack:
    bao: OpenBao
    moto: MotoS3
    gateway: Gateway
    uploader_token: str
    admin_token: str
    gateway_principal: str = ""
    tls: DevTlsFiles | None = None


async def start_dev_stack(options: DevOptions) -> DevStack:
    """Start OpenBao, moto and a gateway, and store the demo tenant's credentials."""
    logs = options.data_dir / "logs"
    bao = await asyncio.to_thread(start_openbao, logs, options.vault_port)
    try:
        moto = await asyncio.to_thread(start_moto, logs, options.s3_port)
    except BaseException:
        bao.stop()
        raise
    try:
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
        assert identities.writer.secret_id and identities.reader.secret_id
        tls = (
            await asyncio.to_thread(write_dev_tls, options.data_dir / "tls")
            if options.tls
            else None
        )
        transport: dict[str, Any] = {"plaintext": True}
        if tls is not None:
            transport = {
                "tls": {
                    "cert_file": tls.server_cert,
                    "key_file": tls.server_key,
                    "client_ca_file": tls.ca_file if options.tls == "mtls" else None,
                }
            }
        settings = Settings(
            listen=f"127.0.0.1:{options.port}",
            metrics_listen=f"127.0.0.1:{options.metrics_port}" if options.metrics_port else "",
            shutdown_grace_seconds=5,
            data_dir=options.data_dir,
            audit={"sink": str(options.data_dir / "audit.jsonl")},
            tokens=[
                {
                    "name": "dev-uploader",
                    "role": "uploader",
                    "sha256": hash_token(uploader_token),
                    "tenants": ["*"],
                },
                {
                    "name": "dev-admin",
                    "role": "admin",
                    "sha256": hash_token(admin_token),
                    "tenants": ["*"],
                },
            ],
            **transport,
            vault={
                "address": bao.address,
                "writer": {
                    "method": "approle",
                    "role_id": identities.writer.role_id,
                    "secret_id": identities.writer.secret_id.reveal(),
                },
                "reader": {
                    "method": "approle",
                    "role_id": identities.reader.role_id,
                    "secret_id": identities.reader.secret_id.reveal(),
                },
            },
            roles={
                "sts_endpoint_url": moto.endpoint_url,
                "gateway_principal_arn": gateway_principal,
            },
        )
        gateway = Gateway(settings)
        await gateway.start()
        # The demo tenant's keys go in the way a customer's would: through SetCredentials.
        async with _channel(gateway.port, tls, options.tls == "mtls") as channel:
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
        moto.stop()
        bao.stop()
        raise
    return DevStack(bao, moto, gateway, uploader_token, admin_token, gateway_principal, tls)


def _channel(port: int, tls: DevTlsFiles | None, mutual: bool) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    client = (tls.client_key.read_bytes(), tls.client_cert.read_bytes()) if mutual else (None, None)
    credentials = grpc.ssl_channel_credentials(tls.ca_file.read_bytes(), *client)
    return grpc.aio.secure_channel(f"{tls.server_name}:{port}", credentials)


async def stop_dev_stack(stack: DevStack) -> None:
    await stack.gateway.stop(grace=2)
    await asyncio.to_thread(stack.moto.stop)
    await asyncio.to_thread(stack.bao.stop)


def banner(stack: DevStack, options: DevOptions) -> str:
    """What `make run` prints: where everything is and a command to copy."""
    recgw = Path(sys.executable).parent / "recgw"
    address = f"127.0.0.1:{stack.gateway.port}"
    transport = "plaintext, loopback only"
    tls_lines = ""
    if stack.tls is not None:
        address = f"{stack.tls.server_name}:{stack.gateway.port}"
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
    return f"""
recgw dev stack is up (Ctrl-C stops everything)

  gateway        {address}   (gRPC, {transport})
{tls_lines}  uploader token {stack.uploader_token}
  admin token    {stack.admin_token}
  OpenBao        {stack.bao.address}   (dev server, in memory)
  S3 (moto)      {stack.moto.endpoint_url}   (IAM enforced; bucket '{options.bucket}')
  S3 browser     {stack.moto.endpoint_url}/moto-api/
{metrics}  tenant         '{options.tenant}' -> s3://{options.bucket}/uploads/ (PutObject only)
  roles          assumed as {stack.gateway_principal} (recgw policy --role)
  logs           {options.data_dir / "logs"}
  audit trail    {options.data_dir / "audit.jsonl"}

Upload a file (copy and paste into another terminal):

  RECGW_ADDRESS={address} RECGW_TOKEN={stack.uploader_token} \\
    {recgw} upload README.md --tenant {options.tenant} --name hello/README.md

Stream a live recording from stdin:

  head -c 20000000 /dev/urandom | RECGW_ADDRESS={address} RECGW_TOKEN={stack.uploader_token} \\
    {recgw} upload - --tenant {options.tenant} --name live/recording.bin
"""


def stack_environment(stack: DevStack, options: DevOptions) -> dict[str, str]:
    """What a test runner needs to use the stack, as RECGW_* variables (for --env-file)."""
    env = {
        "RECGW_ADDRESS": f"127.0.0.1:{stack.gateway.port}",
        "RECGW_TOKEN": stack.uploader_token,
        "RECGW_ADMIN_TOKEN": stack.admin_token,
        "RECGW_TENANT": options.tenant,
        "RECGW_BUCKET": options.bucket,
        "RECGW_S3_ENDPOINT": stack.moto.endpoint_url,
        "RECGW_VAULT_ADDRESS": stack.bao.address,
    }
    if stack.tls is not None:
        env["RECGW_ADDRESS"] = f"{stack.tls.server_name}:{stack.gateway.port}"
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

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.writelines(f"{key}={shlex.quote(value)}\n" for key, value in env.items())


async def run_dev(options: DevOptions) -> None:
    """Start the stack, print the banner, wait for Ctrl-C or SIGTERM, stop everything."""
    stack = await start_dev_stack(options)
    if options.env_file is not None:
        write_env_file(options.env_file, stack_environment(stack, options))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(banner(stack, options), flush=True)
        await stop.wait()
        print("stopping...", flush=True)
    finally:
        await stop_dev_stack(stack)
