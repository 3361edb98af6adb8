"""Config tables are validated with errors naming file and entry; unreadable inputs name the file and why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adapter.config import DEFAULT_CONFIG_DIR, load_tables
from adapter.errors import ConfigError
from adapter.sources.files import read_paths


@pytest.fixture
def config_copy(tmp_path: Path) -> Path:
    target = tmp_path / "config"
    shutil.copytree(DEFAULT_CONFIG_DIR, target)
    return target


def replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(("file", "old", "new", "message"), [
    ("cpt-fna.yaml", 'primary: "10005"', 'primary: "76942"', r"cpt-fna.yaml: family.ultrasound: 76942 may never"),
    ("cpt-fna.yaml", 'add_on: "10012"', 'add_on: "10010"', r"cpt-fna.yaml: family.mr: code 10010 is used twice"),
    ("modalities.yaml", "modality: fluoroscopy, display: \"Fluoroscopy\"", "modality: xray",
     r"modalities.yaml: method_codes\[6\].modality: 'xray' is not one of"),
    ("mue.yaml", '"10004": {units: 3,', '"10004": {units: 0,', r"mue.yaml: limits.10004: must be a whole number"),
    ("mue.yaml", 'source: "AAPC', 'note: "AAPC',
     r"mue.yaml: limits.10021.note: unknown key \(known: effective, mai, rationale, site_decision, "),
    ("mue.yaml", 'source: "AAPC', 'source: null, x: "AAPC', r"mue.yaml: limits.10021.x: unknown key"),
    ("mue.yaml", 'source: "AAPC', 'source: null} # "AAPC',
     r"mue.yaml: limits.10021: needs a source or a site_decision"),
    ("chargemaster.yaml", "unit_price: 412.00", "unit_prise: 412.00",
     r"chargemaster.yaml: items\[\d\]\.unit_prise: unknown key \(known: charge_code, cpt, "),
    ("cpt-fna.yaml", "primary_display:", "primary_dispaly:",
     r"cpt-fna.yaml: family\.\w+\.primary_dispaly: unknown key"),
    ("input.yaml", 'code: "24028007", side: right', 'code: "24028007", side: up', r"input.yaml: laterality\[1\].side"),
    ("settings.yaml", "when_missing: review", "when_missing: guess", r"settings.yaml: guidance.when_missing"),
    ("settings.yaml", 'distinct_modifier: "59"', 'distinct_modifier: "XU"', r"coding.distinct_modifier: 'XU'"),
    ("settings.yaml", 'time_zone: "UTC"', 'time_zone: "Mars/Olympus"', r"session.time_zone: unknown time zone"),
    ("fna-valueset.yaml", "fna:", "fna: [\n", r"fna-valueset.yaml: line \d+: not valid YAML"),
    ("input.yaml", "local_bases: []", 'local_bases: ["ehr.example.org/fhir"]', r"input.yaml: local_bases\[0\]: "),
    ("input.yaml", "local_bases: []", 'local_bases: ["urn:uuid:1"]', r"input.yaml: local_bases\[0\]: "),
])
def test_config_errors_name_the_file_and_the_entry(config_copy: Path, file: str, old: str, new: str,
                                                   message: str) -> None:
    replace(config_copy / file, old, new)
    with pytest.raises(ConfigError, match=message):
        load_tables(config_copy)


def test_missing_config_file_is_named(config_copy: Path) -> None:
    (config_copy / "mue.yaml").unlink()
    with pytest.raises(ConfigError, match=r"mue.yaml: file not found"):
        load_tables(config_copy)


def test_table_version_changes_with_the_tables(config_copy: Path) -> None:
    before = load_tables(config_copy).version
    replace(config_copy / "mue.yaml", '"10004": {units: 3,', '"10004": {units: 4,')
    assert load_tables(config_copy).version != before


def test_unreadable_files_are_reported_and_the_rest_still_read(tmp_path: Path) -> None:
    good = {"resourceType": "Patient", "id": "p1"}
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "broken.json").write_text('{"resourceType": "Bundle", ')
    (tmp_path / "plain.json").write_text('{"hello": 1}')
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "lines.ndjson").write_text(json.dumps(good | {"id": "p2"}) + "\n{oops\n")
    result = read_paths([tmp_path, tmp_path / "missing.json"])
    assert sorted(r.resource["id"] for r in result.resources) == ["p1", "p2"]
    messages = sorted(str(e) for e in result.unreadable)
    assert any("broken.json: not valid JSON (line 1" in m for m in messages)
    assert any("plain.json: not a FHIR resource" in m for m in messages)
    assert any("empty.json: file is empty" in m for m in messages)
    assert any("lines.ndjson: line 2 is not valid JSON" in m for m in messages)
    assert any("missing.json: no such file" in m for m in messages)


def test_bundle_entries_without_resources_are_problems_not_failures(tmp_path: Path) -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1"}}, {"fullUrl": "urn:x"}, {"resource": {"id": "x"}},
        {"request": {"method": "DELETE", "url": "Patient/p9"}},
        {"resource": {"resourceType": "Bundle", "type": "collection",
                      "entry": [{"resource": {"resourceType": "Patient", "id": "p2"}}]}}]}
    (tmp_path / "b.json").write_text(json.dumps(bundle))
    result = read_paths([tmp_path / "b.json"])
    assert [r.resource["id"] for r in result.resources] == ["p1", "p9", "p2"]
    assert [r.deleted for r in result.resources] == [False, True, False]  # a history DELETE: the newest version
    assert [(p.origin.split("#")[1], p.reason) for p in result.problems] == [
        ("entry[1]", "entry has no resource"), ("entry[2]", "entry resource has no resourceType")]


def test_local_bases_are_read_normalized(config_copy: Path) -> None:
    replace(config_copy / "input.yaml", "local_bases: []",
            'local_bases: ["HTTPS://EHR.Example.org:443/fhir/", "http://10.0.0.5:8080/fhir"]')
    assert load_tables(config_copy).local_bases == {"https://ehr.example.org/fhir", "http://10.0.0.5:8080/fhir"}
    assert load_tables().local_bases == frozenset()  # the default: only the server's base, online
