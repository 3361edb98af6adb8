"""Billing rules across real process boundaries: real HAPI, `charge-adapter` as its own process, and the real
MLLP listener process (tests/integration/mllp_listener.py).

- A session whose Claim waits (here for a payer) is reconciled like any other on both sinks: a lesion whose
  line changed is never billed twice, and the stale Claim is cancelled, then written again once it can be.
- An HL7 v2 refusal holds the patient: later passes send nothing for them until the entry is replayed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapter.client import FhirClient

from .adapter_process import billed, charges
from .helpers import namespaced, patients_of, resources_of, server_now
from .test_hl7v2 import Listener, hl7v2_adapter, lines, mrn

US = {"coding": [{"system": "http://snomed.info/sct", "code": "61593002", "display": "Ultrasonic guidance procedure"}]}


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Listener]:
    listener = Listener(tmp_path)
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()


def resource(bundle: dict[str, Any], rid: str) -> dict[str, Any]:
    return copy.deepcopy(next(r for r in resources_of(bundle) if r["id"] == rid))


def claims(client: FhirClient, patients: list[str]) -> list[dict[str, Any]]:
    from .adapter_process import TABLES

    return list(client.search_all("Claim", {"patient": ",".join(patients),
                                            "identifier": f"{TABLES.settings.claim_identifier_system}|"}))


def statuses(client: FhirClient, patients: list[str]) -> list[tuple[str, str, float]]:
    return sorted((c["code"]["text"], c["status"], c["quantity"]["value"]) for c in charges(client, patients))


def net_at_receiver(records: list[dict[str, Any]]) -> dict[str, int]:
    """Units per CPT line the receiver holds: FT1-10 summed over every accepted message."""
    net: dict[str, int] = {}
    for record in records:
        if record["answer"] != "AA":
            continue
        for _, code, units in lines(record):
            net[code] = net.get(code, 0) + int(units)
    return {code: units for code, units in net.items() if units}


def test_a_claim_waiting_for_its_payer_never_bills_a_lesion_twice(
        client: FhirClient, hapi_url: str, tmp_path: Path, receiver: Listener, fhir_ns: str) -> None:
    """Scenario 11 billed on both sinks; then fna-2's guidance is corrected from fluoroscopy to ultrasound while
    the Coverage became self-pay. A coder's answer: 10005 x1 (lesion 1), 10006 x2 (lesions 2 and 3), no
    10007-59 (no fluoroscopy any more); the Claim waits for a payer (missing-payer), so no Claim is active."""
    adapter = hl7v2_adapter(tmp_path, hapi_url, receiver)
    adapter.start_cursor_at(server_now(client))
    bundle = namespaced("11", fhir_ns)
    client.transaction(bundle)
    patients = patients_of(bundle)
    first = adapter.cmd("run", "--once")
    assert first.returncode == 0, first.stderr
    assert billed(client, patients) == [("10005", 1), ("10006", 1), ("10007-59", 1)]
    assert [c["status"] for c in claims(client, patients)] == ["active"]
    assert net_at_receiver(receiver.records(fhir_ns)) == {"10005": 1, "10006": 1, "10007-59": 1}

    coverage = resource(bundle, f"{fhir_ns}-s11-cov")
    coverage["payor"] = [{"reference": f"Patient/{fhir_ns}-s11-pat"}]  # self-pay: no insurer for the Claim
    client.update(coverage)
    fna2 = resource(bundle, f"{fhir_ns}-s11-fna-2")
    fna2["extension"][0]["valueCodeableConcept"] = US
    client.update(fna2)
    edited = adapter.cmd("run", "--once")
    assert edited.returncode == 1, edited.stderr  # the Claim waits: review
    reasons = {(e.procedure.rsplit("-", 2)[-2] + "-" + e.procedure.rsplit("-", 1)[-1], e.reason)
               for e in adapter.store().reviews() if fhir_ns in e.procedure}
    assert reasons == {("fna-1", "missing-payer"), ("fna-2", "missing-payer")}
    assert statuses(client, patients) == [("10005", "billable", 1), ("10006", "billable", 2),
                                          ("10007-59", "entered-in-error", 1)]
    assert billed(client, patients) == [("10005", 1), ("10006", 2)]  # three lesions, three units: none twice
    [claim] = claims(client, patients)
    assert claim["status"] == "cancelled"  # it billed 10007-59 and named a payer that no longer covers
    assert net_at_receiver(receiver.records(fhir_ns)) == {"10005": 1, "10006": 2}
    assert [lines(r) for r in receiver.records(fhir_ns)[1:]] == [
        [("CD", "10006", "-1"), ("CD", "10007-59", "-1")], [("CG", "10006", "2")]]

    coverage["payor"] = [{"reference": f"Organization/{fhir_ns}-s11-org"}]  # the analyst fixes the Coverage
    client.update(coverage)
    replay = adapter.cmd("review", "replay", "--all")
    assert replay.returncode == 0, replay.stderr
    [claim] = claims(client, patients)  # the same Claim, active again with the lines of now
    assert claim["status"] == "active" and [i["quantity"]["value"] for i in claim["item"]] == [1, 2]
    assert billed(client, patients) == [("10005", 1), ("10006", 2)]
    assert not [e for e in adapter.store().reviews() if fhir_ns in e.procedure]
    assert len(receiver.records(fhir_ns)) == 3  # nothing new for the receiver: its charges were already right


def test_an_hl7v2_refusal_holds_the_patient_until_its_entry_is_replayed(
        client: FhirClient, hapi_url: str, tmp_path: Path, receiver: Listener, fhir_ns: str) -> None:
    receiver.set_rules([{"match": f"V-{fhir_ns}-s02-enc", "answer": "AE", "text": "PV1-19 account is closed"}])
    receiver.stop()
    receiver.start()
    adapter = hl7v2_adapter(tmp_path, hapi_url, receiver)
    adapter.start_cursor_at(server_now(client))
    refused, other = namespaced("02", fhir_ns), namespaced("01", fhir_ns)
    client.transaction(refused)
    client.transaction(other)
    first = adapter.cmd("run", "--once")
    assert first.returncode == 1, first.stderr
    assert sorted((mrn(r), r["answer"]) for r in receiver.records(fhir_ns)) == [("NR-1000101", "AA"),
                                                                             ("NR-1000202", "AE")]

    # the account is open again at the receiver, but nobody replayed the entry: an edit of the patient's
    # Procedure (a lesion less) is written to FHIR, and nothing is sent to the receiver for that patient
    receiver.set_rules([])
    receiver.stop()
    receiver.start()
    proc = resource(refused, f"{fhir_ns}-s02-fna-1")
    targets = [e for e in proc["extension"] if e["url"].endswith("procedure-targetBodyStructure")]
    proc["extension"].remove(targets[-1])
    client.update(proc)
    client.transaction(namespaced("03", fhir_ns))  # another patient in the same pass is not held
    held = adapter.cmd("run", "--once")
    assert held.returncode == 1, held.stderr
    records = receiver.records(fhir_ns)
    assert [(mrn(r), r["answer"]) for r in records[2:]] == [("NR-1000303", "AA")]
    assert billed(client, patients_of(refused)) == [("10005", 1), ("10006", 1)]  # the FHIR sink is not held
    [entry] = [e for e in adapter.store().reviews() if fhir_ns in e.procedure and e.reason == "hl7v2-rejected"]
    assert entry.detail.startswith("held: nothing more is sent") and "PV1-19 account is closed" in entry.detail
    quiet = adapter.cmd("run", "--once")  # nothing changed since: nothing is sent, the entry is still open
    assert quiet.returncode == 1, quiet.stderr
    assert len(receiver.records(fhir_ns)) == 3

    replay = adapter.cmd("review", "replay", str(entry.id))
    assert replay.returncode == 0, replay.stderr
    resent = receiver.records(fhir_ns)[3:]
    assert [(mrn(r), r["answer"], lines(r)) for r in resent] == [
        ("NR-1000202", "AA", [("CG", "10005", "1"), ("CG", "10006", "1")])]
    refused_id = next(r["control_id"] for r in records if r["answer"] == "AE")
    assert resent[0]["control_id"] != refused_id  # a new message: the content refused is not what is sent now
    assert not [e for e in adapter.store().reviews() if fhir_ns in e.procedure]
    assert adapter.cmd("run", "--once").returncode == 0
    assert len(receiver.records(fhir_ns)) == 4
