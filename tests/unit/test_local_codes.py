"""config/local-codes.json (a FHIR ConceptMap of the site's procedure codes) is validated at start, and a mapped
code is coded like its targets (docs/input-contract.md, local-code)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from adapter.cli import cli
from adapter.config import load_tables
from adapter.errors import ConfigError
from adapter.extraction.procedures import unmapped_local_code

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = json.loads((ROOT / "config/local-codes.json").read_text())
LOCAL = BUNDLED["group"][0]["source"]


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    target = tmp_path / "config"
    shutil.copytree(ROOT / "config", target)
    return target


def broken(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(BUNDLED)
    change(data)
    return data


BAD = [
    ("not JSON", "{ not json", "", "not valid JSON (line 1"),
    ("not a ConceptMap", {"resourceType": "ValueSet", "status": "active"}, "resourceType",
     "must be a FHIR R4 ConceptMap"),
    ("invalid ConceptMap", broken(lambda d: d.pop("status")), "status", "not a valid ConceptMap"),
    ("target system", broken(lambda d: d["group"][0].update(target="http://loinc.org")), "group[0].target",
     "neither SNOMED CT"),
    ("source is CPT", broken(lambda d: d["group"][0].update(source="http://www.ama-assn.org/go/cpt")),
     "group[0].source", "not a local code system"),
    ("no source", broken(lambda d: d["group"][0].pop("source")), "group[0].source", "names no code system"),
    ("equivalence", broken(lambda d: d["group"][0]["element"][0]["target"][0].update(equivalence="same")),
     "group[0].element[0].target[0].equivalence", "not an R4 ConceptMapEquivalence"),
    ("no target code", broken(lambda d: d["group"][0]["element"][0]["target"][0].pop("code")),
     "group[0].element[0].target[0].code", "is missing for equivalence equivalent"),
]


@pytest.mark.parametrize(("case", "content", "entry", "said"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_local_code_map_is_a_config_error_naming_the_file_and_what_is_wrong(
        config_dir: Path, case: str, content: Any, entry: str, said: str) -> None:
    path = config_dir / "local-codes.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError) as caught:
        load_tables(config_dir)
    assert caught.value.file == str(path) and caught.value.entry.startswith(entry) and said in caught.value.reason
    result = CliRunner().invoke(cli, ["--tables", str(config_dir), "dry-run", str(ROOT / "fixtures/fhir/scenarios/"
                                                                                  "01-single-us/input.json")])
    assert result.exit_code == 3 and str(path) in result.stderr and said in result.stderr


def test_only_mappings_that_mean_the_code_or_more_are_used(config_dir: Path) -> None:
    tables = load_tables(config_dir)
    assert tables.local_codes.targets[(LOCAL, "NRP-4410")] == (
        ("http://www.ama-assn.org/go/cpt", "10005", "Fine needle aspiration biopsy, including ultrasound guidance; "
                                                   "first lesion"),)
    assert (LOCAL, "NRP-4490") not in tables.local_codes.targets  # unmatched maps nothing
    data = broken(lambda d: d["group"][0]["element"][0]["target"][0].update(equivalence="narrower"))
    (config_dir / "local-codes.json").write_text(json.dumps(data))
    assert (LOCAL, "NRP-4410") not in load_tables(config_dir).local_codes.targets
    (config_dir / "local-codes.json").unlink()  # the file is optional
    assert not load_tables(config_dir).local_codes.targets


def test_what_makes_an_unmapped_code_worth_a_review() -> None:
    tables = load_tables()
    method = {"url": "http://hl7.org/fhir/StructureDefinition/procedure-method", "valueCodeableConcept": {}}
    local = {"coding": [{"system": LOCAL, "code": "NRP-1"}]}
    assert "procedure-method" in (unmapped_local_code({"code": local, "extension": [method]}, tables) or "")
    assert unmapped_local_code({"code": local}, tables) is None  # nothing says FNA: an ordinary local procedure
    snomed = {"coding": [{"system": "http://snomed.info/sct", "code": "80146002"}]}
    assert unmapped_local_code({"code": snomed, "extension": [method]}, tables) is None  # coded: not an FNA
    for text in ("US-guided FNA of thyroid", "fine-needle aspiration", "Fine Needle biopsy, neck"):
        assert unmapped_local_code({"code": {**snomed, "text": text}}, tables), text
    for text in ("DNA test", "Knee joint aspiration", "FNAx"):  # whole words only
        assert unmapped_local_code({"code": {**snomed, "text": text}}, tables) is None, text
