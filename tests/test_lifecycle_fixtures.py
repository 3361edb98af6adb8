"""fixtures/fhir/lifecycle/: a charge's life as fixtures with hand-written expected writes.

Each case codes a scenario's input and writes it to a simulated server (`tests.unit.test_lifecycle.Store`), lets
billing, payers and coders act on the server (`server`), changes the clinical input (`change`), re-codes, and
compares what the planner writes (and its drift, reviews and kept edits, and the net units per code after the
writes) with `expected`, written by hand from docs/output.md "Ownership".
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from adapter.config import load_tables
from adapter.pipeline import process
from adapter.sinks.ownership import chain_key
from adapter.sinks.reconcile import plan
from adapter.sources.files import SourcedResource

from .unit.test_lifecycle import Store, _code, net_units

ROOT = Path(__file__).resolve().parent.parent
CASES = sorted((ROOT / "fixtures/fhir/lifecycle").glob("*/case.json"))
TABLES = load_tables()
SETTINGS = TABLES.settings
NOW = datetime(2026, 12, 4, 12, tzinfo=UTC)


def _resources(scenario: str) -> list[dict[str, Any]]:
    bundle = json.loads(next((ROOT / "fixtures/fhir/scenarios").glob(f"{scenario}/input.json")).read_text())
    return [e["resource"] for e in bundle["entry"]]


def _code_all(resources: list[dict[str, Any]]) -> Any:
    return process([SourcedResource(r, "fixture") for r in resources], TABLES, now=NOW)


def _line(store: Store, code: str) -> dict[str, Any]:
    return next(r for r in store.of("ChargeItem") if _code(r) == code and r["quantity"]["value"] > 0)


def _act(store: Store, event: dict[str, Any]) -> set[str]:
    """What someone else does on the server; returns the Claims a payer answered."""
    if "bill" in event:
        for code in event["bill"]:
            store.put({**_line(store, code), "status": "billed"})
    if "edit" in event:
        edit = dict(event["edit"])
        line = _line(store, edit.pop("line"))
        store.put({**line, "note": [{"text": edit["note"]}]})
    if "void" in event:
        store.put({**_line(store, event["void"]), "status": "entered-in-error"})
    if event.get("answer") == "Claim":
        return {f"Claim/{c['id']}" for c in store.of("Claim")}
    return set()


def _changed(resources: list[dict[str, Any]], changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = copy.deepcopy(resources)
    for change in changes:
        proc = next(r for r in out if r["id"] == change["procedure"])
        if "drop_target" in change:
            proc["extension"] = [e for e in proc["extension"]
                                 if (e.get("valueReference") or {}).get("reference") != change["drop_target"]]
        if "status" in change:
            proc["status"] = change["status"]
    return out


def _described(entry: dict[str, Any], store: Store) -> dict[str, Any]:
    """A write as the expected files describe it."""
    res = entry["resource"]
    kind = res["resourceType"]
    system = SETTINGS.charge_identifier_system if kind == "ChargeItem" else SETTINGS.claim_identifier_system
    value = next(i["value"] for i in res["identifier"] if i["system"] == system)
    key = chain_key(value)
    ext = {e["url"]: e for e in res.get("extension") or []}
    out: dict[str, Any] = {}
    if kind == "ChargeItem":
        if key.credit:
            target = ext[SETTINGS.offsets_extension]["valueReference"]["reference"]
            out = {"kind": "credit", "code": _code(res), "quantity": res["quantity"]["value"],
                   "offsets": _code(store.resources[target])}
        elif key.generation > 1:
            target = ext[SETTINGS.replaces_extension]["valueReference"]["reference"]
            out = {"kind": "replacement", "code": _code(res), "quantity": res["quantity"]["value"],
                   "generation": key.generation, "replaces": _code(store.resources[target])}
        else:
            out = {"kind": "update" if "?" not in entry["request"]["url"] else "create", "code": _code(res),
                   "quantity": res["quantity"]["value"]}
        return out
    items = [f"{i['productOrService']['coding'][0]['code']} x{i['quantity']['value']}" for i in res["item"]]
    frequency = ext.get(SETTINGS.claim_frequency_extension, {}).get("valueCoding", {}).get("code")
    if key.generation > 1:
        assert res["related"][0]["relationship"]["coding"][0]["code"] == "prior"
        assert res["related"][0]["claim"]["reference"] in store.resources
        out = {"kind": "void" if frequency == "8" else "replacement", "resourceType": "Claim",
               "generation": key.generation, "frequency": frequency, "items": items}
    else:
        out = {"kind": "update" if "?" not in entry["request"]["url"] else "create", "resourceType": "Claim",
               "items": items}
    return out


@pytest.mark.parametrize("case_file", CASES, ids=[c.parent.name for c in CASES])
def test_lifecycle_fixture(case_file: Path) -> None:
    case = json.loads(case_file.read_text())
    resources = _resources(case["scenario"])
    store = Store()
    store.apply(plan(_code_all(resources), [], TABLES, now=NOW))
    answered: set[str] = set()
    for event in case["server"]:
        answered |= _act(store, event)
    passed_on = {ref: copy.deepcopy(r) for ref, r in store.resources.items()
                 if r.get("status") == "billed" or ref in answered}
    report = _code_all(_changed(resources, case["change"]))
    result = plan(report, store.all(), TABLES, answered=answered, now=NOW)
    expected = case["expected"]
    writes = [_described(e, store) for s in result.sessions for e in s.entries]
    assert sorted(writes, key=json.dumps) == sorted(expected["writes"], key=json.dumps)  # in one transaction
    assert dict(result.drift_counts()) == expected["drift"]
    assert [{"procedure": p, "reason": "changed-on-server"} for c in result.conflicts for p in c.procedures] \
        == expected["reviews"]
    assert result.edits_kept == expected["edits_kept"]
    store.apply(result)
    assert net_units(store) == Counter(expected["net"])
    for ref, resource in passed_on.items():
        assert store.resources[ref] == resource, f"{ref} had passed on and was changed"
    assert store.apply(plan(report, store.all(), TABLES, answered=answered, now=NOW)) == 0  # settled
