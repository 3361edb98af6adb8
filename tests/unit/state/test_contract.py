"""The state contract (adapter.state.base), run against every backend by the `make_state` fixture."""

from __future__ import annotations

import time

import pytest

from adapter.errors import InstanceLocked, LeadLost
from adapter.state.base import (
    AuditRecord,
    NewReview,
    PassRecord,
    Processed,
    Retry,
    StateBackend,
    WorkItem,
    patient_work,
)

from .conftest import MakeState


def poll(reason: str = "ping") -> WorkItem:
    return WorkItem("poll", {"reason": reason}, "rest-hook")


def test_leases_count_attempts_and_expire(make_state: MakeState) -> None:
    state = make_state(lease_seconds=0.0)
    ids = state.enqueue([poll("a"), WorkItem("delete", {"reference": "Procedure/x"}, "rest-hook")])
    first = state.lease(10)
    assert [i.id for i in first] == ids and [i.attempts for i in first] == [1, 1]
    assert first[0].payload == {"reason": "a"} and first[0].received_at > 0
    # the worker died without finishing: with the lease run out, the items come back
    second = state.lease(10)
    assert [i.id for i in second] == ids and [i.attempts for i in second] == [2, 2]
    state.ack(ids)
    assert state.lease(10) == [] and state.queue_depth() == 0
    assert state.queue_counts() == {"done": 2}


def test_a_live_lease_hides_the_item(state: StateBackend) -> None:
    [item_id] = state.enqueue([poll()])
    assert [i.id for i in state.lease(5)] == [item_id]
    assert state.lease(5) == []
    assert state.queue_depth() == 1


def test_each_retried_item_keeps_its_own_not_before_and_reason(state: StateBackend) -> None:
    a, b = state.enqueue([poll("a"), poll("b")])
    state.lease(10)
    now = time.time()
    state.retry([Retry(a, now + 100, "fhir-unreachable: connection refused"), Retry(b, now + 5, "HTTP 503")])
    assert state.lease(10, now=now) == []
    [due] = state.lease(10, now=now + 6)
    assert (due.id, due.attempts, due.last_error) == (b, 2, "HTTP 503")
    [later] = state.lease(10, now=now + 101)
    assert (later.id, later.attempts, later.last_error) == (a, 2, "fhir-unreachable: connection refused")


def test_delays_become_times_on_the_states_clock_when_stored(state: StateBackend) -> None:
    """A wait given as a delay is turned into a time by the state itself (the database's clock, in the storing
    transaction): a replica whose clock is off cannot postpone a retry, nor run it without backoff."""
    a, b = state.enqueue([poll("a"), poll("b")])
    state.lease(10)
    before = state.stats().read_at or time.time()
    state.retry([Retry(a, 0.0, "HTTP 503", delay=100.0)])
    state.record_pass(PassRecord(retried=[Retry(b, 0.0, "HTTP 503", delay=30.0)],
                                 due=[patient_work("Patient/p", "HTTP 503", delay=60.0)]))
    after = state.stats().read_at or time.time()
    waits = {i.payload.get("reason") or i.payload.get("reference"): i.not_before for i in state.queued()}
    assert before + 100 <= waits["a"] <= after + 100 and before + 30 <= waits["b"] <= after + 30
    assert before + 60 <= waits["Patient/p"] <= after + 60
    assert state.lease(10, now=before + 29) == []


def test_dead_letter_opens_reviews_in_the_same_step(state: StateBackend) -> None:
    [item_id] = state.enqueue([WorkItem("resources", {"resources": [{"resourceType": "Procedure", "id": "p"}]},
                                        "engine")])
    state.lease(1)
    review = NewReview("Procedure/p", "processing-failed", "processing-failed", "bug: KeyError", ("Patient/1",),
                       ({"resourceType": "Procedure", "id": "p"},))
    state.dead_letter([item_id], "bug: KeyError", [review])
    assert state.queue_counts() == {"failed": 1}
    [entry] = state.reviews()
    assert entry.patients == ("Patient/1",) and entry.patient == "Patient/1"
    assert entry.resources == ({"resourceType": "Procedure", "id": "p"},)
    assert state.stats().dead == 1


def test_patient_retries_are_queued_once_per_patient(state: StateBackend) -> None:
    now = time.time()
    first = state.enqueue([patient_work("Patient/1", "HTTP 503", now + 60)])
    again = state.enqueue([patient_work("Patient/1", "connection refused", now + 10),
                           patient_work("Patient/2", "HTTP 503", now + 60)])
    assert again[0] == first[0] and again[1] != first[0]
    [due] = state.lease(10, now=now + 11)  # the earlier not_before won
    assert due.payload == {"reference": "Patient/1"} and due.last_error == "connection refused"
    state.ack([due.id])
    assert state.enqueue([patient_work("Patient/1", "x", now)]) != first  # done: a new one may be queued


def test_unknown_work_kind_is_refused(state: StateBackend) -> None:
    with pytest.raises(ValueError, match="unknown work kind"):
        state.enqueue([WorkItem("guess", {}, "t")])
    with pytest.raises(ValueError, match="unknown work kind"):
        state.record_pass(PassRecord(due=[WorkItem("guess", {}, "t")]))
    assert state.queue_depth() == 0


def test_record_pass_writes_everything(state: StateBackend) -> None:
    leased = state.enqueue([poll("a"), poll("b"), poll("c")])
    state.lease(10)
    state.open_review(NewReview("Procedure/old", "needs-review", "modality-missing", "before", ("Patient/1",)))
    assert state.claim_patients({"Patient/1"}, "me", 60) == {"Patient/1"}
    now = time.time()
    state.record_pass(PassRecord(
        processed=[Processed("Procedure/a", "1", "coded"), Processed("Procedure/b", "2", "failed")],
        reviews=[NewReview("Procedure/b", "write-rejected", "write-rejected", "HTTP 422", ("Patient/1",))],
        resolve=["Procedure/old", "Procedure/b"], keep={("Procedure/b", "write-rejected")},
        audit=[AuditRecord("Procedure/a", "1", "s", ("10005 x1",), "t1", ("ChargeItem/1/_history/1",))],
        due=[patient_work("Patient/2", "HTTP 503", now + 30)],
        cursors={"poll": "2026-11-27T10:00:00Z", "deletes": "2026-11-27T09:00:00Z"},
        acked=[leased[0]], retried=[Retry(leased[1], now + 30, "HTTP 503")], dead=[(leased[2], "bug")],
        release=["Patient/1"], owner="me"))
    assert state.seen("Procedure/a", "1") and state.seen("Procedure/b", "2") and not state.seen("Procedure/a", "2")
    assert [(e.procedure, e.reason) for e in state.reviews()] == [("Procedure/b", "write-rejected")]
    assert state.audit_for("Procedure/a")[0].written == ("ChargeItem/1/_history/1",)
    assert state.cursor() == "2026-11-27T10:00:00Z" and state.cursor("deletes") == "2026-11-27T09:00:00Z"
    assert state.queue_counts() == {"done": 1, "pending": 2, "failed": 1}
    assert {i.kind for i in state.queued()} == {"poll", "patient"}
    assert state.claim_patients({"Patient/1"}, "other", 60) == {"Patient/1"}  # released


def test_record_pass_is_all_or_nothing(state: StateBackend) -> None:
    broken = NewReview("Procedure/a", "needs-review", "r", "d", (), ({"not json": {1, 2}},))  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        state.record_pass(PassRecord(processed=[Processed("Procedure/a", "1", "coded")], reviews=[broken],
                                     cursors={"poll": "2026-01-01T00:00:00Z"}))
    assert not state.seen("Procedure/a", "1")
    assert state.cursor() is None and state.reviews() == []


def test_reviews_open_refresh_and_resolve(state: StateBackend) -> None:
    state.open_review(NewReview("Procedure/a", "needs-review", "modality-missing", "first", ("Patient/p",),
                                ({"resourceType": "Procedure", "id": "a"},)))
    state.open_review(NewReview("Procedure/a", "needs-review", "modality-missing", "second"))
    state.open_review(NewReview("Procedure/a", "write-rejected", "write-rejected", "HTTP 400", ("Patient/p",)))
    [missing, rejected] = state.reviews()
    assert rejected.kind == "write-rejected"
    assert (missing.attempts, missing.detail, missing.patients) == (2, "second", ("Patient/p",))
    assert missing.resources == ({"resourceType": "Procedure", "id": "a"},)  # kept: the refresh had none
    state.record_pass(PassRecord(resolve=["Procedure/a"], keep={("Procedure/a", "write-rejected")}))
    assert [e.reason for e in state.reviews()] == ["write-rejected"]
    assert state.review(missing.id).status == "resolved"  # type: ignore[union-attr]
    state.record_pass(PassRecord(resolve_ids=[rejected.id]))
    assert state.reviews() == [] and len(state.reviews(None)) == 2


def test_cursor_processed_audit_and_event_numbers(state: StateBackend) -> None:
    assert state.cursor() is None
    state.set_cursor("2026-11-27T10:00:00.123+00:00")
    assert state.cursor() == "2026-11-27T10:00:00.123+00:00"
    state.set_event_number("Subscription/s", 5)
    state.set_event_number("Subscription/s", 3)  # never goes back
    assert state.last_event_number("Subscription/s") == 5
    state.enqueue([poll()], event=("Subscription/s", 7))
    assert state.last_event_number("Subscription/s") == 7 and state.queue_depth() == 1
    state.enqueue([], event=("Subscription/t", 1))  # a heartbeat: only the number
    assert state.last_event_number("Subscription/t") == 1


def test_patient_claims_expire_and_belong_to_their_owner(state: StateBackend) -> None:
    now = time.time()
    assert state.claim_patients({"Patient/1", "Patient/2"}, "a", 10, now=now) == {"Patient/1", "Patient/2"}
    assert state.claim_patients({"Patient/1", "Patient/3"}, "b", 10, now=now) == {"Patient/3"}
    assert state.claim_patients({"Patient/1"}, "a", 10, now=now) == {"Patient/1"}  # its own: renewed
    state.release_patients({"Patient/1"}, "b")  # not b's to release
    assert state.claim_patients({"Patient/1"}, "b", 10, now=now + 1) == set()
    assert state.claim_patients({"Patient/2"}, "b", 10, now=now + 11) == {"Patient/2"}  # a's claim ran out
    state.release_patients({"Patient/1"}, "a")
    assert state.claim_patients({"Patient/1"}, "b", 10, now=now + 2) == {"Patient/1"}


def test_stats_for_health_and_metrics(state: StateBackend) -> None:
    empty = state.stats()
    assert (empty.queue_depth, empty.retry_backlog, empty.oldest_queued_at, empty.dead) == (0, 0, None, 0)
    before = time.time()
    a, _b = state.enqueue([poll("a"), poll("b")])
    state.lease(1)
    state.retry([Retry(a, time.time() + 60, "HTTP 503")])
    state.set_cursor("2026-11-27T10:00:00Z")
    stats = state.stats()
    assert stats.queue_depth == 2 and stats.retry_backlog == 1 and stats.cursor == "2026-11-27T10:00:00Z"
    assert stats.oldest_queued_at is not None and before - 1 <= stats.oldest_queued_at <= time.time()
    state.heartbeat()
    assert state.installation_id() == state.installation_id() and len(state.installation_id()) >= 16


def test_prune_removes_old_done_work_and_old_audit_only(state: StateBackend) -> None:
    done, pending = state.enqueue([poll("done"), poll("pending")])
    state.lease(1)
    state.ack([done])
    state.record_pass(PassRecord(audit=[AuditRecord("Procedure/a", "1", "s", (), "t", ())]))
    assert state.prune(done_before=time.time() - 3600, audit_before=time.time() - 3600) == \
        {"queue": 0, "audit": 0, "claims": 0}
    removed = state.prune(done_before=time.time() + 1, audit_before=time.time() + 1)
    assert removed["queue"] == 1 and removed["audit"] == 1
    assert [i.id for i in state.queued()] == [pending] and state.audit_for("Procedure/a") == []


def test_one_running_instance_unless_the_backend_is_shared(make_state: MakeState) -> None:
    first = make_state()
    first.acquire_instance_lock()
    second = make_state()
    if not first.shared:
        with pytest.raises(InstanceLocked, match=r"another (charge-adapter )?run/serve"):
            second.acquire_instance_lock()
        return
    second.acquire_instance_lock()  # replicas: both run, and both are listed
    assert {r.instance for r in first.replicas()} >= {first.instance_id, second.instance_id}


def test_a_role_has_one_holder_until_its_lease_runs_out(state: StateBackend) -> None:
    now = time.time()
    assert state.lead("poll", "a", 10, now=now)
    assert not state.lead("poll", "b", 10, now=now + 1)
    assert state.lead("poll", "a", 10, now=now + 5)  # renewed: now until now + 15
    assert not state.lead("poll", "b", 10, now=now + 14)
    assert state.lead("poll", "b", 10, now=now + 16)  # a died: its lease ran out
    assert not state.lead("poll", "a", 10, now=now + 17)
    assert state.lead("other", "a", 10, now=now + 17)  # roles are independent
    state.resign("poll", "a")  # not a's to give up
    assert not state.lead("poll", "a", 10, now=now + 18)
    state.resign("poll", "b")
    assert state.lead("poll", "a", 10)


def test_a_pass_that_needs_a_lost_role_records_nothing(state: StateBackend) -> None:
    now = time.time()
    assert state.lead("poll", "a", 60, now=now - 120)  # long expired
    assert state.lead("poll", "b", 60)
    with pytest.raises(LeadLost, match="poll"):
        state.record_pass(PassRecord(due=[patient_work("Patient/1", "changed", 0.0)],
                                     processed=[Processed("Procedure/a", "1", "coded")],
                                     cursors={"poll": "2026-11-27T10:00:00Z"}, owner="a", lead="poll"))
    assert state.cursor() is None and state.queue_depth() == 0 and not state.seen("Procedure/a", "1")
    state.record_pass(PassRecord(cursors={"poll": "2026-11-27T10:00:00Z"}, owner="b", lead="poll"))
    assert state.cursor() == "2026-11-27T10:00:00Z"


def test_replicas_show_their_roles_claims_and_leases(make_state: MakeState) -> None:
    a, b = make_state(), make_state()
    assert a.instance_id != b.instance_id
    now = time.time()
    a.heartbeat(now=now - 5)
    b.heartbeat(now=now)
    a.heartbeat(now=now - 1)  # a beat again: started stays
    assert a.lead("poll", a.instance_id, 60)
    assert a.claim_patients({"Patient/1", "Patient/2"}, a.instance_id, 60) == {"Patient/1", "Patient/2"}
    b.enqueue([poll("x"), poll("y"), poll("z")])
    assert len(b.lease(2, owner=b.instance_id)) == 2
    by_id = {r.instance: r for r in a.replicas()}
    first, second = by_id[a.instance_id], by_id[b.instance_id]
    assert (first.roles, first.claims, first.leased) == (("poll",), 2, 0)
    assert (second.roles, second.claims, second.leased) == ((), 0, 2)
    assert first.started == pytest.approx(now - 5) and first.last_seen == pytest.approx(now - 1)
    assert [r.instance for r in a.replicas()][:2] == [b.instance_id, a.instance_id]  # newest heartbeat first
    assert a.replicas(now=now + 3600)[0].claims == 0  # expired claims and roles are not held


def test_dedupe_merges_into_pending_work_only(state: StateBackend) -> None:
    [first] = state.enqueue([patient_work("Patient/1", "changed", 0.0)])
    [leased] = state.lease(1)
    assert leased.id == first
    # a change arrives while the worker codes what it read before: it must not be folded into the leased item
    [second] = state.enqueue([patient_work("Patient/1", "changed again", 0.0)])
    assert second != first and state.queue_depth() == 2
    [third] = state.enqueue([patient_work("Patient/1", "and again", 0.0)])
    assert third == second and state.queue_depth() == 2


def test_a_retried_item_beside_a_newer_pending_one_keeps_both(state: StateBackend) -> None:
    """The one way to two pending items of a key: the next enqueue merges into the older (every backend alike)."""
    [first] = state.enqueue([patient_work("Patient/1", "changed", 0.0)])
    [leased] = state.lease(1)
    [second] = state.enqueue([patient_work("Patient/1", "changed again", 0.0)])
    state.retry([Retry(leased.id, 0.0, "HTTP 503")])
    assert [i.id for i in state.queued()] == [first, second]
    assert state.enqueue([patient_work("Patient/1", "and again", 0.0)]) == [first]
    assert state.queue_depth() == 2
