"""What /healthz says, and when, under faults nobody can hide: a PostgreSQL server whose processes are all stopped
(SIGSTOP) under two `run` replicas and a `serve`, an MLLP receiver that is down, and one whose ACKs come late.

Real processes throughout: a private PostgreSQL cluster (tests/pg.py `second_cluster`: the shared one is never
signalled), the HAPI server, `charge-adapter` processes and the MLLP listener process. Waits are shortened
through the health settings (`health.deadline_seconds`, `health.hl7v2_unreachable_seconds`), not by sleeping.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from adapter.client import FhirClient
from adapter.hl7v2.ledger import SqliteLedger
from adapter.state import open_state
from adapter.state.postgres import PostgresState
from tests import pg

from .adapter_process import Adapter, notify_put
from .helpers import free_port, namespaced, server_now, wait_for
from .test_hl7v2 import Listener

DEADLINE = 3.0
"""health.deadline_seconds in these tests (default 10)."""


def health_of(adapter: Adapter) -> tuple[int, dict[str, Any]]:
    try:
        return adapter.health()
    except requests.RequestException as exc:
        return 0, {"reasons": [f"no answer: {exc}"]}


def cluster_processes(env: dict[str, str]) -> list[int]:
    """The postmaster of a cluster started by scripts/postgres with `env`, and all its children."""
    postmaster = int((Path(env["PG_STATE_DIR"]) / "data" / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False)
    return [postmaster, *(int(p) for p in children.stdout.split())]


@pytest.fixture
def own_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    with pg.second_cluster() as cluster:
        yield cluster


def test_a_hung_database_makes_every_replica_answer_503_within_the_deadline(
        own_cluster: tuple[str, dict[str, str]], client: FhirClient, hapi_url: str, tmp_path: Path) -> None:
    url, env = own_cluster
    state_url = pg.with_schema(url, "adapter")
    PostgresState(state_url).set_cursor(server_now(client))  # nothing from earlier tests to code
    adapters = []
    for index, command in enumerate(("run", "run", "serve")):
        folder = tmp_path / f"replica-{index}"
        folder.mkdir()
        adapter = Adapter(folder, hapi_url, state={"location": state_url, "statement_timeout_seconds": 5},
                          health={"deadline_seconds": DEADLINE}, worker={"retry_max_seconds": 2})
        adapter.start(command)
        adapters.append(adapter)
    stopped: list[int] = []
    try:
        for adapter in adapters:
            adapter.wait_healthy(60)
        stopped = cluster_processes(env)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        unavailable: dict[int, float] = {}
        reasons: dict[int, list[str]] = {}
        seen: list[str] = []
        while time.monotonic() - started < DEADLINE + 5 and (len(unavailable) < len(adapters) or
                                                               not any("waiting on the state" in r for r in seen)):
            for index, adapter in enumerate(adapters):
                code, body = health_of(adapter)
                seen += body.get("reasons", [])
                if code == 503 and index not in unavailable and \
                        any(r.startswith("state not answering for") for r in body["reasons"]):
                    unavailable[index], reasons[index] = time.monotonic() - started, body["reasons"]
            time.sleep(0.1)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    resumed = time.monotonic()
    try:
        for adapter in adapters:
            adapter.wait_healthy(30)
        recovered = time.monotonic() - resumed
    finally:
        for adapter in adapters:
            adapter.stop_all()
    print(f"503 after {', '.join(f'{unavailable.get(i, -1):.1f}' for i in range(len(adapters)))} s "
          f"(run, run, serve); healthy again {recovered:.1f} s after SIGCONT")
    assert sorted(unavailable) == [0, 1, 2], f"not every replica said 503: {reasons}"
    # the last heartbeat answered at most a third of the deadline before the stop: 503 within the deadline
    assert max(unavailable.values()) <= DEADLINE + 1.0, unavailable  # (+ the polling of three /healthz)
    for said in reasons.values():
        assert "state not answering for" in said[0]
    # a loop blocked in a state call is named by what it waits on, with the state's URL and the call
    assert any("waiting on the state postgresql://" in r and "(" in r for r in seen), seen[-10:]
    assert recovered < 15


def hl7v2_run(tmp_path: Path, hapi_url: str, listener: Listener, **hl7v2: Any) -> Adapter:
    """`run` with the HL7 v2 sink only (sinks.fhir false: the FHIR side is not what these tests watch)."""
    return Adapter(tmp_path, hapi_url, sinks={"fhir": False, "hl7v2": {
        "enabled": True, "host": "127.0.0.1", "port": listener.port, "connect_timeout_seconds": 1, **hl7v2}},
        health={"hl7v2_unreachable_seconds": 2}, worker={"retry_initial_seconds": 0.2, "retry_max_seconds": 1},
        poll={"interval_seconds": 1, "overlap_seconds": 0, "page_size": 25})


def test_an_mllp_receiver_that_is_down_is_named_on_healthz_and_in_status(
        client: FhirClient, hapi_url: str, tmp_path: Path, fhir_ns: str) -> None:
    listener = Listener(tmp_path)  # not started yet: nothing listens on its port
    adapter = hl7v2_run(tmp_path, hapi_url, listener, ack_timeout_seconds=5)
    adapter.start_cursor_at(server_now(client))
    adapter.start("run")
    try:
        adapter.wait_healthy(60)
        client.transaction(namespaced("01", fhir_ns))
        wait_for(lambda: SqliteLedger(adapter.state).pending(), 30, "the message to be recorded")
        recorded = time.monotonic()

        def named() -> dict[str, Any] | None:
            code, body = health_of(adapter)
            return body if code == 503 and any(r.startswith("HL7 v2 receiver") for r in body["reasons"]) else None

        body = wait_for(named, 30, "/healthz to name the receiver", every=0.1)
        after = time.monotonic() - recorded
        [reason] = [r for r in body["reasons"] if r.startswith("HL7 v2 receiver")]
        assert reason.startswith(f"HL7 v2 receiver mllp://127.0.0.1:{listener.port} failing for ")
        assert "cannot connect" in reason and body["hl7v2"].startswith("failing for")
        status = adapter.cmd("status")
        assert status.returncode == 0, status.stderr
        assert f"hl7v2:     mllp://127.0.0.1:{listener.port}: 1 message(s) pending" in status.stdout
        assert "failing: " in status.stdout and "cannot connect" in status.stdout
        listener.start()
        wait_for(lambda: not SqliteLedger(adapter.state).pending(), 30, "the message to be acknowledged")
        adapter.wait_healthy(10)
        assert health_of(adapter)[1]["hl7v2"] == "ok"
        assert "failing:" not in adapter.cmd("status").stdout
    finally:
        adapter.stop_all()
        listener.stop()
    print(f"/healthz named the receiver {after:.1f} s after the message was recorded (threshold 2 s)")
    assert after <= 2 + 3  # the threshold, plus a poll interval and a connection attempt
    assert [r["control_id"] for r in listener.records(fhir_ns)] == [m.control_id for m in
                                                                    SqliteLedger(adapter.state).history(
                                                                        f"Patient/{fhir_ns}-s01-pat")]


LATE_IDS = 20
ACK_TIMEOUT, ACK_DELAY = 0.5, 1.0
"""Scaled from the issue's measurement (ACKs 4 s late against a 2 s timeout: docs/operations.md) to keep CI
short; what matters is an ACK that always comes after the timeout."""


def test_late_acks_cost_at_most_two_copies_per_control_id_and_every_line_is_acknowledged(
        client: FhirClient, hapi_url: str, tmp_path: Path, fhir_ns: str) -> None:
    listener = Listener(tmp_path, [{"match": "", "answer": "AA", "delay": ACK_DELAY}])
    listener.start()
    adapter = hl7v2_run(tmp_path, hapi_url, listener, ack_timeout_seconds=ACK_TIMEOUT,
                        resend_initial_seconds=4 * (ACK_DELAY - ACK_TIMEOUT) + 1, resend_max_seconds=10)
    adapter.start_cursor_at(server_now(client))
    for n in range(LATE_IDS):  # 20 patients, one DFT^P03 each
        client.transaction(namespaced("01", f"{fhir_ns}x{n:02d}"))
    started = time.monotonic()
    adapter.start("run")
    try:
        ledger = SqliteLedger(adapter.state)

        def all_acknowledged() -> bool:
            counts = ledger.counts() if adapter.state.exists() else {}
            return counts.get("sent", 0) >= LATE_IDS and not counts.get("pending")

        wait_for(all_acknowledged, 120, "every message to be acknowledged", every=0.5)
        took = time.monotonic() - started
    finally:
        adapter.stop_all()
        listener.stop()
    copies = Counter(r["control_id"] for r in listener.records(fhir_ns))
    print(f"{LATE_IDS} control ids, {sum(copies.values())} messages received, at most {max(copies.values())} "
          f"copies of one, all acknowledged after {took:.1f} s (ACKs {ACK_DELAY:g} s late, timeout {ACK_TIMEOUT:g} s)")
    assert len(copies) == LATE_IDS
    assert max(copies.values()) <= 2, copies
    assert ledger.counts() == {"sent": LATE_IDS}


SKEW_MINUTES = 20


def faketime(minutes: int) -> list[str]:
    """libfaketime (Debian: faketime; .ci/run installs it): the process's wall clock `minutes` off, nothing else's.
    The monotonic clock stays true, as on a host whose wall clock is wrong (and faked, it hangs timed waits)."""
    if shutil.which("faketime") is None:
        pytest.fail("this test needs libfaketime's `faketime` command (Debian package faketime; .ci/run installs "
                    "it)", pytrace=False)
    return ["env", "FAKETIME_DONT_FAKE_MONOTONIC=1", "faketime", "-f", f"{minutes:+d}m"]


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_a_replica_20_minutes_off_reports_true_ages_and_retries_with_backoff(
        backend: str, tmp_path: Path, fhir_ns: str, request: pytest.FixtureRequest) -> None:
    """`serve` with its clock 20 minutes ahead and one 20 minutes behind, each on a state of its own, while the
    FHIR server is unreachable (nothing listens there): the received work waits for retries. /healthz must
    give the queue's true age (not 1200 s), the skew against the database (PostgreSQL), and the retries must
    keep their backoff (not postponed by 20 minutes, nor run without a wait)."""
    nobody = f"http://127.0.0.1:{free_port()}/fhir"
    adapters: dict[int, Adapter] = {}
    for minutes in (SKEW_MINUTES, -SKEW_MINUTES):
        folder = tmp_path / f"skew{minutes:+d}"
        folder.mkdir()
        location = pg.with_schema(request.getfixturevalue("postgres_url"), pg.new_schema()) \
            if backend == "postgres" else str(folder / "state.sqlite")
        adapter = Adapter(folder, nobody, state={"location": location}, wrapper=faketime(minutes),
                          server={"url": nobody, "retry_seconds": 0, "connect_timeout": 1},
                          worker={"retry_initial_seconds": 1, "retry_max_seconds": 2},
                          health={"deadline_seconds": 3, "max_clock_skew_seconds": 5})
        adapter.start("serve")
        adapters[minutes] = adapter
    try:
        for adapter in adapters.values():
            adapter.wait_healthy(60)
            procedure = next(e["resource"] for e in namespaced("01", fhir_ns)["entry"]
                             if e["resource"]["resourceType"] == "Procedure")
            assert notify_put(adapter, procedure).status_code == 200
        received = time.monotonic()
        time.sleep(8)  # the work is retried meanwhile: 1 s, 2 s, 2 s ... (with jitter)
        waited = time.monotonic() - received
        results = {}
        for minutes, adapter in adapters.items():
            code, body = health_of(adapter)
            state = open_state(adapter.settings["state"]["location"])
            [item] = state.queued()
            results[minutes] = (code, body, item.attempts)
    finally:
        for adapter in adapters.values():
            adapter.stop_all()
        if backend == "postgres":
            for adapter in adapters.values():
                location = adapter.settings["state"]["location"]
                pg.drop_schema(location, location.rsplit("schema=", 1)[1])
    for minutes, (code, body, attempts) in results.items():
        print(f"{backend} {minutes:+d} min: /healthz {code}, oldest_queued_seconds {body.get('oldest_queued_seconds')} "
              f"(really {waited:.0f}), clock_skew_seconds {body.get('clock_skew_seconds')}, {attempts} attempts in "
              f"{waited:.0f} s")
        assert code == 200, body
        assert waited - 3 <= body["oldest_queued_seconds"] <= waited + 8, body  # the monitor reads every second
        assert 3 <= attempts <= 12, f"{minutes:+d} min: {attempts} attempts in {waited:.0f} s"
        if backend == "postgres":
            assert abs(body["clock_skew_seconds"] - minutes * 60) < 5, body
            assert body["warnings"][0].startswith(f"this host's clock is {SKEW_MINUTES * 60} s "
                                                  f"{'ahead of' if minutes > 0 else 'behind'} the state's")
        else:  # one file, one host: the state's clock is the process's own
            assert body["clock_skew_seconds"] == 0 and "warnings" not in body
    for minutes, adapter in adapters.items():  # SIGTERM was acted on under libfaketime: a clean stop, no kill
        assert "stopped" in adapter.log().splitlines(), f"{minutes:+d} min: {adapter.log()[-2000:]}"
