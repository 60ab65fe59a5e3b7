"""The live stack every client library's end-to-end tests run against, in any language.

    python -m tests.e2e_stack -- go test ./...

starts a real OpenBao, moto_server with IAM enforced, and `recgw serve` as its own process behind
a loopback TCP proxy the tests can cut; then runs the command with the environment below and
stops everything when it ends (its exit status is the command's).

Environment handed to the command:
- `RECGW_E2E_ADDRESS`: the gateway through the cuttable proxy (host:port, plaintext);
- `RECGW_E2E_DIRECT_ADDRESS`: the gateway itself;
- `RECGW_E2E_UPLOADER_TOKEN`, `RECGW_E2E_ADMIN_TOKEN`: bearer tokens (canary values);
- `RECGW_E2E_TENANT`, `RECGW_E2E_BUCKET`: a tenant with the seed's PutObject-only credentials;
- `RECGW_E2E_CONTROL`: base URL of a small HTTP control API on loopback:
  - `POST /cut`: reset every connection through the proxy (a network failure);
  - `POST /gateway/kill`: SIGKILL the gateway; `POST /gateway/start`: start it again on the same
    port and data dir (returns when it serves); `POST /gateway/restart`: both;
  - `GET /object?bucket=B&key=K`: the object's bytes (root credentials), 404 when absent;
  - `POST /tenant`: a new tenant with credentials stored; answers JSON
    `{"tenant_id", "bucket", "access_key_id", "secret_access_key", "region", "endpoint_url"}`
    (the key is the tenant's own PutObject-only key: tests use it to call SetCredentials);
  - `GET /logs`: everything the gateway logged (tests scan it for canaries).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import botocore.exceptions

from recgw_server.dev.stack import (
    MotoS3,
    OpenBao,
    VaultIdentities,
    bootstrap_vault,
    free_port,
    seed_policy,
    start_moto,
    start_openbao,
)
from tests.proxy import CuttableProxy
from tests.served_config import serve_env, serve_toml

UPLOADER_TOKEN = "uploader-CANARY-TOKEN-" + uuid.uuid4().hex
ADMIN_TOKEN = "admin-CANARY-TOKEN-" + uuid.uuid4().hex


def _config(port: int, root: Path, bao: OpenBao, identities: VaultIdentities) -> str:
    tokens = {"uploader": UPLOADER_TOKEN, "admin": ADMIN_TOKEN}
    sections = "\n[uploads]\npart_size_mib = 5\n"
    return serve_toml(
        port,
        root,
        bao,
        identities,
        tokens=tokens,
        audit=False,
        vault_cache_ttl=1,
        sections=sections,
    )


class Stack:
    """OpenBao, moto, a served gateway and a proxy, with the controls the HTTP API exposes."""

    def __init__(self, root: Path) -> None:
        from tests.harness import ServedGateway

        logs = root / "logs"
        self.bao = start_openbao(logs)
        self.moto: MotoS3 = start_moto(logs)
        identities = bootstrap_vault(self.bao)
        port = free_port()
        config = root / "recgw.toml"
        config.write_text(_config(port, root, self.bao, identities))
        env = serve_env(identities)
        self.gateway = ServedGateway(config, env, port, root / "serve.log")
        self.gateway.start()
        self.proxy = CuttableProxy(port)
        self.lock = threading.Lock()

    def new_tenant(self) -> dict[str, str]:
        import grpc
        from recgw.v1 import credentials_pb2, credentials_pb2_grpc

        suffix = uuid.uuid4().hex[:10]
        bucket = f"recgw-e2e-{suffix}"
        self.moto.create_bucket(bucket)
        keys = self.moto.create_user(f"e2e-{suffix}", seed_policy(bucket))
        tenant = f"e2e-{suffix}"
        with grpc.insecure_channel(f"127.0.0.1:{self.gateway.port}") as channel:
            credentials_pb2_grpc.CredentialsServiceStub(channel).SetCredentials(
                credentials_pb2.SetCredentialsRequest(
                    tenant_id=tenant,
                    access_key_id=keys.access_key_id,
                    secret_access_key=keys.secret_access_key.reveal(),
                    target=credentials_pb2.StorageTarget(
                        region=self.moto.region,
                        bucket=bucket,
                        endpoint_url=self.moto.endpoint_url,
                        force_path_style=True,
                    ),
                ),
                metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
                timeout=30,
            )
        return {
            "tenant_id": tenant,
            "bucket": bucket,
            "access_key_id": keys.access_key_id,
            "secret_access_key": keys.secret_access_key.reveal(),
            "region": self.moto.region,
            "endpoint_url": self.moto.endpoint_url,
        }

    def restart_gateway(self) -> None:
        self.gateway.kill()
        self.gateway.start()

    def read_object(self, bucket: str, key: str) -> bytes | None:
        try:
            body: bytes = self.moto.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        except botocore.exceptions.ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NoSuchBucket"):
                return None
            raise
        return body

    def stop(self) -> None:
        self.proxy.close()
        self.gateway.stop()
        self.moto.stop()
        self.bao.stop()


def _handler(stack: Stack) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/object":
                query = parse_qs(url.query)
                data = stack.read_object(query["bucket"][0], query["key"][0])
                if data is None:
                    self._reply(404, b"{}")
                else:
                    self._reply(200, data, "application/octet-stream")
            elif url.path == "/logs":
                self._reply(200, stack.gateway.log.read_bytes(), "text/plain")
            else:
                self._reply(404, b"{}")

        def do_POST(self) -> None:
            actions: dict[str, Callable[[], Any]] = {
                "/cut": stack.proxy.cut,
                "/gateway/kill": stack.gateway.kill,
                "/gateway/start": stack.gateway.start,
                "/gateway/restart": stack.restart_gateway,
                "/tenant": stack.new_tenant,
            }
            action = actions.get(urlparse(self.path).path)
            if action is None:
                self._reply(404, b"{}")
                return
            with stack.lock:
                result = action()
            self._reply(200, json.dumps(result if isinstance(result, dict) else {}).encode())

    return Handler


def main(argv: list[str]) -> int:
    command = argv[argv.index("--") + 1 :] if "--" in argv else argv
    if not command:
        print("usage: python -m tests.e2e_stack -- COMMAND...", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="recgw-e2e-") as root:
        stack = Stack(Path(root))
        control = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stack))
        threading.Thread(target=control.serve_forever, daemon=True).start()
        try:
            tenant = stack.new_tenant()
            env = {
                **os.environ,
                "RECGW_E2E_ADDRESS": stack.proxy.address,
                "RECGW_E2E_DIRECT_ADDRESS": f"127.0.0.1:{stack.gateway.port}",
                "RECGW_E2E_UPLOADER_TOKEN": UPLOADER_TOKEN,
                "RECGW_E2E_ADMIN_TOKEN": ADMIN_TOKEN,
                "RECGW_E2E_TENANT": tenant["tenant_id"],
                "RECGW_E2E_BUCKET": tenant["bucket"],
                "RECGW_E2E_CONTROL": f"http://127.0.0.1:{control.server_address[1]}",
            }
            result = subprocess.run(command, env=env, check=False)
            logs = stack.gateway.log.read_text()
            leaked = [t for t in (UPLOADER_TOKEN, ADMIN_TOKEN) if t in logs]
            if leaked:
                print("e2e_stack: a bearer token appeared in the gateway log", file=sys.stderr)
                return 1
            return result.returncode
        finally:
            control.shutdown()
            stack.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
