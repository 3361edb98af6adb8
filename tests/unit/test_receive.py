"""The receiver's WSGI app against a real StateStore: what is accepted is queued, what is refused is not."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.types import WSGIApplication
from wsgiref.util import setup_testing_defaults

import pytest
import requests

from adapter.errors import ListenError, StateUnavailable
from adapter.health import Health
from adapter.metrics import Metrics
from adapter.sources.receive import (
    ReceiverSettings,
    ServerLimits,
    bound_addresses,
    make_app,
    serve_app,
    stop_server,
)
from adapter.state.base import WorkItem
from adapter.state.sqlite import SqliteState as StateStore

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FHIR = "application/fhir+json"


def procedure(pid: str = "fna-1") -> dict[str, Any]:
    return {"resourceType": "Procedure", "id": pid, "meta": {"versionId": "1"}, "status": "completed",
            "subject": {"reference": "Patient/p1"}}


class Response:
    def __init__(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = int(status.split()[0])
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def diagnostics(self) -> str:
        outcome = self.json()
        assert outcome["resourceType"] == "OperationOutcome"
        return str(outcome["issue"][0]["diagnostics"])


class NoRead(io.BytesIO):
    """An input stream that must not be read (the request is refused before)."""

    def read(self, size: int | None = -1) -> bytes:
        raise AssertionError("the body was read")


class Counting(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.consumed = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.consumed += len(chunk)
        return chunk


def call(app: WSGIApplication, method: str, path: str, body: bytes | dict[str, Any] = b"", *,
         headers: dict[str, str] | None = None, content_type: str | None = FHIR, length: bool | str = True,
         stream: io.BytesIO | None = None) -> Response:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path}
    setup_testing_defaults(environ)
    environ["wsgi.input"] = stream if stream is not None else io.BytesIO(raw)
    if length is True:
        environ["CONTENT_LENGTH"] = str(len(raw))
    elif length:
        environ["CONTENT_LENGTH"] = length
    if content_type and raw:
        environ["CONTENT_TYPE"] = content_type
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    captured: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured["status"], captured["headers"] = status, response_headers
        return lambda data: None

    out = b"".join(app(environ, start_response))
    return Response(captured["status"], captured["headers"], out)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore(tmp_path / "state.db")
    yield s
    s.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def wakeups() -> list[int]:
    """Queue depth seen by each on_enqueued call (proves it runs after the enqueue)."""
    return []


@pytest.fixture
def app(store: StateStore, metrics: Metrics, wakeups: list[int]) -> WSGIApplication:
    return make_app(store, ReceiverSettings(token=TOKEN, max_body_bytes=4096), metrics,
                    on_enqueued=lambda: wakeups.append(store.queue_depth()))


def queued(store: StateStore) -> list[tuple[str, dict[str, Any], str]]:
    return [(i.kind, i.payload, i.source) for i in store.lease(100)]


def assert_refused(response: Response, store: StateStore, status: int, code: str) -> None:
    assert response.status == status, response.body
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.json()["issue"][0]["code"] == code
    assert response.json()["issue"][0]["severity"] in ("error", "fatal")
    assert store.lease(100) == []


# -- accepted ---------------------------------------------------------------------------------------------


def test_rest_hook_put_is_queued_before_the_answer(app: WSGIApplication, store: StateStore,
                                                   wakeups: list[int], metrics: Metrics) -> None:
    response = call(app, "PUT", "/notify/Procedure/fna-1", procedure(), headers=AUTH)
    assert response.status == 200
    assert response.json()["issue"][0]["severity"] == "information"
    assert "queued 1 item(s)" in response.diagnostics()
    assert wakeups == [1]
    assert queued(store) == [("procedure", {"resource": procedure()}, "rest-hook")]
    assert metrics.value("charge_adapter_received_total", kind="rest-hook-update") == 1
    assert metrics.value("charge_adapter_enqueued_total", kind="procedure") == 1


def test_rest_hook_delete_and_ping(app: WSGIApplication, store: StateStore) -> None:
    assert call(app, "DELETE", "/notify/Procedure/fna-1", headers=AUTH, content_type=None).status == 200
    assert call(app, "POST", "/notify", headers=AUTH, content_type=None).status == 200
    assert call(app, "POST", "/notify/", headers=AUTH, content_type=None, length=False).status == 200
    assert queued(store) == [("delete", {"reference": "Procedure/fna-1"}, "rest-hook"),
                             ("poll", {"reason": "rest-hook ping"}, "rest-hook"),
                             ("poll", {"reason": "rest-hook ping"}, "rest-hook")]


def test_engine_post_procedure_and_bundle(app: WSGIApplication, store: StateStore) -> None:
    body_site = {"resourceType": "BodyStructure", "id": "bs1"}
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": procedure("a"), "request": {"method": "PUT", "url": "Procedure/a"}},
                        {"resource": body_site, "request": {"method": "PUT", "url": "BodyStructure/bs1"}}]}
    assert call(app, "POST", "/notify", procedure("b"), headers=AUTH).status == 200
    assert call(app, "POST", "/notify", bundle, headers=AUTH, content_type="application/json").status == 200
    assert queued(store) == [("procedure", {"resource": procedure("b")}, "engine"),
                             ("resources", {"resources": [procedure("a"), body_site]}, "engine")]


def status_bundle(kind: str, since: str, events: list[tuple[str, str | None]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    status: dict[str, Any] = {"resourceType": "SubscriptionStatus", "status": "active", "type": kind,
                              "subscription": {"reference": "Subscription/s1"},
                              "eventsSinceSubscriptionStart": since,
                              "notificationEvent": [{"eventNumber": n, **({"focus": {"reference": f}} if f else {})}
                                                    for n, f in events]}
    return {"resourceType": "Bundle", "type": "history", "entry": [{"resource": status}]}


def test_topic_notifications_keep_event_numbers_and_detect_gaps(app: WSGIApplication, store: StateStore,
                                                                wakeups: list[int]) -> None:
    hand = call(app, "POST", "/notify", status_bundle("handshake", "0"), headers=AUTH)
    assert hand.status == 200 and "queued 0 item(s)" in hand.diagnostics()
    assert wakeups == []  # nothing queued, nobody woken
    assert store.last_event_number("Subscription/s1") == 0
    assert call(app, "POST", "/notify", status_bundle("event-notification", "1", [("1", "Procedure/a")]),
                headers=AUTH).status == 200
    assert store.last_event_number("Subscription/s1") == 1
    assert queued(store) == [("fetch", {"reference": "Procedure/a"}, "topic")]
    # event 2 is lost: the next one must trigger a poll
    assert call(app, "POST", "/notify", status_bundle("event-notification", "3", [("3", "Procedure/b")]),
                headers=AUTH).status == 200
    assert queued(store) == [("fetch", {"reference": "Procedure/b"}, "topic"),
                             ("poll", {"reason": "event gap on Subscription/s1: expected event 2, got 3"}, "topic")]
    beat = call(app, "POST", "/notify", status_bundle("heartbeat", "3"), headers=AUTH)
    assert beat.status == 200 and store.lease(100) == []
    assert call(app, "POST", "/notify", status_bundle("heartbeat", "5"), headers=AUTH).status == 200
    assert [i.kind for i in store.lease(100)] == ["poll"]
    assert store.last_event_number("Subscription/s1") == 5


def test_anonymous_receiver(store: StateStore, metrics: Metrics) -> None:
    app = make_app(store, ReceiverSettings(allow_anonymous=True), metrics)
    assert call(app, "PUT", "/notify/Procedure/fna-1", procedure()).status == 200
    assert len(store.lease(100)) == 1


def test_hmac_signature(store: StateStore, metrics: Metrics) -> None:
    secret = b"hmac-key"
    app = make_app(store, ReceiverSettings(token=TOKEN, hmac_secret=secret), metrics)
    body = json.dumps(procedure()).encode()
    good = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    assert call(app, "PUT", "/notify/Procedure/fna-1", body, headers={**AUTH, "X-Signature": good}).status == 200
    assert call(app, "PUT", "/notify/Procedure/fna-1", body,
                headers={**AUTH, "X-Signature": good.upper().replace("SHA256", "sha256")}).status == 200
    empty = "sha256=" + hmac.new(secret, b"", hashlib.sha256).hexdigest()
    assert call(app, "DELETE", "/notify/Procedure/fna-1", headers={**AUTH, "X-Signature": empty}).status == 200
    # both signature forms were accepted; the same Procedure version twice is one queued item
    assert [i.kind for i in store.lease(100)] == ["procedure", "delete"]
    for signature in (None, "sha256=" + "0" * 64, good[7:], "sha1=" + good[7:], "sha256=" + good[7:] + "00",
                      "sha256=\u00e9"):
        headers = {**AUTH, **({"X-Signature": signature} if signature is not None else {})}
        response = call(app, "PUT", "/notify/Procedure/fna-1", body, headers=headers)
        assert_refused(response, store, 401, "security")
        assert response.headers["www-authenticate"].startswith("Bearer")


# -- refused ----------------------------------------------------------------------------------------------


def test_missing_token(app: WSGIApplication, store: StateStore, wakeups: list[int]) -> None:
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer "}):
        response = call(app, "PUT", "/notify/Procedure/fna-1", procedure(), headers=headers)
        assert_refused(response, store, 401, "login")
        assert response.headers["www-authenticate"] == 'Bearer realm="charge-adapter"'
    assert wakeups == []


def test_wrong_token_is_401_and_not_echoed(app: WSGIApplication, store: StateStore,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for token in ("wrong", TOKEN + "x", TOKEN.upper(), "t\u00e9st"):
        response = call(app, "POST", "/notify", procedure(), headers={"Authorization": f"Bearer {token}"})
        assert_refused(response, store, 401, "security")
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
        assert token not in response.body.decode()
    assert "wrong" not in caplog.text and TOKEN not in caplog.text


def test_token_is_checked_before_the_body_is_read(app: WSGIApplication, store: StateStore) -> None:
    response = call(app, "POST", "/notify", b"x" * 100, stream=NoRead(), headers={})
    assert_refused(response, store, 401, "login")


@pytest.mark.parametrize(("method", "path", "body", "content_type", "status", "code"), [
    ("POST", "/notify", b"this is not json", FHIR, 400, "structure"),
    ("POST", "/notify", b"[1,2,3]", FHIR, 400, "invalid"),
    ("POST", "/notify", b'{"hello": "world"}', FHIR, 400, "invalid"),
    ("POST", "/notify", b'{"resourceType": "Observation", "id": "o"}', FHIR, 422, "not-supported"),
    ("POST", "/notify", b'{"resourceType": "Bundle", "type": "collection", "entry": []}', FHIR, 400, "invalid"),
    ("POST", "/notify", b'{"resourceType": "Bundle", "type": "history", "entry": []}', FHIR, 400, "structure"),
    ("POST", "/notify", b"<Procedure/>", "application/fhir+xml", 415, "not-supported"),
    ("POST", "/notify", b'{"resourceType": "Procedure"}', None, 415, "not-supported"),
    ("PUT", "/notify/Procedure/fna-1", b'{"resourceType": "Patient", "id": "fna-1"}', FHIR, 422, "not-supported"),
    ("PUT", "/notify/Procedure/fna-2", json.dumps(procedure("fna-1")).encode(), FHIR, 400, "invalid"),
    ("PUT", "/notify/Procedure/fna-1", b"", FHIR, 415, "not-supported"),
    ("PUT", "/notify/Procedure/bad%20id", json.dumps(procedure()).encode(), FHIR, 400, "invalid"),
])
def test_invalid_requests(app: WSGIApplication, store: StateStore, wakeups: list[int], metrics: Metrics,
                          method: str, path: str, body: bytes, content_type: str | None, status: int,
                          code: str) -> None:
    response = call(app, method, path, body, headers=AUTH, content_type=content_type)
    assert_refused(response, store, status, code)
    assert response.diagnostics()
    assert wakeups == []
    assert metrics.value("charge_adapter_rejected_total", status=status) == 1


def test_oversize_with_content_length_is_refused_unread(app: WSGIApplication, store: StateStore) -> None:
    environ_body = b"x" * 5000
    response = call(app, "POST", "/notify", environ_body, headers=AUTH, stream=NoRead())
    assert_refused(response, store, 413, "too-long")
    assert "4096" in response.diagnostics()


def test_oversize_without_content_length_reads_at_most_limit_plus_one(app: WSGIApplication,
                                                                       store: StateStore) -> None:
    stream = Counting(b"{" + b" " * 100_000 + b"}")
    response = call(app, "POST", "/notify", headers=AUTH, length=False, stream=stream)
    assert_refused(response, store, 413, "too-long")
    assert stream.consumed == 4097


def test_body_without_content_length_within_the_limit(app: WSGIApplication, store: StateStore) -> None:
    body = json.dumps(procedure()).encode()
    response = call(app, "PUT", "/notify/Procedure/fna-1", body, headers=AUTH, length=False)
    assert response.status == 200
    assert len(store.lease(100)) == 1


@pytest.mark.parametrize(("length", "status", "code"), [("abc", 400, "invalid"), ("-1", 400, "invalid"),
                                                        ("500", 400, "incomplete")])
def test_bad_content_length(app: WSGIApplication, store: StateStore, length: str, status: int, code: str) -> None:
    response = call(app, "POST", "/notify", procedure("a"), headers=AUTH, length=length)
    assert_refused(response, store, status, code)


@pytest.mark.parametrize(("method", "path", "status", "allow"), [
    ("GET", "/notify", 405, "POST"),
    ("PUT", "/notify", 405, "POST"),
    ("POST", "/notify/Procedure/fna-1", 405, "PUT, DELETE"),
    ("GET", "/notify/Procedure/fna-1", 405, "PUT, DELETE"),
    ("POST", "/healthz", 405, "GET"),
    ("DELETE", "/metrics", 405, "GET"),
    ("PUT", "/notify/Patient/p1", 404, None),
    ("PUT", "/notify/Procedure/fna-1/_history/1", 404, None),
    ("POST", "/other", 404, None),
    ("GET", "/", 404, None),
])
def test_wrong_method_or_path(app: WSGIApplication, store: StateStore, method: str, path: str, status: int,
                              allow: str | None) -> None:
    response = call(app, method, path, procedure(), headers=AUTH)
    assert_refused(response, store, status, "not-supported" if status == 405 else "not-found")
    assert response.headers.get("allow") == allow


def test_enqueue_failure_is_503_and_nobody_is_woken(app: WSGIApplication, store: StateStore, wakeups: list[int],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(items: list[WorkItem], **_: object) -> list[int]:
        raise StateUnavailable("state.sqlite", "disk full: free space on the filesystem that holds the state")

    monkeypatch.setattr(store, "enqueue", broken)
    response = call(app, "PUT", "/notify/Procedure/fna-1", procedure(), headers=AUTH)
    assert response.status == 503
    assert response.json()["issue"][0]["code"] == "transient"
    assert response.headers["retry-after"] == "5"
    assert wakeups == []
    monkeypatch.undo()
    assert store.lease(100) == []


def test_on_enqueued_failure_still_acknowledges(store: StateStore, metrics: Metrics) -> None:
    def explode() -> None:
        raise RuntimeError("worker pool gone")

    app = make_app(store, ReceiverSettings(token=TOKEN), metrics, on_enqueued=explode)
    assert call(app, "PUT", "/notify/Procedure/fna-1", procedure(), headers=AUTH).status == 200
    assert len(store.lease(100)) == 1


def test_nothing_sensitive_is_logged(app: WSGIApplication, store: StateStore,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="adapter")
    secret = {**procedure(), "note": [{"text": "Jane Doe has a thyroid nodule"}]}
    call(app, "PUT", "/notify/Procedure/fna-1", secret, headers=AUTH)
    call(app, "PUT", "/notify/Procedure/fna-2", secret, headers=AUTH)
    assert "Jane" not in caplog.text and TOKEN not in caplog.text
    messages = [r.getMessage() for r in caplog.records if r.name == "adapter.receive"]
    assert messages == ["PUT /notify/Procedure/fna-1 -> 200 rest-hook-update, 1 item(s) queued",
                        "PUT /notify/Procedure/fna-2 -> 400 invalid: the Procedure in the body has a different id; "
                        "the path says Procedure/fna-2"]


def test_custom_base_path(store: StateStore, metrics: Metrics) -> None:
    app = make_app(store, ReceiverSettings(token=TOKEN, base_path="hooks/fhir/"), metrics)
    assert call(app, "PUT", "/hooks/fhir/Procedure/fna-1", procedure(), headers=AUTH).status == 200
    assert call(app, "PUT", "/notify/Procedure/fna-1", procedure(), headers=AUTH).status == 404
    assert len(store.lease(100)) == 1


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="token is required"):
        ReceiverSettings()
    with pytest.raises(ValueError):
        ReceiverSettings(token="  ")
    with pytest.raises(ValueError):
        ReceiverSettings(token="t", base_path="/healthz")
    with pytest.raises(ValueError):
        ReceiverSettings(token="t", max_body_bytes=0)
    assert ReceiverSettings(token="t", base_path="/").base_path == ""
    assert TOKEN not in repr(ReceiverSettings(token=TOKEN, hmac_secret=b"k"))


# -- health and metrics ---------------------------------------------------------------------------------------


def test_healthz(app: WSGIApplication, store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    response = call(app, "GET", "/healthz")
    assert (response.status, response.json()) == (200, {"status": "ok", "queue_depth": 0})
    store.enqueue([WorkItem("poll", {"reason": "test"}, "test")])
    assert call(app, "GET", "/healthz").json()["queue_depth"] == 1

    def down() -> int:
        raise StateUnavailable("state.sqlite", "database is locked by another connection (waited 5 s)")

    monkeypatch.setattr(store, "queue_depth", down)
    response = call(app, "GET", "/healthz")
    assert response.status == 503
    assert response.json()["status"] == "unavailable"


def test_metrics_endpoint(app: WSGIApplication, store: StateStore, metrics: Metrics) -> None:
    metrics.gauge("charge_adapter_queue_depth", store.queue_depth, "Received work not yet processed")
    call(app, "PUT", "/notify/Procedure/fna-1", procedure(), headers=AUTH)
    call(app, "PUT", "/notify/Procedure/fna-1", procedure())
    response = call(app, "GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = response.body.decode()
    assert "# TYPE charge_adapter_received_total counter" in text
    assert 'charge_adapter_received_total{kind="rest-hook-update"} 1.0' in text
    assert 'charge_adapter_rejected_total{status="401"} 1.0' in text
    assert "# TYPE charge_adapter_queue_depth gauge\ncharge_adapter_queue_depth 1.0\n" in text
    assert "charge_adapter_coded_total 0.0" in text
    # prometheus_client's process metrics and the write-latency histograms are on the same endpoint
    assert "# TYPE process_resident_memory_bytes gauge" in text and "process_cpu_seconds_total " in text
    assert "# TYPE charge_adapter_state_write_seconds histogram" in text
    assert 'charge_adapter_state_write_seconds_bucket{le="+Inf"} 0.0' in text


def test_metrics_registry_rendering() -> None:
    m = Metrics()
    m.inc("charge_adapter_written_total", 3)
    m.inc("charge_adapter_written_total", 0)
    m.inc("charge_adapter_rejected_total", status=413)
    m.inc("charge_adapter_rejected_total", status="413")
    m.inc("custom_events_total", 2, source='a"b\\c\nd')
    m.gauge("charge_adapter_cursor_lag_seconds", lambda: 1.5, "Lag")
    m.gauge("broken_gauge", lambda: 1 / 0, "Fails")
    m.gauge("absent_gauge", lambda: None, "Nothing to report")
    m.gauge("labelled_gauge", lambda: 2, "Per queue", queue="review")
    text = m.render()
    assert text.endswith("\n")
    assert "charge_adapter_written_total 3.0\n" in text
    assert 'charge_adapter_rejected_total{status="413"} 2.0\n' in text
    assert 'custom_events_total{source="a\\"b\\\\c\\nd"} 2.0\n' in text
    assert "# HELP charge_adapter_cursor_lag_seconds Lag\n# TYPE charge_adapter_cursor_lag_seconds gauge\n" \
           "charge_adapter_cursor_lag_seconds 1.5\n" in text
    assert "# TYPE broken_gauge gauge\n# HELP" in text  # the failing series is left out, the scrape works
    assert "\nabsent_gauge " not in text
    assert 'labelled_gauge{queue="review"} 2.0\n' in text
    assert 'charge_adapter_received_total{' not in text  # labelled counter: no sample before its first inc
    assert m.value("charge_adapter_rejected_total", status=413) == 2


def test_write_latency_histograms_count_each_observation() -> None:
    m = Metrics(process=False)
    m.observe("charge_adapter_fhir_write_seconds", 0.2, method="POST")
    m.observe("charge_adapter_fhir_write_seconds", 3.0, method="POST")
    m.observe("charge_adapter_state_write_seconds", 0.004)
    text = m.render()
    assert 'charge_adapter_fhir_write_seconds_bucket{le="0.25",method="POST"} 1.0' in text
    assert 'charge_adapter_fhir_write_seconds_count{method="POST"} 2.0' in text
    assert 'charge_adapter_fhir_write_seconds_sum{method="POST"} 3.2' in text
    assert 'charge_adapter_state_write_seconds_bucket{le="0.005"} 1.0' in text
    assert "process_cpu_seconds_total" not in text


def test_metrics_registry_refuses_misuse() -> None:
    m = Metrics()
    with pytest.raises(ValueError):
        m.inc("charge_adapter_written_total", -1)
    with pytest.raises(ValueError):
        m.inc("charge_adapter_rejected_total", code=400)  # declared label is `status`
    with pytest.raises(ValueError):
        m.inc("bad name")
    with pytest.raises(ValueError):
        m.gauge("charge_adapter_written_total", lambda: 1, "already a counter")
    with pytest.raises(ValueError):
        m.inc("x_total", **{"bad-label": 1})


def test_metrics_registry_is_thread_safe() -> None:
    m = Metrics()

    def work() -> None:
        for _ in range(2000):
            m.inc("charge_adapter_coded_total")
            m.inc("charge_adapter_received_total", kind="ping")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.value("charge_adapter_coded_total") == 16000
    assert m.value("charge_adapter_received_total", kind="ping") == 16000


# -- the real server ----------------------------------------------------------------------------------------


def test_waitress_server_end_to_end(store: StateStore, metrics: Metrics) -> None:
    woken = threading.Event()
    app = make_app(store, ReceiverSettings(token=TOKEN), metrics, on_enqueued=woken.set)
    server = serve_app(app, "127.0.0.1", 0, threads=2)
    thread = threading.Thread(target=server.run, name="receiver", daemon=True)
    thread.start()
    try:
        [(host, port)] = bound_addresses(server)
        assert port != 0
        base = f"http://{host}:{port}"
        response = requests.put(f"{base}/notify/Procedure/fna-1", json=procedure(), timeout=10,
                                headers={**AUTH, "Content-Type": FHIR})
        assert response.status_code == 200, response.text
        assert woken.is_set()
        assert queued(store) == [("procedure", {"resource": procedure()}, "rest-hook")]
        refused = requests.put(f"{base}/notify/Procedure/fna-1", json=procedure(), timeout=10)
        assert refused.status_code == 401
        assert requests.get(f"{base}/healthz", timeout=10).json() == {"status": "ok", "queue_depth": 1}
    finally:
        stop_server(server)
        thread.join(10)
    assert not thread.is_alive()


# -- slow clients -------------------------------------------------------------------------------------------


def _trickle(port: int, data: bytes, every: float, limit: float) -> float:
    """Send `data` one byte every `every` seconds; seconds until the server closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
        return _trickle_on(sock, data, every, limit)


def test_a_request_trickled_byte_by_byte_is_cut_off(store: StateStore, metrics: Metrics) -> None:
    """waitress alone only closes idle connections; one byte every 0.2 s is never idle."""
    limits = ServerLimits(threads=2, header_timeout=1.0, body_timeout=1.0, idle_timeout=60)
    server = serve_app(make_app(store, ReceiverSettings(token=TOKEN), metrics), "127.0.0.1", 0, limits=limits,
                       metrics=metrics)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        [(_, port)] = bound_addresses(server)
        headers = b"PUT /notify/Procedure/fna-1 HTTP/1.1\r\nHost: x\r\n" + b"X-Padding: a\r\n" * 50
        assert _trickle(port, headers, 0.2, 10) < 4  # headers: cut after 1 s (+ up to 1 s of housekeeping)
        body_slowly = (b"PUT /notify/Procedure/fna-1 HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n", b"{" * 500)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(body_slowly[0])
            assert _trickle_on(sock, body_slowly[1], 0.2, 10) < 4
        assert metrics.value("charge_adapter_rejected_total", status="timeout") == 2
        ok = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert ok.status_code == 200
    finally:
        stop_server(server)
        thread.join(10)


def _trickle_on(sock: Any, data: bytes, every: float, limit: float) -> float:
    started = time.monotonic()
    sock.settimeout(every)
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(1024) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
        if time.monotonic() - started > limit:
            break
    return float("inf")


def test_port_in_use_is_a_listen_error(store: StateStore, metrics: Metrics) -> None:
    first = serve_app(make_app(store, None, metrics), "127.0.0.1", 0)
    try:
        [(_, port)] = bound_addresses(first)
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            serve_app(make_app(store, None, metrics), "127.0.0.1", port)
    finally:
        stop_server(first, timeout=0.2)  # never started: nothing to wait for


def test_the_health_only_app_of_run(store: StateStore, metrics: Metrics) -> None:
    health = Health()
    app = make_app(store, None, metrics, health=health)
    assert call(app, "GET", "/healthz").json()["status"] == "ok"
    assert call(app, "PUT", "/notify/Procedure/fna-1", procedure(), headers=AUTH).status == 404
    health.state_failed("disk full: free space on the filesystem that holds the state")
    answer = call(app, "GET", "/healthz")
    assert answer.status == 503 and answer.headers["retry-after"] == "5"
    assert answer.json()["reasons"][0].endswith("disk full: free space on the filesystem that holds the state")


def test_an_unwritable_state_is_503_and_reported_to_health(store: StateStore, metrics: Metrics,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    health = Health()
    app = make_app(store, ReceiverSettings(token=TOKEN), metrics, health=health)

    def locked(items: list[WorkItem], **_: object) -> list[int]:
        raise StateUnavailable("s.sqlite", "database is locked by another connection (waited 5 s)")

    monkeypatch.setattr(store, "enqueue", locked)
    assert call(app, "PUT", "/notify/Procedure/fna-1", procedure(), headers=AUTH).status == 503
    assert not health.check().ok
    monkeypatch.undo()
    assert call(app, "PUT", "/notify/Procedure/fna-1", procedure(), headers=AUTH).status == 200
    assert health.check().ok
