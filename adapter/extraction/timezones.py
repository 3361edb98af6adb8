"""The facility's time zone, for performed times a feed writes in UTC (rule date-of-service).

Many EHR feeds write every time in UTC (`Z`). The date of service is the calendar date where the procedure was
done, so a UTC time needs the facility's zone. It is taken, in this order, from the standard `timezone`
extension (http://hl7.org/fhir/StructureDefinition/timezone, valueCode: an IANA zone) on:

1. the Procedure's own `location`;
2. the encounter's Locations (`Encounter.location[].location`);
3. the performing Organization: the chosen performer's `onBehalfOf`, then the rendering PractitionerRole's
   `organization`, then the encounter's `serviceProvider`;

and only then from `session.time_zone` in config/settings.yaml. Two different zones at the first level that
has any -> review `time-zone-conflict` when they give different dates; a zone that is not an IANA name ->
review `invalid-resource`. Pure: reads the resource index only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

EXT_TIMEZONE = "http://hl7.org/fhir/StructureDefinition/timezone"
DEFAULT_ZONE = "UTC"
"""`session.time_zone`'s default: a deployment whose UTC feed meets it gets the warning of `utc_feed_warning`."""


class _Index(Protocol):
    def get(self, key: str) -> dict[str, Any] | None: ...
    def entry(self, key: str) -> Any: ...
    def resolve(self, value: Any, referrer: Any = None) -> Any: ...


@dataclass(frozen=True)
class FacilityZone:
    zones: tuple[tuple[str, str], ...]
    """(IANA zone, where it was read) at the first level that has any; empty when none has one."""
    problems: tuple[str, ...] = ()
    """Zones that are not IANA names (with where)."""


def _zone_of(resource: dict[str, Any] | None) -> str | None:
    for ext in (resource or {}).get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == EXT_TIMEZONE and isinstance(ext.get("valueCode"), str):
            return ext["valueCode"].strip()
    return None


def facility_zone(resource: dict[str, Any], encounter: str, on_behalf_of: str | None, role: str | None,
                  index: _Index, entry: Any) -> FacilityZone:
    """The facility zones of one Procedure, by the order of the module docstring."""
    levels: list[list[tuple[str | None, str]]] = [[], [], []]
    if resource.get("location") is not None:
        target = index.resolve(resource["location"], entry)
        if target.key:
            levels[0].append((target.key, "the Procedure's location"))
    found = index.get(encounter) if encounter else None
    if found is not None:
        enc_entry = index.entry(encounter)
        for loc in found.get("location") or []:
            if isinstance(loc, dict) and loc.get("location") is not None:
                target = index.resolve(loc["location"], enc_entry)
                if target.key:
                    levels[1].append((target.key, f"a location of {encounter}"))
    if on_behalf_of:
        levels[2].append((on_behalf_of, "the performer's onBehalfOf"))
    if role:
        organization = (index.get(role) or {}).get("organization")
        if organization is not None:
            target = index.resolve(organization, index.entry(role))
            if target.key:
                levels[2].append((target.key, f"the organization of {role}"))
    if found is not None and found.get("serviceProvider") is not None:
        target = index.resolve(found["serviceProvider"], index.entry(encounter))
        if target.key:
            levels[2].append((target.key, f"the serviceProvider of {encounter}"))
    problems: list[str] = []
    for level in levels:
        zones: list[tuple[str, str]] = []
        for key, why in level:
            value = _zone_of(index.get(key) if key else None)
            if value is None:
                continue
            where = f"the timezone extension of {key}, {why}"
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                problems.append(f"{where}: {value!r} is not an IANA time zone")
                continue
            zones.append((value, where))
        if zones or problems:
            return FacilityZone(tuple(dict.fromkeys(zones)), tuple(problems))
    return FacilityZone(())


def utc_feed_warning(bases: Iterable[str]) -> str | None:
    """A warning when every performed time was written in UTC and dated with `session.time_zone` left at its
    default, UTC (no offset and no facility zone on any): the dates of service are then UTC dates, likely not the
    facility's. `bases`: how each FNA's date of service was read (ProcedureFacts.time_basis); date-only values
    do not count either way."""
    counted = {b for b in bases if b and b != "date"}
    if counted != {"utc-default"}:
        return None
    return ("warning: every performed time in this input is written in UTC (Z) and session.time_zone is left at "
            "its default, UTC, so dates of service are UTC dates: set session.time_zone (config/settings.yaml) to the "
            "facility's zone, or let the feed carry the timezone extension on the Location or Organization "
            "(docs/input-contract.md, date-of-service)")


_warned: set[str] = set()
"""Per process: the online warning is logged once, at the first batch whose FNAs are all dated that way."""


def fna_bases(facts: Iterable[Any]) -> list[str]:
    """The `time_basis` of every FNA among `facts` (ProcedureFacts)."""
    return [f.time_basis for f in facts if str(getattr(f, "kind", "")) == "fna"]


def warn_utc_feed_once(facts: Iterable[Any], log: logging.Logger) -> None:
    """Online (sync, run, serve): there is no feed to look at when the process starts, so the warning comes at
    the first batch that shows it, once per process."""
    text = utc_feed_warning(fna_bases(facts))
    if text and "utc" not in _warned:
        _warned.add("utc")
        log.warning(text.removeprefix("warning: "))
