"""Loops that cannot die silently, in one process: failures are survived, counted, logged once per kind, and
turned into an honest /healthz verdict."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from adapter.client.errors import FhirTransportError
from adapter.errors import StateUnavailable
from adapter.health import Health
from adapter.metrics import Metrics
from adapter.runner import Loop, Runner, WorkPolicy, backoff, failure_kind
from adapter.settings import HealthSettings
from adapter.state.base import StateStats


class Clock:
    """time.monotonic, plus an offset a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def scripted(*steps: BaseException | None) -> tuple[Callable[[], float], list[int]]:
    """A turn that raises the given exceptions in order, then succeeds (None: succeed) forever."""
    calls = [0]

    def turn() -> float:
        calls[0] += 1
        step = steps[calls[0] - 1] if calls[0] <= len(steps) else None
        if step is not None:
            raise step
        return 0.01

    return turn, calls


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def runner_for(*loops: Loop, health: Health | None = None) -> tuple[Runner, Metrics, Health]:
    metrics = Metrics()
    health = health or Health(HealthSettings())
    return Runner(list(loops), health=health, metrics=metrics, backoff_initial=0.01, backoff_max=0.02), metrics, \
        health


def test_a_loop_survives_bugs_logs_them_once_with_a_traceback_and_says_when_it_recovers(
        caplog: pytest.LogCaptureFixture) -> None:
    turn, calls = scripted(KeyError("x"), KeyError("y"), KeyError("z"))
    runner, metrics, _ = runner_for(Loop("worker", turn))
    with caplog.at_level(logging.DEBUG, logger="adapter.runner"):
        runner.start()
        wait_until(lambda: calls[0] >= 5)
        runner.stop()
        assert runner.join(5)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None and "(bug)" in errors[0].getMessage()
    assert any("recovered after 3 failures (bug)" in r.getMessage() for r in caplog.records)
    assert metrics.value("charge_adapter_failures_total", kind="bug") == 3


def test_an_outage_is_one_warning_line_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    refused = FhirTransportError("GET", "http://fhir/Procedure", "connection failed: Connection refused", 5)
    turn, calls = scripted(*[refused] * 4)
    runner, metrics, _ = runner_for(Loop("poll", turn))
    with caplog.at_level(logging.INFO, logger="adapter.runner"):
        runner.start()
        wait_until(lambda: calls[0] >= 6)
        runner.stop()
        runner.join(5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.exc_info for r in warnings] == [None, None]  # the failure, then the recovery
    assert "(fhir-unreachable)" in warnings[0].getMessage() and "recovered" in warnings[1].getMessage()
    assert metrics.value("charge_adapter_failures_total", kind="fhir-unreachable") == 4


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop that dies
def test_health_reports_a_failing_a_stuck_and_a_stopped_loop() -> None:
    clock = Clock()
    health = Health(HealthSettings(server_unreachable_seconds=30, stuck_loop_seconds=60), clock=clock)
    release, entered = threading.Event(), threading.Event()

    def stuck() -> float:
        entered.set()
        release.wait(10)
        return 0.01

    def dies() -> float:
        raise SystemExit("a BaseException ends the thread")

    failing, failing_calls = scripted(*[RuntimeError("bug")] * 10_000)
    runner, metrics, _ = runner_for(Loop("failing", failing), Loop("stuck", stuck), Loop("dies", dies),
                                    health=health)
    runner.start()
    try:
        wait_until(lambda: not next(s for s in runner.status() if s.name == "dies").alive)
        wait_until(lambda: failing_calls[0] >= 2 and entered.is_set())  # both began before the clock moves on
        verdict = health.check()
        assert verdict.reasons == ["loop dies stopped"]
        clock.offset = 61
        reasons = health.check().reasons
        assert "loop dies stopped" in reasons
        assert any(r.startswith("loop failing failing for ") and r.endswith(": bug") for r in reasons)
        assert any(r.startswith("loop stuck stuck in one turn for ") for r in reasons)
        assert health.check().body["loops"]["failing"] == "failing: bug"
        assert "charge_adapter_loop_up{loop=\"failing\"} 0.0" in metrics.render()
    finally:
        release.set()
        runner.stop()
        runner.join(5)


def test_an_unwritable_state_is_reported_at_once_and_cleared_by_a_successful_write() -> None:
    turn, calls = scripted(StateUnavailable("/var/lib/s.sqlite", "disk full: free space"), None)
    runner, _, health = runner_for(Loop("monitor", turn))
    runner.start()
    wait_until(lambda: calls[0] >= 1 and not health.state_writable)
    verdict = health.check()
    assert not verdict.ok and verdict.reasons[0].startswith("state unwritable for ")
    assert verdict.reasons[0].endswith("disk full: free space") and verdict.body["status"] == "unavailable"
    health.state_ok()
    assert health.check().ok
    runner.stop()
    runner.join(5)


def test_the_fhir_server_counts_as_unusable_only_after_the_threshold() -> None:
    clock = Clock()
    health = Health(HealthSettings(server_unreachable_seconds=120), clock=clock)
    health.fhir(False, "connection refused")
    assert health.check().ok
    clock.offset = 121
    assert health.check().reasons[0].startswith("FHIR server unusable for 121 s: connection refused")
    health.fhir(True)
    assert health.check().ok


def test_stop_cuts_waits_short() -> None:
    wake = threading.Event()
    turn, calls = scripted()
    runner, _, _ = runner_for(Loop("slow", lambda: (turn(), 3600.0)[1], wake))
    runner.start()
    wait_until(lambda: calls[0] >= 1)
    started = time.monotonic()
    runner.stop()
    assert runner.join(5) and time.monotonic() - started < 2


def test_work_policy_retries_outages_forever_and_gives_bugs_a_bounded_number_of_tries() -> None:
    policy = WorkPolicy(initial=2, maximum=60, max_attempts=5)
    outage = FhirTransportError("POST", "http://fhir", "connection failed", 5)
    assert policy.decide(1000, outage, rng=lambda: 1.0) == 60
    assert policy.decide(1, outage, rng=lambda: 1.0) == 2 and policy.decide(3, outage, rng=lambda: 1.0) == 8
    assert policy.decide(4, KeyError("x"), rng=lambda: 0.0) == 8  # jitter: between half and the whole delay
    assert policy.decide(5, KeyError("x")) is None
    assert backoff(50, 1, 30, rng=lambda: 1.0) == 30
    assert failure_kind(StateUnavailable("s", "locked")) == "state-unavailable"


def test_an_old_queued_item_makes_health_fail() -> None:
    health = Health(HealthSettings(max_queue_age_seconds=900), wall=lambda: 10_000.0, clock=lambda: 0.0)
    health.set_stats(StateStats(queue_depth=3, retry_backlog=2, oldest_queued_at=9_500.0, dead=0, reviews_open=0,
                                cursor=None))
    assert health.check().ok and health.oldest_queued_seconds() == 500
    health.set_stats(StateStats(3, 2, 9_000.0, 0, 0, None))
    verdict = health.check()
    assert verdict.reasons == ["oldest queued item has waited 1000 s"]
    assert verdict.body["retry_backlog"] == 2 and verdict.body["oldest_queued_seconds"] == 1000
