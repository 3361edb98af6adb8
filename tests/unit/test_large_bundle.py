"""A large Bundle read entry by entry (adapter.sources.large_bundle) gives what reading the file whole gives, and
leaves every file it does not expect to the whole-file read, having added nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.sources import files, large_bundle
from adapter.sources.files import ReadResult, read_file

SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=6)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["a", "url", "modifierExtension", "é"]), inner, max_size=3), max_leaves=8)
RESOURCES = st.fixed_dictionaries({"resourceType": st.sampled_from(["Patient", "Procedure", "Bundle"])},
                                  optional={"id": st.sampled_from(["1", "2", ""]), "x": VALUES})
ENTRIES = st.lists(st.one_of(
    st.fixed_dictionaries({"resource": RESOURCES}, optional={"fullUrl": st.sampled_from(["urn:uuid:1", " ", "a/b"])}),
    st.fixed_dictionaries({"request": st.fixed_dictionaries({"method": st.just("DELETE"),
                                                             "url": st.sampled_from(["Patient/1", "x"])})}),
    VALUES), max_size=6)


def read(path: Path, streamed: bool) -> tuple[ReadResult, str | None]:
    result = ReadResult()
    error = None
    try:
        if streamed:
            if not large_bundle.read_bundle(path, result, files.flatten):
                return result, "whole"
        else:
            read_file(path, result)
    except files.InputError as exc:
        error = str(exc)
    return result, error


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ENTRIES, st.sampled_from([1, 3, 64]), st.sampled_from([None, 2]), st.booleans())
def test_entry_by_entry_is_the_whole_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entries: list[Any],
                                          piece: int, indent: int | None, bom: bool) -> None:
    """Any entries (valid, empty, not objects, nested Bundles, deletes), cut into pieces of any size."""
    monkeypatch.setattr(large_bundle, "PIECE_CHARS", piece)
    path = tmp_path / "bundle.json"
    text = json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}, indent=indent,
                      ensure_ascii=bool(indent))
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass"))
    whole, error = read(path, streamed=False)
    streamed, streamed_error = read(path, streamed=True)
    assert error is None and streamed_error is None
    assert streamed.resources == whole.resources and streamed.problems == whole.problems


@pytest.mark.parametrize("text", [
    '{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "id": "1"}}, {"resource": ]}',
    '{"entry": [{"resource": {"resourceType": "Patient", "id": "1"}}], "resourceType": "Bundle"}',
    '{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "id": "1"}}], "type": "batch"}',
    '{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "id": "1"}}]} []',
    '{"resourceType": "Patient", "id": "1"}',
    '[{"resourceType": "Bundle"}]',
    '   ',
    '{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "id": "1"}}',
])
def test_what_the_scan_does_not_expect_is_left_to_the_whole_file_read(tmp_path: Path, text: str) -> None:
    path = tmp_path / "odd.json"
    path.write_text(text, encoding="utf-8")
    result, answer = read(path, streamed=True)
    assert answer == "whole" and result.resources == [] and result.problems == []


def test_bytes_that_are_not_utf8_are_left_to_the_whole_file_read(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    data = (b'{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "id": "1"}}, '
            b'{"resource": {"resourceType": "Patient", "id": "2", "x": "\xe9"}}]}')
    path.write_bytes(data)
    result, answer = read(path, streamed=True)
    assert answer == "whole" and result.resources == []
    bad = data.index(b"\xe9")
    assert read(path, streamed=False)[1] == f"{path}: not UTF-8 text (byte {bad})"


def test_read_file_scans_large_files_entry_by_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(large_bundle, "STREAM_BYTES", 10)
    parsed: list[Path] = []
    monkeypatch.setattr(large_bundle, "_scan", lambda text, path, result, free, flatten: parsed.append(path))
    path = tmp_path / "b.json"
    path.write_text('{"resourceType": "Bundle", "entry": []}', encoding="utf-8")
    read_file(path, ReadResult())
    assert parsed == [path]


FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "fhir"


def test_every_fixture_file_reads_the_same_entry_by_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scenarios, feeds and invalid inputs: the same resources, problems and errors as read whole."""
    paths = sorted(p for p in FIXTURES.rglob("*.json") if p.is_file())
    whole = files.read_paths(paths)
    monkeypatch.setattr(large_bundle, "STREAM_BYTES", -1)
    scanned: list[Path] = []
    real = large_bundle.read_bundle
    monkeypatch.setattr(large_bundle, "read_bundle",
                        lambda path, result, flatten: scanned.append(path) or real(path, result, flatten))
    streamed = files.read_paths(paths)
    assert len(scanned) == len(paths) > 50
    assert streamed.resources == whole.resources and streamed.problems == whole.problems
    assert [str(e) for e in streamed.unreadable] == [str(e) for e in whole.unreadable]
