"""The string builder (`messages.render`) against the hl7apy object-tree builder it replaced
(`hl7apy_reference.render_with_hl7apy`): over generated sessions, the same bytes, or both refuse the message.
And the value checks on their own: what they refuse, with the position named."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from adapter.config import load_tables
from adapter.hl7v2.checks import ShapeCheck, ValueProblem, check_values, skeleton
from adapter.hl7v2.messages import (
    CHARGE,
    CREDIT,
    Charge,
    Coded,
    InvalidMessageError,
    Person,
    Visit,
    render,
    validate,
)
from adapter.tables.hl7v2 import SUPPORTED_VERSIONS, Hl7v2Tables
from tests.unit.hl7v2.hl7apy_reference import render_with_hl7apy

ROOT = Path(__file__).resolve().parents[3]
TABLES = load_tables()
NOW = datetime(2026, 4, 1, 12, tzinfo=UTC)

# values as the records can hold them: mostly plain, sometimes delimiters, escapes, line breaks, accents,
# blanks, or too long for their datatype
plain = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .-'", min_size=1, max_size=12)
tricky = st.text("Ab1 |^&~\\\r\n\téñ-.EFSTRH", min_size=0, max_size=10)
value = st.one_of(plain, plain, tricky, st.sampled_from(["", " ", "\\F\\", "a\\", "\\E", "x" * 200, "y" * 21]))
required = st.one_of(plain, plain, tricky.filter(lambda s: s.strip()))
digits = st.text("0123456789", min_size=1, max_size=10)
date_part = st.builds(lambda y, m, d: f"{y:04d}{m:02d}{d:02d}", st.integers(1900, 2030), st.integers(1, 12),
                      st.integers(1, 31))
times = st.one_of(date_part, st.builds(lambda d, h, mi, z: f"{d}{h:02d}{mi:02d}00{z}", date_part, st.integers(0, 23),
                                       st.integers(0, 59), st.sampled_from(["+0000", "-0500", "+0530", ""])),
                  st.sampled_from(["2026", "202603", "2026030", "20260302T0915"]))
systems = st.sampled_from(["C4", "I10", "HCPCS", "99CDM", "99X", "ZZZ", ""])
coded = st.builds(Coded, required, value, systems)
person = st.builds(Person, st.one_of(digits, value), value, value, value, value)
visit = st.builds(
    Visit, st.just("Patient/p"), required, value, st.sampled_from(["MR", "PI", "ZZ", "M^R"]), value, value, value,
    st.one_of(st.just(""), date_part), st.sampled_from(["M", "F", "O", "U", "", "X"]), required, value,
    st.sampled_from(["VN", "AN", "QQ"]), st.sampled_from(["O", "I", "E", "Q"]), st.one_of(st.none(), person))
charge = st.builds(
    Charge, required, st.just("s"), st.just(("Procedure/a",)), times, coded, st.lists(coded, max_size=2).map(tuple),
    coded, st.one_of(st.integers(1, 4), st.integers(1, 10**9)),
    st.one_of(st.none(), st.sampled_from(["412.00", "0.5", "1120", "99999999999999.99"])),
    st.sampled_from([None, "USD", "EUR", "US$"]), person, st.one_of(st.none(), person),
    st.lists(coded, min_size=1, max_size=3).map(tuple))
tables = st.builds(lambda version, sign, facility: dataclasses.replace(
    TABLES.hl7v2, version=version, credit_sign=sign, sending_facility=facility),
    st.sampled_from(SUPPORTED_VERSIONS), st.sampled_from(["negative", "positive"]), st.sampled_from(["", "NR"]))


def outcome(build: Callable[..., str], *args: Any) -> str | None:
    """The message, or None when the builder refuses it. The hl7apy builder let hl7apy's ValueError (a date that is
    no date) through; the string builder must refuse with InvalidMessageError, so a ValueError from it fails."""
    try:
        return build(*args)
    except InvalidMessageError:
        return None
    except ValueError:
        if build is render:
            raise
        return None


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([CHARGE, CREDIT]), visit, st.lists(charge, min_size=1, max_size=3), tables)
def test_the_string_builder_writes_what_hl7apy_wrote(kind: str, v: Visit, charges: list[Charge],
                                                     conf: Hl7v2Tables) -> None:
    expected = outcome(render_with_hl7apy, kind, v, charges, "C0FFEE", NOW, conf)
    if expected is not None and outcome(validate, expected, conf.version) is None:
        # the object tree held a required field whose value is blank (a name of spaces) and passed; its text,
        # which is what is sent, fails hl7apy's validation: the string builder refuses such a message
        expected = None
    assert outcome(render, kind, v, charges, "C0FFEE", NOW, conf) == expected


def test_the_generated_sessions_meet_both_verdicts() -> None:
    """The strategy above makes messages both builders accept and messages both refuse."""
    from hypothesis import find

    for accepted in (True, False):
        find(st.tuples(st.sampled_from([CHARGE, CREDIT]), visit, charge),
             lambda args, want=accepted: (outcome(render, args[0], args[1], [args[2]], "C1", NOW, TABLES.hl7v2)
                                          is not None) == want,
             settings=settings(max_examples=400, deadline=None, database=None, phases=[Phase.generate]))


GOLDEN = sorted((ROOT / "fixtures/fhir/scenarios").glob("*/hl7v2.txt"))


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_every_golden_message_passes_the_value_checks(version: str) -> None:
    texts = [m.strip().replace("\n", "\r") for f in GOLDEN for m in f.read_text().split("\n\n") if m.strip()]
    assert len(texts) > 50
    for text in texts:
        check_values(text.replace("|2.5.1", f"|{version}", 1), version)


def test_the_value_checks_name_each_position_that_fails() -> None:
    text = (ROOT / "fixtures/fhir/scenarios/01-single-us/hl7v2.txt").read_text().strip().replace("\n", "\r")
    check_values(text, "2.5.1")
    segments = [s.split("|") for s in text.split("\r")]
    msh, _evn, pid, pv1, ft1, _dg1 = segments
    msh[6] = "20261301120000+0000"  # MSH-7: month 13
    pid[8] = "X"  # PID-8: not a sex of table 0001
    pv1[2] = "O^X"  # PV1-2: components in an IS
    ft1[1] = "one"  # FT1-1: not a sequence number
    ft1[10] = "1.0E+1"  # FT1-10: a number hl7apy would write as 1E+1
    ft1[2] = "x" * 200  # FT1-2: an ST of 200 characters
    ft1[7] = "3601005^FNA^99CDM^^^^more"  # FT1-7: a CE has six components
    bad = "\r".join("|".join(s) for s in segments) + "\rZZ1|1"
    with pytest.raises(ValueProblem) as caught:
        check_values(bad, "2.5.1")
    problems = caught.value.problems
    for expected in ("MSH-7.1: '20261301120000+0000' is not a valid DTM", "PID-8: value X not in table HL70001",
                     "PV1-2: is a IS, which has no components", "FT1-1: 'one' is not a valid SI",
                     "FT1-10: '1.0E+1' is not in the canonical form of a NM", "FT1-2: 'xxxx",
                     "FT1-7: a CE has 6 parts, not 7", "ZZ1-1: not a field of ZZ1"):
        assert any(p.startswith(expected) for p in problems), (expected, problems)
    assert len(problems) == 8


def test_a_shape_is_verified_once_and_forgotten_past_the_limit() -> None:
    one, two = "MSH|^~\\&|A|B\rPID|1", "MSH|^~\\&|A\rPID|1"
    assert skeleton(one) == skeleton("MSH|^~\\&|Z|Y\rPID|9") != skeleton(two)
    shapes = ShapeCheck()
    for text in (one, two):
        keys = shapes.needs_check(text, "2.5.1")
        assert keys is not None
        shapes.accepted(keys)
    assert shapes.needs_check("MSH|^~\\&|Z|Y\rPID|9", "2.5.1") is None
    assert shapes.needs_check("MSH|^~\\&|A\rPID|1\rPID|2", "2.5.1") == [
        ("sequence", "2.5.1", "", "MSH\rPID\rPID")]  # known segments, a new sequence
    assert [k[0] for k in shapes.needs_check("MSH|^~\\&|A\rPID|1|2", "2.5.1") or []] == ["segment"]
    assert shapes.needs_check(one, "2.4") is not None  # per version
    small = ShapeCheck(limit=3)
    for text in (one, two):
        small.accepted(small.needs_check(text, "2.5.1") or [])
    assert small.needs_check(one, "2.5.1") is not None  # its sequence, the oldest key, was forgotten
    assert small.verified == 2


def test_every_scenario_session_is_written_as_hl7apy_wrote_it_in_every_version() -> None:
    """The bundled scenarios' sessions, each charged or credited in one of the supported versions in turn (the
    golden files hold every charge in the configured version)."""
    from adapter.hl7v2.messages import session_charges
    from adapter.pipeline import process_paths

    report = process_paths(sorted((ROOT / "fixtures/fhir/scenarios").glob("*/input.json")), TABLES, NOW)
    sessions, _ = session_charges(report, TABLES)
    assert len(sessions) > 50
    for n, sc in enumerate(sessions):
        conf = dataclasses.replace(TABLES.hl7v2, version=SUPPORTED_VERSIONS[n % len(SUPPORTED_VERSIONS)])
        kind = (CHARGE, CREDIT)[n // len(SUPPORTED_VERSIONS) % 2]
        assert render(kind, sc.visit, sc.charges, "C1", NOW, conf) == \
            render_with_hl7apy(kind, sc.visit, sc.charges, "C1", NOW, conf), (sc.session, kind, conf.version)
