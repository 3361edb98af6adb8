"""Bundle semantics (docs/input-contract.md, bundle-semantics), property-based over every fixture: the same data
as a collection, transaction, batch, searchset or history Bundle gives byte-identical charges, the same reviews
and the same exit code; a DELETE means deleted whether or not its entry still carries the resource; a
searchset's outcome entry and a batch's read requests never change the answer or the exit code. The streaming
path reads with the same reader (tests/test_streaming.py compares its bytes on every fixture).
"""

from __future__ import annotations

import copy
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapter.cli import output_bundle
from adapter.pipeline import RunReport, process_paths
from tests.test_properties import (
    FIXTURES,
    NOW,
    SCENARIOS,
    TABLES,
    answer,
    entries_of,
    fixture_files,
    key_of,
    names,
    run_report,
)

BUNDLE_TYPES = ("collection", "transaction", "batch", "searchset", "history")
OUTCOME = {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "processing",
                                                          "diagnostics": "search results were truncated"}]}


def outcome_of(report: RunReport) -> tuple[str, list[tuple[str, str]], int, int]:
    """The charges and reviews (as the other properties compare them), the exit code and the problem count."""
    charges, reviews = answer(report)
    return charges, reviews, report.exit_code, len(report.problems)


def run(bundles: list[dict[str, Any]]) -> tuple[str, list[tuple[str, str]], int, int]:
    return outcome_of(run_report(bundles))


_BASELINES: dict[Path, tuple[str, list[tuple[str, str]], int, int]] = {}


def baseline(folder: Path) -> tuple[str, list[tuple[str, str]], int, int]:
    if folder not in _BASELINES:
        _BASELINES[folder] = outcome_of(process_paths(fixture_files(folder), TABLES, now=NOW))
    return _BASELINES[folder]


def as_bundle(entries: list[dict[str, Any]], kind: str, rng: random.Random) -> dict[str, Any]:
    """`entries` (resources with their fullUrl, DELETE entries) as a Bundle of `kind`, each entry shaped as that
    type carries it: requests for transaction and batch (PUT, or POST for a resource without id), requests and
    responses for history, search modes for a searchset (with an outcome entry and includes)."""
    out: list[dict[str, Any]] = []
    for entry in copy.deepcopy(entries):
        deleting = (entry.get("request") or {}).get("method") == "DELETE"
        resource = entry.get("resource")
        if kind in ("transaction", "batch", "history"):
            if not deleting:
                rid = resource.get("id")
                entry["request"] = {"method": "PUT", "url": f"{resource['resourceType']}/{rid}"} if rid else \
                    {"method": "POST", "url": resource["resourceType"]}
            if kind == "history":
                entry.setdefault("response", {"status": "204 No Content" if deleting else "200 OK"})
            elif not deleting:  # a DELETE keeps its response: its etag is the version it makes
                entry.pop("response", None)
        elif deleting:  # a collection or searchset has no requests: the delete is a history entry beside it
            entry = {**entry, "_history": True}
        else:
            entry.pop("request", None)
            entry.pop("response", None)
            if kind == "searchset":
                mode = "match" if resource["resourceType"] == "Procedure" else "include"
                entry["search"] = {"mode": mode}
        out.append(entry)
    deletes = [{k: v for k, v in e.items() if k != "_history"} for e in out if e.get("_history")]
    out = [e for e in out if not e.get("_history")]
    if kind == "searchset":
        out.insert(rng.randrange(len(out) + 1), {"resource": copy.deepcopy(OUTCOME), "search": {"mode": "outcome"}})
    if kind in ("transaction", "batch") and rng.random() < 0.5:
        out.insert(rng.randrange(len(out) + 1), {"request": {"method": "GET", "url": "Patient?_count=1"}})
    bundles = {"resourceType": "Bundle", "type": kind, "entry": out}
    if deletes:
        return {"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": bundles}, {"resource": {"resourceType": "Bundle", "type": "history", "entry": deletes}}]}
    return bundles


@given(folder=st.sampled_from(FIXTURES), kind=st.sampled_from(BUNDLE_TYPES), rng=st.randoms(use_true_random=False))
def test_the_same_data_in_every_bundle_type_gives_the_same_charges(folder: Path, kind: str,
                                                                   rng: random.Random) -> None:
    entries = entries_of(folder)
    rng.shuffle(entries)
    assert run([as_bundle(entries, kind, rng)]) == baseline(folder)


@pytest.mark.parametrize("kind", BUNDLE_TYPES)
@pytest.mark.parametrize("folder", FIXTURES, ids=names(FIXTURES))
def test_every_fixture_in_every_bundle_type_gives_the_same_charges(folder: Path, kind: str) -> None:
    rng = random.Random(f"{folder.name}-{kind}")
    assert run([as_bundle(entries_of(folder), kind, rng)]) == baseline(folder)


def deleting(entries: list[dict[str, Any]], chosen: set[str], with_body: bool) -> list[dict[str, Any]]:
    """The entries with each Procedure in `chosen` deleted by a newer DELETE entry, carrying its resource or not."""
    out = copy.deepcopy(entries)
    for key in sorted(chosen):
        live = [e for e in out if key_of(e) == key and "resource" in e and "request" not in e]
        entry: dict[str, Any] = {"request": {"method": "DELETE", "url": key},
                                 "response": {"status": "204 No Content", "etag": 'W/"99"'}}
        if with_body and live:
            entry["resource"] = copy.deepcopy(live[-1]["resource"])
        out.append(entry)
    return out


@given(folder=st.sampled_from(SCENARIOS), rng=st.randoms(use_true_random=False), kind=st.sampled_from(
    ("transaction", "batch", "history")))
def test_a_delete_means_deleted_whether_or_not_it_carries_the_resource(folder: Path, rng: random.Random,
                                                                       kind: str) -> None:
    entries = entries_of(folder)
    procedures = sorted({key_of(e) for e in entries if key_of(e).startswith("Procedure/")})
    chosen = set(rng.sample(procedures, rng.randint(1, len(procedures))))
    bare = run([{"resourceType": "Bundle", "type": "history", "entry": deleting(entries, chosen, False)}])
    carried = deleting(entries, chosen, True)
    rng.shuffle(carried)
    assert run([{"resourceType": "Bundle", "type": kind, "entry": carried}]) == bare
    charges = json.loads(bare[0])
    billed = {s["reference"] for e in charges.get("entry", []) for s in e["resource"].get("service", [])}
    assert not billed & chosen  # a deleted Procedure is never billed


def test_the_bundle_shapes_really_differ() -> None:
    """Guard: the shapes are what they claim (requests, search modes, an outcome entry), so the property is not
    vacuous; and a DELETE carrying a completed FNA bills nothing where the same entry as a PUT bills it."""
    entries = entries_of(next(f for f in SCENARIOS if f.name.startswith("02-")))
    rng = random.Random(1)
    shapes = {kind: as_bundle(entries, kind, rng) for kind in BUNDLE_TYPES}
    assert all(e["request"]["method"] in ("PUT", "GET") for e in shapes["transaction"]["entry"])
    assert any(e.get("search", {}).get("mode") == "outcome" for e in shapes["searchset"]["entry"])
    assert all("response" in e for e in shapes["history"]["entry"])
    procedure = next(e for e in entries if key_of(e).startswith("Procedure/"))
    as_put = {"resource": procedure["resource"], "request": {"method": "PUT", "url": key_of(procedure)}}
    as_delete = {"resource": procedure["resource"], "request": {"method": "DELETE", "url": key_of(procedure)}}
    others = [e for e in entries if e is not procedure]
    billed = run([{"resourceType": "Bundle", "type": "transaction", "entry": [*others, as_put]}])
    gone = run([{"resourceType": "Bundle", "type": "transaction", "entry": [*others, as_delete]}])
    assert billed[0] != gone[0]
    assert key_of(procedure).split("/")[1] not in json.dumps(json.loads(gone[0]).get("entry", []))


def test_a_searchset_outcome_entry_is_an_info_line_never_a_problem() -> None:
    folder = next(f for f in SCENARIOS if f.name.startswith("01-"))
    bundle = as_bundle(entries_of(folder), "searchset", random.Random(2))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "search.json"
        path.write_text(json.dumps(bundle))
        report = process_paths([path], TABLES, now=NOW)
    assert report.exit_code == 0 and not report.problems
    assert [n.reason.split(" (")[0] for n in report.read.notes] == ["OperationOutcome of the search"]
    assert output_bundle(report) == output_bundle(process_paths(fixture_files(folder), TABLES, now=NOW))
