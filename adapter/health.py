"""Whether the adapter can make progress, and why not: what `/healthz` answers and `/metrics` shows.

Every part reports here as it works: the state (each write that succeeds or fails), the FHIR client (each
request that got a usable answer or not), the loops (through the runner), and the monitor loop (a cached
`StateStats`, so neither `/healthz` nor `/metrics` touches the state while answering). `check()` turns
that into a verdict with reasons:

* the state cannot be written (at once: a notification would be refused with 503 anyway);
* the state has not answered a heartbeat for `health.deadline_seconds` ("state not answering for N s"):
  every heartbeat has a client-side deadline, so a stopped or hung database server is named, not waited on;
* the FHIR server has given no usable answer for `health.server_unreachable_seconds`;
* the oldest queued item has waited `health.max_queue_age_seconds`;
* the HL7 v2 receiver has failed every send (no connection, no ACK in time) for
  `health.hl7v2_unreachable_seconds`;
* a loop died, has waited on one state call for `health.deadline_seconds`, is stuck in one turn for
  `health.stuck_loop_seconds` (saying what it waits on: adapter.waits), or has failed every turn for
  `health.server_unreachable_seconds`.

Ages are computed on the state's clock (the database server's, for PostgreSQL: `StateStats.read_at`), never
by subtracting a stored time from the local clock; the local clock's skew against the state's, measured at
each heartbeat, is named in `warnings` beyond `health.max_clock_skew_seconds`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adapter.settings import HealthSettings
from adapter.state.base import StateStats


@dataclass
class LoopStatus:
    """What the runner knows about one loop (monotonic times)."""

    name: str
    alive: bool = True
    turn_started: float | None = None
    failing_since: float | None = None
    last_error: str = ""
    turns: int = 0
    waiting_on: str = ""
    """What the loop's thread waits on right now (adapter.waits), and since when (monotonic)."""
    waiting_since: float | None = None


@dataclass
class _Component:
    failing_since: float | None = None
    reason: str = ""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reasons: list[str] = field(default_factory=list)
    body: dict[str, Any] = field(default_factory=dict)


class Health:
    """Thread-safe health board."""

    def __init__(self, settings: HealthSettings | None = None, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.settings = settings or HealthSettings()
        self._clock, self._wall = clock, wall
        self._lock = threading.Lock()
        self._state = _Component()
        self._fhir = _Component()
        self._hl7v2: _Component | None = None
        """None: no HL7 v2 sink."""
        self.hl7v2_where = ""
        self._answered: float | None = None
        """When the state last answered a heartbeat (monotonic); None while nobody beats (`watch_heartbeats`)."""
        self._unanswered_reason = ""
        self.skew: float | None = None
        """The local clock minus the state's, at the last heartbeat."""
        self._stats_read = 0.0
        self.last_write: float | None = None
        """Wall time of the last successful write of charges to the FHIR server."""
        self.stats: StateStats | None = None
        self._loops: Callable[[], list[LoopStatus]] = list

    # -- reports ----------------------------------------------------------------------------------------------

    def state_ok(self) -> None:
        with self._lock:
            self._state = _Component()

    def state_failed(self, reason: str) -> None:
        with self._lock:
            if self._state.failing_since is None:
                self._state.failing_since = self._clock()
            self._state.reason = reason

    def fhir(self, reachable: bool, reason: str = "") -> None:
        """The FHIR client's observer: every logical request ends here."""
        with self._lock:
            if reachable:
                self._fhir = _Component()
            else:
                if self._fhir.failing_since is None:
                    self._fhir.failing_since = self._clock()
                self._fhir.reason = reason

    def watch_heartbeats(self) -> None:
        """A monitor loop beats from now on: a state that stops answering it is reported (the start counts as
        an answer)."""
        with self._lock:
            self._answered = self._clock()

    def heartbeat_answered(self, skew: float | None = None) -> None:
        with self._lock:
            self._answered = self._clock()
            self._unanswered_reason = ""
            self._state = _Component()
            self.skew = skew

    def heartbeat_failed(self, reason: str) -> None:
        with self._lock:
            self._unanswered_reason = reason
        self.state_failed(reason)

    def sink_enabled(self, where: str) -> None:
        """The HL7 v2 sink is on (its receiver is `where`): /healthz reports on it."""
        with self._lock:
            self._hl7v2 = _Component()
            self.hl7v2_where = where

    def hl7v2(self, reachable: bool, reason: str = "") -> None:
        """The HL7 v2 sink's observer: every send ends here (an ACK, or no usable answer)."""
        with self._lock:
            if reachable:
                self._hl7v2 = _Component()
            else:
                component = self._hl7v2 or _Component()
                if component.failing_since is None:
                    component.failing_since = self._clock()
                component.reason = reason
                self._hl7v2 = component

    def wrote(self) -> None:
        self.last_write = self._wall()

    def set_stats(self, stats: StateStats) -> None:
        self.stats, self._stats_read = stats, self._clock()

    def watch_loops(self, loops: Callable[[], list[LoopStatus]]) -> None:
        self._loops = loops

    # -- verdict ----------------------------------------------------------------------------------------------

    @property
    def state_writable(self) -> bool:
        return self._state.failing_since is None

    def check(self) -> Verdict:
        now = self._clock()
        conf = self.settings
        reasons: list[str] = []
        with self._lock:
            state, fhir = _Component(self._state.failing_since, self._state.reason), \
                _Component(self._fhir.failing_since, self._fhir.reason)
            hl7 = None if self._hl7v2 is None else _Component(self._hl7v2.failing_since, self._hl7v2.reason)
            silent = None if self._answered is None else now - self._answered
            why = self._unanswered_reason
        if silent is not None and silent >= conf.deadline_seconds:
            reasons.append(f"state not answering for {silent:.0f} s"
                           + (f": {why}" if why else " (a heartbeat is still waiting for it)"))
        elif state.failing_since is not None:
            reasons.append(f"state unwritable for {now - state.failing_since:.0f} s: {state.reason}")
        if fhir.failing_since is not None and now - fhir.failing_since >= conf.server_unreachable_seconds:
            reasons.append(f"FHIR server unusable for {now - fhir.failing_since:.0f} s: {fhir.reason}")
        if hl7 is not None and hl7.failing_since is not None \
                and now - hl7.failing_since >= conf.hl7v2_unreachable_seconds:
            reasons.append(f"HL7 v2 receiver {self.hl7v2_where} failing for {now - hl7.failing_since:.0f} s: "
                           f"{hl7.reason}")
        stats = self.stats
        oldest = self.oldest_queued_seconds() or None
        if oldest is not None and oldest >= conf.max_queue_age_seconds:
            reasons.append(f"oldest queued item has waited {oldest:.0f} s")
        loops = {}
        for loop in self._loops():
            status = "ok"
            if not loop.alive:
                status = "stopped"
                reasons.append(f"loop {loop.name} stopped")
            elif loop.waiting_since is not None and loop.waiting_on.startswith("the state") \
                    and now - loop.waiting_since >= conf.deadline_seconds:
                status = f"waiting on {loop.waiting_on} for {now - loop.waiting_since:.0f} s"
                reasons.append(f"loop {loop.name} {status}")
            elif loop.turn_started is not None and now - loop.turn_started >= conf.stuck_loop_seconds:
                status = "stuck"
                waits = (f", waiting on {loop.waiting_on} for {now - loop.waiting_since:.0f} s"
                         if loop.waiting_since is not None else "")
                reasons.append(f"loop {loop.name} stuck in one turn for {now - loop.turn_started:.0f} s{waits}")
            elif loop.failing_since is not None:
                status = f"failing: {loop.last_error}"
                if now - loop.failing_since >= conf.server_unreachable_seconds:
                    reasons.append(f"loop {loop.name} failing for {now - loop.failing_since:.0f} s: "
                                   f"{loop.last_error}")
            loops[loop.name] = status
        body: dict[str, Any] = {"status": "unavailable" if reasons else "ok", "reasons": reasons}
        if stats is not None:
            body.update(queue_depth=stats.queue_depth, retry_backlog=stats.retry_backlog,
                        oldest_queued_seconds=round(oldest, 1) if oldest is not None else None,
                        reviews_open=stats.reviews_open)
        body["fhir"] = "ok" if fhir.failing_since is None else f"failing for {now - fhir.failing_since:.0f} s"
        if hl7 is not None:
            body["hl7v2"] = "ok" if hl7.failing_since is None else \
                f"failing for {now - hl7.failing_since:.0f} s: {hl7.reason}"
        body["last_write"] = self.last_write
        if loops:
            body["loops"] = loops
        skew = self.skew
        if skew is not None:
            body["clock_skew_seconds"] = round(skew, 3)
            if abs(skew) > conf.max_clock_skew_seconds:
                body["warnings"] = [f"this host's clock is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} "
                                    f"the state's (the database server's; bound {conf.max_clock_skew_seconds:g} "
                                    "s): ages and retry times use the state's clock, but fix the host's time "
                                    "(NTP)"]
        return Verdict(not reasons, reasons, body)

    def oldest_queued_seconds(self) -> float | None:
        """The oldest queued item's age on the state's clock: its age when the stats were read, plus the time
        since (measured locally, where only a duration is needed)."""
        stats = self.stats
        if stats is None:
            return None
        if not stats.oldest_queued_at:
            return 0.0
        read_at = stats.read_at if stats.read_at is not None else self._wall()
        return max(0.0, read_at - stats.oldest_queued_at + (self._clock() - self._stats_read))
