"""Never lose a recording: truthful completion, takeover of silent streams, salvage, spooling.

Where moto does not answer like AWS, a proxy of the tests' own (tests/s3_fault_proxy.py) sits
between the gateway and moto and gives AWS's answers; each test says which.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from recgw.v1 import upload_pb2

from recgw_server.api.services import FIRST_READ_RESERVATION
from recgw_server.dev.stack import MotoS3, wait_until
from recgw_server.pipeline.digest import crc32c, expected_multipart_etag
from tests.harness import (
    UPLOADER,
    GatewayThread,
    MiB,
    Tenant,
    error_info,
    read_object,
    resume_messages,
    set_credentials,
    upload,
    upload_messages,
)
from tests.s3_fault_proxy import Rule, S3FaultProxy, s3_error


@pytest.fixture
def s3proxy(moto: MotoS3) -> Iterator[S3FaultProxy]:
    proxy = S3FaultProxy(moto.endpoint_url)
    yield proxy
    proxy.close()


def proxied_tenant(
    gateway: GatewayThread,
    new_tenant: Callable[..., Tenant],
    proxy: S3FaultProxy,
    policy: dict[str, Any] | None = None,
    bucket: str = "",
    **target: Any,
) -> Tenant:
    tenant = new_tenant(policy=policy, bucket=bucket)
    set_credentials(gateway, tenant, endpoint_url=proxy.endpoint_url, **target)
    return tenant


def status(gateway: GatewayThread, upload_id: str) -> upload_pb2.GetUploadStatusResponse:
    response: upload_pb2.GetUploadStatusResponse = gateway.uploads.GetUploadStatus(
        upload_pb2.GetUploadStatusRequest(upload_id=upload_id), metadata=UPLOADER, timeout=10
    )
    return response


def with_metadata_read(bucket: str) -> dict[str, Any]:
    """The seed's policy plus the optional grant `recgw policy --allow-confirm` prints
    (s3:GetObject, which HeadObject needs)."""
    from recgw_server.policy import identity_policy

    return identity_policy(bucket, "uploads/", allow_confirm=True)


# -- 1. the truth about completion ------------------------------------------------------------


def test_lost_complete_answer_is_unconfirmed_never_aborted(
    gateway: GatewayThread,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    s3proxy: S3FaultProxy,
) -> None:
    """S3 completes the object but its answer is lost; the gateway repeats the completion itself
    (botocore must not), and the repeat is answered NoSuchUpload, as AWS answers it (moto would
    say 200): the upload is COMPLETION_UNCONFIRMED with the expected ETag, never ABORTED."""
    tenant = proxied_tenant(gateway, new_tenant, s3proxy)
    s3proxy.add(Rule("CompleteMultipartUpload", "drop_answer"))
    s3proxy.add(
        Rule(
            "CompleteMultipartUpload",
            "answer",
            status=404,
            body=s3_error("NoSuchUpload", "The specified upload does not exist."),
        )
    )
    data = os.urandom(11 * MiB + 3)
    response = upload(gateway, upload_messages(tenant.tenant_id, "lost-answer.bin", data))
    assert response.unconfirmed
    assert response.size == len(data)
    assert response.checksums.crc32c == crc32c(data)
    assert response.checksums.sha256 == hashlib.sha256(data).digest()
    assert s3proxy.count("CompleteMultipartUpload") == 2  # one attempt each, no SDK retry
    head = moto.client("s3").head_object(Bucket=tenant.bucket, Key="uploads/lost-answer.bin")
    assert response.etag == head["ETag"]  # the expected ETag is the real one
    assert read_object(moto, tenant.bucket, "uploads/lost-answer.bin") == data
    state = status(gateway, response.upload_id)
    assert state.state == upload_pb2.UPLOAD_STATE_COMPLETION_UNCONFIRMED
    assert state.result.unconfirmed
    # Finishing again is idempotent: the same answer, not an error.
    again = upload(
        gateway,
        [
            upload_pb2.UploadRequest(
                start=upload_pb2.UploadStart(
                    tenant_id=tenant.tenant_id,
                    object_name="lost-answer.bin",
                    upload_id=response.upload_id,
                ),
                write_offset=len(data),
                finish_write=True,
            )
        ],
    )
    assert again.unconfirmed and again.etag == response.etag


def test_lost_complete_answer_is_confirmed_with_a_metadata_read(
    gateway: GatewayThread,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    s3proxy: S3FaultProxy,
) -> None:
    """With the optional HeadObject grant the gateway confirms the object: plain COMPLETE."""
    bucket = f"recgw-{uuid.uuid4().hex[:10]}"
    moto.create_bucket(bucket)
    tenant = proxied_tenant(
        gateway, new_tenant, s3proxy, policy=with_metadata_read(bucket), bucket=bucket
    )
    s3proxy.add(Rule("CompleteMultipartUpload", "drop_answer"))
    s3proxy.add(
        Rule(
            "CompleteMultipartUpload",
            "answer",
            status=404,
            body=s3_error("NoSuchUpload", "The specified upload does not exist."),
        )
    )
    data = os.urandom(6 * MiB)
    response = upload(gateway, upload_messages(tenant.tenant_id, "confirmed.bin", data))
    assert not response.unconfirmed
    assert s3proxy.count("HeadObject") == 1
    state = status(gateway, response.upload_id)
    assert state.state == upload_pb2.UPLOAD_STATE_COMPLETE
    assert read_object(moto, tenant.bucket, "uploads/confirmed.bin") == data


def test_lost_put_object_answer_is_unconfirmed(
    gateway: GatewayThread,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    s3proxy: S3FaultProxy,
) -> None:
    """The single-PutObject path: the conditional write lands, its answer is lost, and the
    gateway's repeat meets 412 (If-None-Match: *) for its own object: unconfirmed, not
    ALREADY_EXISTS."""
    tenant = proxied_tenant(gateway, new_tenant, s3proxy)
    s3proxy.add(Rule("PutObject", "drop_answer"))
    data = os.urandom(1000)
    response = upload(gateway, upload_messages(tenant.tenant_id, "small-lost.bin", data))
    assert response.unconfirmed
    assert response.part_count == 0
    assert s3proxy.count("PutObject") == 2
    assert read_object(moto, tenant.bucket, "uploads/small-lost.bin") == data


def test_existing_object_on_first_completion_is_still_already_exists(
    gateway: GatewayThread,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    s3proxy: S3FaultProxy,
) -> None:
    """A 412 to the first completion attempt is another object at the key: ALREADY_EXISTS."""
    tenant = proxied_tenant(gateway, new_tenant, s3proxy)
    upload(gateway, upload_messages(tenant.tenant_id, "taken.bin", b"first"))
    with pytest.raises(grpc.RpcError) as caught:
        upload(gateway, upload_messages(tenant.tenant_id, "taken.bin", b"second"))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(caught.value)[0] == "OBJECT_EXISTS"
    assert read_object(moto, tenant.bucket, "uploads/taken.bin") == b"first"


# -- 2. takeover of silent streams -------------------------------------------------------------


class StallingProxy:
    """A TCP proxy that can freeze: it stops forwarding but keeps every connection open, as a
    frozen peer or a middlebox dropping packets does (no RST, no FIN)."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.flowing = threading.Event()
        self.flowing.set()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self.flowing.wait()
                target.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.flowing.set()
        self._listener.close()
        for sock in self._sockets:
            sock.close()


def test_silent_stream_is_taken_over_within_seconds(
    make_gateway: Callable[..., GatewayThread],
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
) -> None:
    """The writer's connection stalls (no RST/FIN). A resume through another connection is
    refused while the old stream may still be alive, and takes over once it has been silent
    for the takeover time (2 s here): the old stream ends, the upload finishes byte-exact."""
    small = make_gateway(uploads={"takeover_after_seconds": 2.0})
    tenant = new_tenant(gateway=small)
    stalling = StallingProxy(small.port)
    channel = grpc.insecure_channel(stalling.address)
    from recgw.v1 import upload_pb2_grpc

    stub = upload_pb2_grpc.UploadServiceStub(channel)
    upload_id = str(uuid.uuid4())
    data = os.urandom(8 * MiB)
    first_part = 6 * MiB

    def stalled_stream() -> Iterator[upload_pb2.UploadRequest]:
        yield from upload_messages(
            tenant.tenant_id, "stalled.bin", data[:first_part], upload_id=upload_id, finish=False
        )
        # Heartbeats while the connection flows; once it is frozen, nothing arrives.
        for _ in range(300):
            time.sleep(0.1)
            yield upload_pb2.UploadRequest(write_offset=first_part)

    old = stub.Upload.future(stalled_stream(), metadata=UPLOADER, timeout=60)
    try:
        wait_until(
            lambda: status(small, upload_id).committed_size == 5 * MiB, 30, "part 1 committed"
        )
        stalling.flowing.clear()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            upload(small, resume_messages(tenant, "stalled.bin", data, upload_id, 5 * MiB))
        assert caught.value.code() == grpc.StatusCode.ABORTED
        assert error_info(caught.value)[0] == "ANOTHER_WRITER"

        def resumed() -> upload_pb2.UploadResponse | None:
            try:
                return upload(
                    small, resume_messages(tenant, "stalled.bin", data, upload_id, 5 * MiB)
                )
            except grpc.RpcError as error:
                assert error_info(error)[0] == "ANOTHER_WRITER", error
                return None

        deadline = time.monotonic() + 20
        response = None
        while response is None and time.monotonic() < deadline:
            response = resumed()
        assert response is not None and response.size == len(data)
        assert time.monotonic() - started < 10  # seconds, not a minute
        assert small.gateway.metrics.takeovers._value.get() == 1
        assert read_object(moto, tenant.bucket, "uploads/stalled.bin") == data
    finally:
        stalling.close()
        channel.close()
        old.cancel()


# -- 4. salvage ---------------------------------------------------------------------------------


def open_stream(
    gateway: GatewayThread, tenant: Tenant, name: str, data: bytes, upload_id: str
) -> tuple[Any, threading.Event]:
    """A stream that sends `data` without finishing, and ends (client cancel) when told."""
    done = threading.Event()

    def messages() -> Iterator[upload_pb2.UploadRequest]:
        yield from upload_messages(tenant.tenant_id, name, data, upload_id=upload_id, finish=False)
        done.wait(60)

    future = gateway.uploads.Upload.future(messages(), metadata=UPLOADER, timeout=60)
    return future, done


def end_stream_after(gateway: GatewayThread, upload_id: str, received: int, future: Any) -> None:
    wait_until(lambda: status(gateway, upload_id).received_size == received, 30, "data received")
    future.cancel()
    wait_until(
        lambda: (
            status(gateway, upload_id).received_size == status(gateway, upload_id).committed_size
        ),
        30,
        "the stream to detach",
    )


def test_salvage_upload_keeps_the_committed_parts(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    """SalvageUpload on demand, with the default policy: the committed bytes become the object,
    the note beside it says so, and the checksums are those of exactly those bytes."""
    tenant = new_tenant(gateway=gateway)
    upload_id = str(uuid.uuid4())
    data = os.urandom(7 * MiB)
    future, _ = open_stream(gateway, tenant, "crashed.webm", data, upload_id)
    wait_until(lambda: status(gateway, upload_id).committed_size == 5 * MiB, 30, "part 1")
    end_stream_after(gateway, upload_id, len(data), future)
    response = gateway.uploads.SalvageUpload(
        upload_pb2.SalvageUploadRequest(upload_id=upload_id), metadata=UPLOADER, timeout=30
    )
    kept = data[: 5 * MiB]
    assert response.state == upload_pb2.UPLOAD_STATE_SALVAGED
    assert response.result.size == len(kept)
    assert response.result.checksums.crc32c == crc32c(kept)
    assert response.result.checksums.sha256 == hashlib.sha256(kept).digest()
    assert read_object(moto, tenant.bucket, "uploads/crashed.webm") == kept
    note = json.loads(read_object(moto, tenant.bucket, "uploads/crashed.webm.salvaged.json"))
    assert note["salvaged"] is True and note["size"] == len(kept)
    assert note["crc32c"] == f"{crc32c(kept):08x}"
    assert status(gateway, upload_id).state == upload_pb2.UPLOAD_STATE_SALVAGED
    with pytest.raises(grpc.RpcError) as caught:
        upload(gateway, resume_messages(tenant, "crashed.webm", data, upload_id, 5 * MiB))
    assert error_info(caught.value)[0] == "UPLOAD_ENDED"


def test_salvage_policy_keeps_buffered_bytes_and_salvages_on_expiry(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    """Policy `salvage`: when the stream ends without finish_write, the bytes after the committed
    parts go to S3 as a short last part; when the upload expires, everything received is kept."""
    tenant = new_tenant(gateway=gateway, abandoned_uploads=2)
    upload_id = str(uuid.uuid4())
    data = os.urandom(7 * MiB + 123)
    future, _ = open_stream(gateway, tenant, "expired.webm", data, upload_id)
    end_stream_after(gateway, upload_id, len(data), future)
    manager = gateway.gateway.manager
    later = time.time() + manager.settings.idle_timeout + 60
    expired = gateway.run(manager.expire_idle(later))
    assert upload_id in expired
    final = status(gateway, upload_id)
    assert final.state == upload_pb2.UPLOAD_STATE_SALVAGED
    assert final.result.size == len(data)
    assert final.result.checksums.crc32c == crc32c(data)
    assert read_object(moto, tenant.bucket, "uploads/expired.webm") == data


def test_a_resume_after_a_kept_tail_continues_as_if_nothing_happened(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    """The kept tail is not committed: a resuming stream writes that part again."""
    tenant = new_tenant(gateway=gateway, abandoned_uploads=2)
    upload_id = str(uuid.uuid4())
    data = os.urandom(12 * MiB)
    future, _ = open_stream(gateway, tenant, "resumed.webm", data[: 7 * MiB], upload_id)
    end_stream_after(gateway, upload_id, 7 * MiB, future)
    assert status(gateway, upload_id).committed_size == 5 * MiB
    response = upload(gateway, resume_messages(tenant, "resumed.webm", data, upload_id, 5 * MiB))
    assert response.size == len(data)
    assert read_object(moto, tenant.bucket, "uploads/resumed.webm") == data


# -- live calls: slow streams spool to disk ---------------------------------------------------


def test_slow_streams_spool_to_disk_and_stay_byte_exact(
    make_gateway: Callable[..., GatewayThread],
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
) -> None:
    """Twenty slow live streams (16 KiB messages) whose parts take longer than spill_after to
    fill: their bytes move to the spool, memory stays far below a part per stream, every
    object is byte-exact and no spool file is left."""
    live = make_gateway(uploads={"spill_after_seconds": 0.2, "memory_budget_mib": 64})
    tenant = new_tenant(gateway=live)
    streams = 20
    payloads = [os.urandom(6 * MiB + i) for i in range(streams)]
    pause = threading.Event()

    def slow(index: int) -> Iterator[upload_pb2.UploadRequest]:
        messages = list(
            upload_messages(tenant.tenant_id, f"live-{index}.webm", payloads[index], chunk=16384)
        )
        for number, message in enumerate(messages):
            if number % 16 == 0:
                pause.wait(0.05)  # 20 pauses per 5 MiB part: a part takes a second to fill
            yield message

    futures = [
        live.uploads.Upload.future(slow(i), metadata=UPLOADER, timeout=120) for i in range(streams)
    ]
    results = [f.result(timeout=120) for f in futures]
    assert [r.size for r in results] == [len(p) for p in payloads]
    assert live.gateway.spool.spilled_parts >= streams
    # Far below a part each: at most what every stream reserved for its first message (before
    # its size is known) when all opened at once; the parts were on disk.
    assert live.gateway.budget.high_water <= streams * FIRST_READ_RESERVATION < streams * 5 * MiB
    for index, payload in enumerate(payloads):
        assert read_object(moto, tenant.bucket, f"uploads/live-{index}.webm") == payload
    assert live.gateway.spool.budget.in_use == 0
    assert not list(live.gateway.spool.directory.iterdir())


def test_spool_files_are_private_and_encrypted_when_asked(tmp_path: Any) -> None:
    from recgw_server.pipeline.buffers import Spool, SpoolFile

    spool = Spool(tmp_path / "spool", 1 << 20, encrypt=True)
    assert (os.stat(spool.directory).st_mode & 0o777) == 0o700
    file = SpoolFile(spool)
    secret = b"customer recording bytes " * 100
    file.append(secret[:1001])
    file.append(secret[1001:])
    assert (os.stat(file.path).st_mode & 0o777) == 0o600
    assert secret[:64] not in file.path.read_bytes()
    assert file.read_at(0, len(secret)) == secret
    assert file.read_at(17, 100) == secret[17:117]
    file.delete()
    assert not file.path.exists()
    # What a crashed process left behind is removed when the next one starts.
    (spool.directory / "stale.part").write_bytes(b"x")
    Spool(tmp_path / "spool", 1 << 20)
    assert not (tmp_path / "spool" / "stale.part").exists()


def test_expected_multipart_etag() -> None:
    md5s = [hashlib.md5(b"a" * 10).hexdigest(), hashlib.md5(b"b").hexdigest()]
    joined = bytes.fromhex(md5s[0]) + bytes.fromhex(md5s[1])
    assert expected_multipart_etag([f'"{m}"' for m in md5s]) == (
        f'"{hashlib.md5(joined).hexdigest()}-2"'
    )


def test_a_frozen_client_is_noticed_within_seconds(
    make_gateway: Callable[..., GatewayThread], new_tenant: Callable[..., Tenant]
) -> None:
    """A SIGSTOPped client keeps its TCP connection but answers no HTTP/2 ping. With keepalive
    1 s + 1 s the gateway ends its stream within seconds (it took a minute before: gRPC waited
    for a ping's ack for `grpc.http2.ping_timeout_ms`, 60 s by default, not the keepalive
    timeout); the upload stays open for a resume."""
    import subprocess
    import sys

    from tests.harness import UPLOADER_TOKEN

    gateway = make_gateway(server={"keepalive_time_seconds": 1, "keepalive_timeout_seconds": 1})
    tenant = new_tenant(gateway=gateway)
    upload_id = str(uuid.uuid4())
    frozen = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.frozen_client",
            gateway.address,
            UPLOADER_TOKEN,
            tenant.tenant_id,
            upload_id,
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert frozen.stdout is not None and frozen.stdout.readline().strip() == b"sent"
        started = time.monotonic()
        uploads = gateway.gateway.manager

        def detached() -> bool:
            upload = uploads._uploads.get(upload_id)
            return upload is not None and not upload.attached

        wait_until(detached, 30, "the frozen client's stream to end")
        assert time.monotonic() - started < 10
        assert status(gateway, upload_id).state == upload_pb2.UPLOAD_STATE_OPEN
    finally:
        frozen.kill()
        frozen.wait()
