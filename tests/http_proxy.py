"""A loopback HTTP proxy between the gateway and moto that records requests and can answer them.

Requests are forwarded unchanged (same Host header, so SigV4 signatures stay valid), except for
`Expect: 100-continue`, which SigV4 does not sign and which this proxy answers itself. A test
installs hooks: `answer(request)` may reply instead of moto, `rewrite(request, response)` may
change moto's answer. Both stand for behaviour of AWS that moto lacks, and each test says which.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}
_RECORDED_BODY = 64 * 1024  # bodies of larger requests (parts) are not kept


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def form(self) -> dict[str, str]:
        """The form fields of an STS query request (AssumeRole...)."""
        return {k: v[0] for k, v in urllib.parse.parse_qs(self.body.decode()).items()}

    @property
    def access_key_id(self) -> str:
        """The access key id the request was signed with ('' when unsigned)."""
        auth = self.headers.get("authorization", "")
        _, _, rest = auth.partition("Credential=")
        return rest.split("/", 1)[0]

    @property
    def signing_region(self) -> str:
        _, _, rest = self.headers.get("authorization", "").partition("Credential=")
        parts = rest.split("/")
        return parts[2] if len(parts) > 2 else ""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""


Answer = Callable[[Request], Response | None]
Rewrite = Callable[[Request, Response], Response]


@dataclass
class RecordingProxy:
    """Forwards 127.0.0.1:port to `upstream` (http://host:port) and records every request."""

    upstream: str
    answer: Answer | None = None
    rewrite: Rewrite | None = None
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        target = urllib.parse.urlsplit(self.upstream)
        self._host, self._port = target.hostname or "127.0.0.1", target.port or 80
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def recorded(self, predicate: Callable[[Request], bool]) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if predicate(r)]

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        split = urllib.parse.urlsplit(handler.path)
        request = Request(
            method=handler.command,
            path=split.path,
            query=urllib.parse.parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
        )
        with self._lock:
            self.requests.append(
                Request(request.method, request.path, request.query, request.headers, body)
                if len(body) <= _RECORDED_BODY
                else Request(request.method, request.path, request.query, request.headers, b"")
            )
        response = self.answer(request) if self.answer else None
        if response is None:
            response = self._forward(handler, body)
            if self.rewrite is not None:
                response = self.rewrite(request, response)
        handler.send_response(response.status)
        for name, value in response.headers.items():
            if name.lower() not in _HOP_BY_HOP | {"content-length"}:
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(response.body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(response.body)

    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> Response:
        connection = http.client.HTTPConnection(self._host, self._port, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
            connection.request(handler.command, handler.path, body=body, headers=headers)
            upstream = connection.getresponse()
            data = upstream.read()
            return Response(upstream.status, dict(upstream.getheaders()), data)
        finally:
            connection.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
