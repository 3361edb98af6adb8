"""The HL7 v2 sink's decisions (adapter/hl7v2/sink.py, plan.py) with an in-process fake receiver.

The fake stands in for the network only to inject answers a real receiver gives rarely (AE, AR, silence)
in any order; the real MLLP exchange is tested against a real listener process in
tests/integration/test_hl7v2.py.
"""

from __future__ import annotations

import copy
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from adapter.config import load_tables
from adapter.hl7v2.ledger import MemoryLedger, MessageStatus
from adapter.hl7v2.messages import session_charges, validate
from adapter.hl7v2.mllp import Ack, TransportError
from adapter.hl7v2.plan import active_charges, plan_patient
from adapter.hl7v2.sink import REJECTED, UNACKNOWLEDGED, UNREACHABLE, Hl7v2Sink
from adapter.pipeline import RunReport, process
from adapter.sources.files import SourcedResource
from adapter.state.base import ReviewEntry

ROOT = Path(__file__).resolve().parents[3]
TABLES = load_tables()
NOW = datetime(2026, 4, 1, 12, tzinfo=UTC)
PATIENT = "Patient/s02-pat"


class FakeReceiver:
    """Answers by rule: `answers` maps a control id to AA/AE/AR/`silence`; the default is AA."""

    where = "fake://receiver"

    def __init__(self) -> None:
        self.answers: dict[str, str] = {}
        self.default = "AA"
        self.received: list[tuple[str, str]] = []

    def send(self, text: str, control_id: str, seq: int = 0) -> Ack:
        answer = self.answers.get(control_id, self.default)
        if answer == "silence":
            raise TransportError(f"{self.where}: no ACK within 1 s")
        self.received.append((control_id, text))
        return Ack(answer, control_id, "" if answer == "AA" else "PV1-19 V-s02-enc is not an open account")

    def close(self) -> None:
        return None

    def ft1(self, n: int) -> list[tuple[str, str, str]]:
        """(FT1-6, FT1-25 code, FT1-10) of the n-th message received."""
        segments = [s.split("|") for s in self.received[n][1].split("\r") if s.startswith("FT1|")]
        return [(s[6], s[25].split("^")[0], s[10]) for s in segments]


def scenario(folder: str = "02-us-three-lesions") -> list[dict[str, Any]]:
    bundle = json.loads(next((ROOT / "fixtures/fhir/scenarios").glob(f"{folder}/input.json")).read_text())
    return [e["resource"] for e in bundle["entry"]]


def run(resources: list[dict[str, Any]]) -> RunReport:
    return process([SourcedResource(r, f"test {r['resourceType']}/{r.get('id')}") for r in resources], TABLES, NOW)


def procedure(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return next(r for r in resources if r["resourceType"] == "Procedure")


def one_lesion_less(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    changed = copy.deepcopy(resources)
    proc = procedure(changed)
    targets = [e for e in proc["extension"] if e["url"].endswith("procedure-targetBodyStructure")]
    proc["extension"].remove(targets[-1])
    return changed


@pytest.fixture
def receiver() -> FakeReceiver:
    return FakeReceiver()


@pytest.fixture
def sink(receiver: FakeReceiver) -> Hl7v2Sink:
    return Hl7v2Sink(TABLES, MemoryLedger(), receiver, clock=lambda: NOW)


def test_charges_are_sent_once_and_a_rerun_sends_nothing(sink: Hl7v2Sink, receiver: FakeReceiver) -> None:
    first = sink.deliver(run(scenario()), [PATIENT])
    assert (first.sent, first.failures, first.reviews) == (1, [], [])
    assert receiver.ft1(0) == [("CG", "10005", "1"), ("CG", "10006", "2")]
    again = sink.deliver(run(scenario()), [PATIENT])
    assert (again.sent, again.unchanged) == (0, 2) and len(receiver.received) == 1


def test_a_changed_charge_is_credited_then_charged_again_never_edited(sink: Hl7v2Sink,
                                                                      receiver: FakeReceiver) -> None:
    sink.deliver(run(scenario()), [PATIENT])
    result = sink.deliver(run(one_lesion_less(scenario())), [PATIENT])
    assert (result.sent, result.credits, result.unchanged) == (2, 1, 1)
    # the credit repeats the earlier line (x2, its amounts negated), then the new version (x1) is charged
    assert receiver.ft1(1) == [("CD", "10006", "-2")]
    assert receiver.ft1(2) == [("CG", "10006", "1")]
    credit = next(s.split("|") for s in receiver.received[1][1].split("\r") if s.startswith("FT1|"))
    assert (credit[11], credit[12]) == ("-412.00&USD", "206.00&USD")
    for control, text in receiver.received:
        parsed = validate(text, TABLES.hl7v2.version)
        assert parsed.msh.msh_10.to_er7() == control
    assert len({c for c, _ in receiver.received}) == 3  # every message its own control id


def test_a_voided_procedure_credits_every_charge_it_had(sink: Hl7v2Sink, receiver: FakeReceiver) -> None:
    sink.deliver(run(scenario()), [PATIENT])
    voided = copy.deepcopy(scenario())
    procedure(voided)["status"] = "entered-in-error"
    result = sink.deliver(run(voided), [PATIENT])
    assert (result.sent, result.credits) == (1, 1)
    assert receiver.ft1(1) == [("CD", "10005", "-1"), ("CD", "10006", "-2")]
    assert sink.deliver(run(voided), [PATIENT]).sent == 0


def test_no_ack_leaves_the_message_pending_and_it_is_resent_with_the_same_control_id_first(
        receiver: FakeReceiver) -> None:
    sink = Hl7v2Sink(TABLES, MemoryLedger(), receiver, clock=lambda: NOW, resend=(0.2, 0.2), rng=lambda: 1.0)
    seen: list[tuple[bool, str]] = []
    sink.observer = lambda ok, why: seen.append((ok, why))
    receiver.default = "silence"
    failed = sink.deliver(run(scenario()), [PATIENT])
    [failure] = failed.failures
    assert failure.retryable and failure.kind == UNREACHABLE and failure.patients == (PATIENT,)
    assert failure.reason.endswith("sent again in 0 s") and seen == [(False, "fake://receiver: no ACK within 1 s")]
    [pending] = sink.ledger.pending()
    assert pending.attempts == 1 and not pending.due
    receiver.default = "AA"
    waiting = sink.deliver(run(one_lesion_less(scenario())), [PATIENT])  # backing off: nothing is sent, not even
    assert receiver.received == [] and "backs off" in waiting.failures[0].reason  # the change planned behind it
    time.sleep(0.25)
    result = sink.deliver(run(one_lesion_less(scenario())), [PATIENT])
    # the pending message goes first, byte for byte; only then is the change planned and sent
    assert receiver.received[0] == (pending.control_id, pending.text)
    assert [t[0] for t in receiver.ft1(1)] == ["CD"] and receiver.ft1(2) == [("CG", "10006", "1")]
    assert result.sent == 3 and not sink.ledger.pending() and seen[-1] == (True, "")


def two_patients() -> list[dict[str, Any]]:
    return scenario("01-single-us") + scenario()


def test_while_one_message_backs_off_the_other_patients_messages_go_on(receiver: FakeReceiver) -> None:
    sink = Hl7v2Sink(TABLES, MemoryLedger(), receiver, clock=lambda: NOW)
    first = sink.deliver(run(two_patients()), [])
    receiver.answers = {m.control_id: "silence" for m in sink.ledger.history("Patient/s01-pat")}
    assert first.sent == 2  # (nothing was silent the first time)
    sink2 = Hl7v2Sink(TABLES, MemoryLedger(), receiver, clock=lambda: NOW)
    result = sink2.deliver(run(two_patients()), [])
    assert result.sent == 1 and [f.patients for f in result.failures] == [("Patient/s01-pat",)]
    assert {m.patient for m in sink2.ledger.pending()} == {"Patient/s01-pat"}


class LateReceiver(FakeReceiver):
    """Answers nothing in time, then hands the ACKs over late (as the MLLP client's kept connections do)."""

    def __init__(self) -> None:
        super().__init__()
        self.late: list[Ack] = []

    def send(self, text: str, control_id: str, seq: int = 0) -> Ack:
        self.received.append((control_id, text))
        self.late.append(Ack("AA", control_id))
        raise TransportError(f"{self.where}: no ACK within 1 s")

    def late_acks(self) -> list[Ack]:
        acks, self.late = self.late, []
        return acks


def test_a_late_ack_settles_its_message_without_a_resend() -> None:
    receiver = LateReceiver()
    sink = Hl7v2Sink(TABLES, MemoryLedger(), receiver, clock=lambda: NOW, resend=(0.01, 0.01))
    sink.deliver(run(scenario()), [PATIENT])
    time.sleep(0.02)
    again = sink.deliver(run(scenario()), [PATIENT])
    assert again.sent == 1 and len(receiver.received) == 1 and not sink.ledger.pending()
    assert [m.status for m in sink.ledger.history(PATIENT)] == [MessageStatus.SENT]


def test_a_message_never_acknowledged_waits_in_review_until_replayed(receiver: FakeReceiver) -> None:
    sink = Hl7v2Sink(TABLES, MemoryLedger(), receiver, clock=lambda: NOW, attempts=2, resend=(0.01, 0.01))
    receiver.default = "silence"
    sink.deliver(run(scenario()), [PATIENT])
    time.sleep(0.02)
    [failure] = sink.deliver(run(scenario()), [PATIENT]).failures
    assert not failure.retryable and failure.kind == UNACKNOWLEDGED
    assert "was sent 2 time(s)" in failure.reason and "review replay" in failure.reason
    [parked] = sink.ledger.pending()
    assert parked.parked
    time.sleep(0.02)
    receiver.default = "AA"
    [still] = sink.deliver(run(scenario()), [PATIENT]).failures  # parked: never sent again by itself
    assert still.kind == UNACKNOWLEDGED and receiver.received == []
    assert sink.release_replayed([entry(failure, UNACKNOWLEDGED)]) == {PATIENT}
    replay = sink.deliver(run(scenario()), [PATIENT])
    assert replay.sent == 1 and receiver.received[0][0] == parked.control_id and not sink.ledger.pending()


def test_a_refused_message_goes_to_review_and_cancels_what_was_planned_on_it(
        sink: Hl7v2Sink, receiver: FakeReceiver) -> None:
    sink.deliver(run(scenario()), [PATIENT])
    receiver.default = "AE"  # the credit is refused: the new charge must not follow (it would double-bill)
    result = sink.deliver(run(one_lesion_less(scenario())), [PATIENT])
    [failure] = result.failures
    assert not failure.retryable and failure.kind == REJECTED
    assert "answered AE" in failure.reason and "PV1-19 V-s02-enc is not an open account" in failure.reason
    assert "1 later message(s) of the patient cancelled" in failure.reason
    assert [m.status for m in sink.ledger.history(PATIENT)] == [
        MessageStatus.SENT, MessageStatus.REJECTED, MessageStatus.CANCELLED]
    assert [receiver.ft1(i)[0][0] for i in range(len(receiver.received))] == ["CG", "CD"]
    # the receiver would take it now, but nobody has looked: a later pass (the same data, or another edit)
    # sends nothing for the patient and reports it held, so the review entry stays open
    receiver.default = "AA"
    for later in (one_lesion_less(scenario()), one_lesion_less(one_lesion_less(scenario()))):
        held = sink.deliver(run(later), [PATIENT])
        assert held.sent == 0 and len(receiver.received) == 2
        [again] = held.failures
        assert not again.retryable and again.kind == REJECTED and again.procedures == ("Procedure/s02-fna-1",)
        assert again.reason.startswith("held: nothing more is sent") and "PV1-19 V-s02-enc" in again.reason
    assert [m.status for m in sink.ledger.history(PATIENT)][3:] == []  # nothing recorded while held
    # replaying another entry of the patient does not lift the hold; replaying the refusal's entry does
    assert sink.release_replayed([entry(failure, "missing-diagnosis")]) == set()
    assert sink.deliver(run(one_lesion_less(scenario())), [PATIENT]).sent == 0
    assert sink.release_replayed([entry(failure, failure.kind)]) == {PATIENT}
    replay = sink.deliver(run(one_lesion_less(scenario())), [PATIENT])
    # it plans again from what the receiver holds, with new control ids
    assert replay.sent == 2 and receiver.ft1(2) == [("CD", "10006", "-2")] and receiver.ft1(3) == [("CG", "10006", "1")]
    assert receiver.received[2][0] != receiver.received[1][0]
    assert sink.ledger.holds(PATIENT) == [] and sink.deliver(run(one_lesion_less(scenario())), [PATIENT]).sent == 0


def entry(failure: Any, reason: str) -> ReviewEntry:
    """The review entry `Service.pass_record` opens for a sink failure (kind write-rejected)."""
    return ReviewEntry(1, failure.procedures[0], failure.patients, "write-rejected", reason, failure.reason, "open",
                       1, 0.0, 0.0)


def test_what_the_message_needs_and_the_input_lacks_sends_the_session_to_review(sink: Hl7v2Sink,
                                                                                receiver: FakeReceiver) -> None:
    resources = copy.deepcopy(scenario())
    for r in resources:
        if r["resourceType"] in ("Patient", "Encounter"):
            r.pop("identifier")
    result = sink.deliver(run(resources), [PATIENT])
    assert {r.reason for r in result.reviews} == {"hl7v2-missing-mrn", "hl7v2-missing-visit-number"}
    assert all("PID-3" in r.detail or "PV1-19" in r.detail for r in result.reviews)
    assert receiver.received == [] and result.failures == []


def test_charges_of_a_procedure_under_review_are_left_alone(sink: Hl7v2Sink, receiver: FakeReceiver) -> None:
    sink.deliver(run(scenario()), [PATIENT])
    resources = copy.deepcopy(scenario())
    for r in resources:
        if r["resourceType"] == "Encounter":
            r.pop("identifier")  # the session now waits for its visit number: nothing is credited meanwhile
    result = sink.deliver(run(resources), [PATIENT])
    assert (result.sent, result.protected) == (0, 2) and len(receiver.received) == 1


def us_instead_of_fluoro_and_self_pay(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scenario 11 edited: fna-2's guidance was ultrasound, not fluoroscopy, and the Coverage is self-pay."""
    changed = copy.deepcopy(resources)
    for r in changed:
        if r.get("id") == "s11-fna-2":
            r["extension"][0]["valueCodeableConcept"] = {"coding": [{"system": "http://snomed.info/sct",
                                                                     "code": "61593002"}]}
        if r["resourceType"] == "Coverage":
            r["payor"] = [{"reference": "Patient/s11-pat"}]
    return changed


def test_plan_patient_credits_stale_charges_of_a_session_whose_claim_waits() -> None:
    """The FHIR side's rule: only the Claim waits (missing-payer), the charges are coded with certainty, so the
    stale 10007-59 is credited and 10006 corrected: the receiver ends with 10005 x1, 10006 x2, nothing twice."""
    patient = "Patient/s11-pat"
    ledger = MemoryLedger()

    def make(kind: str, visit: Any, charges: list[Any], control: str) -> str:
        return f"{kind}|{control}"

    def deliver(report: RunReport) -> Any:
        sessions, reviews = session_charges(report, TABLES)
        assert reviews == []
        plan = plan_patient(patient, sessions, ledger.history(patient), {r.procedure for r in report.reviews}, make)
        for stored in ledger.record(plan.messages):
            ledger.acknowledged(stored.control_id, "AA", "")
        return plan

    deliver(run(scenario("11-mixed-us-then-fluoro")))
    edited = run(us_instead_of_fluoro_and_self_pay(scenario("11-mixed-us-then-fluoro")))
    assert {(r.procedure, r.reason) for r in edited.reviews} == {("Procedure/s11-fna-1", "missing-payer"),
                                                               ("Procedure/s11-fna-2", "missing-payer")}
    plan = deliver(edited)
    assert plan.protected == 0 and plan.unchanged == 1
    assert [(m.kind, [(c["charge"]["code"]["code"], c["charge"]["units"]) for c in m.charges])
            for m in plan.messages] == [("CD", [("10006", 1), ("10007", 1)]), ("CG", [("10006", 2)])]
    held = active_charges(ledger.history(patient))
    assert sorted((a.charge["code"]["code"], a.charge["units"]) for a in held.values()) == [("10005", 1), ("10006", 2)]


def test_the_sink_never_bills_a_lesion_twice_when_only_the_claim_waits(sink: Hl7v2Sink,
                                                                     receiver: FakeReceiver) -> None:
    sink.deliver(run(scenario("11-mixed-us-then-fluoro")), ["Patient/s11-pat"])
    result = sink.deliver(run(us_instead_of_fluoro_and_self_pay(scenario("11-mixed-us-then-fluoro"))),
                          ["Patient/s11-pat"])
    assert (result.sent, result.credits, result.protected) == (2, 1, 0)
    net: dict[str, int] = {}
    for n in range(len(receiver.received)):
        for _, code, units in receiver.ft1(n):
            net[code] = net.get(code, 0) + int(units)
    assert {code: units for code, units in net.items() if units} == {"10005": 1, "10006": 2}
