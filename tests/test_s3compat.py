"""What only a strict S3 enforces, against MinIO (`make test-s3compat`; skipped with moto).

moto accepts a part whose x-amz-checksum-crc32c does not match its bytes, a wrong FULL_OBJECT
CRC32C on CompleteMultipartUpload and If-None-Match on an existing key; MinIO refuses them like
S3 does (400 and 412). These tests show that the gateway turns each refusal into the right
status. The corrupted byte is flipped on the wire by a proxy of the test's own between the
gateway and MinIO, after the gateway computed its checksum.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest
from awscrt import checksums

from recgw_server.dev.stack import MotoS3
from recgw_server.domain import ErrorKind, RecgwError, StorageTarget, TenantCredentials
from recgw_server.storage.base import BytesBody, ObjectSpec, WrittenPart
from recgw_server.storage.s3 import S3ObjectStore, S3Settings
from tests.harness import (
    GatewayThread,
    MiB,
    Tenant,
    details,
    expect_error,
    object_exists,
    set_credentials,
    upload_messages,
)

pytestmark = pytest.mark.minio_only("moto does not verify these checksums and conditions")


class CorruptingProxy:
    """Forwards to an S3 endpoint and flips one bit of the request stream at byte `at` of the
    first connection that gets that far (inside a request body: headers are far shorter)."""

    def __init__(self, upstream_port: int, at: int) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._at = at
        self._lock = threading.Lock()
        self.flipped = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, corrupt: bool) -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if corrupt and seen <= self._at < seen + len(data):
                    with self._lock:
                        if not self.flipped:
                            self.flipped = True
                            index = self._at - seen
                            data = data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]
                seen += len(data)
                target.sendall(data)
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def corrupting_proxy(moto: MotoS3) -> Iterator[Callable[[int], CorruptingProxy]]:
    port = int(moto.endpoint_url.rsplit(":", 1)[1])
    made: list[CorruptingProxy] = []

    def make(at: int) -> CorruptingProxy:
        made.append(CorruptingProxy(port, at))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


@pytest.mark.parametrize("size", [300_000, 7 * MiB])
def test_a_bit_flipped_on_the_way_to_s3_is_data_loss_and_no_object(
    gateway: GatewayThread,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    corrupting_proxy: Callable[[int], CorruptingProxy],
    size: int,
) -> None:
    proxy = corrupting_proxy(200_000)  # inside the PutObject body, or the first part's
    tenant = new_tenant()
    set_credentials(gateway, tenant, endpoint_url=f"http://127.0.0.1:{proxy.port}")
    name = f"flipped-{size}.bin"
    error = expect_error(gateway, upload_messages(tenant.tenant_id, name, os.urandom(size)))
    assert proxy.flipped
    assert error.code() == grpc.StatusCode.DATA_LOSS, details(error)
    assert "S3 refused corrupted data" in details(error)
    assert not object_exists(moto, tenant.bucket, f"uploads/{name}")


def tenant_writer_credentials(moto: MotoS3, tenant: Tenant) -> TenantCredentials:
    target = StorageTarget(
        region=moto.region,
        bucket=tenant.bucket,
        endpoint_url=moto.endpoint_url,
        force_path_style=True,
    )
    return TenantCredentials(
        tenant.tenant_id, tenant.keys.access_key_id, tenant.keys.secret_access_key, target
    )


def complete_with(
    moto: MotoS3, tenant: Tenant, key: str, *, object_crc_offset: int, if_none_match: bool
) -> None:
    """Through the gateway's own S3 adapter: one multipart upload of two correct parts, then
    Complete with the whole object's CRC32C off by `object_crc_offset`."""

    async def run() -> None:
        store = S3ObjectStore(S3Settings(max_attempts=1))
        try:
            writer = await store.writer_for(tenant_writer_credentials(moto, tenant))
            spec = ObjectSpec(key, "application/octet-stream", {}, if_none_match)
            upload_id = await writer.create_multipart_upload(spec)
            bodies = [os.urandom(5 * MiB), os.urandom(1000)]
            parts: list[WrittenPart] = []
            for number, body in enumerate(bodies, start=1):
                parts.append(
                    await writer.upload_part(
                        key, upload_id, number, BytesBody(body), checksums.crc32c(body)
                    )
                )
            whole = checksums.crc32c(b"".join(bodies))
            wrong = (whole + object_crc_offset) % 2**32
            await writer.complete_multipart_upload(spec, upload_id, parts, wrong)
        finally:
            store.close()

    asyncio.run(run())


def test_a_wrong_full_object_crc32c_on_complete_is_data_loss(
    moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant()
    with pytest.raises(RecgwError) as caught:
        complete_with(
            moto, tenant, "uploads/wrong-crc.bin", object_crc_offset=1, if_none_match=False
        )
    assert caught.value.kind is ErrorKind.DATA_LOSS, caught.value.message
    assert not object_exists(moto, tenant.bucket, "uploads/wrong-crc.bin")


def test_a_conditional_complete_over_an_existing_key_is_already_exists(
    moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    tenant = new_tenant()
    key = "uploads/taken.bin"
    moto.client("s3").put_object(Bucket=tenant.bucket, Key=key, Body=b"first")
    with pytest.raises(RecgwError) as caught:
        complete_with(moto, tenant, key, object_crc_offset=0, if_none_match=True)
    assert caught.value.kind is ErrorKind.ALREADY_EXISTS, caught.value.message
    stored = moto.client("s3").get_object(Bucket=tenant.bucket, Key=key)["Body"].read()
    assert stored == b"first"
