"""X12 837P output: golden interchanges per scenario and lifecycle case, each validated by pyx12.

fixtures/fhir/scenarios/*/claims.837 are the interchanges of `dry-run --format x12` (reviewed by hand against
the 005010X222A1 loops and segments); x12-review.txt lists the Claims left out and the element each lacks.
The lifecycle cases L3 (replacement, frequency 7) and L4 (void, frequency 8) have theirs beside case.json.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from adapter.building.claim837 import Control, Interchange, build_interchange, clean
from adapter.config import load_tables
from adapter.pipeline import process, process_paths
from adapter.sinks.reconcile import plan
from adapter.sources.files import SourcedResource
from adapter.x12.dry_run import dry_run_interchange

from .test_lifecycle_fixtures import _act, _changed, _resources
from .unit.test_lifecycle import Store
from .x12check import pyx12_errors

ROOT = Path(__file__).resolve().parent.parent
TABLES = load_tables()
NOW = datetime(2026, 4, 1, 12, tzinfo=UTC)
SCENARIOS = sorted(p for p in (ROOT / "fixtures/fhir/scenarios").iterdir() if (p / "expected.json").exists())
PAYER_CLAIM_NUMBER = "GLH26091500417"
"""The payer's claim control number the lifecycle cases' ClaimResponse carries (REF*F8 of the correction)."""


def _check_envelope(text: str) -> None:
    """What pyx12 leaves unchecked: fixed-width ISA, SE counts its transaction, trailers match their headers."""
    segments = text.rstrip("\n").split("~\n")
    assert segments[-1].endswith("~")
    segments[-1] = segments[-1][:-1]
    assert len(segments[0]) == 105 and segments[0].startswith("ISA*")
    isa13 = segments[0].split("*")[13]
    st = next(i for i, s in enumerate(segments) if s.startswith("ST*"))
    se = next(i for i, s in enumerate(segments) if s.startswith("SE*"))
    assert segments[se].split("*")[1] == str(se - st + 1)
    assert segments[-1] == f"IEA*1*{isa13}"
    assert segments[-2] == f"GE*1*{int(isa13)}"
    for segment in segments:
        assert "\n" not in segment and segment == segment.strip()


def _review_lines(interchange: Interchange) -> str:
    return "".join(f"{p.claim}: {p.element}: {p.detail}\n" for p in interchange.problems)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario_837p(scenario: Path) -> None:
    report = process_paths([scenario / "input.json"], TABLES, NOW)
    interchange = dry_run_interchange(report, TABLES, NOW)
    golden, reviews = scenario / "claims.837", scenario / "x12-review.txt"
    assert (interchange.text or "") == (golden.read_text() if golden.exists() else "")
    assert _review_lines(interchange) == (reviews.read_text() if reviews.exists() else "")
    claims = sum(1 for s in report.built.sessions if s.claim)
    assert len(interchange.claims) + len(interchange.problems) == claims  # every Claim goes, or is reported
    if interchange.text:
        assert pyx12_errors(interchange.text) == []
        _check_envelope(interchange.text)


def _correction(case: str) -> tuple[list[dict[str, Any]], Any, dict[str, str]]:
    """The Claims the planner writes in a lifecycle case, its report, and the payer's numbers of answered Claims."""
    spec = json.loads((ROOT / "fixtures/fhir/lifecycle" / case / "case.json").read_text())
    resources = _resources(spec["scenario"])
    store = Store()
    store.apply(plan(process([SourcedResource(r, "fixture") for r in resources], TABLES, now=NOW), [], TABLES,
                     now=NOW))
    answered: set[str] = set()
    for event in spec["server"]:
        answered |= _act(store, event)
    report = process([SourcedResource(r, "fixture") for r in _changed(resources, spec["change"])], TABLES, now=NOW)
    result = plan(report, store.all(), TABLES, answered=answered, now=NOW)
    claims = [e["resource"] for s in result.sessions for e in s.entries if e["resource"]["resourceType"] == "Claim"]
    return claims, report, dict.fromkeys(answered, PAYER_CLAIM_NUMBER)


@pytest.mark.parametrize(("case", "frequency"), [("L3-answered-claim-replaced", "7"),
                                                 ("L4-entered-in-error-after-billing", "8")])
def test_correction_837p(case: str, frequency: str) -> None:
    claims, report, numbers = _correction(case)
    assert [[e["valueCoding"]["code"] for e in c["extension"] if e["url"].endswith("/claim-frequency")]
            for c in claims] == [[frequency]]  # one frequency: the first Claim's 1 is not carried over
    interchange = build_interchange(claims, report.index.get, TABLES.x12, Control(7, NOW), numbers)
    assert interchange.problems == [] and len(interchange.claims) == 1
    assert interchange.text == (ROOT / "fixtures/fhir/lifecycle" / case / "claims.837").read_text()
    assert f":B:{frequency}*" in interchange.text and f"REF*F8*{PAYER_CLAIM_NUMBER}~" in interchange.text
    assert pyx12_errors(interchange.text) == []
    _check_envelope(interchange.text)
    without = build_interchange(claims, report.index.get, TABLES.x12, Control(7, NOW))
    assert without.text is None and without.problems[0].element == "2300 REF02 (F8)"


def test_pyx12_catches_a_broken_interchange() -> None:
    """The judge can fail: a wrong SBR01 and a partial birth date are errors to pyx12."""
    text = (ROOT / "fixtures/fhir/scenarios/01-single-us/claims.837").read_text()
    broken = text.replace("SBR*P*18", "SBR*Q*18").replace("DMG*D8*19780514", "DMG*D8*1978")
    assert len(pyx12_errors(broken)) >= 2


def test_values_never_carry_delimiters() -> None:
    assert clean("O'Brien*Smith~Jr:^\nIII  ", 60) == "O'Brien Smith Jr III"
    assert clean("x" * 80, 60) == "x" * 60


def test_dry_run_format_x12_prints_the_interchange_and_names_what_a_claim_lacks() -> None:
    from click.testing import CliRunner

    from adapter.cli import cli

    scenarios = ROOT / "fixtures/fhir/scenarios"
    ok = CliRunner().invoke(cli, ["dry-run", "--format", "x12", "--now", "2026-04-01T12:00:00Z",
                                  str(scenarios / "01-single-us/input.json")])
    assert ok.exit_code == 0 and ok.stdout == (scenarios / "01-single-us/claims.837").read_text()
    held = CliRunner().invoke(cli, ["dry-run", "--format", "x12", str(scenarios / "04-no-guidance-two/input.json")])
    assert held.exit_code == 1 and held.stdout == ""
    assert "review: Procedure/s04-fna-1: x12-missing-element: not in the 837P: 2000B SBR09 is required" in held.stderr
    streamed = CliRunner().invoke(cli, ["dry-run", "--format", "x12", "--stream", str(scenarios / "01-single-us")])
    assert streamed.exit_code == 3 and "coded in memory only" in streamed.output


def test_the_x12_sink_setting_needs_a_folder(tmp_path: Path) -> None:
    from adapter.errors import ConfigError
    from adapter.settings import load_settings

    path = tmp_path / "service.yaml"
    path.write_text("sinks:\n  fhir: false\n  x12: {enabled: true, folder: /var/spool/837}\n")
    sinks = load_settings(path, env={}).sinks
    assert (sinks.fhir, sinks.x12.enabled, sinks.x12.folder) == (False, True, "/var/spool/837")
    path.write_text("sinks:\n  x12: {enabled: true}\n")
    with pytest.raises(ConfigError, match=r"sinks\.x12\.folder"):
        load_settings(path, env={})


def test_with_require_837p_a_claim_lacking_an_element_waits_in_review_naming_it() -> None:
    from dataclasses import replace

    strict = replace(TABLES, settings=replace(TABLES.settings, require_837p=True))
    scenarios = ROOT / "fixtures/fhir/scenarios"
    held = process_paths([scenarios / "04-no-guidance-two/input.json"], strict, NOW)
    [session] = held.built.sessions
    assert session.claim is None and len(session.charge_items) == 2  # the ChargeItems are still written
    assert [(r.procedure, r.reason) for r in held.reviews] == [("Procedure/s04-fna-1", "x12-missing-element")]
    assert "the X12 837P 2000B SBR09 is required (Coverage.type has no claim filing indicator" in held.reviews[0].detail
    complete = process_paths([scenarios / "01-single-us/input.json"], strict, NOW)
    assert complete.reviews == [] and complete.built.sessions[0].claim is not None


def test_require_837p_must_be_a_boolean(tmp_path: Path) -> None:
    import shutil

    from adapter.errors import ConfigError

    shutil.copytree(ROOT / "config", tmp_path / "config")
    settings = tmp_path / "config/settings.yaml"
    settings.write_text(settings.read_text().replace("require_837p: false", "require_837p: sometimes"))
    with pytest.raises(ConfigError, match=r"output\.require_837p"):
        load_tables(tmp_path / "config")
    settings.write_text(settings.read_text().replace("require_837p: sometimes", "require_837p: true"))
    assert load_tables(tmp_path / "config").settings.require_837p is True
