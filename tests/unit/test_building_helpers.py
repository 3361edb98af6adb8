"""Helpers of the builder that were made cheaper must give what the plain library calls give."""

from __future__ import annotations

import json
import uuid
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from adapter.building.identifiers import _NAMESPACE, full_url, uuid5
from adapter.building.resources import _dedupe

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                max_size=3), max_leaves=8)


@given(st.text())
def test_uuid5_is_the_standard_librarys(name: str) -> None:
    assert uuid5(name) == str(uuid.uuid5(_NAMESPACE, name))


def test_full_url_is_a_urn_uuid_of_system_and_value() -> None:
    assert full_url("http://s", "v") == f"urn:uuid:{uuid.uuid5(_NAMESPACE, 'http://s|v')}"


def _plain_dedupe(items: list[Any]) -> list[Any]:
    seen: set[str] = set()
    out = []
    for item in items:
        key = json.dumps(item, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


@settings(max_examples=300)
@given(st.lists(st.dictionaries(st.sampled_from(["coding", "text", "a"]), JSON, max_size=3), max_size=4))
def test_dedupe_keeps_what_sorted_json_tells_apart(items: list[dict[str, Any]]) -> None:
    items = items + [dict(reversed(list(i.items()))) for i in items[:1]]  # the same content in another key order
    assert _dedupe(items) == _plain_dedupe(items)
    assert [id(i) for i in _dedupe(items)] == [id(i) for i in _plain_dedupe(items)]
