"""Build the R4 ChargeItems and Claims of coded sessions, and the transaction Bundle that carries them.

Output is a function of the input, the tables and the given time of writing only (no random ids), so the
same input and clock always give byte-identical JSON and the online writer can write with conditional
updates on the identifiers. The time of writing (`Claim.created`, `ChargeItem.enteredDate`) is the only
part that changes between runs, and reconciliation does not count it as a change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from adapter.billing.diagnoses import not_a_diagnosis, plan_diagnoses
from adapter.billing.parties import (
    Accounts,
    BillingProvider,
    Gap,
    PlaceOfService,
    billing_provider,
    coverages_on,
    insurer,
    place_of_service,
    referral,
)
from adapter.billing.pricing import NoPrice, Price, PriceBook
from adapter.building.identifiers import claim_identifier, full_url, line_identifier
from adapter.building.narrative import charge_item_text, claim_text
from adapter.coding.engine import ChargeLine, CodingResult, Review, Session
from adapter.config import CodeTables
from adapter.extraction.index import ResourceIndex
from adapter.extraction.procedures import ProcedureFacts, SessionKey
from adapter.validation import InvalidOutputError, validate_resource

CLAIM_TYPE = "http://terminology.hl7.org/CodeSystem/claim-type"
PRIORITY = "http://terminology.hl7.org/CodeSystem/processpriority"
CARE_TEAM_ROLE = "http://terminology.hl7.org/CodeSystem/claimcareteamrole"
WRITE_TIME_FIELDS = {"ChargeItem": "enteredDate", "Claim": "created"}
"""Set to the time of writing: never a change in reconciliation."""


def instant(moment: datetime) -> str:
    """A FHIR dateTime to the second, in UTC."""
    if moment.tzinfo is None:
        raise ValueError("the clock must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class OutputWarning:
    code: str
    subject: str
    detail: str
    session: SessionKey | None = field(default=None, compare=False)
    """The session it was met in (the streaming path orders warnings of many batches by it)."""


@dataclass
class SessionOutput:
    """What one coded session turns into: its ChargeItems (line order) and its Claim, if any."""

    session: Session
    charge_items: list[dict[str, Any]] = field(default_factory=list)
    claim: dict[str, Any] | None = None
    prices: list[Price | None] = field(default_factory=list)
    """Per line (line order): its price, or None when unpriced (the HL7 v2 sink sends its amounts and charge code)."""
    notes: list[str] = field(default_factory=list)
    """Where each billing decision came from (payer, billing provider, place of service, diagnoses, prices),
    for `explain`."""

    def resources(self) -> list[dict[str, Any]]:
        return [*self.charge_items, *([self.claim] if self.claim else [])]


@dataclass
class BuildResult:
    sessions: list[SessionOutput] = field(default_factory=list)
    warnings: list[OutputWarning] = field(default_factory=list)
    reviews: list[Review] = field(default_factory=list)
    """Claims held for review (missing diagnosis, payer, billing provider, place of service or price: their
    ChargeItems are emitted), and sessions whose output failed validation (a bug or a bad table: nothing
    of them is emitted)."""


@dataclass
class _Context:
    """What every session of one run shares: the input, the tables, the price book, the time of writing."""

    index: ResourceIndex
    tables: CodeTables
    written_at: str
    prices: PriceBook
    accounts: Accounts


_CANONICAL = json.JSONEncoder(sort_keys=True)
"""What `json.dumps(item, sort_keys=True)` builds for every call, built once."""


def _dedupe(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The items without repeats (equal JSON with keys sorted), first occurrence kept."""
    if len(items) < 2:  # the common case: nothing to compare
        return list(items)
    seen: set[str] = set()
    out = []
    for item in items:
        key = _CANONICAL.encode(item)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _reasons(procs: list[ProcedureFacts], day: str) -> list[dict[str, Any]]:
    """CodeableConcepts of the Procedures' reasonCode, and of the Conditions in reasonReference that may be coded
    for a service on `day` (not entered in error, refuted, uncertain or over: `diagnoses.not_a_diagnosis`)."""
    concepts: list[dict[str, Any]] = []
    for proc in procs:
        for concept in proc.resource.get("reasonCode") or []:
            if isinstance(concept, dict) and (concept.get("coding") or concept.get("text")):
                concepts.append({k: v for k, v in concept.items() if k in ("coding", "text")})
        for _, target in proc.reasons:  # reasonReference, resolved in any reference form
            if not_a_diagnosis(target, day):
                continue
            code = target.get("code") if target else None
            if isinstance(code, dict) and (code.get("coding") or code.get("text")):
                concepts.append({k: v for k, v in code.items() if k in ("coding", "text")})
    return _dedupe(concepts)


def _modifier_concept(code: str, tables: CodeTables) -> dict[str, Any]:
    mod = tables.modifiers[code]
    return {"coding": [{"system": mod.system, "code": mod.code, "display": mod.display}]}


def _amount(value: Decimal) -> float | int:
    """JSON number for a money value (Decimal is not JSON); whole amounts stay integers."""
    return int(value) if value == value.to_integral_value() else float(value)


_shared: dict[tuple[Any, ...], Any] = {}


def _shared_part(key: tuple[Any, ...], make: Any) -> Any:
    """One object for an element that repeats across thousands of resources (a price, a place of service):
    output is only read after it is built, and sharing keeps a large run's memory down."""
    found = _shared.get(key)
    if found is None:
        if len(_shared) > 10_000:
            _shared.clear()
        found = _shared[key] = make()
    return found


def _money(value: Decimal, currency: str) -> dict[str, Any]:
    return _shared_part(("money", value, currency), lambda: {"value": _amount(value), "currency": currency})


_CARE_TEAM_SEQUENCE = [1]
_CLAIM_TYPE = {"coding": [{"system": CLAIM_TYPE, "code": "professional"}]}
_PRIORITY = {"coding": [{"system": PRIORITY, "code": "normal"}]}
_PRIMARY_ROLE = {"coding": [{"system": CARE_TEAM_ROLE, "code": "primary"}]}


def build_charge_item(line: ChargeLine, session: Session, index: ResourceIndex, tables: CodeTables,
                      accounts: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """The ChargeItem of one line, before its price and time of writing (pricing rules may look at it)."""
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
    reasons = _reasons(procs, key.date)
    if reasons:
        item["reason"] = reasons
    item["service"] = [{"reference": ref} for ref in line.procedures]
    if accounts:
        item["account"] = [{"reference": ref} for ref in accounts]
    item["note"] = [{"text": line.explanation}]
    return item


_BEFORE_DEFINITION = ("extension", "identifier")
_BEFORE_PRICE = ("status", "code", "subject", "context", "occurrenceDateTime", "performer", "quantity", "bodysite")
_AFTER_DATE = ("reason", "service", "account", "note")


def finish_charge_item(item: dict[str, Any], price: Price | None, units: int, written_at: str) -> dict[str, Any]:
    """The ChargeItem with its narrative, definition, price and time of writing, elements in R4 order."""
    out: dict[str, Any] = {"resourceType": "ChargeItem", "text": None}
    for name in _BEFORE_DEFINITION:
        if name in item:
            out[name] = item[name]
    if price and price.definition:
        out["definitionCanonical"] = [price.definition]
    for name in _BEFORE_PRICE:
        if name in item:
            out[name] = item[name]
    if price:
        out["priceOverride"] = _money(price.unit * units, price.currency)
        out["overrideReason"] = f"{price.source}; x{units}"
    out["enteredDate"] = written_at
    for name in _AFTER_DATE:
        if name in item:
            out[name] = item[name]
    out["text"] = charge_item_text(out)
    return out


@dataclass
class _Line:
    line: ChargeLine
    item: dict[str, Any]
    price: Price | None


def _claim_item(n: int, entry: _Line, pointers: list[int], proc_seq: dict[str, int], pos: PlaceOfService,
                tables: CodeTables) -> dict[str, Any]:
    line, key = entry.line, entry.line.session
    item: dict[str, Any] = {"sequence": n, "careTeamSequence": _CARE_TEAM_SEQUENCE, "diagnosisSequence": pointers,
                            "procedureSequence": [proc_seq[ref] for ref in line.procedures]}
    item["productOrService"] = {"coding": [{"system": tables.cpt_system, "code": line.code,
                                            "display": line.display}]}
    if line.modifiers:
        item["modifier"] = [_modifier_concept(m, tables) for m in line.modifiers]
    item["servicedDate"] = key.date
    system = tables.billing.place_of_service.system
    item["locationCodeableConcept"] = _shared_part(("pos", system, pos.code, pos.display), lambda: {
        "coding": [{"system": system, "code": pos.code, "display": pos.display}]})
    item["quantity"] = {"value": line.units}
    if entry.price:
        item["unitPrice"] = _money(entry.price.unit, entry.price.currency)
        item["net"] = _money(entry.price.unit * line.units, entry.price.currency)
    if key.encounter:
        item["encounter"] = [{"reference": key.encounter}]
    return item


def original_frequency(settings: Any) -> dict[str, Any]:
    """The claim-frequency extension of a Claim first in its chain: 1, an original claim (the X12 837P CLM05-3;
    replacements carry 7 and voids 8, adapter.sinks.reconcile)."""
    return {"url": settings.claim_frequency_extension,
            "valueCoding": {"system": settings.claim_frequency_system, "code": "1", "display": "Original claim"}}


def build_claim(session: Session, lines: list[_Line], ctx: _Context, provider: BillingProvider,
                payer: dict[str, Any], pos: PlaceOfService, diagnoses: list[dict[str, str]],
                pointers: list[list[int]], coverages: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    key, tables = session.key, ctx.tables
    procs = session.procedures
    proc_seq = {p.ref: i for i, p in enumerate(procs, start=1)}
    claim: dict[str, Any] = {"resourceType": "Claim"}
    if provider.contained is not None:  # the billing provider's NPI, TIN, taxonomy and address travel in the Claim
        claim["contained"] = [provider.contained]
    claim.update({
        "extension": [original_frequency(tables.settings)],
        "identifier": [{"system": tables.settings.claim_identifier_system, "value": claim_identifier(key)}],
        "status": "active",
        "type": _CLAIM_TYPE,
        "use": "claim",
        "patient": {"reference": key.patient},
        "created": ctx.written_at,
        "insurer": payer,
        "provider": provider.reference,
        "priority": _PRIORITY,
    })
    service_request = referral(procs, ctx.index)
    if service_request:
        claim["referral"] = {"reference": service_request}
    claim["careTeam"] = [{"sequence": 1, "provider": {"reference": key.performer}, "responsible": True,
                          "role": _PRIMARY_ROLE}]
    claim["diagnosis"] = [{"sequence": i, "diagnosisCodeableConcept": {"coding": [coding]}}
                          for i, coding in enumerate(diagnoses, start=1)]
    claim["procedure"] = [{"sequence": proc_seq[p.ref], "date": p.performed_text,
                           "procedureReference": {"reference": p.ref}} for p in procs]
    claim["insurance"] = [{"sequence": i, "focal": i == 1, "coverage": {"reference": ref}}
                          for i, (ref, _) in enumerate(coverages, start=1)]
    claim["item"] = [_claim_item(n, entry, pointers[n - 1], proc_seq, pos, tables)
                     for n, entry in enumerate(lines, start=1)]
    if lines and all(entry.price for entry in lines):
        currencies = {entry.price.currency for entry in lines if entry.price}
        if len(currencies) == 1:
            total = sum((entry.price.unit * entry.line.units for entry in lines if entry.price), Decimal(0))
            claim["total"] = _money(total, currencies.pop())
    claim = {"resourceType": "Claim", "text": claim_text(claim),
             **{k: v for k, v in claim.items() if k != "resourceType"}}
    return claim


class HeldSession(Exception):
    """A session whose output cannot be built as the input stands (a review reason and a sentence)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def build_outputs(result: CodingResult, index: ResourceIndex, tables: CodeTables,
                  now: datetime | None = None) -> BuildResult:
    """ChargeItems and Claims for every coded session, each validated with fhir.resources (R4).

    `now` is the time of writing (default: the clock); give it to reproduce a run byte for byte."""
    found = index.of_type("ChargeItemDefinition")
    key_of_definition = {id(res): ref for ref, res in found}
    definitions = [(index.origins.get(ref, ref), res) for ref, res in found]
    definitions += list(tables.billing.pricing.definitions)
    prices = PriceBook(definitions, tables.billing.pricing, tables.cpt_system,
                       lambda value, definition: index.key_of(value, key_of_definition.get(id(definition))),
                       tables.known_modifier_extensions)
    ctx = _Context(index, tables, instant(now or datetime.now(UTC)), prices, Accounts(index))
    out = BuildResult()
    for session in result.coded_sessions:
        try:
            built, warnings, reviews = _build_session(session, ctx)
        except InvalidOutputError as exc:
            out.reviews.extend(Review(p.ref, p.origin, "invalid-output", str(exc)) for p in session.procedures)
            continue
        except HeldSession as held:  # like a session that needs review: nothing of it is written
            out.reviews.extend(Review(p.ref, p.origin, held.reason, f"session {session.key.text()}: {held.detail}")
                               for p in session.procedures)
            continue
        out.sessions.append(built)
        out.warnings += [replace(w, session=session.key) for w in warnings]
        out.reviews += reviews
    return out


def _build_session(session: Session, ctx: _Context) -> tuple[SessionOutput, list[OutputWarning], list[Review]]:
    key, tables, index = session.key, ctx.tables, ctx.index
    built = SessionOutput(session)
    warnings: list[OutputWarning] = []
    gaps: list[Gap] = []
    day = date.fromisoformat(key.date)
    provider = billing_provider(session.procedures, key.performer, key.encounter, index, tables.billing)
    if isinstance(provider, Gap):
        gaps.append(provider)
    else:
        built.notes.append(f"billing provider: {provider.display} (from {provider.source})")
    accounts, account_note = ctx.accounts.of_session(key.patient, key.encounter, day)
    if accounts:
        built.notes.append(f"account: {', '.join(accounts)}")
    if account_note:
        warnings.append(OutputWarning("ambiguous-account", key.patient, account_note))
    lines: list[_Line] = []
    unpriced: list[str] = []
    for line in session.lines:
        item = build_charge_item(line, session, index, tables, accounts)
        venue = provider.venue if isinstance(provider, BillingProvider) else None
        price = ctx.prices.price(line.code, line.modifiers, day, item, venue)
        if isinstance(price, NoPrice) and price.reason != "missing-price":
            raise HeldSession(price.reason, f"{line.label}: {price.detail}")
        if isinstance(price, NoPrice):
            unpriced.append(f"{line.label}: {price.detail}")
            price = None
        else:
            built.notes.append(f"price {line.label}: {price.source}")
        item = finish_charge_item(item, price, line.units, ctx.written_at)
        validate_resource(item, f"ChargeItem {line.label} for {', '.join(line.procedures)}")
        built.charge_items.append(item)
        built.prices.append(price)
        lines.append(_Line(line, item, price))
    claims_on = tables.settings.claims
    coverages, out_of_period = coverages_on(index, key.patient, day) if claims_on else ([], [])
    if unpriced and (tables.settings.when_price_missing == "warn" or not coverages):
        warnings += [OutputWarning("missing-price", key.patient, f"session {key.text()}: {u}; written without "
                                                                 "a price") for u in unpriced]
    elif unpriced:
        gaps.append(Gap("missing-price", "; ".join(unpriced)))
    if not claims_on:
        return built, warnings, []
    if not coverages:
        why = (f"no active Coverage for {key.patient} in force on {key.date} (not in their period: "
               f"{', '.join(out_of_period)})" if out_of_period else f"no active Coverage for {key.patient}")
        warnings.append(OutputWarning("no-coverage", key.patient,
                                      f"{why} in the input: ChargeItems only, no Claim for session {key.text()}"))
        return built, warnings, []
    payer = insurer(coverages[0][1], coverages[0][0], index)
    pos = place_of_service(key.encounter, index, tables.billing)
    plan = plan_diagnoses(session, index, tables.billing)
    if isinstance(payer, dict):
        built.notes.append(f"payer: {payer.get('display') or payer.get('reference')} (focal {coverages[0][0]})")
    if isinstance(pos, PlaceOfService):
        built.notes.append(f"place of service: {pos.code} {pos.display} (from {pos.source})")
    if plan.codings:
        built.notes.append("diagnoses: " + ", ".join(c["code"] for c in plan.codings)
                           + "".join(f"; {note}" for note in plan.mapped))
    built.notes += [f"not a diagnosis: {note}" for note in plan.excluded]
    gaps += [g for g in (payer, pos) if isinstance(g, Gap)]
    if plan.problems:
        gaps.append(Gap("missing-diagnosis", "; ".join(plan.problems)))
    if gaps:
        reviews = [Review(p.ref, p.origin, gap.reason, f"Claim for session {key.text()} waits (ChargeItems "
                                                         f"written): {gap.detail}")
                   for gap in gaps for p in session.procedures]
        return built, warnings, reviews
    assert isinstance(provider, BillingProvider) and isinstance(pos, PlaceOfService) and isinstance(payer, dict)
    claim = build_claim(session, lines, ctx, provider, payer, pos, plan.codings, plan.pointers, coverages)
    validate_resource(claim, f"Claim for session {key.text()}")
    if tables.settings.require_837p:
        from adapter.building.claim837 import REASON, first_missing

        missing = first_missing(claim, index.get, tables.x12)
        if missing is not None:
            why = f"Claim for session {key.text()} waits (ChargeItems written): the X12 837P {missing}"
            return built, warnings, [Review(p.ref, p.origin, REASON, why) for p in session.procedures]
    built.claim = claim
    return built, warnings, []


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
