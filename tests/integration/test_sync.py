"""`sync` against a real HAPI FHIR server: every fixture scenario written back exactly as the golden files say,
valid per HAPI's `$validate`, idempotent on re-run, reconciled after edits, and one rejected session never
stopping the others.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from adapter import conformance
from adapter.cli import cli
from adapter.client import FhirClient
from adapter.config import load_tables
from adapter.pipeline import process_paths
from adapter.sinks.ownership import payload
from adapter.sync import Syncer

from ..unit.test_lifecycle import corrections_sample
from ..unit.test_worklist import review_tasks_sample
from .helpers import namespaced, patients_of, server_now

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted(p for p in (ROOT / "fixtures/fhir/scenarios").iterdir() if (p / "input.json").exists())
TABLES = load_tables()
OURS = {"ChargeItem": TABLES.settings.charge_identifier_system, "Claim": TABLES.settings.claim_identifier_system}


def ours_on_server(client: FhirClient, kind: str, patients: list[str]) -> list[dict[str, Any]]:
    param = "subject" if kind == "ChargeItem" else "patient"
    return list(client.search_all(kind, {param: ",".join(patients), "identifier": f"{OURS[kind]}|", "_count": "500"}))


def strip(resource: dict[str, Any]) -> dict[str, Any]:
    """Without server-managed elements, the time of writing, the fingerprint of what was written (online only) and
    the identifier value (a hash of the namespaced ids)."""
    out = payload(resource)
    out["identifier"] = [{k: v for k, v in i.items() if k != "value"} for i in out.get("identifier", [])]
    return out


def canonical(resources: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(strip(r), sort_keys=True) for r in resources)


def identifiers(resources: list[dict[str, Any]]) -> list[str]:
    return sorted(r["identifier"][0]["value"] for r in resources)


@pytest.fixture(scope="module")
def loaded(client: FhirClient, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every scenario loaded under a fresh namespace (so a long-lived server can run this again), then one
    `charge-adapter sync --since <before the load>`."""
    ns = "g" + uuid.uuid4().hex[:6]
    since = server_now(client)
    inputs = tmp_path_factory.mktemp("scenarios")
    bundles = {}
    for folder in SCENARIOS:
        bundle = namespaced(folder.name.split("-")[0], ns)
        client.transaction(bundle)
        bundles[folder.name] = bundle
        (inputs / f"{folder.name}.json").write_text(json.dumps(bundle))
    result = CliRunner().invoke(cli, ["sync", "--server", client.base_url, "--since", since])
    return {"ns": ns, "since": since, "bundles": bundles, "result": result, "inputs": inputs}


def test_sync_writes_exactly_the_golden_output_of_every_scenario(client: FhirClient, loaded: dict[str, Any]) -> None:
    assert loaded["result"].exit_code == 1, loaded["result"].output  # scenarios with reviews exist
    assert "failed sessions 0" in loaded["result"].stdout
    for folder in SCENARIOS:
        text = re.sub(r"\b([sn]\d{2,3})-", rf"{loaded['ns']}-\1-", (folder / "output.json").read_text())
        golden = [e["resource"] for e in json.loads(text).get("entry", [])]
        offline = process_paths([loaded["inputs"] / f"{folder.name}.json"], TABLES)
        expected_ids = [r for s in offline.built.sessions for r in s.resources()]
        patients = patients_of(loaded["bundles"][folder.name])
        for kind in ("ChargeItem", "Claim"):
            on_server = [r for r in ours_on_server(client, kind, patients)
                         if r["status"] not in ("entered-in-error", "cancelled")]
            assert canonical(on_server) == canonical([g for g in golden if g["resourceType"] == kind]), (
                f"{folder.name}: {kind}s on the server differ from output.json")
            assert identifiers(on_server) == identifiers([r for r in expected_ids if r["resourceType"] == kind])


def test_every_written_resource_passes_hapi_validate(client: FhirClient, loaded: dict[str, Any]) -> None:
    patients = [p for b in loaded["bundles"].values() for p in patients_of(b)]
    written = ours_on_server(client, "ChargeItem", patients) + ours_on_server(client, "Claim", patients)
    assert len(written) > 60
    for resource in written:
        outcome = client.validate(resource)
        errors = [i for i in outcome.get("issue", []) if i.get("severity") in ("error", "fatal")]
        assert not errors, f"{resource['resourceType']}/{resource['id']}: {errors}"


def test_the_official_hl7_validator_finds_no_error_in_golden_or_synced_output(
        client: FhirClient, loaded: dict[str, Any], tmp_path: Path) -> None:
    """The HL7 FHIR Validator (R4 4.0.1, our conformance package loaded) on every golden output, on a sample of
    what sync wrote to HAPI, and on one broken ChargeItem that proves it really checks."""
    package = conformance.export(tmp_path / "package", TABLES.settings.canonical_base)
    golden = tmp_path / "golden"
    golden.mkdir()
    for folder in SCENARIOS:
        (golden / f"{folder.name}.json").write_text((folder / "output.json").read_text())
    patients = [p for b in loaded["bundles"].values() for p in patients_of(b)]
    written = ours_on_server(client, "ChargeItem", patients) + ours_on_server(client, "Claim", patients)
    sample = written[::3]
    assert len(sample) > 20
    synced = tmp_path / "synced.json"
    synced.write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                  "entry": [{"resource": r} for r in sample]}))
    broken = copy.deepcopy(sample[0] if sample[0]["resourceType"] == "ChargeItem" else written[0])
    broken.update(status="charged-twice", extension=[{"url": "http://fhir-charge-adapter.org/fhir/nowhere",
                                                       "valueString": "x"}])
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    lifecycle = corrections_sample()  # credits, replacement lines, replacement and void Claims
    lifecycle += review_tasks_sample()  # review items as Tasks, of every status and reason
    (tmp_path / "lifecycle.json").write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                                         "entry": [{"resource": r} for r in lifecycle]}))
    report = tmp_path / "report.json"
    run = subprocess.run(["bash", str(ROOT / "scripts/validator"), "run", "--report", str(report), "--ig",
                          str(package), str(golden), str(synced), str(tmp_path / "lifecycle.json"),
                          str(tmp_path / "broken.json")],
                         capture_output=True, text=True, timeout=1500, check=False)
    assert report.exists(), run.stdout + run.stderr
    result = json.loads(report.read_text())
    # a Bundle is validated entry by entry; an empty one (nothing coded) as itself
    assert result["resources"] == sum(len(json.loads(f.read_text()).get("entry", [])) or 1
                                      for f in golden.iterdir()) + len(sample) + len(lifecycle) + 1
    errors = [i for i in result["issues"] if i["severity"] in ("error", "fatal")]
    assert [e for e in errors if not e["file"].endswith("broken.json")] == []
    assert len([e for e in errors if e["file"].endswith("broken.json")]) >= 2  # bad status, unknown extension
    assert run.returncode == 1  # errors (the broken resource) make the launcher fail


def test_second_sync_writes_nothing_and_versions_stay(client: FhirClient, loaded: dict[str, Any]) -> None:
    patients = [p for b in loaded["bundles"].values() for p in patients_of(b)]
    before = {r["id"]: r["meta"]["versionId"] for r in ours_on_server(client, "ChargeItem", patients)}
    summary = Syncer(client, TABLES).sync(loaded["since"])
    assert summary.written == 0 and summary.voided == 0 and not summary.failures
    assert summary.unchanged > 60
    after = {r["id"]: r["meta"]["versionId"] for r in ours_on_server(client, "ChargeItem", patients)}
    assert after == before


def lines_on_server(client: FhirClient, patients: list[str]) -> list[tuple[str, str, float, str]]:
    out = []
    for item in ours_on_server(client, "ChargeItem", patients):
        mods = "-".join(e["valueCodeableConcept"]["coding"][0]["code"] for e in item.get("extension", [])
                        if e["url"] == TABLES.settings.modifier_extension)
        out.append((item["code"]["coding"][0]["code"] + (f"-{mods}" if mods else ""), item["status"],
                    item["quantity"]["value"], ",".join(s["reference"].split("/")[1] for s in item["service"])))
    return sorted(out)


def entry(bundle: dict[str, Any], rid: str) -> dict[str, Any]:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["id"] == rid)


def test_edits_after_billing_are_reconciled_never_deleted(client: FhirClient, fhir_ns: str) -> None:
    bundle = namespaced("11", fhir_ns)
    client.transaction(bundle)
    patients = patients_of(bundle)
    syncer = Syncer(client, TABLES)
    syncer.sync_patients(patients)
    p1, p2 = f"{fhir_ns}-s11-fna-1", f"{fhir_ns}-s11-fna-2"
    assert lines_on_server(client, patients) == [("10005", "billable", 1, p1), ("10006", "billable", 1, p1),
                                                 ("10007-59", "billable", 1, p2)]

    # the fluoroscopy Procedure was really ultrasound-guided: 10007-59 voided, the US add-on grows to 2 units
    fluoro = entry(bundle, p2)
    fluoro["extension"][0]["valueCodeableConcept"] = {"coding": [{"system": "http://snomed.info/sct",
                                                                  "code": "61593002"}]}
    client.update(fluoro)
    summary = syncer.sync_patients(patients)
    assert summary.voided == 1 and not summary.failures
    assert lines_on_server(client, patients) == [("10005", "billable", 1, p1), ("10006", "billable", 2, f"{p1},{p2}"),
                                                 ("10007-59", "entered-in-error", 1, p2)]
    claim = ours_on_server(client, "Claim", patients)
    assert len(claim) == 1 and [i["quantity"]["value"] for i in claim[0]["item"]] == [1, 2]

    # the second Procedure was entered in error: the add-on shrinks back to the first Procedure's lesion
    fluoro["status"] = "entered-in-error"
    client.update(fluoro)
    syncer.sync_patients(patients)
    assert lines_on_server(client, patients) == [("10005", "billable", 1, p1), ("10006", "billable", 1, p1),
                                                 ("10007-59", "entered-in-error", 1, p2)]
    assert [i["quantity"]["value"] for i in ours_on_server(client, "Claim", patients)[0]["item"]] == [1, 1]

    # a Procedure under review keeps the charges it had: nothing is changed until an analyst looks
    first = entry(bundle, p1)
    first["status"] = "stopped"
    client.update(first)
    held = syncer.sync_patients(patients)
    assert held.written == 0 and held.voided == 0 and held.protected >= 1
    assert {r.reason for r in held.reviews} == {"status-needs-review"}
    assert ("10005", "billable", 1, p1) in lines_on_server(client, patients)

    # corrected: the charges come back exactly, with no duplicate
    first["status"] = "completed"
    client.update(first)
    syncer.sync_patients(patients)
    items = ours_on_server(client, "ChargeItem", patients)
    assert len(items) == 3  # the same three identifiers, never a fourth resource
    assert sorted((i["code"]["coding"][0]["code"], i["status"]) for i in items) == [
        ("10005", "billable"), ("10006", "billable"), ("10007", "entered-in-error")]


def test_a_session_the_server_rejects_never_stops_the_others(client: FhirClient, fhir_ns: str) -> None:
    good = namespaced("01", fhir_ns)
    bad = namespaced("07", fhir_ns)
    # the performer given only by an NPI the server does not know: HAPI cannot resolve the ChargeItem's
    # performer reference and rejects that session's transaction
    proc = entry(bad, f"{fhir_ns}-s07-fna-1")
    proc["performer"] = [{"actor": {"type": "Practitioner", "identifier": {
        "system": "http://hl7.org/fhir/sid/us-npi", "value": f"9{fhir_ns}"}}}]
    client.transaction(good)
    client.transaction(bad)
    summary = Syncer(client, TABLES).sync_patients(patients_of(good) + patients_of(bad))
    assert [f.procedures for f in summary.failures] == [(f"Procedure/{fhir_ns}-s07-fna-1",)]
    assert "HTTP 404" in summary.failures[0].reason and "HAPI-1091" in summary.failures[0].reason
    assert lines_on_server(client, patients_of(good)) == [("10005", "billable", 1, f"{fhir_ns}-s01-fna-1")]
    assert lines_on_server(client, patients_of(bad)) == []


def test_dry_run_writes_nothing(client: FhirClient, fhir_ns: str) -> None:
    bundle = namespaced("02", fhir_ns)
    client.transaction(copy.deepcopy(bundle))
    summary = Syncer(client, TABLES, dry_run=True).sync_patients(patients_of(bundle))
    assert summary.lines == 2 and summary.written == 0
    assert lines_on_server(client, patients_of(bundle)) == []


def test_a_claim_waiting_for_a_diagnosis_still_writes_its_charge_items(client: FhirClient, fhir_ns: str) -> None:
    bundle = namespaced("83", fhir_ns)
    client.transaction(bundle)
    patients = patients_of(bundle)
    summary = Syncer(client, TABLES).sync_patients(patients)
    assert {(r.procedure, r.reason) for r in summary.reviews} == {(f"Procedure/{fhir_ns}-s83-fna-1",
                                                                  "missing-diagnosis")}
    assert summary.written == 2 and not summary.failures
    codes = sorted(c["code"]["coding"][0]["code"] for c in ours_on_server(client, "ChargeItem", patients))
    assert codes == ["10005", "10006"]
    assert ours_on_server(client, "Claim", patients) == []
    (outcome,) = summary.outcomes
    assert outcome.outcome == "review" and len(outcome.written) == 2  # the audit keeps what was written
    again = Syncer(client, TABLES).sync_patients(patients)
    assert again.written == 0 and again.unchanged == 2


def test_absolute_references_are_local_only_on_the_servers_own_base(client: FhirClient, fhir_ns: str) -> None:
    """HAPI refuses absolute references, so they arrive pushed (serve): on the server's base (any spelling of
    it) they name its resources; on another server's base the same ids are someone else's: review."""
    bundle = namespaced("01", fhir_ns)
    client.transaction(bundle)
    patients = patients_of(bundle)
    proc = entry(bundle, f"{fhir_ns}-s01-fna-1")
    proc["meta"] = {"versionId": "2"}  # newer than the server's copy (version 1), so the pushed copy is coded
    scheme, rest = client.base_url.split("://", 1)
    on_base = copy.deepcopy(proc)
    on_base["subject"] = {"reference": f"{scheme.upper()}://{rest}/{patients[0]}"}
    on_base["performer"][0]["actor"] = {"reference": f"{client.base_url}/{proc['performer'][0]['actor']['reference']}/"}
    coded = Syncer(client, TABLES, dry_run=True).sync_patients(patients, [on_base])
    assert not coded.reviews and coded.lines == 1
    assert [o.outcome for o in coded.outcomes] == ["coded"]
    elsewhere = copy.deepcopy(proc)
    elsewhere["subject"] = {"reference": f"https://other-hospital.example.org/fhir/{patients[0]}"}
    held = Syncer(client, TABLES, dry_run=True).sync_patients(patients, [elsewhere])
    assert [(r.procedure, r.reason) for r in held.reviews] == [(f"Procedure/{proc['id']}", "unresolved-reference")]
    assert "https://other-hospital.example.org/fhir/" in held.reviews[0].detail and held.lines == 0
    assert [(o.outcome, o.patient) for o in held.outcomes] == [("review", None)]  # never our patient's review


def test_a_duplicate_delivery_is_reported_online_as_dry_run_reports_it(client: FhirClient, fhir_ns: str,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    since = server_now(client)
    bundle = namespaced("56", fhir_ns)
    client.transaction(bundle)
    kept, duplicate = f"Procedure/{fhir_ns}-s56-fna-1", f"Procedure/{fhir_ns}-s56-fna-2"
    with caplog.at_level("INFO", logger="adapter.sync"):
        summary = Syncer(client, TABLES).sync_patients(patients_of(bundle))
    outcome = next(o for o in summary.outcomes if o.procedure == duplicate)
    assert (outcome.outcome, outcome.merged_into, outcome.audit_codes) == ("no-charge", kept, (f"duplicate-of {kept}",))
    assert outcome.session and outcome.session == next(o.session for o in summary.outcomes if o.procedure == kept)
    assert "1 duplicate(s)" in summary.text()
    assert any(duplicate in r.getMessage() and kept in r.getMessage() and "Patient/" not in r.getMessage()
               for r in caplog.records if r.levelname == "INFO")
    result = CliRunner().invoke(cli, ["sync", "--server", client.base_url, "--since", since, "--dry-run"])
    assert f"duplicate: {duplicate}: billed under {kept}" in result.stderr
    offline = CliRunner().invoke(cli, ["dry-run", str(next((ROOT / "fixtures/fhir/scenarios").glob("56-*")) /
                                                       "input.json")])
    assert "duplicate: Procedure/s56-fna-2: billed under Procedure/s56-fna-1" in offline.stderr  # the same words


def test_an_including_procedure_that_arrives_later_voids_the_fna_charge(client: FhirClient, fhir_ns: str) -> None:
    """Rule included-fna online: scenario 131 without its EBUS bills both FNAs; when the EBUS (CPT 31652, same
    session and provider as fna-1) arrives, fna-1 bills nothing and its charge is voided, fna-2's stays."""
    bundle = namespaced("131", fhir_ns)
    ebus = entry(bundle, f"{fhir_ns}-s131-ebus")
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["id"] != ebus["id"]]
    client.transaction(bundle)
    patients = patients_of(bundle)
    syncer = Syncer(client, TABLES)
    syncer.sync_patients(patients)
    fna1, fna2 = f"{fhir_ns}-s131-fna-1", f"{fhir_ns}-s131-fna-2"
    assert lines_on_server(client, patients) == [("10005", "billable", 1, fna1), ("10005", "billable", 1, fna2)]
    client.update(ebus)
    summary = syncer.sync_patients(patients)
    assert summary.voided >= 1 and not summary.failures and not summary.reviews
    assert lines_on_server(client, patients) == [("10005", "billable", 1, fna2), ("10005", "entered-in-error", 1, fna1)]
    outcome = next(o for o in summary.outcomes if o.procedure == f"Procedure/{fna1}")
    assert outcome.outcome == "no-charge"
