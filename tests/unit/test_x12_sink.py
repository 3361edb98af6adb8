"""The X12 folder sink: control numbers recorded in the state, a resend reuses them, an outage loses nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from adapter.config import load_tables
from adapter.pipeline import process_paths
from adapter.sinks.reconcile import plan
from adapter.x12.dry_run import run_claims
from adapter.x12.sink import MemoryRegister, SqliteRegister, X12Sink, batch_key
from adapter.x12.step import written_claims

from ..x12check import pyx12_errors

ROOT = Path(__file__).resolve().parents[2]
TABLES = load_tables()
T0 = datetime(2026, 4, 1, 12, tzinfo=UTC)


def _report(scenario: str, now: datetime = T0):
    return process_paths([ROOT / "fixtures/fhir/scenarios" / scenario / "input.json"], TABLES, now)


def _register(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    if kind == "sqlite":
        return SqliteRegister(tmp_path / "state.sqlite")
    if kind == "postgres":
        from adapter.state.postgres import PostgresState
        from adapter.x12.pg_register import PostgresRegister

        return PostgresRegister(PostgresState(request.getfixturevalue("pg_url")))
    return MemoryRegister()


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "memory"])
def test_register_reuses_a_batch_number_and_time(tmp_path: Path, kind: str, request: pytest.FixtureRequest) -> None:
    register = _register(kind, tmp_path, request)
    first = register.assign("a", T0)
    assert (first.number, first.created) == (1, T0)
    assert register.assign("a", T0 + timedelta(hours=1)) == first
    assert register.assign("b", T0 + timedelta(hours=1)).number == 2
    assert register.pending() == []
    register.keep(2, "text of 2")
    register.keep(2, "other text")  # a stored interchange is never rewritten
    register.keep(1, "text of 1")
    assert register.pending() == [(1, "text of 1"), (2, "text of 2")]
    register.written(1)
    assert register.pending() == [(2, "text of 2")]
    if kind == "sqlite":  # the numbers live in the state file, not the process
        assert SqliteRegister(tmp_path / "state.sqlite").assign("a", T0 + timedelta(days=1)) == first
        assert SqliteRegister(tmp_path / "state.sqlite").assign("c", T0).number == 3


def test_resend_writes_the_same_interchange(tmp_path: Path) -> None:
    register = SqliteRegister(tmp_path / "state.sqlite")
    out = tmp_path / "out"
    report = _report("17-different-days")
    sink = X12Sink(TABLES.x12, register, out, clock=lambda: T0)
    result = sink.deliver(run_claims(report), report.index.get)
    assert result.files == ["837P-000000001.x12"] and result.claims == 2 and result.failure is None
    text = (out / "837P-000000001.x12").read_text()
    assert pyx12_errors(text) == []
    # the same Claims planned again an hour later (new created time): same number, same bytes, no second file
    later = _report("17-different-days", T0 + timedelta(hours=1))
    assert batch_key(run_claims(later)) == batch_key(run_claims(report))
    again = X12Sink(TABLES.x12, SqliteRegister(tmp_path / "state.sqlite"), out,
                    clock=lambda: T0 + timedelta(hours=1)).deliver(run_claims(later), later.index.get)
    assert again.files == [] and sorted(p.name for p in out.iterdir()) == ["837P-000000001.x12"]
    assert (out / "837P-000000001.x12").read_text() == text
    other = _report("01-single-us")
    assert sink.deliver(run_claims(other), other.index.get).files == ["837P-000000002.x12"]


def test_a_claim_lacking_an_element_is_reported_not_written(tmp_path: Path) -> None:
    report = _report("04-no-guidance-two")
    result = X12Sink(TABLES.x12, MemoryRegister(), tmp_path, clock=lambda: T0).deliver(run_claims(report),
                                                                                       report.index.get)
    assert result.files == [] and [p.element for p in result.problems] == ["2000B SBR09"]
    assert result.problems[0].procedures == ("Procedure/s04-fna-1",)
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_folder_keeps_the_interchange_for_the_next_pass(tmp_path: Path) -> None:
    blocked = tmp_path / "out"
    blocked.write_text("a file where the folder should be")
    register = SqliteRegister(tmp_path / "state.sqlite")
    report = _report("01-single-us")
    sink = X12Sink(TABLES.x12, register, blocked, clock=lambda: T0)
    failed = sink.deliver(run_claims(report), report.index.get)
    assert failed.failure and "837P-000000001.x12" in failed.failure and failed.files == []
    blocked.unlink()
    retried = X12Sink(TABLES.x12, SqliteRegister(tmp_path / "state.sqlite"), blocked, clock=lambda: T0).deliver(
        [], report.index.get)  # a later pass with no new Claims still writes what is pending
    assert retried.files == ["837P-000000001.x12"]
    assert register.pending() == []


def test_the_pass_sends_the_claims_it_wrote() -> None:
    report = _report("18-different-performers")
    writes = plan(report, [], TABLES, now=T0)
    claims = written_claims(writes, {})
    assert len(claims) == 2 and all(c["resourceType"] == "Claim" for c in claims)
    assert written_claims(writes, {writes.sessions[0].label: object()}) == claims[1:]


@pytest.mark.parametrize("required", [False, True])
def test_a_service_with_the_sink_and_without_require_837p_says_so_at_start(
        tmp_path: Path, required: bool, caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses

    from adapter.client import FhirClient
    from adapter.service import Service
    from adapter.settings import X12SinkSettings, load_settings
    from adapter.state.memory import MemoryState
    from adapter.x12.sink import WITHOUT_REQUIRE_837P

    settings = load_settings(None, env={})
    settings = dataclasses.replace(settings, sinks=dataclasses.replace(
        settings.sinks, x12=X12SinkSettings(True, str(tmp_path))))
    tables = dataclasses.replace(TABLES, settings=dataclasses.replace(TABLES.settings, require_837p=required))
    with caplog.at_level("WARNING", logger="adapter.service"):
        Service(settings, tables, client=FhirClient("http://127.0.0.1:9/fhir"), state=MemoryState())
    assert (WITHOUT_REQUIRE_837P in caplog.messages) is not required
