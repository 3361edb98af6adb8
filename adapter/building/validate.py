"""Every resource is checked against the R4 models of `fhir.resources` before it leaves the process.

A run writes thousands of resources that share most of their parts (the CPT coding of a code, the place of
service, the payer, the patient of a session): each distinct part is validated once, and its validated model
is reused wherever the identical part appears again, so the whole resource is still validated, in less time.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from adapter.errors import OutputError

_PARTS_LIMIT = 4_096
"""Validated parts kept for reuse; the cache starts over when full (memory stays bounded)."""
_DEPTH = 2
"""Parts are reused down to this depth (e.g. Claim.item[n].productOrService)."""
_UNIQUE = frozenset({"identifier", "text", "note", "item", "procedure", "service"})
"""Elements that differ in every resource: not worth a cache entry (their own parts still are)."""
_parts: dict[tuple[type, str], Any] = {}
_classes: dict[type, dict[str, type]] = {}


class InvalidOutputError(OutputError):
    """The adapter built a resource that is not valid FHIR R4: a bug or a bad table, never sent anywhere."""

    def __init__(self, what: str, errors: str) -> None:
        self.what = what
        super().__init__(f"{what} failed FHIR R4 validation: {errors}")


def _class_map(model: type) -> dict[str, type]:
    """Element name -> model class of the complex elements of `model` (`Claim.item` -> ClaimItem); primitives
    and polymorphic contained resources are left out (validated in place)."""
    found = _classes.get(model)
    if found is None:
        found = {}
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            stack = [field.annotation]
            while stack:
                ann = stack.pop()
                if isinstance(ann, type) and hasattr(ann, "get_model_klass"):
                    klass = ann.get_model_klass()
                    if getattr(klass, "__resource_type__", "") != "Resource":
                        found[field.alias or name] = klass
                    break
                if typing.get_origin(ann) in (typing.Union, types.UnionType, list, typing.List):  # noqa: UP006
                    stack += [a for a in typing.get_args(ann) if a is not type(None)]
        _classes[model] = found
    return found


def _part(model: type, value: dict[str, Any], depth: int) -> Any:
    # repr is a faithful key for JSON-like dicts (1, 1.0 and True differ) and much cheaper than json.dumps;
    # the same content in another key order is only a cache miss
    key = (model, repr(value))
    found = _parts.get(key)
    if found is None:
        found = model.model_validate(_with_parts(model, value, depth))  # type: ignore[attr-defined]
        if len(_parts) >= _PARTS_LIMIT:
            _parts.clear()
        _parts[key] = found
    return found


def _fresh(model: type, value: dict[str, Any], depth: int) -> Any:
    return model.model_validate(_with_parts(model, value, depth))  # type: ignore[attr-defined]


def _with_parts(model: type, data: dict[str, Any], depth: int) -> dict[str, Any]:
    """`data` with its complex elements replaced by validated (possibly reused) models."""
    if depth <= 0:
        return data
    classes = _class_map(model)
    out: dict[str, Any] = {}
    for name, value in data.items():
        klass = classes.get(name)
        if klass is None or not isinstance(value, dict | list):
            out[name] = value
            continue
        part = _fresh if name in _UNIQUE else _part
        if isinstance(value, dict):
            out[name] = part(klass, value, depth - 1)
        else:
            out[name] = [part(klass, v, depth - 1) if isinstance(v, dict) else v for v in value]
    return out


def validate_resource(resource: dict[str, Any], what: str = "") -> None:
    """Raises InvalidOutputError naming the resource and the failing elements."""
    kind = resource.get("resourceType", "")
    try:
        model = get_fhir_model_class(kind)
    except KeyError:
        raise InvalidOutputError(what or kind, f"unknown resourceType {kind!r}") from None
    try:
        model.model_validate(_with_parts(model, resource, _DEPTH))
    except (ValidationError, ValueError, TypeError):
        try:  # again without reuse, so the errors name their place in the whole resource
            model.model_validate(resource)
        except ValidationError as exc:
            summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
            raise InvalidOutputError(what or kind, summary) from None
        raise InvalidOutputError(what or kind, "invalid (see the element models)") from None
