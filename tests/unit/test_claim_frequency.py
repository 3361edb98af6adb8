"""Claim frequency (the 837P CLM05-3) in the claim-frequency extension: 1 on a first Claim, 7 on a replacement,
8 on a void; a Claim written before frequency 1 existed is not rewritten (nor replaced once answered) for it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapter.config import load_tables
from adapter.pipeline import process_paths
from adapter.sinks.ownership import stamped
from adapter.sinks.reconcile import plan

from .test_lifecycle import Store

ROOT = Path(__file__).resolve().parents[2]
TABLES = load_tables()
URL = TABLES.settings.claim_frequency_extension
NOW = datetime(2026, 4, 1, 12, tzinfo=UTC)


def _frequencies(claim: dict[str, Any]) -> list[str]:
    return [e["valueCoding"]["code"] for e in claim.get("extension") or [] if e["url"] == URL]


def _report(scenario: str) -> Any:
    return process_paths([next((ROOT / "fixtures/fhir/scenarios").glob(f"{scenario}-*")) / "input.json"], TABLES, NOW)


def test_a_first_claim_is_an_original_and_its_void_only_a_void() -> None:
    store = Store()
    store.apply(plan(_report("02"), [], TABLES, now=NOW))
    [claim] = store.of("Claim")
    assert _frequencies(claim) == ["1"]
    answered = {f"Claim/{claim['id']}"}
    report = _report("01")  # another patient's coding: 02's session is gone, its answered Claim is voided
    voids = [e["resource"] for s in plan(report, store.all(), TABLES, answered=answered, now=NOW).sessions
             for e in s.entries if e["resource"]["resourceType"] == "Claim" and "related" in e["resource"]]
    assert [_frequencies(v) for v in voids] == [["8"]]


def test_a_claim_written_without_frequency_is_left_as_it_is() -> None:
    store = Store()
    store.apply(plan(_report("02"), [], TABLES, now=NOW))
    [claim] = store.of("Claim")
    old = {k: v for k, v in claim.items() if k not in ("extension", "meta")}
    old = stamped({**old, "extension": [e for e in claim["extension"] if e["url"] != URL]},
                  TABLES.settings.fingerprint_extension)  # as a release before frequency 1 wrote it
    store.put(old)
    for answered in (set(), {f"Claim/{claim['id']}"}):  # still ours, and answered by a payer
        result = plan(_report("02"), store.all(), TABLES, answered=answered, now=NOW)
        assert result.writes == 0 and result.drift == [] and result.conflicts == []
