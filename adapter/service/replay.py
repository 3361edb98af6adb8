"""Replay for analysts: open review entries re-run after the data or the tables were fixed."""

from __future__ import annotations

from typing import Any

from adapter.service.poller import Poller
from adapter.state.base import PassRecord, ReviewEntry, ReviewKind
from adapter.sync import SyncSummary


class Replayer(Poller):
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


def _pushed_by_patient(entries: list[ReviewEntry]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        for patient in entry.patients:
            out.setdefault(patient, []).extend(entry.resources)
    return out
