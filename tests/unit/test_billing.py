"""Billing rules one at a time (parties, place of service, diagnoses, prices, accounts, time of writing), on
resources built in the test; the scenario fixtures 80-88 cover the same branches end to end."""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapter.billing.diagnoses import CLINICAL, VERIFICATION, not_a_diagnosis
from adapter.billing.pricing import NoPrice, Price, PriceBook
from adapter.config import load_tables
from adapter.errors import ConfigError
from adapter.sinks.reconcile import plan, same_content
from adapter.tables.billing import PricingTables, npi_is_valid

from .test_engine_rules import CPT, ICD10CM, SCT, TABLES, coverage, procedure, reviews, run

ROOT = Path(__file__).resolve().parents[2]
MODIFIER_59 = f"%context.extension('{TABLES.settings.modifier_extension}').value.coding.code contains '59'"


def with_billing(**changes: Any) -> Any:
    return dataclasses.replace(TABLES, billing=dataclasses.replace(TABLES.billing, **changes))


def claim_of(report: Any) -> dict[str, Any] | None:
    return report.built.sessions[0].claim


def definition(did: str, code: str, base: float, *groups: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"resourceType": "ChargeItemDefinition", "id": did, "url": f"http://fees.test/{did}", "status": "active",
            "code": {"coding": [{"system": CPT, "code": code}]},
            "propertyGroup": [{"priceComponent": [{"type": "base", "amount": {"value": base, "currency": "USD"}}]},
                              *groups], **extra}


def price(book: PriceBook, code: str = "10005", modifiers: tuple[str, ...] = (), day: date = date(2026, 3, 4),
          item: dict[str, Any] | None = None, venue: str | None = None) -> Price | NoPrice:
    return book.price(code, modifiers, day, item or {"resourceType": "ChargeItem"}, venue)


# ------------------------------------------------------------------------------------------- parties
def test_a_complete_claim_has_payer_billing_provider_care_team_place_and_prices() -> None:
    report = run(procedure("f1", "us", ("a", "b")), coverage())
    claim = claim_of(report)
    assert claim is not None and not report.reviews
    assert claim["insurer"] == {"reference": "Organization/o1"}
    assert claim["provider"] == {"reference": "#billing-provider", "type": "Organization",
                                 "display": "Northriver Health Physician Services",
                                 "identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}}
    [org] = claim["contained"]  # the configured organization, with what the 837P's loop 2010AA needs
    assert org["id"] == "billing-provider" and org["name"] == "Northriver Health Physician Services"
    assert [i["value"] for i in org["identifier"]] == ["1234567893", "361234567"]
    assert org["type"][0]["coding"][0]["code"] == "193200000X" and org["address"][0]["city"] == "Springfield"
    assert claim["careTeam"][0]["provider"] == {"reference": "Practitioner/d1"}
    assert claim["careTeam"][0]["role"]["coding"][0]["code"] == "primary"
    assert [i["careTeamSequence"] for i in claim["item"]] == [[1], [1]]
    assert {i["locationCodeableConcept"]["coding"][0]["code"] for i in claim["item"]} == {"22"}
    assert [i["net"]["value"] for i in claim["item"]] == [412, 206]
    assert claim["total"] == {"value": 618, "currency": "USD"}


def test_on_behalf_of_organization_is_the_billing_provider() -> None:
    proc = procedure("f1", "us", ("a",))
    proc["performer"][0]["onBehalfOf"] = {"reference": "Organization/grp"}
    org = {"resourceType": "Organization", "id": "grp", "name": "Group",
           "identifier": [{"system": "urn:oid:2.16.840.1.113883.4.4", "value": "123456789"}]}
    claim = claim_of(run(proc, coverage(), org))
    assert claim is not None
    assert claim["provider"] == {"reference": "Organization/grp", "display": "Group",
                                 "identifier": {"system": "urn:oid:2.16.840.1.113883.4.4", "value": "123456789"}}
    assert "contained" not in claim  # the input's Organization is the billing provider resource itself


def test_billing_provider_by_department_then_review_without_default() -> None:
    providers = TABLES.billing.providers
    by_dept = with_billing(providers=dataclasses.replace(
        providers, default=None, by_department={"Organization/radiology": "northriver-interventional"}))
    enc = {"resourceType": "Encounter", "id": "e1", "status": "finished", "serviceProvider": {"reference":
           "Organization/radiology"}, "class": {"code": "AMB"}}
    claim = claim_of(run(procedure("f1", "us", ("a",)), coverage(), enc, tables=by_dept))
    assert claim is not None and claim["provider"]["identifier"]["value"] == "1820000085"
    report = run(procedure("f1", "us", ("a",)), coverage(), tables=by_dept)
    assert reviews(report) == {("f1", "missing-billing-provider")}
    assert report.built.sessions[0].charge_items and claim_of(report) is None
    assert report.exit_code == 1


def test_place_of_service_without_a_rule_or_default_is_reviewed() -> None:
    pos = dataclasses.replace(TABLES.billing.place_of_service, default=None)
    report = run(procedure("f1", "us", ("a",)), coverage(), tables=with_billing(place_of_service=pos))
    assert reviews(report) == {("f1", "missing-place-of-service")}
    inpatient = {"resourceType": "Encounter", "id": "e1", "status": "finished",
                 "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"}}
    tables = with_billing(place_of_service=pos)
    claim = claim_of(run(procedure("f1", "us", ("a",)), coverage(), inpatient, tables=tables))
    assert claim is not None and claim["item"][0]["locationCodeableConcept"]["coding"][0]["code"] == "21"


# ----------------------------------------------------------------------------------------- diagnoses
def test_more_than_twelve_diagnoses_is_review_and_pointers_stop_at_four() -> None:
    reasons = [{"coding": [{"system": ICD10CM, "code": f"R{10 + i}.0"}]} for i in range(13)]
    report = run(procedure("f1", "us", ("a",), reasonCode=reasons), coverage())
    assert reviews(report) == {("f1", "missing-diagnosis")}
    assert "13 distinct ICD-10-CM diagnoses" in report.reviews[0].detail
    four = run(procedure("f1", "us", ("a",), reasonCode=reasons[:6]), coverage())
    claim = claim_of(four)
    assert claim is not None and len(claim["diagnosis"]) == 6 and claim["item"][0]["diagnosisSequence"] == [1, 2, 3, 4]


def test_a_text_only_reason_next_to_an_icd_code_still_holds_the_claim() -> None:
    reasons = [{"coding": [{"system": ICD10CM, "code": "E04.1"}]}, {"text": "suspicious"}]
    report = run(procedure("f1", "us", ("a",), reasonCode=reasons), coverage())
    assert reviews(report) == {("f1", "missing-diagnosis")}
    assert "text only: 'suspicious'" in report.reviews[0].detail


def test_each_line_points_first_at_its_own_procedures_reason() -> None:
    p1 = procedure("f1", "us", ("a",), reasonCode=[{"coding": [{"system": ICD10CM, "code": "E04.1"}]}])
    p2 = procedure("f2", "fluoro", ("b",), when="2026-03-04T10:00:00Z",
                   reasonCode=[{"coding": [{"system": ICD10CM, "code": "R91.1"}]}])
    claim = claim_of(run(p1, p2, coverage()))
    assert claim is not None
    assert [d["diagnosisCodeableConcept"]["coding"][0]["code"] for d in claim["diagnosis"]] == ["E04.1", "R91.1"]
    assert [i["diagnosisSequence"] for i in claim["item"]] == [[1], [2]]


def condition(cid: str = "c9", code: str = "C50.912", verification: str | None = "confirmed",
              clinical: str | None = "active", **extra: Any) -> dict[str, Any]:
    cond: dict[str, Any] = {"resourceType": "Condition", "id": cid, "subject": {"reference": "Patient/p1"},
                            "code": {"coding": [{"system": ICD10CM, "code": code}]}, **extra}
    if verification:
        cond["verificationStatus"] = {"coding": [{"system": VERIFICATION, "code": verification}]}
    if clinical:
        cond["clinicalStatus"] = {"coding": [{"system": CLINICAL, "code": clinical}]}
    return cond


def diagnoses_of(*conditions: dict[str, Any], when: str = "2026-03-04T09:00:00Z",
                 reason_code: str | None = "R59.0") -> tuple[list[str] | None, list[str], Any]:
    """(the Claim's diagnosis codes or None, every ChargeItem.reason code, the run) for a Procedure whose
    reasons are `reason_code` (if any) and `conditions` (reasonReference)."""
    extra: dict[str, Any] = {"reasonReference": [{"reference": f"Condition/{c['id']}"} for c in conditions]}
    if reason_code is None:
        extra["reasonCode"] = None
    else:
        extra["reasonCode"] = [{"coding": [{"system": ICD10CM, "code": reason_code}]}]
    proc = procedure("f1", "us", ("a",), when=when, **extra)
    if reason_code is None:
        del proc["reasonCode"]
    report = run(proc, coverage(), *conditions)
    claim = claim_of(report)
    codes = None if claim is None else [d["diagnosisCodeableConcept"]["coding"][0]["code"] for d in claim["diagnosis"]]
    reasons = [c["coding"][0]["code"] for s in report.built.sessions for ci in s.charge_items
               for c in ci.get("reason", [])]
    return codes, reasons, report


@pytest.mark.parametrize(("verification", "clinical", "billed"), [
    ("confirmed", "active", True), (None, None, True), (None, "recurrence", True), ("confirmed", "relapse", True),
    ("entered-in-error", None, False), ("refuted", "inactive", False), ("refuted", None, False),
    ("provisional", "active", False), ("differential", "active", False), ("unconfirmed", "active", False)])
def test_a_condition_is_a_diagnosis_only_when_it_is_established(verification: str | None, clinical: str | None,
                                                                billed: bool) -> None:
    codes, reasons, _ = diagnoses_of(condition(verification=verification, clinical=clinical))
    assert codes == (["R59.0", "C50.912"] if billed else ["R59.0"])
    assert reasons == (["R59.0", "C50.912"] if billed else ["R59.0"])  # ChargeItem.reason follows the same rule


@pytest.mark.parametrize(("abatement", "billed"), [
    ({"abatementDateTime": "2026-03-20"}, True),  # resolved after the procedure: it was its reason
    ({"abatementDateTime": "2026-03-04T08:00:00Z"}, True),  # the same day (the FNA may be what resolved it)
    ({"abatementDateTime": "2026-03"}, True),  # month precision: March is not over before 4 March
    ({"abatementDateTime": "2026-03-03"}, False),  # over the day before
    ({"abatementDateTime": "2026-02"}, False),
    ({"abatementPeriod": {"start": "2026-02-20", "end": "2026-03-10"}}, True),  # still abating: the end counts
    ({"abatementPeriod": {"start": "2026-02-01", "end": "2026-02-20"}}, False),
    ({"abatementPeriod": {"start": "2026-03-01"}}, False),  # began to abate before, end unknown
    ({"abatementString": "after surgery"}, False),  # no date: unknown, a coder decides
    ({}, False)])
@pytest.mark.parametrize("clinical", ["resolved", "inactive", "remission"])
def test_a_condition_that_ended_is_a_diagnosis_only_for_a_procedure_done_while_it_was_present(
        abatement: dict[str, Any], billed: bool, clinical: str) -> None:
    codes, _, report = diagnoses_of(condition(clinical=clinical, **abatement), reason_code=None)
    assert codes == (["C50.912"] if billed else None)
    if not billed:
        assert reviews(report) == {("f1", "missing-diagnosis")}
        assert f"clinicalStatus {clinical}" in report.reviews[0].detail
        assert "may not be coded" in report.reviews[0].detail


def test_an_invalid_condition_is_named_in_the_review_and_in_explain_never_in_hl7v2() -> None:
    from adapter.hl7v2.messages import session_charges

    codes, reasons, report = diagnoses_of(condition(verification="entered-in-error", clinical=None),
                                          reason_code=None)
    assert codes is None and reasons == []
    assert reviews(report) == {("f1", "missing-diagnosis")}
    assert "Condition/c9: verificationStatus entered-in-error: never a diagnosis" in report.reviews[0].detail
    assert any("not a diagnosis" in n and "entered-in-error" in n for n in report.built.sessions[0].notes)
    sessions, hl7_reviews = session_charges(report, TABLES)  # FT1-19 needs a diagnosis: nothing is sent
    [missing] = [r for r in hl7_reviews if r.reason == "hl7v2-missing-diagnosis"]
    assert sessions == [] and "entered-in-error" in missing.detail


def test_not_a_diagnosis_reads_only_conditions_in_their_code_systems() -> None:
    assert not_a_diagnosis({"resourceType": "Observation", "status": "entered-in-error"}, "2026-03-04") is None
    assert not_a_diagnosis(None, "2026-03-04") is None
    other_system = {"resourceType": "Condition", "verificationStatus": {"coding": [
        {"system": "http://example.org/local", "code": "refuted"}]}}
    assert not_a_diagnosis(other_system, "2026-03-04") is None


@pytest.mark.parametrize(("period", "in_force"), [
    (None, True), ({}, True), ({"start": "2026-01-01"}, True), ({"end": "2026-12-31"}, True),
    ({"start": "2026-03-04", "end": "2026-03-04"}, True), ({"start": "2026-03-04T23:59:00-05:00"}, True),
    ({"end": "2026-03-04T00:00:00Z"}, True), ({"start": "2026", "end": "2026"}, True), ({"end": "2026-03"}, True),
    ({"end": "2026-03-03"}, False), ({"end": "2025-12-31"}, False), ({"end": "2026-02"}, False),
    ({"start": "2026-03-05"}, False), ({"start": "2027"}, False), ({"start": "2026-04"}, False)])
def test_a_coverage_is_the_claims_insurance_only_within_its_period(period: dict[str, Any] | None,
                                                                   in_force: bool) -> None:
    cov = coverage() | ({"period": period} if period is not None else {})
    report = run(procedure("f1", "us", ("a",)), cov)
    claim = claim_of(report)
    if in_force:
        assert claim is not None and claim["insurance"][0]["coverage"] == {"reference": "Coverage/c1"}
    else:  # no other Coverage: the usual rule, ChargeItems and the no-coverage warning naming why
        assert claim is None and not report.reviews
        [warning] = report.built.warnings
        assert warning.code == "no-coverage" and "Coverage/c1" in warning.detail and "in force on 2026-03-04" in \
            warning.detail


def test_an_expired_coverage_gives_way_to_the_one_in_force_and_is_left_off_the_claim() -> None:
    expired = coverage(cid="c-old", order=1) | {"period": {"end": "2025-12-31"},
                                                "payor": [{"reference": "Organization/o-old"}]}
    current = coverage(cid="c-new", order=2) | {"period": {"start": "2026-01-01"}}
    claim = claim_of(run(procedure("f1", "us", ("a",)), expired, current))
    assert claim is not None and claim["insurer"] == {"reference": "Organization/o1"}
    assert claim["insurance"] == [{"sequence": 1, "focal": True, "coverage": {"reference": "Coverage/c-new"}}]
    self_pay = coverage(cid="c-self") | {"payor": [{"reference": "Patient/p1"}]}
    still = run(procedure("f1", "us", ("a",)), expired, self_pay)  # in force but self-pay: the payer rule
    assert reviews(still) == {("f1", "missing-payer")}


# -------------------------------------------------------------------------------------------- prices
def test_missing_price_warns_instead_of_review_when_configured() -> None:
    late = procedure("f1", "us", ("a",), when="2027-02-01T09:00:00Z")
    held = run(late, coverage())
    assert reviews(held) == {("f1", "missing-price")} and claim_of(held) is None
    assert "priceOverride" not in held.built.sessions[0].charge_items[0]
    warn = dataclasses.replace(TABLES, settings=dataclasses.replace(TABLES.settings, when_price_missing="warn"))
    report = run(late, coverage(), tables=warn)
    claim = claim_of(report)
    assert report.exit_code == 0 and [w.code for w in report.built.warnings] == ["missing-price"]
    assert claim is not None and "total" not in claim and "unitPrice" not in claim["item"][0]


def test_definition_components_surcharge_discount_and_tax() -> None:
    groups = [{"priceComponent": [{"type": "surcharge", "factor": 0.1}, {"type": "discount", "amount":
                                                                         {"value": 20, "currency": "USD"}},
                                  {"type": "tax", "factor": 0.05}, {"type": "informational",
                                                                   "amount": {"value": 1, "currency": "USD"}}]}]
    book = PriceBook([("t", definition("d1", "10005", 200, *groups))], PricingTables(), CPT)
    found = price(book)
    assert isinstance(found, Price)
    assert found.unit == Decimal("210.00")  # (200 + 20 - 20) * 1.05
    assert found.definition == "http://fees.test/d1"


def test_definition_matching_modifiers_venue_period_specificity_and_ties() -> None:
    reduced = {"applicability": [{"language": "text/fhirpath", "expression": MODIFIER_59}],
               "priceComponent": [{"type": "discount", "factor": 0.5}]}
    plain = definition("d1", "10007", 600, reduced)
    item59 = {"resourceType": "ChargeItem", "extension": [{"url": TABLES.settings.modifier_extension,
              "valueCodeableConcept": {"coding": [{"system": CPT, "code": "59"}]}}]}
    book = PriceBook([("t", plain)], PricingTables(), CPT)
    assert price(book, "10007").unit == Decimal("600.00")  # type: ignore[union-attr]
    assert price(book, "10007", ("59",), item=item59).unit == Decimal("300.00")  # type: ignore[union-attr]

    venue = {"code": {"code": "venue"}, "valueReference": {"reference": "Organization/grp"}}
    theirs = definition("d2", "10005", 999, useContext=[venue], effectivePeriod={"start": "2026-01-01"})
    book = PriceBook([("t", theirs)], TABLES.billing.pricing, CPT)
    assert price(book, venue="Organization/grp").unit == Decimal("999.00")  # type: ignore[union-attr]
    assert "chargemaster" in price(book, venue="Organization/other").source  # type: ignore[union-attr]
    assert isinstance(price(book, day=date(2025, 12, 31), venue="Organization/grp"), NoPrice)  # not yet effective

    tie = PriceBook([("a", definition("d3", "10005", 1)), ("b", definition("d4", "10005", 2))], PricingTables(), CPT)
    found = price(tie)
    assert isinstance(found, NoPrice) and "2 ChargeItemDefinitions apply equally" in found.detail


def test_an_unusable_definition_falls_back_and_says_why() -> None:
    broken = definition("d1", "10005", 1, applicability=[{"language": "text/cql", "expression": "true"}])
    found = price(PriceBook([("t", broken)], TABLES.billing.pricing, CPT))
    assert isinstance(found, Price) and found.charge_code == "3601005"
    nothing = price(PriceBook([("t", broken)], PricingTables(), CPT))
    assert isinstance(nothing, NoPrice) and "needs language text/fhirpath" in nothing.detail


def test_chargemaster_row_with_exact_modifiers_wins(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    master = tmp_path / "config/chargemaster.yaml"
    master.write_text(master.read_text() + '  - {cpt: "10007", modifiers: ["59"], charge_code: "3601079", '
                      'description: "FNA FLUOR DISTINCT", unit_price: 500.00}\n')
    book = PriceBook([], load_tables(tmp_path / "config").billing.pricing, CPT)
    assert price(book, "10007", ("59",)).charge_code == "3601079"  # type: ignore[union-attr]
    assert price(book, "10007").charge_code == "3601007"  # type: ignore[union-attr]


def test_charge_definitions_are_read_from_config_files(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    (tmp_path / "config/charge-definitions").mkdir()
    (tmp_path / "config/charge-definitions/fees.json").write_text(json.dumps(definition("d1", "10005", 431.5)))
    tables = load_tables(tmp_path / "config")
    item = run(procedure("f1", "us", ("a",)), coverage(), tables=tables).built.sessions[0].charge_items[0]
    assert item["definitionCanonical"] == ["http://fees.test/d1"]
    assert item["priceOverride"] == {"value": 431.5, "currency": "USD"}
    (tmp_path / "config/charge-definitions/fees.json").write_text('{"resourceType": "Patient"}')
    with pytest.raises(ConfigError, match="must be a ChargeItemDefinition"):
        load_tables(tmp_path / "config")


# ----------------------------------------------------------------------------- accounts, time, tables
def test_account_from_encounter_else_single_patient_account_else_warning() -> None:
    def account(aid: str, **extra: Any) -> dict[str, Any]:
        return {"resourceType": "Account", "id": aid, "status": "active",
                "subject": [{"reference": "Patient/p1"}], **extra}

    enc = {"resourceType": "Encounter", "id": "e1", "status": "finished", "account": [{"reference": "Account/a2"}]}
    items = run(procedure("f1", "us", ("a",)), coverage(), account("a1"), account("a2"), enc).built.sessions[0]
    assert items.charge_items[0]["account"] == [{"reference": "Account/a2"}]
    single = run(procedure("f1", "us", ("a",)), coverage(), account("a1"), account("a0", status="inactive"))
    assert single.built.sessions[0].charge_items[0]["account"] == [{"reference": "Account/a1"}]
    two = run(procedure("f1", "us", ("a",)), coverage(), account("a1"), account("a2"))
    assert "account" not in two.built.sessions[0].charge_items[0]
    assert [w.code for w in two.built.warnings] == ["ambiguous-account"]


def test_time_of_writing_and_narrative_are_not_a_change() -> None:
    first = run(procedure("f1", "us", ("a",)), coverage())
    for out in first.built.sessions:
        for res in out.resources():
            stored = {**res, "id": "x", "meta": {"versionId": "1"}, "text": {"status": "generated", "div": "<div/>"}}
            stored["enteredDate" if res["resourceType"] == "ChargeItem" else "created"] = "2030-01-01T00:00:00Z"
            assert same_content(stored, res)
    stored = [{**r, "id": f"x{i}"} for i, r in enumerate(first.built.sessions[0].resources())]
    result = plan(first, stored, TABLES)
    assert result.writes == 0 and result.unchanged == len(stored)
    changed = {**stored[0], "quantity": {"value": 7}}
    assert not same_content(changed, first.built.sessions[0].charge_items[0])


@given(st.text(alphabet="0123456789", min_size=9, max_size=9))
def test_every_nine_digits_have_exactly_one_npi_check_digit(prefix: str) -> None:
    assert sum(npi_is_valid(prefix + str(d)) for d in range(10)) == 1


@pytest.mark.parametrize(("file", "old", "new", "message"), [
    ("settings.yaml", 'canonical_base: "http://fhir-charge-adapter.org/fhir"',
     'canonical_base: "http://charges.example.org/fhir"', "example domain"),
    ("settings.yaml", "urls:", "urls:\n  modifier_extension: x", "follow canonical_base"),
    ("settings.yaml", "when_missing: review        # review: a line", "when_missing: drop  # a line",
     "pricing.when_missing: must be 'review' or 'warn'"),
    ("billing-providers.yaml", 'npi: "1234567893"', 'npi: "1234567890"', "not a valid NPI"),
    ("billing-providers.yaml", "default: northriver-physicians", "default: nobody", "not one of the organizations"),
    ("billing-providers.yaml", 'taxonomy: "193200000X"', 'taxonomy: "1932"', "not a NUCC taxonomy code"),
    ("billing-providers.yaml", 'postalCode: "627011234"}', 'postalCode: "6270"}', "not a 5- or 9-digit ZIP"),
    ("billing-providers.yaml", 'state: "IL"', 'state: "Illinois"', "not a 2-letter state"),
    ("billing-providers.yaml", 'tin: "361234567"', 'tin: "361234567"\n    reference: Organization/np',
     "taxonomy and address belong on Organization/np"),
    ("place-of-service.yaml", 'default: "22"', 'default: "77"', "not one of the place-of-service codes"),
    ("chargemaster.yaml", "unit_price: 236.00", "unit_price: cheap", "non-negative amount"),
    ("diagnosis-map.yaml", 'icd10cm: "E04.1"', "icd10cm: ''", "icd10cm: must be a non-empty string"),
])
def test_a_bad_billing_table_is_a_configuration_error(tmp_path: Path, file: str, old: str, new: str,
                                                       message: str) -> None:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    path = tmp_path / "config" / file
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as err:
        load_tables(tmp_path / "config")
    assert file in str(err.value)


def test_canonical_base_moves_every_url_we_write(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    settings = tmp_path / "config/settings.yaml"
    settings.write_text(settings.read_text().replace("http://fhir-charge-adapter.org/fhir", "https://fhir.hospital.test/r4"))
    tables = load_tables(tmp_path / "config")
    report = run(procedure("f1", "us", ("a",)), procedure("f2", "ct", ("b",), when="2026-03-04T11:00:00Z"),
                 coverage(), tables=tables)
    text = json.dumps([r for s in report.built.sessions for r in s.resources()])
    assert "fhir-charge-adapter.org" not in text
    assert "https://fhir.hospital.test/r4/StructureDefinition/cpt-modifier" in text
    assert "https://fhir.hospital.test/r4/sid/charge-line" in text and "https://fhir.hospital.test/r4/sid/claim" in text
    assert SCT  # the SNOMED method codes of the input are untouched
