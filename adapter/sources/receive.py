"""The notification receiver: a WSGI application that turns HTTP requests into durable work items.

Routes (`{base}` is `ReceiverSettings.base_path`, `/notify` by default):

* `POST {base}`                    topic notification Bundle, engine Procedure/Bundle, or empty rest-hook ping
* `PUT {base}/Procedure/{id}`      classic rest-hook with payload (create/update)
* `DELETE {base}/Procedure/{id}`   classic rest-hook with payload (delete)
* `GET /healthz`                   200 `{"status": "ok", ...}`; 503 `{"status": "unavailable", "reasons": [...]}`
                                   when the adapter cannot make progress (see adapter.health)
* `GET /metrics`                   Prometheus text format 0.0.4
* anything else                    404 (unknown path) or 405 (known path, wrong method; `Allow` is sent)

A notification request goes through, in this order: routing (404/405), bearer token (401, with
`WWW-Authenticate: Bearer`; a wrong token is 401 `invalid_token` too, never 403, because any valid token
grants everything there is), size limit (413 before the body is read when Content-Length is too big, else
after reading at most limit + 1 bytes), HMAC signature when configured (401), parsing (400/415/422, see
adapter.sources.notifications), and `state.enqueue` (503 if the state cannot be written within
`request_timeout`, so the sender retries). Only then is 2xx sent: an acknowledged notification is on disk
and survives a crash; while the state cannot be written, nothing is acknowledged. Errors are OperationOutcomes whose
diagnostics say what was wrong without echoing the body (PHI) or any credential.

Statuses decided here (body parsing statuses are listed in adapter.sources.notifications):

* 200  accepted (also handshakes and heartbeats, which queue nothing): OperationOutcome "queued N item(s)"
* 400  `invalid` Content-Length not a number; `incomplete` body shorter than its Content-Length
* 401  `login` no bearer token; `security` wrong token (`error="invalid_token"`) or missing/wrong X-Signature
* 404  `not-found` unknown path (including other resource types than Procedure under `{base}`)
* 405  `not-supported` wrong method for a known path (with `Allow`)
* 413  `too-long` body over `max_body_bytes`
* 500  `exception` a bug (logged with its traceback; the sender retries)
* 503  `transient` the state cannot be written (with `Retry-After: 5`; the sender retries)

`serve_app` runs the application in waitress with bounds a slow or hostile client cannot outlast: a
connection limit, a deadline for a request's headers and one for its body (counted from its first byte,
so trickling one byte at a time does not help), and an idle timeout; see `ServeSettings`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import waitress

# Beyond waitress's public API (create_server): the channel class and its `received`, the server's
# `maintenance`, `active_channels` and socket map, the trigger. These are internals, so pyproject.toml pins
# waitress to the 3.0 series the tests run (tests/unit/test_receive.py: slow headers and bodies, stop_server).
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, MultiSocketServer
from waitress.trigger import trigger as WaitressTrigger

from adapter.errors import ListenError, ReceiveError, StateError
from adapter.health import Health
from adapter.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from adapter.metrics import Metrics
from adapter.redact import scrub
from adapter.sources.notifications import (
    Received,
    decode_resource,
    engine_post,
    is_topic_notification,
    parse_topic_notification,
    rest_hook_delete,
    rest_hook_ping,
    rest_hook_put,
    subscription_of,
)
from adapter.state.base import StateBackend, WorkItem

log = logging.getLogger("adapter.receive")

FHIR_JSON = "application/fhir+json; charset=utf-8"
DEFAULT_MAX_BODY = 5 * 1024 * 1024
_READ_CHUNK = 64 * 1024
_RETRY_AFTER_SECONDS = "5"
_CHALLENGE = 'Bearer realm="charge-adapter"'
_ROUTE_METHODS = {"notify": ("POST",), "procedure": ("PUT", "DELETE"), "healthz": ("GET",), "metrics": ("GET",)}

WaitressServer = BaseWSGIServer | MultiSocketServer


@dataclass(frozen=True, kw_only=True)
class ReceiverSettings:
    """How the receiver authenticates and bounds requests.

    A bearer token is required unless `allow_anonymous` is set explicitly (only sensible behind a proxy that
    authenticates); a configured token is always enforced. With `hmac_secret`, every notification request
    must also carry `X-Signature: sha256=<hex HMAC-SHA256 of the raw body>` (HAPI cannot sign bodies: use it
    for integration engines).
    """

    token: str | None = None
    allow_anonymous: bool = False
    hmac_secret: bytes | None = field(default=None, repr=False)
    base_path: str = "/notify"
    max_body_bytes: int = DEFAULT_MAX_BODY
    request_timeout: float = 5.0
    """The longest a notification waits for the state before it is answered 503."""

    def __post_init__(self) -> None:
        if self.token is not None and not self.token.strip():
            raise ValueError("receiver token is empty")
        if self.token is None and not self.allow_anonymous:
            raise ValueError("receiver token is required (or set allow_anonymous=True explicitly)")
        if self.hmac_secret is not None and not self.hmac_secret:
            raise ValueError("receiver HMAC secret is empty")
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        if not self.request_timeout > 0:
            raise ValueError("request_timeout must be positive")
        base = "/" + self.base_path.strip().strip("/") if self.base_path.strip().strip("/") else ""
        if base in ("/healthz", "/metrics") or not re.fullmatch(r"(/[A-Za-z0-9._~\-]+)*", base):
            raise ValueError(f"invalid receiver base_path {self.base_path!r}")
        object.__setattr__(self, "base_path", base)

    def __repr__(self) -> str:  # never show the token in logs or tracebacks
        return (f"ReceiverSettings(token={'***' if self.token else None}, allow_anonymous={self.allow_anonymous}, "
                f"hmac={'on' if self.hmac_secret else 'off'}, base_path={self.base_path!r}, "
                f"max_body_bytes={self.max_body_bytes})")


def operation_outcome(severity: str, code: str, diagnostics: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}


class Receiver:
    """The WSGI application (see the module docstring); thread-safe, one instance per process."""

    def __init__(self, store: StateBackend, settings: ReceiverSettings | None, metrics: Metrics,
                 on_enqueued: Callable[[], None] | None = None, health: Health | None = None) -> None:
        self.store = store
        self.health = health
        self.settings = settings or ReceiverSettings(allow_anonymous=True)
        self.notifications = settings is not None
        """Without settings only /healthz and /metrics answer (what `run` serves)."""
        self.metrics = metrics
        self.on_enqueued = on_enqueued
        # serialises read-last-event-number -> enqueue -> store-event-number, so concurrent notifications of
        # one subscription cannot hide a gap from each other
        self._events_lock = threading.Lock()
        self._token = settings.token.encode("utf-8") if settings and settings.token else None

    # -- WSGI entry point -------------------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        path = re.sub("/{2,}", "/", str(environ.get("PATH_INFO") or "/"))
        try:
            route, resource_id = self._route(path)
            allowed = _ROUTE_METHODS[route]
            if method not in allowed:
                raise ReceiveError(405, "not-supported", f"{method[:16]} is not allowed on {path}; use "
                                   f"{', '.join(allowed)}")
            if route == "healthz":
                return self._healthz(start_response)
            if route == "metrics":
                body = self.metrics.render().encode("utf-8")
                return _send(start_response, 200, body, METRICS_CONTENT_TYPE)
            return self._notification(environ, start_response, method, path, resource_id)
        except ReceiveError as exc:
            return self._reject(start_response, method, path, exc)
        except Exception:
            log.exception("%s %s -> 500 (internal error)", method, scrub(path))
            return self._reject(start_response, method, path,
                                ReceiveError(500, "exception", "internal error; see the adapter log"), logged=True)

    def _route(self, path: str) -> tuple[str, str | None]:
        if path == "/healthz":
            return "healthz", None
        if path == "/metrics":
            return "metrics", None
        if not self.notifications:
            raise ReceiveError(404, "not-found", "no such endpoint; this process serves /healthz and /metrics only")
        base = self.settings.base_path
        if path in (base, base + "/"):
            return "notify", None
        prefix = base + "/Procedure/"
        if path.startswith(prefix):
            resource_id = path[len(prefix):].rstrip("/")
            if resource_id and "/" not in resource_id:
                return "procedure", resource_id
        raise ReceiveError(404, "not-found", f"no such endpoint; notifications go to POST {base or '/'} or "
                           f"PUT/DELETE {base}/Procedure/{{id}}")

    # -- notification requests ----------------------------------------------------------------------------

    def _notification(self, environ: WSGIEnvironment, start_response: StartResponse, method: str, path: str,
                      resource_id: str | None) -> Iterable[bytes]:
        self._authenticate(environ)
        body = self._read_body(environ)
        self._verify_signature(environ, body)
        content_type = environ.get("CONTENT_TYPE") or None
        if method == "PUT":
            assert resource_id is not None
            received = rest_hook_put(resource_id, decode_resource(body, content_type))
            self._enqueue(received.items)
        elif method == "DELETE":
            assert resource_id is not None
            received = rest_hook_delete(resource_id)
            self._enqueue(received.items)
        elif not body:
            received = rest_hook_ping()
            self._enqueue(received.items)
        else:
            resource = decode_resource(body, content_type)
            if is_topic_notification(resource):
                received = self._topic(resource)
            else:
                received = engine_post(resource)
                self._enqueue(received.items)
        self._count(received)
        count = len(received.items)
        log.info("%s %s -> 200 %s, %d item(s) queued", method, scrub(path), received.kind, count)
        outcome = operation_outcome("information", "informational", f"{received.kind}: queued {count} item(s)")
        return _send(start_response, 200, _json(outcome), FHIR_JSON)

    def _topic(self, bundle: dict[str, Any]) -> Received:
        subscription = subscription_of(bundle)
        with self._events_lock:
            last = self._store(self.store.last_event_number, subscription)
            topic = parse_topic_notification(bundle, last)
            highest = topic.highest_event_number
            event = (subscription, highest) if highest is not None and (last is None or highest > last) else None
            self._enqueue(topic.items, event)  # the items and the event number in one transaction
        return Received(topic.type, topic.items)

    def _authenticate(self, environ: WSGIEnvironment) -> None:
        if self._token is None:
            return
        scheme, _, credentials = str(environ.get("HTTP_AUTHORIZATION", "")).strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise ReceiveError(401, "login", "a bearer token is required (Authorization: Bearer <token>)")
        try:
            given = credentials.strip().encode("latin-1")  # WSGI carries header bytes as latin-1 text
        except UnicodeEncodeError:
            given = b""
        if not hmac.compare_digest(given, self._token):
            raise ReceiveError(401, "security", "the bearer token is not valid",
                               headers=(("WWW-Authenticate", f'{_CHALLENGE}, error="invalid_token"'),))

    def _verify_signature(self, environ: WSGIEnvironment, body: bytes) -> None:
        secret = self.settings.hmac_secret
        if secret is None:
            return
        header = str(environ.get("HTTP_X_SIGNATURE", "")).strip()
        if not header:
            raise ReceiveError(401, "security", "X-Signature (sha256=<hex HMAC of the body>) is required")
        algorithm, _, signature = header.partition("=")
        expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode("ascii")
        try:
            given = signature.strip().lower().encode("ascii")
        except UnicodeEncodeError:
            given = b""
        if algorithm.strip().lower() != "sha256" or not hmac.compare_digest(given, expected):
            raise ReceiveError(401, "security", "X-Signature does not match the body")

    def _read_body(self, environ: WSGIEnvironment) -> bytes:
        """The body, never more than max_body_bytes (+1 to detect the overflow when no length is sent)."""
        limit = self.settings.max_body_bytes
        stream = environ.get("wsgi.input")
        raw_length = str(environ.get("CONTENT_LENGTH") or "").strip()
        if raw_length:
            if not raw_length.isdigit():
                raise ReceiveError(400, "invalid", "Content-Length is not a number")
            length = int(raw_length)
            if length > limit:
                raise ReceiveError(413, "too-long", f"body of {length} bytes exceeds the limit of {limit} bytes")
            body = _read(stream, length)
            if len(body) < length:
                raise ReceiveError(400, "incomplete", "the body is shorter than its Content-Length")
            return body
        body = _read(stream, limit + 1)
        if len(body) > limit:
            raise ReceiveError(413, "too-long", f"body exceeds the limit of {limit} bytes")
        return body

    def _enqueue(self, items: list[WorkItem], event: tuple[str, int] | None = None) -> None:
        """Persist, then wake the workers; an exception in the wake-up does not undo the acknowledgement."""
        if not items and event is None:
            return
        self._store(lambda: self.store.enqueue(items, event=event, timeout=self.settings.request_timeout))
        if not items:
            return
        if self.on_enqueued is not None:
            try:
                self.on_enqueued()
            except Exception:
                log.warning("on_enqueued callback failed (the work is queued and will be picked up)",
                            exc_info=True)

    def _store(self, call: Callable[..., Any], *args: Any) -> Any:
        """A state call; a state that cannot be used answers 503 (the sender retries), never 2xx."""
        try:
            result = call(*args)
        except StateError as exc:
            log.error("cannot persist the notification: %s", exc)
            if self.health is not None:
                self.health.state_failed(exc.reason)
            raise ReceiveError(503, "transient", "the adapter cannot store notifications right now; retry later") \
                from None
        if self.health is not None:
            self.health.state_ok()
        return result

    # -- responses ----------------------------------------------------------------------------------------

    def _count(self, received: Received) -> None:
        self.metrics.inc("charge_adapter_received_total", kind=received.kind)
        for item in received.items:
            self.metrics.inc("charge_adapter_enqueued_total", kind=item.kind)

    def _healthz(self, start_response: StartResponse) -> Iterable[bytes]:
        """The health board's verdict (no state access while answering); without one, the queue depth."""
        if self.health is not None:
            verdict = self.health.check()
            status = 200 if verdict.ok else 503
            headers = [] if verdict.ok else [("Retry-After", _RETRY_AFTER_SECONDS)]
            return _send(start_response, status, _json(verdict.body), "application/json", headers)
        try:
            depth = self.store.queue_depth()
        except StateError as exc:
            log.warning("healthz: %s", exc)
            return _send(start_response, 503, _json({"status": "unavailable", "reasons": [str(exc)]}),
                         "application/json", [("Retry-After", _RETRY_AFTER_SECONDS)])
        return _send(start_response, 200, _json({"status": "ok", "queue_depth": depth}), "application/json")

    def _reject(self, start_response: StartResponse, method: str, path: str, exc: ReceiveError, *,
                logged: bool = False) -> Iterable[bytes]:
        headers = list(exc.headers)
        if exc.status == 401 and not any(name == "WWW-Authenticate" for name, _ in headers):
            headers.append(("WWW-Authenticate", _CHALLENGE))
        elif exc.status == 405:
            route = self._route_or_none(path)
            if route:
                headers.append(("Allow", ", ".join(_ROUTE_METHODS[route])))
        elif exc.status == 503:
            headers.append(("Retry-After", _RETRY_AFTER_SECONDS))
        if path not in ("/healthz", "/metrics"):
            self.metrics.inc("charge_adapter_rejected_total", status=exc.status)
        if not logged:
            log.info("%s %s -> %d %s: %s", method, scrub(path), exc.status, exc.code, exc.message)
        outcome = operation_outcome("error" if exc.status < 500 else "fatal", exc.code, exc.message)
        return _send(start_response, exc.status, _json(outcome), FHIR_JSON, headers)

    def _route_or_none(self, path: str) -> str | None:
        try:
            return self._route(path)[0]
        except ReceiveError:
            return None


def make_app(store: StateBackend, settings: ReceiverSettings | None, metrics: Metrics,
             on_enqueued: Callable[[], None] | None = None, health: Health | None = None) -> WSGIApplication:
    """The receiver as a WSGI application; `on_enqueued` is called after each successful enqueue. Without
    `settings`, only /healthz and /metrics (what `run` serves)."""
    return Receiver(store, settings, metrics, on_enqueued, health)


def _read(stream: Any, limit: int) -> bytes:
    """Up to `limit` bytes; loops because a WSGI input stream may return short reads."""
    if stream is None or limit <= 0:
        return b""
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = stream.read(min(remaining, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode("utf-8")


def _send(start_response: StartResponse, status: int, body: bytes, content_type: str,
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    start_response(f"{status} {HTTPStatus(status).phrase}",
                   [("Content-Type", content_type), ("Content-Length", str(len(body))),
                    ("Cache-Control", "no-store"), *(headers or [])])
    return [body]


# -- serving -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerLimits:
    """What one client may hold of the server (see `ServeSettings` for the config keys)."""

    threads: int = 4
    connection_limit: int = 500
    header_timeout: float = 10.0
    """A request's headers must be complete this long after its first byte."""
    body_timeout: float = 30.0
    """Its body must be complete this long after its headers."""
    idle_timeout: float = 60.0
    """A connection without a request in progress is closed after this long."""
    max_body_bytes: int = DEFAULT_MAX_BODY


class GuardedChannel(HTTPChannel):
    """A waitress channel that remembers when its request in progress started and when its headers ended."""

    request_started: float | None = None
    headers_done: float | None = None
    _tracked: int = 0

    def received(self, data: bytes) -> bool:
        result = super().received(data)
        request = self.request
        if request is None:
            self.request_started = self.headers_done = None
            return result
        now = time.monotonic()
        if id(request) != self._tracked:  # a new request began (possibly right after a complete one)
            self._tracked, self.request_started, self.headers_done = id(request), now, None
        if request.headers_finished and self.headers_done is None:
            self.headers_done = now
        return result


def _guard(server: BaseWSGIServer, limits: ServerLimits, on_timeout: Callable[[], None] | None) -> None:
    """Close connections whose request does not arrive in time (waitress itself only knows idle time, which a
    client trickling one byte every few seconds never reaches)."""
    server.channel_class = GuardedChannel
    original = server.maintenance

    def maintenance(now: float) -> None:
        original(now)
        clock = time.monotonic()
        for channel in list(server.active_channels.values()):
            started = getattr(channel, "request_started", None)
            request = channel.request
            if started is None or request is None or request.completed or channel.will_close:
                continue
            headers_done = channel.headers_done
            late = clock - started > limits.header_timeout if headers_done is None \
                else clock - headers_done > limits.body_timeout
            if late:
                log.info("closing a connection from %s: its request did not arrive in time",
                         (channel.addr or ("?",))[0])
                channel.will_close = True
                if on_timeout is not None:
                    on_timeout()

    server.maintenance = maintenance  # type: ignore[method-assign]


def serve_app(app: WSGIApplication, host: str = "127.0.0.1", port: int = 8080, threads: int = 4, *,
              max_body_bytes: int = DEFAULT_MAX_BODY, limits: ServerLimits | None = None,
              metrics: Metrics | None = None, **adjustments: Any) -> WaitressServer:
    """A waitress server for `app`, bound but not yet serving: call `run()` (blocks) in a thread.

    Port 0 picks a free port (see `bound_addresses`). waitress buffers whole bodies before calling the app, so
    its own limit is set a little above the app's: the app still answers oversize bodies with an
    OperationOutcome, and a runaway sender cannot fill the disk. Connections are bounded by `limits`; a port
    that cannot be bound raises ListenError. Stop it with `stop_server`.
    """
    limits = limits or ServerLimits(threads=threads, max_body_bytes=max_body_bytes)
    options: dict[str, Any] = {
        "ident": "charge-adapter", "max_request_body_size": 2 * limits.max_body_bytes + 65536,
        "channel_timeout": max(1, math.ceil(limits.idle_timeout)), "connection_limit": limits.connection_limit,
        "cleanup_interval": 1, "asyncore_use_poll": True, **adjustments}
    try:
        server = waitress.create_server(app, host=host, port=port, threads=limits.threads, **options)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    timed_out = (lambda: metrics.inc("charge_adapter_rejected_total", status="timeout")) if metrics else None
    servers = [obj for obj in server.map.values() if isinstance(obj, BaseWSGIServer)] \
        if isinstance(server, MultiSocketServer) else [server]
    for one in servers:
        _guard(one, limits, timed_out)
    return server


def bound_addresses(server: WaitressServer) -> list[tuple[str, int]]:
    """(host, port) of every listening socket; a host name such as `localhost` may give two (IPv4 + IPv6)."""
    if isinstance(server, MultiSocketServer):
        return [(str(h), int(p)) for h, p in server.effective_listen]
    return [(str(server.effective_host), int(server.effective_port))]


def stop_server(server: WaitressServer, timeout: float = 5.0) -> None:
    """Close every socket and stop waitress's worker threads, from any thread; `run()` then returns.

    The sockets are closed inside the server's own loop (through its trigger), because closing them from
    another thread can make the loop's select() fail. A request in flight may lose its connection: its sender
    retries, and what was already enqueued is on disk (processing is idempotent).
    """
    socket_map: dict[int, Any] = server.map if isinstance(server, MultiSocketServer) else server._map
    closed = threading.Event()

    def close_all() -> None:
        wasyncore.close_all(socket_map, ignore_all=True)
        closed.set()

    trigger = next((obj for obj in list(socket_map.values()) if isinstance(obj, WaitressTrigger)), None)
    if trigger is not None:
        with contextlib.suppress(OSError):
            trigger.pull_trigger(close_all)
    if not closed.wait(timeout if trigger is not None else 0):
        close_all()  # the loop is not running (never started, or already ended)
    server.task_dispatcher.shutdown(timeout=timeout)
