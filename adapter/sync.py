"""One pass against a FHIR server: read changed FNA Procedures, code them with the offline engine unchanged,
reconcile with what was written before, and write each session in one transaction.

A session the server rejects is reported with the server's reason and its Procedure ids, and the pass goes
on with the others. Procedures that need review are listed and never charged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from adapter.client import FhirClient
from adapter.coding.engine import Review
from adapter.config import CodeTables
from adapter.errors import FhirError
from adapter.extraction.index import reference_of, version_of
from adapter.extraction.procedures import Disposition, Kind
from adapter.pipeline import RunReport, process
from adapter.sinks.reconcile import Plan, plan
from adapter.sources.files import SourcedResource
from adapter.sources.server import ServerSource

log = logging.getLogger("adapter.sync")


@dataclass(frozen=True)
class WriteFailure:
    session: str
    procedures: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class ProcedureOutcome:
    """What happened to one Procedure version in a pass: for the processed table, reviews and the audit."""

    procedure: str
    version: str
    patient: str | None
    outcome: str
    """`coded`, `no-charge`, `review`, `failed`, or `deferred` (not written: the process was stopping)."""
    session: str = ""
    codes: tuple[str, ...] = ()
    written: tuple[str, ...] = ()


@dataclass
class SyncSummary:
    procedures: int = 0
    patients: int = 0
    sessions: int = 0
    lines: int = 0
    written: int = 0
    unchanged: int = 0
    voided: int = 0
    protected: int = 0
    reviews: list[Review] = field(default_factory=list)
    failures: list[WriteFailure] = field(default_factory=list)
    outcomes: list[ProcedureOutcome] = field(default_factory=list)

    def add(self, other: SyncSummary) -> None:
        for name in ("procedures", "patients", "sessions", "lines", "written", "unchanged", "voided", "protected"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.reviews += other.reviews
        self.failures += other.failures
        self.outcomes += other.outcomes

    @property
    def deferred(self) -> bool:
        return any(o.outcome == "deferred" for o in self.outcomes)

    def text(self) -> str:
        return (f"{self.procedures} FNA Procedures of {self.patients} patients: {self.sessions} sessions, "
                f"{self.lines} lines; written {self.written}, unchanged {self.unchanged}, voided {self.voided}, "
                f"review {len({r.procedure for r in self.reviews})}, failed sessions {len(self.failures)}")


def split_by_patient(procedures: Iterable[dict[str, Any]]) -> tuple[set[str], list[dict[str, Any]]]:
    """The patients whose Procedures changed, and the Procedures without a Patient subject (coded alone,
    so they are reported rather than silently dropped)."""
    patients: set[str] = set()
    loose: list[dict[str, Any]] = []
    for proc in procedures:
        subject = reference_of(proc.get("subject")) or ""
        if subject.startswith("Patient/"):
            patients.add(subject)
        else:
            loose.append(proc)
    return patients, loose


class Syncer:
    """Codes and writes back per patient: all of a patient's FNA Procedures are always coded together."""

    def __init__(self, client: FhirClient, tables: CodeTables, *, dry_run: bool = False) -> None:
        self.client = client
        self.tables = tables
        self.dry_run = dry_run
        self.source = ServerSource(client, tables)

    def sync_patients(self, patients: Iterable[str], loose: Iterable[dict[str, Any]] = (),
                      should_stop: Callable[[], bool] | None = None) -> SyncSummary:
        """Re-code every FNA Procedure of `patients` and bring the server's charges in line.

        `loose` are resources pushed to us rather than read from the server (an integration engine's Bundle,
        a Procedure without a usable subject): they replace the server's copy of the same `Type/id`.
        `should_stop` is asked between sessions: a stopping process finishes the session it is writing, and
        the sessions left are reported `deferred`.
        """
        wanted = sorted({p for p in patients if p})
        ctx = self.source.context(wanted)
        extra = [SourcedResource(r, f"pushed {r.get('resourceType')}/{r.get('id')}") for r in loose]
        report = process([*ctx.resources, *extra], self.tables)
        writes = plan(report, [*ctx.charge_items, *ctx.claims], self.tables)
        summary = self._summarise(report, writes, len(wanted))
        summary.failures += [WriteFailure(f"void {ref}", (), why) for ref, why in writes.unvoidable]
        if not self.dry_run:
            self._write(writes, summary, should_stop)
        summary.outcomes = self._outcomes(report, writes)
        return summary

    def sync(self, since: str | None = None,
             progress: Callable[[int], None] | None = None) -> SyncSummary:
        """One pass over the FNA Procedures changed since `since` (all when None)."""
        self.client.check_server()
        total = SyncSummary()
        done: set[str] = set()
        for page in self.source.changed_pages(since):
            patients, loose = split_by_patient(page)
            todo = patients - done
            if todo or loose:
                total.add(self.sync_patients(todo, loose))
            done |= todo
            if progress:
                progress(len(page))
        return total

    def _summarise(self, report: RunReport, writes: Plan, patients: int) -> SyncSummary:
        return SyncSummary(
            procedures=sum(1 for f in report.facts if f.kind is Kind.FNA), patients=patients,
            sessions=len(report.built.sessions), lines=sum(len(s.charge_items) for s in report.built.sessions),
            unchanged=writes.unchanged, protected=writes.protected, reviews=list(report.reviews))

    def _write(self, writes: Plan, summary: SyncSummary, should_stop: Callable[[], bool] | None = None) -> None:
        for session in writes.sessions:
            if should_stop is not None and should_stop():
                session.deferred = True
                continue
            if not session.entries:
                continue
            try:
                response = self.client.transaction(session.bundle())
            except FhirError as exc:
                log.warning("session %s rejected: %s", session.label, exc)
                session.failure = str(exc)
                summary.failures.append(WriteFailure(session.label, tuple(session.procedures), str(exc)))
                continue
            summary.written += len(session.entries) - session.voids
            summary.voided += session.voids
            for entry in response.get("entry") or []:
                location = (entry.get("response") or {}).get("location")
                if location:
                    session.written.append(location)

    def _outcomes(self, report: RunReport, writes: Plan) -> list[ProcedureOutcome]:
        by_label = {s.label: s for s in writes.sessions}
        reviewed = {r.procedure for r in report.reviews}
        held = {p.ref for s in report.coding.sessions if s.held for p in s.procedures}
        coded = {p.ref: s for s in report.coding.coded_sessions for p in s.procedures}
        out = []
        for facts in report.facts:
            if facts.kind is not Kind.FNA:
                continue
            version = version_of(facts.resource)
            patient = reference_of(facts.resource.get("subject"))
            if facts.disposition is Disposition.NO_CHARGE:
                out.append(ProcedureOutcome(facts.ref, version, patient, "no-charge"))
            elif facts.ref in held or facts.ref not in coded:
                out.append(ProcedureOutcome(facts.ref, version, patient, "review"))
            elif facts.ref in reviewed:  # its Claim waits (diagnosis, payer, ...); its ChargeItems were written
                session = coded[facts.ref]
                sp = by_label.get(session.key.text())
                codes = tuple(f"{ln.label} x{ln.units}" for ln in session.lines if facts.ref in ln.procedures)
                out.append(ProcedureOutcome(facts.ref, version, patient, "review", session.key.text(), codes,
                                            tuple(sp.written) if sp else ()))
            else:
                session = coded[facts.ref]
                sp = by_label.get(session.key.text())
                codes = tuple(f"{ln.label} x{ln.units}" for ln in session.lines if facts.ref in ln.procedures)
                state = "coded"
                if sp is not None and sp.failure is not None:
                    state = "failed"
                elif sp is not None and sp.deferred:
                    state = "deferred"
                out.append(ProcedureOutcome(facts.ref, version, patient, state, session.key.text(), codes,
                                            tuple(sp.written) if sp else ()))
        return out
