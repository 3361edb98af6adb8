"""A charge's life after it is written (pure planning against a simulated server store).

`Store` applies a plan's transaction entries the way a FHIR server does (conditional PUT on the identifier:
update or create; PUT by id with If-Match), so each test can play billing systems, coders and payers between
re-codes and check what the planner writes next. No process boundary is crossed: the real-server versions of
these stories are in tests/integration/test_lifecycle.py.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from adapter.pipeline import RunReport
from adapter.sinks.ownership import Standing, chain_key, fingerprint, recorded_fingerprint, standing
from adapter.sinks.reconcile import Drift, Plan, plan

from .test_engine_rules import TABLES, coverage, procedure, run

CHARGE_SYSTEM = TABLES.settings.charge_identifier_system
CLAIM_SYSTEM = TABLES.settings.claim_identifier_system


class Store:
    """What a FHIR server holds of our ChargeItems and Claims, with versions, written by transaction entries."""

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, Any]] = {}
        self.next_id = 1

    def put(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Someone else's PUT (a billing system, a coder): a new version of the resource as given."""
        ref = f"{resource['resourceType']}/{resource['id']}"
        version = int(self.resources[ref]["meta"]["versionId"]) + 1
        self.resources[ref] = {**copy.deepcopy(resource), "meta": {"versionId": str(version)}}
        return self.resources[ref]

    def apply(self, result: Plan) -> int:
        writes = 0
        for entry in (e for s in result.sessions for e in s.entries):
            request, body = entry["request"], copy.deepcopy(entry["resource"])
            url = request["url"]
            if "?identifier=" in url:
                kind, token = url.split("?identifier=")
                system, value = token.split("|", 1)
                match = [r for r in self.resources.values() if r["resourceType"] == kind and any(
                    i.get("system") == system and i.get("value") == value for i in r["identifier"])]
                assert len(match) <= 1
                if match:
                    ref, version = f"{kind}/{match[0]['id']}", int(match[0]["meta"]["versionId"]) + 1
                else:
                    ref, version = f"{kind}/srv{self.next_id}", 1
                    self.next_id += 1
            else:
                ref = url
                version = int(self.resources[ref]["meta"]["versionId"]) + 1
                assert request.get("ifMatch") == f'W/"{version - 1}"', "in-place writes are conditional on the version"
            body["id"] = ref.split("/")[1]
            body["meta"] = {"versionId": str(version)}
            self.resources[ref] = body
            writes += 1
        return writes

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.resources.values() if r["resourceType"] == kind]

    def all(self) -> list[dict[str, Any]]:
        return list(self.resources.values())


def sync(store: Store, report: RunReport, answered: set[str] = frozenset()) -> tuple[Plan, int]:  # type: ignore[assignment]
    result = plan(report, store.all(), TABLES, answered=answered)
    return result, store.apply(result)


def _code(item: dict[str, Any]) -> str:
    mods = [e["valueCodeableConcept"]["coding"][0]["code"] for e in item.get("extension") or []
            if e["url"] == TABLES.settings.modifier_extension]
    return "-".join([item["code"]["coding"][0]["code"], *mods])


def net_units(store: Store) -> Counter[str]:
    """Units per code (with modifiers) over the patient's live lines: originals, credits and replacements."""
    net: Counter[str] = Counter()
    for item in store.of("ChargeItem"):
        if item["status"] != "entered-in-error":
            net[_code(item)] += item["quantity"]["value"]
    return +net  # drop zeros


def coded_units(report: RunReport) -> Counter[str]:
    return Counter({"-".join([ln.code, *ln.modifiers]): ln.units for ln in report.coding.lines})


def one_lesion() -> RunReport:
    return run(procedure("f1", "us", ("a",)), coverage())


def two_lesions() -> RunReport:
    return run(procedure("f1", "us", ("a", "b")), coverage())


def versions(store: Store) -> dict[str, str]:
    return {ref: r["meta"]["versionId"] for ref, r in store.resources.items()}


def bill_everything(store: Store) -> None:
    for item in store.of("ChargeItem"):
        if item["status"] == "billable":
            store.put({**item, "status": "billed"})


def test_every_write_carries_the_fingerprint_of_what_was_written_and_a_rerun_writes_nothing() -> None:
    store = Store()
    first, writes = sync(store, one_lesion())
    assert writes == 2 and first.drift_counts() == {Drift.MISSING: 2}
    for resource in store.all():
        assert recorded_fingerprint(resource) == fingerprint(resource)
        assert standing(resource) is Standing.OURS
    assert sync(store, one_lesion())[1] == 0


def test_billed_lines_are_never_written_again_when_the_coding_is_unchanged() -> None:
    store = Store()
    sync(store, one_lesion())
    bill_everything(store)
    before = versions(store)
    result, writes = sync(store, one_lesion())
    assert writes == 0 and result.drift == [] and versions(store) == before


def test_a_lesion_added_after_billing_posts_a_credit_and_the_new_lines_beside_the_billed_ones() -> None:
    store = Store()
    sync(store, one_lesion())
    bill_everything(store)
    billed = {ref: copy.deepcopy(r) for ref, r in store.resources.items() if r["resourceType"] == "ChargeItem"}
    report = two_lesions()
    result, _ = sync(store, report)
    # 10005 x1 is unchanged and billed: untouched; 10006 x1 is new (missing); the Claim is ours: updated
    assert result.drift_counts() == {Drift.MISSING: 1, Drift.OUTDATED: 1}
    for ref, item in billed.items():
        assert store.resources[ref] == item  # the billed line keeps its version
    assert net_units(store) == coded_units(report) == Counter({"10005": 1, "10006": 1})

    bill_everything(store)
    three = run(procedure("f1", "us", ("a", "b", "c")), coverage())
    result, _ = sync(store, three)
    assert result.drift_counts() == {Drift.BILLED_WRONG: 1, Drift.OUTDATED: 1}  # 10006 x1 -> x2, the Claim
    credits = [r for r in store.of("ChargeItem") if r["quantity"]["value"] < 0]
    assert len(credits) == 1
    credit = credits[0]
    offsets = [e for e in credit["extension"] if e["url"] == TABLES.settings.offsets_extension]
    credited = store.resources[offsets[0]["valueReference"]["reference"]]
    assert credited["status"] == "billed" and _code(credited) == "10006" and credit["quantity"]["value"] == -1
    assert credit["identifier"][0]["value"] == credited["identifier"][0]["value"] + "-credit"
    assert credit["performer"] == credited["performer"] and credit["code"] == credited["code"]
    if "priceOverride" in credited:
        assert credit["priceOverride"]["value"] == -credited["priceOverride"]["value"]
    replacement = [r for r in store.of("ChargeItem") if r["identifier"][0]["value"].endswith("-r2")]
    assert len(replacement) == 1 and replacement[0]["quantity"]["value"] == 2
    assert any(e["url"] == TABLES.settings.replaces_extension for e in replacement[0]["extension"])
    assert net_units(store) == coded_units(three) == Counter({"10005": 1, "10006": 2})
    assert sync(store, three)[1] == 0


def test_an_entered_in_error_procedure_after_billing_credits_its_lines_and_voids_the_answered_claim() -> None:
    store = Store()
    sync(store, one_lesion())
    bill_everything(store)
    claim = store.of("Claim")[0]
    answered = {f"Claim/{claim['id']}"}
    gone = run(procedure("f1", "us", ("a",), status="entered-in-error"), coverage())
    sync(store, gone, answered)
    assert net_units(store) == Counter()
    assert store.resources[f"Claim/{claim['id']}"] == claim  # the answered Claim is never changed
    voids = [c for c in store.of("Claim") if c["id"] != claim["id"]]
    assert len(voids) == 1
    frequency = [e for e in voids[0]["extension"] if e["url"] == TABLES.settings.claim_frequency_extension]
    assert frequency[0]["valueCoding"]["code"] == "8"
    assert voids[0]["related"][0]["claim"]["reference"] == f"Claim/{claim['id']}"
    assert voids[0]["item"] == claim["item"]
    assert sync(store, gone, answered)[1] == 0  # a void is not voided again


def test_an_answered_claim_is_replaced_with_frequency_7_naming_it() -> None:
    store = Store()
    sync(store, one_lesion())
    claim = store.of("Claim")[0]
    answered = {f"Claim/{claim['id']}"}
    result, _ = sync(store, two_lesions(), answered)
    assert store.resources[f"Claim/{claim['id']}"] == claim
    new = [c for c in store.of("Claim") if c["id"] != claim["id"]]
    assert len(new) == 1 and new[0]["identifier"][0]["value"] == claim["identifier"][0]["value"] + "-r2"
    assert [e["valueCoding"]["code"] for e in new[0]["extension"]
            if e["url"] == TABLES.settings.claim_frequency_extension] == ["7"]
    assert new[0]["related"][0]["claim"]["reference"] == f"Claim/{claim['id']}"
    assert len(new[0]["item"]) == 2
    # the replacement is ours until it is answered: a re-run writes nothing, a change updates it in place
    assert sync(store, two_lesions(), answered)[1] == 0
    result, writes = sync(store, run(procedure("f1", "us", ("a", "b", "c")), coverage()), answered)
    assert writes == 2 and result.drift_counts() == {Drift.OUTDATED: 2}  # 10006 x1 -> x2 (ours), the new Claim
    assert len(store.of("Claim")) == 2


def test_a_coders_edit_wins_and_a_later_change_of_the_coding_goes_to_review_showing_both() -> None:
    store = Store()
    sync(store, one_lesion())
    line = next(r for r in store.of("ChargeItem"))
    edited = store.put({**line, "note": [{"text": "checked by coding"}], "quantity": {"value": 1}})
    result, writes = sync(store, one_lesion())
    assert writes == 0 and result.edits_kept == 1 and result.conflicts == []
    assert standing(edited) is Standing.EDITED

    # an edit that agrees with what we would write now: nothing to do either
    mods = store.put({**edited, "note": line["note"]})
    assert sync(store, one_lesion())[1] == 0 and store.resources[f"ChargeItem/{mods['id']}"] == mods

    # the coding changes under an edited line: nothing written for it, review with both versions
    store.put({**mods, "note": [{"text": "coder's note"}]})
    changed = run(procedure("f1", "fluoro", ("a",)), coverage())
    before = store.resources[f"ChargeItem/{mods['id']}"]
    result, _ = sync(store, changed)
    assert store.resources[f"ChargeItem/{mods['id']}"] == before
    assert [c.procedures for c in result.conflicts] == [("Procedure/f1",)]
    detail = result.conflicts[0].detail
    assert f"ChargeItem/{mods['id']}" in detail and "10005 x1, status billable" in detail and "we would now" in detail
    assert "coder's note" not in detail  # no free text from the server in a review
    assert result.drift_counts()[Drift.CHANGED_BY_OTHERS] == 1


def test_a_coders_entered_in_error_is_respected_until_the_coding_changes() -> None:
    store = Store()
    sync(store, one_lesion())
    line = next(r for r in store.of("ChargeItem"))
    store.put({**line, "status": "entered-in-error"})
    result, writes = sync(store, one_lesion())
    assert writes == 0 and result.edits_kept == 1
    two = two_lesions()
    result, _ = sync(store, two)
    assert store.resources[f"ChargeItem/{line['id']}"]["status"] == "entered-in-error"
    assert net_units(store) == coded_units(two)  # 10005 written again beside the voided one, and 10006


def test_a_line_billed_between_read_and_write_is_not_overwritten() -> None:
    """In-place writes carry If-Match: a billing system's PUT in between makes the server refuse ours (412)."""
    store = Store()
    sync(store, one_lesion())
    stale_view = store.all()
    result = plan(two_lesions(), stale_view, TABLES)
    in_place = [e for s in result.sessions for e in s.entries if "?" not in e["request"]["url"]]
    assert in_place and all(e["request"]["ifMatch"] for e in in_place)


def claim_stands_for(store: Store, report: RunReport, answered: set[str]) -> bool:
    """The newest Claim of the chain says what the payer must hold now: the coding's items (active), or, when the
    session has no Claim any more, a void (frequency 8) if any Claim was answered, else a cancelled one."""
    chain = sorted(store.of("Claim"), key=lambda c: chain_key(c["identifier"][0]["value"]).generation)
    wanted = next((s.claim for s in report.built.sessions if s.claim), None)
    if not chain:
        return wanted is None
    newest = chain[-1]
    frequency = [e["valueCoding"]["code"] for e in newest.get("extension") or []
                 if e["url"] == TABLES.settings.claim_frequency_extension]
    if wanted is not None:
        return newest["status"] == "active" and newest["item"] == wanted["item"] and frequency != ["8"]
    if any(f"Claim/{c['id']}" in answered for c in chain):
        return newest["status"] == "active" and frequency == ["8"]
    return newest["status"] == "cancelled"


CODINGS = {
    "us1": lambda: run(procedure("f1", "us", ("a",)), coverage()),
    "us2": lambda: run(procedure("f1", "us", ("a", "b")), coverage()),
    "us3": lambda: run(procedure("f1", "us", ("a", "b", "c")), coverage()),
    "us-ct": lambda: run(procedure("f1", "us", ("a",)), procedure("f2", "ct", ("b", "c")), coverage()),
    "ct2": lambda: run(procedure("f1", "ct", ("a",)), procedure("f2", "ct", ("b",)), coverage()),
    "gone": lambda: run(procedure("f1", "us", ("a",), status="entered-in-error"), coverage()),
}
REPORTS = {name: make() for name, make in CODINGS.items()}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(CODINGS)), st.booleans(), st.booleans()), min_size=1, max_size=6))
def test_net_units_per_code_always_equal_the_current_coding(steps: list[tuple[str, bool, bool]]) -> None:
    """Whatever billing marks billed and payers answer between re-codes, the patient's live lines net to the
    coding: originals, credits and replacements together, and nothing that passed on is ever changed."""
    store = Store()
    answered: set[str] = set()
    for name, bill, answer in steps:
        passed = {ref: copy.deepcopy(r) for ref, r in store.resources.items()
                  if standing(r, answered) is Standing.PASSED_ON}
        sync(store, REPORTS[name], answered)
        for ref, resource in passed.items():
            assert store.resources[ref] == resource, f"{ref} had passed on and was changed"
        assert net_units(store) == coded_units(REPORTS[name]), name
        assert claim_stands_for(store, REPORTS[name], answered), name
        assert sync(store, REPORTS[name], answered)[1] == 0  # settled: a re-run writes nothing
        if bill:
            bill_everything(store)
        if answer:
            answered |= {f"Claim/{c['id']}" for c in store.of("Claim") if c["status"] == "active"}


def corrections_sample() -> list[dict[str, Any]]:
    """Every kind of resource a charge's life produces, as the server would hold them: originals, credits,
    replacement lines, a replacement Claim (frequency 7) and a void Claim (frequency 8). For the official
    HL7 validator run (tests/integration/test_sync.py)."""
    store = Store()
    answered: set[str] = set()
    for report in (one_lesion(), two_lesions(), REPORTS["us3"]):
        sync(store, report, answered)
        bill_everything(store)
        answered |= {f"Claim/{c['id']}" for c in store.of("Claim")}
    sync(store, REPORTS["gone"], answered)
    return store.all()


def test_the_corrections_sample_has_every_kind() -> None:
    sample = corrections_sample()
    frequencies = {e["valueCoding"]["code"] for r in sample for e in r.get("extension") or []
                   if e["url"] == TABLES.settings.claim_frequency_extension}
    assert frequencies == {"1", "7", "8"}  # first Claims (in-place updates), replacements, voids
    assert any(r["resourceType"] == "ChargeItem" and r["quantity"]["value"] < 0 for r in sample)
    assert any(e["url"] == TABLES.settings.replaces_extension for r in sample for e in r.get("extension") or [])


def test_an_unanswered_replacement_becomes_the_void_of_the_answered_claim_when_the_session_is_gone() -> None:
    """The payer answered Claim 1; Claim 2 replaced it and nobody answered that yet; the Procedure is then entered
    in error: the payer must get a void of Claim 1, and Claim 2 (still ours) becomes it."""
    store = Store()
    sync(store, one_lesion())
    first = store.of("Claim")[0]
    answered = {f"Claim/{first['id']}"}
    sync(store, two_lesions(), answered)
    second = next(c for c in store.of("Claim") if c["id"] != first["id"])
    sync(store, REPORTS["gone"], answered)
    now = store.resources[f"Claim/{second['id']}"]
    assert now["meta"]["versionId"] == "2" and now["status"] == "active"
    assert [e["valueCoding"]["code"] for e in now["extension"]
            if e["url"] == TABLES.settings.claim_frequency_extension] == ["8"]
    assert now["related"][0]["claim"]["reference"] == f"Claim/{first['id']}" and now["item"] == first["item"]
    assert store.resources[f"Claim/{first['id']}"] == first
    assert len(store.of("Claim")) == 2 and sync(store, REPORTS["gone"], answered)[1] == 0
