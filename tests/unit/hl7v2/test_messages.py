"""DFT^P03 building: every supported version validates, escaping, times, ACK parsing, the tables' checks; and
the correction rule over all inputs (hypothesis): whatever charges come and go, what the receiver holds is
what is wanted now, and nothing is ever edited in place."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from adapter.config import load_tables
from adapter.errors import ConfigError
from adapter.hl7v2.ledger import MemoryLedger
from adapter.hl7v2.messages import (
    CHARGE,
    Charge,
    Coded,
    Person,
    SessionCharges,
    Visit,
    dry_run_messages,
    escape,
    hl7_time,
    validate,
)
from adapter.hl7v2.mllp import TransportError, parse_ack
from adapter.hl7v2.plan import active_charges, plan_patient
from adapter.pipeline import process_paths
from adapter.tables.hl7v2 import SUPPORTED_VERSIONS

ROOT = Path(__file__).resolve().parents[3]
TABLES = load_tables()
NOW = datetime(2026, 4, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_every_supported_version_builds_valid_messages(version: str) -> None:
    tables = dataclasses.replace(TABLES, hl7v2=dataclasses.replace(TABLES.hl7v2, version=version))
    report = process_paths([ROOT / "fixtures/fhir/scenarios/13-three-modalities/input.json",
                            ROOT / "fixtures/fhir/scenarios/88-diagnosis-pointers/input.json"], tables, NOW)
    messages, reviews = dry_run_messages(report, tables, NOW)
    assert len(messages) == 2 and reviews == []
    for text in messages:
        assert validate(text, version).msh.msh_12.to_er7() == version


def test_values_are_escaped_and_times_keep_their_offset() -> None:
    assert escape("O'Brien|Smith^Jr & co~x\\y\r\nz") == "O'Brien\\F\\Smith\\S\\Jr \\T\\ co\\R\\x\\E\\y z"
    assert hl7_time("2026-03-02T09:15:00Z") == "20260302091500+0000"
    assert hl7_time("2026-03-03T10:00:00-05:00") == "20260303100000-0500"
    assert hl7_time("2026-03-03") == "20260303" and hl7_time("1978-05") == "197805"
    with pytest.raises(ValueError):
        hl7_time("yesterday")


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_a_name_beyond_ascii_says_its_encoding(version: str) -> None:
    from adapter.hl7v2.messages import render

    tables = dataclasses.replace(TABLES.hl7v2, version=version)
    visit = dataclasses.replace(VISIT, family="Núñez|Ortiz", given="José")
    text = render(CHARGE, visit, [charge("10005", 1, 100)], "C1", NOW, tables)
    parsed = validate(text, version)
    assert parsed.msh.msh_18.to_er7() in ("UNICODE", "UNICODE UTF-8")
    assert parsed.pid.pid_5.to_er7() == "Núñez\\F\\Ortiz^José"


def test_a_value_outside_its_hl7_table_is_never_sent() -> None:
    from adapter.hl7v2.messages import InvalidMessageError, render

    with pytest.raises(InvalidMessageError, match="not in table HL70001"):
        render(CHARGE, dataclasses.replace(VISIT, sex="X"), [charge("10005", 1, 100)], "C1", NOW, TABLES.hl7v2)


def test_an_ack_is_read_with_its_error_text() -> None:
    ack = parse_ack(b"MSH|^~\\&|BILLING|NR|CHARGE-ADAPTER|NR|20260401||ACK^P03|1|P|2.5.1\rMSA|AE|C1|bad visit\r"
                    b"ERR||PV1^1^19|103^Table value not found^HL70357|E\r")
    assert (ack.code, ack.control_id, ack.accepted) == ("AE", "C1", False)
    assert ack.text.startswith("bad visit; PV1 1 19; 103 Table value not found HL70357")
    for garbage in (b"", b"hello", b"MSH|^~\\&|X\rPID|1\r", b"MSH|^~\\&|X\rMSA|ZZ|C1\r"):
        with pytest.raises(TransportError):
            parse_ack(garbage)


def test_the_tables_are_checked(tmp_path: Path) -> None:
    for name in ROOT.joinpath("config").iterdir():
        if name.is_file():
            (tmp_path / name.name).write_bytes(name.read_bytes())
    cases = {"version: '2.9'\n": "version", "sending_application: 'A|B'\n": "sending_application",
             "patient_class: {AMB: X}\n": "patient_class.AMB", "coding_systems: {}\n": "coding_systems",
             "charge_code_system: NOPE\n": "charge_code_system", "credit_sign: maybe\n": "credit_sign"}
    for text, key in cases.items():
        (tmp_path / "hl7v2.yaml").write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_tables(tmp_path)
        assert caught.value.entry == key and caught.value.file.endswith("hl7v2.yaml")


# -- the correction rule, over all inputs --------------------------------------------------------------------------

VISIT = Visit("Patient/p", "M1", "", "MR", "Doe", "Jo", "", "19700101", "F", "V1", "", "VN", "O")
VISIT_MOVED = dataclasses.replace(VISIT, visit_number="V2")
PERSON = Person("1000001010", "Park", "Helen")
CODES = ("10005", "10006", "10007", "10008")


def charge(code: str, units: int, price: int) -> Charge:
    return Charge(f"line-{code}", "Patient/p|x|e|2026-03-02", (f"Procedure/{code}",), "20260302",
                  Coded(code, "FNA", "C4"), (), Coded(code, "FNA", "C4"), units, f"{price}.00", "USD", PERSON, None,
                  (Coded("N63.20", "Lump", "I10"),))


wanted_sets = st.lists(st.tuples(st.dictionaries(st.sampled_from(CODES), st.tuples(st.integers(1, 3),
                                                                                   st.sampled_from([100, 200]))),
                                 st.booleans()), min_size=1, max_size=6)

MODES = ("coded", "claim-waits", "held")
"""How a session comes out of a pass: coded; coded while its Claim waits (its Procedures are under review but
its charges are produced); held (its Procedures are under review and it has no charges: coding uncertain)."""
SESSIONS = ("s1", "s2")
session_wanted = st.dictionaries(st.sampled_from(CODES), st.tuples(
    st.integers(1, 3), st.sampled_from([100, 200]), st.sets(st.sampled_from("ab"), min_size=1)))
"""code -> (units, price, the Procedures of the session whose lesions the line bills: a lesion can move from one
line to another while its Procedure stays, as when a guidance modality is corrected)."""
session_steps = st.lists(st.tuples(st.tuples(*[st.tuples(session_wanted, st.sampled_from(MODES))
                                               for _ in SESSIONS]), st.booleans()), min_size=1, max_size=6)


def render(kind: str, visit: Visit, charges: list[Charge], control: str) -> str:
    return f"{kind}|{control}|{len(charges)}"


def session_charge(session: str, code: str, units: int, price: int, procedures: set[str]) -> Charge:
    return dataclasses.replace(charge(code, units, price), line=f"line-{session}-{code}", session=session,
                               procedures=tuple(sorted(f"Procedure/{session}-{p}" for p in procedures)))


@settings(max_examples=60, deadline=None)
@given(session_steps)
@example([((({}, "coded"), ({"10006": (2, 200, {"a"})}, "coded")), False),  # 10006 moves from a to b, same
          ((({}, "coded"), ({"10006": (2, 200, {"b"}), "10005": (1, 100, {"a"})}, "coded")), False),  # units;
          ((({}, "coded"), ({"10005": (1, 100, {"a"})}, "held")), False)])  # a held: 10006 (b) is credited
def test_what_the_receiver_holds_is_what_is_wanted_and_nothing_is_edited(steps: list) -> None:
    """Two sessions of one patient, each coded, coded while its Claim waits (under review, charges produced), or
    held (under review, no charges): the receiver holds exactly the wanted charges of every produced session,
    and a held session's earlier charges of its Procedures still there, as they were; never a lesion twice."""
    ledger = MemoryLedger()
    net: dict[str, int] = {}  # units per line at the receiver, as the messages add up
    expected: dict[str, tuple[int, str, tuple[str, ...]]] = {}  # line -> (units, version, Procedures) held
    for per_session, moved in steps:
        visit = VISIT_MOVED if moved else VISIT
        produced: list[SessionCharges] = []
        under_review: set[str] = set()
        for name, (wanted, mode) in zip(SESSIONS, per_session, strict=True):
            charges = [session_charge(name, code, units, price, procs)
                       for code, (units, price, procs) in sorted(wanted.items())]
            procedures = sorted({p for c in charges for p in c.procedures})
            if mode != "coded":
                under_review |= set(procedures)
            mine = {line: held for line, held in expected.items() if line.startswith(f"line-{name}-")}
            for line in mine:
                del expected[line]
            if mode == "held":  # charges billing its Procedures stay exactly as they were; the others are gone
                expected |= {line: held for line, held in mine.items() if set(held[2]) & set(procedures)}
                continue
            produced.append(SessionCharges(name, "Patient/p", procedures, visit, charges))
            expected |= {c.line: (c.units, c.version(visit), c.procedures) for c in charges}
        plan = plan_patient("Patient/p", produced, ledger.history("Patient/p"), under_review, render)
        kinds = [m.kind for m in plan.messages]
        assert kinds == sorted(kinds, key=lambda k: k == CHARGE)  # every credit before any charge
        for stored in ledger.record(plan.messages):
            ledger.acknowledged(stored.control_id, "AA", "")
            for entry in stored.charges:
                sign = 1 if stored.kind == CHARGE else -1
                net[entry["line"]] = net.get(entry["line"], 0) + sign * entry["charge"]["units"]
        assert {line: units for line, units in net.items() if units} == {
            line: units for line, (units, _, _) in expected.items()}
        active = active_charges(ledger.history("Patient/p"))
        assert {line: a.version for line, a in active.items()} == {line: v for line, (_, v, _) in expected.items()}
    controls = [m.control_id for m in ledger.history("Patient/p")]
    assert len(controls) == len(set(controls))  # every message its own control id


def test_the_property_test_meets_both_kinds_of_review() -> None:
    """The strategy above does make passes with Procedures under review, of both kinds."""
    from hypothesis import find

    find(session_steps, lambda steps: {m for per, _ in steps for w, m in per if w} >= {"claim-waits", "held"})
