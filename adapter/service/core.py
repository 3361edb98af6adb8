"""The parts every job of the service shares: the settings, state, client, sinks and metrics it is built from,
and one pass over some patients (claimed while they are coded), its record, and the retries it leaves.

The jobs (adapter/service/poller.py, worker.py, reconciler.py, replay.py, monitor.py, ...) are mixins over this
core; adapter/service/service.py puts them together as `Service`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from adapter import redact
from adapter.client import FhirClient
from adapter.client.errors import FhirGone, FhirNotFound
from adapter.config import CodeTables
from adapter.errors import StateError
from adapter.extraction.index import reference_of
from adapter.health import Health
from adapter.hl7v2.sink import from_settings as hl7v2_sink
from adapter.metrics import Metrics
from adapter.runner import LogOnce, WorkPolicy, backoff
from adapter.service.connect import make_client
from adapter.service.records import PassResult, refs
from adapter.settings import AppSettings
from adapter.state import open_state
from adapter.state.base import (
    RECORDED_OUTCOMES,
    AuditRecord,
    NewReview,
    Outcome,
    PassRecord,
    Processed,
    ReviewKind,
    StateBackend,
    WorkItem,
    patient_work,
)
from adapter.sync import Syncer, SyncSummary

log = logging.getLogger("adapter.service")


class ServiceCore:
    """What the loops share: built once from the settings (a client, state, metrics or health given are used
    instead of new ones, as tests and the CLI do)."""

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
        self._batch = settings.worker.batch
        """Items leased per turn (the worker's, and the reconciler's batches): halved after a batch fails for a
        passing reason, doubled back after BATCH_GROWS_AFTER turns in a row succeed (adapter/service/worker.py),
        so a batch whose reads are too slow for the server's timeout still gets through in smaller pieces (and
        the size that failed is not tried again at once)."""

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
                with self._claims_renewed(claimed):
                    summary = self.syncer.sync_patients(claimed, loose or [], stop.is_set if stop else None,
                                                        scope=scope)
            except BaseException:
                with suppress(StateError):
                    self.state.release_patients(claimed, self.owner)
                raise
        if summary.written or summary.voided or summary.verified or summary.credits:
            self.health.wrote()
        return PassResult(summary, claimed, wanted - claimed)

    @contextmanager
    def _claims_renewed(self, claimed: set[str]) -> Iterator[None]:
        """Renew the claims on `claimed` every third of the lease while the pass runs: a pass slower than the
        lease (a slow server, a large patient) must not let another replica code the same patients beside it."""
        lease = self.settings.worker.lease_seconds
        done = threading.Event()

        def renew() -> None:
            while not done.wait(lease / 3):
                try:
                    kept = self.state.claim_patients(claimed, self.owner, lease)
                except StateError as exc:
                    log.warning("could not renew the claims of a pass on %d patient(s): %s", len(claimed), exc)
                    continue
                if kept != claimed:
                    self.metrics.inc("charge_adapter_claims_lost_total", len(claimed - kept))
                    log.warning("%d of %d patient(s) of a running pass were claimed by another replica (the pass "
                                "outlived its lease before it was renewed)", len(claimed - kept), len(claimed))

        renewer = threading.Thread(target=renew, name="claim-renewal", daemon=True) if claimed else None
        if renewer is not None:
            renewer.start()
        try:
            yield
        finally:
            done.set()
            if renewer is not None:
                renewer.join(timeout=5)

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
            patients = refs(patient_of.get(review.procedure))
            record.reviews.append(NewReview(review.procedure, ReviewKind.NEEDS_REVIEW, review.reason, review.detail,
                                            patients, content(patients)))
        for failure in summary.rejected:
            for proc in failure.procedures:
                record.keep.add((proc, failure.review_reason))
                patients = failure.patients or refs(patient_of.get(proc))
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

    def _patients_billed_for(self, reference: str) -> set[str]:
        """Whose charges bill this (deleted) Procedure: their sessions need recoding."""
        items = self.client.search_all("ChargeItem", {
            "service": reference, "identifier": f"{self.tables.settings.charge_identifier_system}|"})
        billed = {r for r in (reference_of(i.get("subject")) for i in items) if r}
        if self.hl7v2 is not None:  # charges sent only as HL7 v2 messages are voided (credited) too
            billed |= self.hl7v2.ledger.patients_billed_for(reference)
        return billed

    def _patients_of_procedure(self, reference: str) -> set[str]:
        """The patient of a Procedure on the server, or, when it is gone, the patients it was billed to."""
        kind, rid = reference.split("/", 1)
        try:
            resource = self.client.read(kind, rid)
        except (FhirNotFound, FhirGone):
            return self._patients_billed_for(reference)
        subject = reference_of(resource.get("subject"))
        return {subject} if subject else set()
