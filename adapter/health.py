"""Whether the adapter can make progress, and why not: what `/healthz` answers and `/metrics` shows.

Every part reports here as it works: the state (each write that succeeds or fails), the FHIR client (each
request that got a usable answer or not), the loops (through the runner), and the monitor loop (a cached
`StateStats`, so neither `/healthz` nor `/metrics` touches the state while answering). `check()` turns
that into a verdict with reasons:

* the state cannot be written (at once: a notification would be refused with 503 anyway);
* the FHIR server has given no usable answer for `health.server_unreachable_seconds`;
* the oldest queued item has waited `health.max_queue_age_seconds`;
* a loop died, is stuck in one turn for `health.stuck_loop_seconds`, or has failed every turn for
  `health.server_unreachable_seconds`.
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

    def wrote(self) -> None:
        self.last_write = self._wall()

    def set_stats(self, stats: StateStats) -> None:
        self.stats = stats

    def watch_loops(self, loops: Callable[[], list[LoopStatus]]) -> None:
        self._loops = loops

    # -- verdict ----------------------------------------------------------------------------------------------

    @property
    def state_writable(self) -> bool:
        return self._state.failing_since is None

    def check(self) -> Verdict:
        now, wall = self._clock(), self._wall()
        conf = self.settings
        reasons: list[str] = []
        with self._lock:
            state, fhir = _Component(self._state.failing_since, self._state.reason), \
                _Component(self._fhir.failing_since, self._fhir.reason)
        if state.failing_since is not None:
            reasons.append(f"state unwritable for {now - state.failing_since:.0f} s: {state.reason}")
        if fhir.failing_since is not None and now - fhir.failing_since >= conf.server_unreachable_seconds:
            reasons.append(f"FHIR server unusable for {now - fhir.failing_since:.0f} s: {fhir.reason}")
        stats = self.stats
        oldest = wall - stats.oldest_queued_at if stats and stats.oldest_queued_at else None
        if oldest is not None and oldest >= conf.max_queue_age_seconds:
            reasons.append(f"oldest queued item has waited {oldest:.0f} s")
        loops = {}
        for loop in self._loops():
            status = "ok"
            if not loop.alive:
                status = "stopped"
                reasons.append(f"loop {loop.name} stopped")
            elif loop.turn_started is not None and now - loop.turn_started >= conf.stuck_loop_seconds:
                status = "stuck"
                reasons.append(f"loop {loop.name} stuck in one turn for {now - loop.turn_started:.0f} s")
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
        body["last_write"] = self.last_write
        if loops:
            body["loops"] = loops
        return Verdict(not reasons, reasons, body)

    def oldest_queued_seconds(self) -> float | None:
        stats = self.stats
        if stats is None:
            return None
        return max(0.0, self._wall() - stats.oldest_queued_at) if stats.oldest_queued_at else 0.0
