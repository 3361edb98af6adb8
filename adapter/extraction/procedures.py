"""From one Procedure dict to the facts the coding rules need: kind, status, session, modality, lesions.

Pure: reads the Procedure and the resource index, never the network or the disk. Every fact remembers
which element it came from, so `explain` can answer "why this code?".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from enum import StrEnum
from typing import Any

from adapter.config import CodeTables
from adapter.extraction.index import ResourceIndex, reference_of

EXT_METHOD = "http://hl7.org/fhir/StructureDefinition/procedure-method"
EXT_TARGET = "http://hl7.org/fhir/StructureDefinition/procedure-targetBodyStructure"
EXT_BODYSITE = "http://hl7.org/fhir/StructureDefinition/bodySite"
EXT_APPROACH = "http://hl7.org/fhir/StructureDefinition/procedure-approachBodyStructure"

NO_CHARGE_STATUSES = {"not-done", "preparation", "in-progress", "on-hold", "entered-in-error"}
REVIEW_STATUSES = {"stopped", "unknown"}
_DAY_PRECISION = re.compile(r"^\d{4}-\d{2}-\d{2}")


class Kind(StrEnum):
    FNA = "fna"
    CORE = "core-needle-biopsy"
    OTHER = "other"


class Disposition(StrEnum):
    BILLABLE = "billable"
    NO_CHARGE = "no-charge"
    REVIEW = "review"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Finding:
    """Why something needs an analyst: a stable reason code and a sentence for humans."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Evidence:
    element: str
    system: str
    code: str
    display: str | None
    modality: str | None

    def describe(self) -> str:
        label = f" {self.display}" if self.display else ""
        return f"{self.element}: {self.system}|{self.code}{label}"


@dataclass(frozen=True)
class Lesion:
    key: str
    """Identity across the session: `BodyStructure/x`, or `Procedure/p#site:...` for coded sites."""
    element: str
    label: str
    position: int
    body_structure: str | None = None
    site: dict[str, Any] | None = None


@dataclass(frozen=True, order=True)
class SessionKey:
    """One billing session: same date, patient, performer and encounter."""

    date: str
    patient: str
    performer: str
    encounter: str = ""

    def text(self) -> str:
        return f"{self.patient}|{self.performer}|{self.encounter or '-'}|{self.date}"


@dataclass
class ProcedureFacts:
    ref: str
    origin: str
    kind: Kind
    resource: dict[str, Any]
    status: str | None = None
    disposition: Disposition = Disposition.BILLABLE
    findings: list[Finding] = field(default_factory=list)
    session: SessionKey | None = None
    performed: datetime | None = None
    performed_text: str | None = None
    modality: str | None = None
    modality_note: str = ""
    evidence: list[Evidence] = field(default_factory=list)
    lesions: list[Lesion] = field(default_factory=list)
    lesion_note: str = ""

    @property
    def id(self) -> str:
        return self.ref.split("/", 1)[1] if "/" in self.ref else self.ref

    def flag(self, reason: str, detail: str) -> None:
        self.findings.append(Finding(reason, detail))
        self.disposition = Disposition.REVIEW

    def sort_key(self) -> tuple[datetime, str]:
        return (self.performed or datetime.max.replace(tzinfo=UTC), self.ref)


def _codings(concept: Any) -> list[dict[str, Any]]:
    if not isinstance(concept, dict):
        return []
    return [c for c in concept.get("coding") or [] if isinstance(c, dict) and c.get("code")]


def _extensions(element: dict[str, Any], url: str) -> list[dict[str, Any]]:
    return [e for e in element.get("extension") or [] if isinstance(e, dict) and e.get("url") == url]


def classify(resource: dict[str, Any], tables: CodeTables) -> Kind:
    keys = {(c.get("system", ""), c["code"]) for c in _codings(resource.get("code"))}
    if keys & tables.fna:
        return Kind.FNA
    if keys & tables.core_needle_biopsy:
        return Kind.CORE
    return Kind.OTHER


def parse_performed(resource: dict[str, Any], facts: ProcedureFacts, tables: CodeTables) -> None:
    """Sets `performed` (aware, for ordering) and the session date in the configured zone."""
    text: Any = resource.get("performedDateTime")
    element = "performedDateTime"
    if text is None and isinstance(resource.get("performedPeriod"), dict):
        text, element = resource["performedPeriod"].get("start"), "performedPeriod.start"
    if text is None:
        other = [k for k in resource if k.startswith("performed")]
        if other:
            facts.flag("invalid-resource", f"{other[0]} cannot be dated; performedDateTime or "
                                           "performedPeriod.start is needed")
        else:
            facts.flag("missing-performed-date", "no performedDateTime or performedPeriod.start: the date of "
                                                 "service decides the session")
        return
    if not isinstance(text, str) or not _DAY_PRECISION.match(text):
        facts.flag("invalid-resource", f"{element} {text!r} is not precise to the day")
        return
    zone = tables.settings.zone
    try:
        if len(text) == 10:
            moment = datetime.combine(date.fromisoformat(text), time(0), tzinfo=zone)
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=zone)
    except ValueError:
        facts.flag("invalid-resource", f"{element} {text!r} is not a valid FHIR dateTime")
        return
    facts.performed = moment.astimezone(UTC)
    facts.performed_text = text


def find_modality(resource: dict[str, Any], facts: ProcedureFacts, tables: CodeTables) -> None:
    """Collects guidance evidence from procedure-method extensions and Procedure.code; decides or flags."""
    for i, ext in enumerate(_extensions(resource, EXT_METHOD)):
        for coding in _codings(ext.get("valueCodeableConcept")):
            key = (coding.get("system", ""), coding["code"])
            facts.evidence.append(Evidence(f"extension[procedure-method][{i}]", key[0], key[1],
                                           coding.get("display"), tables.method_codes.get(key)))
    for coding in _codings(resource.get("code")):
        key = (coding.get("system", ""), coding["code"])
        if key in tables.procedure_codes:
            facts.evidence.append(Evidence("Procedure.code", key[0], key[1], coding.get("display"),
                                           tables.procedure_codes[key]))
    found = sorted({e.modality for e in facts.evidence if e.modality})
    if len(found) == 1:
        facts.modality = found[0]
        return
    if len(found) > 1:
        said = "; ".join(f"{e.describe()} -> {tables.display_of(e.modality)}" for e in facts.evidence if e.modality)
        facts.flag("modality-conflict", f"guidance evidence disagrees: {said}")
        return
    unknown = [e.describe() for e in facts.evidence]
    hint = f" (codes not in config/modalities.yaml: {', '.join(unknown)})" if unknown else ""
    if tables.settings.when_missing == "none":
        facts.modality = "none"
        facts.modality_note = f"no guidance evidence{hint}; coded as unguided by guidance.when_missing: none"
        return
    facts.flag("modality-missing", f"no guidance evidence in procedure-method or Procedure.code{hint}")


def _concept_label(concept: Any) -> str:
    if not isinstance(concept, dict):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    for coding in _codings(concept):
        if coding.get("display"):
            return str(coding["display"])
    codes = _codings(concept)
    return codes[0]["code"] if codes else ""


def _strip_extensions(concept: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in concept.items() if k in ("coding", "text")}


def _body_structure_site(ref: str, index: ResourceIndex) -> tuple[str, dict[str, Any] | None]:
    """A label and the coded location of a BodyStructure, when the input holds it."""
    found = index.get(ref)
    if not found:
        return ref, None
    location = found.get("location") if isinstance(found.get("location"), dict) else None
    parts = [found.get("description") or _concept_label(found.get("morphology")),
             _concept_label(location),
             ", ".join(_concept_label(q) for q in found.get("locationQualifier") or [])]
    label = " / ".join(p for p in parts if p)
    return (f"{ref} ({label})" if label else ref), (_strip_extensions(location) if location else None)


def body_structure_references(resource: dict[str, Any]) -> list[tuple[str, str | None, dict[str, Any] | None]]:
    """(element, reference or None, coded site) of every lesion-bearing BodyStructure extension: the
    procedure-targetBodyStructure extensions, then bodySite extensions on `Procedure.bodySite` entries."""
    found: list[tuple[str, str | None, dict[str, Any] | None]] = [
        (f"extension[procedure-targetBodyStructure][{i}]", reference_of(ext.get("valueReference")), None)
        for i, ext in enumerate(_extensions(resource, EXT_TARGET))]
    for j, site in enumerate(s for s in resource.get("bodySite") or [] if isinstance(s, dict)):
        found += [(f"bodySite[{j}].extension[bodySite]", reference_of(ext.get("valueReference")),
                   _strip_extensions(site)) for ext in _extensions(site, EXT_BODYSITE)]
    return found


def find_lesions(resource: dict[str, Any], facts: ProcedureFacts, index: ResourceIndex) -> None:
    """One lesion per distinct BodyStructure; else per distinct coded bodySite; else one for the Procedure."""
    seen: set[str] = set()
    duplicates = 0

    def add_structure(ref: str | None, element: str, site: dict[str, Any] | None) -> None:
        nonlocal duplicates
        if ref is None:
            facts.flag("invalid-resource", f"{element} has no valueReference to a BodyStructure")
            return
        if ref.startswith("#"):
            ref = f"{facts.ref}{ref}"  # contained BodyStructure: local to this Procedure
        if ref in seen:
            duplicates += 1
            return
        seen.add(ref)
        label, location = _body_structure_site(ref, index)
        facts.lesions.append(Lesion(ref, element, label, len(facts.lesions), ref, location or site))

    for element, ref, site in body_structure_references(resource):
        add_structure(ref, element, site)
    sites = [s for s in resource.get("bodySite") or [] if isinstance(s, dict)]
    if facts.lesions or seen:
        if duplicates:
            facts.lesion_note = f"{duplicates} repeated BodyStructure reference(s) counted once"
        return
    for j, site in enumerate(sites):
        plain = _strip_extensions(site)
        if not plain:
            continue
        codes = sorted((c.get("system", ""), c["code"]) for c in _codings(plain))
        key = f"{facts.ref}#site:" + json.dumps([codes, plain.get("text", "")], separators=(",", ":"))
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        facts.lesions.append(Lesion(key, f"bodySite[{j}]", _concept_label(plain) or key, len(facts.lesions),
                                    None, plain))
    if facts.lesions:
        if duplicates:
            facts.lesion_note = f"{duplicates} identical bodySite entr{'y' if duplicates == 1 else 'ies'} counted once"
        return
    facts.lesions.append(Lesion(f"{facts.ref}#procedure", "Procedure", "site not recorded", 0))
    facts.lesion_note = "no BodyStructure and no bodySite: counted as one lesion"


def extract(item_resource: dict[str, Any], origin: str, index: ResourceIndex, tables: CodeTables) -> ProcedureFacts:
    """All facts of one Procedure; an FNA that cannot be coded ends with disposition REVIEW and findings."""
    resource = item_resource
    rid = resource.get("id")
    ref = f"Procedure/{rid}" if isinstance(rid, str) and rid else f"Procedure at {origin}"
    facts = ProcedureFacts(ref=ref, origin=origin, kind=classify(resource, tables), resource=resource)
    if facts.kind is Kind.OTHER:
        facts.disposition = Disposition.SKIPPED
        return facts
    if not (isinstance(rid, str) and rid):
        facts.flag("invalid-resource", "Procedure has no id, so a charge could not point at it")
    status = resource.get("status")
    facts.status = status if isinstance(status, str) else None
    if facts.status in NO_CHARGE_STATUSES:
        facts.disposition = Disposition.NO_CHARGE
        return facts
    if facts.status in REVIEW_STATUSES:
        facts.flag("status-needs-review", f"status '{facts.status}': whether a lesion was sampled needs a coder")
    elif facts.status != "completed":
        facts.flag("invalid-resource", f"status {status!r} is not an R4 Procedure status")

    patient = reference_of(resource.get("subject"))
    if not patient:
        facts.flag("invalid-resource", "Procedure has no subject")
    elif not patient.startswith("Patient/"):
        facts.flag("invalid-resource", f"subject {patient} is not a Patient")
    performers = [p for p in resource.get("performer") or [] if isinstance(p, dict)]
    performer = reference_of(performers[0].get("actor")) if performers else None
    if not performer:
        facts.flag("missing-performer", "no performer.actor: professional charges need the performing provider")
    encounter = reference_of(resource.get("encounter")) or ""
    parse_performed(resource, facts, tables)
    if facts.kind is Kind.FNA:
        find_modality(resource, facts, tables)
    find_lesions(resource, facts, index)
    if patient and performer and facts.performed:
        day = facts.performed.astimezone(tables.settings.zone).date().isoformat()
        facts.session = SessionKey(day, patient, performer, encounter)
    return facts
