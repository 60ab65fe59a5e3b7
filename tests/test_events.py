"""Signed completion events: delivered at least once to a real HTTP receiver on loopback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from recgw.v1 import upload_pb2

from recgw_server.dev.stack import MotoS3, free_port, wait_until
from tests.harness import (
    CANARIES,
    UPLOADER,
    GatewayThread,
    MiB,
    ServedGateway,
    Tenant,
    set_credentials,
    upload,
    upload_messages,
)

SECRET = "whsec-CANARY-" + uuid.uuid4().hex
CANARIES.add(SECRET)


class Receiver:
    """A webhook receiver that checks signatures; it can fail on purpose or be down."""

    def __init__(self, port: int = 0, failures: int = 0) -> None:
        self.events: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []
        self.attempts = 0
        self.failures = failures
        self.bad_signatures = 0
        self.arrived = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.attempts += 1
                if receiver.failures > 0:
                    receiver.failures -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                if not receiver.valid(self.headers, body):
                    receiver.bad_signatures += 1
                    self.send_response(400)
                    self.end_headers()
                    return
                receiver.bodies.append(body)
                receiver.events.append(json.loads(body))
                receiver.arrived.set()
                self.send_response(204)
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks/recgw"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @staticmethod
    def valid(headers: Any, body: bytes) -> bool:
        """What a receiver does: recompute the Standard Webhooks signature, check the age."""
        event_id, stamp = headers["webhook-id"], headers["webhook-timestamp"]
        expected = hmac.new(
            SECRET.encode(), f"{event_id}.{stamp}.".encode() + body, hashlib.sha256
        ).digest()
        presented = headers["webhook-signature"].removeprefix("v1,")
        fresh = abs(time.time() - int(stamp)) < 300
        return fresh and hmac.compare_digest(base64.b64decode(presented), expected)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def events_settings(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "endpoints": [{"url": url}],
        "secret": SECRET,
        "poll_interval_seconds": 0.1,
        "initial_backoff_seconds": 0.05,
        "max_backoff_seconds": 0.2,
        **extra,
    }


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hooks = Receiver()
    yield hooks
    hooks.close()


def test_completed_upload_is_announced_signed(
    make_gateway: Callable[..., GatewayThread],
    new_tenant: Callable[..., Tenant],
    receiver: Receiver,
) -> None:
    gateway = make_gateway(events=events_settings(receiver.url))
    tenant = new_tenant(gateway=gateway)
    data = os.urandom(6 * MiB + 1)
    response = upload(gateway, upload_messages(tenant.tenant_id, "announced.webm", data))
    wait_until(lambda: receiver.of_type("upload.completed"), 30, "the completion event")
    event = receiver.of_type("upload.completed")[0]
    assert event["id"].startswith("evt_") and event["tenant_id"] == tenant.tenant_id
    assert event["data"]["upload_id"] == response.upload_id
    assert event["data"]["key"] == "uploads/announced.webm"
    assert event["data"]["bucket"] == tenant.bucket
    assert event["data"]["size"] == len(data)
    assert event["data"]["etag"] == response.etag
    assert event["data"]["part_count"] == 2
    assert event["data"]["crc32c"] == f"{response.checksums.crc32c:08x}"
    assert event["data"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert event["data"]["duration_seconds"] >= 0
    assert receiver.bad_signatures == 0
    assert tenant.keys.secret_access_key.reveal().encode() not in receiver.bodies[0]
    assert SECRET.encode() not in receiver.bodies[0]


def test_failing_receiver_gets_it_after_retries(
    make_gateway: Callable[..., GatewayThread],
    new_tenant: Callable[..., Tenant],
) -> None:
    hooks = Receiver(failures=3)
    try:
        gateway = make_gateway(events=events_settings(hooks.url))
        tenant = new_tenant(gateway=gateway)
        response = upload(gateway, upload_messages(tenant.tenant_id, "retried.bin", b"abc"))
        wait_until(lambda: hooks.of_type("upload.completed"), 30, "the event after retries")
        assert hooks.attempts == 4
        assert hooks.events[0]["data"]["upload_id"] == response.upload_id
        sessions = gateway.gateway.adapters.sessions
        wait_until(  # marked delivered once the receiver's answer is in
            lambda: gateway.run(sessions.outbox_counts())["delivered"] == 1, 30, "delivered"
        )
        assert gateway.run(sessions.outbox_counts()) == {"pending": 0, "delivered": 1, "dead": 0}
        metric = gateway.gateway.metrics.webhook_deliveries
        assert metric.labels("failed")._value.get() == 3
    finally:
        hooks.close()


def test_a_receiver_that_never_answers_ends_in_the_dead_letter(
    make_gateway: Callable[..., GatewayThread], new_tenant: Callable[..., Tenant]
) -> None:
    hooks = Receiver(failures=1000)
    try:
        gateway = make_gateway(events=events_settings(hooks.url, max_attempts=3))
        tenant = new_tenant(gateway=gateway)
        upload(gateway, upload_messages(tenant.tenant_id, "dead.bin", b"abc"))
        sessions = gateway.gateway.adapters.sessions
        wait_until(
            lambda: gateway.run(sessions.outbox_counts())["dead"] == 1, 30, "the dead letter"
        )
        assert hooks.attempts == 3
    finally:
        hooks.close()


def test_aborted_and_salvaged_uploads_are_announced(
    make_gateway: Callable[..., GatewayThread],
    new_tenant: Callable[..., Tenant],
    receiver: Receiver,
) -> None:
    gateway = make_gateway(events=events_settings(receiver.url))
    tenant = new_tenant(gateway=gateway)
    aborted_id = str(uuid.uuid4())
    stub = gateway.uploads
    # An upload opened and aborted.
    opened = stub.Upload.future(
        iter(
            list(
                upload_messages(tenant.tenant_id, "a.bin", b"x", upload_id=aborted_id, finish=False)
            )
        ),
        metadata=UPLOADER,
        timeout=30,
    )
    with pytest.raises(grpc.RpcError):
        opened.result(timeout=30)  # ends without finish_write: stays open
    stub.AbortUpload(upload_pb2.AbortUploadRequest(upload_id=aborted_id), metadata=UPLOADER)
    # An upload with a committed part, salvaged.
    salvaged_id = str(uuid.uuid4())
    data = os.urandom(5 * MiB + 10)
    ended = stub.Upload.future(
        iter(
            list(
                upload_messages(
                    tenant.tenant_id, "s.bin", data, upload_id=salvaged_id, finish=False
                )
            )
        ),
        metadata=UPLOADER,
        timeout=30,
    )
    with pytest.raises(grpc.RpcError):
        ended.result(timeout=30)
    stub.SalvageUpload(upload_pb2.SalvageUploadRequest(upload_id=salvaged_id), metadata=UPLOADER)
    wait_until(
        lambda: receiver.of_type("upload.aborted") and receiver.of_type("upload.salvaged"),
        30,
        "the abort and salvage events",
    )
    assert receiver.of_type("upload.aborted")[0]["data"]["upload_id"] == aborted_id
    salvaged = receiver.of_type("upload.salvaged")[0]["data"]
    assert salvaged["upload_id"] == salvaged_id and salvaged["size"] == 5 * MiB


def test_events_survive_a_killed_gateway(
    served: ServedGateway, moto: MotoS3, new_tenant: Callable[..., Tenant]
) -> None:
    """The receiver is down while the upload completes; the gateway is killed with SIGKILL;
    once the receiver is up and the gateway restarted, the event arrives from the outbox."""
    from tests.test_restart import _Channel

    port = free_port()
    served.stop()
    served.env.update(
        RECGW_EVENTS__ENDPOINTS=json.dumps([{"url": f"http://127.0.0.1:{port}/hooks"}]),
        RECGW_EVENTS__SECRET=SECRET,
        RECGW_EVENTS__POLL_INTERVAL_SECONDS="0.1",
        RECGW_EVENTS__INITIAL_BACKOFF_SECONDS="0.05",
        RECGW_EVENTS__MAX_BACKOFF_SECONDS="0.2",
        RECGW_EVENTS__TIMEOUT_SECONDS="1",
    )
    served.start()
    client = _Channel(served.port)
    tenant = new_tenant()
    set_credentials(client, tenant, endpoint_url=moto.endpoint_url)
    response = upload(client, upload_messages(tenant.tenant_id, "kept-event.bin", b"abc"))  # type: ignore[arg-type]
    served.kill()
    hooks = Receiver(port=port)
    try:
        served.start()
        wait_until(lambda: hooks.of_type("upload.completed"), 30, "the event after the restart")
        ids = {e["id"] for e in hooks.events}
        assert len(ids) == 1  # duplicates, if any, carry the same id
        assert hooks.events[0]["data"]["upload_id"] == response.upload_id
    finally:
        hooks.close()
