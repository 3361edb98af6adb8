"""Order and form never change the answer (property-based, over every fixture: scenarios, feeds, NDJSON).

Shuffling entries, rewriting references between equivalent forms (relative, absolute on a local base,
versioned, `urn:uuid:` with fullUrl, contained `#id` where that is the same resource), repeating a resource or
adding an older version of it (of every resource type), and splitting the input into several files give
byte-identical charges and the same reviews as the fixture read as written.

Reproducible: the default profile is derandomized (the same examples on every run and machine, so a CI failure
is a local failure too), and `test_every_fixture_survives_every_transformation` applies every transformation to
every fixture with a seed taken from its name. `HYPOTHESIS_PROFILE=explore` draws fresh random examples (500 per
property) for a longer hunt; a failure there prints the example to replay.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import re
import tempfile
import zlib
from collections import defaultdict
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.cli import output_bundle
from adapter.config import load_tables
from adapter.extraction.index import ResourceIndex, normalize_bases, normalize_reference, version_rank
from adapter.pipeline import RunReport, process_paths
from adapter.sources.files import SourcedResource

ROOT = Path(__file__).resolve().parent.parent
FHIR = ROOT / "fixtures/fhir"
SCENARIOS = sorted(p for p in (FHIR / "scenarios").iterdir() if (p / "input.json").exists())
FEEDS = sorted(p for p in (FHIR / "feeds").iterdir() if (p / "expected.json").exists())
FIXTURES = [*SCENARIOS, *FEEDS, FHIR / "ndjson"]
TABLES = load_tables()
NOW = datetime(2026, 4, 1, 12, tzinfo=UTC)
"""The time of writing (Claim.created, ChargeItem.enteredDate) is fixed: only the input varies."""
RELATIVE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})$")
RESTFUL = re.compile(r"^https?://.+/[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")
BASE = "https://ehr.example.org/fhir"
LOCAL = dataclasses.replace(TABLES, local_bases=TABLES.local_bases | normalize_bases([BASE]))
"""The tables with BASE as a local base: absolute references on it name the local resources."""
CONTAINABLE = ("BodyStructure", "Condition")
"""Types whose identity never reaches the output: contained in their only referrer, they are the same resource."""
POISON = {"url": "urn:x:older-version-only", "valueBoolean": True}
"""On every older copy: were an older copy ever taken for the current one, its Procedure would go to review."""

settings.register_profile("default", derandomize=True, max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


# ------------------------------------------------------------------------------------------- fixtures
def fixture_files(folder: Path) -> list[Path]:
    if (folder / "input.json").exists():
        return [folder / "input.json"]
    return sorted(f for f in folder.iterdir() if f.suffix in (".json", ".ndjson") and f.name != "expected.json")


def entries_of(folder: Path) -> list[dict[str, Any]]:
    """Every entry of a fixture as Bundle entries: resources with their fullUrl; history DELETE entries with
    their request and response (they carry no resource)."""
    out: list[dict[str, Any]] = []
    for path in fixture_files(folder):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".ndjson":
            out += [{"resource": json.loads(line)} for line in text.splitlines() if line.strip()]
            continue
        data = json.loads(text)
        if data.get("resourceType") != "Bundle":
            out.append({"resource": data})
            continue
        for entry in data.get("entry") or []:
            method = (entry.get("request") or {}).get("method")
            if (entry.get("search") or {}).get("mode") == "outcome" or method in ("GET", "HEAD"):
                continue  # not data (bundle-semantics)
            if "resource" in entry and method != "DELETE":
                kept = {k: v for k, v in entry.items() if k in ("resource", "fullUrl")}
                if method == "PUT" and "id" not in entry["resource"]:  # `PUT Type/id` gives it the URL's id
                    kept["resource"] = {**entry["resource"], "id": entry["request"]["url"].split("/")[1]}
                out.append(kept)
            else:  # a DELETE, with or without the resource it deletes
                out.append({k: v for k, v in entry.items() if k in ("resource", "fullUrl", "request", "response")})
    return out


def key_of(entry: dict[str, Any]) -> str:
    if "request" in entry:
        return "/".join(entry["request"]["url"].split("/")[:2])
    if "id" not in entry["resource"]:  # known by its fullUrl only (a transaction's create)
        return str(entry["fullUrl"])
    return f"{entry['resource']['resourceType']}/{entry['resource']['id']}"


def restful(entry: dict[str, Any]) -> bool:
    return bool(RESTFUL.match(entry.get("fullUrl") or ""))


CONTAINED_NAME = re.compile(r"Procedure/[A-Za-z0-9\-.]+#([A-Za-z0-9\-.]+)")


def answer(report: RunReport) -> tuple[str, list[tuple[str, str]]]:
    """The charges as bytes, and the reviews as (Procedure, reason). A contained BodyStructure is named by where
    it is (`Procedure/p#bs`) in the explanation a ChargeItem.note carries: that name is read as `BodyStructure/bs`,
    so moving a lesion into its only Procedure's `contained` compares equal when everything else is."""
    charges = CONTAINED_NAME.sub(r"BodyStructure/\1", json.dumps(output_bundle(report), sort_keys=True))
    return charges, sorted({(r.procedure, r.reason) for r in report.reviews})


@cache
def baseline(folder: Path) -> tuple[str, list[tuple[str, str]]]:
    return answer(process_paths(fixture_files(folder), TABLES, now=NOW))


def collection(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def run_files(bundles: list[dict[str, Any]], tables: Any = TABLES) -> tuple[str, list[tuple[str, str]]]:
    return answer(run_report(bundles, tables))


def run_report(bundles: list[dict[str, Any]], tables: Any = TABLES) -> RunReport:
    """The run over `bundles`, each written to a file of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, bundle in enumerate(bundles):
            path = Path(tmp) / f"part-{i}.json"
            path.write_text(json.dumps(bundle))
            paths.append(path)
        return process_paths(paths, tables, now=NOW)


# ------------------------------------------------------------------------------------- transformations
def uuid_of(key: str) -> str:
    return f"urn:uuid:00000000-0000-4000-8000-{zlib.crc32(key.encode()):012d}"


def references_in(node: Any) -> list[str]:
    if isinstance(node, list):
        return [r for item in node for r in references_in(item)]
    if not isinstance(node, dict):
        return []
    found = [node["reference"]] if isinstance(node.get("reference"), str) else []
    return found + [r for key, value in node.items() if key != "reference" for r in references_in(value)]


def containable(entries: list[dict[str, Any]]) -> dict[str, str]:
    """BodyStructures and Conditions (one copy, no fullUrl, no identifier) that only the copies of one Procedure
    (without a RESTful fullUrl) reference, and only relatively: target key -> that Procedure's key."""
    copies: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        copies[key_of(entry)].append(entry)
    holders: dict[str, set[str]] = defaultdict(set)
    plain: dict[str, bool] = defaultdict(lambda: True)
    for entry in entries:
        for ref in references_in(entry.get("resource")):
            key = normalize_reference(ref)
            if key in copies:  # any literal form naming it (absolute, versioned) counts, and only plain ones pass
                holders[key].add(key_of(entry))
                plain[key] = plain[key] and ref == key and not restful(entry)
    out = {}
    for key, found in copies.items():
        resource = found[0].get("resource") or {}
        if key.split("/")[0] not in CONTAINABLE or len(found) != 1 or "fullUrl" in found[0] or \
                resource.get("identifier"):  # a logical reference by identifier may name it: not contained then
            continue
        if len(holders[key]) == 1 and plain[key] and next(iter(holders[key])).startswith("Procedure/"):
            out[key] = next(iter(holders[key]))
    return out


def rewrite(entries: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """Every relative reference (in an entry without a RESTful fullUrl) to a resource of the input, in a form
    drawn from `rng`: relative, absolute on BASE (a local base in LOCAL), versioned with the target's current
    version, `urn:uuid:` (the target's entries then carry it as fullUrl; only targets without a fullUrl), or
    contained `#id` (the target moved into the `contained` of its only referrer)."""
    entries = copy.deepcopy(entries)
    copies: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        copies[key_of(entry)].append(entry)
    newest = {key: max((e for e in found if "resource" in e), key=lambda e: version_rank(e["resource"]),
                       default=None) for key, found in copies.items()}
    contain = {t: h for t, h in containable(entries).items() if rng.random() < 0.5}
    urns: dict[str, str] = {}

    def form(value: str, holder: str) -> str:
        if contain.get(value) == holder:
            return "#" + value.split("/")[1]
        choices = ["relative", "absolute"]
        if all("resource" in e for e in copies[value]):  # not of a deleted resource: that version is gone
            choices.append("versioned")
        if not any("fullUrl" in e for e in copies[value]):
            choices.append("urn")
        chosen = rng.choice(choices)
        if chosen == "absolute":
            return f"{BASE}/{value}"
        if chosen == "versioned":
            current = newest.get(value)
            version = ((current or {}).get("resource", {}).get("meta") or {}).get("versionId") or "1"
            return f"{value}/_history/{version}"
        if chosen == "urn":
            return urns.setdefault(value, uuid_of(value))
        return value

    def walk(node: Any, holder: str) -> Any:
        if isinstance(node, list):
            return [walk(item, holder) for item in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and RELATIVE.match(value) and value in copies:
                out[key] = form(value, holder)
            elif key == "contained":
                out[key] = value
            else:
                out[key] = walk(value, holder)
        return out

    for entry in entries:
        if "resource" in entry and not restful(entry):
            entry["resource"] = walk(entry["resource"], key_of(entry))
    for target, holder in contain.items():
        inner = {k: v for k, v in copies[target][0]["resource"].items() if k != "meta"}
        for entry in copies[holder]:
            if "resource" in entry:
                entry["resource"].setdefault("contained", []).append(copy.deepcopy(inner))
    entries = [e for e in entries if key_of(e) not in contain]
    for entry in entries:
        if key_of(entry) in urns:
            entry["fullUrl"] = urns[key_of(entry)]
    return entries


def older_copy(resource: dict[str, Any], version: str, updated: str) -> dict[str, Any]:
    """A superseded version that would change the answer if it were taken for the current one: a status,
    subject or practitioner that changes what is billed or to whom, and always an unknown modifierExtension
    (reviewed on every resource a decision reads)."""
    old = copy.deepcopy(resource)
    kind = resource["resourceType"]
    if kind == "Procedure":
        old["status"] = "entered-in-error" if resource.get("status") == "completed" else "completed"
    elif kind == "BodyStructure":
        old["patient"] = {"reference": "Patient/someone-else"}
    elif kind in ("Coverage", "Account"):
        old["status"] = "cancelled" if kind == "Coverage" else "inactive"
    elif kind in ("Encounter", "Condition", "ServiceRequest"):
        old["subject"] = {"reference": "Patient/someone-else"}
    elif kind == "PractitionerRole":
        old["practitioner"] = {"reference": "Practitioner/someone-else"}
    elif kind in ("Patient", "Practitioner", "Organization"):
        old["identifier"] = [{"system": "urn:x:older", "value": "older"}]
    elif kind == "ChargeItemDefinition":
        old["status"] = "retired"
    old["modifierExtension"] = [*old.get("modifierExtension", []), POISON]
    old["meta"] = {**(old.get("meta") or {}), "versionId": version, "lastUpdated": updated}  # labels kept (HTEST)
    return old


def with_repeats_and_older_versions(entries: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """Identical repeats of any entry, and an older version of any resource: below every copy the input holds
    (versionId 0) when it has numeric versions; when it has none and one copy, that copy becomes version 3
    and the older one version 2 (versionId outranks lastUpdated, so the older one is dated later)."""
    copies: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        copies[key_of(entry)].append(entry)
    out: list[dict[str, Any]] = []
    for key, found in copies.items():
        found = copy.deepcopy(found)
        content = [e for e in found if "resource" in e]
        versions = [str((e["resource"].get("meta") or {}).get("versionId", "")) for e in content]
        older: dict[str, Any] | None = None
        if content and all(v.isdigit() for v in versions) and rng.random() < 0.5:
            last = max(content, key=lambda e: version_rank(e["resource"]))
            older = dict(last, resource=older_copy(last["resource"], "0", "2099-01-01T00:00:00Z"))
        elif len(found) == 1 and content and not any(versions) and not (
                content[0]["resource"].get("meta") or {}).get("lastUpdated"):
            content[0]["resource"]["meta"] = {**(content[0]["resource"].get("meta") or {}), "versionId": "3"}
            if rng.random() < 0.5:
                older = dict(content[0], resource=older_copy(content[0]["resource"], "2", "2099-01-01T00:00:00Z"))
        out += found
        out += [copy.deepcopy(rng.choice(found)) for _ in range(rng.randint(0, 2))]
        if older is not None:
            out.append(older)
        del key
    rng.shuffle(out)
    return out


def split(entries: list[dict[str, Any]], rng: random.Random, parts: int) -> list[dict[str, Any]]:
    buckets: list[list[dict[str, Any]]] = [[] for _ in range(parts)]
    for entry in entries:
        buckets[rng.randrange(parts)].append(entry)
    bundles = [collection(b) for b in buckets if b]
    rng.shuffle(bundles)
    return bundles


# ------------------------------------------------------------------------------------------ properties
@given(folder=st.sampled_from(FIXTURES), rng=st.randoms(use_true_random=False))
def test_shuffled_entries_give_the_same_charges(folder: Path, rng: random.Random) -> None:
    entries = entries_of(folder)
    rng.shuffle(entries)
    assert run_files([collection(entries)]) == baseline(folder)


@given(folder=st.sampled_from(FIXTURES), rng=st.randoms(use_true_random=False))
def test_equivalent_reference_forms_give_the_same_charges(folder: Path, rng: random.Random) -> None:
    assert run_files([collection(rewrite(entries_of(folder), rng))], LOCAL) == baseline(folder)


@given(folder=st.sampled_from(FIXTURES), rng=st.randoms(use_true_random=False))
def test_repeats_and_older_versions_give_the_same_charges(folder: Path, rng: random.Random) -> None:
    assert run_files([collection(with_repeats_and_older_versions(entries_of(folder), rng))]) == baseline(folder)


@given(folder=st.sampled_from(FIXTURES), rng=st.randoms(use_true_random=False), parts=st.integers(2, 4))
def test_an_input_split_into_files_gives_the_same_charges(folder: Path, rng: random.Random, parts: int) -> None:
    assert run_files(split(entries_of(folder), rng, parts)) == baseline(folder)


@pytest.mark.parametrize("folder", FIXTURES, ids=names(FIXTURES))
def test_every_fixture_survives_every_transformation(folder: Path) -> None:
    """All four at once, on every fixture, with a seed of its own: no fixture is left to chance."""
    rng = random.Random(folder.name)
    entries = with_repeats_and_older_versions(rewrite(entries_of(folder), rng), rng)
    rng.shuffle(entries)
    assert run_files(split(entries, rng, rng.randint(1, 3)), LOCAL) == baseline(folder)


# ---------------------------------------------------------------------------------------------- guards
def test_the_transformations_really_change_the_input() -> None:
    """Guard: each transformation produces other bytes, so the properties are not vacuous."""
    entries = entries_of(next(f for f in SCENARIOS if f.name.startswith("14-")))
    assert json.dumps(rewrite(entries, random.Random(3))) != json.dumps(entries)
    assert len(with_repeats_and_older_versions(entries, random.Random(3))) > len(entries)
    forms: set[str] = set()
    for seed in range(30):  # every form is drawn, the contained one included
        for entry in rewrite(entries_of(next(f for f in SCENARIOS if f.name.startswith("02-"))), random.Random(seed)):
            for ref in references_in(entry.get("resource")):
                forms.add("#" if ref.startswith("#") else "urn" if ref.startswith("urn:") else "absolute"
                          if ref.startswith("https:") else "versioned" if "/_history/" in ref else "relative")
    assert forms == {"#", "urn", "absolute", "versioned", "relative"}


def test_contained_is_used_only_where_it_is_the_same_resource() -> None:
    """A BodyStructure two Procedures share (one lesion) is never contained: that would make two lesions."""
    shared = entries_of(next(f for f in SCENARIOS if f.name.startswith("15-")))
    assert "BodyStructure/s15-bs-1" not in containable(shared)  # in s15-fna-1 and s15-fna-2
    assert containable(entries_of(next(f for f in SCENARIOS if f.name.startswith("02-"))))


OLDER_TYPES = ["Procedure", "BodyStructure", "Coverage", "Encounter", "Condition", "PractitionerRole",
               "Practitioner", "Patient", "Organization", "Location", "Account", "ServiceRequest",
               "ChargeItemDefinition"]


@pytest.mark.parametrize("kind", OLDER_TYPES)
def test_an_older_copy_of_every_resource_type_would_be_noticed(kind: str) -> None:
    """Guard: for every resource type, some fixture's answer changes when the older copy is the only copy, so
    the repeats property would see an older version of it winning."""
    for folder in SCENARIOS:
        entries = entries_of(folder)
        hit = [i for i, e in enumerate(entries) if e.get("resource", {}).get("resourceType") == kind]
        if not hit:
            continue
        changed = copy.deepcopy(entries)
        for i in hit:
            changed[i]["resource"] = older_copy(changed[i]["resource"], "2", "2099-01-01T00:00:00Z")
        if run_files([collection(changed)]) != baseline(folder):
            return
    pytest.fail(f"no fixture notices an older {kind} taking the place of the current one")


def test_an_older_version_read_last_never_wins() -> None:
    entries = entries_of(next(f for f in SCENARIOS if f.name.startswith("14-")))
    newest = copy.deepcopy(entries[-1]["resource"])
    newest["meta"] = {"versionId": "3"}
    sources = [SourcedResource(newest, "a"), SourcedResource(older_copy(newest, "2", "2099-01-01T00:00:00Z"), "b")]
    index = ResourceIndex.build(sources)
    assert index.get(f"{newest['resourceType']}/{newest['id']}") is newest
