"""Table-driven: every scenario in fixtures/fhir/scenarios is coded as its hand-written expected.json says,
and its full output is byte-identical to the reviewed golden files beside it: `output.json` (the FHIR
transaction) and `hl7v2.txt` (the DFT^P03 messages, one segment per line, re-parsed and validated strictly).

Regenerate the golden files after a deliberate change with `UPDATE_GOLDEN=1 ./scripts/test tests/test_scenarios.py`
and review the diff like code.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from adapter.cli import cli, output_bundle
from adapter.config import load_tables
from adapter.hl7v2.messages import validate
from adapter.pipeline import RunReport, process_paths

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted(p for p in (ROOT / "fixtures/fhir/scenarios").iterdir() if (p / "expected.json").exists())
NDJSON = ROOT / "fixtures/fhir/ndjson"
FEEDS = sorted(p for p in (ROOT / "fixtures/fhir/feeds").iterdir() if (p / "expected.json").exists())
TABLES = load_tables()
GOLDEN_CLOCK = "2026-04-01T12:00:00Z"
"""The time of writing of the golden files (`dry-run --now`)."""
NOW = datetime(2026, 4, 1, 12, tzinfo=UTC)


def short(ref: str) -> str:
    return ref.split("/", 1)[1]


def _billing_provider(claim: dict[str, Any]) -> str:
    """`Organization/x` for a provider of the input, `NPI n` for a configured one (contained in the Claim)."""
    provider = claim["provider"]
    if provider["reference"].startswith("#"):
        [org] = [c for c in claim["contained"] if c["id"] == provider["reference"][1:]]
        assert provider["identifier"] == org["identifier"][0]  # the reference names what the Organization holds
        return f"NPI {provider['identifier']['value']}"
    return str(provider["reference"])


def _line(line: Any, item: dict[str, Any]) -> dict[str, Any]:
    out = {"code": line.code, "modifiers": list(line.modifiers), "units": line.units,
           "procedures": sorted(short(r) for r in line.procedures),
           "price": item["priceOverride"]["value"] if "priceOverride" in item else None}
    out["definition"] = (item.get("definitionCanonical") or [None])[0]
    out["account"] = [a["reference"] for a in item.get("account", [])]
    return out


def _claim(claim: dict[str, Any]) -> dict[str, Any]:
    return {
        "patient": claim["patient"]["reference"],
        "rendering": claim["careTeam"][0]["provider"]["reference"],
        "billing_provider": _billing_provider(claim),
        "insurer": claim["insurer"].get("reference") or claim["insurer"]["identifier"]["value"],
        "referral": claim.get("referral", {}).get("reference"),
        "place_of_service": {i["locationCodeableConcept"]["coding"][0]["code"] for i in claim["item"]}.pop(),
        "diagnoses": [d["diagnosisCodeableConcept"]["coding"][0]["code"] for d in claim.get("diagnosis", [])],
        "items": [[i["productOrService"]["coding"][0]["code"], [m["coding"][0]["code"] for m in i.get("modifier", [])],
                   i["quantity"]["value"], i["diagnosisSequence"], i.get("unitPrice", {}).get("value")]
                  for i in claim["item"]],
        "total": claim.get("total", {}).get("value"),
    }


def observed(report: RunReport) -> dict[str, Any]:
    """The same shape as expected.json, taken from a run."""
    return {
        "exit_code": report.exit_code,
        "lines": [_line(line, item) for s in report.built.sessions
                  for line, item in zip(s.session.lines, s.charge_items, strict=True)],
        "claims": [_claim(s.claim) for s in report.built.sessions if s.claim],
        "reviews": sorted(({"procedure": short(r.procedure), "reason": r.reason} for r in report.reviews),
                          key=lambda r: (r["procedure"], r["reason"])),
        "no_charge": sorted(short(f.ref) for f in report.coding.no_charge if not f.included_in),
        "included": sorted(({"procedure": short(f.ref), "in": short(f.included_in)}
                            for f in report.coding.no_charge if f.included_in), key=lambda i: i["procedure"]),
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
        "lines": [{"definition": None, "account": [], **ln, "procedures": sorted(ln["procedures"])}
                  for ln in data["lines"]],
        "claims": [{"referral": None, **claim} for claim in data["claims"]],
        "reviews": sorted(data["reviews"], key=lambda r: (r["procedure"], r["reason"])),
        "no_charge": sorted(data["no_charge"]),
        "included": sorted(data.get("included", []), key=lambda i: i["procedure"]),
        "skipped": sorted(data["skipped"]),
        "warnings": data["warnings"],
        "merged": sorted(data.get("merged", []), key=lambda m: m["procedure"]),
    }


@pytest.mark.parametrize("folder", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_scenario_is_coded_as_a_coder_would(folder: Path) -> None:
    report = process_paths([folder / "input.json"], TABLES, NOW)
    assert observed(report) == expected_of(folder)


@pytest.mark.parametrize("folder", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_scenario_output_matches_the_reviewed_golden_file(folder: Path) -> None:
    result = CliRunner().invoke(cli, ["dry-run", "--now", GOLDEN_CLOCK, str(folder / "input.json")])
    golden = folder / "output.json"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(result.stdout)
    assert result.stdout == golden.read_text()
    assert result.exit_code == json.loads((folder / "expected.json").read_text())["exit_code"]


@pytest.mark.parametrize("folder", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_scenario_hl7v2_messages_match_the_reviewed_golden_file(folder: Path) -> None:
    result = CliRunner().invoke(cli, ["dry-run", "--format", "hl7v2", "--now", GOLDEN_CLOCK,
                                      str(folder / "input.json")])
    golden = folder / "hl7v2.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(result.stdout)
    assert result.stdout == golden.read_text()
    messages = [m for m in golden.read_text().split("\n\n") if m.strip()]
    coded = json.loads((folder / "expected.json").read_text())
    sessions = {tuple(sorted(line["procedures"])) for line in coded["lines"]}
    held = [line for line in result.stderr.splitlines() if line.startswith("review:") and ": hl7v2-" in line]
    assert len(messages) <= len(sessions) and (len(messages) > 0 or not sessions or held)
    for text in messages:  # what the golden file holds is a valid message in the configured version
        parsed = validate(text.strip().replace("\n", "\r"), TABLES.hl7v2.version)
        assert parsed.msh.msh_9.to_er7().startswith("DFT^P03")
        assert {ft1.ft1_6.to_er7() for ft1 in parsed.children.get("DFT_P03_FINANCIAL") or []
                for ft1 in [ft1.ft1]} == {"CG"}
    assert result.exit_code == max(coded["exit_code"], 1 if held else 0)


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
    report = process_paths(sorted(NDJSON.glob("*.ndjson")), TABLES, NOW)
    assert observed(report) == expected_of(NDJSON)


def test_all_scenarios_together_code_the_same_as_each_alone() -> None:
    """Scenario ids never collide, so one run over the folder is the sum of the single runs."""
    together = output_bundle(process_paths([f / "input.json" for f in SCENARIOS], TABLES, NOW))
    alone = [e for f in SCENARIOS
             for e in output_bundle(process_paths([f / "input.json"], TABLES, NOW)).get("entry", [])]
    key = lambda e: e["fullUrl"]  # noqa: E731
    assert sorted(together["entry"], key=key) == sorted(alone, key=key)
