"""The local stack really enforces IAM: the seed's PutObject-only policy is all a writer gets;
`recgw dev --replicas 2` runs replicas over PostgreSQL and leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import subprocess
import uuid
from pathlib import Path

import botocore.exceptions
import grpc
import pytest
from recgw.v1 import upload_pb2, upload_pb2_grpc

from recgw_server.dev.stack import MotoS3, OpenBao, free_port, seed_policy, wait_until
from tests.harness import RECGW, MiB, assert_no_secrets, bearer, listening, upload_messages


def test_moto_enforces_the_seed_policy(moto: MotoS3) -> None:
    moto.create_bucket("devstack-check")
    writer = moto.create_user("devstack-writer", seed_policy("devstack-check"))
    s3 = moto.client("s3", writer)
    s3.put_object(Bucket="devstack-check", Key="uploads/a", Body=b"x")
    with pytest.raises(botocore.exceptions.ClientError) as denied:
        s3.get_object(Bucket="devstack-check", Key="uploads/a")
    assert denied.value.response["Error"]["Code"] == "AccessDenied"


def test_openbao_dev_server_answers(openbao: OpenBao) -> None:
    client = openbao.root_client()
    assert client.is_authenticated()
    assert not client.sys.read_seal_status()["sealed"]


def test_recgw_dev_with_two_replicas_resumes_anywhere_and_leaves_nothing(tmp_path: Path) -> None:
    """`recgw dev --replicas 2` as a person runs it: two `recgw serve` processes over a
    throwaway PostgreSQL; an upload started on replica 1 is read and finished on replica 2;
    SIGTERM stops every process and removes the cluster."""
    port = free_port(consecutive=2)  # replica 2 listens on port + 1
    s3_port, vault_port = free_port(), free_port()
    env_file = tmp_path / "dev.env"
    args = [
        RECGW, "dev", "--replicas", "2", "--port", str(port), "--s3-port", str(s3_port),
        "--vault-port", str(vault_port), "--metrics-port", "0",
        "--data-dir", str(tmp_path / "dev"), "--env-file", str(env_file),
    ]  # fmt: skip
    output = tmp_path / "dev.out"
    with output.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:

        def up() -> bool:
            assert process.poll() is None, output.read_text()
            return env_file.exists() and "RECGW_POSTGRES_URL" in env_file.read_text()

        wait_until(up, 120, "recgw dev --replicas 2")
        env = {
            key: shlex.split(value)[0]
            for key, value in (line.split("=", 1) for line in env_file.read_text().splitlines())
        }
        addresses = env["RECGW_ADDRESSES"].split(",")
        assert addresses == [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]
        assert env["RECGW_BALANCED_TARGET"] == "ipv4:" + ",".join(addresses)
        banner = output.read_text()
        for address in addresses:
            assert address in banner
        assert "round_robin" in banner and env["RECGW_BALANCED_TARGET"] in banner
        metadata = bearer(env["RECGW_TOKEN"])
        data = os.urandom(12 * MiB)  # dev parts are 8 MiB: part 1 commits, 1 MiB is dropped
        upload_id = str(uuid.uuid4())
        first = upload_messages(
            env["RECGW_TENANT"], "replicas/call.bin", data[: 9 * MiB], finish=False,
            upload_id=upload_id,
        )  # fmt: skip
        with grpc.insecure_channel(addresses[0]) as one, grpc.insecure_channel(addresses[1]) as two:
            with pytest.raises(grpc.RpcError) as ended:
                upload_pb2_grpc.UploadServiceStub(one).Upload(first, metadata=metadata, timeout=60)
            assert ended.value.code() == grpc.StatusCode.ABORTED  # no finish_write: stays open
            on_two = upload_pb2_grpc.UploadServiceStub(two)
            status = on_two.GetUploadStatus(
                upload_pb2.GetUploadStatusRequest(upload_id=upload_id), metadata=metadata
            )
            assert (status.state, status.committed_size) == (
                upload_pb2.UPLOAD_STATE_OPEN,
                8 * MiB,
            )
            rest = list(
                upload_messages(
                    env["RECGW_TENANT"], "replicas/call.bin", data[8 * MiB :], upload_id=upload_id
                )
            )
            for message in rest:
                message.write_offset += 8 * MiB
            response = on_two.Upload(iter(rest), metadata=metadata, timeout=60)
            assert (response.size, response.part_count) == (len(data), 2)
            assert response.checksums.sha256 == hashlib.sha256(data).digest()
            done = upload_pb2_grpc.UploadServiceStub(one).GetUploadStatus(
                upload_pb2.GetUploadStatusRequest(upload_id=upload_id), metadata=metadata
            )
            assert (done.state, done.result.key) == (
                upload_pb2.UPLOAD_STATE_COMPLETE,
                "uploads/replicas/call.bin",
            )
        pids = [int(pid) for pid in env["RECGW_REPLICA_PIDS"].split(",")]
        postgres_dir = Path(env["RECGW_POSTGRES_DIR"])
        postgres_port = int(env["RECGW_POSTGRES_URL"].rsplit(":", 1)[1].split("/")[0])
        assert postgres_dir.is_dir() and listening(postgres_port)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not postgres_dir.exists()
    for used in (port, port + 1, s3_port, vault_port, postgres_port):
        assert not listening(used), f"port {used} is still served"
    assert_no_secrets(output.read_text())
