"""Unit tests of the real-feed rules (docs/input-contract.md section 9), one at a time, on resources built here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from adapter.config import load_tables
from adapter.extraction import index as index_module
from adapter.extraction.index import ResourceIndex, normalize_bases
from adapter.pipeline import RunReport, process, process_paths
from adapter.report import diagnostics, explain
from adapter.sources.files import SourcedResource
from adapter.sync import split_by_patient

from .test_engine_rules import SCT, coverage, lines, procedure, reviews

TABLES = load_tables()
V3P = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


def run_entries(*items: tuple[dict[str, Any], str | None], tables: Any = TABLES) -> RunReport:
    """Resources with an optional fullUrl each, as one Bundle's entries."""
    return process([SourcedResource(r, f"test#{i}", url) for i, (r, url) in enumerate(items)], tables)


def run(*resources: dict[str, Any], tables: Any = TABLES) -> RunReport:
    return run_entries(*((r, None) for r in resources), tables=tables)


def function(code: str) -> dict[str, Any]:
    return {"coding": [{"system": V3P, "code": code}]}


# -------------------------------------------------------------------------------------------- references
def test_urn_uuid_references_resolve_through_full_urls() -> None:
    proc = procedure("f1", subject={"reference": "urn:uuid:p"}, performer=None,
                     extension=[{"url": "http://hl7.org/fhir/StructureDefinition/procedure-method",
                                 "valueCodeableConcept": {"coding": [{"system": SCT, "code": "61593002"}]}}])
    proc["subject"] = {"reference": "urn:uuid:p"}
    proc["performer"] = [{"actor": {"reference": "urn:uuid:d"}}]
    report = run_entries((proc, None), ({"resourceType": "Patient", "id": "p1"}, "urn:uuid:p"),
                         ({"resourceType": "Practitioner", "id": "d1"}, "urn:uuid:d"))
    assert lines(report) == [("10005", (), 1, ("f1",))]
    assert report.coding.sessions[0].key.patient == "Patient/p1"
    assert report.coding.sessions[0].key.performer == "Practitioner/d1"


def test_an_unresolvable_urn_uuid_is_reviewed_with_the_reference_in_the_reason() -> None:
    proc = procedure("f1")
    proc["subject"] = {"reference": "urn:uuid:nowhere"}
    report = run(proc, procedure("f2", patient="p2"))
    assert ("f1", "unresolved-reference") in reviews(report)
    assert "urn:uuid:nowhere" in next(r.detail for r in report.reviews if r.procedure == "Procedure/f1")
    assert lines(report) == [("10005", (), 1, ("f2",))]


def test_conditional_and_logical_references_resolve_by_identifier() -> None:
    npi = {"system": "http://hl7.org/fhir/sid/us-npi", "value": "123"}
    doctor = {"resourceType": "Practitioner", "id": "d9", "identifier": [npi]}
    by_search = procedure("f1", performer=None)
    by_search["performer"] = [{"actor": {"reference": "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|123"}}]
    by_identifier = procedure("f2", lesions=("bs2",), when="2026-03-04T10:00:00Z", performer=None)
    by_identifier["performer"] = [{"actor": {"type": "Practitioner", "identifier": npi}}]
    report = run(by_search, by_identifier, doctor)
    assert lines(report) == [("10005", (), 1, ("f1",)), ("10006", (), 1, ("f2",))]
    assert report.coding.sessions[0].key.performer == "Practitioner/d9"


def test_relative_references_resolve_against_a_restful_full_url_base() -> None:
    index = ResourceIndex.build([
        SourcedResource({"resourceType": "Patient", "id": "p1"}, "a", "https://a.example/fhir/Patient/p1"),
        SourcedResource({"resourceType": "Procedure", "id": "x"}, "a", "https://a.example/fhir/Procedure/x")])
    referrer = index.entry("Procedure/x")
    for form in ("Patient/p1", "https://a.example/fhir/Patient/p1", "https://a.example/fhir/Patient/p1/_history/4"):
        assert index.resolve({"reference": form}, referrer).key == "Patient/p1"
    missing = index.resolve({"reference": "#nope"}, referrer)
    assert missing.key is None and "#nope" in missing.problem


OTHER = "https://other-hospital.example/fhir"
EHR = "https://ehr.example.org/fhir"


def local(*bases: str) -> Any:
    return dataclasses.replace(TABLES, local_bases=normalize_bases(bases))


def test_an_absolute_reference_to_another_server_is_not_the_local_resource() -> None:
    """Another hospital's Patient/p1 is not our Patient/p1: review, with the reference in the reason."""
    foreign = procedure("f1")
    foreign["subject"] = {"reference": f"{OTHER}/Patient/p1"}
    report = run(foreign, procedure("f2", patient="p2"), {"resourceType": "Patient", "id": "p1"}, coverage())
    assert reviews(report) == {("f1", "unresolved-reference")}
    detail = next(r.detail for r in report.reviews if r.procedure == "Procedure/f1")
    assert detail.startswith(f"subject {OTHER}/Patient/p1:") and "another server" in detail
    assert lines(report) == [("10005", (), 1, ("f2",))]
    assert report.facts[0].patient is None


@pytest.mark.parametrize("element", ["performer", "target", "encounter", "reason"])
def test_every_needed_target_on_another_server_is_reviewed(element: str) -> None:
    proc = procedure("f1")
    if element == "performer":
        proc["performer"] = [{"actor": {"reference": f"{OTHER}/Practitioner/d1"}}]
    elif element == "target":
        proc["extension"][1]["valueReference"] = {"reference": f"{OTHER}/BodyStructure/bs1"}
    elif element == "encounter":
        proc["encounter"] = {"reference": f"{OTHER}/Encounter/e1"}
    else:
        proc["reasonReference"] = [{"reference": f"{OTHER}/Condition/c1"}]
    structure = {"resourceType": "BodyStructure", "id": "bs1", "patient": {"reference": "Patient/p1"}}
    enc = {"resourceType": "Encounter", "id": "e1", "status": "finished", "subject": {"reference": "Patient/p1"}}
    report = run(proc, structure, enc, {"resourceType": "Practitioner", "id": "d1"})
    assert reviews(report) == {("f1", "unresolved-reference")}
    assert f"{OTHER}/" in report.reviews[0].detail and not lines(report)


def test_an_absolute_reference_on_a_local_base_is_local_whatever_its_spelling() -> None:
    proc = procedure("f1")
    proc["subject"] = {"reference": "HTTPS://EHR.Example.org:443/fhir/Patient/p1"}
    proc["performer"] = [{"actor": {"reference": f"{EHR}/Practitioner/d1/_history/2"}}]
    assert reviews(run(proc)) == {("f1", "unresolved-reference")}  # not configured: another server
    report = run(proc, procedure("f2", lesions=("bs2",), when="2026-03-04T10:00:00Z"), tables=local(EHR + "/"))
    assert not reviews(report)
    assert lines(report) == [("10005", (), 1, ("f1",)), ("10006", (), 1, ("f2",))]  # one patient, one session
    other_port = procedure("f1")
    other_port["subject"] = {"reference": "https://ehr.example.org:8443/fhir/Patient/p1"}
    assert reviews(run(other_port, tables=local(EHR))) == {("f1", "unresolved-reference")}


def test_online_the_servers_own_base_is_local() -> None:
    proc = procedure("f1")
    proc["subject"] = {"reference": "http://127.0.0.1:8094/fhir/Patient/p1"}
    items = [SourcedResource(proc, "server")]
    assert reviews(process(items, TABLES)) == {("f1", "unresolved-reference")}
    online = process(items, TABLES, server_base="http://127.0.0.1:8094/fhir/")
    assert not online.reviews and lines(online) == [("10005", (), 1, ("f1",))]


def test_an_exact_full_url_resolves_but_a_relative_reference_in_a_foreign_entry_is_on_that_server() -> None:
    """FHIR Bundle rules: a relative reference inside an entry whose fullUrl is RESTful means ENTRY_BASE/Type/id."""
    proc = procedure("f1")
    patient = {"resourceType": "Patient", "id": "p1"}
    matched = run_entries((proc, f"{OTHER}/Procedure/f1"), (patient, f"{OTHER}/Patient/p1"),
                          ({"resourceType": "Practitioner", "id": "d1"}, f"{OTHER}/Practitioner/d1"),
                          ({"resourceType": "BodyStructure", "id": "bs1", "patient": {"reference": "Patient/p1"}},
                           f"{OTHER}/BodyStructure/bs1"),
                          ({"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/p1"}},
                           f"{OTHER}/Encounter/e1"))
    assert not matched.reviews and lines(matched) == [("10005", (), 1, ("f1",))]
    unmatched = run_entries((proc, f"{OTHER}/Procedure/f1"), (patient, None))  # Patient/p1 is not {OTHER}'s
    assert ("f1", "unresolved-reference") in reviews(unmatched)
    detail = " ".join(r.detail for r in unmatched.reviews)
    assert f"means {OTHER}/Patient/p1" in detail
    configured = run_entries((proc, f"{OTHER}/Procedure/f1"), (patient, None), tables=local(OTHER))
    assert not configured.reviews


@pytest.mark.parametrize("element", ["role-organization", "on-behalf-of", "service-provider", "location", "account"])
def test_a_reference_billing_needs_on_another_server_is_reviewed_not_skipped(element: str) -> None:
    """The billing provider, place of service and account would otherwise fall back as if it were absent."""
    proc = procedure("f1", performer=None)
    proc["performer"] = [{"actor": {"reference": "PractitionerRole/r1"}}]
    role = {"resourceType": "PractitionerRole", "id": "r1", "practitioner": {"reference": "Practitioner/d1"}}
    enc: dict[str, Any] = {"resourceType": "Encounter", "id": "e1", "status": "finished",
                           "subject": {"reference": "Patient/p1"}}
    foreign = {"reference": f"{OTHER}/Organization/g1"}
    if element == "role-organization":
        role["organization"] = foreign
    elif element == "on-behalf-of":
        proc["performer"][0]["onBehalfOf"] = foreign
    elif element == "service-provider":
        enc["serviceProvider"] = foreign
    elif element == "location":
        enc["location"] = [{"location": {"reference": f"{OTHER}/Location/l1"}}]
    else:
        enc["account"] = [{"reference": f"{OTHER}/Account/a1"}]
    report = run(proc, role, enc, {"resourceType": "Organization", "id": "g1"})
    assert reviews(report) == {("f1", "unresolved-reference")}
    assert f"{OTHER}/" in report.reviews[0].detail and not lines(report)
    clean = procedure("f1", performer=None)
    clean["performer"] = [{"actor": {"reference": "PractitionerRole/r1"}}]
    display_only = run(clean, dict(role, organization={"display": "Lakeshore Imaging"}),
                       {"resourceType": "Encounter", "id": "e1", "status": "finished",
                        "subject": {"reference": "Patient/p1"}})  # a display-only Reference links nothing: fine
    assert not display_only.reviews and lines(display_only) == [("10005", (), 1, ("f1",))]


def test_split_by_patient_never_takes_another_servers_patient_for_a_local_one() -> None:
    on_server = procedure("f1", subject={"reference": "http://127.0.0.1:8094/fhir/Patient/p1"})
    elsewhere = procedure("f2", subject={"reference": f"{OTHER}/Patient/p1"})
    plain = procedure("f3", patient="p3")
    bases = normalize_bases(["http://127.0.0.1:8094/fhir"])
    patients, loose = split_by_patient([on_server, elsewhere, plain], bases)
    assert patients == {"Patient/p1", "Patient/p3"} and [p["id"] for p in loose] == ["f2"]


# ---------------------------------------------------------------------------------------------- versions
def test_highest_version_then_latest_update_wins_in_any_order() -> None:
    v1 = procedure("f1", status="preparation", meta={"versionId": "1", "lastUpdated": "2026-03-05T00:00:00Z"})
    v2 = procedure("f1", meta={"versionId": "2", "lastUpdated": "2026-03-04T00:00:00Z"})
    for order in ((v1, v2), (v2, v1)):
        assert lines(run(*order)) == [("10005", (), 1, ("f1",))]
    early = procedure("f1", meta={"lastUpdated": "2026-03-04T10:00:00Z"})
    late = procedure("f1", status="not-done", meta={"lastUpdated": "2026-03-04T12:00:00+01:00"})  # 11:00Z
    for order in ((early, late), (late, early)):
        assert [f.ref for f in run(*order).coding.no_charge] == ["Procedure/f1"]


def test_different_copies_with_nothing_to_order_them_are_reviewed() -> None:
    report = run(procedure("f1"), procedure("f1", lesions=("bs1", "bs2")))
    assert reviews(report) == {("f1", "version-conflict")}


def test_a_deleted_newest_version_bills_nothing() -> None:
    tombstone = {"resourceType": "Procedure", "id": "f1", "meta": {"versionId": "2"}}
    report = process([SourcedResource(procedure("f1", meta={"versionId": "1"}), "a"),
                      SourcedResource(tombstone, "b", deleted=True)], TABLES)
    assert [(f.ref, f.status) for f in report.coding.no_charge] == [("Procedure/f1", "deleted")]
    assert not lines(report)


# ------------------------------------------------------------------------------------- rendering provider
def test_primary_performer_function_decides_not_list_order() -> None:
    proc = procedure("f1", performer=None)
    proc["performer"] = [{"function": function("SPRF"), "actor": {"reference": "Practitioner/resident"}},
                         {"actor": {"reference": "Device/probe"}},
                         {"function": function("PPRF"), "actor": {"reference": "Practitioner/attending"},
                          "onBehalfOf": {"reference": "Organization/hospital"}}]
    report = run(proc)
    facts = report.facts[0]
    assert (facts.rendering, facts.on_behalf_of) == ("Practitioner/attending", "Organization/hospital")
    assert "primary performer" in explain(report, TABLES)


@pytest.mark.parametrize(("actors", "reason"), [
    (["Device/x", "Organization/o"], "missing-performer"), (["Patient/p1"], "missing-performer"),
    (["RelatedPerson/r"], "missing-performer"), (["Practitioner/a", "Practitioner/b"], "ambiguous-performer"),
    (["PractitionerRole/not-here"], "unresolved-reference")])
def test_who_cannot_bill_is_reviewed(actors: list[str], reason: str) -> None:
    proc = procedure("f1", performer=None)
    proc["performer"] = [{"actor": {"reference": a}} for a in actors]
    report = run(proc, procedure("f2", patient="p2"))
    assert ("f1", reason) in reviews(report)
    assert lines(report) == [("10005", (), 1, ("f2",))]


def test_practitioner_role_is_its_practitioner_and_is_kept() -> None:
    role = {"resourceType": "PractitionerRole", "id": "r1", "practitioner": {"reference": "Practitioner/d1"},
            "organization": {"reference": "Organization/clinic"}}
    via_role = procedure("f1", performer=None)
    via_role["performer"] = [{"actor": {"reference": "PractitionerRole/r1"}}]
    report = run(via_role, procedure("f2", lesions=("b2",), when="2026-03-04T10:00:00Z"), role)
    assert lines(report) == [("10005", (), 1, ("f1",)), ("10006", (), 1, ("f2",))]
    assert (report.facts[0].rendering, report.facts[0].rendering_role) == ("Practitioner/d1", "PractitionerRole/r1")


def test_encounter_primary_performer_when_the_procedure_names_none() -> None:
    enc = {"resourceType": "Encounter", "id": "e1", "status": "finished", "subject": {"reference": "Patient/p1"},
           "participant": [{"type": [function("PPRF")], "individual": {"reference": "Practitioner/d7"}}]}
    report = run(procedure("f1", performer=None), enc)
    assert report.coding.sessions[0].key.performer == "Practitioner/d7"
    without = run(procedure("f1", performer=None))
    assert reviews(without) == {("f1", "missing-performer")}


# ------------------------------------------------------------------------------------- dates and sessions
@pytest.mark.parametrize(("written", "zone", "day"), [
    ("2026-03-04T23:30:00-05:00", "UTC", "2026-03-04"), ("2026-03-04T23:30:00+00:00", "America/New_York",
                                                         "2026-03-04"),
    ("2026-03-05T02:30:00Z", "America/New_York", "2026-03-04"), ("2026-03-05T02:30:00Z", "UTC", "2026-03-05"),
    ("2026-03-04", "Asia/Tokyo", "2026-03-04")])
def test_date_of_service_is_the_local_date_as_written(written: str, zone: str, day: str) -> None:
    tables = dataclasses.replace(TABLES, settings=dataclasses.replace(TABLES.settings, time_zone=zone))
    report = run(procedure("f1", when=written), tables=tables)
    assert report.coding.sessions[0].key.date == day
    assert "(rule date-of-service)" in explain(report, tables)


def test_a_procedure_without_encounter_joins_the_one_matching_session() -> None:
    report = run(procedure("f1"), procedure("f2", lesions=("b2",), encounter=None, when="2026-03-04T11:00:00Z"))
    assert lines(report) == [("10005", (), 1, ("f1",)), ("10006", (), 1, ("f2",))]
    assert report.facts[1].session and report.facts[1].session.encounter == "Encounter/e1"
    assert "(rule session) no encounter: joins" in explain(report, TABLES)


# ------------------------------------------------------------------------------------------------- units
def test_duplicate_deliveries_are_billed_once_and_reported() -> None:
    ident = [{"system": "urn:acc", "value": "A1"}]
    report = run(procedure("f1", identifier=ident), procedure("f2", identifier=ident))
    assert lines(report) == [("10005", (), 1, ("f1",))]
    assert [f.merged_into for f in report.coding.merged] == ["Procedure/f1"]
    assert any(d.startswith("duplicate: Procedure/f2: billed under Procedure/f1") for d in diagnostics(report))
    assert "(rule duplicate-delivery)" in explain(report, TABLES, "f2")
    disagree = run(procedure("f1", identifier=ident), procedure("f2", "ct", identifier=ident))
    assert reviews(disagree) >= {("f1", "duplicate-conflict"), ("f2", "duplicate-conflict")}


def test_children_add_no_lesion_and_guidance_children_are_evidence() -> None:
    child = procedure("c1", None, ("bs9",), partOf=[{"reference": "Procedure/f1"}], performer=None)
    guide = procedure("g1", None, (), code=("http://www.ama-assn.org/go/cpt", "77012"),
                      partOf=[{"reference": "Procedure/f1"}])
    report = run(procedure("f1", None), child, guide)
    assert lines(report) == [("10009", (), 1, ("f1",))]
    assert [f.ref for f in report.coding.merged] == ["Procedure/c1"]
    assert [f.ref for f in report.coding.skipped] == ["Procedure/g1"]
    orphan = run(procedure("c1", partOf=[{"reference": "Procedure/missing"}]))
    assert reviews(orphan) == {("c1", "unresolved-reference")}


def test_sibling_guidance_must_be_tied_to_one_fna() -> None:
    guide = procedure("g1", None, (), code=("http://www.ama-assn.org/go/cpt", "76942"))
    one = run(procedure("f1", None), guide)
    assert lines(one) == [("10005", (), 1, ("f1",))]
    two = run(procedure("f1", None), procedure("f2", None, ("b2",)), guide)
    assert reviews(two) >= {("f1", "modality-missing"), ("f2", "modality-missing")}


def test_bilateral_site_is_reviewed() -> None:
    site = {"coding": [{"system": SCT, "code": "76752008"}, {"system": SCT, "code": "51440002"}]}
    assert reviews(run(procedure("f1", lesions=(), bodySite=[site]))) == {("f1", "bilateral-site")}


# ------------------------------------------------------------------------------------------------ safety
def test_wrong_patient_structures_and_unknown_modifier_extensions_are_reviewed() -> None:
    other = {"resourceType": "BodyStructure", "id": "bs1", "patient": {"reference": "Patient/p2"}}
    assert reviews(run(procedure("f1"), other)) == {("f1", "other-patient")}
    flagged = procedure("f1", modifierExtension=[{"url": "urn:x:unknown", "valueBoolean": True}])
    report = run(flagged, procedure("f2", patient="p2"))
    assert ("f1", "unknown-modifier-extension") in reviews(report)
    assert "urn:x:unknown" in report.reviews[0].detail and lines(report) == [("10005", (), 1, ("f2",))]
    known = dataclasses.replace(TABLES, known_modifier_extensions=frozenset({"urn:x:unknown"}))
    assert not reviews(run(flagged, tables=known))


MODIFIER = {"url": "urn:x:unknown-modifier", "valueBoolean": True}
PPRF = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


def _context_with_modifier(kind: str) -> tuple[list[dict[str, Any]], str]:
    """p1's FNA and every resource its coding and billing read, one of them (`kind`) with an unknown
    modifierExtension; the key of that resource."""
    proc = procedure("f1", performer=None, reasonReference=[{"reference": "Condition/k1"}],
                     basedOn=[{"reference": "ServiceRequest/r1"}])
    proc["performer"] = [{"actor": {"reference": "PractitionerRole/role1"},
                          "onBehalfOf": {"reference": "Organization/g1"}}]
    resources: dict[str, dict[str, Any]] = {
        "Patient": {"resourceType": "Patient", "id": "p1"},
        "Encounter": {"resourceType": "Encounter", "id": "e1", "status": "finished",
                      "subject": {"reference": "Patient/p1"}, "location": [{"location": {"reference": "Location/l1"}}],
                      "account": [{"reference": "Account/a1"}]},
        "Condition": {"resourceType": "Condition", "id": "k1", "subject": {"reference": "Patient/p1"},
                      "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "R59.0"}]}},
        "Coverage": coverage(),
        "Account": {"resourceType": "Account", "id": "a1", "status": "active",
                    "subject": [{"reference": "Patient/p1"}]},
        "PractitionerRole": {"resourceType": "PractitionerRole", "id": "role1",
                             "practitioner": {"reference": "Practitioner/d1"},
                             "organization": {"reference": "Organization/g2"}},
        "Practitioner": {"resourceType": "Practitioner", "id": "d1"},
        "Organization": {"resourceType": "Organization", "id": "o1", "name": "Payer"},
        "Organization/onBehalfOf": {"resourceType": "Organization", "id": "g1", "name": "Group"},
        "Organization/role": {"resourceType": "Organization", "id": "g2", "name": "Clinic"},
        "Location": {"resourceType": "Location", "id": "l1", "name": "Suite 3"},
        "ServiceRequest": {"resourceType": "ServiceRequest", "id": "r1", "status": "completed", "intent": "order",
                           "subject": {"reference": "Patient/p1"}, "requester": {"reference": "Practitioner/d2"}},
        "Practitioner/requester": {"resourceType": "Practitioner", "id": "d2"},
        "BodyStructure": {"resourceType": "BodyStructure", "id": "bs1", "patient": {"reference": "Patient/p1"}},
    }
    target = resources[kind]
    target["modifierExtension"] = [MODIFIER]
    return [proc, *resources.values()], f"{target['resourceType']}/{target['id']}"


CONTEXT_KINDS = ["Patient", "Encounter", "Condition", "Coverage", "Account", "PractitionerRole", "Practitioner",
                 "Organization", "Organization/onBehalfOf", "Organization/role", "Location", "ServiceRequest",
                 "Practitioner/requester", "BodyStructure"]


@pytest.mark.parametrize("kind", CONTEXT_KINDS)
def test_an_unknown_modifier_extension_on_any_resource_the_decision_reads_is_reviewed(kind: str) -> None:
    resources, key = _context_with_modifier(kind)
    report = run(*resources, procedure("f2", patient="p2", lesions=("bs2",), encounter=None, performer="d9"))
    assert reviews(report) == {("f1", "unknown-modifier-extension")}
    assert f"{key}.modifierExtension urn:x:unknown-modifier" in report.reviews[0].detail
    assert lines(report) == [("10005", (), 1, ("f2",))]  # the other patient is coded
    known = dataclasses.replace(TABLES, known_modifier_extensions=frozenset({MODIFIER["url"]}))
    assert not [r for r in run(*resources, tables=known).reviews if r.reason == "unknown-modifier-extension"]


def test_every_context_resource_is_read_without_a_modifier_extension_too() -> None:
    """Guard: the context above is complete and codes cleanly when nothing carries a modifierExtension."""
    resources, _ = _context_with_modifier("Patient")
    del resources[1]["modifierExtension"]
    report = run(*resources)
    assert lines(report) == [("10005", (), 1, ("f1",))] and not report.reviews


def test_an_unknown_modifier_extension_on_a_charge_item_definition_holds_the_sessions_it_could_price() -> None:
    definition = {"resourceType": "ChargeItemDefinition", "id": "cid1", "url": "urn:x:cid", "status": "active",
                  "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "10009"}]},
                  "modifierExtension": [MODIFIER],
                  "propertyGroup": [{"priceComponent": [{"type": "base", "amount": {"value": 1, "currency": "USD"}}]}]}
    report = run(procedure("f1", "ct"), procedure("f2", "us", patient="p2", lesions=("bs2",), encounter=None),
                 definition)
    assert reviews(report) == {("f1", "unknown-modifier-extension")}
    assert "ChargeItemDefinition urn:x:cid" in report.reviews[0].detail
    assert [s.session.lines[0].code for s in report.built.sessions] == ["10005"]  # nothing of f1's is written
    known = dataclasses.replace(TABLES, known_modifier_extensions=frozenset({MODIFIER["url"]}))
    assert not run(procedure("f1", "ct"), definition, tables=known).reviews
    out_of_scope = dict(definition, effectivePeriod={"end": "2025-12-31"})  # not for this date of service
    assert not run(procedure("f1", "ct"), out_of_scope).reviews


def test_resources_are_scanned_for_modifier_extensions_once_and_never_when_their_file_has_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = index_module.modifier_extensions

    def counting(node: Any, path: str, known: frozenset[str]) -> list[str]:
        if "." not in path and "[" not in path:
            calls.append(path)
        return real(node, path, known)

    monkeypatch.setattr(index_module, "modifier_extensions", counting)
    patient = {"resourceType": "Patient", "id": "p1"}
    procs = [procedure(f"f{i}", lesions=(f"b{i}",), when=f"2026-03-04T0{i}:00:00Z") for i in range(1, 4)]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in [*procs, patient]]}
    path = tmp_path / "clean.json"
    path.write_text(json.dumps(bundle))
    assert lines(process_paths([path], TABLES))[0][2] == 1 and calls == []  # modifier-free file: the fast path
    report = process([SourcedResource(r, "server") for r in [*procs, patient]], TABLES)  # online: no text to look at
    assert len(lines(report)) == 2 and calls.count("Patient/p1") == 1  # three Procedures read it; scanned once


def test_another_patients_coverage_is_never_used() -> None:
    """Merely being in the input is no link: p2's Coverage is not p1's, and nothing is wrong with it."""
    report = run(procedure("f1"), coverage(patient="p2"))
    assert [s.claim for s in report.built.sessions] == [None]
    assert not report.reviews
    assert [(w.code, w.subject) for w in report.built.warnings] == [("no-coverage", "Patient/p1")]


def test_a_multi_patient_input_bills_each_patient_with_their_own_coverage() -> None:
    report = run(procedure("f1"), procedure("f2", patient="p2", lesions=("bs2",)), coverage(),
                 coverage(patient="p2", cid="c2"), {"resourceType": "Organization", "id": "o1", "name": "Payer"},
                 {"resourceType": "BodyStructure", "id": "bs2", "patient": {"reference": "Patient/p2"}})
    assert not report.reviews
    claims = [s.claim for s in report.built.sessions]
    assert [(c["patient"]["reference"], c["insurance"][0]["coverage"]["reference"]) for c in claims if c] == [
        ("Patient/p1", "Coverage/c1"), ("Patient/p2", "Coverage/c2")]


def _linked_case(case: str, owner: str) -> list[dict[str, Any]]:
    """p1's FNA with one resource linked from its data (`case`), that resource belonging to `owner`."""
    proc = procedure("f1")
    enc: dict[str, Any] = {"resourceType": "Encounter", "id": "e1", "status": "finished",
                           "subject": {"reference": "Patient/p1"}}
    extra: list[dict[str, Any]] = []
    theirs = {"reference": f"Patient/{owner}"}
    if case == "encounter-diagnosis":
        enc["diagnosis"] = [{"condition": {"reference": "Condition/k1"}}]
        extra.append({"resourceType": "Condition", "id": "k1", "subject": theirs})
    elif case == "encounter-account":
        enc["account"] = [{"reference": "Account/a1"}]
        extra.append({"resourceType": "Account", "id": "a1", "status": "active", "subject": [theirs]})
    elif case == "account-coverage":
        enc["account"] = [{"reference": "Account/a1"}]
        extra += [{"resourceType": "Account", "id": "a1", "status": "active", "subject": [{"reference": "Patient/p1"}],
                   "coverage": [{"coverage": {"reference": "Coverage/c9"}}]}, coverage(owner, "c9")]
    elif case == "patient-account-coverage":  # the patient's own Account (no encounter names it)
        extra += [{"resourceType": "Account", "id": "a1", "status": "active", "subject": [{"reference": "Patient/p1"}],
                   "coverage": [{"coverage": {"reference": "Coverage/c9"}}]}, coverage(owner, "c9")]
    elif case == "service-request":
        proc["basedOn"] = [{"reference": "ServiceRequest/r1"}]
        extra.append({"resourceType": "ServiceRequest", "id": "r1", "status": "completed", "intent": "order",
                      "subject": theirs})
    elif case == "service-request-insurance":
        proc["basedOn"] = [{"reference": "ServiceRequest/r1"}]
        extra += [{"resourceType": "ServiceRequest", "id": "r1", "status": "completed", "intent": "order",
                   "subject": {"reference": "Patient/p1"}, "insurance": [{"reference": "Coverage/c9"}]},
                  coverage(owner, "c9")]
    elif case == "part-of":
        proc = procedure("c1", partOf=[{"reference": "Procedure/f9"}])
        extra.append(procedure("f9", patient=owner, lesions=("bs9",)))
    return [proc, enc, *extra]


LINKS = ["encounter-diagnosis", "encounter-account", "account-coverage", "patient-account-coverage",
         "service-request", "service-request-insurance", "part-of"]


@pytest.mark.parametrize("case", LINKS)
def test_a_resource_linked_from_the_patients_data_that_is_another_patients_is_reviewed(case: str) -> None:
    report = run(*_linked_case(case, "p2"), procedure("g1", patient="p3", lesions=("bs3",), encounter=None))
    reviewed = "c1" if case == "part-of" else "f1"
    assert ("Procedure/" + reviewed, "other-patient") in {(r.procedure, r.reason) for r in report.reviews}
    detail = next(r.detail for r in report.reviews if r.reason == "other-patient")
    assert "Patient/p2" in detail and "wrong-patient data is never billed" in detail
    assert lines(report)[-1] == ("10005", (), 1, ("g1",))  # the other patient's session is coded
    assert all(reviewed not in ln[3] for ln in lines(report))


@pytest.mark.parametrize("case", LINKS)
def test_the_same_links_to_the_patients_own_resources_are_fine(case: str) -> None:
    report = run(*_linked_case(case, "p1"))
    assert not {r.reason for r in report.reviews} & {"other-patient", "unresolved-reference"}


def test_a_linked_resource_whose_patient_cannot_be_told_is_unresolved() -> None:
    condition = {"resourceType": "Condition", "id": "k1", "subject": {"reference": "urn:uuid:nowhere"}}
    report = run(procedure("f1", reasonReference=[{"reference": "Condition/k1"}]), condition)
    assert reviews(report) == {("f1", "unresolved-reference")}
    assert report.reviews[0].detail.startswith("reasonReference[0] Condition/k1.subject urn:uuid:nowhere:")


def test_every_review_names_its_rule_in_explain() -> None:
    report = run(procedure("f1", status="stopped"), procedure("f2", None, patient="p2"))
    text = explain(report, TABLES)
    assert "status-needs-review (rule status)" in text and "modality-missing (rule modality)" in text
