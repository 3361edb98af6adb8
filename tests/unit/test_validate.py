"""Validation reuses the validated model of a part seen before; it must accept and reject exactly what a plain
fhir.resources validation of the whole resource accepts and rejects."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from adapter.building.validate import InvalidOutputError, validate_resource

from .test_engine_rules import coverage, procedure, run

REPORT = run(procedure("f1", "us", ("a", "b")), procedure("f2", "ct", ("c",), when="2026-03-04T11:00:00Z"),
             coverage())
RESOURCES = [r for s in REPORT.built.sessions for r in s.resources()]


def leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() if k != "resourceType" for p in leaves(v, (*path, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in leaves(v, (*path, i))]
    return [path]


def replaced(resource: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(resource)
    node = out
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return out


def plain_ok(resource: dict[str, Any]) -> bool:
    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except (ValidationError, ValueError, TypeError):
        return False
    return True


def reused_ok(resource: dict[str, Any]) -> bool:
    try:
        validate_resource(resource)
    except InvalidOutputError:
        return False
    return True


def test_the_built_resources_are_valid_both_ways() -> None:
    assert len(RESOURCES) == 4
    for res in RESOURCES:
        assert plain_ok(res) and reused_ok(res)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_broken_part_is_rejected_even_after_its_valid_twin_was_reused(data: st.DataObject) -> None:
    resource = data.draw(st.sampled_from(RESOURCES))
    path = data.draw(st.sampled_from(leaves(resource)))
    value = data.draw(st.sampled_from([None, -3, 2.5, "", "not a code!", True, [], {}, {"x": 1}, ["a"]]))
    broken = replaced(resource, path, value)
    validate_resource(resource)  # its parts are now cached
    assert reused_ok(broken) == plain_ok(broken), path


def test_errors_still_name_the_element() -> None:
    claim = next(r for r in RESOURCES if r["resourceType"] == "Claim")
    broken = replaced(claim, ("item", 0, "quantity", "value"), "many")
    with pytest.raises(InvalidOutputError, match=r"item\.0\.quantity"):
        validate_resource(broken, "Claim x")
