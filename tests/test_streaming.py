"""The streaming path gives the in-memory path's answer byte for byte: the Bundle (indented and compact), the
charges table, every diagnostics line in its order, the summary and the exit code.

Over every bundled scenario and feed (alone and all together), the Synthea population when it was generated,
generated populations shuffled and split into a Bulk Data export's shape (one or more NDJSON files per
resource type, referenced resources after their referrers), and hypothesis-made mixes of scenarios with
repeated copies, older versions and entries left in Bundles; batches as small as one Procedure, so nearly every
ordering decision crosses a batch boundary.
"""

from __future__ import annotations

import copy
import io
import json
import random
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter import jsonout
from adapter.cli import cli, output_bundle
from adapter.config import load_tables
from adapter.pipeline import process_paths
from adapter.report import charges_table, diagnostics, summary
from adapter.streaming.run import StreamRun

ROOT = Path(__file__).resolve().parent.parent
FHIR = ROOT / "fixtures/fhir"
SCENARIOS = sorted(p for p in (FHIR / "scenarios").iterdir() if (p / "input.json").exists())
FEEDS = sorted(p for p in (FHIR / "feeds").iterdir() if p.is_dir())
"""The population `scripts/synthea generate` caches (the Synthea integration test generates it)."""
TABLES = load_tables()
NOW = datetime(2026, 4, 1, 12, tzinfo=UTC)
CLOCK = "2026-04-01T12:00:00Z"
EXAMPLES = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sys.path.insert(0, str(ROOT / "bench"))
from generate import generate  # noqa: E402


def in_memory(paths: list[Path]) -> tuple[str, str, str, list[str], int]:
    """(indented Bundle, compact Bundle, table, stderr lines, exit code) of the in-memory path."""
    report = process_paths(paths, TABLES, NOW)
    bundle = output_bundle(report)
    return (jsonout.dumps(bundle) + "\n", jsonout.dumps(bundle, compact=True) + "\n",
            charges_table(report) + "\n", [*diagnostics(report), summary(report)], report.exit_code)


def streamed(paths: list[Path], batch: int) -> tuple[str, str, str, list[str], int]:
    """The same from the streaming path (twice: the compact form is decided before coding)."""
    found: list[Any] = []
    for compact in (False, True):
        with StreamRun(TABLES, NOW, compact=compact, batch_procedures=batch) as run:
            run.read(paths)
            result = run.code()
            bundle, table = io.StringIO(), io.StringIO()
            run.write_bundle(bundle)
            run.write_table(table)
            found.append((bundle.getvalue(), table.getvalue(), [*result.diagnostics(), result.summary()],
                          result.exit_code))
    (indented, table, lines, code), (compact_text, *_) = found
    return indented, compact_text, table, lines, code


def assert_same(paths: list[Path], batch: int = 1) -> None:
    expected = in_memory(paths)
    got = streamed(paths, batch)
    for name, want, have in zip(("bundle", "compact bundle", "table", "diagnostics", "exit code"), expected, got,
                                strict=True):
        if name == "diagnostics" and have != want:
            first = next((i for i, (a, b) in enumerate(zip(have, want, strict=False)) if a != b), len(want))
            raise AssertionError(f"diagnostics differ from line {first}: {have[first:first + 1]} != "
                                 f"{want[first:first + 1]}")
        assert have == want, f"{name} differs"


@pytest.mark.parametrize("folder", SCENARIOS, ids=lambda p: p.name)
def test_every_scenario_streams_to_the_same_bytes(folder: Path) -> None:
    assert_same([folder / "input.json"])


@pytest.mark.parametrize("folder", FEEDS, ids=lambda p: p.name)
def test_every_feed_streams_to_the_same_bytes(folder: Path) -> None:
    assert_same([folder])


def test_all_fixtures_together_stream_to_the_same_bytes() -> None:
    """Every scenario, feed, NDJSON and invalid file in one run: ids repeat across scenarios (duplicates and
    conflicts), unreadable files, patients of many dates interleaved; batches of one and of many."""
    assert_same([FHIR], batch=1)
    assert_same([FHIR], batch=40)


def test_dry_run_streams_through_the_cli_with_the_same_stdout_stderr_and_exit_code() -> None:
    runner = CliRunner()
    for options in ([], ["--compact"], ["--format", "table"], ["--quiet"]):
        args = ["dry-run", "--now", CLOCK, *options, str(FHIR / "scenarios"), str(FHIR / "invalid")]
        memory = runner.invoke(cli, [*args, "--no-stream"])
        stream = runner.invoke(cli, [*args, "--stream"])
        assert memory.exit_code == 2 and stream.exit_code == memory.exit_code, stream.output
        assert stream.stdout == memory.stdout and stream.stderr == memory.stderr, options


def test_hl7v2_is_not_streamed() -> None:
    result = CliRunner().invoke(cli, ["dry-run", "--stream", "--format", "hl7v2", str(SCENARIOS[0] / "input.json")])
    assert result.exit_code == 3 and "hl7v2 is coded in memory only" in result.stderr  # a bad argument


# ------------------------------------------------------------------------------- Bulk Data export shapes
def export_shape(resources: list[dict[str, Any]], folder: Path, rng: random.Random, files_per_type: int = 3
                 ) -> list[Path]:
    """Write `resources` as a Bulk Data export writes them: grouped by type (Procedures first, so referenced
    resources come after their referrers), each type shuffled over up to `files_per_type` NDJSON files."""
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for resource in resources:
        by_type[resource["resourceType"]].append(resource)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    order = sorted(by_type, key=lambda t: (t != "Procedure", t))
    for n, kind in enumerate(order):
        items = by_type[kind]
        rng.shuffle(items)
        parts = rng.randint(1, files_per_type)
        for part in range(parts):
            path = folder / f"{n:02d}-{kind}.{part}.ndjson"
            path.write_text("".join(json.dumps(r) + "\n" for r in items[part::parts]), encoding="utf-8")
            written.append(path)
    return written


def test_a_generated_population_in_export_shape_streams_to_the_same_bytes(tmp_path: Path) -> None:
    rng = random.Random(11)
    resources = list(generate(600, prefix="x", seed=5))
    # a few more realistic faults: a repeated line, an older version, a Procedure of two patients' identifier
    resources.append(copy.deepcopy(resources[7]))
    older = copy.deepcopy(next(r for r in resources if r["resourceType"] == "Procedure"))
    older["meta"], older["status"] = {"versionId": "1"}, "in-progress"
    newer = next(r for r in resources if r["resourceType"] == "Procedure" and r["id"] == older["id"])
    newer["meta"] = {"versionId": "2"}
    resources.append(older)
    shared = [r for r in resources if r["resourceType"] == "Procedure"][10:12]
    for proc in shared:
        proc["identifier"] = [{"system": "urn:x-order", "value": "same"}]
    paths = export_shape(resources, tmp_path / "export", rng)
    assert_same(paths, batch=7)
    assert_same([tmp_path / "export"], batch=500)


def test_the_synthea_population_streams_to_the_same_bytes(synthea_population: Path) -> None:
    assert_same([synthea_population], batch=25)


# ------------------------------------------------------------------------------------------- property
def _entries(folder: Path) -> list[dict[str, Any]]:
    bundle = json.loads((folder / "input.json").read_text(encoding="utf-8"))
    return [{k: v for k, v in e.items() if k != "request"} for e in bundle["entry"]]


@EXAMPLES
@given(st.lists(st.sampled_from(SCENARIOS), min_size=1, max_size=6, unique=True), st.integers(0, 2**32 - 1),
       st.integers(1, 12), st.sampled_from([0.0, 0.3, 1.0]))
def test_any_mix_of_scenarios_in_any_file_shape_streams_to_the_same_bytes(
        folders: list[Path], seed: int, batch: int, in_bundles: float) -> None:
    """Scenarios mixed, their entries shuffled; some kept in Bundles (their fullUrls resolve `urn:uuid:`
    references), the rest spread over type-grouped NDJSON files; some resources repeated, some given an older
    version with other content."""
    import tempfile

    rng = random.Random(seed)
    entries = [e for folder in folders for e in _entries(folder)]
    rng.shuffle(entries)
    extra = []
    for entry in rng.sample(entries, k=min(3, len(entries))):
        twin = copy.deepcopy(entry)
        if rng.random() < 0.5:
            twin["resource"]["meta"] = {"versionId": "0"}
            twin["resource"]["id"] = twin["resource"].get("id", "x")
            twin["resource"]["status"] = "entered-in-error"
        extra.append(twin)
    entries += extra
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        kept = [e for e in entries if rng.random() < in_bundles]
        loose = [e["resource"] for e in entries if e not in kept]
        paths = export_shape(loose, folder / "ndjson", rng) if loose else []
        if kept:
            bundle = folder / "kept.json"
            bundle.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": kept}),
                              encoding="utf-8")
            paths.append(bundle)
        rng.shuffle(paths)
        assert_same(paths, batch=batch)


def test_dry_run_streams_by_itself_above_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the size threshold `dry-run` takes the streaming path (nothing else tells them apart)."""
    import adapter.cli.offline as cli_module

    used: list[str] = []
    real = cli_module.stream_paths

    def recording(*args: Any, **kwargs: Any) -> Any:
        used.append("stream")
        return real(*args, **kwargs)

    monkeypatch.setattr(cli_module, "stream_paths", recording)
    path = str(SCENARIOS[0] / "input.json")
    small = CliRunner().invoke(cli, ["dry-run", "--now", CLOCK, path])
    assert small.exit_code == 0 and used == []
    monkeypatch.setattr(cli_module, "STREAM_THRESHOLD_BYTES", 100)
    large = CliRunner().invoke(cli, ["dry-run", "--now", CLOCK, path])
    assert used == ["stream"] and large.stdout == small.stdout and large.stderr == small.stderr


def test_a_full_disk_under_the_index_is_one_line_naming_its_folder(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    import sqlite3

    from adapter.streaming.store import Store

    def full(self: Store) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Store, "flush", full)
    path = str(SCENARIOS[0] / "input.json")
    result = CliRunner().invoke(cli, ["dry-run", "--stream", "--workdir", str(tmp_path), path])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: the streaming index in {tmp_path}/charge-adapter-")
    assert "database or disk is full" in result.stderr and "--workdir" in result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


def test_backfill_of_files_writes_what_dry_run_prints(tmp_path: Path) -> None:
    runner = CliRunner()
    paths = [str(FHIR / "scenarios"), str(FHIR / "feeds")]
    for options in ([], ["--format", "table"]):
        dry_run = runner.invoke(cli, ["dry-run", "--no-stream", "--now", CLOCK, *options, *paths])
        out = tmp_path / "charges.out"
        backfill = runner.invoke(cli, ["backfill", "--now", CLOCK, *options, "--out", str(out), *paths])
        assert backfill.exit_code == dry_run.exit_code == 2  # the scenario folders hold expected.json files
        assert out.read_text(encoding="utf-8") == dry_run.stdout and backfill.stdout == ""
        assert backfill.stderr == dry_run.stderr


def test_backfill_needs_files_or_a_server() -> None:
    result = CliRunner().invoke(cli, ["backfill"], env={"FHIR_SERVER_URL": ""})
    assert result.exit_code == 3 and "give NDJSON files or folders" in result.stderr  # a bad argument
