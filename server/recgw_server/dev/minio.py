"""MinIO as a fast, stricter S3 for `make bench` and `make test-s3compat`.

A single-drive MinIO server with its data on tmpfs, root keys through the environment, and the
few admin calls the tests need (a user with exactly one policy). MinIO has no IAM API; users and
policies go through its admin API (`/minio/admin/v3`), whose user secrets travel encrypted with
the caller's secret key (madmin's EncryptData: PBKDF2-SHA256 and sio's AES-256-GCM stream).

The binary is built once with `go install` into a cache outside the repository (`make
bench-tools`, which passes its path as RECGW_MINIO_BIN); nothing of MinIO is committed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.credentials
import requests
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from recgw_server.dev.stack import AwsKeys, ManagedProcess, _spawn, free_port, wait_until
from recgw_server.domain import Secret

ACCOUNT_ID = "123456789012"  # MinIO has no accounts; only for ARNs in bucket policies


def tool_binary(name: str) -> str:
    """A binary that `make bench-tools` built; the Makefile passes its path as RECGW_<NAME>_BIN."""
    variable = f"RECGW_{name.upper()}_BIN"
    path = os.environ.get(variable, "")
    if not path or not Path(path).is_file():
        raise RuntimeError(
            f"{name} not found ({variable} is {path or 'unset'}); run `make bench-tools` "
            "or start through `make bench` / `make test-s3compat`"
        )
    return path


def tmpfs_dir(prefix: str) -> Path:
    """A private directory on tmpfs (/dev/shm) where there is one, else in the temp dir."""
    shm = Path("/dev/shm")  # noqa: S108 (mkdtemp below makes a private 0700 directory)
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


# -- madmin's EncryptData ---------------------------------------------------------------------

_PBKDF2_AES_GCM = 0x02
_PBKDF2_COST = 8192
_SIO_FRAGMENT = 16 * 1024


def encrypt_admin_payload(password: str, data: bytes) -> bytes:
    """madmin.EncryptData with its PBKDF2 variant: salt | 0x02 | nonce | sio stream.

    sio seals each 16 KiB fragment with AES-256-GCM under nonce || little-endian sequence
    number; the associated data is a flag byte (0x80 on the final fragment) and the tag of an
    empty seal with sequence number 0.
    """
    salt = secrets.token_bytes(32)
    nonce = secrets.token_bytes(8)
    key = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, _PBKDF2_COST, 32)
    aead = AESGCM(key)

    def nonce_for(sequence: int) -> bytes:
        return nonce + sequence.to_bytes(4, "little")

    header_tag = aead.encrypt(nonce_for(0), b"", None)
    out = [salt, bytes([_PBKDF2_AES_GCM]), nonce]
    fragments = [data[i : i + _SIO_FRAGMENT] for i in range(0, len(data), _SIO_FRAGMENT)]
    fragments = fragments or [b""]
    for sequence, fragment in enumerate(fragments, start=1):
        final = sequence == len(fragments)
        flag = b"\x80" if final else b"\x00"
        out.append(aead.encrypt(nonce_for(sequence), fragment, flag + header_tag))
    return b"".join(out)


# -- the server -------------------------------------------------------------------------------


@dataclass
class MinioS3:
    """A running MinIO: root keys as admin, users with exactly one policy each."""

    endpoint_url: str
    admin: AwsKeys
    managed: ManagedProcess
    data_dir: Path
    region: str = "us-east-1"
    _session: requests.Session = field(default_factory=requests.Session, repr=False)

    def client(self, service: str, keys: AwsKeys | None = None) -> Any:
        if service != "s3":
            raise ValueError(f"MinIO has no {service} API; use create_user/user_arn")
        keys = keys or self.admin
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=keys.access_key_id,
            aws_secret_access_key=keys.secret_access_key.reveal(),
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, bucket: str) -> None:
        self.client("s3").create_bucket(Bucket=bucket)

    def _admin(self, operation: str, query: dict[str, str], body: bytes = b"") -> None:
        url = f"{self.endpoint_url}/minio/admin/v3/{operation}?{urlencode(query)}"
        request = botocore.awsrequest.AWSRequest(method="PUT", url=url, data=body)
        request.headers["X-Amz-Content-Sha256"] = hashlib.sha256(body).hexdigest()
        credentials = botocore.credentials.Credentials(
            self.admin.access_key_id, self.admin.secret_access_key.reveal()
        )
        botocore.auth.SigV4Auth(credentials, "s3", self.region).add_auth(request)
        prepared = request.prepare()
        response = self._session.put(
            prepared.url, data=body, headers=dict(prepared.headers), timeout=30
        )
        if response.status_code != 200:
            # MinIO's error text names the operation, never the secret (it is encrypted).
            raise RuntimeError(
                f"MinIO admin {operation} failed: HTTP {response.status_code} {response.text[:300]}"
            )

    def create_user(self, user_name: str, policy: dict[str, Any]) -> AwsKeys:
        """A user (its access key a random id, as AWS's) holding exactly this policy."""
        alphabet = string.ascii_uppercase + string.digits
        access_key = "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16))
        secret_key = secrets.token_urlsafe(30)
        payload = json.dumps({"secretKey": secret_key, "status": "enabled"}).encode()
        self._admin(
            "add-user",
            {"accessKey": access_key},
            encrypt_admin_payload(self.admin.secret_access_key.reveal(), payload),
        )
        self._admin("add-canned-policy", {"name": user_name}, json.dumps(policy).encode())
        self._admin(
            "set-user-or-group-policy",
            {"policyName": user_name, "userOrGroup": access_key, "isGroup": "false"},
        )
        return AwsKeys(access_key, Secret(secret_key))

    def user_arn(self, user_name: str) -> str:
        # MinIO applies bucket policies to anonymous requests only, so this ARN never matches.
        return f"arn:aws:iam::{ACCOUNT_ID}:user/{user_name}"

    def empty_trash(self) -> None:
        """MinIO moves deleted data to .minio.sys/tmp/.trash and purges it lazily; on tmpfs
        that is memory, so the bench empties it between rounds."""
        trash = self.data_dir / ".minio.sys" / "tmp" / ".trash"
        if trash.is_dir():
            for entry in trash.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def data_bytes(self) -> int:
        """Bytes MinIO holds on its drive (objects, parts, trash)."""
        total = 0
        for root, _, files in os.walk(self.data_dir):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    continue
        return total

    def stop(self) -> None:
        self.managed.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_minio(log_dir: Path, port: int | None = None, data_dir: Path | None = None) -> MinioS3:
    """Start MinIO on loopback with its drive on tmpfs; the root keys go by environment."""
    port = port or free_port()
    data_dir = data_dir or tmpfs_dir("recgw-minio-")
    admin = AwsKeys("recgw-root-" + secrets.token_hex(4), Secret(secrets.token_urlsafe(24)))
    managed = _spawn(
        "minio",
        [
            tool_binary("minio"),
            "server",
            str(data_dir),
            "--address",
            f"127.0.0.1:{port}",
            "--console-address",
            f"127.0.0.1:{free_port()}",
            "--quiet",
        ],
        {
            "MINIO_ROOT_USER": admin.access_key_id,
            "MINIO_ROOT_PASSWORD": admin.secret_access_key.reveal(),
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_REGION": "us-east-1",
            # A static key for SSE-S3 (MinIO answers SSE with 501 without a KMS); new per run.
            "MINIO_KMS_SECRET_KEY": "recgw-dev-key:"
            + base64.b64encode(secrets.token_bytes(32)).decode(),
        },
        log_dir,
    )
    endpoint = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if managed.process.poll() is not None:
            raise RuntimeError(f"minio exited; see {managed.log_path}")
        return requests.get(f"{endpoint}/minio/health/ready", timeout=1).status_code == 200

    try:
        wait_until(ready, 60, "MinIO")
    except BaseException:
        managed.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    return MinioS3(endpoint, admin, managed, data_dir)
