"""The billing provider contained in the Claim (`#billing-provider`: NPI, TIN, taxonomy, address), the one source
of the 837P's loop 2010AA; and how Claims written before it (Claim.provider a logical reference, nothing
contained) stand: not rewritten nor replaced for its arrival, upgraded when written for another reason."""

from __future__ import annotations

import copy
import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from adapter.billing.parties import with_contained_provider
from adapter.building.claim837 import Control, build_interchange
from adapter.config import load_tables
from adapter.pipeline import process_paths
from adapter.sinks.ownership import stamped
from adapter.sinks.reconcile import plan

from ..x12check import pyx12_errors
from .test_lifecycle import Store

ROOT = Path(__file__).resolve().parents[2]
TABLES = load_tables()
NOW = datetime(2026, 4, 1, 12, tzinfo=UTC)


def _report(scenario: str, tables: Any = TABLES) -> Any:
    return process_paths([next((ROOT / "fixtures/fhir/scenarios").glob(f"{scenario}-*")) / "input.json"], tables, NOW)


def _legacy(claim: dict[str, Any]) -> dict[str, Any]:
    """`claim` as the release before wrote it: Claim.provider a logical reference, nothing contained."""
    old = {k: v for k, v in claim.items() if k not in ("contained", "meta")}
    old["provider"] = {k: v for k, v in claim["provider"].items() if k != "reference"}
    old["extension"] = [e for e in claim["extension"] if e["url"] != TABLES.settings.fingerprint_extension]
    return {**stamped(old, TABLES.settings.fingerprint_extension), "meta": claim["meta"]}


def _store_with_legacy_claim(**changes: Any) -> tuple[Store, dict[str, Any]]:
    store = Store()
    store.apply(plan(_report("02"), [], TABLES, now=NOW))
    [claim] = store.of("Claim")
    legacy = _legacy({**claim, **changes})
    store.resources[f"Claim/{claim['id']}"] = legacy
    return store, legacy


@pytest.mark.parametrize("answered", [False, True], ids=["ours", "answered"])
def test_a_claim_written_without_the_contained_provider_is_left_as_it_is(answered: bool) -> None:
    store, legacy = _store_with_legacy_claim()
    result = plan(_report("02"), store.all(), TABLES, answered={f"Claim/{legacy['id']}"} if answered else set(),
                  now=NOW)
    assert result.writes == 0 and result.drift == [] and result.conflicts == [] and result.unchanged > 0


def test_a_claim_of_ours_written_without_it_gains_it_when_it_changes_for_another_reason() -> None:
    store, legacy = _store_with_legacy_claim(priority={"coding": [{"code": "stat"}]})  # differs from the coding
    result = plan(_report("02"), store.all(), TABLES, now=NOW)
    [entry] = [e for s in result.sessions for e in s.entries]
    assert entry["request"]["url"] == f"Claim/{legacy['id']}"  # in place: still ours
    claim = entry["resource"]
    assert claim["provider"]["reference"] == "#billing-provider" and claim["contained"][0]["id"] == "billing-provider"


def test_an_answered_claim_written_without_it_is_voided_with_it_and_the_void_goes_in_an_837p() -> None:
    store, legacy = _store_with_legacy_claim()
    answered = {f"Claim/{legacy['id']}"}
    result = plan(_report("01"), store.all(), TABLES, answered=answered, now=NOW)  # 02's session is gone
    [void] = [e["resource"] for s in result.sessions for e in s.entries
              if e["resource"]["resourceType"] == "Claim" and "related" in e["resource"]]
    assert void["provider"]["reference"] == "#billing-provider"
    assert [i["value"] for i in void["contained"][0]["identifier"]] == ["1234567893", "361234567"]
    assert {k: v for k, v in void["provider"].items() if k != "reference"} == legacy["provider"]
    interchange = build_interchange([void], _report("02").index.get, TABLES.x12, Control(5, NOW),
                                    {f"Claim/{legacy['id']}": "PAYER0001"})
    assert interchange.problems == [] and pyx12_errors(interchange.text) == []
    assert "REF*EI*361234567~" in interchange.text and "N3*1200 Riverside Drive~" in interchange.text


def test_a_legacy_claim_whose_provider_is_not_configured_is_voided_as_it_was() -> None:
    claim = {"resourceType": "Claim", "provider": {"type": "Organization", "display": "Gone",
                                                   "identifier": {"system": "http://hl7.org/fhir/sid/us-npi",
                                                                  "value": "1999999992"}}}
    assert with_contained_provider(claim, TABLES.billing.providers) is claim


def test_once_contained_the_provider_is_content_a_new_address_updates_a_claim_of_ours() -> None:
    store = Store()
    store.apply(plan(_report("02"), [], TABLES, now=NOW))
    providers = TABLES.billing.providers
    moved = dataclasses.replace(providers.organizations["northriver-physicians"],
                                address={"line": ["9 Lake Street"], "city": "Springfield", "state": "IL",
                                         "postalCode": "62702"})
    tables = dataclasses.replace(TABLES, billing=dataclasses.replace(TABLES.billing, providers=dataclasses.replace(
        providers, organizations={**providers.organizations, "northriver-physicians": moved})))
    result = plan(_report("02", tables), store.all(), tables, now=NOW)
    [entry] = [e for s in result.sessions for e in s.entries]
    assert entry["resource"]["contained"][0]["address"][0]["line"] == ["9 Lake Street"]


def test_the_837p_reads_the_billing_provider_from_the_claim_only() -> None:
    report = _report("01")
    [claim] = [s.claim for s in report.built.sessions if s.claim]
    assert build_interchange([claim], report.index.get, TABLES.x12, Control(1, NOW)).problems == []
    without_tin = copy.deepcopy(claim)
    without_tin["contained"][0]["identifier"] = without_tin["contained"][0]["identifier"][:1]
    without_address = copy.deepcopy(claim)
    del without_address["contained"][0]["address"]
    lost = copy.deepcopy(claim)
    del lost["contained"]
    found = [build_interchange([c], report.index.get, TABLES.x12, Control(1, NOW)).problems[0].element
             for c in (without_tin, without_address, lost)]
    assert found == ["2010AA REF02", "2010AA N3", "2010AA NM1"]  # config/billing-providers.yaml is not asked
