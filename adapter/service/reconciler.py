"""The reconciler: at start and then every `poll.reconcile_every_seconds`, what this state is responsible for is
re-coded and compared with what the server holds, and what is due is repaired."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from adapter.reconciliation import ReconcileResult, in_scope
from adapter.service.poller import Poller
from adapter.sources.server import chunks
from adapter.state.base import PassRecord

log = logging.getLogger("adapter.service")

RECONCILE_FROM = "reconcile-from"
"""The cursor a state's reconciliations start from: its first poll cursor (what it is responsible for)."""


class Reconciler(Poller):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_reconcile = 0.0
        """Monotonic time of the next scheduled reconciliation: at start, then every reconcile_every_seconds."""
        self.last_reconcile: ReconcileResult | None = None

    def reconcile_if_due(self, stop: threading.Event | None = None) -> ReconcileResult | None:
        """At start and then every `poll.reconcile_every_seconds`: re-code what this state is responsible for
        (every FNA Procedure changed since the first cursor it had; everything when it started without one),
        compare with what the server holds, and repair what is due: charges a restored server lost, lines
        still ours that drifted, credits for billed lines. Lines no longer ours are never touched; lines others
        changed where our coding differs go to review. On a shared state only the poll role holder runs it."""
        every = self.settings.poll.reconcile_every_seconds
        if not every or time.monotonic() < self._next_reconcile:
            return None
        if self.shared and not self._hold_poll_role():
            return None
        self._next_reconcile = time.monotonic() + every
        origin = self.state.cursor(RECONCILE_FROM)
        if origin is None:
            origin = self.state.cursor()
            if origin:
                self.state.record_pass(PassRecord(owner=self.owner, cursors={RECONCILE_FROM: origin}))
        self.client.check_server()
        patients, loose, scope = in_scope(self.syncer, origin)
        result = ReconcileResult(patients=len(patients))
        # batches of the workers' size, so a batch is done well within the claims' lease, as a worker's is
        batches: list[tuple[list[str], list[dict[str, Any]]]] = [
            (batch, []) for batch in chunks(sorted(patients), self._batch)]
        if loose:
            batches.append(([], loose))
        for batch, pushed in batches:
            if stop is not None and stop.is_set():
                return result
            if self.shared and not self._hold_poll_role():  # lost the role (a long pause): the holder redoes it
                log.warning("stopped reconciling: the poll role passed to another replica")
                return result
            done = self.sync_patients(batch, pushed, stop, scope)
            record, failing = self.pass_record(done)
            record.due += self.retry_work(failing)
            self.state.record_pass(record)
            result.summary.add(done.summary)
            result.drift += done.summary.drift_items
            result.edits_kept += done.summary.edits_kept
        result.repaired = True
        for kind, count in sorted(result.summary.drift.items()):
            self.metrics.inc("charge_adapter_drift_total", count, kind=kind)
        self.metrics.inc("charge_adapter_reconcile_runs_total")
        self.last_reconcile = result
        found = ", ".join(f"{k} {n}" for k, n in sorted(result.summary.drift.items())) or "none"
        log.info("reconciled %d patient(s) since %s: drift %s; written %d, credited %d, voided %d",
                 len(patients), origin or "the beginning", found, result.summary.written, result.summary.credits,
                 result.summary.voided)
        return result
