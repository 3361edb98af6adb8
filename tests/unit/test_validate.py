"""Validation by shape must accept and reject exactly what a plain fhir.resources `model_validate` of the whole
resource accepts and rejects, whatever was validated before (the shapes and values it remembers)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from adapter import validation
from adapter.validation import InvalidOutputError, validate_resource

from .test_engine_rules import coverage, procedure, run

ROOT = Path(__file__).resolve().parents[2]
REPORT = run(procedure("f1", "us", ("a", "b")), procedure("f2", "ct", ("c",), when="2026-03-04T11:00:00Z"),
             coverage())
RESOURCES = [r for s in REPORT.built.sessions for r in s.resources()]


def _corpus() -> list[dict[str, Any]]:
    """Every resource the scenario fixtures hold: the goldens' ChargeItems and Claims, and the inputs' Patients,
    Procedures, Coverages, Encounters, BodyStructures, ChargeItemDefinitions and the rest."""
    found: list[dict[str, Any]] = list(RESOURCES)
    for path in sorted((ROOT / "fixtures/fhir/scenarios").glob("*/*.json")):
        if path.name not in ("input.json", "output.json"):
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data.get("entry") or [] if data.get("resourceType") == "Bundle" else [{"resource": data}]
        found += [e["resource"] for e in entries if isinstance(e.get("resource"), dict)]
    return found


CORPUS = _corpus()
OUTPUT = [r for r in CORPUS if r["resourceType"] in ("ChargeItem", "Claim")]


def plain_ok(resource: dict[str, Any]) -> bool:
    """The reference verdict: fhir.resources R4B validates the whole resource."""
    try:
        model = get_fhir_model_class(resource.get("resourceType"))  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return False
    try:
        model.model_validate(copy.deepcopy(resource))
    except (ValidationError, ValueError, TypeError, AttributeError):  # fhir.resources trips on some shapes
        return False
    return True


def fast_ok(resource: dict[str, Any]) -> bool:
    try:
        validate_resource(resource, "the resource")
    except InvalidOutputError as exc:
        assert str(exc).startswith("the resource failed FHIR R4 validation")
        return False
    return True


# -- paths into a resource -------------------------------------------------------------------------------------

Path_ = tuple[Any, ...]


def walk(node: Any, path: Path_ = ()) -> list[tuple[Path_, Any]]:
    """Every (path, value) below `node`, the node itself first."""
    out = [(path, node)]
    if isinstance(node, dict):
        for k, v in node.items():
            out += walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += walk(v, (*path, i))
    return out


def at(node: Any, path: Path_) -> Any:
    for step in path:
        node = node[step]
    return node


def dict_paths(res: dict[str, Any]) -> list[Path_]:
    return [p for p, v in walk(res) if isinstance(v, dict)]


def list_paths(res: dict[str, Any]) -> list[Path_]:
    return [p for p, v in walk(res) if isinstance(v, list)]


def leaf_paths(res: dict[str, Any]) -> list[Path_]:
    return [p for p, v in walk(res) if not isinstance(v, dict | list) and p and p[-1] != "resourceType"]


# -- mutations --------------------------------------------------------------------------------------------------

BAD_AND_GOOD_STRINGS = [
    # dates and times: invalid days, months, hours, missing zones, partial dates, leap seconds
    "2026-02-30", "2026-13-01", "2026-00-10", "2026-02-03T10:00:00", "2026-02-03T24:00:00Z", "2026-2-3",
    "2026-02-03T10:00Z", "2026", "2026-02", "2026-02-03", "2026-02-03T10:00:00+01:00", "2016-12-31T23:59:60Z",
    "2026-02-03T10:00:00.123Z", "0000-01-01", "2026-02-03T10:00:00+15:00",
    # ids and codes: spaces, length, characters
    "a", "A-1.b", "a_b", "x" * 64, "x" * 65, "x" * 300, "a b", "a  b", " a", "a ", "billable", "unknown-code",
    # strings: empty, whitespace only, control characters, non-ASCII
    "", " ", "\t", "\n", "  text  ", "é", "x\u0000y", "\u00a0", "<div>x</div>",
    # uris, references, canonicals, numbers as text
    "http://example.org/x", "urn:uuid:53fefa32-fcbb-4ff8-8a92-55ee120877b7", "has space", "Patient/p1",
    "ChargeItemDefinition/x|1.0", "1.0", "-0", "01", "1e3", "true",
]
SCALARS = st.one_of(
    st.sampled_from(BAD_AND_GOOD_STRINGS),
    st.text(max_size=6),
    st.sampled_from([0, 1, -1, 2, 2**31 - 1, 2**31, -(2**31) - 1, 10**20]),
    st.sampled_from([0.0, -0.0, 1.0, 1.5, -2.25, 1e300, float("inf"), float("nan")]),
    st.booleans(),
    st.none(),
)
EXTENSIONS = st.sampled_from([
    {"url": "http://example.org/ext", "valueString": "x"},
    {"url": "http://example.org/ext", "valueCode": "a b"},
    {"url": "http://example.org/ext", "valueString": "x", "valueBoolean": True},  # two choices of value[x]
    {"url": "http://example.org/ext"},
    {"valueString": "x"},  # no url
    {"url": "", "valueString": "x"},
    {"url": "http://example.org/ext", "extension": [{"url": "inner", "valueInteger": 3}]},
    {"url": "http://example.org/ext", "valueDecimal": 1.5},
    {"url": "http://example.org/ext", "valueDateTime": "2026-02-30"},
])
CHOICE_SUFFIXES = ["String", "Boolean", "DateTime", "Date", "Period", "Reference", "CodeableConcept", "Quantity",
                   "Address", "Integer", "Timing"]
CHOICE_VALUES = {"String": "x", "Boolean": True, "DateTime": "2026-01-01", "Date": "2026-01-01",
                 "Period": {"start": "2026-01-01"}, "Reference": {"reference": "Location/l1"},
                 "CodeableConcept": {"text": "x"}, "Quantity": {"value": 1}, "Address": {"city": "x"},
                 "Integer": 1, "Timing": {"event": ["2026-01-01"]}}
_CHOICE_KEY = re.compile(r"^([a-z]+)([A-Z][A-Za-z]*)$")


@st.composite
def structural(draw: st.DrawFn, res: dict[str, Any]) -> dict[str, Any]:
    """One change of shape: a missing or unknown element, a second choice of a `[x]` element, an extension, a
    primitive's `_element`, a list longer, shorter, empty or holding a null, a value of another kind."""
    out = copy.deepcopy(res)
    what = draw(st.sampled_from(["delete", "unknown", "choice", "extension", "primitive-extension", "list",
                                 "kind", "resourceType"]))
    dicts = dict_paths(out)
    if what == "delete":
        path = draw(st.sampled_from([p for p, v in walk(out) if p and isinstance(at(out, p[:-1]), dict)]))
        del at(out, path[:-1])[path[-1]]
    elif what == "unknown":
        at(out, draw(st.sampled_from(dicts)))[draw(st.sampled_from(["unknownElement", "Status", "_", "value"]))] = \
            draw(SCALARS)
    elif what == "choice":
        keys = [(p, m) for p, v in walk(out) if p and isinstance(p[-1], str) and (m := _CHOICE_KEY.match(p[-1]))]
        if keys:
            path, match = draw(st.sampled_from(keys))
            suffix = draw(st.sampled_from(CHOICE_SUFFIXES))
            at(out, path[:-1])[match.group(1) + suffix] = copy.deepcopy(CHOICE_VALUES[suffix])
    elif what == "extension":
        node = at(out, draw(st.sampled_from(dicts)))
        node.setdefault("extension", []) if isinstance(node.get("extension"), list) else node.update(extension=[])
        node["extension"].append(copy.deepcopy(draw(EXTENSIONS)))
    elif what == "primitive-extension":
        leaves = [p for p in leaf_paths(out) if isinstance(p[-1], str)]
        if leaves:
            path = draw(st.sampled_from(leaves))
            at(out, path[:-1])["_" + path[-1]] = copy.deepcopy(draw(st.sampled_from([
                {}, {"extension": [{"url": "http://example.org/why", "valueCode": "unknown"}]}, {"id": "a"},
                {"extension": []}, None, "x", {"fhir_comments": ["c"]}])))
            if draw(st.booleans()):  # the value itself may be absent: the extension stands for it
                del at(out, path[:-1])[path[-1]]
    elif what == "list":
        lists = list_paths(out)
        if lists:
            node = at(out, draw(st.sampled_from(lists)))
            how = draw(st.sampled_from(["duplicate", "null", "empty", "drop"]))
            if how == "duplicate" and node:
                node.append(copy.deepcopy(node[0]))
            elif how == "null":
                node.insert(draw(st.integers(0, len(node))), None)
            elif how == "empty":
                node.clear()
            elif node:
                node.pop()
    elif what == "kind":
        path = draw(st.sampled_from([p for p, _ in walk(out) if p]))
        value = at(out, path)
        at(out, path[:-1])[path[-1]] = draw(st.sampled_from([
            [value], json.dumps(value), {"value": value} if not isinstance(value, dict) else [value], 7, None]))
    else:
        at(out, draw(st.sampled_from(dicts)))["resourceType"] = draw(st.sampled_from(
            ["Coding", "CodeableConcept", "Reference", "Identifier", "Extension", "Nonsense",
             res.get("resourceType", "Claim")]))
    return out


@st.composite
def values_changed(draw: st.DrawFn, res: dict[str, Any]) -> dict[str, Any]:
    """One to three primitive values replaced (the shape stays when the new value has the old one's type)."""
    out = copy.deepcopy(res)
    leaves = leaf_paths(out)
    for _ in range(draw(st.integers(1, 3)) if leaves else 0):
        path = draw(st.sampled_from(leaves))
        at(out, path[:-1])[path[-1]] = draw(SCALARS)
    return out


# -- the properties ---------------------------------------------------------------------------------------------


def test_every_fixture_resource_gets_the_plain_verdict_first_and_again_by_shape() -> None:
    assert len(CORPUS) > 800 and {"ChargeItem", "Claim", "Procedure", "Patient"} <= {r["resourceType"] for r in CORPUS}
    for res in CORPUS:
        expected = plain_ok(res)
        assert fast_ok(res) == expected, res.get("id")
        assert fast_ok(res) == expected, res.get("id")  # now its shape is known


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_same_shape_other_values_same_verdict(data: st.DataObject) -> None:
    """A valid resource's shape is known; other values in the same places are judged as plain validation does."""
    res = data.draw(st.sampled_from(OUTPUT))
    assert fast_ok(res)
    changed = data.draw(values_changed(res))
    event("accepted" if plain_ok(changed) else "rejected")
    assert fast_ok(changed) == plain_ok(changed)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_changed_shape_then_changed_values_same_verdict(data: st.DataObject) -> None:
    """A changed shape is validated in full; once that accepted it, its values are judged by shape, and both
    verdicts are the plain ones."""
    res = data.draw(st.sampled_from(CORPUS))
    reshaped = res
    for _ in range(data.draw(st.integers(1, 2))):
        reshaped = data.draw(structural(reshaped))
    first = plain_ok(reshaped)
    event(f"reshaped {'accepted' if first else 'rejected'}")
    assert fast_ok(reshaped) == first
    changed = data.draw(values_changed(reshaped))
    assert fast_ok(changed) == plain_ok(changed)


_ABSENT = object()


def _forms(value: Any) -> list[Any]:
    """Values of other structure for one element: what a shape must tell apart."""
    item = value[0] if isinstance(value, list) and value else value
    return [_ABSENT, None, [], [None], [None, item], [item], [item, item], item, {}, [{}], "x", ["x"], 1, [1], True,
            {"extension": [{"url": "http://example.org/ext", "valueString": "x"}]}]


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_twins_that_differ_in_one_elements_structure_get_their_own_verdicts(data: st.DataObject) -> None:
    """One element in two structures (absent, null, empty list, list with a null, one item or two, a dict, a
    scalar): the first twin's shape is known when the second is judged, and both get the plain verdict."""
    res = data.draw(st.sampled_from(CORPUS))
    path = data.draw(st.sampled_from([p for p, _ in walk(res) if p and isinstance(at(res, p[:-1]), dict)]))
    forms = _forms(at(res, path))
    twins = []
    for form in data.draw(st.lists(st.sampled_from(range(len(forms))), min_size=2, max_size=2, unique=True)):
        twin = copy.deepcopy(res)
        if forms[form] is _ABSENT:
            del at(twin, path[:-1])[path[-1]]
        else:
            at(twin, path[:-1])[path[-1]] = copy.deepcopy(forms[form])
        twins.append(twin)
    for twin in twins:
        assert fast_ok(twin) == plain_ok(twin)


# -- examples ---------------------------------------------------------------------------------------------------


def _charge_item() -> dict[str, Any]:
    """The built ChargeItem with a modifier (59: the CT lesion is a second modality)."""
    return copy.deepcopy(next(r for r in RESOURCES if r["resourceType"] == "ChargeItem" and r.get("extension")))


def _claim() -> dict[str, Any]:
    return copy.deepcopy(next(r for r in RESOURCES if r["resourceType"] == "Claim"))


def _set(res: dict[str, Any], path: Path_, value: Any) -> dict[str, Any]:
    at(res, path[:-1])[path[-1]] = value
    return res


KNOWN_BAD = [
    ("ChargeItem", ("occurrenceDateTime",), "2026-02-30", "occurrenceDateTime"),
    ("ChargeItem", ("occurrenceDateTime",), "2026-03-04T10:00:00", "occurrenceDateTime"),
    ("ChargeItem", ("enteredDate",), "yesterday", "enteredDate"),
    ("ChargeItem", ("status",), "billable ", "status"),
    ("ChargeItem", ("status",), "", "status"),
    ("ChargeItem", ("code", "coding", 0, "display"), "", "display"),
    ("ChargeItem", ("code", "coding", 0, "display"), 5, "display"),
    ("ChargeItem", ("code", "coding", 0, "system"), 5, "system"),
    ("ChargeItem", ("extension", 0, "url"), None, "url"),
    ("ChargeItem", ("quantity", "value"), True, "quantity"),
    ("ChargeItem", ("quantity", "value"), "many", "quantity"),
    ("ChargeItem", ("subject", "reference"), [], "subject"),
    ("Claim", ("item", 0, "sequence"), 0, "item.0.sequence"),
    ("Claim", ("item", 0, "sequence"), -1, "item.0.sequence"),
    ("Claim", ("item", 0, "servicedDate"), "2026-02-03T10:00:00Z", "item.0.servicedDate"),
    ("Claim", ("created",), "2026-13-01", "created"),
    ("Claim", ("use",), "a  claim", "use"),
    ("Claim", ("careTeam", 0, "responsible"), "perhaps", "careTeam.0.responsible"),
]


@pytest.mark.parametrize(("kind", "path", "value", "where"), KNOWN_BAD)
def test_a_bad_value_in_a_known_shape_is_rejected_by_name(kind: str, path: Path_, value: Any, where: str) -> None:
    good = _charge_item() if kind == "ChargeItem" else _claim()
    validate_resource(good, "twin")  # its shape is known from now on
    bad = _set(copy.deepcopy(good), path, value)
    assert not plain_ok(bad)
    with pytest.raises(InvalidOutputError, match=rf"^{kind} x failed FHIR R4 validation: .*{re.escape(where)}"):
        validate_resource(bad, f"{kind} x")


KNOWN_BAD_SHAPES = [
    ("missing status", lambda r: r.pop("status")),
    ("missing code", lambda r: r.pop("code")),
    ("unknown element", lambda r: r.update(price=1)),
    ("two choices of occurrence[x]", lambda r: r.update(occurrencePeriod={"start": "2026-01-01"})),
    ("two choices of an extension's value[x]", lambda r: r["extension"][0].update(valueString="x")),
    ("an extension without url", lambda r: r["extension"][0].pop("url")),
    ("an empty primitive extension", lambda r: r.update(_status={})),
    ("a null in a list of references", lambda r: r["service"].append(None)),
    ("a nested resourceType of another type", lambda r: r["code"].update(resourceType="Coding")),
    ("a Claim's resourceType", lambda r: r.update(resourceType="Claim")),
]


@pytest.mark.parametrize(("change",), [(c,) for _, c in KNOWN_BAD_SHAPES], ids=[n for n, _ in KNOWN_BAD_SHAPES])
def test_a_bad_shape_is_rejected(change: Any) -> None:
    good = _charge_item()
    assert good.get("extension"), "the fixture ChargeItem carries a modifier extension"
    validate_resource(good)
    bad = copy.deepcopy(good)
    change(bad)
    assert not plain_ok(bad)
    assert not fast_ok(bad)


def test_known_good_variants_are_accepted() -> None:
    good = _charge_item()
    validate_resource(good)
    for path, value in [(("occurrenceDateTime",), "2026-03"), (("occurrenceDateTime",), "2026"),
                        (("occurrenceDateTime",), "2016-12-31T23:59:60Z"), (("note", 0, "text"), "  spaced  "),
                        (("quantity", "value"), 2.5), (("status",), "not-billable")]:
        variant = _set(copy.deepcopy(good), path, value)
        assert plain_ok(variant) and fast_ok(variant), (path, value)


def test_a_remembered_value_is_remembered_with_its_type() -> None:
    """1 and True, 0.0 and -0.0 are equal in Python: a value known to pass never vouches for another type."""
    good = _charge_item()
    assert fast_ok(_set(copy.deepcopy(good), ("quantity", "value"), 1))
    assert not plain_ok(_set(copy.deepcopy(good), ("quantity", "value"), True))
    assert not fast_ok(_set(copy.deepcopy(good), ("quantity", "value"), True))
    assert validation._exact(0.0) != validation._exact(-0.0) and validation._exact(1) != validation._exact(True)


def _count_full(monkeypatch: pytest.MonkeyPatch, kind: str) -> list[int]:
    model = get_fhir_model_class(kind)
    calls = [0]
    original = model.model_validate

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "model_validate", counting)
    return calls


def test_a_known_shape_with_new_values_needs_no_full_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast way is really taken (else the properties above would compare plain validation with itself)."""
    calls = _count_full(monkeypatch, "ChargeItem")
    good = _charge_item()
    validate_resource(good)
    before = calls[0]
    other = _set(copy.deepcopy(good), ("identifier", 0, "value"), "another-line-id")
    _set(other, ("note", 0, "text"), "another explanation")
    _set(other, ("occurrenceDateTime",), "2026-05-06T07:08:09Z")
    validate_resource(other)
    assert calls[0] == before
    bad = _set(copy.deepcopy(other), ("occurrenceDateTime",), "2026-05-06T07:08:09")
    with pytest.raises(InvalidOutputError):
        validate_resource(bad)
    assert calls[0] == before + 1  # a value that fails is judged (and named) by the full validation


def test_what_the_fast_way_does_not_read_is_validated_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    from decimal import Decimal

    calls = _count_full(monkeypatch, "ChargeItem")
    odd = _set(_charge_item(), ("quantity", "value"), Decimal(1))  # a value of a type JSON does not have
    for _ in range(2):
        validate_resource(odd)
    assert calls[0] == 2


def test_contained_resources_are_read_by_shape_under_their_own_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Claim's contained billing provider: its shape is learnt once, its values are checked every time."""
    calls = _count_full(monkeypatch, "ChargeItem")
    organization = {"resourceType": "Organization", "id": "billing-provider", "name": "Lakeside",
                    "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}]}
    first = _charge_item()
    first["contained"] = [organization]
    validate_resource(first)
    before = calls[0]
    second = copy.deepcopy(first)
    second["contained"][0]["name"] = "Another name"
    validate_resource(second)
    assert calls[0] == before  # a known shape with new values: no full validation
    bad = copy.deepcopy(first)
    bad["contained"][0]["name"] = ""  # an empty string is no FHIR string
    with pytest.raises(InvalidOutputError, match="contained"):
        validate_resource(bad)
    as_patient = copy.deepcopy(first)  # the same keys under another resource type: another shape
    as_patient["contained"][0] = {**organization, "resourceType": "Patient"}
    with pytest.raises(InvalidOutputError):
        validate_resource(as_patient)  # Patient has no `name` string: judged in full, and refused
    unknown = copy.deepcopy(first)
    unknown["contained"][0] = {**organization, "resourceType": "Nothing"}
    with pytest.raises(InvalidOutputError):
        validate_resource(unknown)


def test_errors_still_name_the_element() -> None:
    claim = _claim()
    validate_resource(claim)
    broken = _set(copy.deepcopy(claim), ("item", 0, "quantity", "value"), "many")
    with pytest.raises(InvalidOutputError, match=r"item\.0\.quantity"):
        validate_resource(broken, "Claim x")
