"""The command line as an analyst meets it: stdout, stderr and exit codes of dry-run and explain."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapter import redact
from adapter.cli import cli
from adapter.state.sqlite import SqliteState
from tests import logscan

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "fixtures/fhir/scenarios"
INVALID = ROOT / "fixtures/fhir/invalid"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "adapter", *args], capture_output=True, text=True, check=False)
    logscan.add_text(f"charge-adapter {' '.join(args)} (stderr)", result.stderr, debug="-vv" in args)
    return result


def scenario(name: str) -> str:
    return str(next(SCENARIOS.glob(f"{name}-*")) / "input.json")


def test_dry_run_prints_exactly_one_transaction_bundle_and_exits_0() -> None:
    result = run("dry-run", scenario("11"))
    assert result.returncode == 0, result.stderr
    bundle = json.loads(result.stdout)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == ["ChargeItem"] * 3 + ["Claim"]
    assert "3 charge lines" in result.stderr


def test_review_cases_exit_1_listing_procedure_and_reason() -> None:
    result = run("dry-run", scenario("34"))
    assert result.returncode == 1
    assert "review: Procedure/s34-fna-bad" in result.stderr and "invalid-resource" in result.stderr
    assert "Procedure has no subject" in result.stderr
    # the good Procedure of the same file is still coded
    assert [e["resource"]["code"]["coding"][0]["code"] for e in json.loads(result.stdout)["entry"]
            if e["resource"]["resourceType"] == "ChargeItem"] == ["10009"]


def test_unreadable_files_exit_2_naming_each_file_and_the_rest_is_still_coded() -> None:
    result = run("dry-run", str(INVALID), scenario("01"))
    assert result.returncode == 2
    for name in ("not-json.json", "not-fhir.json", "bad-line.ndjson", "empty.json"):
        assert f"cannot read {INVALID / name}:" in result.stderr, name
    assert "not valid JSON" in result.stderr and "file is empty" in result.stderr
    codes = [e["resource"]["code"]["coding"][0]["code"] for e in json.loads(result.stdout)["entry"]
             if e["resource"]["resourceType"] == "ChargeItem"]
    assert codes == ["10005"]


def test_missing_file_exits_2() -> None:
    result = run("dry-run", "no/such/file.json")
    assert result.returncode == 2 and "no/such/file.json: no such file" in result.stderr


def test_table_format_for_humans() -> None:
    result = CliRunner().invoke(cli, ["dry-run", "--format", "table", scenario("13")])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["Date", "Patient", "Performer", "CPT", "Mod", "Units", "Procedures", "Claim"]
    assert [line.split()[3:5] for line in lines[2:]] == [["10009", "1"], ["10005", "59"], ["10011", "59"]]


def test_explain_answers_why_this_code() -> None:
    result = CliRunner().invoke(cli, ["explain", scenario("11"), "--procedure", "s11-fna-2"])
    assert result.exit_code == 0
    text = result.stdout
    assert "extension[procedure-targetBodyStructure][0]" in text  # where each lesion came from
    assert "evidence extension[procedure-method][0]" in text  # the modality's evidence
    assert "10007-59 x1: first lesion under fluoroscopic guidance" in text
    assert "so modifier 59" in text and "add-on codes never take a modifier" in text


def test_explain_of_an_unknown_procedure_says_so() -> None:
    result = CliRunner().invoke(cli, ["explain", scenario("01"), "--procedure", "nope"])
    assert result.exit_code == 1 and result.stdout == ""
    assert "no such Procedure: Procedure/nope is not in the input" in result.stderr


def test_a_bad_table_is_a_configuration_error_naming_file_and_entry(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    mue = tmp_path / "config/mue.yaml"
    mue.write_text(mue.read_text().replace('"10021": {units: 1,', '"10021": {units: -1,'))
    result = run("--tables", str(tmp_path / "config"), "dry-run", scenario("01"))
    assert result.returncode == 3
    assert "mue.yaml: limits.10021: must be a whole number of at least 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_same_input_and_clock_same_bytes() -> None:
    first = run("dry-run", "--now", "2026-04-01T12:00:00Z", scenario("13"))
    second = run("dry-run", "--now", "2026-04-01T14:00:00+02:00", scenario("13"))
    assert first.stdout == second.stdout and first.stdout
    # without --now the clock is the time of writing, and nothing else changes
    clocked = json.loads(run("dry-run", scenario("13")).stdout)
    stamps = {e["resource"].get("created") or e["resource"].get("enteredDate") for e in clocked["entry"]}
    assert len(stamps) == 1 and stamps != {"2026-04-01T12:00:00Z"}
    written = datetime.fromisoformat(stamps.pop().replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - written).total_seconds()) < 120
    fixed = json.loads(first.stdout)
    for entry in [*fixed["entry"], *clocked["entry"]]:
        entry["resource"].pop("created", None)
        entry["resource"].pop("enteredDate", None)
    assert fixed == clocked


def test_explain_says_where_each_billing_decision_came_from() -> None:
    result = CliRunner().invoke(cli, ["explain", scenario("87")])
    assert "billing provider: Lakeshore Imaging Group (from PractitionerRole/s87-role.organization)" in result.stdout
    assert "base 640.00 - discount 320.00 = 320.00 USD" in result.stdout
    assert "place of service: 22 On Campus-Outpatient Hospital" in result.stdout
    waiting = CliRunner().invoke(cli, ["explain", scenario("85")])
    assert "Claim: waits in review (missing-diagnosis); the ChargeItems are written" in waiting.stdout


def test_stderr_carries_no_free_text_and_no_patient_reference_while_explain_does() -> None:
    inputs = sorted(str(p) for p in SCENARIOS.glob("*/input.json"))
    result = run("dry-run", "--compact", *inputs)
    forbidden = logscan.forbidden_texts(json.loads(Path(p).read_text()) for p in inputs)
    assert any(what == "BodyStructure.description" for what in forbidden.values())
    lines, findings = logscan.scan([("dry-run stderr", result.stderr)], forbidden, secrets=())
    assert lines > 10 and findings == []
    assert "BodyStructure/s40-bs-1 ([text] / [text]) is sampled under ultrasound" in result.stderr
    assert "no active Coverage for Patient/*** in the input" in result.stderr
    shown = run("explain", scenario("40"))
    assert any(text in shown.stdout for text, what in forbidden.items() if what == "BodyStructure.description")
    debug = run("-vv", "dry-run", scenario("35"))
    assert "no active Coverage for Patient/s35-pat" in debug.stderr  # debug level shows patient references


def test_hashed_patient_references_are_keyed_by_the_installation(tmp_path: Path) -> None:
    config = tmp_path / "adapter.yaml"
    config.write_text(f"state: {tmp_path / 'state.sqlite'}\nlogging:\n  patient_references: hashed\n")
    try:
        assert CliRunner().invoke(cli, ["--config", str(config), "status"]).exit_code == 0
        key = SqliteState(tmp_path / "state.sqlite").installation_id().encode()
        digest = hmac.new(key, b"Patient/p1", hashlib.sha256).hexdigest()[:12]
        assert redact.scrub("session of Patient/p1") == f"session of Patient/#{digest}"
    finally:
        redact.configure("omit")


FEEDS = ROOT / "fixtures/fhir/feeds"
CONTRACT = ROOT / "docs/input-contract.md"
STRUCTURE = [re.compile(p) for p in (
    r"^Session \d{4}-\d\d-\d\d  ", r"^ Procedures \(in counting order\):$", r"^  Procedure/\S+  performed ",
    r"^ Lesions \(each counted once, in order\):$", r"^  \d+\. .+  from Procedure/\S+ .+  -> ", r"^      evidence ",
    r"^ Lines:$", r"^ Lines: none while held; see the review list$")]
"""explain's structure lines: headers, the numbered lesion list and the evidence under a modality decision."""


def documented_rules() -> set[str]:
    """The rule names of docs/input-contract.md: the headings of section 9 (a heading may name several)."""
    section = CONTRACT.read_text(encoding="utf-8").split("\n## 9.", 1)[1].split("\n## ", 1)[0]
    return {name.strip() for heading in re.findall(r"^### (.+)$", section, re.M) for name in heading.split(",")}


def every_input() -> list[str]:
    """Every scenario, feed and NDJSON fixture (their ids never collide: one run is the sum of the single runs)."""
    feeds = [f for d in sorted(FEEDS.iterdir()) if d.is_dir() for f in sorted(d.iterdir())
             if f.suffix in (".json", ".ndjson") and f.name != "expected.json"]
    return [*(str(p) for p in sorted(SCENARIOS.glob("*/input.json"))), *map(str, feeds),
            *(str(p) for p in sorted((ROOT / "fixtures/fhir/ndjson").glob("*.ndjson")))]


def test_every_decision_explain_prints_names_a_documented_rule() -> None:
    rules = documented_rules()
    assert {"references", "modality", "lesions", "other-patient", "coding", "billing", "kind"} <= rules
    text = CliRunner().invoke(cli, ["explain", *every_input()]).stdout
    decisions = 0
    for line in text.splitlines():
        if not line.strip() or any(p.match(line) for p in STRUCTURE):
            continue
        named = re.findall(r"\(rule ([a-z0-9-]+)\)", line)
        assert named, f"explain prints a decision without its rule: {line!r}"
        assert set(named) <= rules, f"not a rule of docs/input-contract.md section 9: {named} in {line!r}"
        decisions += 1
    assert decisions > 1000
    for rule in rules - {"mue"}:  # every documented rule is named somewhere (mue only in reviews of 32 and 44)
        assert f"(rule {rule})" in text, rule
    assert "(rule mue)" in text


@pytest.mark.parametrize(("fixture", "rule", "said"), [
    ("scenarios/45-urn-uuid-references/input.json", "references", "subject urn:uuid:45a00000-0000-4000-8000-"
                                                                  "000000000000 is Patient/s45-pat (the fullUrl"),
    ("scenarios/46-contained-body-structure/input.json", "references", "#bs1 is Procedure/s46-fna-1#bs1 (contained"),
    ("scenarios/47-versioned-references/input.json", "references", "Patient/s47-pat/_history/1 is Patient/s47-pat "
                                                                   "(version 1)"),
    ("feeds/70-absolute-urls/bundle.json", "references", "https://ehr.northriver.example.org/fhir/Patient/s70-pat is "
                                                         "Patient/s70-pat (the fullUrl of a Bundle entry)"),
    ("scenarios/66-more-modality-codes/input.json", "modality", "modality: fluoroscopic guidance: 1 piece(s) of "
                                                                "guidance evidence, all agreeing"),
])
def test_explain_names_the_rule_where_the_audit_found_none(fixture: str, rule: str, said: str) -> None:
    text = CliRunner().invoke(cli, ["explain", str(ROOT / "fixtures/fhir" / fixture)]).stdout
    assert any(f"(rule {rule})" in line and said in line for line in text.splitlines()), text


def test_the_lazy_command_map_names_every_command_and_its_module() -> None:
    """`group.COMMAND_MODULES` is how a command's module gets imported; a command missing from it would vanish."""
    import importlib
    import pkgutil

    import adapter.cli as package
    from adapter.cli.group import COMMAND_MODULES

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"adapter.cli.{module.name}")
    registered = {name: command.callback.__module__.rsplit(".", 1)[1] for name, command in cli.commands.items()
                  if command.callback is not None}
    assert registered == COMMAND_MODULES


def test_dry_run_loads_neither_the_service_nor_the_fhir_client() -> None:
    script = ("import sys\nfrom adapter.cli import cli\n"
              "try:\n    cli.main(['dry-run', 'fixtures/fhir/scenarios/01-single-us/input.json'], prog_name='x')\n"
              "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
              "loaded = sorted(m for m in ('adapter.service', 'adapter.client', 'adapter.state') if m in sys.modules)\n"
              "print('loaded:', loaded, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "loaded: []" in proc.stderr, proc.stderr[-2000:]
