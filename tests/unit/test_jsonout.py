"""Output JSON (adapter.jsonout): the value json.dumps wrote, at C speed; what orjson refuses is still written."""

from __future__ import annotations

import io
import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from adapter import jsonout

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=80, deadline=None)
@given(JSON_VALUES)
def test_the_json_value_is_the_one_json_dumps_writes(value: Any) -> None:
    for compact in (False, True):
        assert json.loads(jsonout.dumps(value, compact)) == json.loads(json.dumps(value))
    assert "\n" not in jsonout.dumps(value, compact=True)


def test_indented_output_is_laid_out_as_json_dumps_lays_it_out() -> None:
    value = {"resourceType": "Bundle", "entry": [{"a": [], "b": {}, "c": [1, "é\n\"", None, True]}], "n": 2.5}
    assert jsonout.dumps(value) == json.dumps(value, indent=2, ensure_ascii=False)
    assert jsonout.dumps(value, compact=True) == json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def test_what_orjson_refuses_is_written_by_the_json_module() -> None:
    value = {"text": "lone \ud800 surrogate", "big": 2**70}
    assert jsonout.dumps(value) == json.dumps(value, indent=2, ensure_ascii=False)
    assert jsonout.dumps(value, compact=True) == json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def test_written_output_is_the_dumped_text_and_a_newline() -> None:
    """To a text stream's UTF-8 buffer, or as text; by orjson, or by the json module for what orjson refuses."""
    orjsons: dict[str, Any] = {"resourceType": "Bundle", "entry": [{"text": "é"}]}
    for value, compact, wrapped in itertools.product([orjsons, {**orjsons, "big": 2**70}], [False, True],
                                                     [True, False]):
        raw = io.BytesIO()
        out: Any = io.TextIOWrapper(raw, encoding="utf-8") if wrapped else io.StringIO()
        out.write("before ")
        jsonout.write(value, out, compact)
        out.flush()
        text = raw.getvalue().decode("utf-8") if wrapped else out.getvalue()
        assert text == "before " + jsonout.dumps(value, compact) + "\n"


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["resourceType", "type", "null", "id"]), JSON_VALUES, max_size=3),
       st.lists(JSON_VALUES | st.just({"big": 2**70}), max_size=4), st.booleans(), st.booleans())
def test_a_bundle_written_entry_by_entry_is_the_bundle_written_whole(head: dict[str, Any], entries: list[Any],
                                                                    compact: bool, wrapped: bool) -> None:
    bundle = {**head, "entry": entries}
    raw = io.BytesIO()
    out: Any = io.TextIOWrapper(raw, encoding="utf-8") if wrapped else io.StringIO()
    jsonout.write_bundle(bundle, out, compact)
    out.flush()
    text = raw.getvalue().decode("utf-8") if wrapped else out.getvalue()
    assert text == jsonout.dumps(bundle, compact) + "\n" or any("big" in str(e) for e in entries)
    assert json.loads(text) == bundle
