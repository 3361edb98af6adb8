"""Unattended operation: polling with a durable cursor, working off received and failed work, recording
every pass in one transaction.

The engine and writer are the ones `sync` uses; this layer adds what running for months needs: the cursor
(server clock only), de-duplication on Procedure id + versionId, the work queue and its retries, the review
queue, the audit log, claims on patients, and health reports. A write that fails for a passing reason is
never recorded as done: its patient (or the received item, with what was pushed) stays queued and is
retried with backoff until it succeeds; only a rejection of our data goes to an analyst.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from adapter import redact
from adapter.client import FhirClient, RetryPolicy
from adapter.client.auth import auth_from_settings
from adapter.client.errors import AuthError, FhirGone, FhirNotFound
from adapter.config import CodeTables
from adapter.errors import AdapterError, ConfigError, LeadLost, StateError, StateUnavailable
from adapter.extraction.index import reference_of, seen_version
from adapter.health import Health
from adapter.hl7v2.sink import from_settings as hl7v2_sink
from adapter.metrics import Metrics
from adapter.reconciliation import ReconcileResult, in_scope
from adapter.runner import LogOnce, WorkPolicy, backoff, failure_kind, is_transient
from adapter.settings import AppSettings, ServerSettings
from adapter.sources.notifications import SOURCE_ENGINE
from adapter.sources.server import chunks
from adapter.state import open_state
from adapter.state.base import (
    RECORDED_OUTCOMES,
    AuditRecord,
    NewReview,
    Outcome,
    PassRecord,
    Processed,
    ReplicaInfo,
    Retry,
    ReviewEntry,
    ReviewKind,
    StateBackend,
    WorkItem,
    WorkKind,
    patient_work,
)
from adapter.sync import Syncer, SyncSummary, WriteFailure, split_by_patient

log = logging.getLogger("adapter.service")

PRUNE_EVERY_SECONDS = 3600.0
MONITOR_EVERY_SECONDS = 5.0
POLL_ROLE = "poll"
"""On a shared state, the replica holding this role polls (and queues what changed); every replica works."""
POLL_ROLE_MIN_SECONDS = 30.0
RECONCILE_FROM = "reconcile-from"
"""The cursor a state's reconciliations start from: its first poll cursor (what it is responsible for)."""
BATCH_GROWS_AFTER = 10
"""Successful worker turns in a row before a batch size halved by a failure is doubled again."""


def make_client(server: ServerSettings, source: str = "(defaults)", *, auth_key: str = "server.auth",
                on_reachability: Callable[[bool, str], None] | None = None) -> FhirClient:
    """The FHIR client for `server`; every problem is a ConfigError naming `source` and the key."""
    if not server.url:
        raise ConfigError(source, "server.url", "no FHIR server configured: set server.url in the config file, "
                                                "CHARGE_ADAPTER__SERVER__URL, or --server")
    auth = dict(server.auth or {})
    for key, name in auth.items():
        if key.endswith("_env") and isinstance(name, str):
            partner = key[:-4] + "_file"
            if not os.environ.get(name) and not auth.get(partner):
                raise ConfigError(source, f"{auth_key}.{key}" if auth_key else key,
                                  f"environment variable {name} is not set or empty")
    try:
        credentials = auth_from_settings(auth or None)
    except AuthError as exc:
        raise ConfigError(source, auth_key or "auth", str(exc)) from None
    retry = RetryPolicy(attempts=1) if server.retry_seconds == 0 else RetryPolicy(max_total=server.retry_seconds)
    try:
        return FhirClient(server.url, auth=credentials, timeout=(server.connect_timeout, server.read_timeout),
                          verify=server.ca_bundle or True, cert=server.client_cert or None, retry=retry,
                          trust_env=server.trust_env, on_reachability=on_reachability)
    except ValueError as exc:
        raise ConfigError(source, "server.url", str(exc)) from None
    except ConfigError as exc:  # a CA bundle or certificate file that vanished since the settings were read
        key = "server.ca_bundle" if exc.entry == "verify" else "server.client_cert"
        raise ConfigError(source, key, exc.reason) from None


def parse_instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class Status:
    cursor: str | None
    lag_seconds: float | None
    queue: dict[str, int]
    reviews_open: int
    processed: int
    retry_backlog: int = 0
    replicas: list[ReplicaInfo] = field(default_factory=list)
    """On a shared state: every instance with a heartbeat, and what it holds."""


@dataclass
class PassResult:
    """A sync of some patients and the claims it held."""

    summary: SyncSummary
    claimed: set[str] = field(default_factory=set)
    busy: set[str] = field(default_factory=set)
    """Patients another instance was recoding: retried shortly."""


@dataclass
class WorkPlan:
    """What a batch of work items asks for, and which patients each item touches."""

    patients: set[str] = field(default_factory=set)
    loose: list[dict[str, Any]] = field(default_factory=list)
    touches: dict[int, set[str]] = field(default_factory=dict)
    pushed: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Per patient: resources an engine pushed (kept on review entries so replay re-applies them)."""
    polls: list[int] = field(default_factory=list)


def pushed_for(resources: Iterable[dict[str, Any]], patient: str) -> list[dict[str, Any]]:
    """The pushed resources that belong to `patient` (or to nobody in particular, like a BodyStructure)."""
    out = []
    for resource in resources:
        if resource.get("resourceType") == "Patient":
            owner: str | None = f"Patient/{resource.get('id')}"
        else:
            owner = reference_of(resource.get("subject") or resource.get("patient") or resource.get("beneficiary"))
        if owner is None or owner == patient:
            out.append(resource)
    return out


class Service:
    def __init__(self, settings: AppSettings, tables: CodeTables, *, client: FhirClient | None = None,
                 state: StateBackend | None = None, metrics: Metrics | None = None,
                 health: Health | None = None) -> None:
        self.settings = settings
        self.tables = tables
        self.health = health or Health(settings.health)
        self.client = client or make_client(settings.server, settings.source, on_reachability=self.health.fhir)
        self.state = state or open_state(settings.state.location, busy_timeout=settings.state.busy_timeout_seconds,
                                         lease_seconds=settings.worker.lease_seconds,
                                         statement_timeout=settings.state.statement_timeout_seconds)
        self.owner = self.state.instance_id
        self.shared = bool(getattr(self.state, "shared", False))
        """Several replicas on one state: the poller queues changed patients instead of coding them itself."""
        self.hl7v2 = hl7v2_sink(settings.sinks.hl7v2, settings.source, tables, self.state) \
            if settings.sinks.hl7v2.enabled else None
        if self.hl7v2 is not None:
            self.hl7v2.observer = self.health.hl7v2
            self.health.sink_enabled(self.hl7v2.transport.where)
        self.syncer = Syncer(self.client, tables, fhir=settings.sinks.fhir, hl7v2=self.hl7v2)
        self.x12 = None
        if settings.sinks.x12.enabled:  # 837P interchanges to a folder (adapter/x12/sink.py)
            from adapter.x12.sink import WITHOUT_REQUIRE_837P
            from adapter.x12.sink import from_settings as x12_sink

            self.x12 = self.syncer.x12 = x12_sink(settings.sinks.x12, tables.x12, self.state)
            if not tables.settings.require_837p:
                log.warning(WITHOUT_REQUIRE_837P)
        self.syncer.source.page_size = settings.poll.page_size
        self.metrics = metrics or Metrics()
        self.client.on_write = lambda method, seconds: self.metrics.observe("charge_adapter_fhir_write_seconds",
                                                                            seconds, method=method)
        worker = settings.worker
        self.policy = WorkPolicy(worker.retry_initial_seconds, worker.retry_max_seconds, worker.max_attempts)
        self.write_lock = threading.Lock()
        self.poll_lock = threading.Lock()
        self.failures = LogOnce(log)
        self._unreturned: list[Retry] = []
        self._batch = settings.worker.batch
        """Items leased per turn: halved after a batch fails for a passing reason, doubled back after
        BATCH_GROWS_AFTER turns in a row succeed, so a batch whose reads are too slow for the server's timeout
        still gets through in smaller pieces (and the size that failed is not tried again at once)."""
        self._batch_successes = 0
        self._next_prune = 0.0
        self._next_reconcile = 0.0
        """Monotonic time of the next scheduled reconciliation: at start, then every reconcile_every_seconds."""
        self.last_reconcile: ReconcileResult | None = None
        self._register_gauges()

    @property
    def store(self) -> StateBackend:  # the name before the state contract
        return self.state

    def _record_pass(self, record: PassRecord) -> None:
        """`state.record_pass`, timed for the state-write histogram (failed attempts too)."""
        started = time.monotonic()
        try:
            self.state.record_pass(record)
        finally:
            self.metrics.observe("charge_adapter_state_write_seconds", time.monotonic() - started)

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

    # -- one pass -----------------------------------------------------------------------------------------------

    def sync_patients(self, patients: Iterable[str], loose: list[dict[str, Any]] | None = None,
                      stop: threading.Event | None = None, scope: set[str] | None = None) -> PassResult:
        """Recode `patients` (claimed for the time of the pass) and write their charges. Records nothing.
        `scope`: only sessions billing these Procedures (a reconciliation's window)."""
        wanted = set(patients)
        with self.write_lock:
            claimed = self.state.claim_patients(wanted, self.owner, self.settings.worker.lease_seconds) \
                if wanted else set()
            try:
                summary = self.syncer.sync_patients(claimed, loose or [], stop.is_set if stop else None, scope=scope)
            except BaseException:
                with suppress(StateError):
                    self.state.release_patients(claimed, self.owner)
                raise
        if summary.written or summary.voided or summary.verified or summary.credits:
            self.health.wrote()
        return PassResult(summary, claimed, wanted - claimed)

    def pass_record(self, result: PassResult,
                    pushed: dict[str, list[dict[str, Any]]] | None = None) -> tuple[PassRecord, dict[str, str]]:
        """The record of a pass, and the patients that must be retried (with the reason)."""
        summary, pushed = result.summary, pushed or {}
        final = [o for o in summary.outcomes if o.outcome in RECORDED_OUTCOMES]
        patient_of = {o.procedure: o.patient for o in summary.outcomes}
        record = PassRecord(owner=self.owner, release=sorted(result.claimed))
        record.processed = [Processed(o.procedure, o.seen_as, o.outcome) for o in final if o.seen_as]

        def content(patients: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
            return tuple(r for p in patients for r in pushed.get(p, []))

        for review in summary.reviews:
            record.keep.add((review.procedure, review.reason))
            patients = _refs(patient_of.get(review.procedure))
            record.reviews.append(NewReview(review.procedure, ReviewKind.NEEDS_REVIEW, review.reason, review.detail,
                                            patients, content(patients)))
        for failure in summary.rejected:
            for proc in failure.procedures:
                record.keep.add((proc, failure.review_reason))
                patients = failure.patients or _refs(patient_of.get(proc))
                record.reviews.append(NewReview(proc, ReviewKind.WRITE_REJECTED, failure.review_reason,
                                                failure.reason, patients, content(patients)))
        record.resolve = sorted({o.procedure for o in final})
        record.audit = [AuditRecord(o.procedure, o.version, o.session, o.audit_codes, self.tables.version, o.written)
                        for o in final if o.written or o.outcome == Outcome.FAILED or o.merged_into]
        failing: dict[str, str] = {}
        for failure in summary.to_retry:
            for patient in failure.patients:
                failing.setdefault(patient, f"{failure.kind}: {failure.reason}")
        for o in summary.outcomes:
            if o.outcome == Outcome.RETRY and o.patient:
                failing.setdefault(o.patient, "its session could not be written")
        for patient in result.busy:
            failing.setdefault(patient, "another instance was recoding this patient")
        self._count(summary, final)
        return record, failing

    def _count(self, summary: SyncSummary, final: list[Any]) -> None:
        self.metrics.inc("charge_adapter_coded_total", sum(1 for o in final if o.outcome == Outcome.CODED))
        self.metrics.inc("charge_adapter_written_total", summary.written + summary.voided)
        self.metrics.inc("charge_adapter_review_total", len({r.procedure for r in summary.reviews}))
        self.metrics.inc("charge_adapter_failed_total", len(summary.failures))
        self.metrics.inc("charge_adapter_verified_total", summary.verified)
        self.metrics.inc("charge_adapter_credits_total", summary.credits)
        if self.hl7v2 is not None:
            self.metrics.inc("charge_adapter_hl7v2_messages_total", summary.hl7v2_sent)
        if self.x12 is not None:
            self.metrics.inc("charge_adapter_x12_claims_total", summary.x12_claims)
        for failure in summary.failures:
            self.metrics.inc("charge_adapter_failures_total", kind=failure.kind)
        if summary.to_retry:
            failure = summary.to_retry[0]
            self.failures.failed_as("writing charges", failure.kind,
                                    f"{len(summary.to_retry)} session(s) not written, queued for retry: "
                                    f"{redact.scrub(failure.reason)}")
        elif summary.written or summary.voided or summary.verified:
            self.failures.succeeded("writing charges")

    def retry_work(self, failing: dict[str, str], source: str = "retry") -> list[WorkItem]:
        """Queued work that recodes each failing patient after a backoff (one queued item per patient); the wait is
        turned into a time on the state's clock when it is stored."""
        conf = self.settings.worker
        if failing:
            self.metrics.inc("charge_adapter_retried_total", len(failing))
        return [patient_work(p, reason, source=source,
                             delay=backoff(1, conf.retry_initial_seconds, conf.retry_max_seconds))
                for p, reason in sorted(failing.items())]

    # -- polling ------------------------------------------------------------------------------------------------

    def _cursor_lag(self) -> float | None:
        stats = self.health.stats
        cursor = stats.cursor if stats is not None else None
        return max(0.0, self.state_clock() - parse_instant(cursor).timestamp()) if cursor else None

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

    def drain_hl7v2(self) -> SyncSummary:
        """Send the HL7 v2 messages left pending (a crash between recording and the ACK, a receiver that was
        down), oldest first, before anything new; what still fails is retried through the queue as usual."""
        summary = SyncSummary()
        if self.hl7v2 is None:
            return summary
        wanted = self.hl7v2.pending_patients()
        if not wanted:
            return summary
        with self.write_lock:
            claimed = self.state.claim_patients(wanted, self.owner, self.settings.worker.lease_seconds)
            try:
                result = self.hl7v2.drain([p for p in wanted if p in claimed])
            except BaseException:
                with suppress(StateError):
                    self.state.release_patients(claimed, self.owner)
                raise
        summary.hl7v2_sent, summary.hl7v2_credits = result.sent, result.credits
        summary.failures = [WriteFailure(f.session, f.procedures, f.reason, f.patients, f.retryable, f.kind, f.kind)
                            for f in result.failures]
        record, failing = self.pass_record(PassResult(summary, claimed))
        record.due += self.retry_work(failing)
        self._record_pass(record)
        return summary

    def _since(self, cursor: str | None) -> str | None:
        """Where a poll starts: the cursor minus the overlap window (commits become visible out of order)."""
        if not cursor:
            return None
        return (parse_instant(cursor) - timedelta(seconds=self.settings.poll.overlap_seconds)).isoformat()

    def count_backlog(self) -> int | None:
        return self.syncer.source.count_changed(self._since(self.state.cursor()))

    def _patients_billed_for(self, reference: str) -> set[str]:
        """Whose charges bill this (deleted) Procedure: their sessions need recoding."""
        items = self.client.search_all("ChargeItem", {
            "service": reference, "identifier": f"{self.tables.settings.charge_identifier_system}|"})
        billed = {r for r in (reference_of(i.get("subject")) for i in items) if r}
        if self.hl7v2 is not None:  # charges sent only as HL7 v2 messages are voided (credited) too
            billed |= self.hl7v2.ledger.patients_billed_for(reference)
        return billed

    # -- queued work ----------------------------------------------------------------------------------------------

    def work_once(self, stop: threading.Event | None = None) -> int:
        """Lease one batch of due work and settle every item: done, retried with its own backoff, or given up.

        A batch is coded together (one read of the patients, one write per session). If the batch fails as a
        whole for a reason that is not an outage, each item is tried alone, so one poison item never fails
        or stalls its neighbours. Returns the number of items leased.
        """
        if self._unreturned:  # items of a turn whose state write failed: put them back first
            self.state.retry(self._unreturned)
            self._unreturned = []
        items = self.state.lease(self._batch, owner=self.owner)
        if not items:
            return 0
        try:
            self._work(items, stop)
        except StateUnavailable:
            self._unreturned = [Retry(i.id, 0.0, "the state was unavailable") for i in items]
            raise
        except Exception as exc:
            if len(items) > 1 and not is_transient(exc):
                for item in items:
                    try:
                        self._work([item], stop)
                    except Exception as single:
                        self._give_back([item], single)
            else:
                if is_transient(exc):
                    self._batch, self._batch_successes = max(1, len(items) // 2), 0
                self._give_back(items, exc)
        else:
            self.failures.succeeded("work")
            self._batch_successes += 1
            if self._batch_successes >= BATCH_GROWS_AFTER:
                self._batch, self._batch_successes = min(self.settings.worker.batch, self._batch * 2), 0
        return len(items)

    def _work(self, items: list[WorkItem], stop: threading.Event | None) -> None:
        plan = self.plan_work(items)
        if plan.polls:
            self.poll_once(stop)
        record, failing = PassRecord(owner=self.owner), {}
        deferred: set[str] = set()
        if plan.patients or plan.loose:
            result = self.sync_patients(plan.patients, plan.loose, stop)
            record, failing = self.pass_record(result, plan.pushed)
            deferred = {o.patient for o in result.summary.outcomes if o.outcome == Outcome.DEFERRED and o.patient}
        covered: set[str] = set()
        for item in items:
            touched = plan.touches.get(item.id, set())
            covered |= touched
            reasons = sorted(failing[p] for p in touched if p in failing)
            if reasons:
                delay = backoff(item.attempts, self.policy.initial, self.policy.maximum)
                record.retried.append(Retry(item.id, 0.0, reasons[0], delay))
            elif touched & deferred:
                record.retried.append(Retry(item.id, 0.0, "deferred: the process was stopping"))
            else:
                record.acked.append(item.id)
                if item.kind == WorkKind.DELETE:  # handled: a poll reading the delete again skips it
                    record.processed.append(Processed(item.payload["reference"], "deleted", Outcome.DELETED))
                    record.resolve.append(item.payload["reference"])
        record.due += self.retry_work({p: r for p, r in failing.items() if p not in covered})
        if record.retried:
            self.metrics.inc("charge_adapter_retried_total", len(record.retried))
        self._record_pass(record)

    def plan_work(self, items: list[WorkItem]) -> WorkPlan:
        """Which patients and pushed resources a batch asks for (reads the server for id-only work)."""
        plan = WorkPlan()
        for item in items:
            payload = item.payload
            touched: set[str] = set()
            if item.kind == WorkKind.PROCEDURE:
                resource = payload["resource"]
                ref, version = f"Procedure/{resource.get('id')}", seen_version(resource)
                if item.source == SOURCE_ENGINE or not (version and self.state.seen(ref, version)):
                    subject = reference_of(resource.get("subject"))
                    if item.source == SOURCE_ENGINE or not subject:
                        plan.loose.append(resource)
                    if subject:
                        touched.add(subject)
                        if item.source == SOURCE_ENGINE:
                            plan.pushed.setdefault(subject, []).append(resource)
            elif item.kind == WorkKind.RESOURCES:
                resources = payload["resources"]
                plan.loose += resources
                subjects = {r for r in (reference_of(x.get("subject")) for x in resources
                                        if x.get("resourceType") == "Procedure") if r}
                touched |= subjects
                for patient in subjects:
                    plan.pushed.setdefault(patient, []).extend(pushed_for(resources, patient))
            elif item.kind == WorkKind.DELETE:
                touched |= self._patients_billed_for(payload["reference"])
            elif item.kind == WorkKind.FETCH:
                touched |= self._patients_of_procedure(payload["reference"])
            elif item.kind == WorkKind.PATIENT:
                touched.add(payload["reference"])
            elif item.kind == WorkKind.POLL:
                plan.polls.append(item.id)
            plan.patients |= touched
            plan.touches[item.id] = touched
        return plan

    def _patients_of_procedure(self, reference: str) -> set[str]:
        """The patient of a Procedure on the server, or, when it is gone, the patients it was billed to."""
        kind, rid = reference.split("/", 1)
        try:
            resource = self.client.read(kind, rid)
        except (FhirNotFound, FhirGone):
            return self._patients_billed_for(reference)
        subject = reference_of(resource.get("subject"))
        return {subject} if subject else set()

    def _give_back(self, items: list[WorkItem], exc: BaseException) -> None:
        """Failed items go back with their own backoff, or, past their attempts, to review."""
        kind = failure_kind(exc)
        reason = f"{kind}: {redact.scrub(str(exc)) or type(exc).__name__}"
        self.metrics.inc("charge_adapter_failures_total", len(items), kind=kind)
        self.failures.failed("work", exc, f"failed for {len(items)} item(s)")
        retries, dead = [], []
        for item in items:
            delay = self.policy.decide(item.attempts, exc)
            if delay is None:
                dead.append(item)
            else:
                retries.append(Retry(item.id, 0.0, reason, delay))
        if retries:
            self.metrics.inc("charge_adapter_retried_total", len(retries))
            try:
                self.state.retry(retries)
            except StateUnavailable:
                self._unreturned += [Retry(r.id, 0.0, r.error) for r in retries]
                raise
        for item in dead:
            log.error("work item %d (%s from %s) failed %d times; sent to review", item.id, item.kind, item.source,
                      item.attempts)
            self.state.dead_letter([item.id], reason, self._failed_reviews(item, reason))

    def _failed_reviews(self, item: WorkItem, reason: str) -> list[NewReview]:
        """Review entries for an item given up: with its patients and, for pushed content, the content."""
        detail = f"{item.kind} from {item.source} failed {item.attempts} times: {reason}"
        kind = ReviewKind.PROCESSING_FAILED
        payload = item.payload
        if item.kind == WorkKind.PROCEDURE:
            resource = payload["resource"]
            patients = _refs(reference_of(resource.get("subject")))
            pushed = (resource,) if item.source == SOURCE_ENGINE else ()
            return [NewReview(f"Procedure/{resource.get('id')}", kind, kind, detail, patients, pushed)]
        if item.kind == WorkKind.RESOURCES:
            resources = payload["resources"]
            out = []
            for proc in (r for r in resources if r.get("resourceType") == "Procedure"):
                patient = reference_of(proc.get("subject"))
                content = pushed_for(resources, patient) if patient else [proc]
                out.append(NewReview(f"Procedure/{proc.get('id')}", kind, kind, detail, _refs(patient), tuple(content)))
            return out
        if item.kind == WorkKind.PATIENT:
            return [NewReview(payload["reference"], kind, kind, detail, (payload["reference"],))]
        if item.kind == WorkKind.POLL:
            return [NewReview("(poll)", kind, kind, detail)]
        return [NewReview(payload["reference"], kind, kind, detail)]

    # -- health and housekeeping --------------------------------------------------------------------------------

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

    # -- analysts ---------------------------------------------------------------------------------------------------

    def replay(self, review_ids: list[int] | None = None) -> SyncSummary:
        """Re-run open review entries (all when None) after the data or the tables were fixed. Idempotent.

        Each entry's patients are recoded from the server, with the resources that were pushed to the adapter
        (kept on the entry) applied again exactly as received.
        """
        entries = self.state.reviews("open")
        if review_ids is not None:
            wanted = set(review_ids)
            entries = [e for e in entries if e.id in wanted]
        patients: set[str] = set()
        loose: dict[str, dict[str, Any]] = {}
        poll = False
        for entry in entries:
            found = self._replay_patients(entry)
            if found is None:
                poll = True
            patients |= found or set()
            for resource in entry.resources:
                loose[f"{resource.get('resourceType')}/{resource.get('id')}"] = resource
        total = self.poll_once() if poll else SyncSummary()
        if not patients and not loose:
            self._record_pass(PassRecord(resolve_ids=[e.id for e in entries
                                                           if e.kind == ReviewKind.PROCESSING_FAILED]))
            return total
        if self.hl7v2 is not None:  # a replayed HL7 v2 refusal lifts its patient's hold (adapter/hl7v2/sink.py)
            self.hl7v2.release_replayed(entries)
        result = self.sync_patients(patients, list(loose.values()))
        record, failing = self.pass_record(result, _pushed_by_patient(entries))
        record.due += self.retry_work(failing)
        record.resolve_ids = [e.id for e in entries if e.kind == ReviewKind.PROCESSING_FAILED
                              and not set(e.patients) & set(failing)]
        self._record_pass(record)
        total.add(result.summary)
        return total

    def _replay_patients(self, entry: ReviewEntry) -> set[str] | None:
        """Whom an entry recodes; None when only a poll can tell."""
        if entry.patients:
            return set(entry.patients)
        if entry.procedure.startswith("Patient/"):
            return {entry.procedure}
        if entry.procedure.startswith("Procedure/") and not entry.resources:
            return self._patients_of_procedure(entry.procedure)
        if entry.resources:
            return set()
        return None

    def status(self) -> Status:
        counts = self.state.counts()
        stats = self.state.stats()
        cursor = stats.cursor
        lag = max(0.0, self.state_clock() - parse_instant(cursor).timestamp()) if cursor else None
        return Status(cursor, lag, self.state.queue_counts(), counts["review_open"], counts["processed"],
                      stats.retry_backlog, self.state.replicas() if self.shared else [])

    def stop(self) -> None:
        """A clean stop: give the poll role up at once, so another replica need not wait for its lease."""
        if self.shared:
            with suppress(StateError):
                self.state.resign(POLL_ROLE, self.owner)

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


def _refs(reference: str | None) -> tuple[str, ...]:
    return (reference,) if reference else ()


def _pushed_by_patient(entries: list[ReviewEntry]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        for patient in entry.patients:
            out.setdefault(patient, []).extend(entry.resources)
    return out
