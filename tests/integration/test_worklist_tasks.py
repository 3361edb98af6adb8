"""Review items as FHIR Tasks on a real HAPI server, written and read back by `charge-adapter run --once`
processes, on both state backends: one Task per item with the reason's code and focus; fixing the data and
re-coding completes it; a coder's cancel dismisses the item; a replay asked through businessStatus codes it;
re-runs write no Task version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapter.client import FhirClient
from adapter.state import open_state
from adapter.state.base import StateBackend
from adapter.validation import validate_resource
from adapter.worklist.reasons import REASONS
from adapter.worklist.tasks import task_urls

from .adapter_process import ONLY_NEW, TABLES, Adapter, billed
from .helpers import namespaced, patients_of, resources_of, server_now
from .worklist_helpers import give_scenario_80_a_payer

URLS = task_urls(TABLES.settings.canonical_base)


def _our_tasks(client: FhirClient, state: StateBackend) -> dict[str, dict[str, Any]]:
    """This installation's Tasks by the Procedure they are about."""
    prefix = f"{state.installation_id()}-"
    found = client.search_all("Task", {"identifier": f"{URLS['identifier']}|", "_count": "200"})
    return {t["focus"]["reference"]: t for t in found
            if any(i["value"].startswith(prefix) for i in t["identifier"] if i["system"] == URLS["identifier"])}


def _business(task: dict[str, Any]) -> str:
    return next(c["code"] for c in task["businessStatus"]["coding"] if c["system"] == URLS["status"])


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_review_items_live_as_tasks_and_coders_act_through_them(
        client: FhirClient, tmp_path: Path, hapi_url: str, fhir_ns: str, backend: str,
        request: pytest.FixtureRequest) -> None:
    location = str(tmp_path / "state.sqlite") if backend == "sqlite" else request.getfixturevalue("pg_url")
    adapter = Adapter(tmp_path, hapi_url, state={"location": location}, poll=ONLY_NEW)
    state = open_state(location)
    state.set_cursor(server_now(client))
    bundles = {n: namespaced(n, fhir_ns) for n in ("31", "30", "80")}  # modality-missing/-conflict, missing-payer
    for bundle in bundles.values():
        client.transaction(bundle)
    proc = {n: next(r for r in resources_of(b) if r["resourceType"] == "Procedure") for n, b in bundles.items()}
    ref = {n: f"Procedure/{p['id']}" for n, p in proc.items()}

    first = adapter.cmd("run", "--once")
    assert first.returncode == 1, first.stderr
    entries = state.reviews()
    tasks = _our_tasks(client, state)
    assert sorted((e.procedure, e.reason) for e in entries) == sorted(
        (t["focus"]["reference"], t["code"]["coding"][0]["code"]) for t in tasks.values())  # one Task per item
    assert {n: tasks[ref[n]]["code"]["coding"][0]["code"] for n in ref} == {
        "31": "modality-missing", "30": "modality-conflict", "80": "missing-payer"}
    for n, task in ((n, tasks[ref[n]]) for n in ref):
        validate_resource(task, f"Task of {n}")
        assert (task["status"], task["intent"], _business(task)) == ("requested", "order", "waiting")
        assert task["for"] == {"reference": patients_of(bundles[n])[0]}
        row = REASONS[task["code"]["coding"][0]["code"]]
        assert task["statusReason"]["text"] == row.fix and task["input"][0]["valueString"] == row.element
    versions = {r: t["meta"]["versionId"] for r, t in tasks.items()}

    again = adapter.cmd("run", "--once")
    assert "review Tasks: 0 written" in again.stderr, again.stderr
    assert {r: t["meta"]["versionId"] for r, t in _our_tasks(client, state).items()} == versions

    # the source system records the guidance of 31: the poll re-codes it and its Task is completed
    proc["31"].setdefault("extension", []).append({
        "url": "http://hl7.org/fhir/StructureDefinition/procedure-method",
        "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "61593002"}]}})
    client.update(proc["31"])
    # a coder cancels 30's Task with a note; the payer of 80 is fixed and a coder asks for a replay
    task30 = tasks[ref["30"]]
    client.update({**task30, "status": "cancelled", "note": [{"text": "coded by hand"}]})
    give_scenario_80_a_payer(client, bundles["80"], fhir_ns)
    task80 = tasks[ref["80"]]
    client.update({**task80, "businessStatus": {"coding": [{"system": URLS["status"], "code": "replay"}]}})

    acted = adapter.cmd("run", "--once")
    assert acted.returncode == 0, (acted.stderr, state.reviews())
    assert "1 dismissed and 1 replayed through their Task" in acted.stderr, acted.stderr
    after = _our_tasks(client, state)
    assert (after[ref["31"]]["status"], _business(after[ref["31"]])) == ("completed", "coded")
    assert (after[ref["30"]]["status"], _business(after[ref["30"]])) == ("cancelled", "dismissed")
    assert after[ref["30"]]["note"] == [{"text": "coded by hand"}]  # the coder's note is kept
    assert (after[ref["80"]]["status"], _business(after[ref["80"]])) == ("completed", "coded")
    for task in after.values():
        validate_resource(task, "Task after the actions")
    dismissed = next(e for e in state.reviews(None) if e.procedure == ref["30"])
    assert dismissed.status == "dismissed"
    [action] = state.review_actions(dismissed.id)
    assert (action.action, action.note) == ("dismiss", "coded by hand")
    assert action.actor.startswith(f"task:Task/{task30['id']}/_history/")
    assert state.reviews() == []
    claims = list(client.search_all("Claim", {"patient": patients_of(bundles["80"])[0]}))
    assert len(claims) == 1 and billed(client, patients_of(bundles["80"])) == [("10005", 1)]

    versions = {r: t["meta"]["versionId"] for r, t in after.items()}
    last = adapter.cmd("run", "--once")
    assert last.returncode == 0 and "review Tasks: 0 written" in last.stderr, last.stderr
    assert {r: t["meta"]["versionId"] for r, t in _our_tasks(client, state).items()} == versions
    state.close()
