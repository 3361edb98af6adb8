"""An in-process, fault-injecting HTTP server for the FHIR client's unit tests.

It exists for what a real FHIR server cannot be made to do on demand: answer 429/503 with a chosen
``Retry-After``, drop a connection mid-request, hand out a paging link to another host, serve a
CapabilityStatement of another FHIR version, or play a SMART token endpoint. Behaviour against a
real server is covered by the HAPI integration tests.

It is a stdlib ``ThreadingHTTPServer`` bound to 127.0.0.1 on an ephemeral port (optionally TLS),
running in a daemon thread; it never touches any other network.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

FHIR_JSON = "application/fhir+json"


@dataclass
class Reply:
    """What to answer: a status, a body (dict -> JSON), headers; ``drop`` closes without answering."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = FHIR_JSON
    drop: bool = False


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    target: str
    headers: HTTPMessage
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode()).items()}


Responder = Reply | Callable[[Seen], Reply]


def outcome(text: str, code: str = "processing", severity: str = "error") -> dict[str, Any]:
    """A one-issue OperationOutcome like HAPI's."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": text}],
    }


class FaultServer:
    """Scripted HTTP server: ``on(method, path, *replies)`` queues replies; the last one repeats."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[Seen] = []
        self.errors: list[BaseException] = []
        self._routes: dict[tuple[str, str], list[Responder]] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self.origin = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.url = f"{self.origin}/fhir"  # FHIR base, like HAPI's
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.01,), name="fault-server", daemon=True
        )

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        if self.errors and exc[0] is None:
            raise AssertionError(f"fault server responder failed: {self.errors[0]!r}") from self.errors[0]

    def on(self, method: str, path: str, *replies: Responder) -> None:
        """Answer ``method path`` (path without query, e.g. ``/fhir/Patient``) with ``replies`` in turn."""
        with self._lock:
            self._routes[(method.upper(), path)] = list(replies)

    def seen(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        """Requests received, optionally filtered."""
        with self._lock:
            return [
                r for r in self.requests if (method is None or r.method == method) and (path is None or r.path == path)
            ]

    def _next_reply(self, request: Seen) -> Reply:
        with self._lock:
            self.requests.append(request)
            queue = self._routes.get((request.method, request.path))
            if not queue:
                return Reply(404, outcome(f"no route for {request.method} {request.path}", "not-found"))
            responder = queue.pop(0) if len(queue) > 1 else queue[0]
        if not callable(responder):
            return responder
        try:
            return responder(request)
        except Exception as exc:  # surface a failed in-responder assertion to the test, not just a 500
            with self._lock:
                self.errors.append(exc)
            return Reply(500, outcome(f"fault server responder failed: {exc!r}"))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                reply = server._next_reply(Seen(self.command, self.path, self.headers, body))
                if reply.drop:
                    self.close_connection = True
                    self.connection.close()
                    return
                if isinstance(reply.body, dict | list):
                    payload = json.dumps(reply.body).encode()
                elif isinstance(reply.body, str):
                    payload = reply.body.encode()
                else:
                    payload = reply.body or b""
                self.send_response(reply.status)
                if payload:
                    self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(payload)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle

        return Handler
