"""Task content of a review entry (valid R4, only our table's texts), and the worklist page's pure parts."""

from __future__ import annotations

from typing import Any

from adapter.config import DEFAULT_CANONICAL_BASE
from adapter.state.base import NewReview, PassRecord, ReviewEntry
from adapter.state.memory import MemoryState
from adapter.validation import validate_resource
from adapter.worklist.reasons import REASONS
from adapter.worklist.tasks import TaskMirror, task_urls
from adapter.worklist.web import age_text, parse_users

URLS = task_urls(DEFAULT_CANONICAL_BASE)


def _mirror() -> tuple[TaskMirror, MemoryState]:
    state = MemoryState()
    return TaskMirror(None, state, DEFAULT_CANONICAL_BASE, lambda ids: None), state  # type: ignore[arg-type]


def _entry(state: MemoryState, reason: str, procedure: str = "Procedure/p1",
           detail: str = "Coverage/c names no payer (text: Jane Doe's plan)") -> ReviewEntry:
    state.open_review(NewReview(procedure, "needs-review", reason, detail, ("Patient/x",)))
    return next(e for e in state.reviews() if e.reason == reason)


def test_every_reason_makes_a_valid_task_that_carries_no_detail() -> None:
    mirror, state = _mirror()
    for n, reason in enumerate(REASONS):
        entry = _entry(state, reason, f"Procedure/p{n}")
        task = mirror.task_for(entry)
        validate_resource(task, reason)
        assert (task["status"], task["intent"], task["code"]["coding"][0]["code"]) == ("requested", "order", reason)
        assert task["focus"] == {"reference": f"Procedure/p{n}"} and task["for"] == {"reference": "Patient/x"}
        assert task["statusReason"]["text"] == REASONS[reason].fix
        assert "Jane" not in str(task)  # the entry's detail (quoting the input) never goes on the Task
        assert mirror.entry_id(task) == entry.id


def test_closed_entries_complete_or_cancel_and_a_coders_elements_are_kept() -> None:
    mirror, state = _mirror()
    entry = _entry(state, "modality-missing")
    server: dict[str, Any] = {**mirror.task_for(entry), "id": "7", "meta": {"versionId": "3"},
                              "note": [{"text": "looking"}], "status": "in-progress"}
    again = mirror.task_for(entry, server)
    assert again["status"] == "in-progress" and again["note"] == [{"text": "looking"}]  # someone works on it
    assert mirror.same(again, server) and "meta" not in again
    assert state.dismiss_review(entry.id, "web:a", "n")
    dismissed = mirror.task_for(state.review(entry.id), server)  # type: ignore[arg-type]
    assert dismissed["status"] == "cancelled" and not mirror.same(dismissed, server)
    assert dismissed["businessStatus"]["coding"][0]["code"] == "dismissed"
    other = _entry(state, "missing-payer")
    state.record_pass(PassRecord(resolve_ids=[other.id]))
    coded = mirror.task_for(state.review(other.id))  # type: ignore[arg-type]
    assert (coded["status"], coded["businessStatus"]["coding"][0]["code"]) == ("completed", "coded")


def test_a_task_of_another_installation_or_shape_is_not_ours() -> None:
    mirror, _ = _mirror()
    assert mirror.entry_id({"identifier": [{"system": URLS["identifier"], "value": "someone-else-4"}]}) is None
    assert mirror.entry_id({"identifier": [{"system": "urn:other", "value": mirror.identifier_value(4)}]}) is None
    assert mirror.entry_id({"identifier": [{"system": URLS["identifier"], "value": mirror.identifier_value(4)}]}) == 4


def test_replay_is_asked_by_code_or_by_text() -> None:
    mirror, _ = _mirror()
    assert mirror._asks_replay({"businessStatus": {"coding": [{"system": URLS["status"], "code": "replay"}]}})
    assert mirror._asks_replay({"businessStatus": {"text": " Replay "}})
    assert not mirror._asks_replay({"businessStatus": {"coding": [{"system": "urn:x", "code": "replay"}]}})
    assert not mirror._asks_replay({"businessStatus": {"coding": [{"system": URLS["status"], "code": "waiting"}]}})


def test_logins_and_ages_read_as_documented() -> None:
    assert parse_users("ann:pw1; bob:p:w2\n\nbroken\n:nope") == {"ann": "pw1", "bob": "p:w2"}
    assert [age_text(d) for d in (0.0001, 0.5, 3.25)] == ["1 min", "12 h", "3.2 d"]


def review_tasks_sample() -> list[dict[str, Any]]:
    """Tasks of every status (open, in progress, completed, cancelled) for every fifth reason: what the
    official HL7 validator checks in tests/integration/test_sync.py (all reasons: 0 errors, 0 warnings too)."""
    mirror, state = _mirror()
    out = []
    for n, reason in enumerate(list(REASONS)[::5]):
        entry = _entry(state, reason, f"Procedure/p{n}")
        if n % 4 == 1:
            state.dismiss_review(entry.id, "web:a", "n")
        elif n % 4 == 2:
            state.record_pass(PassRecord(resolve_ids=[entry.id]))
        current = {"status": "in-progress", "note": [{"text": "on it"}]} if n % 4 == 3 else None
        task = mirror.task_for(state.review(entry.id), current)  # type: ignore[arg-type]
        out.append({**task, "id": f"review-{n}", "lastModified": task["authoredOn"]})
    return out


def test_the_tasks_sample_has_every_status() -> None:
    assert {t["status"] for t in review_tasks_sample()} == {"requested", "in-progress", "completed", "cancelled"}


def test_review_dismiss_on_the_command_line_needs_a_note_and_an_open_entry(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from adapter.cli import cli
    from adapter.state.sqlite import SqliteState

    state = SqliteState(tmp_path / "state.sqlite")
    state.open_review(NewReview("Procedure/a", "needs-review", "mue-exceeded", "d", ("Patient/x",)))
    [entry] = state.reviews()
    config = tmp_path / "adapter.yaml"
    config.write_text(f"state: {tmp_path / 'state.sqlite'}\n")
    run = CliRunner().invoke
    assert run(cli, ["--config", str(config), "review", "dismiss", str(entry.id), "--note", " "]).exit_code == 3
    done = run(cli, ["--config", str(config), "review", "dismiss", str(entry.id), "--note", "billed by hand"])
    assert done.exit_code == 0 and "dismissed" in done.output
    assert run(cli, ["--config", str(config), "review", "dismiss", str(entry.id), "--note", "x"]).exit_code == 1
    [action] = state.review_actions(entry.id)
    assert action.actor.startswith("cli:") and action.note == "billed by hand"
    shown = run(cli, ["--config", str(config), "review", "show", str(entry.id)]).output
    assert "status:    dismissed" in shown and REASONS["mue-exceeded"].fix in shown
    assert f"action:    dismiss by {action.actor} at " in shown and shown.rstrip().endswith(": billed by hand")
