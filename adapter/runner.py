"""Background loops that cannot die silently: start, stop, join, and what `/healthz` needs to know.

A loop is a name and a `turn` (one unit of work that returns how long to wait before the next). The
runner calls turns in a thread of their own, forever: any exception is counted by kind
(`charge_adapter_failures_total{kind}`), logged once per kind (a traceback for a bug, one line for an
outage; a line again on recovery), and answered with an exponential backoff. Retrying *work* is not the
loop's job: the worker puts each failed item back with its own backoff (`WorkPolicy`), so a turn only
fails when something around the work fails (the state, the server before any work was taken).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from adapter import waits
from adapter.client.errors import (
    AuthError,
    FhirConflict,
    FhirHttpError,
    FhirRateLimited,
    FhirServerError,
    FhirTransportError,
    FhirUnauthorized,
)
from adapter.errors import FhirError, OutputError, StateError, StateUnavailable
from adapter.health import Health, LoopStatus
from adapter.metrics import Metrics
from adapter.redact import scrub

log = logging.getLogger("adapter.runner")


def failure_kind(exc: BaseException) -> str:
    """A short, stable name for what went wrong: a metric label and the unit of "log once"."""
    if isinstance(exc, StateUnavailable):
        return "state-unavailable"
    if isinstance(exc, StateError):
        return "state"
    if isinstance(exc, FhirTransportError):
        return "fhir-unreachable"
    if isinstance(exc, FhirServerError | FhirRateLimited):
        return "fhir-server"
    if isinstance(exc, FhirUnauthorized | AuthError):
        return "fhir-auth"
    if isinstance(exc, FhirConflict):
        return "fhir-conflict"
    if isinstance(exc, FhirHttpError):
        return "fhir-rejected"
    if isinstance(exc, FhirError):
        return "fhir"
    if isinstance(exc, OutputError):
        return "invalid-output"
    return "bug"


EXPECTED_KINDS = frozenset({"state-unavailable", "fhir-unreachable", "fhir-server", "fhir-auth", "fhir-conflict"})
"""Kinds that are the environment, not the adapter: one line, no traceback."""


def backoff(attempts: int, initial: float, maximum: float, rng: Callable[[], float] = random.random) -> float:
    """initial, 2x, 4x ... capped at `maximum`, each with jitter (between half and the whole delay)."""
    delay = min(maximum, initial * 2.0 ** max(0, attempts - 1))
    return delay * (0.5 + 0.5 * rng())


class LogOnce:
    """Logs a failure the first time its kind appears in a place, and once more when the place recovers."""

    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self._current: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    def failed(self, where: str, exc: BaseException, what: str = "failed") -> None:
        self.failed_as(where, failure_kind(exc), scrub(str(exc)), what, exc)

    def failed_as(self, where: str, kind: str, message: str, what: str = "failed",
                  exc: BaseException | None = None) -> None:
        with self._lock:
            previous, count = self._current.get(where, ("", 0))
            self._current[where] = (kind, count + 1 if previous == kind else 1)
        if previous == kind:
            self.log.debug("%s %s again (%s): %s", where, what, kind, message)
        elif kind in EXPECTED_KINDS or exc is None:
            self.log.warning("%s %s (%s): %s; retrying with backoff (logged once until it changes)",
                             where, what, kind, message)
        else:
            self.log.error("%s %s (%s): %s; retrying with backoff", where, what, kind, message, exc_info=exc)

    def succeeded(self, where: str) -> None:
        with self._lock:
            kind, count = self._current.pop(where, ("", 0))
        if count:
            self.log.warning("%s recovered after %d failure%s (%s)", where, count, "s" if count != 1 else "", kind)


@dataclass
class Loop:
    """`turn` does one unit of work and returns the seconds to wait before the next; `wake` cuts a wait short."""

    name: str
    turn: Callable[[], float]
    wake: threading.Event | None = None
    max_backoff: float | None = None
    """The longest wait after failed turns (default: the runner's); keep it near the loop's own rhythm, so a
    loop resumes soon after an outage ends."""


class Runner:
    """Runs loops in daemon threads until `stop()`; `health` learns about each of them."""

    def __init__(self, loops: list[Loop], *, health: Health, metrics: Metrics, backoff_initial: float = 1.0,
                 backoff_max: float = 60.0) -> None:
        self.loops = loops
        self.health = health
        self.metrics = metrics
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.stopping = threading.Event()
        self._status = {loop.name: LoopStatus(loop.name) for loop in loops}
        self._threads: list[threading.Thread] = []
        self._log = LogOnce(log)
        health.watch_loops(self.status)
        for loop in loops:
            metrics.gauge("charge_adapter_loop_up", lambda name=loop.name: 1 if self._up(name) else 0,
                          "1 while the loop runs and its last turn succeeded", loop=loop.name)

    def _up(self, name: str) -> bool:
        status = self._status[name]
        return status.alive and status.failing_since is None

    def status(self) -> list[LoopStatus]:
        out = []
        for s in self._status.values():
            thread = next((t for t in self._threads if t.name == s.name), None)
            what, since = waits.of_thread(thread.ident if thread else None) or ("", None)
            out.append(LoopStatus(s.name, s.alive and self._thread_alive(s.name), s.turn_started, s.failing_since,
                                  s.last_error, s.turns, what, since))
        return out

    def _thread_alive(self, name: str) -> bool:
        thread = next((t for t in self._threads if t.name == name), None)
        return thread is None or thread.is_alive() or self.stopping.is_set()

    def start(self) -> None:
        for loop in self.loops:
            thread = threading.Thread(target=self._run, args=(loop,), name=loop.name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        """Ask every loop to stop after its current turn (a sync finishes the session it is writing)."""
        self.stopping.set()
        for loop in self.loops:
            if loop.wake is not None:
                loop.wake.set()

    def join(self, timeout: float = 60.0) -> bool:
        """Wait for the loops; True when all ended within `timeout`."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _run(self, loop: Loop) -> None:
        status = self._status[loop.name]
        failures = 0
        try:
            while not self.stopping.is_set():
                status.turn_started = time.monotonic()
                try:
                    delay = loop.turn()
                    failures = 0
                    status.failing_since, status.last_error = None, ""
                    self._log.succeeded(f"loop {loop.name}")
                except Exception as exc:  # the loop outlives every failure; see the module docstring
                    failures += 1
                    kind = failure_kind(exc)
                    self.metrics.inc("charge_adapter_failures_total", kind=kind)
                    if status.failing_since is None:
                        status.failing_since = time.monotonic()
                    status.last_error = kind
                    if isinstance(exc, StateUnavailable):
                        self.health.state_failed(exc.reason)
                    self._log.failed(f"loop {loop.name}", exc, "turn failed")
                    delay = backoff(failures, self.backoff_initial, loop.max_backoff or self.backoff_max)
                finally:
                    status.turn_started = None
                    status.turns += 1
                self._wait(loop, delay)
        finally:
            status.alive = self.stopping.is_set()
            if not self.stopping.is_set():  # only a BaseException (SystemExit ...) gets here
                log.critical("loop %s ended unexpectedly", loop.name)

    def _wait(self, loop: Loop, delay: float) -> None:
        if delay <= 0:
            return
        if loop.wake is None:
            self.stopping.wait(delay)
            return
        loop.wake.wait(delay)
        loop.wake.clear()


def is_transient(exc: BaseException) -> bool:
    """Failures of the environment that pass by themselves: retried for as long as they last."""
    kind = failure_kind(exc)
    return kind in EXPECTED_KINDS or kind == "fhir"


@dataclass(frozen=True)
class WorkPolicy:
    """When a failed work item runs again, or whether it is given up (a pure rule).

    A FHIR outage or a busy state is retried forever with backoff: the work is never recorded as done and
    never needs a person. Anything else (a bug, a malformed answer) gets `max_attempts` tries, then goes to
    the review queue with everything needed to replay it.
    """

    initial: float = 2.0
    maximum: float = 60.0
    max_attempts: int = 5

    def decide(self, attempts: int, exc: BaseException, rng: Callable[[], float] = random.random) -> float | None:
        """Seconds until the item may run again, or None to give it up."""
        if not is_transient(exc) and attempts >= self.max_attempts:
            return None
        return backoff(attempts, self.initial, self.maximum, rng)
