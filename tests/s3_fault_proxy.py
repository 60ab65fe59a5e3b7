"""An HTTP proxy between the gateway and moto that records requests and injects AWS's answers.

moto is not AWS in a few ways that matter for never losing a recording: it answers a repeated
CompleteMultipartUpload with 200 where AWS answers 404 NoSuchUpload (the upload is gone once
completed), and it cannot lose a response. Tests put this proxy between the gateway and moto and
give it rules: each request is matched against the rules in order, and the first rule that
matches decides: forward it, forward it and then drop the answer (the connection closes as if
the network failed), hold it until released (then forward it, or answer it itself), or answer it
itself.

It also works as an HTTP forward proxy (a gateway process with `HTTP_PROXY` pointing at it sends
absolute-form request lines): every request goes to moto whatever its URL names, so each replica
of a multi-process test can have a recording proxy of its own.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class SeenRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)  # when it arrived

    @property
    def part_number(self) -> int:
        """The part number of an UploadPart (0 for other requests)."""
        return int(self.query.get("partNumber", ["0"])[0])

    @property
    def operation(self) -> str:
        """The S3 operation, as far as these tests need to tell them apart."""
        if self.method == "POST" and "uploadId" in self.query:
            return "CompleteMultipartUpload"
        if self.method == "POST" and "uploads" in self.query:
            return "CreateMultipartUpload"
        if self.method == "PUT" and "partNumber" in self.query:
            return "UploadPart"
        if self.method == "PUT":
            return "PutObject"
        if self.method == "HEAD":
            return "HeadObject"
        if self.method == "GET" and "attributes" in self.query:
            return "GetObjectAttributes"
        if self.method == "DELETE" and "uploadId" in self.query:
            return "AbortMultipartUpload"
        return f"{self.method} {self.path}"


@dataclass
class Rule:
    """What to do with the `times` next requests of `operation` (None: every one).

    `hold_then_answer` holds the request until released and then answers it itself (what AWS
    would have said by then) instead of forwarding it. `when` narrows the requests matched;
    `answered` is set once the proxy has answered (or moto has, for forwarded requests).
    """

    operation: str
    action: str  # "forward", "drop_answer", "hold", "hold_then_answer", "answer"
    times: int | None = 1
    status: int = 200
    body: bytes = b""
    when: Callable[[SeenRequest], bool] | None = None
    released: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)


def s3_error(code: str, message: str) -> bytes:
    return (
        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
        f"<Message>{message}</Message></Error>"
    ).encode()


class S3FaultProxy:
    """Forwards 127.0.0.1:port to moto, applying the rules."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rules: list[Rule] = []
        self.seen: list[SeenRequest] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def count(self, operation: str) -> int:
        with self._lock:
            return sum(1 for r in self.seen if r.operation == operation)

    def seen_since(self, moment: float) -> list[SeenRequest]:
        """The requests that arrived after `moment` (time.monotonic())."""
        with self._lock:
            return [r for r in self.seen if r.at > moment]

    def close(self) -> None:
        for rule in self.rules:
            rule.released.set()
        self._server.shutdown()
        self._server.server_close()

    def _rule_for(self, seen: SeenRequest) -> Rule | None:
        with self._lock:
            self.seen.append(seen)
            for rule in self.rules:
                if (
                    rule.operation == seen.operation
                    and (rule.times is None or rule.times > 0)
                    and (rule.when is None or rule.when(seen))
                ):
                    if rule.times is not None:
                        rule.times -= 1
                    return rule
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if self.headers.get("Expect", "").lower() == "100-continue":
                    self.send_response_only(100)
                    self.end_headers()
                body = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                seen = SeenRequest(
                    self.command,
                    url.path,
                    parse_qs(url.query, keep_blank_values=True),
                    dict(self.headers.items()),
                )
                rule = proxy._rule_for(seen)
                if rule is not None:
                    rule.arrived.set()
                if rule is not None and rule.action in ("hold", "hold_then_answer"):
                    rule.released.wait(60)
                if rule is not None and rule.action in ("answer", "hold_then_answer"):
                    self._reply(rule.status, {"Content-Type": "application/xml"}, rule.body)
                    rule.answered.set()
                    return
                status, headers, answer = self._forward(body)
                if rule is not None:
                    rule.answered.set()
                if rule is not None and rule.action == "drop_answer":
                    self.close_connection = True
                    self.connection.close()  # the answer is lost on its way back
                    return
                self._reply(status, headers, answer)

            def _forward(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
                connection = http.client.HTTPConnection(*proxy._upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                url = urlsplit(self.path)  # origin-form, also for a forward proxy's absolute-form
                target = url.path + (f"?{url.query}" if url.query else "")
                connection.request(self.command, target, body=body, headers=headers)
                response = connection.getresponse()
                answer = response.read()
                result = dict(response.getheaders())
                connection.close()
                return response.status, result, answer

            def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler


ProxyFactory = Callable[[], S3FaultProxy]
