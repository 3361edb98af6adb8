"""A fault-injecting HTTP proxy of our own, between the adapter (a real process) and the real HAPI server.

It forwards every request to HAPI unchanged unless a fault is set. Faults a real server cannot produce on
demand, each the way an operator meets it:

* `refuse()` / `resume()`: nothing listens (connection refused); open connections are cut too.
* `fail(status)`: answer e.g. 503 without forwarding (a gateway in front of a dead server).
* `close()`: accept the request, close the connection without forwarding or answering.
* `delay(seconds)`: forward, then answer late (a slow server).
* `truncate()`: forward (HAPI commits), then send the headers and half the body and close.
* `close_after_forward()`: forward (HAPI commits), then close without answering.
* `freeze(seconds)`: forward (HAPI commits), then hold the connection past the client's read timeout.

`only` limits a fault to requests with these methods (e.g. POST: transactions and searches via POST, so
use `path` to pick transactions, which go to the base URL), `contains` to bodies holding these bytes, `times`
to the first N matching requests.
Runs in the test process on 127.0.0.1 (threads); it never talks to anything but HAPI.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
              "proxy-authenticate", "content-length"}
"""Not forwarded. Host is: HAPI builds its paging links from it, so they point back at the proxy (as behind a
reverse proxy that preserves the Host header)."""


@dataclass
class Fault:
    kind: str = "pass"
    status: int = 503
    seconds: float = 0.0
    only: tuple[str, ...] = ()
    path: str | None = None
    times: int | None = None
    contains: bytes | None = None

    def applies(self, method: str, path: str, body: bytes) -> bool:
        if self.kind == "pass":
            return False
        if self.only and method not in self.only:
            return False
        if self.contains is not None and self.contains not in body:
            return False
        if self.path is not None and path.split("?")[0].rstrip("/") != self.path.rstrip("/"):
            return False
        return self.times is None or self.times > 0


class FaultProxy:
    def __init__(self, upstream: str, port: int = 0) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.base_path = parts.path.rstrip("/")
        self.fault = Fault()
        self.log: list[tuple[float, str, str, str]] = []
        """(time, method, path, what happened) for every request."""
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = port
        self.resume()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    # -- faults ----------------------------------------------------------------------------------------------

    def set(self, kind: str, **options: Any) -> None:
        with self._lock:
            self.fault = Fault(kind, **options)

    def clear(self) -> None:
        self.set("pass")

    def fail(self, status: int = 503, **options: Any) -> None:
        self.set("status", status=status, **options)

    def delay(self, seconds: float, **options: Any) -> None:
        self.set("delay", seconds=seconds, **options)

    def close(self, **options: Any) -> None:
        self.set("close", **options)

    def truncate(self, **options: Any) -> None:
        self.set("truncate", **options)

    def close_after_forward(self, **options: Any) -> None:
        self.set("close_after_forward", **options)

    def freeze(self, seconds: float, **options: Any) -> None:
        self.set("freeze", seconds=seconds, **options)

    def refuse(self) -> None:
        """Stop listening and cut every open connection: the adapter meets "connection refused"."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._connections.clear()

    def resume(self) -> None:
        """Listen again on the same port."""
        if self._server is not None:
            return
        handler = self._handler()
        for _ in range(50):
            try:
                server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
                break
            except OSError:  # the old socket may linger for a moment
                time.sleep(0.1)
        else:
            raise RuntimeError(f"fault proxy cannot listen on port {self.port} again")
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="fault-proxy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.refuse()

    def count(self, what: str) -> int:
        with self._lock:
            return sum(1 for entry in self.log if entry[3] == what)

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _take(self, method: str, path: str, body: bytes) -> Fault:
        with self._lock:
            fault = self.fault
            if not fault.applies(method, path, body):
                return Fault()
            if fault.times is not None:
                fault.times -= 1
            return Fault(fault.kind, fault.status, fault.seconds)

    def _record(self, method: str, path: str, what: str) -> None:
        with self._lock:
            self.log.append((time.monotonic(), method, path, what))

    def _forward(self, method: str, path: str, headers: dict[str, str],
                 body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=300)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            return response.status, kept, payload
        finally:
            conn.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._connections.add(self.connection)

            def finish(self) -> None:
                with contextlib.suppress(OSError):
                    super().finish()
                with proxy._lock:
                    proxy._connections.discard(self.connection)

            def _drop(self) -> None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _handle(self) -> None:
                try:
                    self._proxy()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the adapter gave up on this request (its timeout)

            def _proxy(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                method, path = self.command, self.path
                fault = proxy._take(method, path, body)
                proxy._record(method, path, fault.kind)
                if fault.kind == "close":
                    self._drop()
                    return
                if fault.kind == "status":
                    payload = b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"transient",' \
                              b'"diagnostics":"fault proxy: upstream unavailable"}]}'
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}  # Host included
                headers["Content-Length"] = str(len(body))
                status, kept, payload = proxy._forward(method, path, headers, body)
                if fault.kind == "close_after_forward":
                    self._drop()
                    return
                if fault.kind == "freeze":
                    time.sleep(fault.seconds)
                    self._drop()
                    return
                if fault.kind == "delay":
                    time.sleep(fault.seconds)
                self.send_response(status)
                for name, value in kept:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if fault.kind == "truncate":
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self._drop()
                    return
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle

        return Handler
