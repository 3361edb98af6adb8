"""Every resource is checked against the R4 models of `fhir.resources` before it leaves the process."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from adapter.errors import OutputError


class InvalidOutputError(OutputError):
    """The adapter built a resource that is not valid FHIR R4: a bug or a bad table, never sent anywhere."""

    def __init__(self, what: str, errors: str) -> None:
        self.what = what
        super().__init__(f"{what} failed FHIR R4 validation: {errors}")


def validate_resource(resource: dict[str, Any], what: str = "") -> None:
    """Raises InvalidOutputError naming the resource and the failing elements."""
    kind = resource.get("resourceType", "")
    try:
        model = get_fhir_model_class(kind)
    except KeyError:
        raise InvalidOutputError(what or kind, f"unknown resourceType {kind!r}") from None
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise InvalidOutputError(what or kind, summary) from None
