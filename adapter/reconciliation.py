"""Reconciliation: re-code the FNA Procedures on a server, compare with the charges it holds, and say (or
repair) every difference.

The comparison is the write-back planner's own (`sinks.reconcile.plan`), so what reconcile calls drift is
exactly what a sync would write, and `--repair` is that sync. What it compares: every patient with an FNA
Procedure on the server (changed at or after `since`, when given), and every patient our charges name (all of
them without `since`; with it, those billed for Procedures deleted in the window), so charges whose Procedures
are gone are found too. With `since`, only sessions billing a Procedure changed or deleted in the window are
compared and written: a shared server's other drift does not mask the answer.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from adapter.extraction.index import reference_of
from adapter.sinks.reconcile import Drift, DriftItem
from adapter.sources.server import chunks
from adapter.sync import Syncer, SyncSummary, split_by_patient

log = logging.getLogger("adapter.reconcile")

BATCH_PATIENTS = 50
"""Patients coded and compared together (one context read, as a poll page's)."""


@dataclass
class ReconcileResult:
    """What a reconciliation found (before any repair), and what its repair did."""

    drift: list[DriftItem] = field(default_factory=list)
    edits_kept: int = 0
    procedures: int = 0
    patients: int = 0
    repaired: bool = False
    summary: SyncSummary = field(default_factory=SyncSummary)
    """The sync of the reconciled patients (its writes, when repairing; its failures and reviews)."""

    @property
    def unrepaired(self) -> list[DriftItem]:
        """Drift a repair cannot write: lines others changed (review), and any session whose write failed."""
        failed = {f.session for f in self.summary.failures}
        return [d for d in self.drift if d.kind not in Drift.REPAIRABLE or d.session in failed
                or not self.repaired]

    def as_json(self) -> dict[str, Any]:
        found = Counter(d.kind for d in self.drift)
        return {
            "procedures": self.procedures, "patients": self.patients,
            "drift": {kind: found.get(kind, 0) for kind in Drift.KINDS},
            "edits_kept": self.edits_kept,
            "repaired": self.repaired,
            "written": self.summary.written if self.repaired else 0,
            "credits": self.summary.credits if self.repaired else 0,
            "voided": self.summary.voided if self.repaired else 0,
            "failures": [{"session": f.session, "reason": f.reason, "retryable": f.retryable}
                         for f in self.summary.failures],
            "items": [{"kind": d.kind, "resource": d.resource, "session": d.session,
                       "procedures": list(d.procedures), "detail": d.detail} for d in self.drift],
        }


def reconcile(syncer: Syncer, since: str | None = None, *, repair: bool = False,
              progress: Callable[[int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> ReconcileResult:
    """Compare (and with `repair`, write) every FNA session on the server, or those changed since `since`."""
    syncer.client.check_server()
    patients, loose, scope = in_scope(syncer, since)
    result = ReconcileResult(patients=len(patients))
    dry_run = syncer.dry_run
    syncer.dry_run = dry_run or not repair
    try:
        batches: list[tuple[list[str], list[dict[str, Any]]]] = [(b, []) for b in chunks(sorted(patients),
                                                                                       BATCH_PATIENTS)]
        if loose:
            batches.append(([], loose))
        for batch, pushed in batches:
            if should_stop is not None and should_stop():
                break
            summary = syncer.sync_patients(batch, pushed, should_stop, scope)
            result.summary.add(summary)
            result.drift += summary.drift_items
            result.edits_kept += summary.edits_kept
            if progress:
                progress(len(batch) + len(pushed))
    finally:
        syncer.dry_run = dry_run
    result.procedures = result.summary.procedures
    result.repaired = repair and not syncer.dry_run
    return result


def in_scope(syncer: Syncer, since: str | None) -> tuple[set[str], list[dict[str, Any]], set[str] | None]:
    """(patients, Procedures without a local patient, the Procedures in the window or None for all)."""
    patients: set[str] = set()
    loose: list[dict[str, Any]] = []
    scope: set[str] | None = set() if since else None
    for page in syncer.source.changed_pages(since):
        found, without = split_by_patient(page, syncer.local_bases)
        patients |= found
        loose += without
        if scope is not None:
            scope |= {f"Procedure/{p.get('id')}" for p in page}
    if since is None:
        patients |= _patients_with_our_charges(syncer)
    else:
        deleted = syncer.source.deleted_since(since)
        assert scope is not None
        scope |= set(deleted)
        patients |= _patients_billed_for(syncer, deleted)
    return patients, loose, scope


def _patients_with_our_charges(syncer: Syncer) -> set[str]:
    settings = syncer.tables.settings
    found: set[str] = set()
    for kind, system, element in (("ChargeItem", settings.charge_identifier_system, "subject"),
                                  ("Claim", settings.claim_identifier_system, "patient")):
        for res in syncer.client.search_all(kind, {"identifier": f"{system}|", "_elements": element,
                                                   "_count": "1000"}, via_post=True):
            ref = reference_of(res.get(element))
            if ref and ref.startswith("Patient/"):
                found.add(ref)
    return found


def _patients_billed_for(syncer: Syncer, procedures: Iterable[str]) -> set[str]:
    system = syncer.tables.settings.charge_identifier_system
    found: set[str] = set()
    for batch in chunks(sorted(set(procedures))):
        for res in syncer.client.search_all("ChargeItem", {"service": ",".join(batch), "identifier": f"{system}|",
                                                           "_elements": "subject", "_count": "1000"},
                                            via_post=True):
            ref = reference_of(res.get("subject"))
            if ref:
                found.add(ref)
    return found


def drift_table(result: ReconcileResult) -> str:
    """The drift by kind, then one line per difference (no free text: codes, units, statuses, references)."""
    found = Counter(d.kind for d in result.drift)
    lines = [f"{'drift':<20} count"] + [f"{kind:<20} {found.get(kind, 0)}" for kind in Drift.KINDS]
    if result.edits_kept:
        lines.append(f"{'(edits kept)':<20} {result.edits_kept}")
    for item in result.drift:
        lines.append(f"{item.kind}: {item.resource}: {item.detail}")
    return "\n".join(lines)
