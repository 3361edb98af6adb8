"""The HL7 v2 message ledger contract (adapter/hl7v2/ledger.py), run against every implementation."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter.errors import StateSchemaError
from adapter.hl7v2 import ledger as ledger_module
from adapter.hl7v2.ledger import Ledger, MessageStatus, NewMessage, SqliteLedger

from .conftest import MakeLedger


def message(control: str, patient: str = "Patient/1", kind: str = "CG", line: str = "fna-a",
            procedures: tuple[str, ...] = ("Procedure/p1",)) -> NewMessage:
    return NewMessage(control, patient, f"{patient}|Practitioner/x|Encounter/e|2026-03-02", kind,
                      f"MSH|^~\\&|A|B|C|D|20260401120000+0000||DFT^P03^DFT_P03|{control}|P|2.5.1\r",
                      {"mrn": "M1", "visit_number": "V1"}, ({"line": line, "version": "v1", "charge": {"units": 1}},),
                      procedures)


def test_record_keeps_order_and_what_each_message_carried(ledger: Ledger) -> None:
    stored = ledger.record([message("A1"), message("A2", kind="CD")], now=100.0)
    assert [m.control_id for m in stored] == ["A1", "A2"] and stored[0].seq < stored[1].seq
    first = ledger.message("A1")
    assert first is not None and first.status == MessageStatus.PENDING and first.attempts == 0
    assert first.visit == {"mrn": "M1", "visit_number": "V1"} and first.created_at == 100.0
    assert first.versions == [("fna-a", "v1")] and first.procedures == ("Procedure/p1",)
    assert first.text.startswith("MSH|") and first.text.endswith("\r")
    assert [m.control_id for m in ledger.pending()] == ["A1", "A2"]


def test_a_control_id_is_recorded_once(ledger: Ledger) -> None:
    [first] = ledger.record([message("A1")])
    ledger.acknowledged("A1", "AA", "")
    [again] = ledger.record([message("A1", line="other")])
    assert again.seq == first.seq and again.status == MessageStatus.SENT and again.versions == [("fna-a", "v1")]
    assert ledger.counts() == {"sent": 1}


def test_pending_until_acknowledged_and_failed_attempts_are_counted(make_ledger: MakeLedger) -> None:
    ledger = make_ledger()
    ledger.record([message("A1"), message("B1", patient="Patient/2")])
    ledger.attempt_failed("A1", "no ACK within 5 s")
    ledger.attempt_failed("A1", "connection refused")
    other = make_ledger()  # what a restarted process sees
    [a, _] = other.pending()
    assert (a.control_id, a.attempts, a.last_error) == ("A1", 2, "connection refused")
    assert [m.control_id for m in other.pending("Patient/2")] == ["B1"]
    other.acknowledged("A1", "AA", "ok", now=200.0)
    assert [m.control_id for m in ledger.pending()] == ["B1"]
    sent = ledger.message("A1")
    assert sent is not None and (sent.status, sent.ack_code, sent.finished_at) == ("sent", "AA", 200.0)


def test_a_rejection_cancels_the_patients_later_pending_messages_only(ledger: Ledger) -> None:
    ledger.record([message("A1"), message("A2"), message("A3"), message("B1", patient="Patient/2")])
    ledger.acknowledged("A1", "AA", "")
    cancelled = ledger.rejected("A2", "AE", "unknown visit V1")
    assert cancelled == ["A3"]
    assert [(m.control_id, m.status) for m in ledger.history("Patient/1")] == [
        ("A1", "sent"), ("A2", "rejected"), ("A3", "cancelled")]
    rejected = ledger.message("A2")
    assert rejected is not None and (rejected.ack_code, rejected.ack_text) == ("AE", "unknown visit V1")
    assert [m.control_id for m in ledger.pending()] == ["B1"]
    assert ledger.counts() == {"sent": 1, "rejected": 1, "cancelled": 1, "pending": 1}


def test_a_finished_message_does_not_change_again(ledger: Ledger) -> None:
    ledger.record([message("A1")])
    ledger.acknowledged("A1", "AA", "")
    assert ledger.rejected("A1", "AR", "late") == []
    ledger.attempt_failed("A1", "late timeout")
    stored = ledger.message("A1")
    assert stored is not None and (stored.status, stored.attempts, stored.ack_code) == ("sent", 0, "AA")


def test_patients_billed_for_a_procedure(ledger: Ledger) -> None:
    ledger.record([message("A1", procedures=("Procedure/p1", "Procedure/p2")),
                   message("B1", patient="Patient/2", procedures=("Procedure/p3",))])
    assert ledger.patients_billed_for("Procedure/p2") == {"Patient/1"}
    assert ledger.patients_billed_for("Procedure/p9") == set()


def test_a_rejection_holds_the_patient_until_released(make_ledger: MakeLedger) -> None:
    ledger = make_ledger()
    ledger.record([message("A1"), message("A2"), message("B1", patient="Patient/2")])
    assert ledger.holds("Patient/1") == []
    ledger.acknowledged("A1", "AA", "")
    ledger.rejected("A2", "AE", "unknown visit V1")
    assert [m.control_id for m in ledger.holds("Patient/1")] == ["A2"]
    assert ledger.holds("Patient/2") == []  # patients are independent
    again = make_ledger()  # a hold survives a restart
    assert [(m.control_id, m.ack_text) for m in again.holds("Patient/1")] == [("A2", "unknown visit V1")]
    again.release(["Patient/1", "Patient/9"], now=300.0)  # a patient without messages is no error
    assert ledger.holds("Patient/1") == []
    assert [m.status for m in ledger.history("Patient/1")] == ["sent", "rejected"]  # the history is unchanged
    # what the replay sends is refused again: held again, by the new rejection only
    ledger.record([message("A3")])
    ledger.rejected("A3", "AR", "still closed")
    assert [m.control_id for m in ledger.holds("Patient/1")] == ["A3"]
    ledger.release(["Patient/1"])
    ledger.record([message("A4")])
    ledger.acknowledged("A4", "AA", "")
    assert ledger.holds("Patient/1") == []


def test_sqlite_upgrades_a_ledger_of_schema_1_and_keeps_its_holds(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "state.sqlite"
    with sqlite3.connect(path) as db:  # a ledger written by the adapter before schema 2
        for statement in ledger_module._SCHEMA[1]:
            db.execute(statement)
        db.execute("INSERT INTO hl7v2_meta VALUES ('schema_version', '1')")
        db.execute("INSERT INTO hl7v2_message (control_id, patient, session, kind, status, text, visit, charges, "
                   "procedures, created_at, ack_code, ack_text) VALUES ('A1', 'Patient/1', 's', 'CG', 'rejected', "
                   "'MSH|', '{}', '[]', '[]', 1.0, 'AE', 'closed')")
    ledger = SqliteLedger(path)
    assert [m.control_id for m in ledger.holds("Patient/1")] == ["A1"]  # a refusal from before still holds
    ledger.release(["Patient/1"])
    assert ledger.holds("Patient/1") == []
    with sqlite3.connect(path) as db:
        version = db.execute("SELECT value FROM hl7v2_meta WHERE key='schema_version'").fetchone()
        assert version == (str(ledger_module.LEDGER_SCHEMA_VERSION),)


def test_sqlite_refuses_a_newer_ledger_schema(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    SqliteLedger(path).close()
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("UPDATE hl7v2_meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StateSchemaError, match="newer"):
        SqliteLedger(path)


def test_a_failed_send_backs_off_on_the_ledgers_clock_and_a_parked_message_waits_for_unpark(
        make_ledger: MakeLedger) -> None:
    ledger = make_ledger()
    ledger.record([message("A1"), message("B1", patient="Patient/2")])
    ledger.unreached("B1", "mllp://r:1: cannot connect (Connection refused)")  # nothing went out: nothing counted
    ledger.attempt_failed("A1", "mllp://r:1: no ACK within 2 s", 3600.0)
    a, b = make_ledger().pending()  # another process sees the same, on the same clock
    assert (a.attempts, a.due, a.parked) == (1, False, False) and a.not_before > a.created_at
    assert (b.attempts, b.due, b.last_error) == (0, True, "mllp://r:1: cannot connect (Connection refused)")
    summary = ledger.summary()
    assert (summary.pending, summary.parked) == (2, 0)
    assert summary.last_failure == "mllp://r:1: no ACK within 2 s" and summary.oldest_pending_seconds is not None
    ledger.attempt_failed("A1", "mllp://r:1: no ACK within 2 s", ledger_module.PARKED)
    [parked] = ledger.pending("Patient/1")
    assert parked.parked and not parked.due and ledger.summary().parked == 1
    ledger.unpark(["Patient/2"])  # not its patient: stays parked
    assert ledger.pending("Patient/1")[0].parked
    ledger.unpark(["Patient/1"])
    [again] = ledger.pending("Patient/1")
    assert (again.parked, again.due, again.attempts) == (False, True, 0)
    ledger.acknowledged("B1", "AA", "")
    ledger.acknowledged("A1", "AA", "")
    assert ledger.summary() == ledger_module.LedgerSummary()  # nothing pending, no current failure
