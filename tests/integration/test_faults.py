"""Faults an integration team tries before go-live, against real processes and the real HAPI server, with our
fault-injecting proxy (fault_proxy.py) in between where the server has to misbehave: lost answers to
committed writes, a FHIR outage in the middle of a backlog, a locked and a full state disk, slow clients.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from adapter.client import FhirClient

from .adapter_process import (
    Adapter,
    expected_identifiers,
    identifiers_on_server,
    mount_namespace,
    notify_post,
    notify_put,
)
from .fault_proxy import FaultProxy
from .helpers import namespaced, patients_of, resources_of, server_now, wait_for

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from generate import generate, put_all  # noqa: E402

FAST_RETRIES = {"server": {"connect_timeout": 2, "read_timeout": 3, "retry_seconds": 2},
                "worker": {"retry_initial_seconds": 1, "retry_max_seconds": 5},
                "health": {"server_unreachable_seconds": 3}}


@pytest.fixture
def proxy(hapi_url: str) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy(hapi_url)
    yield fault_proxy
    fault_proxy.stop()


@pytest.fixture
def adapters() -> Iterator[list[Adapter]]:
    started: list[Adapter] = []
    yield started
    for adapter in started:
        adapter.stop_all()


def open_reviews(adapter: Adapter) -> list[Any]:
    return adapter.store().reviews("open")


# -- lost answers -----------------------------------------------------------------------------------------------


LOSE_ANSWERS = {
    "truncate": lambda proxy: proxy.truncate(only=("POST",), path="/fhir"),
    "close_after_forward": lambda proxy: proxy.close_after_forward(only=("POST",), path="/fhir"),
    "freeze": lambda proxy: proxy.freeze(4, only=("POST",), path="/fhir"),  # past the 2 s read timeout
}


@pytest.mark.parametrize("fault", sorted(LOSE_ANSWERS))
def test_writes_committed_but_unanswered_are_success(client: FhirClient, proxy: FaultProxy, tmp_path: Path,
                                                     fhir_ns: str, fault: str) -> None:
    """Every transaction reaches HAPI, which commits it, but its answer is cut, lost or late: the adapter asks
    the server by our identifiers, finds exactly what it sent, and calls it written."""
    adapter = Adapter(tmp_path, proxy.url, server={"read_timeout": 2, "retry_seconds": 1})
    adapter.start_cursor_at(server_now(client))
    bundles = [namespaced("13", fhir_ns), namespaced("02", fhir_ns)]
    for bundle in bundles:
        client.transaction(bundle)
    resources = [r for b in bundles for r in resources_of(b)]
    LOSE_ANSWERS[fault](proxy)
    result = adapter.cmd("run", "--once")
    assert result.returncode == 0, result.stderr
    assert "2 session(s) confirmed on the server after a lost answer" in result.stderr
    assert proxy.count(fault) >= 2  # both sessions' transactions lost their answer
    assert identifiers_on_server(client, patients_of(resources)) == expected_identifiers(resources)
    assert open_reviews(adapter) == [] and adapter.store().queue_depth() == 0
    proc = f"Procedure/{fhir_ns}-s13-fna-1"
    assert adapter.store().audit_for(proc)[0].written  # the audit names what the server holds


def test_a_retried_void_that_meets_409_is_success(client: FhirClient, proxy: FaultProxy, tmp_path: Path,
                                                  fhir_ns: str) -> None:
    """The void (a PUT with If-Match) is committed, its answer lost; the client's retry then gets 409 because
    the version moved on. The target already holds the intended content: success, voided once."""
    adapter = Adapter(tmp_path, proxy.url, server={"retry_seconds": 10})
    adapter.start_cursor_at(server_now(client))
    bundle = namespaced("11", fhir_ns)  # 10005, 10006, 10007-59 (fluoroscopy)
    client.transaction(bundle)
    assert adapter.cmd("run", "--once").returncode == 0
    fluoro = next(r for r in resources_of(bundle) if r["id"] == f"{fhir_ns}-s11-fna-2")
    client.update({**fluoro, "status": "entered-in-error"})
    proxy.close_after_forward(only=("POST",), path="/fhir", contains=b'"ifMatch"', times=1)  # the void's
    result = adapter.cmd("run", "--once")
    assert result.returncode == 0, result.stderr
    assert "1 session(s) confirmed on the server after a lost answer" in result.stderr
    assert proxy.count("close_after_forward") == 1
    items = [c for c in client.search_all("ChargeItem", {"subject": patients_of(bundle)[0], "_count": "50"})]
    voided = [c for c in items if c["status"] == "entered-in-error"]
    assert len(items) == 3 and len(voided) == 1 and voided[0]["meta"]["versionId"] == "2"  # voided once
    assert open_reviews(adapter) == []


# -- an outage in the middle of a backlog ----------------------------------------------------------------------


def outage(proxy: FaultProxy, adapter: Adapter, phase: float = 5.0) -> None:
    """Connection refused, then 503s, then slow answers, `phase` seconds each; /healthz must say so."""
    proxy.refuse()
    time.sleep(phase)
    status, body = adapter.health()
    assert status == 503 and any(r.startswith("FHIR server unusable") for r in body["reasons"]), body
    proxy.resume()
    proxy.fail(503)
    time.sleep(phase)
    proxy.delay(1.5)
    time.sleep(phase)
    proxy.clear()


def assert_everything_billed_once(client: FhirClient, adapter: Adapter, resources: list[dict[str, Any]],
                                  what: str) -> float:
    """Seconds until every expected charge was on the server (at most 2 minutes), then: none twice, no
    manual step, nothing in review but data problems, nothing given up."""
    expected = expected_identifiers(resources)
    patients = patients_of(resources)
    started = time.monotonic()
    wait_for(lambda: identifiers_on_server(client, patients) == expected, 120, f"every charge after the {what}", 2)
    recovered = time.monotonic() - started
    print(f"\n{what}: all {sum(expected.values())} charges on the server {recovered:.1f} s after the server came "
          "back")
    assert identifiers_on_server(client, patients) == expected  # none missing, none twice
    state = adapter.store()
    assert {e.kind for e in open_reviews(adapter)} <= {"needs-review"}
    assert "failed" not in state.queue_counts()
    wait_for(lambda: adapter.health()[0] == 200, 30, "/healthz to recover")
    return recovered


@pytest.mark.bulk
def test_an_outage_during_run_loses_no_charge(client: FhirClient, proxy: FaultProxy, tmp_path: Path,
                                              fhir_ns: str, adapters: list[Adapter]) -> None:
    adapter = Adapter(tmp_path, proxy.url, **FAST_RETRIES)
    adapters.append(adapter)
    resources = list(generate(300, prefix=f"{fhir_ns}r"))
    adapter.start_cursor_at(server_now(client))
    put_all(client, resources)
    adapter.start("run")
    wait_for(lambda: adapter.store().counts()["processed"] >= 25, 120, "the first Procedures coded", 0.1)
    assert adapter.store().counts()["processed"] < 250, "the outage should hit the middle of the backlog"
    outage(proxy, adapter)
    assert_everything_billed_once(client, adapter, resources, "outage during run")
    assert adapter.metric('charge_adapter_failures_total{kind="fhir-unreachable"}') or \
        adapter.metric('charge_adapter_failures_total{kind="fhir-server"}')


@pytest.mark.bulk
def test_an_outage_during_serve_loses_no_acknowledged_charge(client: FhirClient, proxy: FaultProxy, tmp_path: Path,
                                                             fhir_ns: str, adapters: list[Adapter]) -> None:
    """serve with the safety poll off: only what was received can be coded. 300 Procedures arrive as rest-hook
    notifications and engine Bundles (whose content must be re-applied as received on every retry)."""
    adapter = Adapter(tmp_path, proxy.url, **FAST_RETRIES)
    adapters.append(adapter)
    adapter.start("serve")
    adapter.wait_healthy()
    resources = list(generate(300, prefix=f"{fhir_ns}s"))
    put_all(client, resources)
    pushed = set(patients_of(resources)[:15])  # these patients' resources come as engine Bundles
    for patient in sorted(pushed):
        own = [r for r in resources if f"Patient/{r['id']}" == patient or
               (r.get("subject") or r.get("patient") or r.get("beneficiary") or {}).get("reference") == patient]
        bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in own]}
        assert notify_post(adapter, bundle).status_code == 200
    procedures = [r for r in resources if r["resourceType"] == "Procedure" and r["subject"]["reference"] not in pushed]
    for procedure in procedures:
        assert notify_put(adapter, procedure).status_code == 200
    wait_for(lambda: adapter.store().counts()["processed"] >= 25, 120, "the first Procedures coded", 0.1)
    assert adapter.store().queue_depth() > 0, "the outage should hit the middle of the queue"
    proxy.refuse()
    for procedure in procedures[:10]:  # notifications keep being acknowledged: they are on disk
        assert notify_put(adapter, procedure).status_code == 200
    proxy.resume()
    outage_started = time.time()
    outage(proxy, adapter)
    assert (adapter.metric("charge_adapter_retry_backlog") or 0) > 0  # monitored every 5 s
    assert (adapter.metric("charge_adapter_oldest_queued_seconds") or 0) > 10
    # which kind the outage is counted under depends on which phase the worker's client gave up in: refused
    # connections (fhir-unreachable) or the 503s that follow (fhir-server)
    assert (adapter.metric('charge_adapter_failures_total{kind="fhir-unreachable"}') or 0) + \
        (adapter.metric('charge_adapter_failures_total{kind="fhir-server"}') or 0) > 0
    assert_everything_billed_once(client, adapter, resources, "outage during serve")
    wait_for(lambda: adapter.store().queue_depth() == 0, 60, "the queue to drain")
    assert (adapter.metric("charge_adapter_last_write_success_timestamp_seconds") or 0) > outage_started


# -- the state cannot be written while serve receives -----------------------------------------------------------


def scenario_procedures(client: FhirClient, ns: str, scenarios: tuple[str, ...]) -> tuple[list[dict[str, Any]],
                                                                                           list[dict[str, Any]]]:
    """Load scenarios into HAPI; (all their resources, their Procedures as stored by the server)."""
    resources: list[dict[str, Any]] = []
    for number in scenarios:
        bundle = namespaced(number, ns)
        client.transaction(bundle)
        resources += resources_of(bundle)
    procedures = [client.read("Procedure", r["id"]) for r in resources if r["resourceType"] == "Procedure"]
    return resources, procedures


def assert_state_unwritable_reported(adapter: Adapter, *words: str) -> None:
    status, body = adapter.health()
    assert status == 503, body
    [reason] = [r for r in body["reasons"] if r.startswith("state unwritable")]
    assert any(word in reason for word in words), reason


def test_a_locked_state_answers_503_and_everything_acknowledged_is_processed(
        client: FhirClient, tmp_path: Path, hapi_url: str, fhir_ns: str, adapters: list[Adapter]) -> None:
    adapter = Adapter(tmp_path, hapi_url, serve={"request_timeout_seconds": 1}, state={"busy_timeout_seconds": 1})
    adapters.append(adapter)
    adapter.start("serve")
    adapter.wait_healthy()
    resources, procedures = scenario_procedures(client, fhir_ns, ("01", "02", "07"))
    assert notify_put(adapter, procedures[0]).status_code == 200  # acknowledged before the lock
    holder = sqlite3.connect(adapter.state, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock (a backup tool, a stuck sqlite3 shell)
    try:
        refused = [p for p in procedures[1:] if notify_put(adapter, p).status_code == 503]
        assert refused == procedures[1:]  # never 2xx for what could not be stored
        assert_state_unwritable_reported(adapter, "locked")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    for procedure in refused:  # the senders retry, as HAPI and engines do after a 503
        assert notify_put(adapter, procedure).status_code == 200
    expected = expected_identifiers(resources)
    wait_for(lambda: identifiers_on_server(client, patients_of(resources)) == expected, 60, "every charge", 1)
    wait_for(lambda: adapter.health()[0] == 200, 30, "/healthz to recover")


def test_a_full_disk_answers_503_and_everything_acknowledged_is_processed(
        client: FhirClient, tmp_path: Path, hapi_url: str, fhir_ns: str, adapters: list[Adapter]) -> None:
    """The state on a real 6 MiB filesystem (a tmpfs in a private mount namespace, mount_ns.py) that is then
    filled to the last byte. SQLite fails only when it needs new space, so notifications are sent until one
    is refused."""
    folder, control = tmp_path / "state", tmp_path / "control"
    folder.mkdir()
    control.mkdir()
    adapter = Adapter(tmp_path, hapi_url, state_file=folder / "state.sqlite", serve={"request_timeout_seconds": 1},
                      wrapper=mount_namespace("--tmpfs", "6m", str(folder), "--control", str(control)))
    adapters.append(adapter)
    adapter.start("serve")
    adapter.wait_healthy()
    resources, procedures = scenario_procedures(client, fhir_ns, ("01", "02", "07", "09"))
    assert notify_put(adapter, procedures[0]).status_code == 200
    (control / "fill").touch()
    wait_for((control / "filled").exists, 30, "the disk to be full", 0.1)
    padding = {"url": "http://example.org/fhir/StructureDefinition/padding", "valueString": "x" * 200_000}
    refused: list[dict[str, Any]] = []
    for attempt in range(60):
        procedure = procedures[1 + attempt % (len(procedures) - 1)]
        answer = notify_put(adapter, {**procedure, "extension": [*procedure.get("extension", []), padding]})
        assert answer.status_code in (200, 503)
        if answer.status_code == 503:
            refused.append(procedure)
            break
    assert refused, "a full disk must refuse notifications once SQLite needs space"
    assert_state_unwritable_reported(adapter, "disk full", "I/O error")
    (control / "free").touch()
    wait_for((control / "freed").exists, 30, "the disk to have space again", 0.1)
    for procedure in procedures[1:]:  # the refused one again, and the rest
        assert notify_put(adapter, procedure).status_code == 200
    expected = expected_identifiers(resources)
    wait_for(lambda: identifiers_on_server(client, patients_of(resources)) == expected, 60, "every charge", 1)
    wait_for(lambda: adapter.health()[0] == 200, 30, "/healthz to recover")


# -- slow clients ----------------------------------------------------------------------------------------------


class SlowClients:
    """`count` connections that each send one more byte of a request header every `every` seconds, forever;
    a connection the server closes is opened again at once (the attack of the issue: 120 such clients)."""

    def __init__(self, port: int, count: int, every: float) -> None:
        self.port, self.count, self.every = port, count, every
        self.sockets: list[socket.socket] = []
        self.opened = self.cut = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-clients", daemon=True)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.setblocking(False)
        self.opened += 1
        return sock

    def _run(self) -> None:
        self.sockets = [self._connect() for _ in range(self.count)]
        payload = b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 10_000
        sent = 0
        while not self._stop.wait(self.every):
            byte = payload[sent % len(payload):][:1]
            sent += 1
            for index, sock in enumerate(self.sockets):
                try:
                    if sock.recv(1024) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:
                    self.cut += 1
                    sock.close()
                    self.sockets[index] = sock = self._connect()
                with contextlib.suppress(OSError):
                    sock.send(byte)
            self.peak = max(self.peak, len(self.sockets))

    def __enter__(self) -> SlowClients:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.sockets:
            sock.close()


def test_150_slow_clients_for_60_s_starve_neither_health_nor_notifications(
        client: FhirClient, tmp_path: Path, hapi_url: str, fhir_ns: str, adapters: list[Adapter]) -> None:
    """The default limits (500 connections, a request's headers within 10 s of its first byte): /healthz and
    an authenticated notification keep answering within 1 s, measured once a second for the whole minute."""
    adapter = Adapter(tmp_path, hapi_url)
    adapters.append(adapter)
    adapter.start("serve")
    adapter.wait_healthy()
    resources, procedures = scenario_procedures(client, fhir_ns, ("01",))
    health: list[float] = []
    notifications: list[float] = []
    with SlowClients(adapter.port, 150, every=5.0) as attack:
        wait_for(lambda: attack.opened >= 150, 30, "150 slow connections")
        end = time.monotonic() + 60
        while time.monotonic() < end:
            started = time.monotonic()
            assert requests.get(f"{adapter.url}/healthz", timeout=10).status_code == 200
            health.append(time.monotonic() - started)
            started = time.monotonic()
            assert notify_put(adapter, procedures[0]).status_code == 200
            notifications.append(time.monotonic() - started)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    print(f"\n150 slow clients for 60 s: /healthz p50 {statistics.median(health) * 1000:.0f} ms, max "
          f"{max(health) * 1000:.0f} ms; notification p50 {statistics.median(notifications) * 1000:.0f} ms, max "
          f"{max(notifications) * 1000:.0f} ms ({len(health)} of each); {attack.cut} trickling connections cut, "
          f"{attack.opened} opened")
    assert max(health) < 1.0 and max(notifications) < 1.0
    assert attack.peak >= 150 and attack.cut >= 150  # each slow connection was cut at its header deadline
    expected = expected_identifiers(resources)
    wait_for(lambda: identifiers_on_server(client, patients_of(resources)) == expected, 60, "the charge", 1)
