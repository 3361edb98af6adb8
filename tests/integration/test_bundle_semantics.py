"""The Bundle-semantics feeds (fixtures/fhir/feeds/100-101) posted to a real HAPI server as they are, over the
Procedure they delete (stored before, not yet billed: HAPI refuses to delete a Procedure a ChargeItem names):
HAPI applies the DELETE entries that still carry the old resource, the POST without id and the PUT whose body
has no id, and `sync` then bills exactly what `dry-run` bills for the same files (their expected.json).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from adapter.client import FhirClient
from adapter.config import load_tables
from adapter.sync import Syncer

from .test_sync import lines_on_server

ROOT = Path(__file__).resolve().parents[2]
FEEDS = ROOT / "fixtures/fhir/feeds"
TABLES = load_tables()


def feed_file(number: int, name: str, ns: str) -> dict[str, Any]:
    folder = next(FEEDS.glob(f"{number}-*"))
    return json.loads(re.sub(r"\b(s1\d\d)-", rf"{ns}-\1-", (folder / name).read_text()))


def expected_lines(number: int, ns: str) -> list[tuple[str, str, float, str]]:
    """expected.json's lines as `lines_on_server` shows billable ChargeItems."""
    data = json.loads(next(FEEDS.glob(f"{number}-*")).joinpath("expected.json").read_text())
    return sorted((ln["code"] + ("-" + "-".join(ln["modifiers"]) if ln["modifiers"] else ""), "billable", ln["units"],
                   ",".join(f"{ns}-{p}" for p in ln["procedures"])) for ln in data["lines"])


def as_live(bundle: dict[str, Any]) -> dict[str, Any]:
    """The Bundle as it was before the delete: every DELETE entry that carries its resource is a PUT of it."""
    live = copy.deepcopy(bundle)
    live["type"] = "transaction"
    live["entry"] = [dict(e, request={"method": "PUT", "url": e["request"]["url"]})
                     if e.get("request", {}).get("method") == "DELETE" and "resource" in e else e
                     for e in live["entry"] if e.get("request", {}).get("method") not in ("GET", "HEAD")]
    return live


def billable(client: FhirClient, patients: list[str]) -> list[tuple[str, str, float, str]]:
    return [line for line in lines_on_server(client, patients) if line[1] == "billable"]


def test_a_transaction_delete_that_carries_the_resource_bills_what_dry_run_bills(client: FhirClient,
                                                                                fhir_ns: str) -> None:
    bundle = feed_file(100, "transaction.json", fhir_ns)
    patients = [f"Patient/{fhir_ns}-s100-pat"]
    client.transaction(as_live(bundle))  # what the server held before: s100-fna-2 live
    assert client.read("Procedure", f"{fhir_ns}-s100-fna-2")["status"] == "completed"
    client.transaction(bundle)  # as the engine sent it: HAPI deletes s100-fna-2
    summary = Syncer(client, TABLES).sync_patients(patients)
    assert not summary.failures and not summary.reviews and summary.lines == 2
    assert billable(client, patients) == expected_lines(100, fhir_ns)


def test_a_batch_with_read_requests_and_a_delete_bills_what_dry_run_bills(client: FhirClient, fhir_ns: str) -> None:
    search = feed_file(101, "searchset.json", fhir_ns)
    batch = feed_file(101, "batch.json", fhir_ns)
    patients = [f"Patient/{fhir_ns}-s101-pat"]
    data = [e["resource"] for e in search["entry"] if e["search"]["mode"] != "outcome"]
    data += [e["resource"] for e in batch["entry"] if e["request"]["method"] == "PUT"]
    client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [  # what the server held before
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in data]})
    client.transaction(batch)  # GET and HEAD entries, context PUTs, and the DELETE carrying s101-fna-2
    summary = Syncer(client, TABLES).sync_patients(patients)
    assert not summary.failures and not summary.reviews and summary.lines == 1
    assert billable(client, patients) == expected_lines(101, fhir_ns)
