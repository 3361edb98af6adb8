"""From one Procedure dict to the facts the coding rules need: kind, status, who bills, date of service,
modality evidence, lesions.

Pure: reads the Procedure and the resource index, never the network or the disk. Every fact remembers
which element it came from and which rule of docs/input-contract.md decided it, so `explain` can answer
"why this code?".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from adapter.config import CodeKey, CodeTables
from adapter.extraction.index import (
    Entry,
    Resolved,
    ResourceIndex,
    modifier_extensions,
    reference_of,
    version_rank,
)
from adapter.extraction.modifiers import deceased_before, is_test_data, modifier_findings
from adapter.extraction.timezones import DEFAULT_ZONE, FacilityZone, facility_zone

EXT_METHOD = "http://hl7.org/fhir/StructureDefinition/procedure-method"
EXT_TARGET = "http://hl7.org/fhir/StructureDefinition/procedure-targetBodyStructure"
EXT_BODYSITE = "http://hl7.org/fhir/StructureDefinition/bodySite"
EXT_APPROACH = "http://hl7.org/fhir/StructureDefinition/procedure-approachBodyStructure"

NO_CHARGE_STATUSES = {"not-done", "preparation", "in-progress", "on-hold", "entered-in-error"}
REVIEW_STATUSES = {"stopped", "unknown"}
DELETED = "deleted"
"""Status shown for a Procedure whose newest version in the input is a delete."""


class Kind(StrEnum):
    FNA = "fna"
    CORE = "core-needle-biopsy"
    GUIDANCE = "imaging-guidance"
    INCLUDING = "including-procedure"
    """A procedure whose code already includes the FNA (an EUS/EBUS endoscopy): not ours, but it makes the FNA
    it includes bill nothing (config/including-procedures.yaml)."""
    OTHER = "other"


class Disposition(StrEnum):
    BILLABLE = "billable"
    NO_CHARGE = "no-charge"
    REVIEW = "review"
    SKIPPED = "skipped"
    MERGED = "merged"
    """Billed under another Procedure: a duplicate delivery, or a child (`partOf`) of an FNA."""


class Rule(StrEnum):
    """The rules of docs/input-contract.md that `explain` names behind each decision."""

    REFERENCES = "references"
    VERSIONS = "versions"
    RENDERING = "rendering-provider"
    DATE = "date-of-service"
    SESSION = "session"
    DUPLICATE = "duplicate-delivery"
    PART_OF = "part-of"
    GUIDANCE = "guidance-procedure"
    REPEATED_SITE = "repeated-site"
    BILATERAL = "bilateral-site"
    CORE = "core-biopsy"
    OTHER_PATIENT = "other-patient"
    MODIFIER_EXTENSION = "modifier-extension"
    MODIFIER_ELEMENT = "modifier-element"
    """FHIR's core modifier elements (status, active, implicitRules, Patient.link, ...) of the resources read."""
    TEST_DATA = "test-data"
    BUNDLE = "bundle-semantics"
    """What an entry means by its Bundle's type and its request (a DELETE carrying a body deletes)."""
    LOCAL_CODE = "local-code"
    MODALITY = "modality"
    LESIONS = "lesions"
    STATUS = "status"
    MUE = "mue"
    KIND = "kind"
    """Is it an FNA (section 2): skipped otherwise."""
    CODING = "coding"
    """Primary and add-on codes per modality, modifier 59 (section 7)."""
    BILLING = "billing"
    """What a Claim needs: billing provider, payer, place of service, diagnoses, prices (section 8)."""
    INCLUDED = "included-fna"
    """An FNA whose service another procedure's code already includes bills nothing."""
    EFFECTIVE = "effective-dates"
    """The date of service chooses each table row; a date without a valid row goes to review."""


RULE_OF_REASON = {
    "unresolved-reference": Rule.REFERENCES, "version-conflict": Rule.VERSIONS,
    "missing-performer": Rule.RENDERING, "ambiguous-performer": Rule.RENDERING,
    "invalid-resource": Rule.REFERENCES, "missing-performed-date": Rule.DATE,
    "session-ambiguous": Rule.SESSION, "duplicate-conflict": Rule.DUPLICATE,
    "bilateral-site": Rule.BILATERAL, "core-biopsy-same-lesion": Rule.CORE,
    "other-patient": Rule.OTHER_PATIENT, "unknown-modifier-extension": Rule.MODIFIER_EXTENSION,
    "modality-conflict": Rule.MODALITY, "modality-missing": Rule.MODALITY,
    "lesion-modality-conflict": Rule.MODALITY, "status-needs-review": Rule.STATUS,
    "mue-exceeded": Rule.MUE, "session-held": Rule.SESSION,
    "missing-payer": Rule.BILLING, "missing-billing-provider": Rule.BILLING, "missing-place-of-service": Rule.BILLING,
    "missing-diagnosis": Rule.BILLING, "missing-price": Rule.BILLING, "invalid-output": Rule.BILLING,
    "modifier-element": Rule.MODIFIER_ELEMENT, "unmapped-local-code": Rule.LOCAL_CODE,
    "no-row-for-date": Rule.EFFECTIVE, "time-zone-conflict": Rule.DATE, "included-fna-distinct-site": Rule.INCLUDED,
    "x12-missing-element": Rule.BILLING,
}


@dataclass(frozen=True, slots=True)
class Finding:
    """Why something needs an analyst: a stable reason code and a sentence for humans."""

    reason: str
    detail: str

    @property
    def rule(self) -> str:
        return str(RULE_OF_REASON.get(self.reason, self.reason))


@dataclass(frozen=True, slots=True)
class Evidence:
    element: str
    system: str
    code: str
    display: str | None
    modality: str | None
    out_of_date: str = ""
    """Set when the code is in a table whose rows are not valid on the date of service (rule effective-dates)."""

    def describe(self) -> str:
        label = f" {self.display}" if self.display else ""
        return f"{self.element}: {self.system}|{self.code}{label}"


@dataclass(frozen=True, slots=True)
class Lesion:
    key: str
    """Identity across the session: `BodyStructure/x`, or `Procedure/p#site:...` for coded sites."""
    element: str
    label: str
    position: int
    body_structure: str | None = None
    site: dict[str, Any] | None = None
    site_key: str | None = None
    """Coded site and laterality (no text): how lesions without a shared BodyStructure are compared."""
    bilateral: bool = False


@dataclass(frozen=True, order=True)
class SessionKey:
    """One billing session: same date, patient, performer and encounter."""

    date: str
    patient: str
    performer: str
    encounter: str = ""

    def text(self) -> str:
        return f"{self.patient}|{self.performer}|{self.encounter or '-'}|{self.date}"


@dataclass(slots=True)
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
    service_date: str | None = None
    modality: str | None = None
    modality_note: str = ""
    evidence: list[Evidence] = field(default_factory=list)
    lesions: list[Lesion] = field(default_factory=list)
    lesion_note: str = ""
    entry: Entry | None = None
    patient: str | None = None
    encounter: str = ""
    rendering: str | None = None
    """The rendering practitioner (`Practitioner/x`, or a logical `Practitioner?identifier=...`)."""
    rendering_role: str | None = None
    """The PractitionerRole the rendering practitioner was named through, if any."""
    on_behalf_of: str | None = None
    """`performer.onBehalfOf` of the chosen performer (an Organization), if given."""
    reasons: list[tuple[str, dict[str, Any] | None]] = field(default_factory=list)
    """`reasonReference` targets: canonical key and the resource when the input holds it."""
    identifiers: tuple[tuple[str, str], ...] = ()
    part_of: list[Resolved] = field(default_factory=list)
    merged_into: str | None = None
    time_basis: str = ""
    """How the date of service was read: `offset`, `utc-facility`, `utc-setting`, `utc-default` (session.time_zone
    left at UTC), `date` or `local`."""
    included_in: str = ""
    """The Procedure whose code already includes this FNA (rule included-fna); it then bills nothing."""
    conflicting_copies: frozenset[str] = frozenset()
    """Procedures that are the same procedure as this one but disagree with it (duplicate-conflict)."""
    merge_basis: str = ""
    """Why it is billed under `merged_into`, without free text or identifier values (logs): `duplicate (the same
    Procedure.identifier)`, `duplicate (the same patient, provider, performed time and site)` or `part-of`."""
    notes: list[tuple[str, str]] = field(default_factory=list)
    """(rule, sentence): every decision taken for this Procedure, for `explain`."""
    roles: list[str] = field(default_factory=list)
    """The PractitionerRoles of the input its performers name (their content is read)."""
    reference_forms: list[str] = field(default_factory=list)
    """How each reference in a form other than plain `Type/id` was resolved (rule references)."""
    no_charge_why: str = ""
    """Why a no-charge Procedure is not billed when its status is not the reason (test data)."""

    @property
    def id(self) -> str:
        return self.ref.split("/", 1)[1] if "/" in self.ref else self.ref

    def flag(self, reason: str, detail: str) -> None:
        self.findings.append(Finding(reason, detail))
        self.disposition = Disposition.REVIEW

    def note(self, rule: Rule, text: str) -> None:
        self.notes.append((str(rule), text))

    def resolved(self, element: str, target: Resolved) -> None:
        """Remember how a reference written in a form other than plain `Type/id` was resolved (for `explain`)."""
        if target.how:
            self.reference_forms.append(f"{element} {target.written} is {target.key} ({target.how})")

    def sort_key(self) -> tuple[datetime, str]:
        return (self.performed or datetime.max.replace(tzinfo=UTC), self.ref)


def _codings(concept: Any) -> list[dict[str, Any]]:
    if not isinstance(concept, dict):
        return []
    return [c for c in concept.get("coding") or [] if isinstance(c, dict) and c.get("code")]


def _keys(concept: Any) -> set[CodeKey]:
    return {(c.get("system", ""), c["code"]) for c in _codings(concept)}


def _extensions(element: dict[str, Any], url: str) -> list[dict[str, Any]]:
    return [e for e in element.get("extension") or [] if isinstance(e, dict) and e.get("url") == url]


def code_keys(concept: Any, tables: CodeTables) -> set[CodeKey]:
    """The codings of `Procedure.code`, with the SNOMED CT/CPT targets of the site's local codes that map to them
    (config/local-codes.json): a mapped code is coded like its targets (rule local-code)."""
    keys = _keys(concept)
    return keys | {(t[0], t[1]) for _, t in tables.local_codes.mapped(concept)} if tables.local_codes.targets else keys


def classify(resource: dict[str, Any], tables: CodeTables) -> Kind:
    keys = code_keys(resource.get("code"), tables)
    if keys & tables.fna:
        return Kind.FNA
    if keys & tables.core_needle_biopsy:
        return Kind.CORE
    if any(k in tables.guidance_procedures for k in keys):
        return Kind.GUIDANCE
    if any(k in tables.including for k in keys):
        return Kind.INCLUDING
    return Kind.OTHER


def including_codes(resource: dict[str, Any], tables: CodeTables) -> list[tuple[CodeKey, str]]:
    """The codings of `Procedure.code` that are in config/including-procedures.yaml, with their display."""
    return [((c.get("system", ""), c["code"]), str(c.get("display") or "")) for c in _codings(resource.get("code"))
            if (c.get("system", ""), c["code"]) in tables.including]


# ------------------------------------------------------------------------------------ date of service
def _utc_day(moment: datetime, element: str, text: str, facts: ProcedureFacts, tables: CodeTables,
             index: ResourceIndex | None, resource: dict[str, Any]) -> tuple[str | None, str]:
    """(date of service, why) of a time written in UTC: the facility's zone (adapter/extraction/timezones.py),
    else `session.time_zone`. None when the facility's zones disagree on the date, or one is not a zone."""
    if index is None:
        found = FacilityZone(())
    elif resource.get("location") is None:  # what Procedures of one encounter and performer share: once
        found = index.memo(("facility-zone", facts.encounter, facts.on_behalf_of, facts.rendering_role),
                           lambda: facility_zone(resource, facts.encounter, facts.on_behalf_of, facts.rendering_role,
                                                 index, facts.entry))
    else:
        found = facility_zone(resource, facts.encounter, facts.on_behalf_of, facts.rendering_role, index, facts.entry)
    if found.problems:
        facts.flag("invalid-resource", "; ".join(found.problems))
        return None, ""
    if found.zones:
        days = {moment.astimezone(ZoneInfo(zone)).date().isoformat() for zone, _ in found.zones}
        if len(days) > 1:
            said = "; ".join(f"{zone} ({where})" for zone, where in found.zones)
            facts.flag("time-zone-conflict", f"{element} {text} is written in UTC and the facility's time zones "
                                             f"disagree on its date ({', '.join(sorted(days))}): {said}")
            return None, ""
        zone, where = found.zones[0]
        facts.time_basis = "utc-facility"
        day = days.pop()
        return day, f"{element} {text} is written in UTC: its date in {zone} ({where}) is {day}"
    zone_info = tables.settings.zone
    facts.time_basis = "utc-default" if zone_info.key == DEFAULT_ZONE else "utc-setting"
    day = moment.astimezone(zone_info).date().isoformat()
    return day, (f"{element} {text} is written in UTC and no Location or Organization carries a timezone "
                 f"extension: its date in session.time_zone {zone_info.key} is {day}")


def parse_performed(resource: dict[str, Any], facts: ProcedureFacts, tables: CodeTables,
                    index: ResourceIndex | None = None) -> None:
    """Sets `performed` (an instant, for ordering) and the date of service: the local calendar date of the
    time as written; for times written in UTC the facility's zone (the timezone extension of a Location or the
    performing Organization), else `session.time_zone`, which also dates values without a time."""
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
    if not isinstance(text, str) or len(text) < 10 or text[4:5] != "-" or text[7:8] != "-":
        facts.flag("invalid-resource", f"{element} {text!r} is not precise to the day")
        return
    zone = tables.settings.zone
    try:
        if len(text) == 10:
            moment = datetime.combine(date.fromisoformat(text), time(0), tzinfo=zone)
            day = text
            how = f"{element} {text} is a date: the date of service itself"
            facts.time_basis = "date"
        else:
            moment = datetime.fromisoformat(text)
            offset = moment.utcoffset()
            if offset is None:  # not valid FHIR (a time needs an offset); read as local time
                moment = moment.replace(tzinfo=zone)
                day = text[:10]
                how = f"{element} {text} has no UTC offset: its own calendar date"
                facts.time_basis = "local"
            elif offset == timedelta(0):
                found, how = _utc_day(moment, element, text, facts, tables, index, resource)
                if found is None:
                    return
                day = found
            else:
                day = text[:10]
                how = f"{element} {text}: the local date as written (its own UTC offset)"
                facts.time_basis = "offset"
    except ValueError:
        facts.flag("invalid-resource", f"{element} {text!r} is not a valid FHIR dateTime")
        return
    facts.performed = moment.astimezone(UTC)
    facts.performed_text = text
    facts.service_date = day
    facts.note(Rule.DATE, how)


# ------------------------------------------------------------------------------------------ modality
def own_evidence(resource: dict[str, Any], tables: CodeTables, prefix: str = "",
                 day: str | None = None) -> list[Evidence]:
    """Guidance evidence a Procedure gives about itself: procedure-method extensions and Procedure.code, each code
    read with the table row valid on the date of service `day` (rule effective-dates)."""
    found: list[Evidence] = []
    for i, ext in enumerate(_extensions(resource, EXT_METHOD)):
        for coding in _codings(ext.get("valueCodeableConcept")):
            key = (coding.get("system", ""), coding["code"])
            rows = tables.method_codes.get(key)
            modality = rows.on(day) if rows else None
            late = "" if modality or rows is None else f"config/modalities.yaml method_codes: {rows.periods()}"
            found.append(Evidence(f"{prefix}extension[procedure-method][{i}]", key[0], key[1],
                                  coding.get("display"), modality, late))
    codings = [(f"{prefix}Procedure.code", c) for c in _codings(resource.get("code"))]
    codings += [(f"{prefix}Procedure.code {local.get('system', '')}|{local.get('code')} (local code, mapped)",
                 {"system": system, "code": code, "display": display or None})
                for local, (system, code, display) in tables.local_codes.mapped(resource.get("code"))]
    for element, coding in codings:
        key = (coding.get("system", ""), coding["code"])
        rows = tables.procedure_codes.get(key) or tables.guidance_procedures.get(key)
        modality = rows.on(day) if rows else None
        if rows is not None:
            late = "" if modality else f"config/modalities.yaml: {rows.periods()}"
            found.append(Evidence(element, key[0], key[1], coding.get("display"), modality, late))
    return found


STANDARD_PROCEDURE_SYSTEMS = ("http://snomed.info/sct",)
"""With CPT (tables.cpt_system): code systems whose codes the tables judge; a Procedure coded in none of them
carries only the site's own codes."""


def unmapped_local_code(resource: dict[str, Any], tables: CodeTables) -> str | None:
    """Why a Procedure we would skip may be an FNA coded with a local code nobody mapped: an FNA word in
    `code.text` (or a coding's display), or, with no SNOMED CT or CPT coding, our method or target extension."""
    concept = resource.get("code") if isinstance(resource.get("code"), dict) else {}
    codings = [c for c in concept.get("coding") or [] if isinstance(c, dict)]
    named = ", ".join(f"{c.get('system', '')}|{c.get('code', '')}" for c in codings) or "no coding"
    for text in [concept.get("text"), *(c.get("display") for c in codings)]:
        word = tables.local_codes.fna_word(text)
        if word:
            return f"Procedure.code ({named}) is in no table, but its text says {word!r}"
    standard = {*STANDARD_PROCEDURE_SYSTEMS, tables.cpt_system}
    if any(c.get("system") in standard for c in codings):
        return None
    ours = [name for url, name in ((EXT_METHOD, "procedure-method"), (EXT_TARGET, "procedure-targetBodyStructure"))
            if _extensions(resource, url)]
    if ours:
        return f"Procedure.code ({named}) is in no table nor SNOMED CT or CPT, but it carries {' and '.join(ours)}"
    return None


def decide_modality(facts: ProcedureFacts, tables: CodeTables) -> None:
    """All evidence (own, children's and siblings') agrees -> that modality; disagrees or none -> review. A code whose
    table rows are none valid on the date of service is not read as evidence of anything: review."""
    late = [e for e in facts.evidence if e.out_of_date]
    if late:
        facts.flag("no-row-for-date", "; ".join(f"{e.describe()} has no row valid on {facts.service_date} "
                                                f"({e.out_of_date})" for e in late))
        return
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


# ------------------------------------------------------------------------------------------- lesions
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


def _plain_text(value: Any) -> str:
    return " ".join(str(value).split()).casefold() if value else ""


def site_signature(concepts: list[Any], qualifiers: list[Any], tables: CodeTables) -> tuple[str | None, set[str]]:
    """(coded site and laterality as one comparable key, the sides) of a site; key None when uncoded."""
    codes: set[CodeKey] = set()
    sides: set[str] = set()
    for concept in [*concepts, *qualifiers]:
        for key in _keys(concept):
            if key in tables.laterality:
                sides.add(tables.laterality[key])
            elif concept in concepts:
                codes.add(key)
    if not codes:
        return None, sides
    return ";".join(f"{system}|{code}" for system, code in sorted(codes)) + "@" + ",".join(sorted(sides)), sides


def _site_qualifiers(site: dict[str, Any], tables: CodeTables) -> list[Any]:
    """Laterality written as an extension on a bodySite (mCODE and the like), as concepts."""
    out: list[Any] = []
    for ext in site.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") in tables.laterality_extensions:
            if isinstance(ext.get("valueCodeableConcept"), dict):
                out.append(ext["valueCodeableConcept"])
            elif isinstance(ext.get("valueCoding"), dict):
                out.append({"coding": [ext["valueCoding"]]})
    return out


def body_structure_extensions(resource: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any] | None]]:
    """(element, Reference value, coded site) of every lesion-bearing BodyStructure extension: the
    procedure-targetBodyStructure extensions, then bodySite extensions on `Procedure.bodySite` entries."""
    found: list[tuple[str, Any, dict[str, Any] | None]] = [
        (f"extension[procedure-targetBodyStructure][{i}]", ext.get("valueReference"), None)
        for i, ext in enumerate(_extensions(resource, EXT_TARGET))]
    for j, site in enumerate(s for s in resource.get("bodySite") or [] if isinstance(s, dict)):
        found += [(f"bodySite[{j}].extension[bodySite]", ext.get("valueReference"), _strip_extensions(site))
                  for ext in _extensions(site, EXT_BODYSITE)]
    return found


def body_structure_references(resource: dict[str, Any]) -> list[tuple[str, str | None, dict[str, Any] | None]]:
    """As `body_structure_extensions`, with each reference as `Type/id` (server data: no Bundle context)."""
    return [(element, reference_of(value), site) for element, value, site in body_structure_extensions(resource)]


def _structure_lesion(target: Resolved, element: str, site: dict[str, Any] | None, position: int,
                      facts: ProcedureFacts, index: ResourceIndex, tables: CodeTables) -> Lesion:
    key = target.key or ""
    found = target.resource
    if not found:
        signature, sides = site_signature([site] if site else [], _site_qualifiers(site or {}, tables), tables)
        return Lesion(key, element, key, position, key, site, signature, "bilateral" in sides)
    location = found.get("location") if isinstance(found.get("location"), dict) else None
    qualifiers = [q for q in found.get("locationQualifier") or [] if isinstance(q, dict)]
    parts = [found.get("description") or _concept_label(found.get("morphology")), _concept_label(location),
             ", ".join(_concept_label(q) for q in qualifiers)]
    label = " / ".join(p for p in parts if p)
    signature, sides = site_signature([location] if location else [], qualifiers, tables)
    if signature is None and site:
        signature, sides = site_signature([site], [], tables)
    check_owner(facts, element, target, "patient", index)
    return Lesion(key, element, f"{key} ({label})" if label else key, position, key,
                  (_strip_extensions(location) if location else None) or site, signature, "bilateral" in sides)


def find_lesions(resource: dict[str, Any], facts: ProcedureFacts, index: ResourceIndex, tables: CodeTables,
                 structures: list[Resolved] | None = None) -> None:
    """One lesion per distinct BodyStructure; else per distinct coded bodySite; else one for the Procedure.
    The BodyStructures found are appended to `structures`."""
    seen: set[str] = set()
    inactive: list[str] = []
    duplicates = 0
    for element, value, site in body_structure_extensions(resource):
        if value is None:
            facts.flag("invalid-resource", f"{element} has no valueReference to a BodyStructure")
            continue
        target = index.resolve(value, facts.entry)
        if target.key is None:
            facts.flag("unresolved-reference", f"{element} {target.written}: {target.problem}")
            continue
        facts.resolved(element, target)
        if target.type not in (None, "BodyStructure"):
            facts.flag("invalid-resource", f"{element} {target.key} is not a BodyStructure")
            continue
        if target.key in seen:
            duplicates += 1
            continue
        seen.add(target.key)
        if structures is not None:
            structures.append(target)
        if target.resource is not None and target.resource.get("active") is False:
            inactive.append(f"{element} {target.key}")
            continue
        facts.lesions.append(_structure_lesion(target, element, site, len(facts.lesions), facts, index, tables))
    if inactive:
        facts.note(Rule.MODIFIER_ELEMENT, f"{'; '.join(inactive)}: BodyStructure.active false marks the record not "
                                          "valid: not a lesion")
        if not facts.lesions:
            facts.flag("modifier-element", f"every target BodyStructure is inactive ({'; '.join(inactive)}: "
                                           "BodyStructure.active false): which lesion was sampled is unknown")
    if facts.lesions or seen:
        if duplicates:
            facts.lesion_note = f"{duplicates} repeated BodyStructure reference(s) counted once"
        _check_bilateral(facts)
        return
    groups: dict[str | None, list[str]] = {}
    for j, site in enumerate(s for s in resource.get("bodySite") or [] if isinstance(s, dict)):
        plain = _strip_extensions(site)
        if not plain:
            continue
        signature, sides = site_signature([plain], _site_qualifiers(site, tables), tables)
        text = _plain_text(plain.get("text"))
        texts = groups.get(signature) if signature else None
        if texts is not None and (not text or text in texts or texts == [""]):
            duplicates += 1  # the same coded site and laterality again (text differing only in case/spacing)
            continue
        if signature is None:
            if text in groups.setdefault(None, []):
                duplicates += 1
                continue
            groups[None].append(text)
        else:
            groups.setdefault(signature, []).append(text)
        key = f"{facts.ref}#site:" + json.dumps([signature, text], separators=(",", ":"))
        facts.lesions.append(Lesion(key, f"bodySite[{j}]", _concept_label(plain) or key, len(facts.lesions),
                                    None, plain, signature, "bilateral" in sides))
    if facts.lesions:
        if duplicates:
            facts.lesion_note = f"{duplicates} repeated bodySite entr{'y' if duplicates == 1 else 'ies'} counted once"
            facts.note(Rule.REPEATED_SITE, f"{facts.lesion_note}: the same coded site and laterality, text "
                                           "differing at most in case or spacing, is one lesion")
        _check_bilateral(facts)
        return
    facts.lesions.append(Lesion(f"{facts.ref}#procedure", "Procedure", "site not recorded", 0))
    facts.lesion_note = "no BodyStructure and no bodySite: counted as one lesion"


def _check_bilateral(facts: ProcedureFacts) -> None:
    for lesion in facts.lesions:
        if lesion.bilateral:
            facts.flag("bilateral-site", f"{lesion.element} {lesion.label} is qualified as bilateral: one site "
                                         "cannot tell how many lesions were sampled")


# ------------------------------------------------------------------------------------- who bills
def _person(target: Resolved, element: str, index: ResourceIndex,
            facts: ProcedureFacts | None = None) -> tuple[str | None, str | None, str]:
    """(practitioner key, PractitionerRole key, problem) of a resolved Practitioner or PractitionerRole."""
    if target.type == "Practitioner":
        return target.key, None, ""
    role = target.resource
    if role is None:
        return None, target.key, (f"{element} {target.key} is a PractitionerRole that is not in the input (nor "
                                  "on the server): its practitioner is the rendering provider")
    practitioner = index.resolve(role.get("practitioner"), target.entry)
    if practitioner.key is None or practitioner.type != "Practitioner":
        why = f" ({practitioner.written}: {practitioner.problem})" if practitioner.problem else ""
        return None, target.key, f"{element} {target.key} names no resolvable practitioner{why}"
    if facts is not None:
        facts.resolved(f"{target.key}.practitioner", practitioner)
    return practitioner.key, target.key, ""


def choose_rendering(resource: dict[str, Any], facts: ProcedureFacts, index: ResourceIndex,
                     tables: CodeTables) -> None:
    """The rendering provider: the performer whose function is a rendering function (PPRF), else the only
    eligible person; never a Device, Patient, RelatedPerson or Organization. No performer at all -> the
    encounter's only primary-performer participant."""
    performers = [p for p in resource.get("performer") or [] if isinstance(p, dict)]
    if not performers:
        _from_encounter(facts, index, tables)
        return
    primary: list[tuple[str, str | None, int]] = []
    other: list[tuple[str, str | None, int]] = []
    passed: list[str] = []
    for i, perf in enumerate(performers):
        element = f"performer[{i}]"
        target = index.resolve(perf.get("actor"), facts.entry)
        kind = target.type
        if target.key is None and kind is None:
            facts.flag("unresolved-reference", f"{element}.actor {target.written or '(empty)'}: {target.problem}")
            continue
        if kind not in tables.rendering_actor_types:
            passed.append(f"{element}.actor {target.key} is a {kind}, never the rendering provider")
            continue
        facts.resolved(f"{element}.actor", target)
        person, role, problem = _person(target, f"{element}.actor", index, facts)
        if role and target.resource is not None:
            facts.roles.append(role)
        if person is None:
            facts.flag("unresolved-reference", problem)
            continue
        function = _keys(perf.get("function"))
        if function & tables.rendering_functions:
            primary.append((person, role, i))
        elif function & tables.non_rendering_functions:
            passed.append(f"{element} ({person}) has function {_concept_label(perf.get('function'))}: "
                          "never the rendering provider")
        else:
            other.append((person, role, i))
    pick = primary or other
    persons = sorted({p for p, _, _ in pick})
    if len(persons) > 1:
        said = ", ".join(f"performer[{i}] {p}" for p, _, i in pick)
        facts.flag("ambiguous-performer", f"{len(persons)} different people could be the rendering provider "
                                          f"({said}) and no single one has a primary-performer function")
        return
    if not persons:
        if not facts.findings:
            facts.flag("missing-performer", "no eligible performer: " + ("; ".join(passed) or "no performer.actor"))
        return
    person, _, i = pick[0]
    role = next((r for _, r, _ in pick if r), None)
    facts.rendering, facts.rendering_role = person, role
    behalf = performers[i].get("onBehalfOf")
    behalf_target = index.resolve(behalf, facts.entry) if behalf else None
    facts.on_behalf_of = behalf_target.key if behalf_target else None
    if behalf_target is not None and behalf_target.key is None and behalf_target.written:
        facts.flag("unresolved-reference", f"performer[{i}].onBehalfOf {behalf_target.written}: "
                                           f"{behalf_target.problem}")
    elif behalf_target is not None:
        facts.resolved(f"performer[{i}].onBehalfOf", behalf_target)
    via = f" through {role}" if role else ""
    why = "its function is a primary performer" if primary else "the only eligible performer"
    facts.note(Rule.RENDERING, f"{person}{via} (performer[{i}]): {why}"
                               + (f"; passed over: {'; '.join(passed)}" if passed else ""))


def _from_encounter(facts: ProcedureFacts, index: ResourceIndex, tables: CodeTables) -> None:
    if not facts.encounter:
        facts.flag("missing-performer", "no performer.actor and no encounter: professional charges need the "
                                        "performing provider")
        return
    encounter = index.entry(facts.encounter)
    if encounter is None or encounter.deleted:
        facts.flag("missing-performer", f"no performer, and {facts.encounter} is not in the input to name its "
                                        "primary performer")
        return
    found: list[tuple[str, str | None, int]] = []
    for i, part in enumerate(p for p in encounter.resource.get("participant") or [] if isinstance(p, dict)):
        if not any(_keys(t) & tables.rendering_functions for t in part.get("type") or []):
            continue
        element = f"{facts.encounter} participant[{i}].individual"
        target = index.resolve(part.get("individual"), encounter)
        if target.key is None and target.type is None:
            facts.flag("unresolved-reference", f"no performer, and {element} {target.written or '(empty)'}: "
                                               f"{target.problem}")
            return
        if target.type not in tables.rendering_actor_types:
            continue
        facts.resolved(element, target)
        person, role, problem = _person(target, element, index, facts)
        if person is None:
            facts.flag("unresolved-reference", problem)
            return
        found.append((person, role, i))
    persons = sorted({p for p, _, _ in found})
    if len(persons) != 1:
        facts.flag("missing-performer", f"no performer, and {facts.encounter} has "
                                        f"{'no' if not persons else len(persons)} primary-performer participants "
                                        "(exactly one is needed)")
        return
    facts.rendering, facts.rendering_role, i = found[0]
    facts.note(Rule.RENDERING, f"no performer: {facts.rendering} is the only primary performer of "
                               f"{facts.encounter} (participant[{i}])")


# ---------------------------------------------------------------------------------------- safety
def _unknown_modifiers(resource: dict[str, Any], path: str, tables: CodeTables, entry: Entry | None) -> list[str]:
    if entry is not None and entry.container is None and entry.resource is resource:
        return entry.unknown_modifiers(tables.known_modifier_extensions)  # cached; the fast path when modifier-free
    if entry is not None and entry.modifier_free:  # its file holds no modifierExtension at all
        return []
    return modifier_extensions(resource, path, tables.known_modifier_extensions)


def context_keys(facts: ProcedureFacts, index: ResourceIndex, linked: list[Resolved]) -> list[str]:
    """Every resource (canonical key) besides the Procedure and its BodyStructures whose content feeds a decision
    about it: its Patient, Encounter (and the encounter's Locations and service provider), reason Conditions, the
    resources linked from its data (`linked_resources`), the rendering Practitioner and the PractitionerRoles of
    its performers (with their organization), `performer.onBehalfOf`, the patient's active Coverages (with their
    payors), and its orders' requesters. ChargeItemDefinitions are checked where prices are chosen.

    A reference billing needs that cannot be resolved (the billing provider's organization, the encounter's
    service provider, Locations and Accounts: another server's, say) sends the Procedure to review
    `unresolved-reference` rather than letting billing fall back as if it were absent."""
    keys: list[str | None] = [facts.patient, *(key for key, _ in facts.reasons), *(t.key for t in linked),
                              facts.rendering, facts.on_behalf_of]
    needed: list[tuple[str, Resolved]] = []
    for role in facts.roles:
        keys.append(role)
        organization = (index.get(role) or {}).get("organization")
        if organization is not None:
            needed.append((f"{role}.organization", index.resolve(organization, index.entry(role))))
    if facts.encounter:
        needed += index.memo(("encounter-context", facts.encounter), lambda: _encounter_context(facts.encounter, index))
        keys.append(facts.encounter)
    for element, target in needed:
        if target.key is None and target.written:  # a display-only Reference links nothing: not needed
            facts.flag("unresolved-reference", f"{element} {target.written}: {target.problem}")
        keys.append(target.key)
    if facts.patient:
        keys += index.memo(("patient-context", facts.patient), lambda: _patient_context(facts.patient or "", index))
    for target in linked:
        if target.type == "ServiceRequest" and target.resource is not None:
            keys.append(index.key_of(target.resource.get("requester"), target.key))
    return list(dict.fromkeys(k for k in keys if k))


def _encounter_context(encounter: str, index: ResourceIndex) -> list[tuple[str, Resolved]]:
    """The encounter's service provider, Locations and Accounts (billing provider by department, place of
    service, ChargeItem.account), each as (element, resolved)."""
    found, entry = index.get(encounter), index.entry(encounter)
    if found is None:
        return []
    out = [(f"{encounter}.serviceProvider", index.resolve(found["serviceProvider"], entry))] \
        if found.get("serviceProvider") is not None else []
    out += [(f"{encounter}.location[{i}].location", index.resolve(loc.get("location"), entry))
            for i, loc in enumerate(found.get("location") or []) if isinstance(loc, dict)]
    out += [(f"{encounter}.account[{i}]", index.resolve(acc, entry))
            for i, acc in enumerate(found.get("account") or [])]
    return out


def _patient_context(patient: str, index: ResourceIndex) -> list[str | None]:
    """The patient's active Coverages (the Claim's insurance) and their payors."""
    keys: list[str | None] = []
    for ref, cov in index.active_coverages(patient):
        keys += [ref, *(index.key_of(p, ref) for p in cov.get("payor") or [])]
    return keys


def check_owner(facts: ProcedureFacts, element: str, target: Resolved, field_name: str,
                index: ResourceIndex) -> None:
    """Flag a resource linked from the Procedure's data (`element` -> `target`) whose patient (`field_name`:
    BodyStructure.patient, Condition/Encounter/ServiceRequest.subject, Coverage.beneficiary, Account.subject)
    is another patient (`other-patient`), or cannot be told (`unresolved-reference`). A resource that names no
    patient, or (Account.subject) only non-patients, is not another patient's."""
    found = target.resource
    value = found.get(field_name) if found is not None else None
    if value is None or not facts.patient:
        return
    many = isinstance(value, list)
    owners = [index.resolve(v, target.entry) for v in (value if many else [value])]
    if any(o.key == facts.patient for o in owners):
        return
    where = f"{element} {target.key}.{field_name}"
    for owner in owners:
        logical = owner.key is not None and ("?" in owner.key or "?" in facts.patient)
        if owner.key is None or (logical and (not many or owner.type == "Patient")):
            facts.flag("unresolved-reference", f"{where} {owner.written or '(empty)'}: "
                                               f"{owner.problem or 'known only by identifier'}; whether it is "
                                               f"{facts.patient}'s cannot be told")
            return
    others = [o.key for o in owners if o.key and (not many or o.type == "Patient")]
    if others:
        facts.flag("other-patient", f"{element} {target.key} belongs to {', '.join(others)} ({field_name}), not to "
                                    f"the Procedure's subject {facts.patient}: wrong-patient data is never billed")


def _check_subject_of(value: Any, element: str, facts: ProcedureFacts, index: ResourceIndex,
                      field_name: str) -> Resolved:
    """Resolve a reference the Procedure makes, and flag a target that belongs to another patient."""
    target = index.resolve(value, facts.entry)
    if target.key is None:
        facts.flag("unresolved-reference", f"{element} {target.written or '(empty)'}: {target.problem}")
        return target
    facts.resolved(element, target)
    check_owner(facts, element, target, field_name, index)
    return target


def linked_resources(resource: dict[str, Any], facts: ProcedureFacts, index: ResourceIndex,
                     encounter: Resolved | None) -> list[Resolved]:
    """The Conditions, Accounts, Coverages and ServiceRequests the Procedure's data links to, each checked to be
    this patient's (rule other-patient): the encounter's `diagnosis.condition` and `account` (and each Account's
    `coverage`), the patient's own active Accounts' `coverage`, and each `basedOn` ServiceRequest (its `subject`
    and `insurance`). Returned (those in the input) for the modifierExtension check."""
    found: list[Resolved] = []

    def follow(value: Any, referrer: Entry | None, element: str, kind: str, owner: str) -> Resolved | None:
        target = index.resolve(value, referrer)
        if target.resource is None or target.type != kind:
            return None  # not in the input (or not that type): nothing of it is read
        facts.resolved(element, target)
        check_owner(facts, element, target, owner, index)
        found.append(target)
        return target

    def coverages_of(account: Resolved, element: str) -> None:
        for j, cov in enumerate(c for c in (account.resource or {}).get("coverage") or [] if isinstance(c, dict)):
            follow(cov.get("coverage"), account.entry, f"{element} {account.key} coverage[{j}].coverage", "Coverage",
                   "beneficiary")

    if encounter is not None and encounter.resource is not None:
        enc, where = encounter.resource, f"encounter {encounter.key}"
        for i, diag in enumerate(d for d in enc.get("diagnosis") or [] if isinstance(d, dict)):
            follow(diag.get("condition"), encounter.entry, f"{where} diagnosis[{i}].condition", "Condition", "subject")
        for i, value in enumerate(enc.get("account") or []):
            account = follow(value, encounter.entry, f"{where} account[{i}]", "Account", "subject")
            if account is not None:
                coverages_of(account, f"{where} account[{i}]")
    if facts.patient:
        seen = {t.key for t in found}
        for key in index.accounts_of(facts.patient):
            if key not in seen:
                account = Resolved(key, key, index.entry(key))
                found.append(account)
                coverages_of(account, f"{facts.patient}'s")
    for i, value in enumerate(resource.get("basedOn") or []):
        request = follow(value, facts.entry, f"basedOn[{i}]", "ServiceRequest", "subject")
        if request is None:
            continue
        for j, insurance in enumerate((request.resource or {}).get("insurance") or []):
            follow(insurance, request.entry, f"basedOn[{i}] {request.key} insurance[{j}]", "Coverage", "beneficiary")
    return found


# ---------------------------------------------------------------------------------------- extract
def extract(item_resource: dict[str, Any], origin: str, index: ResourceIndex, tables: CodeTables,
            entry: Entry | None = None) -> ProcedureFacts:
    """All facts of one Procedure; an FNA that cannot be coded ends with disposition REVIEW and findings."""
    resource = item_resource
    rid = resource.get("id")
    ref = f"Procedure/{rid}" if isinstance(rid, str) and rid else f"Procedure at {origin}"
    if entry is not None and entry.deleted:
        return _deleted(ref, origin, entry, index, tables)
    facts = ProcedureFacts(ref=ref, origin=origin, kind=classify(resource, tables), resource=resource, entry=entry)
    suspect = unmapped_local_code(resource, tables) if facts.kind is Kind.OTHER else None
    if facts.kind is Kind.OTHER and suspect is None:
        facts.disposition = Disposition.SKIPPED
        return facts
    if suspect is not None:  # read on as an FNA, so that its session waits with it: its lesions may be add-ons
        facts.kind = Kind.FNA
        facts.flag("unmapped-local-code", f"{suspect}: map the code in config/local-codes.json (a ConceptMap to "
                                          "SNOMED CT or CPT), or code the Procedure; never skipped silently")
    mapped = tables.local_codes.mapped(resource.get("code"))
    if mapped:
        facts.note(Rule.LOCAL_CODE, "; ".join(f"Procedure.code {c.get('system', '')}|{c.get('code')} is coded as "
                                              f"{system}|{code}{f' {display}' if display else ''}"
                                              for c, (system, code, display) in mapped)
                   + f" (config/local-codes.json, ConceptMap {tables.local_codes.source})")
    if not (isinstance(rid, str) and rid):
        facts.flag("invalid-resource", "Procedure has no id, so a charge could not point at it")
    if ref in index.superseded:
        kept = index.entries[ref]
        facts.note(Rule.VERSIONS, f"{len(index.superseded[ref]) + 1} copies in the input; version "
                                  f"{(resource.get('meta') or {}).get('versionId', '(none)')} from {kept.origin} is "
                                  "the newest (highest meta.versionId, then meta.lastUpdated)")
    if ref in index.conflicts:
        facts.flag("version-conflict", f"{len(index.conflicts[ref])} different copies with the same version "
                                       f"({', '.join(index.conflicts[ref])}): which one is current is unknown")
    status = resource.get("status")
    facts.status = status if isinstance(status, str) else None
    facts.identifiers = tuple(sorted({(str(i.get("system", "")), str(i["value"]))
                                      for i in resource.get("identifier") or []
                                      if isinstance(i, dict) and i.get("value")}))
    facts.part_of = [index.resolve(p, entry) for p in resource.get("partOf") or []]
    for i, target in enumerate(facts.part_of):
        facts.resolved(f"partOf[{i}]", target)
    if facts.status in NO_CHARGE_STATUSES:
        facts.disposition = Disposition.NO_CHARGE
        return _noted_references(facts)
    if is_test_data(resource):
        return _test_data(facts, "the Procedure")
    if facts.status in REVIEW_STATUSES:
        facts.flag("status-needs-review", f"status '{facts.status}': whether a lesion was sampled needs a coder")
    elif facts.status != "completed":
        facts.flag("invalid-resource", f"status {status!r} is not an R4 Procedure status")

    subject = index.resolve(resource.get("subject"), entry)
    if resource.get("subject") is None:
        facts.flag("invalid-resource", "Procedure has no subject")
    elif subject.key is None:
        facts.flag("unresolved-reference", f"subject {subject.written or '(empty)'}: {subject.problem}")
    elif subject.type != "Patient":
        facts.flag("invalid-resource", f"subject {subject.key} is not a Patient")
    else:
        facts.patient = subject.key
        facts.resolved("subject", subject)
        if is_test_data(subject.resource):
            return _test_data(facts, f"its subject {subject.key}", "its Patient")
    encounter: Resolved | None = None
    if resource.get("encounter") is not None:
        encounter = _check_subject_of(resource.get("encounter"), "encounter", facts, index, "subject")
        facts.encounter = encounter.key or ""
    for i, value in enumerate(resource.get("reasonReference") or []):
        target = _check_subject_of(value, f"reasonReference[{i}]", facts, index, "subject")
        if target.key:
            facts.reasons.append((target.key, target.resource))
    linked = linked_resources(resource, facts, index, encounter)
    choose_rendering(resource, facts, index, tables)
    parse_performed(resource, facts, tables, index)
    if facts.kind in (Kind.FNA, Kind.GUIDANCE):
        facts.evidence = own_evidence(resource, tables, day=facts.service_date)
    structures: list[Resolved] = []
    find_lesions(resource, facts, index, tables, structures)
    unknown = _unknown_modifiers(resource, "Procedure", tables, entry)
    elements = entry.modifier_elements() if entry is not None else modifier_findings(resource, facts.ref)
    for target in structures:
        if target.resource is not None:
            unknown += _unknown_modifiers(target.resource, target.key or "", tables, target.entry)
            if target.entry is not None:
                elements = [*elements, *target.entry.modifier_elements()]
    for key in context_keys(facts, index, linked):
        found = index.entry(key)
        if found is not None:
            unknown += found.unknown_modifiers(tables.known_modifier_extensions)
            elements = [*elements, *found.modifier_elements()]
    if unknown:
        facts.flag("unknown-modifier-extension", f"{'; '.join(dict.fromkeys(unknown))}: not understood, and FHIR "
                                                 "forbids processing a resource as if a modifierExtension were absent")
    died = deceased_before(index.get(facts.patient), facts.service_date)
    if died:
        elements = [*elements, f"Patient.deceasedDateTime {died} ({facts.patient}): before the date of service "
                               f"{facts.service_date}"]
    if elements:
        facts.flag("modifier-element", f"{'; '.join(dict.fromkeys(elements))}: a modifier element changes what the "
                                       "resource means, and FHIR forbids processing it as if it were absent")
    if facts.patient and facts.rendering and facts.service_date:
        facts.session = SessionKey(facts.service_date, facts.patient, facts.rendering, facts.encounter)
    return _noted_references(facts)


def _test_data(facts: ProcedureFacts, whose: str, said: str = "") -> ProcedureFacts:
    """Test data (meta.security HTEST on the Procedure or its Patient) is never billed: no charge, by rule.
    `said` names it without a patient reference (the no-charge line goes to stderr)."""
    facts.findings.clear()
    facts.disposition = Disposition.NO_CHARGE
    facts.no_charge_why = f"test data ({said or whose} carries meta.security HTEST)"
    facts.note(Rule.TEST_DATA, f"{whose} is marked test data (meta.security v3-ActReason HTEST): never billed")
    return _noted_references(facts)


def _noted_references(facts: ProcedureFacts) -> ProcedureFacts:
    """One `references` note for every reference written in a form other than plain `Type/id`."""
    if facts.reference_forms:
        facts.note(Rule.REFERENCES, "; ".join(dict.fromkeys(facts.reference_forms)))
    return facts


def _deleted(ref: str, origin: str, entry: Entry, index: ResourceIndex, tables: CodeTables) -> ProcedureFacts:
    """A Procedure whose newest version is a delete bills nothing; its kind comes from its last content."""
    earlier = [e for e in index.superseded.get(ref, []) if not e.deleted]
    last = max(earlier, key=lambda e: version_rank(e.resource), default=None)
    content = entry.resource if "code" in entry.resource else last.resource if last else entry.resource
    kind = classify(content, tables)
    facts = ProcedureFacts(ref=ref, origin=origin, kind=kind, resource=content, entry=entry, status=DELETED)
    facts.disposition = Disposition.NO_CHARGE if kind not in (Kind.OTHER, Kind.INCLUDING) else Disposition.SKIPPED
    body = " (a DELETE entry: the resource it still carries is not billed)" if "code" in entry.resource else ""
    facts.note(Rule.BUNDLE if body else Rule.VERSIONS, f"the newest version in the input ({origin}) deletes it{body}")
    return facts

