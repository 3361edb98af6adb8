"""The worker in one process, on the memory state, with a scripted writer in place of the FHIR server: which
items are done, retried (each with its own backoff) or given up, and what review entries carry."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any

import pytest

from adapter.client import FhirClient
from adapter.client.errors import FhirTransportError
from adapter.coding.engine import Review
from adapter.config import load_tables
from adapter.errors import StateUnavailable
from adapter.service import Service
from adapter.settings import WorkerSettings, load_settings
from adapter.state.base import Outcome, WorkItem
from adapter.state.memory import MemoryState
from adapter.sync import ProcedureOutcome, SyncSummary, WriteFailure

TABLES = load_tables()


class ScriptedSyncer:
    """Codes Procedure `Procedure/<patient id>-1` for every patient; `broken` patients raise, `flaky` ones fail
    their write for a passing reason, `rejected` ones are refused, `reviewed` ones need review."""

    local_bases: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[dict[str, Any]]]] = []
        self.broken: dict[str, BaseException] = {}
        self.flaky: set[str] = set()
        self.rejected: set[str] = set()
        self.reviewed: set[str] = set()
        self.source = None

    def sync_patients(self, patients: Iterable[str], loose: Iterable[dict[str, Any]] = (),
                      should_stop: Any = None, scope: Any = None) -> SyncSummary:
        patients, loose = sorted(patients), list(loose)
        self.calls.append((patients, loose))
        for patient in patients:
            if patient in self.broken:
                raise self.broken[patient]
        summary = SyncSummary(patients=len(patients))
        for patient in patients:
            proc = f"Procedure/{patient.split('/')[1]}-1"
            if patient in self.reviewed:
                summary.reviews.append(Review(proc, "pushed", "modality-missing", "no guidance evidence"))
                summary.outcomes.append(ProcedureOutcome(proc, "1", patient, Outcome.REVIEW, seen_as="1"))
            elif patient in self.flaky or patient in self.rejected:
                retry = patient in self.flaky
                summary.failures.append(WriteFailure(f"session of {patient}", (proc,), "HTTP 503" if retry else
                                                     "HTTP 422: bad ChargeItem", (patient,), retry,
                                                     "fhir-server" if retry else "fhir-rejected"))
                outcome = Outcome.RETRY if retry else Outcome.FAILED
                summary.outcomes.append(ProcedureOutcome(proc, "1", patient, outcome, seen_as="1"))
            else:
                summary.written += 1
                summary.outcomes.append(ProcedureOutcome(proc, "1", patient, Outcome.CODED, "s", ("10005 x1",),
                                                         ("ChargeItem/1/_history/1",), seen_as="1"))
        return summary


@pytest.fixture
def service() -> Service:
    settings = load_settings(None, env={})
    settings = dataclasses.replace(settings, worker=WorkerSettings(max_attempts=3, batch=10,
                                                                   retry_initial_seconds=10, retry_max_seconds=100))
    svc = Service(settings, TABLES, client=FhirClient("http://127.0.0.1:9/fhir"), state=MemoryState())
    svc.syncer = ScriptedSyncer()  # type: ignore[assignment]
    return svc


def syncer(service: Service) -> ScriptedSyncer:
    return service.syncer  # type: ignore[return-value]


def procedure(patient: str, pid: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Procedure", "id": pid or f"{patient}-1", "meta": {"versionId": "1"},
            "subject": {"reference": f"Patient/{patient}"}, **extra}


def notification(patient: str) -> WorkItem:
    return WorkItem("procedure", {"resource": procedure(patient)}, "rest-hook")


def engine_bundle(patient: str) -> WorkItem:
    resources = [procedure(patient), {"resourceType": "BodyStructure", "id": f"{patient}-bs",
                                      "patient": {"reference": f"Patient/{patient}"}},
                 procedure("someone-else", "other-1")]
    return WorkItem("resources", {"resources": resources}, "engine")


def states(state: MemoryState) -> dict[int, tuple[str, int]]:
    return {i: (row.status, row.item.attempts) for i, row in state._queue.items()}


def test_one_poison_item_neither_fails_nor_stalls_its_neighbours(service: Service) -> None:
    state: MemoryState = service.state  # type: ignore[assignment]
    syncer(service).broken["Patient/bad"] = KeyError("a bug met only by this patient's data")
    ids = state.enqueue([notification("a"), notification("bad"), notification("b")])
    assert service.work_once() == 3
    # the batch failed as a whole, then each item alone: the good ones are done after one lease
    assert states(state) == {ids[0]: ("done", 1), ids[1]: ("pending", 1), ids[2]: ("done", 1)}
    [poison] = [row.item for row in state._queue.values() if row.status == "pending"]
    assert poison.not_before > time.time() + 4 and poison.last_error.startswith("bug: ")
    # a fresh item leased beside the poison item on its last attempt is not dragged down with it
    for _ in range(2):
        fresh = state.enqueue([notification(f"fresh{_}")])[0]
        state._queue[ids[1]].item = dataclasses.replace(state._queue[ids[1]].item, not_before=0)
        service.work_once()
        assert state._queue[fresh].status == "done"
    assert state._queue[ids[1]].status == "failed"  # three unexpected failures: a person decides
    [entry] = state.reviews()
    assert (entry.kind, entry.procedure, entry.patients) == ("processing-failed", "Procedure/bad-1", ("Patient/bad",))
    assert "failed 3 times" in entry.detail


def test_an_outage_puts_every_item_back_with_its_own_backoff_and_never_gives_up(service: Service) -> None:
    state: MemoryState = service.state  # type: ignore[assignment]
    refused = FhirTransportError("POST", "http://fhir", "connection failed: Connection refused", 5)
    for patient in ("a", "b"):
        syncer(service).broken[f"Patient/{patient}"] = refused
    ids = state.enqueue([notification("a"), notification("b")])
    for _ in range(6):  # far beyond max_attempts
        for row in state._queue.values():
            row.item = dataclasses.replace(row.item, not_before=0)
        calls = len(syncer(service).calls)
        service.work_once()
        assert len(syncer(service).calls) == calls + 1  # an outage is not split item by item
        assert {i: s for i, (s, _) in states(state).items()} == {ids[0]: "pending", ids[1]: "pending"}
    items = [row.item for row in state._queue.values()]
    assert sum(i.attempts for i in items) >= 6 and all(i.last_error.startswith("fhir-unreachable") for i in items)
    assert state.reviews() == [] and state.processed() == {}
    syncer(service).broken.clear()  # the server is back: the backlog clears by itself
    for row in state._queue.values():
        row.item = dataclasses.replace(row.item, not_before=0)
    while service.work_once():
        pass
    assert {s for s, _ in states(state).values()} == {"done"}
    assert state.processed() == {("Procedure/a-1", "1"): "coded", ("Procedure/b-1", "1"): "coded"}


def test_a_batch_too_slow_for_the_server_gets_through_in_smaller_batches(service: Service) -> None:
    """A read for the whole batch times out every time (a large server); halved batches pass."""
    state: MemoryState = service.state  # type: ignore[assignment]
    slow = FhirTransportError("POST", "http://fhir", "read timeout", 5)
    original = syncer(service).sync_patients

    def times_out_above_two(patients: Any, loose: Any = (), should_stop: Any = None, scope: Any = None) -> SyncSummary:
        if len(set(patients)) > 2:
            raise slow
        return original(patients, loose, should_stop)

    syncer(service).sync_patients = times_out_above_two  # type: ignore[method-assign]
    state.enqueue([notification(f"p{i}") for i in range(10)])  # batch 10: one read of 10 patients
    for _ in range(20):
        for row in state._queue.values():
            row.item = dataclasses.replace(row.item, not_before=0)
        service.work_once()
    assert {s for s, _ in states(state).values()} == {"done"}  # 10 -> 5 -> 2 items a turn, then back up
    assert service._batch <= service.settings.worker.batch


def test_a_write_that_fails_for_a_passing_reason_is_never_recorded_as_done(service: Service) -> None:
    state: MemoryState = service.state  # type: ignore[assignment]
    syncer(service).flaky.add("Patient/a")
    ids = state.enqueue([notification("a"), notification("b")])
    service.work_once()
    assert states(state) == {ids[0]: ("pending", 1), ids[1]: ("done", 1)}
    assert ("Procedure/a-1", "1") not in state.processed() and state.reviews() == []
    assert state._queue[ids[0]].item.last_error == "fhir-server: HTTP 503"
    assert service.metrics.value("charge_adapter_failures_total", kind="fhir-server") == 1


def test_pushed_content_rejected_by_the_server_goes_to_review_with_the_content_and_replays_it(
        service: Service) -> None:
    state: MemoryState = service.state  # type: ignore[assignment]
    syncer(service).rejected.add("Patient/a")
    state.enqueue([engine_bundle("a")])
    service.work_once()
    assert state.queue_counts() == {"done": 1}  # a person decides: no retry loop on a rejection
    [entry] = state.reviews()
    assert (entry.kind, entry.patients) == ("write-rejected", ("Patient/a",))
    assert [f"{r['resourceType']}/{r['id']}" for r in entry.resources] == ["Procedure/a-1", "BodyStructure/a-bs"]
    syncer(service).rejected.clear()  # the data was fixed (or the tables)
    service.replay([entry.id])
    patients, loose = syncer(service).calls[-1]
    assert patients == ["Patient/a"] and loose == list(entry.resources)  # exactly what was received
    assert state.reviews() == []


def test_reviews_of_pushed_content_carry_it(service: Service) -> None:
    state: MemoryState = service.state  # type: ignore[assignment]
    syncer(service).reviewed.add("Patient/a")
    state.enqueue([WorkItem("procedure", {"resource": procedure("a")}, "engine")])
    service.work_once()
    [entry] = state.reviews()
    assert entry.kind == "needs-review" and entry.patients == ("Patient/a",)
    assert entry.resources == (procedure("a"),)


def test_a_state_failure_while_recording_puts_the_items_back_on_the_next_turn(
        service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    state: MemoryState = service.state  # type: ignore[assignment]
    ids = state.enqueue([notification("a")])
    real = state.record_pass

    def full(record: Any) -> None:
        raise StateUnavailable("memory:", "disk full")

    monkeypatch.setattr(state, "record_pass", full)
    with pytest.raises(StateUnavailable):
        service.work_once()
    assert states(state) == {ids[0]: ("leased", 1)}
    monkeypatch.setattr(state, "record_pass", real)
    service.work_once()  # back first, then leased again at once (not after the 5-minute lease)
    assert states(state) == {ids[0]: ("done", 2)}


@pytest.mark.parametrize(("scenario", "merged", "into", "audit"), [
    ("56-duplicate-identifier", "Procedure/s56-fna-2", "Procedure/s56-fna-1", "duplicate-of Procedure/s56-fna-1"),
    ("58-part-of-children", "Procedure/s58-fna-2", "Procedure/s58-fna-1", "part-of Procedure/s58-fna-1")])
def test_online_a_procedure_billed_under_another_is_said_in_the_outcome_the_audit_and_the_log(
        service: Service, caplog: pytest.LogCaptureFixture, scenario: str, merged: str, into: str, audit: str) -> None:
    """Offline the merged Procedure is listed on stderr; online (sync, run, serve) its outcome names the
    Procedure it is billed under, an INFO line says so without patient data, and the audit keeps a row."""
    from pathlib import Path

    from adapter.pipeline import process_paths
    from adapter.service import PassResult
    from adapter.sinks.reconcile import plan
    from adapter.sync import Syncer

    root = Path(__file__).resolve().parents[2]
    report = process_paths([root / "fixtures/fhir/scenarios" / scenario / "input.json"], TABLES)
    real = Syncer(FhirClient("http://127.0.0.1:9/fhir"), TABLES)
    with caplog.at_level("INFO", logger="adapter.sync"):
        outcomes = real._outcomes(report, plan(report, [], TABLES), {})
    (outcome,) = [o for o in outcomes if o.procedure == merged]
    assert (outcome.outcome, outcome.merged_into) == (Outcome.NO_CHARGE, into)
    assert outcome.session == next(o.session for o in outcomes if o.procedure == into) != ""
    logged = [r.getMessage() for r in caplog.records if merged in r.getMessage()]
    assert len(logged) == 1 and into in logged[0] and "billed once" in logged[0]
    assert "Patient/" not in logged[0] and "CYT-" not in logged[0]  # no patient, no identifier value
    summary = SyncSummary(procedures=len(outcomes), outcomes=outcomes)
    assert ("duplicate" if "duplicate" in audit else "partOf child") in summary.text()
    record, _ = service.pass_record(PassResult(summary, set()))
    rows = [a for a in record.audit if a.procedure == merged]
    assert [(a.codes, a.written, a.session) for a in rows] == [((audit,), (), outcome.session)]
