"""A local stack for development and tests: an OpenBao dev server and moto_server with IAM on.

Used by `recgw dev` (and so `make run`) and by the test suite, so both exercise the same set-up.
Secrets (the root token, access keys) travel through environment variables and Python
objects, never through a command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import boto3
import hvac
import requests

from recgw_server.credentials.vault import VaultAuth
from recgw_server.domain import Secret

SEED_POLICY_SID = "16933222-fba4-4de3-bf3e-427759b73a9d"
MOTO_ACCOUNT = "123456789012"  # the account moto puts everything in


_handed_out: set[int] = set()


def _ephemeral_ports() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_port(consecutive: int = 1) -> int:
    """A loopback port nothing listens on, for a server this process is about to start (with
    `consecutive`, the first of that many free ports in a row, as `recgw dev --replicas`
    uses).

    It is chosen below the kernel's ephemeral range: a port the kernel picked (bind to port 0)
    is free only until the next outgoing connection, which takes its local port from that same
    range and may take this one before the server binds it (a test then fails with "cannot
    listen"). No port is handed out twice by one process.
    """
    ephemeral = _ephemeral_ports()
    candidates = (
        range(10000, ephemeral.start - consecutive) if ephemeral.start > 11000 else range(0)
    )
    for _ in range(200 if candidates else 0):
        first = random.choice(candidates)
        ports = range(first, first + consecutive)
        if _handed_out.intersection(ports) or not all(_bindable(port) for port in ports):
            continue
        _handed_out.update(ports)
        return first
    if consecutive > 1:
        raise RuntimeError(f"no {consecutive} consecutive free loopback ports")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _binary(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(
            f"{name} not found; install the devstack extra: pip install '.[devstack]'"
        )
    return found


def wait_until(
    check: Any,
    timeout: float,
    what: str,
    interval: float = 0.05,
    stop_on: tuple[type[Exception], ...] = (),
) -> None:
    """Poll `check()` until it returns truthy, or raise after `timeout` seconds; an exception
    of a `stop_on` type ends the wait at once."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except stop_on:
            raise
        except Exception as exc:  # the service is not up yet
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(
        f"{what} not ready after {timeout}s (last error: {type(last_error).__name__})"
    )


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def _spawn(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> ManagedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        args,
        env={**os.environ, **env},
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    return ManagedProcess(name, process, log_path, log_file)


@dataclass
class OpenBao:
    """An OpenBao dev server (in memory, unsealed, KV v2 mounted at `secret/`)."""

    address: str
    root_token: Secret
    managed: ManagedProcess

    def root_client(self) -> hvac.Client:
        return hvac.Client(url=self.address, token=self.root_token.reveal())

    def stop(self) -> None:
        self.managed.stop()


def start_openbao(log_dir: Path, port: int | None = None) -> OpenBao:
    port = port or free_port()
    root_token = Secret("devroot" + secrets.token_hex(16))
    managed = _spawn(
        "openbao",
        [_binary("bao"), "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}"],
        # the root token goes through the environment, never the command line
        {"BAO_DEV_ROOT_TOKEN_ID": root_token.reveal(), "VAULT_DEV_ROOT_TOKEN_ID": ""},
        log_dir,
    )
    address = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if managed.process.poll() is not None:
            raise RuntimeError(f"bao exited; see {managed.log_path}")
        response = requests.get(f"{address}/v1/sys/health", timeout=1)
        return response.status_code == 200

    try:
        wait_until(ready, 30, "OpenBao")
        # KV v2 is mounted by dev mode; wait until it answers.
        client = hvac.Client(url=address, token=root_token.reveal())
        wait_until(
            lambda: client.secrets.kv.v2.read_configuration(mount_point="secret"), 30, "KV v2"
        )
    except BaseException:
        managed.stop()
        raise
    return OpenBao(address, root_token, managed)


@dataclass(frozen=True)
class AwsKeys:
    access_key_id: str
    secret_access_key: Secret


@dataclass
class MotoS3:
    """moto_server with IAM enforcement on, and an admin IAM user to set it up."""

    endpoint_url: str
    admin: AwsKeys
    managed: ManagedProcess
    region: str = "us-east-1"

    def client(self, service: str, keys: AwsKeys | None = None) -> Any:
        keys = keys or self.admin
        return boto3.client(
            service,  # type: ignore[call-overload]
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=keys.access_key_id,
            aws_secret_access_key=keys.secret_access_key.reveal(),
        )

    def create_bucket(self, bucket: str) -> None:
        self.client("s3").create_bucket(Bucket=bucket)

    def create_user(self, user_name: str, policy: dict[str, Any]) -> AwsKeys:
        """Create an IAM user with exactly this inline policy and return its access key."""
        iam = self.client("iam")
        iam.create_user(UserName=user_name)
        iam.put_user_policy(
            UserName=user_name, PolicyName=f"{user_name}-policy", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName=user_name)["AccessKey"]
        return AwsKeys(key["AccessKeyId"], Secret(key["SecretAccessKey"]))

    def user_arn(self, user_name: str) -> str:
        return str(self.client("iam").get_user(UserName=user_name)["User"]["Arn"])

    def stop(self) -> None:
        self.managed.stop()


def seed_policy(bucket: str, resource_suffix: str = "*") -> dict[str, Any]:
    """The customer's IAM policy from the setup guide: s3:PutObject only."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": SEED_POLICY_SID,
                "Effect": "Allow",
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{bucket}/{resource_suffix}",
            }
        ],
    }


def gateway_identity_policy() -> dict[str, Any]:
    """The gateway's own IAM policy: assume the recgw-* roles customers create, nothing else."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "sts:AssumeRole",
                "Resource": "arn:aws:iam::*:role/recgw-*",
            }
        ],
    }


def start_moto(log_dir: Path, port: int | None = None) -> MotoS3:
    port = port or free_port()
    managed = _spawn(
        "moto",
        [_binary("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        # IAM enforcement from the very first request
        {"INITIAL_NO_AUTH_ACTION_COUNT": "0", "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
        log_dir,
    )
    endpoint = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if managed.process.poll() is not None:
            raise RuntimeError(f"moto_server exited; see {managed.log_path}")
        return requests.get(f"{endpoint}/moto-api/data.json", timeout=1).status_code == 200

    try:
        wait_until(ready, 60, "moto_server")
        admin = _bootstrap_moto_admin(endpoint)
    except BaseException:
        managed.stop()
        raise
    return MotoS3(endpoint, admin, managed)


def _bootstrap_moto_admin(endpoint: str) -> AwsKeys:
    """Create the one admin user with auth briefly off, then switch IAM enforcement on for good."""
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=5).raise_for_status()
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="recgw-dev-admin")
        iam.put_user_policy(
            UserName="recgw-dev-admin",
            PolicyName="admin",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="recgw-dev-admin")["AccessKey"]
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=5).raise_for_status()
    return AwsKeys(key["AccessKeyId"], Secret(key["SecretAccessKey"]))


def writer_policy(mount: str, base_path: str) -> str:
    """HCL for the writer: write secrets and manage their metadata, never read a secret."""
    base = base_path.strip("/")
    return f"""\
path "{mount}/data/{base}/*" {{
  capabilities = ["create", "update"]
}}

path "{mount}/metadata/{base}/*" {{
  capabilities = ["create", "update", "read", "delete"]
}}

path "{mount}/destroy/{base}/*" {{
  capabilities = ["update"]
}}
"""


def reader_policy(mount: str, base_path: str) -> str:
    """HCL for the reader (the upload path): read the current secrets, nothing else."""
    base = base_path.strip("/")
    return f"""\
path "{mount}/data/{base}/*" {{
  capabilities = ["read"]
}}
"""


@dataclass(frozen=True)
class VaultIdentities:
    writer: VaultAuth
    reader: VaultAuth


def bootstrap_vault(
    bao: OpenBao,
    mount: str = "secret",
    base_path: str = "recgw/tenants",
    token_ttl: str = "1h",  # noqa: S107 (a duration, not a password)
    *,
    role_suffix: str = "",
    token_max_ttl: str = "24h",  # noqa: S107
) -> VaultIdentities:
    """With the root token: policies, AppRole and the roles recgw-writer/recgw-reader{suffix}.

    Idempotent; every call returns a freshly generated secret_id for each role.
    """
    client = bao.root_client()
    auth_methods = client.sys.list_auth_methods()
    if "approle/" not in auth_methods.get("data", auth_methods):
        # InvalidRequest: enabled meanwhile by another caller
        with contextlib.suppress(hvac.exceptions.InvalidRequest):
            client.sys.enable_auth_method("approle")
    identities = {}
    for kind, policy in (
        ("writer", writer_policy(mount, base_path)),
        ("reader", reader_policy(mount, base_path)),
    ):
        name = f"recgw-{kind}{role_suffix}"
        client.sys.create_or_update_policy(name=name, policy=policy)
        client.auth.approle.create_or_update_approle(
            role_name=name,
            token_policies=[name],
            token_ttl=token_ttl,
            token_max_ttl=token_max_ttl,
            token_type="service",
        )
        role_id = client.auth.approle.read_role_id(role_name=name)["data"]["role_id"]
        secret_id = client.auth.approle.generate_secret_id(role_name=name)["data"]["secret_id"]
        identities[kind] = VaultAuth(
            method="approle", role_id=role_id, secret_id=Secret(secret_id), name=name
        )
    return VaultIdentities(writer=identities["writer"], reader=identities["reader"])


def postgres_bindir() -> Path:
    """Where initdb and pg_ctl are: Debian's newest /usr/lib/postgresql/N/bin, else PATH."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError(
        "PostgreSQL server binaries not found; install them: apt-get install -y postgresql"
    )


@dataclass
class PostgresCluster:
    """A throwaway PostgreSQL cluster in a temp dir: superuser `recgw`, trust auth, loopback."""

    root: Path
    port: int
    bindir: Path
    run_as: list[str]

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    @property
    def pg_ctl(self) -> str:
        return str(self.bindir / "pg_ctl")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://recgw@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str = "") -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = name or f"recgw_{secrets.token_hex(6)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            [*self.run_as, self.pg_ctl, "-D", str(self.data_dir), "stop", "-m", "immediate", "-w"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(port: int | None = None) -> PostgresCluster:
    """initdb (--no-sync) and start a cluster on 127.0.0.1:port, its unix socket in its dir.

    initdb refuses to run as root, so as root the server runs as the `postgres` user.
    """
    bindir = postgres_bindir()
    root = Path(tempfile.mkdtemp(prefix="recgw-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    cluster = PostgresCluster(root, port or free_port(), bindir, run_as)
    try:
        initdb = [str(bindir / "initdb"), "-D", str(cluster.data_dir), "--no-sync", "-U", "recgw"]
        subprocess.run(
            [*run_as, *initdb, "-A", "trust", "-E", "UTF8", "--no-instructions"],
            check=True,
            capture_output=True,
        )
        # fsync off: a test cluster never survives a crash anyway; commits stay synchronous.
        server_options = (
            f"-p {cluster.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c synchronous_commit=on"
        )
        start = ["-D", str(cluster.data_dir), "-l", str(cluster.log_path), "-o", server_options]
        subprocess.run(
            [*run_as, cluster.pg_ctl, *start, "-w", "-t", "60", "start"],
            check=True,
            capture_output=True,
        )
    except subprocess.CalledProcessError as exc:
        log = cluster.log_path.read_text() if cluster.log_path.exists() else ""
        cluster.stop()
        raise RuntimeError(
            f"PostgreSQL did not start: {exc.stderr.decode(errors='replace')} {log}"
        ) from None
    except BaseException:
        cluster.stop()
        raise
    return cluster
