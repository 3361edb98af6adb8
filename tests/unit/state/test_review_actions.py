"""The worklist's part of the state contract: dismissing an entry with a note, and the audit of who did what."""

from __future__ import annotations

from adapter.state.base import NewReview, PassRecord, ReviewAction, StateBackend


def test_dismiss_closes_an_open_entry_once_and_audits_who_and_why(state: StateBackend) -> None:
    state.open_review(NewReview("Procedure/a", "needs-review", "core-biopsy-same-lesion", "d", ("Patient/p",)))
    [entry] = state.reviews()
    state.record_review_action(ReviewAction(entry.id, 1.0, "web:coder1", "replay"))
    assert state.dismiss_review(entry.id, "task:Task/t/_history/2", "FNA inadequate, billed by hand")
    assert not state.dismiss_review(entry.id, "web:coder2", "again")  # already closed: nothing changes
    assert state.reviews() == [] and state.review(entry.id).status == "dismissed"  # type: ignore[union-attr]
    actions = state.review_actions(entry.id)
    assert [(a.actor, a.action, a.note) for a in actions] == [
        ("web:coder1", "replay", ""), ("task:Task/t/_history/2", "dismiss", "FNA inadequate, billed by hand")]
    # the same Procedure and reason later opens a new entry: the dismissed one stays as it was
    state.open_review(NewReview("Procedure/a", "needs-review", "core-biopsy-same-lesion", "d2"))
    [again] = state.reviews()
    assert again.id != entry.id and state.review_actions(again.id) == []


def test_a_resolved_entry_cannot_be_dismissed(state: StateBackend) -> None:
    state.open_review(NewReview("Procedure/b", "needs-review", "modality-missing", "d"))
    [entry] = state.reviews()
    state.record_pass(PassRecord(resolve_ids=[entry.id]))
    assert not state.dismiss_review(entry.id, "web:coder1")
    assert state.review(entry.id).status == "resolved"  # type: ignore[union-attr]
    assert state.review_actions(entry.id) == []
