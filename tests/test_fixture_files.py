"""Checks on the hand-written FHIR fixtures themselves (not on the engine).

For every scenario in fixtures/fhir/scenarios/: input.json is a loadable transaction Bundle whose
resources validate against the FHIR R4B models (except resources marked invalid on purpose), ids are
unique across all fixtures, every reference resolves inside its bundle, and expected.json is complete and
consistent with its input. Every [scenario] named in docs/input-contract.md must have a directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fhir.resources.R4B import get_fhir_model_class

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "fhir"
SCENARIOS = FIXTURES / "scenarios"
NDJSON = FIXTURES / "ndjson"
INVALID = FIXTURES / "invalid"
CONTRACT = ROOT / "docs" / "input-contract.md"

FEEDS = FIXTURES / "feeds"
SCENARIO_DIRS = sorted(p for p in SCENARIOS.iterdir() if p.is_dir()) if SCENARIOS.is_dir() else []
FEED_DIRS = sorted(p for p in FEEDS.iterdir() if p.is_dir()) if FEEDS.is_dir() else []
"""Inputs that cannot be one HAPI transaction (history Bundles, NDJSON repeats, several files): offline only."""
# fixtures/fhir/ndjson/ is one scenario: *.ndjson files (one resource per line) + expected.json
NDJSON_DIRS = [NDJSON] if NDJSON.is_dir() else []

EXPECTED_KEYS = ("description", "exit_code", "lines", "claims", "reviews", "no_charge", "skipped", "warnings")
ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
DIR_RE = re.compile(r"^(\d{2,3})-([a-z0-9]+(?:-[a-z0-9]+)*)$")

SCT = "http://snomed.info/sct"
CPT = "http://www.ama-assn.org/go/cpt"
FNA_CODES = {
    (SCT, c) for c in ("48635004", "48426002", "387736007", "432337008", "432231006", "442865000", "81068001")
} | {(CPT, c) for c in ("10021", "10004", "10005", "10006", "10007", "10008", "10009", "10010", "10011", "10012")}
PRIMARY_OF_ADD_ON = {"10004": "10021", "10006": "10005", "10008": "10007", "10010": "10009", "10012": "10011"}
PRIMARIES = set(PRIMARY_OF_ADD_ON.values())
NEVER_EMIT = {"76942", "77002", "77012", "77021", "88172", "88173", "88177"}
NO_CHARGE_STATUSES = {"not-done", "preparation", "in-progress", "on-hold", "entered-in-error"}
REVIEW_REASONS = {
    "status-needs-review",
    "modality-conflict",
    "modality-missing",
    "invalid-resource",
    "missing-performer",
    "missing-performed-date",
    "lesion-modality-conflict",
    "core-biopsy-same-lesion",
    "mue-exceeded",
    "session-held",
    "unresolved-reference",
    "version-conflict",
    "ambiguous-performer",
    "session-ambiguous",
    "duplicate-conflict",
    "bilateral-site",
    "other-patient",
    "unknown-modifier-extension",
    "modifier-element",
    "unmapped-local-code",
    "no-row-for-date",
    "included-fna-distinct-site",
    "time-zone-conflict",
} | {"missing-diagnosis", "missing-payer", "missing-billing-provider", "missing-place-of-service", "missing-price"}
CLAIM_REVIEW_REASONS = {"missing-diagnosis", "missing-payer", "missing-billing-provider", "missing-place-of-service",
                        "missing-price"}
"""The ChargeItems of such a session are written; only its Claim waits."""
LINE_KEYS = {"code", "modifiers", "units", "procedures", "price"}
OPTIONAL_LINE_KEYS = {"definition", "account"}
CLAIM_KEYS = {"patient", "rendering", "billing_provider", "insurer", "place_of_service", "diagnoses", "items", "total"}
WARNING_CODES = {"no-coverage", "missing-price", "ambiguous-account"}
BILLING_SCENARIOS = range(80, 1000)
"""Numbers kept apart from 01-79 (numbered without gaps): billing scenarios (issue 10) and, 94-99, the gaps an
audit of issue 8 found; 100 and above: real-feed fidelity III (issue 18)."""
REAL_FEED_III_SCENARIOS = range(100, 200)
"""Issue 18 (real-feed fidelity III): 100-111 Bundle semantics, modifier elements and local codes; 130-149 included
FNAs, tables by date and time zones."""
INCLUDING_CODES = {(CPT, c) for c in ("43238", "43242", "43232", "45342", "45392", "31652", "31653", "31629",
                                      "31633")} | {(SCT, "1217420009")}
"""Procedure codes whose service already includes the FNA (rule included-fna), written here apart from config."""
EXT_TARGET = "http://hl7.org/fhir/StructureDefinition/procedure-targetBodyStructure"
EXT_BODYSITE = "http://hl7.org/fhir/StructureDefinition/bodySite"


# --------------------------------------------------------------------------------------------- helpers
def in_period(period: dict | None, day: str) -> bool:
    """Whether a Coverage period contains an ISO date, to the precision the period gives."""
    start, end = (period or {}).get("start", ""), (period or {}).get("end", "")
    return not (start and day[:len(start[:10])] < start[:10]) and not (end and day[:len(end[:10])] > end[:10])


def load_json(path: Path):
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def bundle_resources(scenario_dir: Path) -> list[dict]:
    return [e["resource"] for e in load_json(scenario_dir / "input.json")["entry"]]


def ndjson_resources(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def resources_of(fixture_dir: Path) -> list[dict]:
    if (fixture_dir / "input.json").exists():
        return bundle_resources(fixture_dir)
    return [r for f in sorted(fixture_dir.glob("*.ndjson")) for r in ndjson_resources(f)]


def index(resources: list[dict]) -> dict[str, dict]:
    return {f"{r['resourceType']}/{r['id']}": r for r in resources}


def normalise_reference(ref: str) -> str:
    """Type/id, after removing a server base and a /_history/n suffix (contract section 1)."""
    ref = re.sub(r"/_history/[^/]+$", "", ref)
    parts = ref.rstrip("/").split("/")
    return "/".join(parts[-2:])


def resolves(ref: str, res: dict, idx: dict[str, dict], full_urls: dict[str, str]) -> bool:
    """An independent check of the FHIR reference forms the fixtures use: Type/id (absolute or versioned),
    urn:uuid fullUrls, contained #id and conditional Type?identifier=system|value."""
    if ref.startswith("#"):
        return any(c.get("id") == ref[1:] for c in res.get("contained", []))
    if ref.startswith("urn:"):
        return ref in full_urls
    if "?identifier=" in ref:
        kind, ident = ref.split("?identifier=", 1)
        system, value = ident.split("|", 1)
        return any(r["resourceType"] == kind and {"system": system, "value": value} in
                   [{"system": i.get("system"), "value": i.get("value")} for i in r.get("identifier", [])]
                   for r in idx.values())
    return normalise_reference(ref) in idx


def target_of(ref: str, full_urls: dict[str, str]) -> str:
    return full_urls.get(ref, normalise_reference(ref))


def full_urls_of(sdir: Path) -> dict[str, str]:
    if not (sdir / "input.json").exists():
        return {}
    return {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in load_json(sdir / "input.json")["entry"] if "fullUrl" in e}


def references(node) -> list[str]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(references(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(references(item))
    return found


def codings(concept: dict | None) -> set[tuple[str, str]]:
    return {(c.get("system"), c.get("code")) for c in (concept or {}).get("coding", [])}


def _target(value: dict) -> str:
    """Type/id of a literal reference; `Type?identifier=system|value` of a logical one."""
    if "reference" in value:
        return normalise_reference(value["reference"])
    return f"{value.get('type')}?identifier={value['identifier'].get('system', '')}|{value['identifier']['value']}"


def body_structure_refs(proc: dict) -> set[str]:
    refs = {_target(e["valueReference"]) for e in proc.get("extension", []) if e.get("url") == EXT_TARGET}
    for site in proc.get("bodySite", []):
        refs |= {_target(e["valueReference"]) for e in site.get("extension", []) if e.get("url") == EXT_BODYSITE}
    return refs


def local_targets() -> dict[tuple[str, str], set[tuple[str, str]]]:
    """config/local-codes.json read independently: local (system, code) -> the targets of its used mappings."""
    path = ROOT / "config" / "local-codes.json"
    out: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for group in (load_json(path).get("group", []) if path.exists() else []):
        for element in group.get("element", []):
            for target in element.get("target", []):
                if target.get("equivalence") in ("equivalent", "equal", "wider", "subsumes"):
                    out.setdefault((group["source"], element["code"]), set()).add((group["target"], target["code"]))
    return out


LOCAL_TARGETS = local_targets()


def fna_codings(concept: dict | None) -> set[tuple[str, str]]:
    """The FNA codes of a Procedure.code, through the site's mapped local codes too (rule local-code)."""
    found = codings(concept)
    return (found | {t for c in found for t in LOCAL_TARGETS.get(c, set())}) & FNA_CODES


HTEST = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST"}


def is_test_data(proc: dict, idx: dict[str, dict]) -> bool:
    """meta.security HTEST on the Procedure or its subject (rule test-data: no charge)."""
    labelled = [proc, idx.get(proc.get("subject", {}).get("reference", ""), {})]
    return any({k: c.get(k) for k in HTEST} == HTEST for r in labelled for c in r.get("meta", {}).get("security", []))


def fixture_id(p: Path) -> str:
    return p.name


# ------------------------------------------------------------------------------------ directory layout
def test_there_are_enough_scenarios():
    assert len(SCENARIO_DIRS) >= 30


def test_scenario_directory_names_are_numbered_and_kebab_case():
    numbers = []
    for d in SCENARIO_DIRS:
        m = DIR_RE.match(d.name)
        assert m, f"bad scenario directory name {d.name!r}"
        numbers.append(int(m.group(1)))
        assert (d / "input.json").is_file(), d
        assert (d / "expected.json").is_file(), d
    # numbers are unique (ranges are shared out between engineers); 01-79 are numbered without gaps
    all_numbers = numbers + [int(DIR_RE.match(d.name).group(1)) for d in FEED_DIRS if DIR_RE.match(d.name)]
    assert len(all_numbers) == len(set(all_numbers)), "scenario numbers must be unique across scenarios/ and feeds/"
    coding = [n for n in numbers if n not in BILLING_SCENARIOS and n not in REAL_FEED_III_SCENARIOS]
    assert coding == list(range(1, len(coding) + 1)), "scenario numbers 01-79 must be 01, 02, ... without gaps"


def contract_scenario_names() -> set[str]:
    text = CONTRACT.read_text(encoding="utf-8")
    names: set[str] = set()
    # [name] or [a, b]; a bracket right after a word (performed[x]) is FHIR choice notation, not a scenario
    for group in re.findall(r"(?<![\w\]])\[([a-z0-9-]+(?:\s*,\s*[a-z0-9-]+)*)\](?!\()", text):
        names.update(n.strip() for n in group.split(","))
    return names


def test_every_contract_scenario_has_a_directory():
    names = contract_scenario_names()
    assert len(names) >= 20, f"suspiciously few scenario names parsed from the contract: {sorted(names)}"
    have = {DIR_RE.match(d.name).group(2) for d in SCENARIO_DIRS + FEED_DIRS if DIR_RE.match(d.name)}
    missing = sorted(names - have)
    assert not missing, f"scenarios named in docs/input-contract.md without a directory: {missing}"


# ------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("sdir", SCENARIO_DIRS, ids=fixture_id)
def test_input_is_a_put_transaction_bundle(sdir: Path):
    bundle = load_json(sdir / "input.json")
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "transaction"
    assert bundle["entry"], "empty bundle"
    for entry in bundle["entry"]:
        assert entry.get("fullUrl", "urn:uuid:").startswith("urn:uuid:"), "only urn:uuid fullUrls load into HAPI as is"
        res = entry["resource"]
        assert entry["request"] == {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"}


@pytest.mark.parametrize("sdir", SCENARIO_DIRS + NDJSON_DIRS, ids=fixture_id)
def test_resources_validate_against_r4b(sdir: Path):
    expected = load_json(sdir / "expected.json")
    invalid = set(expected.get("invalid_resources", []))
    resources = resources_of(sdir)
    for res in resources:
        key = f"{res['resourceType']}/{res['id']}"
        model = get_fhir_model_class(res["resourceType"])
        if key in invalid:
            with pytest.raises(ValueError):
                model.model_validate(res)
        else:
            model.model_validate(res)
    assert invalid <= set(index(resources)), "invalid_resources names a resource that is not in the input"
    if not invalid and (sdir / "input.json").exists():
        get_fhir_model_class("Bundle").model_validate(load_json(sdir / "input.json"))


@pytest.mark.parametrize("sdir", SCENARIO_DIRS + NDJSON_DIRS, ids=fixture_id)
def test_ids_are_well_formed_and_prefixed(sdir: Path):
    if (sdir / "input.json").exists():
        prefix = f"s{DIR_RE.match(sdir.name).group(1)}-"
    else:  # the NDJSON scenario: prefix from the file name, e.g. n02-us-three-lesions.ndjson -> n02-
        prefixes = {f.name.split("-")[0] + "-" for f in sdir.glob("*.ndjson")}
        assert len(prefixes) == 1, prefixes
        (prefix,) = prefixes
    for res in resources_of(sdir):
        rid = res.get("id", "")
        assert ID_RE.match(rid), f"bad id {rid!r}"
        assert not rid.isdigit(), f"purely numeric id {rid!r}"
        assert rid.startswith(prefix), f"id {rid!r} lacks the prefix {prefix!r}"


def feed_resources(fdir: Path) -> list[dict]:
    """Every resource of a feed fixture (every copy and version), DELETE entries left out."""
    out: list[dict] = []
    for f in sorted(fdir.iterdir()):
        if f.suffix == ".ndjson":
            out += ndjson_resources(f)
        elif f.suffix == ".json" and f.name != "expected.json":
            out += [_with_id(e) for e in load_json(f).get("entry", [])
                    if "resource" in e and (e.get("search") or {}).get("mode") != "outcome"]  # an outcome is no data
    return out


def _with_id(entry: dict) -> dict:
    """An entry's resource; one without an id is known by its `PUT Type/id` URL or its urn:uuid fullUrl (issue 18)."""
    res = entry["resource"]
    if "id" in res:
        return res
    url = (entry.get("request") or {}).get("url", "")
    if (entry.get("request") or {}).get("method") == "PUT" and "/" in url:
        return {**res, "id": url.split("/")[1]}
    assert entry.get("fullUrl", "").startswith("urn:uuid:"), "a resource without id needs a PUT URL or a fullUrl"
    return res


@pytest.mark.parametrize("fdir", FEED_DIRS, ids=fixture_id)
def test_feed_fixture_is_complete(fdir: Path):
    expected = load_json(fdir / "expected.json")
    for key in EXPECTED_KEYS:
        assert key in expected, f"expected.json lacks {key!r}"
    assert expected["exit_code"] == (1 if expected["reviews"] else 0)
    prefix = f"s{DIR_RE.match(fdir.name).group(1)}-"
    resources = feed_resources(fdir)
    assert resources
    for res in resources:
        assert res.get("id", prefix).startswith(prefix), res["id"]
        model = get_fhir_model_class(res["resourceType"])
        model.model_validate(res)
    assert len(fdir.name) > 3 and fdir.name in (FIXTURES / "README.md").read_text(encoding="utf-8")


def test_ids_are_unique_across_all_fixtures():
    seen: dict[str, str] = {}
    for d in FEED_DIRS:
        for rid in {r["id"] for r in feed_resources(d) if "id" in r}:
            assert rid not in seen, f"id {rid!r} used in {seen[rid]} and {d.name}"
            seen[rid] = d.name
    for d in SCENARIO_DIRS + NDJSON_DIRS:
        for res in resources_of(d):
            rid = res["id"]
            assert rid not in seen, f"id {rid!r} used in {seen[rid]} and {d.name}"
            seen[rid] = d.name


@pytest.mark.parametrize("sdir", SCENARIO_DIRS + NDJSON_DIRS, ids=fixture_id)
def test_every_reference_resolves_within_the_fixture(sdir: Path):
    """Except those expected.json lists under `unresolvable_references` (the unresolved-reference rule's own
    fixtures): each of those must be in the input and really resolve to nothing."""
    resources = resources_of(sdir)
    idx = index(resources)
    full_urls = full_urls_of(sdir)
    deliberate = set(load_json(sdir / "expected.json").get("unresolvable_references", []))
    seen: set[str] = set()
    for res in resources:
        for ref in references(res):
            if ref in deliberate:
                assert not resolves(ref, res, idx, full_urls), f"{ref} is listed as unresolvable but resolves"
                seen.add(ref)
                continue
            assert resolves(ref, res, idx, full_urls), f"{res['resourceType']}/{res['id']} -> {ref} does not resolve"
    assert seen == deliberate, f"unresolvable_references not in the input: {sorted(deliberate - seen)}"


@pytest.mark.parametrize("sdir", SCENARIO_DIRS, ids=fixture_id)
def test_coverage_is_active_with_payor_and_beneficiary(sdir: Path):
    idx = index(bundle_resources(sdir))
    full_urls = full_urls_of(sdir)
    for cov in (r for r in idx.values() if r["resourceType"] == "Coverage"):
        assert cov["status"] == "active"
        beneficiary = target_of(cov["beneficiary"]["reference"], full_urls)
        assert beneficiary.startswith("Patient/")
        payors = [target_of(p["reference"], full_urls) for p in cov["payor"]]
        if sdir.name == "80-no-payer":  # self-pay on purpose: the patient is the payor
            assert payors == [beneficiary]
        else:
            assert all(p.startswith("Organization/") for p in payors)


# --------------------------------------------------------------------------------- expected.json
@pytest.mark.parametrize("sdir", SCENARIO_DIRS + NDJSON_DIRS, ids=fixture_id)
def test_expected_is_complete_and_consistent(sdir: Path):
    expected = load_json(sdir / "expected.json")
    for key in EXPECTED_KEYS:
        assert key in expected, f"expected.json lacks {key!r}"
    assert isinstance(expected["description"], str) and expected["description"].strip()
    for key in EXPECTED_KEYS[2:]:
        assert isinstance(expected[key], list), key

    idx = index(resources_of(sdir))
    procedures = {r["id"]: r for r in idx.values() if r["resourceType"] == "Procedure"}

    # exit code follows the reviews
    assert expected["exit_code"] == (1 if expected["reviews"] else 0)

    # lines
    seen_codes: list[str] = []
    for ln in expected["lines"]:
        assert LINE_KEYS <= set(ln) <= LINE_KEYS | OPTIONAL_LINE_KEYS, ln
        assert ln["price"] is None or ln["price"] > 0
        code = ln["code"]
        assert code in PRIMARIES or code in PRIMARY_OF_ADD_ON, f"not an FNA CPT code: {code}"
        assert code not in NEVER_EMIT
        assert isinstance(ln["units"], int) and ln["units"] >= 1
        assert set(ln["modifiers"]) <= {"59", "XS"}
        if code in PRIMARIES:
            assert ln["units"] == 1, "a primary code is never billed with more than one unit"
        else:
            assert ln["modifiers"] == [], "add-on codes never carry 59"
            assert PRIMARY_OF_ADD_ON[code] in seen_codes, f"add-on {code} without its primary before it"
        seen_codes.append(code)
        assert ln["procedures"] and ln["procedures"] == sorted(set(ln["procedures"]))
        for pid in ln["procedures"]:
            proc = procedures[pid]
            assert proc["status"] == "completed"
            assert fna_codings(proc["code"])

    # reviews / no_charge / skipped name existing Procedures, once each
    review_ids = [r["procedure"] for r in expected["reviews"]]
    assert review_ids == sorted(review_ids)
    for rv in expected["reviews"]:
        assert set(rv) == {"procedure", "reason"}
        assert rv["reason"] in REVIEW_REASONS, rv
        assert rv["procedure"] in procedures
        if rv["reason"] == "status-needs-review":
            assert procedures[rv["procedure"]]["status"] in {"stopped", "unknown"}
    assert expected["no_charge"] == sorted(expected["no_charge"])
    for pid in expected["no_charge"]:
        assert procedures[pid]["status"] in NO_CHARGE_STATUSES or is_test_data(procedures[pid], idx)
    assert expected["skipped"] == sorted(expected["skipped"])
    for pid in expected["skipped"]:
        assert not fna_codings(procedures[pid]["code"]), f"{pid} is an FNA, it cannot be skipped"
    line_ids = {pid for ln in expected["lines"] for pid in ln["procedures"]}
    merged = expected.get("merged", [])
    for m in merged:
        assert set(m) == {"procedure", "into", "reason"} and m["reason"] in ("duplicate", "part-of"), m
        assert m["procedure"] in procedures and m["into"] in procedures and m["into"] != m["procedure"]
        assert codings(procedures[m["procedure"]]["code"]) & FNA_CODES
    included = expected.get("included", [])
    for inc in included:  # an FNA whose service another procedure's code (or its own) already includes
        assert set(inc) == {"procedure", "in"}, inc
        assert procedures[inc["procedure"]]["status"] == "completed"
        assert codings(procedures[inc["procedure"]]["code"]) & FNA_CODES
        assert codings(procedures[inc["in"]]["code"]) & INCLUDING_CODES
    coding_reviews = {r["procedure"] for r in expected["reviews"] if r["reason"] not in CLAIM_REVIEW_REASONS}
    buckets = [coding_reviews, set(expected["no_charge"]), set(expected["skipped"]), line_ids,
               {m["procedure"] for m in merged}, {i["procedure"] for i in included}]
    assert len({(r["procedure"], r["reason"]) for r in expected["reviews"]}) == len(review_ids)
    for i, a in enumerate(buckets):
        for b in buckets[i + 1 :]:
            assert not (a & b), f"a Procedure is in two outcome lists: {sorted(a & b)}"

    # every Procedure has an outcome; the only exception is one whose lesions all belong to a coded
    # Procedure of the same session (same BodyStructure counted once)
    accounted = set().union(*buckets, review_ids)
    covered_lesions = set().union(*(body_structure_refs(procedures[p]) for p in line_ids)) if line_ids else set()
    for pid, proc in procedures.items():
        if pid in accounted:
            continue
        lesions = body_structure_refs(proc)
        assert lesions and lesions <= covered_lesions, f"Procedure {pid} has no outcome in expected.json"

    # warnings
    for w in expected["warnings"]:
        assert w["code"] in WARNING_CODES
        assert w["patient"] in idx
    full_urls = full_urls_of(sdir)
    days_of: dict[str, set[str]] = {}  # patient -> the dates of its Procedures
    for proc in procedures.values():
        when = proc.get("performedDateTime") or (proc.get("performedPeriod") or {}).get("start")
        if when and "reference" in proc.get("subject", {}):
            days_of.setdefault(target_of(proc["subject"]["reference"], full_urls), set()).add(when[:10])
    # a Coverage counts on the dates its period contains (contract section 8, [coverage-period])
    patients_with_coverage = {
        target_of(r["beneficiary"]["reference"], full_urls) for r in idx.values() if r["resourceType"] == "Coverage"
        and any(in_period(r.get("period"), day)
                for day in days_of.get(target_of(r["beneficiary"]["reference"], full_urls), set()))
    }
    for w in expected["warnings"]:
        if w["code"] == "no-coverage":
            assert w["patient"] not in patients_with_coverage

    # claims: one per coded session with Coverage, items in line order
    items = []
    for claim in expected["claims"]:
        assert CLAIM_KEYS <= set(claim) <= CLAIM_KEYS | {"referral"}, claim
        assert claim["patient"] in patients_with_coverage
        assert claim["rendering"] in idx and claim["rendering"].startswith(("Practitioner/", "PractitionerRole/"))
        assert claim["billing_provider"] in idx or re.fullmatch(r"NPI \d{10}", claim["billing_provider"])
        assert claim["insurer"] in idx
        assert claim["diagnoses"] and len(claim["diagnoses"]) <= 12
        assert claim["items"]
        for _code, _mods, units, pointers, price in claim["items"]:
            assert 1 <= len(pointers) <= 4 and all(1 <= p <= len(claim["diagnoses"]) for p in pointers)
            if price is not None and claim["total"] is not None:
                assert price > 0 and units >= 1
        if all(i[4] is not None for i in claim["items"]):
            assert claim["total"] == sum(i[2] * i[4] for i in claim["items"])
        items.extend(claim["items"])
    warned = {w["patient"] for w in expected["warnings"] if w["code"] == "no-coverage"}
    assert not warned & {claim["patient"] for claim in expected["claims"]}
    held = {r["procedure"] for r in expected["reviews"] if r["reason"] in CLAIM_REVIEW_REASONS}
    if not warned and not held:
        assert [i[:3] for i in items] == [[ln["code"], ln["modifiers"], ln["units"]] for ln in expected["lines"]]


# ------------------------------------------------------------------------------------------- NDJSON
@pytest.mark.parametrize("ndir", NDJSON_DIRS, ids=fixture_id)
def test_ndjson_is_one_resource_per_line(ndir: Path):
    files = sorted(ndir.glob("*.ndjson"))
    assert files, f"no .ndjson file in {ndir}"
    for f in files:
        lines = f.read_text(encoding="utf-8").splitlines()
        assert lines
        for n, line in enumerate(lines, start=1):
            res = json.loads(line)
            assert isinstance(res, dict) and "resourceType" in res, f"{f.name} line {n}"


def test_there_is_an_ndjson_fixture():
    assert NDJSON_DIRS, "fixtures/fhir/ndjson/ must hold at least one scenario"


# ------------------------------------------------------------------------------------- invalid files
def test_invalid_files_are_documented_and_really_broken():
    readme = (INVALID / "README.md").read_text(encoding="utf-8")
    files = sorted(p.name for p in INVALID.iterdir() if p.name != "README.md")
    assert set(files) >= {"not-json.json", "not-fhir.json", "bad-line.ndjson", "empty.json"}
    for name in files:
        assert f"`{name}`" in readme, f"{name} is not described in invalid/README.md"

    with pytest.raises(json.JSONDecodeError):
        load_json(INVALID / "not-json.json")

    not_fhir = load_json(INVALID / "not-fhir.json")
    assert isinstance(not_fhir, dict) and "resourceType" not in not_fhir

    assert (INVALID / "empty.json").stat().st_size == 0

    lines = (INVALID / "bad-line.ndjson").read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 3
    for line in lines[:2]:
        res = json.loads(line)
        get_fhir_model_class(res["resourceType"]).model_validate(res)
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[2])
