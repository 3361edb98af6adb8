"""Build the R4 ChargeItems and Claims of coded sessions, and the transaction Bundle that carries them.

Output is a function of the input and the tables only (no clock, no random ids), so the same input always
gives byte-identical JSON and the online writer can write with conditional updates on the identifiers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from adapter.building.identifiers import claim_identifier, full_url, line_identifier
from adapter.building.validate import InvalidOutputError, validate_resource
from adapter.coding.engine import ChargeLine, CodingResult, Review, Session
from adapter.config import CodeTables
from adapter.extraction.index import ResourceIndex
from adapter.extraction.procedures import ProcedureFacts

CLAIM_TYPE = "http://terminology.hl7.org/CodeSystem/claim-type"
PRIORITY = "http://terminology.hl7.org/CodeSystem/processpriority"


@dataclass(frozen=True)
class OutputWarning:
    code: str
    subject: str
    detail: str


@dataclass
class SessionOutput:
    """What one coded session turns into: its ChargeItems (line order) and its Claim, if any."""

    session: Session
    charge_items: list[dict[str, Any]] = field(default_factory=list)
    claim: dict[str, Any] | None = None

    def resources(self) -> list[dict[str, Any]]:
        return [*self.charge_items, *([self.claim] if self.claim else [])]


@dataclass
class BuildResult:
    sessions: list[SessionOutput] = field(default_factory=list)
    warnings: list[OutputWarning] = field(default_factory=list)
    reviews: list[Review] = field(default_factory=list)
    """Sessions whose output failed validation: a bug or a bad table, reported and never emitted."""


def _dedupe(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for item in items:
        key = json.dumps(item, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _reasons(procs: list[ProcedureFacts], index: ResourceIndex) -> list[dict[str, Any]]:
    """CodeableConcepts of the Procedures' reasonCode, and of the Conditions in reasonReference."""
    concepts: list[dict[str, Any]] = []
    for proc in procs:
        for concept in proc.resource.get("reasonCode") or []:
            if isinstance(concept, dict) and (concept.get("coding") or concept.get("text")):
                concepts.append({k: v for k, v in concept.items() if k in ("coding", "text")})
        for _, target in proc.reasons:  # reasonReference, resolved in any reference form
            code = target.get("code") if target else None
            if isinstance(code, dict) and (code.get("coding") or code.get("text")):
                concepts.append({k: v for k, v in code.items() if k in ("coding", "text")})
    return _dedupe(concepts)


def _modifier_concept(code: str, tables: CodeTables) -> dict[str, Any]:
    mod = tables.modifiers[code]
    return {"coding": [{"system": mod.system, "code": mod.code, "display": mod.display}]}


def build_charge_item(line: ChargeLine, session: Session, index: ResourceIndex, tables: CodeTables) -> dict[str, Any]:
    settings = tables.settings
    procs = [p for p in session.procedures if p.ref in line.procedures]
    key = line.session
    item: dict[str, Any] = {"resourceType": "ChargeItem"}
    if line.modifiers:
        item["extension"] = [{"url": settings.modifier_extension, "valueCodeableConcept": _modifier_concept(m, tables)}
                             for m in line.modifiers]
    item["identifier"] = [{"system": settings.charge_identifier_system,
                           "value": line_identifier(key, line.code, line.modifiers)}]
    item["status"] = "billable"
    item["code"] = {"coding": [{"system": tables.cpt_system, "code": line.code, "display": line.display}],
                    "text": line.label}
    item["subject"] = {"reference": key.patient}
    if key.encounter:
        item["context"] = {"reference": key.encounter}
    item["occurrenceDateTime"] = min(procs, key=ProcedureFacts.sort_key).performed_text
    item["performer"] = [{"actor": {"reference": key.performer}}]
    item["quantity"] = {"value": line.units}
    sites = _dedupe([lesion.site for lesion in line.lesions if lesion.site])
    if sites:
        item["bodysite"] = sites
    reasons = _reasons(procs, index)
    if reasons:
        item["reason"] = reasons
    item["service"] = [{"reference": ref} for ref in line.procedures]
    item["note"] = [{"text": line.explanation}]
    return item


def build_claim(session: Session, index: ResourceIndex, tables: CodeTables,
                coverages: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    key = session.key
    procs = session.procedures
    proc_seq = {p.ref: i for i, p in enumerate(procs, start=1)}
    diagnoses: list[dict[str, Any]] = []
    diag_of: dict[str, list[int]] = {}
    for proc in procs:
        seqs: list[int] = []
        entries = [{"diagnosisCodeableConcept": c} for c in _reasons([proc], index) if c.get("coding")]
        entries += [{"diagnosisReference": {"reference": r}} for r, _ in proc.reasons]
        for entry in entries:
            if entry not in diagnoses:
                diagnoses.append(entry)
            seq = diagnoses.index(entry) + 1
            if seq not in seqs:
                seqs.append(seq)
        diag_of[proc.ref] = seqs
    items = []
    for n, line in enumerate(session.lines, start=1):
        item: dict[str, Any] = {
            "sequence": n,
            "productOrService": {"coding": [{"system": tables.cpt_system, "code": line.code, "display": line.display}]},
        }
        diag = sorted({s for ref in line.procedures for s in diag_of.get(ref, [])})
        if diag:
            item["diagnosisSequence"] = diag
        item["procedureSequence"] = [proc_seq[ref] for ref in line.procedures]
        if line.modifiers:
            item["modifier"] = [_modifier_concept(m, tables) for m in line.modifiers]
        item["servicedDate"] = key.date
        item["quantity"] = {"value": line.units}
        if key.encounter:
            item["encounter"] = [{"reference": key.encounter}]
        items.append(item)
    claim: dict[str, Any] = {
        "resourceType": "Claim",
        "identifier": [{"system": tables.settings.claim_identifier_system, "value": claim_identifier(key)}],
        "status": "active",
        "type": {"coding": [{"system": CLAIM_TYPE, "code": "professional"}]},
        "use": "claim",
        "patient": {"reference": key.patient},
        "created": key.date,
        "provider": {"reference": key.performer},
        "priority": {"coding": [{"system": PRIORITY, "code": "normal"}]},
    }
    if diagnoses:
        claim["diagnosis"] = [{"sequence": i, **d} for i, d in enumerate(diagnoses, start=1)]
    claim["procedure"] = [{"sequence": proc_seq[p.ref], "date": p.performed_text,
                           "procedureReference": {"reference": p.ref}} for p in procs]
    claim["insurance"] = [{"sequence": i, "focal": i == 1, "coverage": {"reference": ref}}
                          for i, (ref, _) in enumerate(coverages, start=1)]
    claim["item"] = items
    return claim


def build_outputs(result: CodingResult, index: ResourceIndex, tables: CodeTables) -> BuildResult:
    """ChargeItems and Claims for every coded session, each validated with fhir.resources (R4)."""
    out = BuildResult()
    for session in result.coded_sessions:
        try:
            built, warning = _build_session(session, index, tables)
        except InvalidOutputError as exc:
            out.reviews.extend(Review(p.ref, p.origin, "invalid-output", str(exc)) for p in session.procedures)
            continue
        out.sessions.append(built)
        if warning:
            out.warnings.append(warning)
    return out


def _build_session(session: Session, index: ResourceIndex,
                   tables: CodeTables) -> tuple[SessionOutput, OutputWarning | None]:
    built = SessionOutput(session)
    for line in session.lines:
        charge = build_charge_item(line, session, index, tables)
        validate_resource(charge, f"ChargeItem {line.label} for {', '.join(line.procedures)}")
        built.charge_items.append(charge)
    if not tables.settings.claims:
        return built, None
    coverages = index.active_coverages(session.key.patient)
    if not coverages:
        return built, OutputWarning("no-coverage", session.key.patient,
                                    f"no active Coverage for {session.key.patient} in the input: ChargeItems "
                                    f"only, no Claim for session {session.key.text()}")
    claim = build_claim(session, index, tables, coverages)
    validate_resource(claim, f"Claim for session {session.key.text()}")
    built.claim = claim
    return built, None


def conditional_url(resource: dict[str, Any]) -> str:
    ident = resource["identifier"][0]
    return f"{resource['resourceType']}?identifier={ident['system']}|{ident['value']}"


def transaction_entry(resource: dict[str, Any]) -> dict[str, Any]:
    ident = resource["identifier"][0]
    return {"fullUrl": full_url(ident["system"], ident["value"]), "resource": resource,
            "request": {"method": "PUT", "url": conditional_url(resource)}}


def transaction_bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A transaction of conditional updates on each resource's deterministic identifier."""
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "transaction"}
    if resources:  # FHIR JSON has no empty arrays
        bundle["entry"] = [transaction_entry(r) for r in resources]
    return bundle
