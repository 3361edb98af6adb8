"""ICD-10-CM diagnoses of a Claim and each line's pointers (837P: at most 12 per claim, 4 per line).

Every reason of a billed Procedure (reasonCode, and the code of each Condition in reasonReference) must
become one ICD-10-CM code: its own ICD-10-CM coding, else the first of its codings that
config/diagnosis-map.yaml maps. A Condition that must not be coded for the service (`not_a_diagnosis`:
entered in error, refuted, uncertain, or no longer present on the date of service) is no reason at all.
A line points first at the reasons of its own lesions' Procedures (a Condition whose bodySite is the
lesion's site before the others), in lesion order; diagnoses are numbered in the order the lines first point
at them, so diagnosis 1 is the first line's first reason. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapter.coding.engine import ChargeLine, Session
from adapter.extraction.index import ResourceIndex
from adapter.extraction.procedures import ProcedureFacts
from adapter.tables.billing import ICD10CM, BillingTables

MAX_DIAGNOSES = 12
MAX_POINTERS = 4
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
NEVER = frozenset({"entered-in-error", "refuted"})
"""verificationStatus of a Condition that is not (or never was) the patient's: never a diagnosis."""
UNCERTAIN = frozenset({"unconfirmed", "provisional", "differential"})
"""verificationStatus of a diagnosis not established (probable, suspected, rule-out, working): ICD-10-CM
Official Guidelines for Coding and Reporting, Section IV.H: not coded for an outpatient service; the signs,
symptoms or abnormal findings that led to it are coded instead."""
ABATED = frozenset({"inactive", "remission", "resolved"})
"""clinicalStatus of a Condition that ended: coded only when it was still present on the date of service
(Section IV.J: code conditions that exist at the time of the encounter; history codes are a coder's choice)."""


@dataclass
class DiagnosisPlan:
    codings: list[dict[str, str]] = field(default_factory=list)
    """ICD-10-CM codings in diagnosis-sequence order."""
    pointers: list[list[int]] = field(default_factory=list)
    """Per line (session line order): diagnosis sequences, at most four."""
    problems: list[str] = field(default_factory=list)
    mapped: list[str] = field(default_factory=list)
    """`SNOMED x -> ICD-10-CM y` for each reason converted through the mapping table."""
    excluded: list[str] = field(default_factory=list)
    """`Procedure/x reasonReference[i] Condition/y: why` for each Condition that is not coded."""


def _status(concept: Any, system: str) -> str | None:
    for c in _codings(concept):
        if c.get("system") == system:
            return str(c["code"])
    return None


def _abated_on(condition: dict[str, Any]) -> str | None:
    """The date (to the precision given) by which the Condition was over: abatementDateTime, else the end (or,
    without one, the start) of abatementPeriod; None when it gives no date (abatementAge, Range, String)."""
    when = condition.get("abatementDateTime")
    period = condition.get("abatementPeriod")
    if not isinstance(when, str) and isinstance(period, dict):
        when = period.get("end") if isinstance(period.get("end"), str) else period.get("start")
    return when[:10] if isinstance(when, str) and when else None


def not_a_diagnosis(condition: dict[str, Any] | None, day: str) -> str | None:
    """Why a Condition named in reasonReference must not be coded for a service on `day` (ISO date), or None.

    - verificationStatus entered-in-error or refuted: never;
    - unconfirmed, provisional, differential: not in the outpatient setting (ICD-10-CM guidelines IV.H):
      the sign or symptom is coded instead (a reasonCode, or another Condition), else a coder decides;
    - clinicalStatus inactive, remission or resolved: only when it abated on or after `day` (the procedure
      was done while it was present); abated before, or with no abatement date: a coder decides.
    A Condition without a verificationStatus is taken as stated (it is the reason the Procedure records), one
    without a clinicalStatus as present."""
    if not isinstance(condition, dict) or condition.get("resourceType", "Condition") != "Condition":
        return None
    verification = _status(condition.get("verificationStatus"), VERIFICATION)
    if verification in NEVER:
        return f"verificationStatus {verification}: never a diagnosis"
    if verification in UNCERTAIN:
        return (f"verificationStatus {verification}: an uncertain diagnosis is not coded for an outpatient service "
                "(ICD-10-CM guidelines IV.H; code the sign or symptom)")
    clinical = _status(condition.get("clinicalStatus"), CLINICAL)
    if clinical in ABATED:
        abated = _abated_on(condition)
        if abated is None:
            return f"clinicalStatus {clinical} with no abatement date: whether it was present on {day} is unknown"
        if day[:len(abated)] > abated:
            return f"clinicalStatus {clinical}, abated {abated}: no longer present on {day}"
    return None


@dataclass(frozen=True)
class _Reason:
    element: str
    concept: dict[str, Any]
    sites: frozenset[tuple[str, str]]
    """Codings of the Condition's bodySite (empty for a reasonCode)."""
    excluded: str | None = None
    """Why this Condition must not be coded (`not_a_diagnosis`), or None."""


def _codings(concept: Any) -> list[dict[str, Any]]:
    if not isinstance(concept, dict):
        return []
    return [c for c in concept.get("coding") or [] if isinstance(c, dict) and c.get("code")]


def _reasons(facts: ProcedureFacts, day: str) -> list[_Reason]:
    """reasonCode, then the Conditions of reasonReference (resolved by extraction, in any reference form)."""
    proc = facts.resource
    out = [_Reason(f"reasonCode[{i}]", c, frozenset()) for i, c in enumerate(proc.get("reasonCode") or [])
           if isinstance(c, dict)]
    for i, (target, condition) in enumerate(facts.reasons):
        if condition is None:
            out.append(_Reason(f"reasonReference[{i}] {target}", {}, frozenset()))
            continue
        sites = frozenset((str(c.get("system", "")), str(c["code"]))
                          for s in condition.get("bodySite") or [] for c in _codings(s))
        out.append(_Reason(f"reasonReference[{i}] {target}", condition.get("code") or {}, sites,
                           not_a_diagnosis(condition, day)))
    return out


def _icd10cm(reason: _Reason, tables: BillingTables) -> tuple[dict[str, str] | None, str | None]:
    """(ICD-10-CM coding, mapping note) of one reason; (None, None) when it has none and none is mapped."""
    codings = _codings(reason.concept)
    for c in codings:
        if c.get("system") == ICD10CM:
            coding = {"system": ICD10CM, "code": str(c["code"])}
            if c.get("display"):
                coding["display"] = str(c["display"])
            return coding, None
    for c in codings:
        hit = tables.diagnosis_map.get((str(c.get("system", "")), str(c["code"])))
        if hit:
            return ({"system": ICD10CM, "code": hit[0], "display": hit[1]},
                    f"{c.get('system')}|{c['code']} -> ICD-10-CM {hit[0]} (config/diagnosis-map.yaml)")
    return None, None


def _describe(reason: _Reason) -> str:
    codes = ", ".join(f"{c.get('system')}|{c['code']}" for c in _codings(reason.concept))
    text = reason.concept.get("text") if isinstance(reason.concept, dict) else None
    what = codes or (f"text only: {text!r}" if text else "no code")
    return f"{reason.element} ({what})"


def plan_diagnoses(session: Session, index: ResourceIndex, tables: BillingTables) -> DiagnosisPlan:
    plan = DiagnosisPlan()
    procedure_of = {lesion.key: ref for lesion, _, ref in session.lesions}
    by_proc: dict[str, list[tuple[_Reason, dict[str, str]]]] = {}
    excluded: dict[str, list[str]] = {}
    for proc in session.procedures:
        converted = []
        for reason in _reasons(proc, session.key.date):
            if reason.excluded:
                note = f"{reason.element}: {reason.excluded}"
                excluded.setdefault(proc.ref, []).append(note)
                plan.excluded.append(f"{proc.ref} {note}")
                continue
            coding, note = _icd10cm(reason, tables)
            if coding is None:
                plan.problems.append(f"{proc.ref} {_describe(reason)} has no ICD-10-CM code and none in "
                                     "config/diagnosis-map.yaml")
                continue
            if note:
                plan.mapped.append(note)
            converted.append((reason, coding))
        by_proc[proc.ref] = converted
    sequence: dict[str, int] = {}
    for line in session.lines:
        pointers: list[int] = []
        for code in _line_codes(line, procedure_of, by_proc):
            if code["code"] not in sequence:
                sequence[code["code"]] = len(sequence) + 1
                plan.codings.append(code)
            seq = sequence[code["code"]]
            if seq not in pointers and len(pointers) < MAX_POINTERS:
                pointers.append(seq)
        if not pointers:
            skipped = [note for ref in line.procedures for note in excluded.get(ref, [])]
            if skipped:
                plan.problems.append(f"line {line.label} has no ICD-10-CM diagnosis: the reasons of "
                                     f"{', '.join(line.procedures)} may not be coded ({'; '.join(skipped)}); a "
                                     "coder decides (the sign or symptom, or a history code)")
            else:
                plan.problems.append(f"line {line.label} has no ICD-10-CM diagnosis: "
                                     f"{', '.join(line.procedures)} state{'s' if len(line.procedures) == 1 else ''} "
                                     "no reason that is or maps to ICD-10-CM")
        plan.pointers.append(pointers)
    if len(plan.codings) > MAX_DIAGNOSES:
        plan.problems.append(f"{len(plan.codings)} distinct ICD-10-CM diagnoses, more than the {MAX_DIAGNOSES} "
                             "a professional claim carries: a coder decides which to bill")
    return plan


def _line_codes(line: ChargeLine, procedure_of: dict[str, str],
                by_proc: dict[str, list[tuple[_Reason, dict[str, str]]]]) -> list[dict[str, str]]:
    """The line's reasons: per lesion (in order), its Procedure's reasons, site-matching Conditions first."""
    out: list[dict[str, str]] = []
    for lesion in line.lesions:
        reasons = by_proc.get(procedure_of.get(lesion.key, ""), [])
        site = {(str(c.get("system", "")), str(c["code"])) for c in _codings(lesion.site)}
        ordered = sorted(reasons, key=lambda rc: not (site and rc[0].sites & site))
        out += [coding for _, coding in ordered]
    return out
