"""The poller: everything changed on the FHIR server since the durable cursor, page by page. Alone on its state it
codes what it reads; on a shared state the replica holding the poll role queues the changed patients instead,
and every replica's worker codes them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import suppress
from datetime import timedelta

from adapter.errors import LeadLost, StateError
from adapter.extraction.index import seen_version
from adapter.service.hl7v2_drain import Hl7v2Drain
from adapter.service.records import parse_instant
from adapter.state.base import Outcome, PassRecord, Processed, WorkItem, WorkKind
from adapter.sync import SyncSummary, split_by_patient

log = logging.getLogger("adapter.service")

POLL_ROLE = "poll"
"""On a shared state, the replica holding this role polls (and queues what changed); every replica works."""
POLL_ROLE_MIN_SECONDS = 30.0


class Poller(Hl7v2Drain):
    def poll_once(self, stop: threading.Event | None = None,
                  progress: Callable[[int], None] | None = None) -> SyncSummary:
        """Everything changed since the cursor (minus the overlap window), page by page, oldest first.

        Each page is recorded in one transaction with the cursor moved to its newest `meta.lastUpdated`: a
        crash re-reads at most one page, and what was read twice is skipped by id + versionId. Patients whose
        charges could not be written are queued for retry in the same transaction.
        """
        with self.poll_lock:  # the worker's triggered polls and the safety-net poll never overlap
            if not self.shared:
                return self._poll(stop, progress)
            try:
                return self._poll_to_queue(stop, progress)
            except LeadLost as exc:  # paused past the role's lease: the replica that took over redoes the page
                log.warning("stopped polling: %s", exc.reason)
                return SyncSummary()

    def _hold_poll_role(self) -> bool:
        """Take or renew the poll role. Its lease outlives a few poll intervals, so the holder keeps it from one
        poll to the next; if the holder dies, another replica's poll takes over once the lease ran out."""
        seconds = max(3 * self.settings.poll.interval_seconds, POLL_ROLE_MIN_SECONDS)
        return self.state.lead(POLL_ROLE, self.owner, seconds)

    def _poll_to_queue(self, stop: threading.Event | None, progress: Callable[[int], None] | None) -> SyncSummary:
        """The poll of a replica: if it holds the poll role, queue every changed patient, page by page.

        Each page's patients (one item each, merged with any patient item already waiting) and the cursor moved
        past the page are recorded in one transaction, which commits only while this replica still holds the
        role: the shared cursor moves only past work that is durably queued, and a replica that dies mid-page
        leaves the cursor where its successor must start. The workers of every replica code the queue.
        """
        total = self.drain_hl7v2()
        if not self._hold_poll_role():
            return total  # another replica polls
        cursor = self.state.cursor()
        deletes_from = self.state.cursor("deletes") or cursor
        for page in self.syncer.source.changed_pages(self._since(cursor)):
            if not self._hold_poll_role():  # renewed each page; lost while reading: the holder starts over
                return total
            fresh = [p for p in page if not self.state.seen(f"Procedure/{p.get('id')}", seen_version(p))]
            patients, loose = split_by_patient(fresh, self.syncer.local_bases)
            record = PassRecord(owner=self.owner, lead=POLL_ROLE)
            record.due = [WorkItem(WorkKind.PATIENT, {"reference": p}, "poll", dedupe=f"patient:{p}")
                          for p in sorted(patients)]
            record.due += [WorkItem(WorkKind.PROCEDURE, {"resource": r}, "poll") for r in loose]
            newest = max((p.get("meta") or {}).get("lastUpdated", "") for p in page)
            if newest and (cursor is None or parse_instant(newest) > parse_instant(cursor)):
                record.cursors["poll"] = cursor = newest
            self._record_pass(record)
            total.queued += len(record.due)
            if progress:
                progress(len(page))
            if stop is not None and stop.is_set():
                return total
        if deletes_from and cursor:
            deleted = [ref for ref in self.syncer.source.deleted_since(self._since(deletes_from) or deletes_from)
                       if not self.state.seen(ref, "deleted")]
            record = PassRecord(owner=self.owner, lead=POLL_ROLE, cursors={"deletes": cursor})
            record.due = [WorkItem(WorkKind.DELETE, {"reference": ref}, "poll", dedupe=f"delete:{ref}")
                          for ref in deleted]
            self._record_pass(record)
            total.queued += len(deleted)
        return total

    def _poll(self, stop: threading.Event | None, progress: Callable[[int], None] | None) -> SyncSummary:
        cursor = self.state.cursor()
        deletes_from = self.state.cursor("deletes") or cursor
        total = self.drain_hl7v2()
        for page in self.syncer.source.changed_pages(self._since(cursor)):
            record = PassRecord(owner=self.owner)
            fresh = [p for p in page if not self.state.seen(f"Procedure/{p.get('id')}", seen_version(p))]
            deferred = False
            if fresh:
                patients, loose = split_by_patient(fresh, self.syncer.local_bases)
                result = self.sync_patients(patients, loose, stop)
                total.add(result.summary)
                record, failing = self.pass_record(result)
                record.due += self.retry_work(failing)
                deferred = result.summary.deferred
            newest = max((p.get("meta") or {}).get("lastUpdated", "") for p in page)
            if not deferred and newest and (cursor is None or parse_instant(newest) > parse_instant(cursor)):
                record.cursors["poll"] = cursor = newest
            self._record_pass(record)
            if deferred:
                return total  # stopping mid-page: the cursor stays, the next start redoes what is left
            if progress:
                progress(len(page))
            if stop is not None and stop.is_set():
                return total
        if deletes_from and cursor:
            total.add(self._deleted_since(self._since(deletes_from) or deletes_from, cursor))
        return total

    def _deleted_since(self, since: str, cursor: str) -> SyncSummary:
        """Deleted Procedures: recode the patients they were billed to, so their charges are voided.

        Deletes have their own cursor, moved only when they were all handled, so a failure reads them again.
        """
        deleted = [ref for ref in self.syncer.source.deleted_since(since) if not self.state.seen(ref, "deleted")]
        patients = {p for ref in deleted for p in self._patients_billed_for(ref)}
        record, summary = PassRecord(owner=self.owner), SyncSummary()
        if patients:
            result = self.sync_patients(patients)
            summary = result.summary
            record, failing = self.pass_record(result)
            record.due += self.retry_work(failing)
        record.processed += [Processed(ref, "deleted", Outcome.DELETED) for ref in deleted]
        record.resolve += deleted  # nothing left for an analyst to fix
        record.cursors["deletes"] = cursor
        self._record_pass(record)
        return summary

    def _since(self, cursor: str | None) -> str | None:
        """Where a poll starts: the cursor minus the overlap window (commits become visible out of order)."""
        if not cursor:
            return None
        return (parse_instant(cursor) - timedelta(seconds=self.settings.poll.overlap_seconds)).isoformat()

    def count_backlog(self) -> int | None:
        return self.syncer.source.count_changed(self._since(self.state.cursor()))

    def stop(self) -> None:
        """A clean stop: give the poll role up at once, so another replica need not wait for its lease."""
        if self.shared:
            with suppress(StateError):
                self.state.resign(POLL_ROLE, self.owner)
