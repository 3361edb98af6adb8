"""Unattended operation: polling with a durable cursor, draining received work, recording every outcome.

The engine and writer are the ones `sync` uses; this layer adds what running for months needs: the cursor
(server clock only), de-duplication on Procedure id + versionId, the review queue, the audit log, and one
lock so two threads never write the same patient's charges at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from adapter.client import FhirClient
from adapter.client.auth import auth_from_settings
from adapter.client.errors import FhirGone, FhirNotFound
from adapter.config import CodeTables
from adapter.errors import AdapterError
from adapter.extraction.index import reference_of, version_of
from adapter.metrics import Metrics
from adapter.settings import AppSettings, ServerSettings
from adapter.state.store import StateStore, WorkItem
from adapter.sync import Syncer, SyncSummary, split_by_patient

log = logging.getLogger("adapter.service")


def make_client(server: ServerSettings) -> FhirClient:
    if not server.url:
        raise AdapterError("no FHIR server configured: set server.url in the config file or "
                           "CHARGE_ADAPTER__SERVER__URL")
    return FhirClient(server.url, auth=auth_from_settings(server.auth or None),
                      timeout=(server.connect_timeout, server.read_timeout),
                      verify=server.ca_bundle or True, cert=server.client_cert or None)


def parse_instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class Status:
    cursor: str | None
    lag_seconds: float | None
    queue: dict[str, int]
    reviews_open: int
    processed: int


class Service:
    def __init__(self, settings: AppSettings, tables: CodeTables, *, client: FhirClient | None = None,
                 store: StateStore | None = None, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.tables = tables
        self.client = client or make_client(settings.server)
        self.store = store or StateStore(settings.state_path)
        self.syncer = Syncer(self.client, tables)
        self.syncer.source.page_size = settings.poll.page_size
        self.metrics = metrics or Metrics()
        self.write_lock = threading.Lock()
        self.poll_lock = threading.Lock()
        self.metrics.gauge("charge_adapter_queue_depth", self.store.queue_depth, "Received work not yet processed")
        self.metrics.gauge("charge_adapter_cursor_lag_seconds", self._cursor_lag,
                           "Seconds between now and the polling cursor (server clock)")

    # -- recording ----------------------------------------------------------------------------------------

    def record(self, summary: SyncSummary) -> None:
        """Processed versions, review queue (open/refresh/resolve), audit and metrics for one pass."""
        outcomes = [o for o in summary.outcomes if o.outcome != "deferred"]  # deferred: done on the next pass
        patient_of = {o.procedure: o.patient for o in outcomes}
        self.store.mark_processed([(o.procedure, o.version, o.outcome) for o in outcomes if o.version])
        keep: set[tuple[str, str]] = set()
        for review in summary.reviews:
            keep.add((review.procedure, review.reason))
            self.store.open_review(review.procedure, patient_of.get(review.procedure), "needs-review",
                                   review.reason, review.detail)
        for failure in summary.failures:
            for proc in failure.procedures:
                keep.add((proc, "write-failed"))
                self.store.open_review(proc, patient_of.get(proc), "write-failed", "write-failed", failure.reason)
        self.store.resolve_reviews(sorted(patient_of), keep)
        self.store.audit([
            {"procedure": o.procedure, "version": o.version, "session": o.session, "codes": list(o.codes),
             "table_version": self.tables.version, "written": list(o.written)}
            for o in outcomes if o.written or o.outcome == "failed"])
        self.metrics.inc("charge_adapter_coded_total", sum(1 for o in outcomes if o.outcome == "coded"))
        self.metrics.inc("charge_adapter_written_total", summary.written + summary.voided)
        self.metrics.inc("charge_adapter_review_total", len({r.procedure for r in summary.reviews}))
        self.metrics.inc("charge_adapter_failed_total", len(summary.failures))

    def sync_patients(self, patients: set[str], loose: list[dict[str, Any]] | None = None,
                      stop: threading.Event | None = None) -> SyncSummary:
        with self.write_lock:
            summary = self.syncer.sync_patients(patients, loose or [], stop.is_set if stop else None)
        self.record(summary)
        return summary

    # -- polling ------------------------------------------------------------------------------------------

    def _cursor_lag(self) -> float:
        cursor = self.store.cursor()
        return max(0.0, time.time() - parse_instant(cursor).timestamp()) if cursor else 0.0

    def poll_once(self, stop: threading.Event | None = None,
                  progress: Callable[[int], None] | None = None) -> SyncSummary:
        """Everything changed since the cursor (minus the overlap window), page by page, oldest first.

        The cursor moves to the newest `meta.lastUpdated` of a page only after that page was processed, so
        a crash re-reads at most one page, and what was read twice is skipped by id + versionId.
        """
        with self.poll_lock:  # the worker's triggered polls and the safety-net poll never overlap
            return self._poll(stop, progress)

    def _poll(self, stop: threading.Event | None, progress: Callable[[int], None] | None) -> SyncSummary:
        cursor = self.store.cursor()
        since = self._since(cursor)
        total = SyncSummary()
        for page in self.syncer.source.changed_pages(since):
            fresh = [p for p in page if not self.store.seen(f"Procedure/{p.get('id')}", version_of(p))]
            if fresh:
                patients, loose = split_by_patient(fresh)
                summary = self.sync_patients(patients, loose, stop)
                total.add(summary)
                if summary.deferred:
                    break  # stopping mid-page: the cursor stays, the next start redoes what is left
            newest = max((p.get("meta") or {}).get("lastUpdated", "") for p in page)
            if newest and (cursor is None or parse_instant(newest) > parse_instant(cursor)):
                self.store.set_cursor(newest)
                cursor = newest
            if progress:
                progress(len(page))
            if stop is not None and stop.is_set():
                return total
        if since:
            total.add(self._deleted_since(since))
        return total

    def _deleted_since(self, since: str) -> SyncSummary:
        """Deleted Procedures: recode the patients they were billed to, so their charges are voided."""
        deleted = [ref for ref in self.syncer.source.deleted_since(since) if not self.store.seen(ref, "deleted")]
        patients = {p for ref in deleted for p in self._patients_billed_for(ref)}
        summary = self.sync_patients(patients) if patients else SyncSummary()
        self.store.mark_processed([(ref, "deleted", "deleted") for ref in deleted])
        self.store.resolve_reviews(deleted)  # nothing left for an analyst to fix
        return summary

    def _since(self, cursor: str | None) -> str | None:
        """Where a poll starts: the cursor minus the overlap window (commits become visible out of order)."""
        if not cursor:
            return None
        return (parse_instant(cursor) - timedelta(seconds=self.settings.poll.overlap_seconds)).isoformat()

    def count_backlog(self) -> int | None:
        return self.syncer.source.count_changed(self._since(self.store.cursor()))

    # -- received work ------------------------------------------------------------------------------------

    def _patients_billed_for(self, reference: str) -> set[str]:
        """Whose charges bill this (deleted) Procedure: their sessions need recoding."""
        items = self.client.search_all("ChargeItem", {
            "service": reference, "identifier": f"{self.tables.settings.charge_identifier_system}|"})
        return {r for r in (reference_of(i.get("subject")) for i in items) if r}

    def process_items(self, items: list[WorkItem]) -> SyncSummary | None:
        """Turn a batch of received work into one recoding of the patients it touches."""
        patients: set[str] = set()
        loose: list[dict[str, Any]] = []
        poll = False
        for item in items:
            payload = item.payload
            if item.kind == "procedure":
                resource = payload["resource"]
                ref = f"Procedure/{resource.get('id')}"
                if item.source != "engine" and version_of(resource) and self.store.seen(ref, version_of(resource)):
                    continue  # the same notification again: already coded
                subject = reference_of(resource.get("subject"))
                if item.source == "engine" or not subject:
                    loose.append(resource)
                if subject:
                    patients.add(subject)
            elif item.kind == "resources":
                loose += payload["resources"]
                patients |= {r for r in (reference_of(x.get("subject")) for x in payload["resources"]
                                         if x.get("resourceType") == "Procedure") if r}
            elif item.kind == "delete":
                patients |= self._patients_billed_for(payload["reference"])
            elif item.kind == "fetch":
                kind, rid = payload["reference"].split("/", 1)
                try:
                    resource = self.client.read(kind, rid)
                except (FhirNotFound, FhirGone):
                    patients |= self._patients_billed_for(payload["reference"])
                    continue
                subject = reference_of(resource.get("subject"))
                if subject:
                    patients.add(subject)
            elif item.kind == "poll":
                poll = True
        summary = self.sync_patients(patients, loose) if patients or loose else None
        if poll:
            polled = self.poll_once()
            if summary is None:
                return polled
            summary.add(polled)
        return summary

    def drain(self, stop: threading.Event, wake: threading.Event) -> None:
        """Worker loop: lease work, process it, mark it done; transient failures go back to the queue."""
        batch = self.settings.worker.batch
        while not stop.is_set():
            items = self.store.take(batch)
            if not items:
                wake.wait(1.0)
                wake.clear()
                continue
            ids = [i.id for i in items]
            try:
                self.process_items(items)
            except Exception as exc:
                final = max(i.attempts for i in items) >= self.settings.worker.max_attempts
                log.warning("work items %s failed (attempt %d): %s", ids, max(i.attempts for i in items), exc)
                self.store.finish(ids, str(exc), retry=not final)
                if final:
                    for item in items:
                        ref = (item.payload.get("reference") or
                               f"Procedure/{(item.payload.get('resource') or {}).get('id', '?')}")
                        self.store.open_review(ref, None, "write-failed", "processing-failed",
                                               f"{item.kind} from {item.source}: {exc}")
                stop.wait(min(30.0, 2.0 ** max(i.attempts for i in items)))
                continue
            self.store.finish(ids)

    # -- analysts -------------------------------------------------------------------------------------------

    def replay(self, review_ids: list[int] | None = None) -> SyncSummary:
        """Re-run open review entries (all when None) after the data or the tables were fixed. Idempotent."""
        entries = self.store.reviews("open")
        if review_ids is not None:
            wanted = set(review_ids)
            entries = [e for e in entries if e.id in wanted]
        patients = {e.patient for e in entries if e.patient}
        summary = self.sync_patients(patients) if patients else SyncSummary()
        return summary

    def status(self) -> Status:
        counts = self.store.counts()
        cursor = self.store.cursor()
        return Status(cursor, self._cursor_lag() if cursor else None, self.store.queue_counts(),
                      counts["review_open"], counts["processed"])

    def subscribe(self, token: str, timeout: float = 90.0) -> dict[str, Any]:
        """Create or update our Subscription for FNA Procedures and wait until the server activates it."""
        serve = self.settings.serve
        subscription = {
            "resourceType": "Subscription", "id": serve.subscription_id, "status": "requested",
            "reason": "fhir-charge-adapter: code FNA biopsy Procedures into charges",
            "criteria": f"Procedure?code={self.syncer.source.code_param}",
            "channel": {"type": "rest-hook", "endpoint": serve.endpoint, "payload": "application/fhir+json",
                        "header": [f"Authorization: Bearer {token}"]},
        }
        self.client.update(subscription)
        deadline = time.monotonic() + timeout
        while True:
            current = self.client.read("Subscription", serve.subscription_id)
            if current.get("status") == "active":
                return current
            if current.get("status") == "error" or time.monotonic() > deadline:
                raise AdapterError(f"Subscription/{serve.subscription_id} is {current.get('status')!r}, not active"
                                   f"{' after ' + str(int(timeout)) + ' s' if current.get('status') != 'error' else ''}"
                                   f": {current.get('error', '')}")
            time.sleep(1.0)
