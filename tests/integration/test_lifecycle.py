"""A charge's life after it is written, on a real HAPI server with `charge-adapter` as its own process: a billing
system marks lines `billed`, a coder edits one, a payer answers the Claim; every re-code path leaves them as they
are; a correction after billing posts credits and replacements (and the HL7 v2 reversal and replacement); a
server that lost its charges is found by `reconcile` and repaired, and re-billed by a restarted `run`; kill -9
in the middle of corrections leaves the books balanced.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests

from adapter.client import FhirClient
from adapter.extraction.index import seen_version
from adapter.hl7v2.messages import validate
from adapter.pipeline import process
from adapter.sinks.ownership import stamped
from adapter.sources.files import SourcedResource
from adapter.state.base import NewReview, ReviewKind
from adapter.state.sqlite import SqliteState

from .adapter_process import TABLES, Adapter, charges, notify_put
from .helpers import namespaced, patients_of, resources_of, server_now, wait_for

CLAIM_SYSTEM = TABLES.settings.claim_identifier_system
MODIFIER = TABLES.settings.modifier_extension


def claims(client: FhirClient, patients: list[str]) -> list[dict[str, Any]]:
    return list(client.search_all("Claim", {"patient": ",".join(patients), "identifier": f"{CLAIM_SYSTEM}|",
                                            "_count": "500"}, via_post=True))


def versions(client: FhirClient, patients: list[str]) -> dict[str, str]:
    return {f"{r['resourceType']}/{r['id']}": r["meta"]["versionId"]
            for r in [*charges(client, patients), *claims(client, patients)]}


def code_of(item: dict[str, Any]) -> str:
    mods = [e["valueCodeableConcept"]["coding"][0]["code"] for e in item.get("extension", []) if e["url"] == MODIFIER]
    return "-".join([item["code"]["coding"][0]["code"], *mods])


def net_units(client: FhirClient, patients: list[str]) -> Counter[tuple[str, str]]:
    """(patient, code with modifiers) -> units over the live lines: originals, credits and replacements."""
    net: Counter[tuple[str, str]] = Counter()
    for item in charges(client, patients):
        if item["status"] != "entered-in-error":
            net[(item["subject"]["reference"], code_of(item))] += item["quantity"]["value"]
    return +net


def coded_units(resources: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    report = process([SourcedResource(r, "test") for r in resources], TABLES)
    return +Counter({(ln.session.patient, "-".join([ln.code, *ln.modifiers])): ln.units
                     for ln in report.coding.lines})


def bill(client: FhirClient, items: list[dict[str, Any]]) -> None:
    """What a billing system does once it has posted a line: PUT it back `billed`."""
    for item in items:
        client.update({**{k: v for k, v in item.items() if k != "meta"}, "status": "billed"})


def answer(client: FhirClient, claim: dict[str, Any]) -> None:
    """What a payer's answer looks like on the server: a ClaimResponse whose request is the Claim."""
    client.create({"resourceType": "ClaimResponse", "status": "active", "type": claim["type"], "use": "claim",
                   "patient": claim["patient"], "created": "2026-12-01T00:00:00Z", "insurer": claim["insurer"],
                   "request": {"reference": f"Claim/{claim['id']}"}, "outcome": "complete"})


def with_a_lesion_more(client: FhirClient, bundle: dict[str, Any], procedure_id: str) -> list[dict[str, Any]]:
    """A new BodyStructure targeted by `procedure_id` (written to the server); the resources as they now stand."""
    resources = copy.deepcopy(resources_of(bundle))
    proc = next(r for r in resources if r["id"] == procedure_id)
    model = next(r for r in resources if r["resourceType"] == "BodyStructure")
    lesion = {**copy.deepcopy(model), "id": f"{procedure_id}-extra"}
    client.update(lesion)
    proc["extension"].append({"url": "http://hl7.org/fhir/StructureDefinition/procedure-targetBodyStructure",
                              "valueReference": {"reference": f"BodyStructure/{lesion['id']}"}})
    client.update(proc)
    return [*resources, lesion]


def test_billed_and_edited_lines_are_left_alone_by_every_recode_path_and_corrections_are_credits(
        client: FhirClient, hapi_url: str, tmp_path: Path, fhir_ns: str) -> None:
    since = server_now(client)
    bundle = namespaced("11", fhir_ns)  # 10005, 10006 (fna-1), 10007-59 (fna-2), and a Claim
    client.transaction(bundle)
    patients = patients_of(resources_of(bundle))
    outbox = tmp_path / "outbox"
    (tmp_path / "run").mkdir()
    (tmp_path / "serve").mkdir()
    runner = Adapter(tmp_path / "run", hapi_url, poll={"overlap_seconds": 0},  # only this test's Procedures
                     sinks={"hl7v2": {"enabled": True, "transport": "file", "folder": str(outbox)}})
    runner.start_cursor_at(since)
    first = runner.cmd("run", "--once")
    assert first.returncode == 0, first.stderr
    items = sorted(charges(client, patients), key=code_of)
    assert [code_of(i) for i in items] == ["10005", "10006", "10007-59"]

    # billing posts 10005 and 10006; a coder corrects 10007-59's note; the payer answers the Claim
    bill(client, items[:2])
    edited = {k: v for k, v in items[2].items() if k != "meta"}
    client.update({**edited, "note": [{"text": "reviewed by coding"}]})
    claim = claims(client, patients)[0]
    answer(client, claim)
    before = versions(client, patients)

    # every re-code path: sync --since, run (after a Procedure edit that changes no line), serve (a
    # notification), review replay, backfill --write
    synced = runner.cmd("sync", "--since", since)
    assert synced.returncode == 0, synced.stderr
    assert "written 0" in synced.stdout and "edited on the server and kept 1" in synced.stdout, synced.stdout
    assert versions(client, patients) == before

    fna1 = next(r for r in resources_of(bundle) if r["id"] == f"{fhir_ns}-s11-fna-1")
    client.update({**fna1, "note": [{"text": "no complications"}]})
    rerun = runner.cmd("run", "--once")
    assert rerun.returncode == 0 and "written 0" in rerun.stderr, rerun.stderr
    assert versions(client, patients) == before

    serving = Adapter(tmp_path / "serve", hapi_url)
    serving.start("serve")
    serving.wait_healthy()
    proc = client.read("Procedure", fna1["id"])
    assert notify_put(serving, proc).status_code in (200, 202)
    wait_for(lambda: SqliteState(serving.state).seen(f"Procedure/{proc['id']}", seen_version(proc)), 60,
             "the notification coded")
    serving.stop_all()
    assert versions(client, patients) == before

    state = SqliteState(runner.state)
    state.open_review(NewReview(f"Procedure/{fna1['id']}", ReviewKind.NEEDS_REVIEW, "modality-missing", "test",
                                (patients[0],)))
    review_id = str(state.reviews()[0].id)
    state.close()
    replayed = runner.cmd("review", "replay", review_id)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert versions(client, patients) == before

    export = tmp_path / "export"
    export.mkdir()
    (export / "all.ndjson").write_text("".join(json.dumps(client.read(r["resourceType"], r["id"])) + "\n"
                                               for r in resources_of(bundle)))
    backfilled = runner.cmd("backfill", str(export), "--server", hapi_url, "--write", "--out", str(tmp_path / "o"))
    assert backfilled.returncode == 0, backfilled.stderr
    assert versions(client, patients) == before

    # a lesion added to the billed session: the billed lines keep their version; 10006 gets a credit and its
    # replacement; the answered Claim a replacement Claim (frequency 7); net units equal the new coding
    sent_before = len(list(outbox.iterdir()))
    now = with_a_lesion_more(client, bundle, fna1["id"])
    corrected = runner.cmd("run", "--once")
    assert corrected.returncode == 0, corrected.stderr
    after = versions(client, patients)
    assert all(after[ref] == version for ref, version in before.items()), "nothing that passed on changed"
    assert net_units(client, patients) == coded_units(now) == Counter(
        {(patients[0], "10005"): 1, (patients[0], "10006"): 2, (patients[0], "10007-59"): 1})
    credit = next(i for i in charges(client, patients) if i["quantity"]["value"] < 0)
    assert code_of(credit) == "10006" and credit["quantity"]["value"] == -1 and credit["status"] == "billable"
    assert credit["extension"][-2]["valueReference"]["reference"] == f"ChargeItem/{items[1]['id']}"
    replacements = [c for c in claims(client, patients) if c["id"] != claim["id"]]
    assert len(replacements) == 1 and replacements[0]["related"][0]["claim"]["reference"] == f"Claim/{claim['id']}"
    assert "credited 1" in corrected.stderr, corrected.stderr
    # the DFT path: a reversal (FT1-6 CD) of the 10006 line as sent, then its replacement (CG)
    texts = [p.read_bytes().decode() for p in sorted(outbox.iterdir(), key=lambda p: p.stat().st_mtime_ns)]
    for text in texts:
        validate(text, TABLES.hl7v2.version)
    kinds = [[(f[6], f[25].split("^")[0], f[10]) for f in (seg.split("|") for seg in text.split("\r"))
              if f[0] == "FT1"] for text in texts[sent_before:]]
    assert kinds == [[("CD", "10006", "-1")], [("CG", "10006", "2")]], kinds
    again = runner.cmd("run", "--once")
    assert again.returncode == 0 and versions(client, patients) == after


def test_a_server_that_lost_its_charges_is_found_by_reconcile_and_repaired(
        client: FhirClient, hapi_url: str, tmp_path: Path, fhir_ns: str) -> None:
    since = server_now(client)
    bundle = namespaced("13", fhir_ns)  # 10009, 10005-59, 10011-59 and a Claim
    client.transaction(bundle)
    patients = patients_of(resources_of(bundle))
    runner = Adapter(tmp_path, hapi_url)
    assert runner.cmd("sync", "--since", since).returncode == 0
    expected = Counter(c["identifier"][0]["value"] for c in charges(client, patients))
    clean = runner.cmd("reconcile", "--since", since)
    assert clean.returncode == 0 and re.search(r"^missing\s+0$", clean.stdout, re.M), clean.stdout

    lost = sorted(charges(client, patients), key=lambda c: c["id"])[:2]
    for item in lost:
        client.delete("ChargeItem", item["id"])
    found = runner.cmd("reconcile", "--since", since, "--format", "json")
    assert found.returncode == 1, found.stdout + found.stderr
    drift = json.loads(found.stdout)
    assert drift["drift"]["missing"] == 2 and sum(drift["drift"].values()) == 2
    named = {i["resource"].rsplit("|", 1)[1] for i in drift["items"]}
    assert named == {i["identifier"][0]["value"] for i in lost}
    assert len(charges(client, patients)) == 1  # without --repair nothing is written

    repaired = runner.cmd("reconcile", "--since", since, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert Counter(c["identifier"][0]["value"] for c in charges(client, patients)) == expected
    assert runner.cmd("reconcile", "--since", since).returncode == 0


def test_a_restarted_run_rebills_what_a_restored_server_lost_exactly_once(
        client: FhirClient, hapi_url: str, tmp_path: Path, fhir_ns: str) -> None:
    runner = Adapter(tmp_path, hapi_url, poll={"overlap_seconds": 0})
    runner.start_cursor_at(server_now(client))
    bundle = namespaced("11", fhir_ns)
    client.transaction(bundle)
    patients = patients_of(resources_of(bundle))
    proc = runner.start("run")
    wait_for(lambda: len(charges(client, patients)) == 3, 120, "the charges written")
    expected = Counter(c["identifier"][0]["value"] for c in charges(client, patients))
    proc.terminate()
    proc.wait(60)
    for item in charges(client, patients):  # the server is restored from a backup taken before the charges
        client.delete("ChargeItem", item["id"])
    for claim in claims(client, patients):
        client.delete("Claim", claim["id"])
    runner.start("run")
    wait_for(lambda: len(charges(client, patients)) == 3 and len(claims(client, patients)) == 1, 120,
             "the lost charges written again")
    time.sleep(2)  # a poll or two more: nothing is written twice
    assert Counter(c["identifier"][0]["value"] for c in charges(client, patients)) == expected
    metrics = requests.get(f"{runner.url}/metrics", timeout=5).text
    assert re.search(r'charge_adapter_drift_total\{kind="missing"\} 4', metrics), metrics
    runner.stop_all()


@pytest.mark.bulk
def test_kill_9_in_the_middle_of_corrections_leaves_every_patient_balanced(
        client: FhirClient, hapi_url: str, tmp_path: Path, fhir_ns: str) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from generate import generate, put_all

    resources = list(generate(120, prefix=f"{fhir_ns}c"))
    patients = patients_of(resources)
    runner = Adapter(tmp_path, hapi_url, poll={"reconcile_every_seconds": 0, "overlap_seconds": 0})
    since = server_now(client)
    put_all(client, resources)
    assert runner.cmd("sync", "--since", since).returncode == 0
    bill(client, [c for c in charges(client, patients) if c["status"] == "billable"])
    billed = {c["id"]: c["meta"]["versionId"] for c in charges(client, patients)}

    # every Procedure with two or more lesions loses its last one: its add-on line shrinks (credit + replacement)
    runner.start_cursor_at(server_now(client))
    changed = []
    for res in resources:
        targets = [e for e in res.get("extension", []) if e["url"].endswith("procedure-targetBodyStructure")]
        if res["resourceType"] == "Procedure" and len(targets) >= 2:
            res["extension"] = [e for e in res["extension"] if e is not targets[-1]]
            changed.append(res)
    put_all(client, changed)
    assert len(changed) >= 10
    for threshold in (5, 15):
        proc = runner.start("run")
        store = SqliteState(runner.state)
        wait_for(lambda t=threshold, s=store: s.counts()["processed"] >= t, 180, "some corrections coded", 0.05)
        proc.kill()
        proc.wait(30)
        store.close()
    assert runner.cmd("run", "--once").returncode == 0
    assert net_units(client, patients) == coded_units(resources)
    on_server = charges(client, patients)
    assert Counter(c["identifier"][0]["value"] for c in on_server).most_common(1)[0][1] == 1  # nothing twice
    assert {c["id"]: c["meta"]["versionId"] for c in on_server if c["id"] in billed} == billed
    credits = [c for c in on_server if c["quantity"]["value"] < 0]
    assert len(credits) >= len(changed) // 2
    runner.cmd("run", "--once")
    assert len(charges(client, patients)) == len(on_server)  # settled: a further pass writes nothing


def test_claims_written_before_the_contained_billing_provider_are_left_alone(
        client: FhirClient, hapi_url: str, tmp_path: Path, fhir_ns: str) -> None:
    """Claims as the release before wrote them (Claim.provider a logical reference, nothing contained), one
    answered by a payer and one still ours: a sync of the same coding writes neither (docs/output.md)."""
    since = server_now(client)
    bundle = namespaced("17", fhir_ns)  # two sessions (two days), two Claims
    client.transaction(bundle)
    patients = patients_of(resources_of(bundle))
    runner = Adapter(tmp_path, hapi_url)
    assert runner.cmd("sync", "--since", since).returncode == 0
    written = claims(client, patients)
    assert len(written) == 2 and all(c["contained"][0]["id"] == "billing-provider" for c in written)
    for claim in written:  # HAPI kept the contained Organization and its local reference as written
        assert claim["provider"]["reference"] == "#billing-provider"
        old = {k: v for k, v in claim.items() if k not in ("contained", "meta")}
        old["provider"] = {k: v for k, v in claim["provider"].items() if k != "reference"}
        client.update(stamped(old, TABLES.settings.fingerprint_extension))
    answer(client, written[0])
    before = versions(client, patients)
    again = runner.cmd("sync", "--since", since)
    assert again.returncode == 0, again.stdout + again.stderr
    assert versions(client, patients) == before
    assert all("contained" not in c for c in claims(client, patients))
