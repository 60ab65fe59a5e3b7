"""Canary secrets never reach a log line, an error message, a response or a metric."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
from prometheus_client import generate_latest
from recgw.v1 import credentials_pb2

from recgw_server.dev.stack import AwsKeys, MotoS3, free_port
from recgw_server.domain import Secret
from tests.harness import (
    ADMIN,
    CapturedLogs,
    GatewayThread,
    Tenant,
    assert_no_secrets,
    details,
    register_canary,
    set_credentials,
    upload,
    upload_messages,
)


def test_canary_secret_never_leaks(
    gateway: GatewayThread,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    make_gateway: Callable[..., GatewayThread],
    captured_logs: CapturedLogs,
) -> None:
    seen: list[str] = []
    tenant = new_tenant()
    canary = register_canary("CANARY-SECRET-" + uuid.uuid4().hex)
    tenant.keys = AwsKeys(tenant.keys.access_key_id, Secret(canary))
    seen.append(str(set_credentials(gateway, tenant, endpoint_url=moto.endpoint_url)))
    seen.append(
        str(
            gateway.credentials.DescribeCredentials(
                credentials_pb2.DescribeCredentialsRequest(tenant_id=tenant.tenant_id),
                metadata=ADMIN,
            )
        )
    )
    seen.append(
        str(
            gateway.credentials.VerifyCredentials(
                credentials_pb2.VerifyCredentialsRequest(tenant_id=tenant.tenant_id),
                metadata=ADMIN,
            )
        )
    )
    for name in ("a.bin", "b.bin"):
        try:
            upload(gateway, upload_messages(tenant.tenant_id, name, b"abc"))
        except grpc.RpcError as error:
            seen.append(f"{error.code()} {details(error)} {error!r}")
    # an unreachable S3 endpoint and an unreachable Vault
    set_credentials(gateway, tenant, endpoint_url=f"http://127.0.0.1:{free_port()}")
    down = make_gateway(vault_address=f"http://127.0.0.1:{free_port()}")
    for target in (gateway, down):
        try:
            upload(target, upload_messages(tenant.tenant_id, "c.bin", b"abc"))
        except grpc.RpcError as error:
            seen.append(f"{error.code()} {details(error)} {error!r}")
    seen.append(repr(gateway.gateway.settings))
    seen.append(Path(gateway.gateway.settings.audit.sink).read_text())  # the audit trail
    seen.append(generate_latest(gateway.gateway.metrics.registry).decode())
    assert len(seen) >= 6
    assert_no_secrets("\n".join(seen))
    assert_no_secrets(captured_logs.text())
