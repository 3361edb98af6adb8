"""A population nobody here wrote: Synthea 3.3.0 (lung cancer module, FHIR R4 transaction Bundles, a fixed seed;
generated and cached by scripts/synthea) through dry-run and through sync on a real HAPI server.

Every Procedure is coded, skipped or reviewed for the right stated reason, none is unreadable, nothing crashes.
Synthea writes every reference as a urn:uuid or a conditional reference, puts no performer on a Procedure
(the clinician is the encounter's primary performer) and records no imaging guidance: its FNAs must reach the
coding rules with patient, encounter and provider resolved, and stop only at the missing modality.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from adapter.cli import cli
from adapter.client import FhirClient
from adapter.config import load_tables
from adapter.dated import Effective, Rows
from adapter.extraction.procedures import Kind
from adapter.pipeline import process_paths
from adapter.sync import Syncer

from .helpers import server_now

ROOT = Path(__file__).resolve().parents[2]
TABLES = load_tables()
GUIDANCE_NONE = dataclasses.replace(TABLES, settings=dataclasses.replace(TABLES.settings, when_missing="none"))
UNGUIDED = dataclasses.replace(GUIDANCE_NONE, family={m: Rows(((Effective(), rows.any),))
                                                      for m, rows in TABLES.family.items()})
"""Synthea records no guidance: with `guidance.when_missing: none` its FNAs are coded as unguided (10021). Its FNAs
are dated 1988-2002, before the CPT FNA family began (2019-01-01, config/cpt-fna.yaml; rule effective-dates): the
shipped table sends them to review `no-row-for-date` (checked below), so the population is coded here with the
family's rows valid on every date."""
FNA_LUNG = "432231006"


@pytest.fixture(scope="module")
def population(synthea_population: Path) -> Path:
    return synthea_population


def bundles(folder: Path) -> list[Path]:
    """Hospitals and practitioners first (patients' Bundles reference them conditionally), then patients."""
    files = sorted(folder.glob("*.json"))
    info = [f for f in files if f.name.startswith(("hospitalInformation", "practitionerInformation"))]
    return info + [f for f in files if f not in info]


def procedures_in(folder: Path) -> list[dict[str, Any]]:
    return [e["resource"] for f in bundles(folder) for e in json.loads(f.read_text())["entry"]
            if e["resource"]["resourceType"] == "Procedure"]


def test_dry_run_accounts_for_every_procedure(population: Path) -> None:
    report = process_paths([population], TABLES)
    procedures = procedures_in(population)
    assert not report.read.unreadable and not report.problems
    assert len(report.facts) == len(procedures) > 1000
    fnas = [f for f in report.facts if f.kind is Kind.FNA]
    assert len(fnas) == sum(1 for p in procedures if FNA_LUNG in json.dumps(p["code"])) >= 1
    # every FNA is read completely (subject, encounter and provider resolved from urn:uuid and conditional
    # references) and stops only at the guidance Synthea does not record
    assert sorted((r.procedure, r.reason) for r in report.reviews) == sorted((f.ref, "modality-missing") for f in fnas)
    for fna in fnas:
        assert fna.patient and fna.patient.startswith("Patient/")
        assert fna.encounter.startswith("Encounter/")
        assert fna.rendering and fna.rendering.startswith("Practitioner/"), fna.notes
        assert any(rule == "rendering-provider" and "primary performer of Encounter/" in text
                   for rule, text in fna.notes)
    # everything else is not an FNA: skipped, with that reason
    assert {f.ref for f in report.coding.skipped} == {f.ref for f in report.facts if f.kind is Kind.OTHER}
    assert len(report.coding.skipped) == len(procedures) - len(fnas)

    result = CliRunner().invoke(cli, ["dry-run", "--quiet", str(population)])
    assert result.exit_code == 1, result.output  # the reviews
    assert "Traceback" not in result.output and "modality-missing" in result.stderr


def test_fnas_before_the_2019_family_are_reviewed_with_the_shipped_tables(population: Path) -> None:
    report = process_paths([population], GUIDANCE_NONE)
    fnas = [f for f in report.facts if f.kind is Kind.FNA]
    early = {f.ref for f in fnas if f.service_date and f.service_date < "2019-01-01"}
    assert early == {f.ref for f in fnas}  # the fixed seed's lung cancer FNAs are all from before 2019
    assert sorted((r.procedure, r.reason) for r in report.reviews) == sorted((ref, "no-row-for-date") for ref in early)
    assert not report.coding.lines


def test_unguided_setting_codes_every_synthea_fna(population: Path) -> None:
    report = process_paths([population], UNGUIDED)
    fnas = [f for f in report.facts if f.kind is Kind.FNA]
    assert not report.reviews
    assert sorted(ln.procedures[0] for ln in report.coding.lines) == sorted(f.ref for f in fnas)
    assert {ln.code for ln in report.coding.lines} == {"10021"}
    # Synthea's R4 export has no Coverage; its FNAs are dated before the chargemaster's effective period
    # (config/chargemaster.yaml), so they are written without a price and say so
    assert {w.code for w in report.built.warnings} <= {"no-coverage", "missing-price"}
    assert any(w.code == "no-coverage" for w in report.built.warnings)
    for warning in report.built.warnings:
        if warning.code == "missing-price":
            assert "config/chargemaster.yaml has no row for 10021 on " in warning.detail
            assert not warning.detail.split("10021 on ", 1)[1].startswith("2026-")


def test_sync_codes_the_population_like_dry_run(client: FhirClient, population: Path) -> None:
    since = server_now(client)
    for path in bundles(population):
        client.transaction(json.loads(path.read_text()))
    offline = process_paths([population], UNGUIDED)
    summary = Syncer(client, UNGUIDED).sync(since)
    assert not summary.failures and not summary.reviews
    assert summary.procedures == sum(1 for f in offline.facts if f.kind is Kind.FNA)
    fna_patients = sorted({p["subject"]["reference"] for p in client.search_all(
        "Procedure", {"code": f"http://snomed.info/sct|{FNA_LUNG}", "_lastUpdated": f"ge{since}", "_count": "100"})})
    written = list(client.search_all("ChargeItem", {"subject": ",".join(fna_patients), "_count": "100"}))

    def charge(item: dict[str, Any]) -> tuple[str, float, str, bool]:
        return (item["code"]["coding"][0]["code"], item["quantity"]["value"], item["occurrenceDateTime"],
                item["performer"][0]["actor"]["reference"].startswith("Practitioner/"))

    expected = [charge(r) for s in offline.built.sessions for r in s.charge_items]
    assert sorted(charge(r) for r in written) == sorted(expected)
    assert len(written) == summary.procedures
