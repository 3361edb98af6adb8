"""Reconciliation with what the server holds: pure planning of updates, voids and protected charges."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from adapter.pipeline import RunReport
from adapter.sinks.reconcile import Plan, plan

from .test_engine_rules import SCT, TABLES, coverage, procedure, run

SCENARIOS = Path(__file__).resolve().parents[2] / "fixtures/fhir/scenarios"


def test_reconcile_voids_unwanted_charges_and_leaves_reviewed_ones() -> None:
    report = run(procedure("f1", "us", ("a",)), coverage())
    wanted = report.built.sessions[0].charge_items[0]
    stale = {**wanted, "id": "old", "meta": {"versionId": "3"},
             "identifier": [{**wanted["identifier"][0], "value": "fna-gone"}]}
    unchanged = {**wanted, "id": "same", "meta": {"versionId": "1"}}
    result = plan(report, [stale, unchanged], TABLES)
    entries = [e for s in result.sessions for e in s.entries]
    assert [e["request"]["method"] for e in entries] == ["PUT", "PUT"]  # the Claim, and the void
    void = entries[-1]
    assert void["request"] == {"method": "PUT", "url": "ChargeItem/old", "ifMatch": 'W/"3"'}
    assert void["resource"]["status"] == "entered-in-error" and "meta" not in void["resource"]
    assert result.unchanged == 1

    held = run(procedure("f1", "us", ("a",), status="stopped"), coverage())
    assert plan(held, [stale | {"service": [{"reference": "Procedure/f1"}]}], TABLES).protected == 1

    broken = {**stale, "code": "not a CodeableConcept"}
    assert [ref for ref, _ in plan(report, [broken], TABLES).unvoidable] == ["ChargeItem/old"]


def _scenario_11() -> list[dict[str, Any]]:
    bundle = json.loads(next(SCENARIOS.glob("11-*/input.json")).read_text())
    return [e["resource"] for e in bundle["entry"]]


def _as_stored(report: RunReport) -> list[dict[str, Any]]:
    """What the server holds after `report`'s resources were written: ids and versions added."""
    return [{**r, "id": f"srv-{n}", "meta": {"versionId": "1"}}
            for n, r in enumerate(r for s in report.built.sessions for r in s.resources())]


def _applied(stored: list[dict[str, Any]], result: Plan) -> list[tuple[str, str, str, int]]:
    """(type, code with modifiers, status, units) of every resource on the server once `result` is written."""
    by_identifier = {(r["resourceType"], r["identifier"][0]["value"]): r for r in stored}
    for entry in (e for s in result.sessions for e in s.entries):
        res = entry["resource"]
        by_identifier[(res["resourceType"], res["identifier"][0]["value"])] = res
    out = []
    for res in by_identifier.values():
        if res["resourceType"] == "ChargeItem":
            out.append(("ChargeItem", res["code"]["text"], res["status"], res["quantity"]["value"]))
        else:
            out.append(("Claim", "", res["status"], len(res["item"])))
    return sorted(out)


def test_a_session_whose_claim_waits_is_reconciled_never_billed_twice() -> None:
    """Scenario 11 billed (10005, 10006, 10007-59 and a Claim), then fna-2's guidance corrected from fluoroscopy
    to ultrasound while the patient's only Coverage became self-pay: the ChargeItems are coded with certainty
    (10005 x1, 10006 x2) and only the Claim waits (missing-payer). Lesion 3 is in 10006 x2 now, so 10007-59
    must be voided, and the old Claim (10007-59 on it, a payer no longer valid) cancelled."""
    original = run(*_scenario_11())
    stored = _as_stored(original)
    assert _applied(stored, Plan()) == [("ChargeItem", "10005", "billable", 1), ("ChargeItem", "10006", "billable", 1),
                                        ("ChargeItem", "10007-59", "billable", 1), ("Claim", "", "active", 3)]
    edited = copy.deepcopy(_scenario_11())
    for res in edited:
        if res["id"] == "s11-fna-2":
            res["extension"][0]["valueCodeableConcept"] = {"coding": [{"system": SCT, "code": "61593002"}]}
        if res["resourceType"] == "Coverage":
            res["payor"] = [{"reference": "Patient/s11-pat"}]
    report = run(*edited)
    assert {r.reason for r in report.reviews} == {"missing-payer"}
    result = plan(report, stored, TABLES)
    assert result.protected == 0
    assert _applied(stored, result) == [
        ("ChargeItem", "10005", "billable", 1), ("ChargeItem", "10006", "billable", 2),
        ("ChargeItem", "10007-59", "entered-in-error", 1), ("Claim", "", "cancelled", 3)]
    voids = [e["request"] for s in result.sessions for e in s.entries
             if e["resource"]["status"] in ("entered-in-error", "cancelled")]
    assert voids == [{"method": "PUT", "url": "ChargeItem/srv-2", "ifMatch": 'W/"1"'},
                     {"method": "PUT", "url": "Claim/srv-3", "ifMatch": 'W/"1"'}]
    # the voids travel with the session's own writes: one transaction
    assert [len(s.entries) for s in result.sessions] == [3]

    # once the payer is back, the same Claim identifier is written again, active, with the new lines
    fixed = copy.deepcopy(edited)
    for res in fixed:
        if res["resourceType"] == "Coverage":
            res["payor"] = [{"reference": "Organization/s11-org"}]
    after = [e["resource"] | {"id": f"srv-{n}"} for n, e in enumerate(e for s in result.sessions for e in s.entries)]
    again = plan(run(*fixed), [*after, stored[0]], TABLES)
    assert _applied([*after, stored[0]], again) == [
        ("ChargeItem", "10005", "billable", 1), ("ChargeItem", "10006", "billable", 2),
        ("ChargeItem", "10007-59", "entered-in-error", 1), ("Claim", "", "active", 2)]


def test_charges_of_a_procedure_that_cannot_be_coded_are_protected_even_beside_a_waiting_claim() -> None:
    """The same edit, but fna-2 is now `stopped` (status-needs-review: its lesion's code is unknown): its
    session is held whole, nothing of it is built, so every charge it had stays exactly as it was."""
    original = run(*_scenario_11())
    stored = _as_stored(original)
    edited = copy.deepcopy(_scenario_11())
    for res in edited:
        if res["id"] == "s11-fna-2":
            res["status"] = "stopped"
    report = run(*edited)
    assert {r.reason for r in report.reviews} == {"status-needs-review", "session-held"}
    result = plan(report, stored, TABLES)
    assert result.protected == 4 and result.writes == 0
