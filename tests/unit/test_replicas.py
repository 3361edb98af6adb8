"""Several replicas on one shared state, in one process: the memory state with `shared=True` gives each Service
a handle with its own instance id, as separate processes on one PostgreSQL database would have. A scripted
syncer stands in for the FHIR server (the real-process, real-PostgreSQL, real-HAPI version of these rules is
tests/integration/test_replicas.py)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from adapter.client import FhirClient
from adapter.config import load_tables
from adapter.extraction.index import seen_version
from adapter.service import POLL_ROLE, Service
from adapter.settings import WorkerSettings, load_settings
from adapter.state.base import Outcome, WorkItem
from adapter.state.memory import MemoryState
from adapter.sync import ProcedureOutcome, SyncSummary

TABLES = load_tables()


def procedure(patient: str, n: int = 1, version: str = "1", updated: str = "2026-11-27T10:00:00Z") -> dict[str, Any]:
    return {"resourceType": "Procedure", "id": f"{patient}-{n}", "meta": {"versionId": version, "lastUpdated": updated},
            "subject": {"reference": f"Patient/{patient}"}}


class PagedSource:
    """What the server's Procedure history looks like to a poll: pages of changed Procedures, and deletes."""

    def __init__(self) -> None:
        self.pages: list[list[dict[str, Any]]] = []
        self.deleted: list[str] = []
        self.reads = 0
        self.page_size = 500
        self.code_param = "x"

    def changed_pages(self, since: str | None) -> Iterator[list[dict[str, Any]]]:
        self.reads += 1
        yield from self.pages

    def deleted_since(self, since: str) -> list[str]:
        return list(self.deleted)


class SharedServer:
    """Codes every patient it is asked for (one ChargeItem each) and counts who coded whom."""

    def __init__(self, source: PagedSource) -> None:
        self.source = source
        self.coded: Counter[str] = Counter()
        self.by: dict[str, list[str]] = {}

    def syncer_for(self, name: str) -> Any:
        server = self

        class Scripted:
            source = server.source
            local_bases: frozenset[str] = frozenset()

            def sync_patients(self, patients: Iterable[str], loose: Iterable[dict[str, Any]] = (),
                              should_stop: Any = None, scope: Any = None) -> SyncSummary:
                summary = SyncSummary(patients=len(set(patients)))
                for patient in sorted(patients):
                    server.coded[patient] += 1
                    server.by.setdefault(name, []).append(patient)
                    proc = f"Procedure/{patient.split('/')[1]}-1"
                    summary.written += 1
                    summary.outcomes.append(ProcedureOutcome(
                        proc, "1", patient, Outcome.CODED, "s", ("10005 x1",), ("ChargeItem/1/_history/1",),
                        seen_as=seen_version(procedure(patient.split("/")[1]))))
                return summary

        return Scripted()


@pytest.fixture
def shared() -> tuple[MemoryState, PagedSource, SharedServer]:
    state = MemoryState(shared=True, lease_seconds=30)
    source = PagedSource()
    return state, source, SharedServer(source)


def replica(state: MemoryState, server: SharedServer, name: str, batch: int = 5) -> Service:
    settings = load_settings(None, env={})
    settings = dataclasses.replace(settings, worker=WorkerSettings(batch=batch, retry_initial_seconds=1,
                                                                   retry_max_seconds=5, lease_seconds=30))
    svc = Service(settings, TABLES, client=FhirClient("http://127.0.0.1:9/fhir"), state=state.replica(name))
    svc.syncer = server.syncer_for(name)
    return svc


def test_only_the_poll_role_holder_polls_and_it_queues_patients(shared: Any) -> None:
    state, source, server = shared
    a, b = replica(state, server, "a"), replica(state, server, "b")
    source.pages = [[procedure("p1"), procedure("p1", 2), procedure("p2")],
                    [procedure("p3", updated="2026-11-27T11:00:00Z")]]
    summary = a.poll_once()
    assert summary.queued == 3 and summary.procedures == 0  # queued, not coded: the workers code
    assert state.cursor() == "2026-11-27T11:00:00Z"
    assert sorted(i.payload["reference"] for i in state.queued()) == ["Patient/p1", "Patient/p2", "Patient/p3"]
    assert b.poll_once().queued == 0 and source.reads == 1  # b does not hold the role: it reads nothing
    assert [r.roles for r in state.replicas() if r.instance == "a"] in ([], [("poll",)])
    assert state.lead(POLL_ROLE, "a", 30) and not state.lead(POLL_ROLE, "b", 30)
    a.stop()  # a clean stop gives the role up at once
    assert b.poll_once() is not None and state.lead(POLL_ROLE, "b", 30)


def test_every_replica_works_and_each_patient_is_coded_once(shared: Any) -> None:
    state, source, server = shared
    replicas = [replica(state, server, name, batch=3) for name in ("a", "b", "c")]
    source.pages = [[procedure(f"p{i}") for i in range(20)]]
    replicas[0].poll_once()
    while sum(r.work_once() for r in replicas):  # each replica takes a batch in turn
        pass
    assert server.coded == Counter({f"Patient/p{i}": 1 for i in range(20)})
    assert all(server.by.get(name) for name in ("a", "b", "c"))  # the work was shared
    assert state.queue_depth() == 0
    # the next poll reads the page again (overlap): every version was recorded, nothing is queued
    assert replicas[0].poll_once().queued == 0 and state.queue_depth() == 0


def test_a_replica_that_dies_mid_batch_loses_nothing(shared: Any) -> None:
    state, source, server = shared
    a, b = replica(state, server, "a"), replica(state, server, "b")
    source.pages = [[procedure(f"p{i}") for i in range(4)]]
    a.poll_once()
    dying = state.replica("a").lease(2, owner="a")  # a leased two items and claimed their patients, then died
    state.claim_patients({i.payload["reference"] for i in dying}, "a", 30)
    while b.work_once():
        pass
    assert sum(server.coded.values()) == 2  # b coded what was free; a's items wait for its leases to run out
    for row in state._queue.values():  # time passes: a's leases and claims run out
        row.lease_until = 0.0
    state._claims.clear()
    while b.work_once():
        pass
    assert server.coded == Counter({f"Patient/p{i}": 1 for i in range(4)}) and state.queue_depth() == 0


def test_a_patient_another_replica_is_coding_is_retried_not_coded_twice(shared: Any) -> None:
    state, _source, server = shared
    b = replica(state, server, "b")
    state.enqueue([WorkItem("patient", {"reference": "Patient/p1"}, "poll", dedupe="patient:Patient/p1")])
    assert state.claim_patients({"Patient/p1"}, "a", 30) == {"Patient/p1"}  # a is coding p1 right now
    b.work_once()
    assert server.coded["Patient/p1"] == 0
    [waiting] = state.queued()
    assert waiting.last_error == "another instance was recoding this patient" and waiting.not_before > 0
    state.release_patients({"Patient/p1"}, "a")
    state._queue[waiting.id].item = dataclasses.replace(waiting, not_before=0.0)
    b.work_once()
    assert server.coded["Patient/p1"] == 1 and state.queue_depth() == 0


def test_a_poller_that_lost_its_role_moves_no_cursor(shared: Any) -> None:
    state, source, server = shared
    a, b = replica(state, server, "a"), replica(state, server, "b")
    source.pages = [[procedure("p1", updated="2026-11-27T10:00:00Z")]]

    class PausedMidPage(PagedSource):
        def changed_pages(self, since: str | None) -> Iterator[list[dict[str, Any]]]:
            page = [procedure("late", updated="2026-11-27T12:00:00Z")]
            state._leads[POLL_ROLE] = ("a", 0.0)  # a stalls here past its lease ...
            assert state.lead(POLL_ROLE, "b", 30)  # ... and b takes over
            state._leads[POLL_ROLE] = ("b", 1e12)
            yield page

    a.syncer.source = PausedMidPage()
    assert a.poll_once().queued == 0  # its page is not recorded: b's poll starts where the cursor was
    assert state.cursor() is None and state.queue_depth() == 0
    b.syncer.source = source
    assert b.poll_once().queued == 1 and state.cursor() == "2026-11-27T10:00:00Z"


def test_deletes_are_queued_once_and_marked_when_handled(shared: Any) -> None:
    state, source, server = shared
    a = replica(state, server, "a")
    a._patients_billed_for = lambda ref: {"Patient/p9"}  # type: ignore[method-assign]
    source.pages = [[procedure("p1")]]
    a.poll_once()  # the first poll sets the cursor; deletes are read from then on
    while a.work_once():
        pass
    source.deleted = ["Procedure/gone"]
    assert a.poll_once().queued == 1
    a.poll_once()  # read again before a worker got to it: merged into the queued item
    assert [i.kind for i in state.queued()] == ["delete"]
    while a.work_once():
        pass
    assert server.coded["Patient/p9"] == 1 and state.seen("Procedure/gone", "deleted")
    assert a.poll_once().queued == 0  # read again in the overlap window: already handled


def test_a_restored_server_reusing_a_version_number_for_other_content_is_coded_again(shared: Any) -> None:
    """"Seen" is keyed on the versionId and the content: a server restored from a backup hands out version 1
    again for an edited Procedure, which must be coded; the same content re-delivered is still skipped."""
    state, source, server = shared
    a = replica(state, server, "a")
    source.pages = [[procedure("p1")]]
    a.poll_once()
    while a.work_once():
        pass
    assert a.poll_once().queued == 0
    edited = {**procedure("p1"), "note": [{"text": "edited after the restore"}]}  # still versionId 1
    source.pages = [[edited]]
    assert a.poll_once().queued == 1


def test_a_pass_longer_than_its_lease_keeps_its_patients(shared: Any) -> None:
    """The claims of a running pass are renewed every third of the lease: a slow pass (a slow server, a large
    patient) never lets another replica code the same patients beside it."""
    import threading
    import time

    state, _source, server = shared
    a = replica(state, server, "a")
    a.settings = dataclasses.replace(a.settings, worker=dataclasses.replace(a.settings.worker, lease_seconds=0.6))
    inner = a.syncer
    in_pass = threading.Event()
    taken_by_b: list[set[str]] = []

    class Slow:
        source = inner.source
        local_bases = inner.local_bases

        def sync_patients(self, patients: Iterable[str], *args: Any, **kwargs: Any) -> SyncSummary:
            in_pass.set()
            deadline = time.monotonic() + 2.0  # more than three leases
            while time.monotonic() < deadline:
                taken_by_b.append(state.replica("b").claim_patients({"Patient/p1"}, "b", 30))
                time.sleep(0.1)
            return inner.sync_patients(patients, *args, **kwargs)

    a.syncer = Slow()
    result = a.sync_patients({"Patient/p1"})
    assert in_pass.is_set() and result.claimed == {"Patient/p1"}
    assert taken_by_b and all(not granted for granted in taken_by_b)  # b never got p1 while a coded it
