"""An index of the input's resources by `Type/id`, so extraction can follow references without I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from adapter.sources.files import SourcedResource

_TYPE_ID = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?/?$")


def parse_reference(reference: str) -> tuple[str, str] | None:
    """(type, id) of a relative, absolute or versioned literal reference; None when it is not one."""
    match = _TYPE_ID.search(reference.strip())
    return (match.group(1), match.group(2)) if match else None


def normalize_reference(reference: str) -> str:
    """`http://x/fhir/Patient/1/_history/2` -> `Patient/1`; other forms are returned unchanged."""
    parsed = parse_reference(reference)
    return f"{parsed[0]}/{parsed[1]}" if parsed else reference.strip()


def version_of(resource: dict[str, Any]) -> str:
    """`meta.versionId` as text ("" when the resource has none)."""
    return str((resource.get("meta") or {}).get("versionId", ""))


def reference_of(value: Any) -> str | None:
    """The normalised target of a FHIR Reference dict (literal, or logical by identifier), if any."""
    if not isinstance(value, dict):
        return None
    literal = value.get("reference")
    if isinstance(literal, str) and literal.strip():
        return normalize_reference(literal)
    identifier = value.get("identifier")
    if isinstance(identifier, dict) and identifier.get("value"):
        kind = value.get("type", "")
        return f"{kind}?identifier={identifier.get('system', '')}|{identifier['value']}"
    return None


@dataclass
class ResourceIndex:
    """Resources by reference, in input order; a later copy of the same `Type/id` replaces the earlier."""

    by_ref: dict[str, dict[str, Any]] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    duplicates: list[tuple[str, str, str]] = field(default_factory=list)
    """(reference, origin kept, origin replaced) for each repeated resource."""
    without_id: list[SourcedResource] = field(default_factory=list)
    _coverages: dict[str, list[tuple[str, dict[str, Any]]]] | None = field(default=None, repr=False)

    @classmethod
    def build(cls, resources: Iterable[SourcedResource]) -> ResourceIndex:
        index = cls()
        for item in resources:
            index.add(item)
        return index

    def add(self, item: SourcedResource) -> None:
        rid = item.resource.get("id")
        if not isinstance(rid, str) or not rid:
            self.without_id.append(item)
            return
        ref = f"{item.resource['resourceType']}/{rid}"
        if ref in self.by_ref:
            self.duplicates.append((ref, item.origin, self.origins[ref]))
        self.by_ref[ref] = item.resource
        self.origins[ref] = item.origin
        self._coverages = None

    def get(self, reference: str | None) -> dict[str, Any] | None:
        return self.by_ref.get(reference) if reference else None

    def of_type(self, resource_type: str) -> list[tuple[str, dict[str, Any]]]:
        prefix = resource_type + "/"
        return [(ref, res) for ref, res in self.by_ref.items() if ref.startswith(prefix)]

    def active_coverages(self, patient: str) -> list[tuple[str, dict[str, Any]]]:
        """The patient's active Coverages, in claim order (`order`, then id)."""
        if self._coverages is None:
            grouped: dict[str, list[tuple[str, dict[str, Any]]]] = {}
            for ref, cov in self.of_type("Coverage"):
                beneficiary = reference_of(cov.get("beneficiary"))
                if cov.get("status") == "active" and beneficiary:
                    grouped.setdefault(beneficiary, []).append((ref, cov))
            for found in grouped.values():
                found.sort(key=lambda rc: (rc[1].get("order", 1 << 30), rc[0]))
            self._coverages = grouped
        return self._coverages.get(patient, [])
