"""`jsonin.loads` gives what `json.loads` gives: the same value (types included) or the same error."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter import jsonin


def exact(value: Any) -> Any:
    """A form in which 1, 1.0 and True, 0.0 and -0.0, and dict key order all differ."""
    if isinstance(value, dict):
        return ("dict", [(k, exact(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [exact(v) for v in value])
    return (type(value).__name__, repr(value))


def outcome(loads: Any, text: str) -> Any:
    try:
        return exact(loads(text))
    except json.JSONDecodeError as exc:
        return ("error", str(exc))


SCALARS = st.one_of(
    st.none(), st.booleans(), st.text(), st.sampled_from(["\ud800", "\udfff\ud800", "\u2028", "\x00", "é😀"]),
    st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**18, 10**19]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e300, 5e-324, 1e22, 0.1]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=5), inner, max_size=4)),
                      max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(VALUES, st.sampled_from([{}, {"indent": 2}, {"separators": (",", ":")}, {"ensure_ascii": False}]))
def test_any_json_text_reads_as_the_json_module_reads_it(value: Any, options: dict[str, Any]) -> None:
    text = json.dumps(value, **options)
    assert outcome(jsonin.loads, text) == outcome(json.loads, text)


@pytest.mark.parametrize("text", [
    '{"a": 1, "b": 2, "a": 3}', '{"a": {"x": 1}, "a": [2]}', "NaN", "[Infinity, -Infinity]", "1E400", "-1e400",
    "123456789012345678901234567890", "[-9223372036854775809]", '"\\ud800"', '["\\uDFFF\\uD800"]', "[1,]",
    '{"a":1,}', "[01]", "[1.]", "[.5]", '"a\tb"', "\ufeff{}", "", " ", "[", '{"a"}', "tru", '"\\x"', "1 2",
    '{"id": "12345678901234567890"}', " {\"a\": 1}\r\n", "[1e5, 1E-5, -0, -0.0, 0.30000000000000004]",
])
def test_texts_where_orjson_and_the_json_module_part_read_as_the_json_module_reads_them(text: str) -> None:
    assert outcome(jsonin.loads, text) == outcome(json.loads, text)
