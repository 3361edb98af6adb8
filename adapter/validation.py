"""Every resource is checked against the R4 models of `fhir.resources` before it leaves the process.

A run writes thousands of resources that differ only in their primitive values (ids, dates, references,
narrative) and in a few shapes (how many lines, modifiers, reasons). What a model validation of
fhir.resources decides splits in two:

- each primitive value against its element's type (a dateTime, a code, an id, a string that is not empty), and
- everything else: which elements are present and which are null, nesting and list lengths, unknown elements,
  required elements, choice types (`value[x]`), the resource type. None of this depends on a primitive's value.

So a resource is reduced to its *shape* (keys, nesting, list lengths, null or not, the Python type of each
primitive) and its primitive values. A shape is accepted once a full `model_validate` of a resource with that
shape accepted it; a later resource with a known shape is accepted when each of its primitive values passes the
very validator pydantic compiled for that element (the same core schema, built with the model's config). Anything
else, including every resource that does not pass this way, goes through the full model validation, which gives
the verdict and names the failing elements. Contained resources are read the same way, under the model their
`resourceType` names (the model class is part of the shape). Anything the fast way cannot read (unknown
elements, values of a type JSON does not have) goes through the full validation too.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from fhir_core.types import FhirBase, FhirElementOrResourceBase
from fhir_core.utils import is_primitive_type
from pydantic import ValidationError
from pydantic_core import SchemaValidator

from adapter.errors import OutputError

_SHAPES_LIMIT = 4_096
"""Accepted shapes kept; the set starts over when full (memory stays bounded)."""
_SEEN_LIMIT = 20_000
"""Values known to pass, per element; its set starts over when full."""
_LONG = 256
"""Values longer than this (narratives, notes) are validated every time rather than remembered."""
_KNOWN_MODEL_VALIDATORS = frozenset({
    "reject_null_complex_elements",  # nulls inside lists of complex elements: part of the shape
    "validate_after_model_construction",  # required primitives and choice types: presence, part of the shape
    "validate_extension_or_fhir_comment_required",  # FHIRPrimitiveExtension: presence, part of the shape
})
"""Model-level validators of fhir.resources that look only at what the shape holds; a model with any other
model-level validator is never validated the fast way (it might look at values)."""

_JSON_SCALARS = frozenset({str, int, float, bool})
_OPEN = object()
"""Shape token: a complex element (a dict) starts; its keys follow, then _CLOSE."""
_CLOSE = object()
_LIST = object()
"""Shape token: a list; its length and then each item follow."""


class InvalidOutputError(OutputError):
    """The adapter built a resource that is not valid FHIR R4: a bug or a bad table, never sent anywhere."""

    def __init__(self, what: str, errors: str) -> None:
        self.what = what
        super().__init__(f"{what} failed FHIR R4 validation: {errors}")


class _Irregular(Exception):
    """The resource holds something the fast way does not read: validate it in full."""


class _Element:
    """One element of a model, as the fast way reads it."""

    __slots__ = ("child", "cls", "kind", "seen", "validator")

    def __init__(self, kind: int, validator: SchemaValidator | None = None, cls: type | None = None) -> None:
        self.kind = kind
        self.validator = validator
        """For a primitive: the validator pydantic compiled for this element (single value or list)."""
        self.seen: set[Any] = set()
        """For a primitive: values that passed `validator` (strings as they are, others as _exact keys)."""
        self.cls = cls
        """For a complex element: its fhir.resources type (`fhirtypes.CodingType`)."""
        self.child: _Model | None = None
        """For a complex element: its model, looked up on first use (the model graph has cycles)."""


_PRIMITIVE, _ONE, _MANY = 0, 1, 2


@dataclass(eq=False)
class _Model:
    """What the fast way needs to know about one model class: its elements by JSON key."""

    cls: type
    resource_type: str
    elements: dict[str, _Element] = field(default_factory=dict)
    """JSON key -> element; split by kind below, so that the walk looks up only what a value can be."""
    seen: dict[str, set[Any]] = field(default_factory=dict)
    """Primitive elements: JSON key -> its `_Element.seen` (the most frequent look-up, one step shorter)."""
    primitives: dict[str, _Element] = field(default_factory=dict)
    ones: dict[str, _Element] = field(default_factory=dict)
    manys: dict[str, _Element] = field(default_factory=dict)
    contained: set[str] = field(default_factory=set)
    """Lists of resources (`contained`): each item is read under the model its `resourceType` names."""


_models: dict[type, _Model | None] = {}
_shapes: set[tuple[Any, ...]] = set()


def _unwrap(schema: dict[str, Any], until: str) -> dict[str, Any] | None:
    """The first node of type `until` below model-level function validators, checking that each is known."""
    while schema.get("type") != until:
        if not schema.get("type", "").startswith("function-"):
            return None
        function = schema.get("function", {}).get("function")
        if getattr(function, "__name__", None) not in _KNOWN_MODEL_VALIDATORS:
            return None
        schema = schema["schema"]
    return schema


def _core_type(annotation: Any) -> tuple[Any, bool] | None:
    """The element type of an annotation without Optional, and whether it is a list; None if ambiguous."""
    many = False
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return None
            annotation = args[0]
        elif origin is list:
            if many:
                return None
            many = True
            annotation = typing.get_args(annotation)[0]
        elif origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation, many


def _model(cls: type) -> _Model | None:
    """The fast way's view of a model class, or None when the class must always be validated in full."""
    if cls not in _models:
        try:
            _models[cls] = _build(cls)
        except Exception:  # a model this code does not understand: always validated in full
            _models[cls] = None
    return _models[cls]


def _build(cls: type) -> _Model | None:
    if not (isinstance(cls, type) and issubclass(cls, FHIRAbstractModel)) or cls.__init__ is not \
            FHIRAbstractModel.__init__:
        return None
    top = _unwrap(cls.__pydantic_core_schema__, "model")
    inner = _unwrap(top["schema"], "model-fields") if top else None
    if top is None or inner is None or top.get("custom_init") is not True:
        return None
    config = top.get("config") or {}
    view = _Model(cls, cls.__resource_type__)
    keys = {name: (inner["fields"].get(name) or {}).get("validation_alias") for name in cls.model_fields}
    if not all(isinstance(key, str) for key in keys.values()) or any(
            key != name and key in keys for name, key in keys.items()):
        return None  # a JSON key that is one element's alias and another's name would be read for both
    for name, info in cls.model_fields.items():
        schema, key = inner["fields"][name], keys[name]
        found = _core_type(info.annotation)
        if found is None:
            continue  # not read by the fast way: a resource holding it is validated in full
        kind, many = found
        if isinstance(kind, type) and issubclass(kind, FhirBase):
            if issubclass(kind, FhirElementOrResourceBase):
                if many:
                    view.contained.add(key)  # contained resources: their model depends on their content
                continue
            element = view.elements[key] = _Element(_MANY if many else _ONE, cls=kind)  # model imported when used
            (view.manys if many else view.ones)[key] = element
        elif is_primitive_type(info):
            element = view.elements[key] = _Element(_PRIMITIVE, SchemaValidator(schema["schema"], config))  # type: ignore[arg-type]
            view.seen[key] = element.seen
            view.primitives[key] = element
    _models[cls] = view
    return view


def _child(element: _Element) -> _Model:
    found = element.child = _model(element.cls.get_model_klass())  # type: ignore[union-attr]
    if found is None:
        raise _Irregular
    return found


def _walk(view: _Model, data: dict[str, Any], shape: list[Any], pending: list[tuple[_Element, Any, Any]]) -> None:
    """Appends the shape of `data` (a `view.cls` element) to `shape`, and to `pending` its primitive values
    not yet known to pass.

    The shape is a flat token list: _OPEN, then per key the key and what its value is (nothing for a string:
    the next token is a key or _CLOSE; the type of another primitive; None; _LIST and a length, then the items;
    or the tokens of a complex element), then _CLOSE. Keys are strings and no other token is, so two shapes
    are equal only when the structures are."""
    append = shape.append
    seen_of = view.seen
    append(_OPEN)
    for key, value in data.items():
        kind = type(value)
        if kind is str:
            seen = seen_of.get(key)
            if seen is None:
                if key == "resourceType" and value == view.resource_type:
                    append(key)  # checked against the model's type, as fhir.resources does
                    continue
                raise _Irregular  # an unknown element, or a string where a complex element belongs
            append(key)
            if value not in seen:
                pending.append((view.primitives[key], value, value))
        elif kind is dict:
            element = view.ones.get(key)
            if element is None:
                raise _Irregular
            append(key)
            _walk(element.child or _child(element), value, shape, pending)
        elif kind is list:
            append(key)
            if key in view.contained:
                append(_LIST)
                append(len(value))
                for item in value:
                    inner = _resource_view(item)
                    append(inner.cls)
                    _walk(inner, item, shape, pending)
                continue
            element = view.manys.get(key)
            if element is not None:
                child = element.child or _child(element)
                append(_LIST)
                append(len(value))
                for item in value:
                    if type(item) is dict:
                        _walk(child, item, shape, pending)
                    elif item is None:
                        append(None)
                    else:
                        raise _Irregular
                continue
            element = view.primitives.get(key)
            if element is None:
                raise _Irregular
            append(_LIST)
            append(len(value))
            for item in value:
                if item is not None and type(item) not in _JSON_SCALARS:
                    raise _Irregular
                append(type(item))
            known = _exact(value)
            if known not in element.seen:
                pending.append((element, value, known))
        elif value is None:
            if key not in view.elements:
                raise _Irregular  # an unknown element, or one the fast way does not read
            append(key)
            append(None)
        else:
            element = view.primitives.get(key)
            if element is None or kind not in _JSON_SCALARS:
                raise _Irregular
            append(key)
            append(kind)
            known = (kind, repr(value)) if kind is float else (kind, value)
            if known not in element.seen:
                pending.append((element, value, known))
    append(_CLOSE)


def _resource_view(item: Any) -> _Model:
    """The view of a contained resource's model, by its `resourceType`."""
    if type(item) is not dict:
        raise _Irregular
    try:
        found = _model(get_fhir_model_class(item.get("resourceType")))
    except (KeyError, TypeError, ValueError):
        raise _Irregular from None
    if found is None:
        raise _Irregular
    return found


def _exact(value: Any) -> Any:
    """The key a value is remembered by: only equal values of equal types share one (True == 1 and
    0.0 == -0.0 in Python, but they need not get the same verdict). Strings are their own key."""
    kind = type(value)
    if value is None or kind is str:
        return value
    if kind is list:
        return tuple(_exact(item) for item in value)
    return (kind, repr(value)) if kind is float else (kind, value)


def _values_pass(pending: list[tuple[_Element, Any, Any]]) -> bool:
    """Whether every value passes its element's own compiled validator (remembering those that do)."""
    for element, value, known in pending:
        try:
            element.validator.validate_python(value)  # type: ignore[union-attr]
        except (ValidationError, ValueError, TypeError, AttributeError):
            return False
        if type(value) is str and len(value) > _LONG:
            continue
        if len(element.seen) >= _SEEN_LIMIT:
            element.seen.clear()
        element.seen.add(known)
    return True


def _passes_by_shape(model: type, resource: dict[str, Any]) -> tuple[Any, ...] | bool:
    """True when the resource's shape is known and its values pass; else its shape (None if unreadable)."""
    view = _model(model)
    if view is None:
        return False
    shape: list[Any] = [model]
    pending: list[tuple[_Element, Any, Any]] = []
    try:
        _walk(view, resource, shape, pending)
    except _Irregular:
        return False
    key = tuple(shape)
    if key in _shapes and _values_pass(pending):
        return True
    return key


def validate_resource(resource: dict[str, Any], what: str = "") -> None:
    """Raises InvalidOutputError naming the resource and the failing elements."""
    kind = resource.get("resourceType", "")
    try:
        model = get_fhir_model_class(kind)
    except (KeyError, TypeError, ValueError):  # fhir.resources raises ValueError; TypeError: not a string
        raise InvalidOutputError(what or kind, f"unknown resourceType {kind!r}") from None
    fast = _passes_by_shape(model, resource)
    if fast is True:
        return
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise InvalidOutputError(what or kind, summary) from None
    except (ValueError, TypeError, AttributeError) as exc:  # AttributeError: fhir.resources tripped on a shape
        raise InvalidOutputError(what or kind, f"invalid ({exc})") from None
    except KeyError as exc:  # fhir.resources looks a contained resource's type up in a dict
        raise InvalidOutputError(what or kind, f"unknown resource type {exc.args[0] if exc.args else ''}") from None
    if fast is not False:
        if len(_shapes) >= _SHAPES_LIMIT:
            _shapes.clear()
        _shapes.add(fast)
