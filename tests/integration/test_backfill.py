"""`backfill --server` against real HAPI: its Bulk Data $export (kick-off, polling, NDJSON from Binary resources)
feeds the streaming path, and the output is byte for byte what `dry-run` prints for the same resources read
back from the server with ordinary searches; `--write` writes those charges once, and a second run writes
nothing. Each test's resources carry a tag of its own namespace and the export is filtered by it, so other
tests' data on the same server never enters the comparison."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adapter.client import FhirClient
from tests import logscan

from .helpers import namespaced, resources_of

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from generate import generate, put_all  # noqa: E402

TAG_SYSTEM = "urn:fhir-charge-adapter:test-namespace"
CLOCK = "2026-04-01T12:00:00Z"
TYPES = ("Patient", "Practitioner", "Organization", "Coverage", "Encounter", "BodyStructure", "Procedure",
         "Condition", "Location", "PractitionerRole")


def charge_adapter(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "adapter", *args], capture_output=True, text=True, check=False,
                            timeout=900)
    logscan.add_text(f"charge-adapter {' '.join(args[:2])} (stderr)", result.stderr)
    return result


def tagged(resources: list[dict[str, Any]], ns: str) -> list[dict[str, Any]]:
    for resource in resources:
        resource.setdefault("meta", {})["tag"] = [{"system": TAG_SYSTEM, "code": ns}]
    return resources


def export_options(ns: str) -> list[str]:
    filters = [f"--type-filter={kind}?_tag={TAG_SYSTEM}|{ns}" for kind in TYPES]
    return ["--types", ",".join(TYPES), *filters, "--poll-max-wait", "1", "--export-timeout", "300"]


@pytest.fixture(scope="module", autouse=True)
def _export_enabled(client: FhirClient) -> None:
    """Our launcher registers $export since issue 11; a server still running from an older build lacks it."""
    rests = client.capabilities(refresh=True).get("rest") or []
    names = {o.get("name") for r in rests for o in r.get("operation") or []}
    if "export" not in names:
        pytest.fail(f"the HAPI server at {client.base_url} has no $export: it was started from a launcher built "
                    "before Bulk Data export was enabled; restart it (scripts/hapi stop; scripts/hapi start)",
                    pytrace=False)


@pytest.fixture
def population(client: FhirClient, fhir_ns: str) -> list[dict[str, Any]]:
    """A generated population (several patients, sessions of 1-3 Procedures) and two scenarios, under `fhir_ns`."""
    resources = tagged(list(generate(40, prefix=f"{fhir_ns}-g", seed=3)), fhir_ns)
    put_all(client, resources)
    for scenario in ("11", "34"):  # three lesions under two modalities; a Procedure without a subject (review)
        bundle = namespaced(scenario, fhir_ns)
        tagged(resources_of(bundle), fhir_ns)
        client.transaction(bundle)
    return resources


def read_back(client: FhirClient, ns: str, folder: Path) -> Path:
    """The namespace's resources as ordinary searches return them, one NDJSON file."""
    path = folder / "read-back.ndjson"
    with path.open("w", encoding="utf-8") as out:
        for kind in TYPES:
            for resource in client.search_all(kind, {"_tag": f"{TAG_SYSTEM}|{ns}", "_count": "500"}):
                out.write(json.dumps(resource) + "\n")
    return path


def test_backfill_from_the_servers_export_prints_what_dry_run_prints_for_the_same_resources(
        hapi_url: str, client: FhirClient, fhir_ns: str, population: list[dict[str, Any]], tmp_path: Path) -> None:
    exported = tmp_path / "export"
    backfill = charge_adapter("backfill", "--server", hapi_url, "--now", CLOCK, "--download-dir", str(exported),
                              *export_options(fhir_ns))
    assert "export done:" in backfill.stderr, backfill.stderr
    dry_run = charge_adapter("dry-run", "--no-stream", "--now", CLOCK, str(read_back(client, fhir_ns, tmp_path)))
    assert backfill.returncode == dry_run.returncode == 1, backfill.stderr  # scenario 34 needs review
    assert backfill.stdout == dry_run.stdout
    assert backfill.stderr.splitlines()[-1] == dry_run.stderr.splitlines()[-1]  # the summary line
    bundle = json.loads(backfill.stdout)
    procedures = [r for r in population if r["resourceType"] == "Procedure"]
    billed = {s["reference"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ChargeItem"
              for s in e["resource"]["service"]}
    assert {f"Procedure/{p['id']}" for p in procedures} <= billed
    assert f"review: Procedure/{fhir_ns}-s34-fna-bad" in backfill.stderr
    # the export's files are kept where asked, and coding them again gives the same bytes
    again = charge_adapter("backfill", "--now", CLOCK, str(exported))
    assert again.stdout == backfill.stdout and again.returncode == backfill.returncode


def test_backfill_write_writes_each_charge_once(hapi_url: str, client: FhirClient, fhir_ns: str,
                                                population: list[dict[str, Any]], tmp_path: Path) -> None:
    first = charge_adapter("backfill", "--server", hapi_url, "--write", "--compact", "--out", str(tmp_path / "a.json"),
                           *export_options(fhir_ns))
    assert first.returncode == 1, first.stderr  # the review of scenario 34; everything else written
    wanted = json.loads((tmp_path / "a.json").read_text())["entry"]
    patients = sorted({e["resource"].get("subject", e["resource"].get("patient"))["reference"] for e in wanted})
    on_server = [r for kind, param in (("ChargeItem", "subject"), ("Claim", "patient"))
                 for r in client.search_all(kind, {param: ",".join(patients), "_count": "500"})]
    assert sorted(r["identifier"][0]["value"] for r in on_server) == \
        sorted(e["resource"]["identifier"][0]["value"] for e in wanted)
    assert f"written {len(wanted)}, unchanged 0" in first.stderr
    second = charge_adapter("backfill", "--server", hapi_url, "--write", "--compact", "--out",
                            str(tmp_path / "b.json"), *export_options(fhir_ns))
    assert second.returncode == 1
    assert f"written 0, unchanged {len(wanted)}, voided 0" in second.stderr
    versions = {r["id"]: r["meta"]["versionId"] for r in on_server}
    after = [r for kind, param in (("ChargeItem", "subject"), ("Claim", "patient"))
             for r in client.search_all(kind, {param: ",".join(patients), "_count": "500"})]
    assert {r["id"]: r["meta"]["versionId"] for r in after} == versions


def test_an_export_hapi_refuses_names_the_server_and_what_to_do(hapi_url: str) -> None:
    result = charge_adapter("backfill", "--server", hapi_url, "--types", "NotAResource", "--poll-max-wait", "1")
    assert result.returncode == 2
    assert f"FHIR server at {hapi_url} does not support Bulk Data $export (kick-off answered HTTP 400" in result.stderr
    assert "NotAResource" in result.stderr and "charge-adapter backfill PATH" in result.stderr
