"""The parts of the streaming path that can be checked on their own: NDJSON read piece by piece gives what the
whole-file reading gave, masking free text from the store is `FreeText.mask`, a file found unreadable half way
leaves nothing behind, and the Bundle is written entry by entry exactly as the whole Bundle is written."""

from __future__ import annotations

import io
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter import jsonout
from adapter.config import load_tables
from adapter.errors import InputError
from adapter.redact import FreeText
from adapter.sources.files import EntryProblem, ReadResult, SourcedResource, flatten, read_file
from adapter.streaming.masking import StoredFreeText
from adapter.streaming.run import StreamRun
from adapter.streaming.store import SpillingRead, Store

EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NOW = datetime(2026, 4, 1, 12, tzinfo=UTC)


def whole_file_ndjson(path: Path) -> tuple[ReadResult, str | None]:
    """How NDJSON was read before it was read piece by piece (the whole file decoded, then `splitlines`): the
    oracle the streaming reader must agree with."""
    result = ReadResult()
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return result, f"{path}: not UTF-8 text (byte {exc.start})"
    if not text.strip():
        return result, f"{path}: file is empty"
    bad = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(f"line {number} is not valid JSON ({exc.msg})")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
            bad.append(f"line {number} is not a FHIR resource (no resourceType)")
            continue
        flatten(data, f"{path}:{number}", result, "modifierExtension" not in line)
    return result, (f"{path}: {'; '.join(bad)}" if bad else None)


LINES = [
    b'{"resourceType":"Patient","id":"p1","name":[{"family":"Caf\xc3\xa9"}]}',
    b'{"resourceType":"Procedure","id":"x","modifierExtension":[{"url":"u"}]}',
    b'{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient","id":"b"}},{}]}',
    b'{"resourceType":"Patient","id":"u","text":{"div":"\xe2\x82\xac \xf0\x9d\x84\x9e"}}',
    b'{"resourceType":"Patient","note":"a\xe2\x80\xa8b"}',  # U+2028 inside a string: splitlines breaks it
    b"", b"   ", b"\t", b"not json", b"[1, 2]", b'{"id": "no type"}',
]
BREAKS = [b"\n", b"\r\n", b"\r", b"\x0b", b"\xc2\x85", b"\xe2\x80\xa9"]
FAULTS = [b"", b"", b"", b"\xff", b"\xe2\x82", b"\xef\xbb\xbf"]


@EXAMPLES
@given(st.lists(st.tuples(st.sampled_from(LINES), st.sampled_from(BREAKS), st.sampled_from(FAULTS)), max_size=12),
       st.booleans(), st.integers(1, 40))
def test_ndjson_read_piece_by_piece_is_the_whole_file_read(tmp_path: Path, lines: list[tuple[bytes, bytes, bytes]],
                                                          bom: bool, chunk: int) -> None:
    path = tmp_path / "x.ndjson"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"".join(line + fault + brk for line, brk, fault in lines))
    expected, error = whole_file_ndjson(path)
    got = ReadResult()
    try:
        read_file(path, got, chunk_bytes=chunk)
        raised = None
    except InputError as exc:
        raised = str(exc)
    assert raised == error
    assert got.resources == expected.resources and got.problems == expected.problems


def test_a_file_unreadable_half_way_leaves_nothing_in_the_store(tmp_path: Path) -> None:
    good = tmp_path / "a.ndjson"
    good.write_text('{"resourceType":"Patient","id":"keep","name":[{"family":"Kept Name"}]}\n', encoding="utf-8")
    bad = tmp_path / "b.ndjson"
    bad.write_bytes(b'{"resourceType":"Patient","id":"gone","name":[{"family":"Gone Name"}]}\n'
                    b'{"resourceType":"Bundle","entry":[{}]}\n' + b"\xff\n")
    store = Store(tmp_path)
    read = SpillingRead(store)
    read_file(good, read, chunk_bytes=16)
    with pytest.raises(InputError, match="not UTF-8 text"):
        read_file(bad, read, chunk_bytes=16)
    store.finish_reading()
    assert [c.key for c in store.copies("Patient/keep")] == ["Patient/keep"]
    assert store.copies("Patient/gone") == [] and list(store.problems()) == []
    masker = StoredFreeText(store, lambda: ["Kept Name, Gone Name"])
    assert masker.mask("Kept Name, Gone Name") == "[text], Gone Name"
    store.close()


TEXTS = st.text(alphabet="ab c.", min_size=0, max_size=14)


@EXAMPLES
@given(st.lists(st.lists(TEXTS, max_size=4), max_size=6), st.lists(TEXTS, min_size=1, max_size=5),
       st.booleans())
def test_masking_from_the_store_is_free_text_masking(tmp_path: Path, resources: list[list[str]],
                                                   messages: list[str], loaded: bool) -> None:
    """Overlapping strings, strings inside strings, spaces around them: the strings loaded at once, and those
    found piece by piece (one string a piece), replace what FreeText replaces."""
    items = [{"resourceType": "Basic", "id": f"b{i}", "text": {"div": " ".join(strings)},
              "note": [{"text": s} for s in strings]} for i, strings in enumerate(resources)]
    store = Store(Path(tempfile.mkdtemp(dir=tmp_path)))
    for i, item in enumerate(items):
        store.add(SourcedResource(item, f"x:{i}"))
    store.finish_reading()
    texts = [" ".join([message, *[s for strings in resources for s in strings][:3], message]) for message in messages]
    masker = StoredFreeText(store, lambda: texts, in_memory_chars=10**6 if loaded else 1)
    assert masker.loaded or not loaded  # (not loaded: one string a piece, whenever a string can match)
    expected = FreeText.of(items)
    for text in texts:
        assert masker.mask(text) == expected.mask(text)
    store.close()


def test_superseded_copies_lose_their_free_text(tmp_path: Path) -> None:
    """`FreeText` of the in-memory path sees the current copies only: an older version's text is not masked."""
    store = Store(tmp_path)
    read = SpillingRead(store)
    for version, family in (("1", "Oldname"), ("2", "Newname")):
        flatten({"resourceType": "Patient", "id": "p", "meta": {"versionId": version},
                 "name": [{"family": family}]}, f"f:{version}", read)
    store.finish_reading()
    masker = StoredFreeText(store, lambda: ["Oldname Newname"], in_memory_chars=1)
    assert masker.mask("Oldname Newname") == "Oldname [text]"
    store.close()


@pytest.mark.parametrize("compact", [False, True])
def test_the_bundle_is_written_entry_by_entry_as_the_whole_bundle_is_written(compact: bool) -> None:
    tables = load_tables()
    with StreamRun(tables, NOW, compact=compact) as run:
        entries: list[dict[str, Any]] = [{"fullUrl": f"urn:x:{i}", "resource": {"resourceType": "Basic", "id": str(i),
                                          "text": "é\n\"", "n": [1.5, None, True, {"a": []}]}} for i in range(3)]
        for written in ([], entries):
            run.store.script("DROP TABLE IF EXISTS out; CREATE TABLE out(d, p, f, e, n, body)")
            run.store.db.executemany("INSERT INTO out VALUES ('', '', '', '', ?, ?)",
                                     [(i, run._entry_text(e).encode()) for i, e in enumerate(written)])
            out = io.StringIO()
            run.write_bundle(out)
            bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "transaction"}
            if written:
                bundle["entry"] = written
            assert out.getvalue() == jsonout.dumps(bundle, compact) + "\n"
            assert json.loads(out.getvalue()) == bundle


def test_a_problem_spilled_keeps_its_place(tmp_path: Path) -> None:
    store = Store(tmp_path)
    read = SpillingRead(store)
    flatten({"resourceType": "Bundle", "entry": [{"fullUrl": "x"}, 3]}, "f.json", read)
    store.finish_reading()
    assert list(store.problems()) == [EntryProblem("f.json#entry[0]", "entry has no resource"),
                                      EntryProblem("f.json#entry[1]", "entry is not a JSON object")]
    store.close()
