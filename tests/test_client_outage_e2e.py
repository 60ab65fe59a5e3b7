"""The Python client and the CLI through outages, against the real gateway and stack.

An outage here is a loopback proxy in front of the gateway that resets every open connection
and then refuses new ones (accepts and resets them at once), until the test lifts it. Time is
scaled down by configuration: backoff 50-200 ms, outage tolerances of seconds; the outage
lasts as long as the test's events need (a live source read to its end while the gateway is
unreachable, reconnects refused), never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import recgw_client.uploads
from recgw_client import RecgwError, RetryPolicy
from recgw_client import sync as client
from recgw_client._retained import RetainedBuffer
from recgw_server.dev.stack import MotoS3, wait_until
from tests.harness import RECGW, UPLOADER_TOKEN, GatewayThread, MiB, Tenant, read_object
from tests.test_lifecycle import status

_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class OutageProxy:
    """Forwards loopback connections to the gateway; ``down()`` starts an outage."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._down = threading.Event()
        self.refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            if self._down.is_set():
                self.refused += 1
                _reset(downstream)
                continue
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [downstream, upstream]
            for source, target in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        """Reset every connection and refuse new ones."""
        self._down.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _reset(sock)

    def up(self) -> None:
        self._down.clear()

    def close(self) -> None:
        self._listener.close()
        self.down()


@pytest.fixture
def outage_proxy(gateway: GatewayThread) -> Iterator[OutageProxy]:
    proxy = OutageProxy(gateway.port)
    yield proxy
    proxy.close()


def fast_retries(outage_tolerance: float) -> RetryPolicy:
    return RetryPolicy(initial_backoff=0.05, max_backoff=0.2, outage_tolerance=outage_tolerance)


class LiveRecording:
    """A recorder's output: ``before`` bytes, a pause until the outage began, then the rest
    as fast as the client takes it (in 1 MiB chunks)."""

    def __init__(self, data: bytes, before: int) -> None:
        self.data = data
        self.before = before
        self.outage = threading.Event()
        self.finished = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        for offset in range(0, len(self.data), MiB):
            if offset == self.before:
                assert self.outage.wait(60)
            yield self.data[offset : offset + MiB]
        self.finished.set()


class Tracked(RetainedBuffer):
    instances: list[RetainedBuffer] = []  # noqa: RUF012 - a test hook

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        Tracked.instances.append(self)


def start_outage(
    gateway: GatewayThread, proxy: OutageProxy, recording: LiveRecording, upload_id: str
) -> None:
    """Once the gateway has committed a part and received everything before the pause."""
    wait_until(
        lambda: (
            status(gateway, upload_id).received_size == recording.before
            and status(gateway, upload_id).committed_size >= 5 * MiB
        ),
        30,
        f"{recording.before} bytes at the gateway",
    )
    proxy.down()
    recording.outage.set()


def test_a_live_source_is_spilled_to_disk_through_an_outage_and_finished(
    gateway: GatewayThread,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    outage_proxy: OutageProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(recgw_client.uploads, "RetainedBuffer", Tracked)
    Tracked.instances = []
    tenant = new_tenant(gateway=gateway)
    data = os.urandom(16 * MiB)
    recording = LiveRecording(data, before=7 * MiB)
    upload_id = str(uuid.uuid4())
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            client.upload,
            outage_proxy.address,
            UPLOADER_TOKEN,
            recording,
            tenant.tenant_id,
            "outage.webm",
            upload_id=upload_id,
            retain_limit=2 * MiB,
            spill_limit=32 * MiB,
            spill_dir=spill_dir,
            retry_policy=fast_retries(outage_tolerance=60),
        )
        start_outage(gateway, outage_proxy, recording, upload_id)
        # The recorder never waits: all of it is read while the gateway is unreachable,
        # and the client keeps trying to reconnect meanwhile.
        assert recording.finished.wait(60)
        wait_until(lambda: outage_proxy.refused >= 2, 30, "reconnects during the outage")
        [retained] = Tracked.instances
        assert retained.disk_size >= 16 * MiB - 7 * MiB - 2 * MiB
        fd = retained.spill_fd
        assert fd is not None and os.fstat(fd).st_nlink == 0
        assert list(spill_dir.iterdir()) == []
        assert not future.done()
        outage_proxy.up()
        result = future.result(timeout=120)
    assert result.size == len(data)
    assert result.checksums.sha256 == hashlib.sha256(data).digest()
    assert read_object(moto, tenant.bucket, result.key) == data
    assert retained.spill_fd is None


def test_an_outage_longer_than_the_tolerance_gives_up_and_the_upload_can_still_finish(
    gateway: GatewayThread,
    moto: MotoS3,
    new_tenant: Callable[..., Tenant],
    outage_proxy: OutageProxy,
    tmp_path: Path,
) -> None:
    tenant = new_tenant(gateway=gateway)
    data = os.urandom(12 * MiB)
    recording = LiveRecording(data, before=7 * MiB)
    upload_id = str(uuid.uuid4())
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            client.upload,
            outage_proxy.address,
            UPLOADER_TOKEN,
            recording,
            tenant.tenant_id,
            "gave-up.webm",
            upload_id=upload_id,
            retry_policy=fast_retries(outage_tolerance=1.5),
        )
        start_outage(gateway, outage_proxy, recording, upload_id)
        down_at = time.monotonic()
        with pytest.raises(RecgwError) as caught:
            future.result(timeout=60)
    # Not before 1.5 s without progress, then the last error of the retries.
    assert time.monotonic() - down_at >= 1.5
    assert caught.value.code.name == "UNAVAILABLE" and caught.value.upload_id == upload_id
    assert outage_proxy.refused >= 2
    # Nothing committed was given up: the upload is open at its committed size, and the
    # recording's file finishes it.
    left = status(gateway, upload_id)
    assert left.committed_size == 5 * MiB
    path = tmp_path / "gave-up.webm"
    path.write_bytes(data)
    outage_proxy.up()
    result = client.upload(
        outage_proxy.address,
        UPLOADER_TOKEN,
        path,
        tenant.tenant_id,
        "gave-up.webm",
        upload_id=upload_id,
        retry_policy=fast_retries(outage_tolerance=30),
    )
    assert result.checksums.sha256 == hashlib.sha256(data).digest()
    assert read_object(moto, tenant.bucket, result.key) == data


def test_cli_killed_mid_upload_is_finished_with_upload_id(
    gateway: GatewayThread, moto: MotoS3, new_tenant: Callable[..., Tenant], tmp_path: Path
) -> None:
    tenant = new_tenant(gateway=gateway)
    data = os.urandom(12 * MiB)
    upload_id = str(uuid.uuid4())
    env = {**os.environ, "RECGW_ADDRESS": gateway.address, "RECGW_TOKEN": UPLOADER_TOKEN}
    args = ["upload", "--tenant", tenant.tenant_id, "--name", "killed.webm", "--upload-id"]
    recorder = subprocess.Popen(
        [RECGW, *args, upload_id, "-", "-q"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert recorder.stdin is not None
        recorder.stdin.write(data[: 7 * MiB])
        recorder.stdin.flush()
        wait_until(
            lambda: status(gateway, upload_id).committed_size == 5 * MiB,
            30,
            "a part committed",
        )
        recorder.send_signal(signal.SIGKILL)
        recorder.wait(10)
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait()
        if recorder.stdin is not None:
            with contextlib.suppress(OSError):
                recorder.stdin.close()
    path = tmp_path / "killed.webm"
    path.write_bytes(data)

    def recgw(*extra: str, stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [RECGW, *args, upload_id, *extra],
            stdin=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    # From a pipe, the committed bytes cannot be skipped: it says what to give instead.
    with path.open("rb") as file:
        cat = subprocess.Popen(["cat"], stdin=file, stdout=subprocess.PIPE)
        assert cat.stdout is not None
        piped = recgw("-", "-q", stdin=cat.stdout)
        cat.stdout.close()  # recgw read none of it: cat ends on the broken pipe
        cat.wait(10)
    assert piped.returncode == 1
    assert "SOURCE_NOT_SEEKABLE" in piped.stderr
    assert f"--source-offset {5 * MiB}" in piped.stderr
    finished = recgw(str(path), "--json", "-q")
    assert finished.returncode == 0, finished.stderr
    assert f"continuing at byte {5 * MiB}" in finished.stderr
    assert json.loads(finished.stdout)["sha256"] == hashlib.sha256(data).hexdigest()
    assert read_object(moto, tenant.bucket, "uploads/killed.webm") == data
    assert UPLOADER_TOKEN not in piped.stderr + finished.stdout + finished.stderr
