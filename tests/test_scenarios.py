"""Table-driven: every scenario in fixtures/fhir/scenarios is coded as its hand-written expected.json says,
and its full output is byte-identical to the reviewed golden file `output.json` beside it.

Regenerate the golden files after a deliberate change with `UPDATE_GOLDEN=1 ./scripts/test tests/test_scenarios.py`
and review the diff like code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from adapter.cli import cli, output_bundle
from adapter.config import load_tables
from adapter.pipeline import RunReport, process_paths

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted(p for p in (ROOT / "fixtures/fhir/scenarios").iterdir() if (p / "expected.json").exists())
NDJSON = ROOT / "fixtures/fhir/ndjson"
FEEDS = sorted(p for p in (ROOT / "fixtures/fhir/feeds").iterdir() if (p / "expected.json").exists())
TABLES = load_tables()


def short(ref: str) -> str:
    return ref.split("/", 1)[1]


def observed(report: RunReport) -> dict[str, Any]:
    """The same shape as expected.json, taken from a run."""
    return {
        "exit_code": report.exit_code,
        "lines": [{"code": ln.code, "modifiers": list(ln.modifiers), "units": ln.units,
                   "procedures": sorted(short(r) for r in ln.procedures)} for ln in report.coding.lines],
        "claims": [{"patient": s.claim["patient"]["reference"], "provider": s.claim["provider"]["reference"],
                    "items": [[i["productOrService"]["coding"][0]["code"],
                               [m["coding"][0]["code"] for m in i.get("modifier", [])], i["quantity"]["value"]]
                              for i in s.claim["item"]]}
                   for s in report.built.sessions if s.claim],
        "reviews": sorted(({"procedure": short(r.procedure), "reason": r.reason} for r in report.reviews),
                          key=lambda r: (r["procedure"], r["reason"])),
        "no_charge": sorted(short(f.ref) for f in report.coding.no_charge),
        "skipped": sorted(short(f.ref) for f in report.coding.skipped),
        "warnings": [{"code": w.code, "patient": w.subject} for w in report.built.warnings],
        "merged": sorted(({"procedure": short(f.ref), "into": short(f.merged_into or ""),
                           "reason": "part-of" if any(rule == "part-of" for rule, _ in f.notes) else "duplicate"}
                          for f in report.coding.merged), key=lambda m: m["procedure"]),
    }


def expected_of(folder: Path) -> dict[str, Any]:
    data = json.loads((folder / "expected.json").read_text())
    return {
        "exit_code": data["exit_code"],
        "lines": data["lines"] and [dict(ln, procedures=sorted(ln["procedures"])) for ln in data["lines"]],
        "claims": data["claims"],
        "reviews": sorted(data["reviews"], key=lambda r: (r["procedure"], r["reason"])),
        "no_charge": sorted(data["no_charge"]),
        "skipped": sorted(data["skipped"]),
        "warnings": data["warnings"],
        "merged": sorted(data.get("merged", []), key=lambda m: m["procedure"]),
    }


@pytest.mark.parametrize("folder", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_scenario_is_coded_as_a_coder_would(folder: Path) -> None:
    report = process_paths([folder / "input.json"], TABLES)
    assert observed(report) == expected_of(folder)


@pytest.mark.parametrize("folder", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_scenario_output_matches_the_reviewed_golden_file(folder: Path) -> None:
    result = CliRunner().invoke(cli, ["dry-run", str(folder / "input.json")])
    golden = folder / "output.json"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(result.stdout)
    assert result.stdout == golden.read_text()
    assert result.exit_code == json.loads((folder / "expected.json").read_text())["exit_code"]


def feed_files(folder: Path) -> list[Path]:
    """The input files of a feed fixture (everything but expected.json)."""
    return sorted(f for f in folder.iterdir() if f.suffix in (".json", ".ndjson") and f.name != "expected.json")


@pytest.mark.parametrize("folder", FEEDS, ids=[p.name for p in FEEDS])
def test_feed_is_coded_as_a_coder_would(folder: Path) -> None:
    """Inputs that cannot be one HAPI transaction: history Bundles, NDJSON repeats, several files."""
    report = process_paths(feed_files(folder), TABLES)
    assert observed(report) == expected_of(folder)
    assert not report.read.unreadable and not report.read.problems


@pytest.mark.parametrize("folder", FEEDS, ids=[p.name for p in FEEDS])
def test_feed_files_in_any_order_code_the_same(folder: Path) -> None:
    files = feed_files(folder)
    forward = output_bundle(process_paths(files, TABLES))
    assert output_bundle(process_paths(list(reversed(files)), TABLES)) == forward


def test_ndjson_input_codes_like_a_bundle() -> None:
    report = process_paths(sorted(NDJSON.glob("*.ndjson")), TABLES)
    assert observed(report) == expected_of(NDJSON)


def test_all_scenarios_together_code_the_same_as_each_alone() -> None:
    """Scenario ids never collide, so one run over the folder is the sum of the single runs."""
    together = output_bundle(process_paths([f / "input.json" for f in SCENARIOS], TABLES))
    alone = [e for f in SCENARIOS for e in output_bundle(process_paths([f / "input.json"], TABLES)).get("entry", [])]
    key = lambda e: e["fullUrl"]  # noqa: E731
    assert sorted(together["entry"], key=key) == sorted(alone, key=key)
