"""One pass against a FHIR server: read changed FNA Procedures, code them with the offline engine unchanged,
reconcile with what was written before, and write each session in one transaction.

A session the server rejects is reported with the server's reason and its Procedure ids, and the pass goes
on with the others. Procedures that need review are listed and never charged.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from adapter import redact
from adapter.client import FhirClient
from adapter.client.errors import (
    FhirConflict,
    FhirHttpError,
    FhirRateLimited,
    FhirServerError,
    FhirTransportError,
    FhirUnauthorized,
)
from adapter.coding.engine import Review
from adapter.config import CodeTables
from adapter.errors import FhirError
from adapter.extraction.index import local_reference, reference_of, seen_version, version_of
from adapter.extraction.procedures import Disposition, Kind
from adapter.extraction.timezones import warn_utc_feed_once
from adapter.hl7v2.sink import Hl7v2Sink
from adapter.pipeline import RunReport, local_bases, process
from adapter.redact import FreeText
from adapter.runner import failure_kind
from adapter.sinks.reconcile import IGNORED, DriftItem, Plan, SessionPlan, plan
from adapter.sources.files import SourcedResource
from adapter.sources.server import ServerSource
from adapter.state.base import Outcome

log = logging.getLogger("adapter.sync")

CHANGED_ON_SERVER = "changed-on-server"
"""The review reason of a line someone else changed on the server where our re-code would write otherwise."""


@dataclass(frozen=True)
class WriteFailure:
    """A session the server did not take. `retryable`: the reason may pass (no answer, 5xx, 429, a conflict,
    credentials); otherwise the server refused our data (4xx) and a person has to look."""

    session: str
    procedures: tuple[str, ...]
    reason: str
    patients: tuple[str, ...] = ()
    retryable: bool = False
    kind: str = "fhir-rejected"
    """`adapter.runner.failure_kind` of the error: a metric label and the unit of "log once"."""
    review_reason: str = "write-rejected"
    """The reason of the review entry a rejection opens (the HL7 v2 sink's: `hl7v2-rejected`)."""


@dataclass(frozen=True)
class ProcedureOutcome:
    """What happened to one Procedure version in a pass: for the processed table, reviews and the audit."""

    procedure: str
    version: str
    patient: str | None
    outcome: str
    """An `adapter.state.Outcome`: coded, no-charge, review, failed (rejected), retry (not written for a
    passing reason) or deferred (not written: the process was stopping)."""
    session: str = ""
    codes: tuple[str, ...] = ()
    written: tuple[str, ...] = ()
    merged_into: str = ""
    """For a Procedure billed under another one (a duplicate delivery, a `partOf` child): that Procedure."""
    merge_basis: str = ""
    """`duplicate (...)` or `part-of`: why (no free text, no identifier values)."""
    corrections: tuple[str, ...] = ()
    """Credits, replacements and void Claims written for its session, each with why (`SessionPlan.corrections`)."""
    seen_as: str = ""
    """The version key the poller's "seen" check records (`index.seen_version`: versionId and content hash)."""

    @property
    def label(self) -> str:
        """How dry-run and sync list a merged Procedure: `duplicate` or `part of`."""
        return "part of" if self.merge_basis == "part-of" else "duplicate"

    @property
    def audit_codes(self) -> tuple[str, ...]:
        """What the audit trail records as its codes: the codes, or `duplicate-of X` / `part-of X`."""
        if self.merged_into and not self.codes:
            return (f"{'part-of' if self.merge_basis == 'part-of' else 'duplicate-of'} {self.merged_into}",)
        return (*self.codes, *self.corrections)


@dataclass
class SyncSummary:
    procedures: int = 0
    patients: int = 0
    sessions: int = 0
    lines: int = 0
    written: int = 0
    unchanged: int = 0
    voided: int = 0
    credits: int = 0
    """Credits written for lines that had passed to billing (each offsets one; its replacement is in `written`)."""
    protected: int = 0
    edits_kept: int = 0
    """Lines changed or voided by someone else on the server, left as they are (our coding did not change)."""
    drift: Counter[str] = field(default_factory=Counter)
    """What the plans found different from the coding, by `reconcile.Drift` kind (before writing)."""
    drift_items: list[DriftItem] = field(default_factory=list)
    reviews: list[Review] = field(default_factory=list)
    failures: list[WriteFailure] = field(default_factory=list)
    outcomes: list[ProcedureOutcome] = field(default_factory=list)
    verified: int = 0
    """Sessions whose answer was lost (or was a conflict on a retry) and that the server holds exactly."""
    hl7v2_sent: int = 0
    """HL7 v2 messages the receiver acknowledged (adapter/hl7v2), of which `hl7v2_credits` credited earlier charges."""
    hl7v2_credits: int = 0
    x12_claims: int = 0
    """Claims written to the X12 sink's folder in an 837P interchange (adapter/x12/sink.py)."""
    queued: int = 0
    """Changed patients (and Procedures without one) a poll queued for the replicas' workers (shared state)."""
    free_text: FreeText = field(default_factory=FreeText)
    """The free text of the resources coded, to mask it wherever a detail is printed or logged."""

    def add(self, other: SyncSummary) -> None:
        for name in ("procedures", "patients", "sessions", "lines", "written", "unchanged", "voided", "credits",
                     "protected", "edits_kept", "verified", "hl7v2_sent", "hl7v2_credits", "x12_claims",
                     "queued"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.drift.update(other.drift)
        self.drift_items += other.drift_items
        self.reviews += other.reviews
        self.failures += other.failures
        self.outcomes += other.outcomes
        self.free_text.add(other.free_text)

    @property
    def deferred(self) -> bool:
        return any(o.outcome == Outcome.DEFERRED for o in self.outcomes)

    @property
    def rejected(self) -> list[WriteFailure]:
        return [f for f in self.failures if not f.retryable]

    @property
    def to_retry(self) -> list[WriteFailure]:
        return [f for f in self.failures if f.retryable]

    @property
    def review_entries(self) -> int:
        """Review entries this pass opens or keeps: one per (Procedure, reason), as the state stores them (a
        Procedure with two reasons is two entries in `review list`), write rejections included."""
        keys = {(r.procedure, r.reason) for r in self.reviews}
        keys |= {(proc, f.review_reason) for f in self.rejected for proc in f.procedures}
        return len(keys)

    def text(self) -> str:
        retry = f" ({len(self.to_retry)} to retry)" if self.to_retry else ""
        verified = f"; {self.verified} session(s) confirmed on the server after a lost answer" if self.verified else ""
        queued = f"queued {self.queued} changed patient(s) for the workers; " if self.queued else ""
        merged = [o for o in self.outcomes if o.merged_into]
        duplicates = sum(1 for o in merged if o.label == "duplicate")
        billed_under = (f", {duplicates} duplicate(s) and {len(merged) - duplicates} partOf child(ren) billed under "
                        "another Procedure" if merged else "")
        return (f"{queued}{self.procedures} FNA Procedures of {self.patients} patients{billed_under}: "
                f"{self.sessions} sessions, "
                f"{self.lines} lines; written {self.written}, unchanged {self.unchanged}, voided {self.voided}, "
                + (f"credited {self.credits}, " if self.credits else "")
                + (f"edited on the server and kept {self.edits_kept}, " if self.edits_kept else "")
                + f"review entries {self.review_entries}, failed sessions {len(self.failures)}{retry}"
                f"{verified}"
                + (f"; HL7 v2 messages sent {self.hl7v2_sent} ({self.hl7v2_credits} credits)"
                   if self.hl7v2_sent else ""))


def outcome_unknown(exc: FhirError) -> bool:
    """Whether the server may have committed a write that failed like this (then ask the server)."""
    if isinstance(exc, FhirTransportError | FhirServerError | FhirConflict):
        return True
    return not isinstance(exc, FhirHttpError)  # e.g. a 2xx whose body was cut: committed, answer unreadable


def retryable(exc: FhirError) -> bool:
    """A failed write that may succeed later: no usable answer, 5xx, 429, a conflict (the next pass re-reads),
    refused credentials. A 4xx about our data (400, 404, 422 ...) will fail again: review."""
    if isinstance(exc, FhirHttpError):
        return isinstance(exc, FhirServerError | FhirRateLimited | FhirConflict | FhirUnauthorized) \
            or exc.status == 408
    return True


def _content(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in IGNORED}


def _identifier_value(resource: dict[str, Any], system: str) -> str | None:
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("system") == system:
            return ident.get("value")
    return None


def _patients_of(session: SessionPlan) -> set[str]:
    """The patients a session's charges belong to (ChargeItem.subject, Claim.patient)."""
    found = set()
    for entry in session.entries:
        resource = entry["resource"]
        ref = reference_of(resource.get("subject") or resource.get("patient"))
        if ref:
            found.add(ref)
    return found


def split_by_patient(procedures: Iterable[dict[str, Any]], bases: frozenset[str] = frozenset()
                     ) -> tuple[set[str], list[dict[str, Any]]]:
    """The patients whose Procedures changed, and the Procedures without a local Patient subject (coded alone,
    so they are reported rather than silently dropped). `bases`: the local bases (`Syncer.local_bases`); a
    subject on another server is no local patient."""
    patients: set[str] = set()
    loose: list[dict[str, Any]] = []
    for proc in procedures:
        subject = local_reference(proc.get("subject"), bases) or ""
        if subject.startswith("Patient/"):
            patients.add(subject)
        else:
            loose.append(proc)
    return patients, loose


class Syncer:
    """Codes and writes back per patient: all of a patient's FNA Procedures are always coded together."""

    def __init__(self, client: FhirClient, tables: CodeTables, *, dry_run: bool = False, fhir: bool = True,
                 hl7v2: Hl7v2Sink | None = None) -> None:
        self.client = client
        self.tables = tables
        self.dry_run = dry_run
        self.fhir = fhir
        """Write ChargeItems and Claims back to the server (`sinks.fhir`)."""
        self.hl7v2 = hl7v2
        """Send DFT^P03 messages to a billing system (`sinks.hl7v2`)."""
        self.x12: Any = None
        """Write the pass's Claims as an X12 837P interchange to a folder (`sinks.x12`, adapter/x12/sink.py)."""
        self.local_bases = local_bases(tables, client.base_url)
        """Bases whose absolute references are local: config/input.yaml local_bases and the server's own."""
        self.source = ServerSource(client, tables, local=self.local_bases)

    def sync_patients(self, patients: Iterable[str], loose: Iterable[dict[str, Any]] = (),
                      should_stop: Callable[[], bool] | None = None, scope: set[str] | None = None) -> SyncSummary:
        """Re-code every FNA Procedure of `patients` and bring the server's charges in line.

        `loose` are resources pushed to us rather than read from the server (an integration engine's Bundle,
        a Procedure without a usable subject): they replace the server's copy of the same `Type/id`.
        `should_stop` is asked between sessions: a stopping process finishes the session it is writing, and
        the sessions left are reported `deferred`. `scope`: only the sessions that bill one of these Procedures
        are compared and written (`reconcile --since`).
        """
        wanted = sorted({p for p in patients if p})
        ctx = self.source.context(wanted)
        extra = [SourcedResource(r, f"pushed {r.get('resourceType')}/{r.get('id')}") for r in loose]
        report = process([*ctx.resources, *extra], self.tables, server_base=self.client.base_url)
        warn_utc_feed_once(report.facts, log)
        writes = plan(report, [*ctx.charge_items, *ctx.claims], self.tables, answered=ctx.answered)
        if scope is not None:
            writes = writes.within(scope)
        summary = self._summarise(report, writes, len(wanted))
        summary.free_text = FreeText.of(item.resource for item in [*ctx.resources, *extra])
        summary.failures += [WriteFailure(f"void {ref}", (), why) for ref, why in writes.unvoidable]
        failed: dict[str, WriteFailure] = {}
        if not self.dry_run and self.fhir:
            failed = self._write(writes, summary, should_stop)
        if not self.dry_run and self.x12 is not None:
            from adapter.x12.step import send_x12  # before HL7 v2: only the FHIR side's failures hold a Claim

            x12, x12_reviews = send_x12(self.x12, self.client, report, writes, failed)
            summary.reviews += x12_reviews
            summary.x12_claims += x12.claims if not x12.failure else 0
            if x12.failure:
                summary.failures.append(WriteFailure("X12 interchange", (), x12.failure, tuple(wanted), True,
                                                     "x12-unwritable"))
        if not self.dry_run and self.hl7v2 is not None:
            self._send_hl7v2(report, wanted, summary, failed, should_stop)
        summary.outcomes = self._outcomes(report, writes, failed, summary.reviews)
        return summary

    def write_report(self, report: RunReport, patients: Iterable[str]) -> SyncSummary:
        """Bring the server's charges of `patients` in line with an already coded `report` (a batch of
        `backfill`): the same reconciliation and session transactions as `sync_patients`, so it is idempotent."""
        wanted = sorted({p for p in patients if p})
        charge_items, claims, answered = self.source.our_charges(wanted)
        writes = plan(report, [*charge_items, *claims], self.tables, answered=answered)
        summary = self._summarise(report, writes, len(wanted))
        summary.failures += [WriteFailure(f"void {ref}", (), why) for ref, why in writes.unvoidable]
        if not self.dry_run and self.fhir:
            self._write(writes, summary)
        return summary

    def _send_hl7v2(self, report: RunReport, patients: list[str], summary: SyncSummary,
                    failed: dict[str, WriteFailure], should_stop: Callable[[], bool] | None) -> None:
        """The HL7 v2 sink's pass (adapter/hl7v2/sink.py): its reviews and failures join the FHIR side's."""
        assert self.hl7v2 is not None
        result = self.hl7v2.deliver(report, patients, should_stop)
        summary.reviews += result.reviews
        summary.hl7v2_sent += result.sent
        summary.hl7v2_credits += result.credits
        for f in result.failures:
            failure = WriteFailure(f.session, f.procedures, f.reason, f.patients, f.retryable, f.kind, f.kind)
            summary.failures.append(failure)
            if f.session not in failed or not failure.retryable:
                failed[f.session] = failure

    def sync(self, since: str | None = None,
             progress: Callable[[int], None] | None = None) -> SyncSummary:
        """One pass over the FNA Procedures changed since `since` (all when None)."""
        self.client.check_server()
        total = SyncSummary()
        done: set[str] = set()
        for page in self.source.changed_pages(since):
            patients, loose = split_by_patient(page, self.local_bases)
            todo = patients - done
            if todo or loose:
                total.add(self.sync_patients(todo, loose))
            done |= todo
            if progress:
                progress(len(page))
        return total

    def _summarise(self, report: RunReport, writes: Plan, patients: int) -> SyncSummary:
        origins = {f.ref: f.origin for f in report.facts}
        conflicts = [Review(ref, origins.get(ref, ref), CHANGED_ON_SERVER, c.detail)
                     for c in writes.conflicts for ref in c.procedures]
        return SyncSummary(
            procedures=sum(1 for f in report.facts if f.kind is Kind.FNA), patients=patients,
            sessions=len(report.built.sessions), lines=sum(len(s.charge_items) for s in report.built.sessions),
            unchanged=writes.unchanged, protected=writes.protected, reviews=[*report.reviews, *conflicts],
            drift=writes.drift_counts(), drift_items=list(writes.drift), edits_kept=writes.edits_kept)

    def _write(self, writes: Plan, summary: SyncSummary,
               should_stop: Callable[[], bool] | None = None) -> dict[str, WriteFailure]:
        """Send each session's transaction; returns the failures by session label."""
        failed: dict[str, WriteFailure] = {}
        for session in writes.sessions:
            if should_stop is not None and should_stop():
                session.deferred = True
                continue
            if not session.entries:
                continue
            try:
                response = self.client.transaction(session.bundle())
                locations = [loc for loc in ((e.get("response") or {}).get("location")
                                             for e in response.get("entry") or []) if loc]
            except FhirError as exc:
                verified = self._verify(session) if outcome_unknown(exc) else None
                if verified is None:
                    failure = WriteFailure(session.label, tuple(session.procedures), str(exc),
                                           tuple(sorted(_patients_of(session))), retryable(exc), failure_kind(exc))
                    failed[session.label] = failure
                    session.failure = failure.reason
                    summary.failures.append(failure)
                    level = logging.INFO if failure.retryable else logging.WARNING
                    log.log(level, "session %s not written%s: %s", redact.scrub(session.label),
                            " (will retry)" if failure.retryable else " (rejected: review)",
                            redact.scrub(str(exc)))
                    continue
                log.info("session %s: %s, but the server holds exactly what was sent: written",
                         redact.scrub(session.label), redact.scrub(str(exc)))
                summary.verified += 1
                locations = verified
            summary.written += len(session.entries) - session.voids - session.credits
            summary.voided += session.voids
            summary.credits += session.credits
            session.written += locations
        return failed

    def _verify(self, session: SessionPlan) -> list[str] | None:
        """After a write whose outcome is unknown: `Type/id/_history/n` of every entry when the server holds
        exactly the content the session meant to write, None otherwise (or when the server cannot tell).

        Conditional entries are found by our deterministic identifiers, voids by id; a few searches at most.
        """
        by_identifier: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        by_id: dict[str, dict[str, dict[str, Any]]] = {}
        for entry in session.entries:
            resource = entry["resource"]
            kind = resource["resourceType"]
            if "?" in entry["request"]["url"]:
                ident = resource["identifier"][0]
                by_identifier.setdefault((kind, ident["system"]), {})[ident["value"]] = resource
            else:
                by_id.setdefault(kind, {})[resource["id"]] = resource
        locations: list[str] = []
        try:
            for (kind, system), wanted in by_identifier.items():
                found = list(self.client.search_all(kind, {
                    "identifier": ",".join(f"{system}|{value}" for value in sorted(wanted)),
                    "_count": str(len(wanted) + 10)}, via_post=True))
                if not self._holds(found, wanted, lambda r, system=system: _identifier_value(r, system), locations):
                    return None
            for kind, wanted in by_id.items():
                found = list(self.client.search_all(kind, {"_id": ",".join(sorted(wanted)),
                                                           "_count": str(len(wanted) + 10)}, via_post=True))
                if not self._holds(found, wanted, lambda r: r.get("id"), locations):
                    return None
        except FhirError as exc:
            log.info("could not check the server after a failed write: %s", redact.scrub(str(exc)))
            return None
        return locations

    @staticmethod
    def _holds(found: list[dict[str, Any]], wanted: dict[str, dict[str, Any]], key: Callable[[dict[str, Any]], Any],
               locations: list[str]) -> bool:
        on_server: dict[Any, list[dict[str, Any]]] = {}
        for resource in found:
            on_server.setdefault(key(resource), []).append(resource)
        for value, resource in wanted.items():
            matches = on_server.get(value) or []
            if len(matches) != 1 or _content(matches[0]) != _content(resource):
                return False
            current = matches[0]
            version = (current.get("meta") or {}).get("versionId")
            locations.append(f"{current['resourceType']}/{current['id']}" + (f"/_history/{version}" if version else ""))
        return True

    def _outcomes(self, report: RunReport, writes: Plan, failed: dict[str, WriteFailure],
                  reviews: Iterable[Review] = ()) -> list[ProcedureOutcome]:
        by_label = {s.label: s for s in writes.sessions}
        reviewed = {r.procedure for r in [*report.reviews, *reviews]}
        held = {p.ref for s in report.coding.sessions if s.held for p in s.procedures}
        coded = {p.ref: s for s in report.coding.coded_sessions for p in s.procedures}
        out = []
        for facts in report.facts:
            if facts.kind is not Kind.FNA:
                continue
            version = version_of(facts.resource)
            patient = facts.patient or local_reference(facts.resource.get("subject"), self.local_bases)
            if facts.disposition is Disposition.MERGED:  # billed under another: no charge of its own, said so
                kept = coded.get(facts.merged_into or "")
                out.append(ProcedureOutcome(facts.ref, version, patient, Outcome.NO_CHARGE,
                                            kept.key.text() if kept else "", merged_into=facts.merged_into or "",
                                            merge_basis=facts.merge_basis))
                log.info("%s version %s is %s %s: billed once, under it", facts.ref, version or "-",
                         "part of" if facts.merge_basis == "part-of" else f"a {facts.merge_basis} of",
                         facts.merged_into)
            elif facts.disposition is Disposition.NO_CHARGE:
                out.append(ProcedureOutcome(facts.ref, version, patient, Outcome.NO_CHARGE))
            elif facts.ref in held or facts.ref not in coded:
                out.append(ProcedureOutcome(facts.ref, version, patient, Outcome.REVIEW))
            else:
                session = coded[facts.ref]
                label = session.key.text()
                sp = by_label.get(label)
                codes = tuple(f"{ln.label} x{ln.units}" for ln in session.lines if facts.ref in ln.procedures)
                # in review while coded: its Claim waits (diagnosis, payer, ...); its ChargeItems are written
                state = Outcome.REVIEW if facts.ref in reviewed else Outcome.CODED
                if label in failed:
                    state = Outcome.RETRY if failed[label].retryable else Outcome.FAILED
                elif sp is not None and sp.deferred:
                    state = Outcome.DEFERRED
                out.append(ProcedureOutcome(facts.ref, version, patient, state, session.key.text(), codes,
                                            tuple(sp.written) if sp else (),
                                            corrections=tuple(sp.corrections) if sp and sp.written else ()))
        seen = {f.ref: seen_version(f.resource) for f in report.facts if f.kind is Kind.FNA}
        return [replace(o, seen_as=seen.get(o.procedure, "")) for o in out]
