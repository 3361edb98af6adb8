"""The HL7 v2 sink end to end: real HAPI (the FHIR side), `charge-adapter` as its own process, and a real MLLP
receiver in a separate process (tests/integration/mllp_listener.py: the `hl7` package's asyncio server, not
our client code) that records what it receives and answers AA, AE, AR or nothing by rule.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapter.client import FhirClient
from adapter.hl7v2.ledger import SqliteLedger
from adapter.hl7v2.messages import validate

from .adapter_process import TABLES, Adapter, billed
from .helpers import free_port, namespaced, patients_of, resources_of, server_now, wait_for

HERE = Path(__file__).resolve().parent


class Listener:
    """The MLLP receiver process; `records()` is what it received, in order, over all its lives."""

    def __init__(self, tmp: Path, rules: list[dict[str, Any]] | None = None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.record = tmp / "received.jsonl"
        self.rules = tmp / "rules.json"
        self.set_rules(rules or [])
        self.proc: subprocess.Popen[str] | None = None

    def set_rules(self, rules: list[dict[str, Any]]) -> None:
        self.rules.write_text(json.dumps(rules))

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "mllp_listener.py"), "--port", str(self.port), "--record", str(self.record),
             "--rules", str(self.rules)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening"), f"the MLLP listener did not start: {line}"

    def kill(self) -> None:
        """As a receiver that crashes: no goodbye, no ACK for what it was working on."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def records(self, ns: str = "") -> list[dict[str, Any]]:
        """What it received, in order; with `ns`, only messages whose visit number (PV1-19) carries it (the poll's
        overlap window may bring an earlier test's Procedures to a new adapter state)."""
        if not self.record.exists():
            return []
        found = [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]
        return [r for r in found if ns in segments(r["text"], "PV1")[0][19]]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    receiver = Listener(tmp_path)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def hl7v2_adapter(tmp_path: Path, hapi_url: str, listener: Listener, *, fhir: bool = True,
                  ack_timeout: float = 5) -> Adapter:
    return Adapter(tmp_path, hapi_url, sinks={"fhir": fhir, "hl7v2": {
        "enabled": True, "host": "127.0.0.1", "port": listener.port, "ack_timeout_seconds": ack_timeout,
        "attempts": 4, "connect_timeout_seconds": 2, "resend_initial_seconds": 0.5, "resend_max_seconds": 2}},
        worker={"retry_initial_seconds": 0.2, "retry_max_seconds": 1},
        poll={"interval_seconds": 1, "overlap_seconds": 0, "page_size": 25})  # only what this test writes


def segments(text: str, name: str) -> list[list[str]]:
    return [s.split("|") for s in text.replace("\n", "\r").split("\r") if s.startswith(name + "|")]


def mrn(record: dict[str, Any]) -> str:
    return segments(record["text"], "PID")[0][3].split("^")[0]


def lines(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(FT1-6, FT1-25 code with FT1-26 modifiers, FT1-10) of each FT1."""
    out = []
    for ft1 in segments(record["text"], "FT1"):
        mods = [m.split("^")[0] for m in ft1[26].split("~") if m] if len(ft1) > 26 else []
        out.append((ft1[6], "-".join([ft1[25].split("^")[0], *mods]), ft1[10]))
    return out


def one_lesion_less(bundle: dict[str, Any]) -> dict[str, Any]:
    """Scenario 02's Procedure with its third lesion gone: 10006 x2 becomes x1."""
    proc = copy.deepcopy(next(r for r in resources_of(bundle) if r["resourceType"] == "Procedure"))
    targets = [e for e in proc["extension"] if e["url"].endswith("procedure-targetBodyStructure")]
    proc["extension"].remove(targets[-1])
    return proc


def test_charges_arrive_once_in_order_and_a_change_is_credited_then_charged(
        client: FhirClient, hapi_url: str, tmp_path: Path, listener: Listener, fhir_ns: str) -> None:
    adapter = hl7v2_adapter(tmp_path, hapi_url, listener)
    adapter.start_cursor_at(server_now(client))
    bundles = [namespaced(n, fhir_ns) for n in ("01", "02", "13")]
    for bundle in bundles:
        client.transaction(bundle)
    first = adapter.cmd("run", "--once")
    assert first.returncode == 0, first.stderr
    received = listener.records(fhir_ns)
    assert sorted(mrn(r) for r in received) == ["NR-1000101", "NR-1000202", "NR-1001313"]
    assert all(r["answer"] == "AA" for r in received)
    assert len({r["control_id"] for r in received}) == 3  # each message once
    by_mrn = {mrn(r): lines(r) for r in received}
    assert by_mrn["NR-1000202"] == [("CG", "10005", "1"), ("CG", "10006", "2")]
    assert by_mrn["NR-1001313"] == [("CG", "10009", "1"), ("CG", "10005-59", "1"), ("CG", "10011-59", "1")]
    for record in received:  # what arrived is a valid DFT^P03, as the receiver read it
        validate(record["text"].replace("\n", "\r"), TABLES.hl7v2.version)
    patients = [p for b in bundles for p in patients_of(b)]
    assert ("10005", 1) in billed(client, patients)  # the FHIR sink wrote its ChargeItems too

    client.update(one_lesion_less(bundles[1]))  # a lesion less: the 10006 charge changes from x2 to x1
    second = adapter.cmd("run", "--once")
    assert second.returncode == 0, second.stderr
    later = listener.records(fhir_ns)[3:]
    assert [lines(r) for r in later] == [[("CD", "10006", "-2")], [("CG", "10006", "1")]]
    assert {mrn(r) for r in later} == {"NR-1000202"}
    assert adapter.cmd("run", "--once").returncode == 0
    assert len(listener.records(fhir_ns)) == 5  # nothing is sent twice


def test_refusals_go_to_review_with_the_acks_text(client: FhirClient, hapi_url: str, tmp_path: Path,
                                                   listener: Listener, fhir_ns: str) -> None:
    listener.set_rules([{"match": f"V-{fhir_ns}-s01-enc", "answer": "AE", "text": "PV1-19 account is closed"},
                        {"match": f"V-{fhir_ns}-s05-enc", "answer": "AR", "text": "unknown sending facility"}])
    listener.stop()
    listener.start()
    adapter = hl7v2_adapter(tmp_path, hapi_url, listener, fhir=False)  # HL7 v2 only: nothing written to FHIR
    adapter.start_cursor_at(server_now(client))
    bundles = [namespaced(n, fhir_ns) for n in ("01", "05", "07")]
    for bundle in bundles:
        client.transaction(bundle)
    result = adapter.cmd("run", "--once")
    assert result.returncode == 1, result.stderr
    answers = {mrn(r): r["answer"] for r in listener.records(fhir_ns)}
    assert answers == {"NR-1000101": "AE", "NR-1000505": "AR", "NR-1000707": "AA"}
    entries = [e for e in adapter.store().reviews() if e.reason == "hl7v2-rejected" and fhir_ns in e.procedure]
    assert sorted(e.procedure.split("-", 1)[1] for e in entries) == ["s01-fna-1", "s05-fna-1"]
    details = " ".join(e.detail for e in entries)
    assert "answered AE" in details and "PV1-19 account is closed" in details
    assert "answered AR" in details and "unknown sending facility" in details
    assert billed(client, [p for b in bundles for p in patients_of(b)]) == []  # sinks.fhir: false

    listener.set_rules([])  # the analyst had the accounts fixed at the receiver: replay sends them again
    listener.stop()
    listener.start()
    replay = adapter.cmd("review", "replay", "--all")
    assert replay.returncode == 0, replay.stderr
    resent = [r for r in listener.records(fhir_ns) if r["answer"] == "AA" and mrn(r) != "NR-1000707"]
    assert sorted(mrn(r) for r in resent) == ["NR-1000101", "NR-1000505"]
    refused = {r["control_id"] for r in listener.records(fhir_ns) if r["answer"] != "AA"}
    assert not refused & {r["control_id"] for r in resent}  # a refused content comes back with a new control id
    assert not [e for e in adapter.store().reviews() if e.reason == "hl7v2-rejected" and fhir_ns in e.procedure]


def test_the_folder_transport_through_run(client: FhirClient, hapi_url: str, tmp_path: Path, fhir_ns: str) -> None:
    outbox = tmp_path / "outbox"
    adapter = Adapter(tmp_path, hapi_url, sinks={"hl7v2": {"enabled": True, "transport": "file",
                                                           "folder": str(outbox)}},
                      poll={"interval_seconds": 1, "overlap_seconds": 0, "page_size": 25})
    adapter.start_cursor_at(server_now(client))
    client.transaction(namespaced("03", fhir_ns))
    assert adapter.cmd("run", "--once").returncode == 0
    mine = [p for p in sorted(outbox.iterdir()) if fhir_ns in p.read_bytes().decode()]
    assert len(mine) == 1 and mine[0].name.endswith(".hl7") and not mine[0].name.startswith(".")
    parsed = validate(mine[0].read_bytes().decode(), TABLES.hl7v2.version)
    assert [g.ft1.ft1_25.to_er7().split("^")[0] for g in parsed.children.get("DFT_P03_FINANCIAL")] == ["10021"]


def test_a_receiver_killed_mid_backlog_gets_every_message_and_resends_keep_their_control_id(
        client: FhirClient, hapi_url: str, tmp_path: Path, listener: Listener, fhir_ns: str) -> None:
    listener.set_rules([{"match": fhir_ns, "answer": "AA", "count": 2}, {"match": fhir_ns, "answer": "silence"}])
    listener.stop()
    listener.start()
    adapter = hl7v2_adapter(tmp_path, hapi_url, listener, ack_timeout=20)
    adapter.start_cursor_at(server_now(client))
    names = ("01", "03", "05", "07", "09", "13")
    for n in names:
        client.transaction(namespaced(n, fhir_ns))
    adapter.start("run")
    try:
        wait_for(lambda: len(listener.records(fhir_ns)) >= 3, 120, "the third message to reach the receiver")
        in_flight = listener.records(fhir_ns)[2]
        listener.kill()  # while the adapter waits for the third ACK
        listener.set_rules([])
        listener.start()  # a new receiver process on the same port: answers AA
        wait_for(lambda: len({r["control_id"] for r in listener.records(fhir_ns)}) >= len(names), 120,
                 "every message to arrive after the restart")
        wait_for(lambda: not SqliteLedger(adapter.state).pending(), 60, "the ledger to have nothing pending")
    finally:
        adapter.stop_all()
    received = listener.records(fhir_ns)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for record in received:
        by_id.setdefault(record["control_id"], []).append(record)
    assert len(by_id) == len(names)  # one message per session, none lost
    assert sorted(mrn(copies[0]) for copies in by_id.values()) == sorted(f"NR-100{n}{n}" for n in names)
    resent = [cid for cid, copies in by_id.items() if len(copies) > 1]
    assert resent == [in_flight["control_id"]]  # only the unacknowledged one came again ...
    assert {r["text"] for r in by_id[in_flight["control_id"]]} == {in_flight["text"]}  # ... byte for byte
