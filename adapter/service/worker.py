"""The worker: leases due work from the queue (received notifications and pushes, retries, triggered polls) and
settles every item: done, retried with its own backoff, or given up to review."""

from __future__ import annotations

import logging
import threading
from typing import Any

from adapter import redact
from adapter.errors import StateUnavailable
from adapter.extraction.index import reference_of, seen_version
from adapter.runner import backoff, failure_kind, is_transient
from adapter.service.poller import Poller
from adapter.service.records import WorkPlan, pushed_for, refs
from adapter.sources.notifications import SOURCE_ENGINE
from adapter.state.base import NewReview, Outcome, PassRecord, Processed, Retry, ReviewKind, WorkItem, WorkKind

log = logging.getLogger("adapter.service")

BATCH_GROWS_AFTER = 10
"""Successful worker turns in a row before a batch size halved by a failure is doubled again."""


class Worker(Poller):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unreturned: list[Retry] = []
        """Items of a turn whose state write failed: put back before the next lease."""
        self._batch_successes = 0

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
            patients = refs(reference_of(resource.get("subject")))
            pushed = (resource,) if item.source == SOURCE_ENGINE else ()
            return [NewReview(f"Procedure/{resource.get('id')}", kind, kind, detail, patients, pushed)]
        if item.kind == WorkKind.RESOURCES:
            resources = payload["resources"]
            out = []
            for proc in (r for r in resources if r.get("resourceType") == "Procedure"):
                patient = reference_of(proc.get("subject"))
                content = pushed_for(resources, patient) if patient else [proc]
                out.append(NewReview(f"Procedure/{proc.get('id')}", kind, kind, detail, refs(patient), tuple(content)))
            return out
        if item.kind == WorkKind.PATIENT:
            return [NewReview(payload["reference"], kind, kind, detail, (payload["reference"],))]
        if item.kind == WorkKind.POLL:
            return [NewReview("(poll)", kind, kind, detail)]
        return [NewReview(payload["reference"], kind, kind, detail)]
