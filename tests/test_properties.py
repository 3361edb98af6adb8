"""Order and form never change the answer (property-based, over every fixture scenario).

Shuffling Bundle entries or files, rewriting references between equivalent forms (relative, absolute,
versioned, `urn:uuid:` with fullUrl), repeating a resource or adding an older version of it, and splitting a
Bundle into several files give byte-identical charges and the same reviews as the scenario read as written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import re
import tempfile
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.cli import output_bundle
from adapter.config import load_tables
from adapter.extraction.index import ResourceIndex, normalize_bases
from adapter.pipeline import RunReport, process_paths
from adapter.sources.files import SourcedResource

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted(p for p in (ROOT / "fixtures/fhir/scenarios").iterdir() if (p / "input.json").exists())
TABLES = load_tables()
NOW = datetime(2026, 4, 1, 12, tzinfo=UTC)
"""The time of writing (Claim.created, ChargeItem.enteredDate) is fixed: only the input varies."""
RELATIVE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})$")
BASE = "https://ehr.example.org/fhir"
LOCAL = dataclasses.replace(TABLES, local_bases=normalize_bases([BASE]))
"""The tables with BASE as a local base: absolute references on it name the local resources."""
EXAMPLES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def answer(report: RunReport) -> tuple[str, list[tuple[str, str]]]:
    """The charges as bytes, and the reviews as (Procedure, reason)."""
    charges = json.dumps(output_bundle(report), sort_keys=True)
    return charges, sorted({(r.procedure, r.reason) for r in report.reviews})


@cache
def baseline(folder: Path) -> tuple[str, list[tuple[str, str]]]:
    return answer(process_paths([folder / "input.json"], TABLES, now=NOW))


def entries_of(folder: Path) -> list[dict[str, Any]]:
    bundle = json.loads((folder / "input.json").read_text())
    return [{k: v for k, v in e.items() if k != "request"} for e in bundle["entry"]]


def uuid_of(key: str) -> str:
    digits = f"{abs(hash(key)) % 10**12:012d}"
    return f"urn:uuid:00000000-0000-4000-8000-{digits}"


def rewrite(node: Any, rng: random.Random, full_urls: dict[str, str], present: set[str]) -> Any:
    """Every relative reference to a resource of the Bundle in a form drawn from `rng`."""
    if isinstance(node, list):
        return [rewrite(item, rng, full_urls, present) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        match = RELATIVE.match(value) if key == "reference" and isinstance(value, str) else None
        if match and value in present:
            form = rng.choice(("relative", "absolute", "versioned", "urn"))
            if form == "absolute":
                value = f"{BASE}/{value}"
            elif form == "versioned":
                value = f"{value}/_history/1"
            elif form == "urn":
                value = full_urls.setdefault(value, uuid_of(value))
            out[key] = value
        else:
            out[key] = rewrite(value, rng, full_urls, present)
    return out


def older_copy(resource: dict[str, Any]) -> dict[str, Any]:
    """A superseded version that would change the answer if it were taken for the current one."""
    old = copy.deepcopy(resource)
    kind = resource["resourceType"]
    if kind == "Procedure":
        old["status"] = "entered-in-error" if resource.get("status") == "completed" else "completed"
    elif kind == "BodyStructure":
        old["patient"] = {"reference": "Patient/someone-else"}
    elif kind == "Coverage":
        old["status"] = "cancelled"
    else:
        old["language"] = "x-old"
    old["meta"] = {"versionId": "2", "lastUpdated": "2099-01-01T00:00:00Z"}  # versionId outranks lastUpdated
    return old


def run_files(bundles: list[dict[str, Any]], tables: Any = TABLES) -> tuple[str, list[tuple[str, str]]]:
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, bundle in enumerate(bundles):
            path = Path(tmp) / f"part-{i}.json"
            path.write_text(json.dumps(bundle))
            paths.append(path)
        return answer(process_paths(paths, tables, now=NOW))


def collection(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


@EXAMPLES
@given(folder=st.sampled_from(SCENARIOS), rng=st.randoms(use_true_random=False))
def test_shuffled_entries_give_the_same_charges(folder: Path, rng: random.Random) -> None:
    entries = entries_of(folder)
    rng.shuffle(entries)
    assert run_files([collection(entries)]) == baseline(folder)


@EXAMPLES
@given(folder=st.sampled_from(SCENARIOS), rng=st.randoms(use_true_random=False))
def test_equivalent_reference_forms_give_the_same_charges(folder: Path, rng: random.Random) -> None:
    entries = entries_of(folder)
    present = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in entries}
    full_urls: dict[str, str] = {}
    rewritten = [dict(e, resource=rewrite(e["resource"], rng, full_urls, present)) for e in entries]
    for entry in rewritten:
        key = f"{entry['resource']['resourceType']}/{entry['resource']['id']}"
        if key in full_urls:
            entry["fullUrl"] = full_urls[key]
    assert run_files([collection(rewritten)], LOCAL) == baseline(folder)


@EXAMPLES
@given(folder=st.sampled_from(SCENARIOS), rng=st.randoms(use_true_random=False))
def test_repeats_and_older_versions_give_the_same_charges(folder: Path, rng: random.Random) -> None:
    entries = entries_of(folder)
    out = []
    for entry in entries:
        current = copy.deepcopy(entry)
        current["resource"]["meta"] = {"versionId": "3"}  # fixtures reference version 1 at most
        extra = [current] * rng.randint(0, 2)  # identical repeats
        if rng.random() < 0.5:
            extra.append(dict(entry, resource=older_copy(entry["resource"])))
        out += [current, *extra]
    rng.shuffle(out)
    assert run_files([collection(out)]) == baseline(folder)


@EXAMPLES
@given(folder=st.sampled_from(SCENARIOS), rng=st.randoms(use_true_random=False), parts=st.integers(2, 4))
def test_a_bundle_split_into_files_gives_the_same_charges(folder: Path, rng: random.Random, parts: int) -> None:
    buckets: list[list[dict[str, Any]]] = [[] for _ in range(parts)]
    for entry in entries_of(folder):
        buckets[rng.randrange(parts)].append(entry)
    bundles = [collection(b) for b in buckets if b]
    rng.shuffle(bundles)
    assert run_files(bundles) == baseline(folder)


def test_the_rewriting_really_changes_the_input() -> None:
    """Guard: the transformations above produce other bytes, so the properties are not vacuous."""
    folder = next(f for f in SCENARIOS if f.name.startswith("14-"))
    entries = entries_of(folder)
    present = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in entries}
    rewritten = [dict(e, resource=rewrite(e["resource"], random.Random(3), {}, present)) for e in entries]
    assert json.dumps(rewritten) != json.dumps(entries)
    assert older_copy(entries[-1]["resource"]) != entries[-1]["resource"]
    # and an older version read last must not win
    newest = copy.deepcopy(entries[-1]["resource"])
    newest["meta"] = {"versionId": "3"}
    sources = [SourcedResource(newest, "a"), SourcedResource(older_copy(newest), "b")]
    index = ResourceIndex.build(sources)
    assert index.get(f"{newest['resourceType']}/{newest['id']}") is newest
