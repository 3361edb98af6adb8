"""FHIR R4's modifier elements on the resources read for a Procedure (docs/input-contract.md, modifier-element,
test-data): each applied with its meaning or sent to review naming the element."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.config import load_tables
from adapter.extraction.modifiers import deceased_before, is_test_data, modifier_findings
from adapter.pipeline import process
from adapter.sources.files import SourcedResource

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted(p for p in (ROOT / "fixtures/fhir/scenarios").iterdir() if (p / "input.json").exists())
TABLES = load_tables()


def resources(folder: Path) -> list[dict[str, Any]]:
    return [e["resource"] for e in json.loads((folder / "input.json").read_text())["entry"]]


def run(found: list[dict[str, Any]]):
    return process([SourcedResource(r, f"in#{i}") for i, r in enumerate(found)], TABLES)


def test_each_modifier_element_we_cannot_apply_is_named() -> None:
    said = modifier_findings({"resourceType": "Encounter", "status": "cancelled", "implicitRules": "urn:x",
                              "contained": [{"resourceType": "Location", "id": "l", "implicitRules": "urn:y"}]},
                             "Encounter/e")
    assert [s.split(" (")[0] for s in said] == ["Encounter.implicitRules urn:x", "Encounter.status cancelled",
                                               "Location.implicitRules urn:y"]
    assert "Encounter/e#l" in said[2]
    assert modifier_findings({"resourceType": "ServiceRequest", "status": "entered-in-error"}, "ServiceRequest/s")
    assert modifier_findings({"resourceType": "Organization", "active": False}, "Organization/o")
    merged = modifier_findings({"resourceType": "Patient", "link": [
        {"type": "replaces", "other": {"reference": "Patient/a"}},
        {"type": "replaced-by", "other": {"reference": "Patient/b"}}]}, "Patient/p")
    assert len(merged) == 1 and "Patient.link[1] replaced-by Patient/b" in merged[0]


@pytest.mark.parametrize("resource", [
    {"resourceType": "Encounter", "status": "finished"}, {"resourceType": "Encounter", "status": "planned"},
    {"resourceType": "Location", "status": "inactive"}, {"resourceType": "ServiceRequest", "intent": "proposal"},
    {"resourceType": "Patient", "active": True, "link": [{"type": "seealso"}, {"type": "refer"}]},
    {"resourceType": "Practitioner", "active": False}, {"resourceType": "PractitionerRole", "active": False},
    {"resourceType": "Coverage", "status": "cancelled"}, {"resourceType": "Account", "status": "inactive"},
], ids=lambda r: f"{r['resourceType']}-{r.get('status', r.get('active', r.get('intent')))}")
def test_modifier_elements_applied_elsewhere_or_without_effect_hold_nothing(resource: dict[str, Any]) -> None:
    assert modifier_findings(resource, "X/x") == []


def test_a_death_holds_only_services_after_it_and_test_data_is_labelled() -> None:
    assert deceased_before({"deceasedDateTime": "2026-05-01"}, "2026-05-02") == "2026-05-01"
    assert deceased_before({"deceasedDateTime": "2026-05-01T23:00:00Z"}, "2026-05-01") is None
    assert deceased_before({"deceasedBoolean": True}, "2026-05-02") is None
    label = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST"}
    assert is_test_data({"meta": {"security": [label]}}) and not is_test_data({"meta": {"tag": [label]}})


def coded_patients(found: list[dict[str, Any]]) -> list[str]:
    report = run(found)
    return sorted({s.session.key.patient for s in report.built.sessions})


@settings(deadline=None, derandomize=True, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(folder=st.sampled_from(SCENARIOS), rng=st.randoms(use_true_random=False),
       element=st.sampled_from(["implicitRules", "Patient.active", "Patient.link", "Encounter.status", "HTEST"]))
def test_a_modifier_element_on_a_coded_patient_holds_or_frees_exactly_that_patients_procedures(
        folder: Path, rng: random.Random, element: str) -> None:
    """Over every scenario: the element set on one coded patient's Patient (or every Encounter of theirs) sends
    each of that patient's FNAs that was billed to review modifier-element (HTEST: to no charge), and every other
    patient's charges stay byte for byte."""
    found = resources(folder)
    before = run(found)
    patients = sorted({s.session.key.patient for s in before.built.sessions if "?" not in s.session.key.patient})
    if not patients:
        return
    chosen = rng.choice(patients)
    changed = copy.deepcopy(found)
    for res in changed:
        key = f"{res['resourceType']}/{res.get('id')}"
        if key == chosen and element == "implicitRules":
            res["implicitRules"] = "https://rules.example.org/research"
        elif key == chosen and element == "Patient.active":
            res["active"] = False
        elif key == chosen and element == "Patient.link":
            res["link"] = [{"type": "replaced-by", "other": {"reference": "Patient/survivor"}}]
        elif key == chosen and element == "HTEST":
            res["meta"] = {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                                         "code": "HTEST"}]}
        elif res["resourceType"] == "Encounter" and element == "Encounter.status" and \
                (res.get("subject") or {}).get("reference") == chosen:
            res["status"] = "entered-in-error"
    after = run(changed)
    billed = {p.ref for s in before.built.sessions if s.session.key.patient == chosen for p in s.session.procedures}
    if element == "Encounter.status":  # only the sessions in an encounter
        billed = {p.ref for s in before.built.sessions if s.session.key.patient == chosen and s.session.key.encounter
                  for p in s.session.procedures}
    if element == "HTEST":
        assert billed <= {f.ref for f in after.coding.no_charge}
    else:
        reviewed = {r.procedure for r in after.reviews if r.reason == "modifier-element"}
        assert billed <= reviewed | {r.procedure for r in after.reviews if r.reason == "session-held"}
        assert billed & reviewed or not billed
    others = lambda report: [(s.session.key, s.charge_items) for s in report.built.sessions  # noqa: E731
                             if s.session.key.patient != chosen]
    if element != "Encounter.status":
        assert others(after) == others(before)
