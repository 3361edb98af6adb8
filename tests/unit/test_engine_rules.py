"""Unit tests of the pure engine, one rule at a time, on Procedures built in the test."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from adapter.building.resources import transaction_bundle
from adapter.config import load_tables
from adapter.pipeline import RunReport, process
from adapter.sources.files import SourcedResource
from adapter.validation import InvalidOutputError, validate_resource

SCT = "http://snomed.info/sct"
CPT = "http://www.ama-assn.org/go/cpt"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
GUIDANCE = "http://fhir-charge-adapter.example.org/fhir/CodeSystem/guidance"
EXT = "http://hl7.org/fhir/StructureDefinition/"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
MODALITY = {"none": (GUIDANCE, "none"), "us": (SCT, "61593002"), "fluoro": (SCT, "44491008"),
            "ct": (DCM, "CT"), "mr": (SCT, "258177008")}
TABLES = load_tables()


def procedure(pid: str, modality: str | None = "us", lesions: tuple[str, ...] = ("bs1",), *, patient: str = "p1",
              performer: str | None = "d1", encounter: str | None = "e1", when: str = "2026-03-04T09:00:00Z",
              status: str = "completed", code: tuple[str, str] = (SCT, "48635004"), **extra: Any) -> dict[str, Any]:
    ext: list[dict[str, Any]] = []
    if modality:
        system, value = MODALITY[modality]
        ext.append({"url": EXT + "procedure-method",
                    "valueCodeableConcept": {"coding": [{"system": system, "code": value}]}})
    ext += [{"url": EXT + "procedure-targetBodyStructure", "valueReference": {"reference": f"BodyStructure/{b}"}}
            for b in lesions]
    res: dict[str, Any] = {"resourceType": "Procedure", "id": pid, "status": status,
                           "code": {"coding": [{"system": code[0], "code": code[1]}]},
                           "subject": {"reference": f"Patient/{patient}"}, "performedDateTime": when,
                           "reasonCode": [{"coding": [{"system": ICD10CM, "code": "R59.0"}]}]}
    if ext:
        res["extension"] = ext
    if performer:
        res["performer"] = [{"actor": {"reference": f"Practitioner/{performer}"}}]
    if encounter:
        res["encounter"] = {"reference": f"Encounter/{encounter}"}
    res.update(extra)
    return res


def coverage(patient: str = "p1", cid: str = "c1", order: int | None = None) -> dict[str, Any]:
    cov = {"resourceType": "Coverage", "id": cid, "status": "active",
           "beneficiary": {"reference": f"Patient/{patient}"},
           "payor": [{"reference": "Organization/o1"}]}
    if order is not None:
        cov["order"] = order
    return cov


def run(*resources: dict[str, Any], tables: Any = TABLES) -> RunReport:
    return process([SourcedResource(r, f"test#{i}") for i, r in enumerate(resources)], tables)


def lines(report: RunReport) -> list[tuple[str, tuple[str, ...], int, tuple[str, ...]]]:
    return [(ln.code, ln.modifiers, ln.units, tuple(r.split("/")[1] for r in ln.procedures))
            for ln in report.coding.lines]


def reviews(report: RunReport) -> set[tuple[str, str]]:
    return {(r.procedure.split("/")[1], r.reason) for r in report.reviews}


def with_settings(**changes: Any) -> Any:
    return dataclasses.replace(TABLES, settings=dataclasses.replace(TABLES.settings, **changes))


@pytest.mark.parametrize(("modality", "primary", "add_on"), [
    ("none", "10021", "10004"), ("us", "10005", "10006"), ("fluoro", "10007", "10008"),
    ("ct", "10009", "10010"), ("mr", "10011", "10012")])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_primary_once_then_add_on_per_further_lesion(modality: str, primary: str, add_on: str, count: int) -> None:
    report = run(procedure("f1", modality, tuple(f"bs{i}" for i in range(count))), coverage())
    expected = [(primary, (), 1, ("f1",))] + ([(add_on, (), count - 1, ("f1",))] if count > 1 else [])
    assert lines(report) == expected
    assert report.exit_code == 0


def test_additional_modality_primary_takes_59_and_first_modality_is_earliest_lesion() -> None:
    report = run(procedure("f2", "fluoro", ("bs3",), when="2026-03-04T10:00:00Z"),
                 procedure("f1", "us", ("bs1", "bs2"), when="2026-03-04T09:00:00Z"))
    assert lines(report) == [("10005", (), 1, ("f1",)), ("10006", (), 1, ("f1",)), ("10007", ("59",), 1, ("f2",))]
    reversed_order = run(procedure("f2", "fluoro", ("bs3",), when="2026-03-04T08:00:00Z"),
                         procedure("f1", "us", ("bs1", "bs2"), when="2026-03-04T09:00:00Z"))
    assert lines(reversed_order) == [("10007", (), 1, ("f2",)), ("10005", ("59",), 1, ("f1",)),
                                     ("10006", (), 1, ("f1",))]


def test_xs_setting_replaces_59_and_add_ons_never_carry_it() -> None:
    report = run(procedure("f1", "ct", ("a",)), procedure("f2", "us", ("b", "c"), when="2026-03-04T11:00:00Z"),
                 tables=with_settings(distinct_modifier="XS"))
    assert lines(report) == [("10009", (), 1, ("f1",)), ("10005", ("XS",), 1, ("f2",)), ("10006", (), 1, ("f2",))]
    ext = report.built.sessions[0].charge_items[1]["extension"][0]
    assert ext["valueCodeableConcept"]["coding"][0]["code"] == "XS"
    assert ext["valueCodeableConcept"]["coding"][0]["system"] == "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"


def test_same_body_structure_in_two_procedures_is_one_lesion_and_a_second_procedure_adds_add_ons() -> None:
    same = run(procedure("f1", lesions=("bs1",)), procedure("f2", lesions=("bs1",), when="2026-03-04T10:00:00Z"))
    assert lines(same) == [("10005", (), 1, ("f1",))]
    more = run(procedure("f1", lesions=("bs1",)), procedure("f2", lesions=("bs2",), when="2026-03-04T10:00:00Z"))
    assert lines(more) == [("10005", (), 1, ("f1",)), ("10006", (), 1, ("f2",))]


def test_repeated_reference_and_passes_count_one_lesion() -> None:
    report = run(procedure("f1", lesions=("bs1", "bs1"), note=[{"text": "4 passes into the nodule"}]))
    assert lines(report) == [("10005", (), 1, ("f1",))]
    assert "counted once" in report.facts[0].lesion_note


def test_body_site_extension_is_a_lesion_and_approach_is_not() -> None:
    site = {"coding": [{"system": SCT, "code": "76752008", "display": "Breast"}],
            "extension": [{"url": EXT + "bodySite", "valueReference": {"reference": "BodyStructure/b9"}}]}
    approach = {"url": EXT + "procedure-approachBodyStructure", "valueReference": {"reference": "BodyStructure/ap"}}
    res = procedure("f1", lesions=("bs1",), bodySite=[site])
    res["extension"].append(approach)
    report = run(res)
    assert lines(report) == [("10005", (), 1, ("f1",)), ("10006", (), 1, ("f1",))]
    keys = [lesion.key for lesion, _, _ in report.coding.sessions[0].lesions]
    assert keys == ["BodyStructure/bs1", "BodyStructure/b9"]


def test_coded_sites_without_body_structures_dedupe_within_but_not_across_procedures() -> None:
    left = {"coding": [{"system": SCT, "code": "80248007", "display": "Left breast"}]}
    right = {"coding": [{"system": SCT, "code": "73056007", "display": "Right breast"}]}
    report = run(procedure("f1", lesions=(), bodySite=[left, right, dict(left)]),
                 procedure("f2", lesions=(), bodySite=[left], when="2026-03-04T10:00:00Z"))
    assert lines(report) == [("10005", (), 1, ("f1",)), ("10006", (), 2, ("f1", "f2"))]


def test_no_site_information_is_one_lesion_and_says_so() -> None:
    report = run(procedure("f1", lesions=()))
    assert lines(report) == [("10005", (), 1, ("f1",))]
    assert "counted as one lesion" in report.facts[0].lesion_note


@pytest.mark.parametrize(("code", "expected"), [((SCT, "432337008"), "10005"), ((CPT, "10009"), "10009"),
                                                ((CPT, "10004"), "10021")])
def test_procedure_code_is_guidance_evidence(code: tuple[str, str], expected: str) -> None:
    report = run(procedure("f1", None, code=code))
    assert [ln[0] for ln in lines(report)] == [expected]


def test_disagreeing_evidence_and_missing_evidence_go_to_review() -> None:
    conflict = run(procedure("f1", "ct", code=(SCT, "432337008")))
    assert reviews(conflict) == {("f1", "modality-conflict")} and conflict.exit_code == 1 and not lines(conflict)
    missing = run(procedure("f1", None))
    assert reviews(missing) == {("f1", "modality-missing")}
    unknown = procedure("f1", None)
    unknown["extension"].append({"url": EXT + "procedure-method",
                                 "valueCodeableConcept": {"coding": [{"system": SCT, "code": "999"}]}})
    detail = run(unknown).reviews[0].detail
    assert "999" in detail and "not in config/modalities.yaml" in detail


def test_missing_evidence_can_be_coded_unguided_by_setting() -> None:
    report = run(procedure("f1", None), tables=with_settings(when_missing="none"))
    assert lines(report) == [("10021", (), 1, ("f1",))]
    assert "when_missing" in report.facts[0].modality_note


@pytest.mark.parametrize("status", ["not-done", "preparation", "in-progress", "on-hold", "entered-in-error"])
def test_non_billable_statuses_charge_nothing_and_take_no_part_in_the_session(status: str) -> None:
    report = run(procedure("f1", status=status), procedure("f2", lesions=("bs2",), when="2026-03-04T10:00:00Z"))
    assert lines(report) == [("10005", (), 1, ("f2",))]
    assert [f.ref for f in report.coding.no_charge] == ["Procedure/f1"] and report.exit_code == 0


@pytest.mark.parametrize("status", ["stopped", "unknown"])
def test_stopped_and_unknown_need_review_and_hold_the_session(status: str) -> None:
    report = run(procedure("f1", status=status), procedure("f2", lesions=("bs2",), when="2026-03-04T10:00:00Z"))
    assert reviews(report) == {("f1", "status-needs-review"), ("f2", "session-held")}
    assert lines(report) == [] and report.exit_code == 1


def test_sessions_split_by_date_performer_and_encounter() -> None:
    # without MUE limits (10009 is 1 a day), so that two sessions on one day are both billable
    report = run(procedure("f1", "ct"), procedure("f2", "ct", ("b2",), when="2026-03-05T09:00:00Z"),
                 procedure("f3", "ct", ("b3",), performer="d2"), procedure("f4", "ct", ("b4",), encounter="e2"),
                 tables=dataclasses.replace(TABLES, mue={}))
    assert sorted(ln[0] for ln in lines(report)) == ["10009"] * 4
    assert len(report.coding.coded_sessions) == 4


def test_session_date_is_taken_in_the_configured_time_zone() -> None:
    # 02:00Z on the 5th is still the 4th in New York: one session there, two in UTC
    pair = (procedure("f1", when="2026-03-04T20:00:00Z", encounter=None),
            procedure("f2", lesions=("b2",), when="2026-03-05T02:00:00Z", encounter=None))
    assert len(run(*pair).coding.coded_sessions) == 2
    ny = run(*pair, tables=with_settings(time_zone="America/New_York"))
    assert lines(ny) == [("10005", (), 1, ("f1",)), ("10006", (), 1, ("f2",))]


def test_mue_limit_sends_the_session_to_review_never_cuts() -> None:
    report = run(procedure("f1", "none", tuple(f"b{i}" for i in range(5))))
    assert reviews(report) == {("f1", "mue-exceeded")}
    assert lines(report) == [] and "10004 x4" in report.reviews[0].detail


def test_core_biopsy_of_the_same_lesion_goes_to_review() -> None:
    core = procedure("c1", None, ("bs1",), code=(SCT, "44578009"), when="2026-03-04T11:00:00Z")
    assert reviews(run(procedure("f1"), core)) == {("f1", "core-biopsy-same-lesion")}
    other = procedure("c1", None, ("bs9",), code=(SCT, "44578009"))
    assert lines(run(procedure("f1"), other)) == [("10005", (), 1, ("f1",))]


def test_same_lesion_under_two_modalities_is_a_conflict() -> None:
    report = run(procedure("f1", "us"), procedure("f2", "ct", when="2026-03-04T10:00:00Z"))
    assert reviews(report) == {("f1", "lesion-modality-conflict"), ("f2", "lesion-modality-conflict")}


@pytest.mark.parametrize(("change", "reason"), [
    ({"subject": None}, "invalid-resource"), ({"performer": None}, "missing-performer"),
    ({"performedDateTime": None}, "missing-performed-date"), ({"performedDateTime": "2026-03"}, "invalid-resource"),
    ({"status": "done"}, "invalid-resource"), ({"subject": {"reference": "Group/g1"}}, "invalid-resource")])
def test_bad_procedures_are_reviewed_and_never_stop_the_others(change: dict[str, Any], reason: str) -> None:
    bad = procedure("bad", patient="p2")
    for key, value in change.items():
        if value is None:
            bad.pop(key, None)
        else:
            bad[key] = value
    report = run(bad, procedure("good"))
    assert ("bad", reason) in reviews(report)
    assert lines(report) == [("10005", (), 1, ("good",))]


def test_non_fna_procedures_are_skipped_not_errors() -> None:
    report = run(procedure("x", None, code=(SCT, "80146002")), procedure("f1"))
    assert [f.ref for f in report.coding.skipped] == ["Procedure/x"] and report.exit_code == 0


def test_claim_needs_coverage_and_orders_insurance() -> None:
    no_cov = run(procedure("f1"))
    assert [s.claim for s in no_cov.built.sessions] == [None]
    assert [w.code for w in no_cov.built.warnings] == ["no-coverage"]
    report = run(procedure("f1", reasonCode=[{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                                          "code": "E04.1"}]}]),
                 coverage(cid="c2", order=2), coverage(cid="c1", order=1))
    claim = report.built.sessions[0].claim
    assert [i["coverage"]["reference"] for i in claim["insurance"]] == ["Coverage/c1", "Coverage/c2"]
    assert [i["focal"] for i in claim["insurance"]] == [True, False]
    assert claim["diagnosis"][0]["diagnosisCodeableConcept"]["coding"][0]["code"] == "E04.1"
    assert claim["item"][0]["diagnosisSequence"] == [1] and claim["item"][0]["procedureSequence"] == [1]


def test_output_is_deterministic_and_independent_of_input_order() -> None:
    resources = [procedure("f1", "us", ("a", "b")), procedure("f2", "ct", ("c",), when="2026-03-04T10:00:00Z"),
                 coverage()]
    first = json.dumps(transaction_bundle([r for s in run(*resources).built.sessions for r in s.resources()]))
    again = json.dumps(transaction_bundle([r for s in run(*reversed(resources)).built.sessions for r in s.resources()]))
    assert first == again
    entry = json.loads(first)["entry"][0]
    assert entry["request"]["method"] == "PUT" and entry["request"]["url"].startswith("ChargeItem?identifier=")
    assert entry["fullUrl"].startswith("urn:uuid:")


def test_never_emitted_codes_never_appear() -> None:
    report = run(procedure("f1", "us", ("a", "b")), procedure("f2", "ct", ("c",)), coverage())
    text = json.dumps([r for s in report.built.sessions for r in s.resources()])
    for code in TABLES.never_emit:
        assert f'"code": "{code}"' not in text


def test_validation_rejects_an_invalid_resource_with_its_name() -> None:
    with pytest.raises(InvalidOutputError, match=r"ChargeItem X.*subject"):
        validate_resource({"resourceType": "ChargeItem", "status": "billable",
                           "code": {"coding": [{"code": "10005"}]}}, "ChargeItem X")


def test_mue_adds_up_units_over_the_sessions_of_one_day() -> None:
    # two encounters on one day are two sessions, each 10005 x1: 2 units of 10005 that day, MUE 1
    report = run(procedure("f1", "us", ("a",), encounter="e1"), procedure("f2", "us", ("b",), encounter="e2"))
    assert reviews(report) == {("f1", "mue-exceeded"), ("f2", "mue-exceeded")}
    assert "over 2 sessions" in report.reviews[0].detail and lines(report) == []
    other_day = run(procedure("f1", "us", ("a",), encounter="e1"),
                    procedure("f2", "us", ("b",), encounter="e2", when="2026-03-05T09:00:00Z"))
    assert len(lines(other_day)) == 2
