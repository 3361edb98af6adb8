"""The conformance package: a loadable FHIR NPM package whose URLs are exactly the ones the adapter writes."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from click.testing import CliRunner

from adapter import conformance
from adapter.cli import cli
from adapter.config import canonical_urls, load_tables

TABLES = load_tables()


def test_package_json_is_an_r4_package_depending_on_the_core() -> None:
    meta = conformance.manifest()
    assert meta["name"] == "fhir-charge-adapter.conformance" and meta["version"]
    assert meta["fhirVersions"] == ["4.0.1"]
    assert meta["dependencies"] == {"hl7.fhir.r4.core": "4.0.1"}
    assert meta["canonical"] == TABLES.settings.canonical_base


def test_package_defines_the_extension_and_identifier_systems_we_write() -> None:
    found = dict(conformance.resources())
    sd = found["StructureDefinition-cpt-modifier.json"]
    assert sd["url"] == TABLES.settings.modifier_extension
    assert sd["context"] == [{"type": "element", "expression": "ChargeItem"}]
    assert sd["fhirVersion"] == "4.0.1" and sd["type"] == "Extension"
    fixed = next(e for e in sd["differential"]["element"] if e["path"] == "Extension.url")
    assert fixed["fixedUri"] == TABLES.settings.modifier_extension
    systems = {r["uniqueId"][0]["value"] for r in found.values() if r["resourceType"] == "NamingSystem"}
    assert systems == {TABLES.settings.charge_identifier_system, TABLES.settings.claim_identifier_system}
    assert all(r["text"]["status"] == "generated" for r in found.values())


def test_export_rebases_and_indexes(tmp_path: Path) -> None:
    base = "https://fhir.hospital.test/r4"
    folder = conformance.export(tmp_path / "pkg", base)
    files = {p.name for p in folder.iterdir()}
    assert files == {"package.json", ".index.json", "StructureDefinition-cpt-modifier.json",
                     "NamingSystem-charge-line.json", "NamingSystem-claim.json",
                     "StructureDefinition-written-fingerprint.json", "StructureDefinition-offsets-charge.json",
                     "StructureDefinition-replaces.json", "StructureDefinition-claim-frequency.json",
                     "CodeSystem-claim-frequency.json", "ValueSet-claim-frequency.json",
                     "CodeSystem-review-reason.json", "CodeSystem-review-task-status.json",
                     "CodeSystem-review-task-input.json"}
    text = "".join(p.read_text() for p in folder.iterdir())
    assert "fhir-charge-adapter.org" not in text
    assert canonical_urls(base)["modifier_extension"] in text
    index = json.loads((folder / ".index.json").read_text())
    assert {f["filename"] for f in index["files"]} == files - {"package.json", ".index.json"}
    tgz = conformance.export(tmp_path / "out", tgz=True)
    with tarfile.open(tgz) as tar:
        assert sorted(tar.getnames()) == sorted(f"package/{name}" for name in files)


def test_the_package_ships_inside_the_python_package() -> None:
    assert conformance.PACKAGE_DIR.is_relative_to(Path(conformance.__file__).parent)
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"conformance/package/*.json"' in pyproject


def test_cli_export_writes_the_package(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["conformance", "export", "--out", str(tmp_path / "pkg")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pkg/package.json").exists()
