"""The `recgw` command as a person uses it: real processes, real gateway, real stack."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import requests

from recgw_server.dev.stack import MotoS3, free_port
from tests.harness import (
    ADMIN_TOKEN,
    UPLOADER_TOKEN,
    GatewayThread,
    MiB,
    ServedGateway,
    Tenant,
    assert_no_secrets,
    read_object,
    register_canary,
)

RECGW = str(Path(sys.executable).parent / "recgw")


def cli_env(gateway: GatewayThread, token: str) -> dict[str, str]:
    return {**os.environ, "RECGW_ADDRESS": gateway.address, "RECGW_TOKEN": token}


def test_stdin_stream_of_unknown_length(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant(gateway=gateway)
    data = os.urandom(11 * MiB + 7)
    result = subprocess.run(
        [RECGW, "upload", "-", "--tenant", tenant.tenant_id, "--name", "live/rec.webm", "--json"],
        input=data,
        env=cli_env(gateway, UPLOADER_TOKEN),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    printed = json.loads(result.stdout)
    assert printed["key"] == "uploads/live/rec.webm"
    assert printed["size"] == len(data)
    assert printed["part_count"] == 3
    assert read_object(moto, tenant.bucket, "uploads/live/rec.webm") == data
    assert_no_secrets(result.stdout.decode() + result.stderr.decode())


def test_upload_error_exits_non_zero_with_the_status(
    gateway: GatewayThread, new_tenant: Callable[..., Tenant], tmp_path: Path
) -> None:
    tenant = new_tenant(gateway=gateway)
    source = tmp_path / "f.bin"
    source.write_bytes(b"abc")
    result = subprocess.run(
        [RECGW, "upload", str(source), "--tenant", tenant.tenant_id, "--name", "../escape"],
        env=cli_env(gateway, UPLOADER_TOKEN),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "INVALID_ARGUMENT" in result.stderr.decode()


def test_creds_set_reads_the_secret_from_stdin(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant()
    secret = tenant.keys.secret_access_key.reveal()
    register_canary(secret)
    args = [
        RECGW, "creds", "set", "--tenant", tenant.tenant_id,
        "--access-key-id", tenant.keys.access_key_id, "--region", "us-east-1",
        "--bucket", tenant.bucket, "--endpoint-url", moto.endpoint_url, "--path-style",
        "--secret-stdin", "--json",
    ]  # fmt: skip
    assert secret not in " ".join(args)
    env = cli_env(gateway, ADMIN_TOKEN)
    result = subprocess.run(
        args, input=secret + "\n", env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["access_key_id_hint"].endswith(tenant.keys.access_key_id[-4:])
    verify = subprocess.run(
        [RECGW, "creds", "verify", "--tenant", tenant.tenant_id, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    report = json.loads(verify.stdout)
    assert report["ok"] is True
    assert {c["name"]: c["result"] for c in report["checks"]}["conditional_write"] == "passed"
    assert_no_secrets(result.stdout + result.stderr + verify.stdout + verify.stderr)


def test_creds_set_reads_the_secret_from_the_environment(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant()
    env = {
        **cli_env(gateway, ADMIN_TOKEN),
        "RECGW_SECRET_ACCESS_KEY": tenant.keys.secret_access_key.reveal(),
    }
    result = subprocess.run(
        [
            RECGW,
            "creds",
            "set",
            "--tenant",
            tenant.tenant_id,
            "--access-key-id",
            tenant.keys.access_key_id,
            "--region",
            "us-east-1",
            "--bucket",
            tenant.bucket,
            "--endpoint-url",
            moto.endpoint_url,
            "--path-style",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    described = subprocess.run(
        [RECGW, "creds", "describe", "--tenant", tenant.tenant_id, "--json"],
        env=cli_env(gateway, ADMIN_TOKEN),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(described.stdout)["bucket"] == tenant.bucket


def test_serve_runs_and_stops_gracefully(served: ServedGateway) -> None:
    """`recgw serve` with TOML settings and secrets from the environment; SIGTERM is graceful."""
    assert served.process is not None
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=30) == 0
    text = served.log.read_text()
    assert "shutting down" in text
    assert_no_secrets(text)


def test_make_run_prints_a_command_that_uploads(tmp_path: Path) -> None:
    """`recgw dev` (what `make run` runs): copy the printed command, find the file in the bucket."""
    ports = [free_port() for _ in range(3)]
    process = subprocess.Popen(
        [
            RECGW,
            "dev",
            "--port",
            str(ports[0]),
            "--s3-port",
            str(ports[1]),
            "--vault-port",
            str(ports[2]),
            "--metrics-port",
            "0",
            "--data-dir",
            str(tmp_path / "dev"),
            "--env-file",
            str(tmp_path / "dev.env"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        for line in process.stdout:
            lines.append(line)
            if "--name live/recording.bin" in line:
                break
        banner = "".join(lines)
        command = re.search(
            r"\n  (RECGW_ADDRESS=\S+ RECGW_TOKEN=\S+ \\\n\s+\S+ upload .*)\n", banner
        )
        assert command is not None, banner
        source = tmp_path / "README.md"
        source.write_text("hello from make run\n")
        uploaded = subprocess.run(
            command.group(1).replace("\\\n", " "),
            shell=True,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert uploaded.returncode == 0, uploaded.stderr
        listing = requests.get(f"http://127.0.0.1:{ports[1]}/moto-api/data.json", timeout=10)
        assert "uploads/hello/README.md" in listing.text
        token = re.search(r"uploader token (\S+)", banner)
        assert token is not None
        assert token.group(1) not in uploaded.stdout + uploaded.stderr
        # The same facts, machine-readable for test runners, in a private file.
        env_file = tmp_path / "dev.env"
        assert env_file.stat().st_mode & 0o777 == 0o600
        env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert env["RECGW_ADDRESS"] == f"127.0.0.1:{ports[0]}"
        assert env["RECGW_TOKEN"] == token.group(1)
        assert env["RECGW_TENANT"] == "demo" and env["RECGW_ADMIN_TOKEN"]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    assert process.returncode == 0
