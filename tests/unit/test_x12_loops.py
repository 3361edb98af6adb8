"""The 837P's situational loops, which no bundled scenario reaches: a patient who is not the subscriber (2000C),
a referral (2310A) and a service facility (2310C); each interchange validated by pyx12."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapter.building.claim837 import Control, build_interchange
from adapter.config import load_tables
from adapter.pipeline import process_paths
from adapter.x12.dry_run import run_claims

from ..x12check import pyx12_errors

ROOT = Path(__file__).resolve().parents[2]
TABLES = load_tables()
NOW = datetime(2026, 4, 1, 12, tzinfo=UTC)
REPORT = process_paths([ROOT / "fixtures/fhir/scenarios/01-single-us/input.json"], TABLES, NOW)
NPI = "http://hl7.org/fhir/sid/us-npi"


def _interchange(claim: dict[str, Any], extra: dict[str, dict[str, Any]]) -> Any:
    def resolve(ref: str | None) -> dict[str, Any] | None:
        return extra.get(ref or "") or REPORT.index.get(ref)
    return build_interchange([claim], resolve, TABLES.x12, Control(3, NOW))


def _segments(text: str) -> list[str]:
    return [s.rstrip("~") for s in text.splitlines()]


def test_a_spouse_subscriber_puts_the_patient_in_2000c() -> None:
    claim = run_claims(REPORT)[0]
    coverage = copy.deepcopy(REPORT.index.get("Coverage/s01-cov"))
    coverage["relationship"]["coding"][0].update(code="spouse", display="Spouse")
    coverage["subscriber"] = {"reference": "RelatedPerson/s01-spouse"}
    spouse = {"resourceType": "RelatedPerson", "id": "s01-spouse", "patient": {"reference": "Patient/s01-pat"},
              "name": [{"family": "Delgado", "given": ["Luis"]}]}
    result = _interchange(claim, {"Coverage/s01-cov": coverage, "RelatedPerson/s01-spouse": spouse})
    assert result.problems == [] and pyx12_errors(result.text) == []
    segments = _segments(result.text)
    at = segments.index("HL*2*1*22*1")
    assert segments[at + 1:at + 3] == ["SBR*P********12", "NM1*IL*1*Delgado*Luis****MI*GLH884120351"]
    assert segments[at + 3].startswith("NM1*PR*2")  # no subscriber address or DMG: the subscriber is not the patient
    assert segments[at + 4:at + 10] == ["HL*3*2*23*0", "PAT*01", "NM1*QC*1*Delgado*Maria*Elena",
                                        "N3*100 Maple Avenue", "N4*Springfield*IL*62704", "DMG*D8*19780514*F"]
    without = _interchange(claim, {"Coverage/s01-cov": {**coverage, "subscriber": {"reference": "RelatedPerson/x"}}})
    assert [p.element for p in without.problems] == ["2010BA NM1"]


def test_a_referral_names_the_referring_provider_and_a_facility_its_place() -> None:
    claim = {**run_claims(REPORT)[0], "referral": {"reference": "ServiceRequest/s01-ref"}}
    request = {"resourceType": "ServiceRequest", "id": "s01-ref", "status": "active", "intent": "order",
               "subject": {"reference": "Patient/s01-pat"}, "requester": {"reference": "Practitioner/s01-gp"}}
    gp = {"resourceType": "Practitioner", "id": "s01-gp", "identifier": [{"system": NPI, "value": "1000000004"}],
          "name": [{"family": "Osei", "given": ["Kwame"]}]}
    encounter = {**REPORT.index.get("Encounter/s01-enc"), "location": [{"location": {"reference": "Location/s01-l"}}]}
    location = {"resourceType": "Location", "id": "s01-l", "name": "Northriver Hospital Imaging",
                "identifier": [{"system": NPI, "value": "1548300002"}],
                "address": {"line": ["40 Hospital Road"], "city": "Springfield", "state": "IL",
                            "postalCode": "62702-1000"}}
    extra = {"ServiceRequest/s01-ref": request, "Practitioner/s01-gp": gp, "Encounter/s01-enc": encounter,
             "Location/s01-l": location}
    result = _interchange(claim, extra)
    assert result.problems == [] and pyx12_errors(result.text) == []
    segments = _segments(result.text)
    at = segments.index("NM1*DN*1*Osei*Kwame****XX*1000000004")
    assert segments[at + 1].startswith("NM1*82*1*Park*Helen")
    assert segments[at + 2:at + 5] == ["NM1*77*2*Northriver Hospital Imaging*****XX*1548300002",
                                       "N3*40 Hospital Road", "N4*Springfield*IL*627021000"]
    # the facility at the billing provider's own address is not sent again; office visits never carry it
    same = {**location, "address": {"line": ["1200 Riverside Drive"], "city": "Springfield", "state": "IL",
                                    "postalCode": "62701"}}
    assert "NM1*77" not in _interchange(claim, {**extra, "Location/s01-l": same}).text
    office = copy.deepcopy(claim)
    office["item"][0]["locationCodeableConcept"]["coding"][0]["code"] = "11"
    assert "NM1*77" not in _interchange(office, extra).text
    lost = _interchange(claim, {**extra, "Practitioner/s01-gp": {**gp, "identifier": []}})
    assert [p.element for p in lost.problems] == ["2310A NM109"]


def test_the_payer_comes_from_coverage_payor_also_when_it_is_a_logical_reference() -> None:
    claim = run_claims(REPORT)[0]
    coverage = copy.deepcopy(REPORT.index.get("Coverage/s01-cov"))
    system = TABLES.x12.payer_id_systems[0]
    coverage["payor"] = [{"type": "Organization", "identifier": {"system": system, "value": "LOGIC01"},
                          "display": "Logical Health Plan"}]
    result = _interchange(claim, {"Coverage/s01-cov": coverage})
    assert result.problems == [] and "NM1*PR*2*Logical Health Plan*****PI*LOGIC01~" in result.text
    coverage["payor"][0]["identifier"]["system"] = "urn:other"  # not a payer id system: the Claim is held
    assert [p.element for p in _interchange(claim, {"Coverage/s01-cov": coverage}).problems] == ["2010BB NM109"]
