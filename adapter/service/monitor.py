"""The monitor: a heartbeat to the state at least three times per health deadline (is it writable? how far is our
clock from the state's?), fresh stats for /healthz and /metrics, hourly pruning, and the status."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from adapter.errors import StateUnavailable
from adapter.service.core import ServiceCore
from adapter.service.records import Status, parse_instant

log = logging.getLogger("adapter.service")

PRUNE_EVERY_SECONDS = 3600.0
MONITOR_EVERY_SECONDS = 5.0


class Monitor(ServiceCore):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_prune = 0.0
        self._register_gauges()

    def _register_gauges(self) -> None:
        health, gauge = self.health, self.metrics.gauge

        def stat(name: str) -> Callable[[], float | None]:
            return lambda: getattr(health.stats, name) if health.stats is not None else None

        gauge("charge_adapter_queue_depth", stat("queue_depth"), "Queued work not yet done (received and retries)")
        gauge("charge_adapter_retry_backlog", stat("retry_backlog"), "Queued work waiting for a retry after failing")
        gauge("charge_adapter_dead_letters", stat("dead"), "Work given up and sent to review (a bug, not an outage)")
        gauge("charge_adapter_reviews_open", stat("reviews_open"), "Open review entries")
        gauge("charge_adapter_oldest_queued_seconds", health.oldest_queued_seconds,
              "Age of the oldest queued work item (0 when the queue is empty)")
        gauge("charge_adapter_last_write_success_timestamp_seconds", lambda: health.last_write,
              "When charges were last written to the FHIR server (Unix time)")
        gauge("charge_adapter_cursor_lag_seconds", self._cursor_lag,
              "Seconds between now and the polling cursor (server clock)")
        gauge("charge_adapter_healthy", lambda: 1 if health.check().ok else 0, "1 when /healthz answers 200")
        gauge("charge_adapter_clock_skew_seconds", lambda: health.skew,
              "This host's clock minus the state's (the database server's), measured at each heartbeat")

    def _cursor_lag(self) -> float | None:
        stats = self.health.stats
        cursor = stats.cursor if stats is not None else None
        return max(0.0, self.state_clock() - parse_instant(cursor).timestamp()) if cursor else None

    @property
    def monitor_every(self) -> float:
        """Heartbeats come at least three times per `health.deadline_seconds`, so one that is missed is seen
        within the deadline."""
        return min(MONITOR_EVERY_SECONDS, self.settings.health.deadline_seconds / 3)

    def monitor(self) -> float:
        """A heartbeat write (is the state writable? how far is our clock from the state's?), fresh stats for
        /healthz and /metrics, hourly pruning. Each state call has half the health deadline to answer."""
        limit = max(1.0, self.settings.health.deadline_seconds / 2)
        try:
            skew = self.state.heartbeat(timeout=limit)
            stats = self.state.stats(timeout=limit)
        except StateUnavailable as exc:
            self.health.heartbeat_failed(exc.reason)
            raise
        self.health.heartbeat_answered(skew)
        self.health.set_stats(stats)
        if time.monotonic() >= self._next_prune:
            self.prune()
            self._next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
        return self.monitor_every

    def state_clock(self) -> float:
        """The state's clock as well as the last heartbeat measured it (for coarse cut-offs; exact comparisons
        happen inside the state's transactions)."""
        return time.time() - (self.health.skew or 0.0)

    def prune(self) -> dict[str, int]:
        conf, now = self.settings.state, self.state_clock()
        removed = self.state.prune(now - conf.done_retention_days * 86400, now - conf.audit_retention_days * 86400)
        if any(removed.values()):
            log.info("pruned %d finished work items, %d audit rows, %d expired claims", removed["queue"],
                     removed["audit"], removed["claims"])
        return removed

    def status(self) -> Status:
        counts = self.state.counts()
        stats = self.state.stats()
        cursor = stats.cursor
        lag = max(0.0, self.state_clock() - parse_instant(cursor).timestamp()) if cursor else None
        return Status(cursor, lag, self.state.queue_counts(), counts["review_open"], counts["processed"],
                      stats.retry_backlog, self.state.replicas() if self.shared else [])

