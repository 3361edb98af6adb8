"""X12 837P (005010X222A1) professional claims, built from the Claims the adapter writes.

Nothing here codes: every CPT, modifier, unit, price, diagnosis and place of service is read from a Claim
(built by adapter.building, corrected by adapter.sinks.reconcile), and the parties from the resources the
Claim contains (its billing provider's Organization) or references (Patient, Coverage and its payor,
Practitioner, ServiceRequest, Encounter and Location), with config/x12.yaml for the envelope and value maps
only. A Claim that lacks an element the 837P requires is left out of the interchange and reported (`Missing`)
naming the loop, segment and element. Pure: no I/O.
docs/output.md "X12 837P" maps each element to its source.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from adapter.billing.parties import TAXONOMY_SYSTEM
from adapter.extraction.index import reference_of
from adapter.tables.billing import NPI_SYSTEM, TIN_SYSTEM
from adapter.tables.x12 import X12Tables

IMPLEMENTATION = "005010X222A1"
REASON = "x12-missing-element"
FREQUENCY_URL_SUFFIX = "/StructureDefinition/claim-frequency"
CLAIM_PREFIX = "fna-claim-"
GENDER = {"female": "F", "male": "M"}
_BAD = re.compile(r"[*~:^\r\n]+")

Resolve = Callable[[str | None], dict[str, Any] | None]


class Missing(Exception):
    """A required 837P element the Claim and its resources cannot give: `element` names loop, segment, element."""

    def __init__(self, element: str, detail: str) -> None:
        super().__init__(f"{element}: {detail}")
        self.element = element
        self.detail = detail


@dataclass(frozen=True)
class ClaimProblem:
    claim: str
    """The Claim's identifier value."""
    procedures: tuple[str, ...]
    element: str
    detail: str

    @property
    def text(self) -> str:
        return f"not in the 837P: {self.element} is required ({self.detail})"


@dataclass(frozen=True)
class Control:
    """The interchange's control number (ISA13, GS06, and BHT03 with it) and its time (ISA09/10, GS04/05,
    BHT04/05): recorded with the batch, so the same batch sent again is the same interchange byte for byte."""

    number: int
    created: datetime


@dataclass
class Interchange:
    text: str | None
    """None when no Claim of the batch could go."""
    claims: list[str] = field(default_factory=list)
    problems: list[ClaimProblem] = field(default_factory=list)


def clean(value: Any, limit: int) -> str:
    """An element value: delimiters and line breaks out, runs of spaces collapsed, cut to the element's length."""
    return re.sub(r"\s+", " ", _BAD.sub(" ", str(value))).strip()[:limit].strip()


def _segment(*elements: Any) -> str:
    values = ["" if e is None else str(e) for e in elements]
    while values and values[-1] == "":
        values.pop()
    return "*".join(values) + "~"


def _amount(value: Any) -> str:
    number = Decimal(str(value)).quantize(Decimal("0.01"))
    text = format(number, "f").rstrip("0").rstrip(".")
    return text or "0"


def _day(value: str | None) -> str:
    return (value or "")[:10].replace("-", "")


def _identifier(resource: dict[str, Any] | None, systems: Sequence[str]) -> str | None:
    for ident in (resource or {}).get("identifier") or []:
        if isinstance(ident, dict) and ident.get("system") in systems and ident.get("value"):
            return str(ident["value"])
    return None


def _coding(concept: Any, system: str | None = None) -> dict[str, Any] | None:
    for coding in (concept or {}).get("coding") or [] if isinstance(concept, dict) else []:
        if isinstance(coding, dict) and coding.get("code") and (system is None or coding.get("system") == system):
            return coding
    return None


def _require(value: Any, element: str, detail: str) -> Any:
    if value in (None, "", [], {}):
        raise Missing(element, detail)
    return value


def person_name(resource: dict[str, Any] | None, element: str, what: str) -> tuple[str, str, str]:
    """(last, first, middle) of the official (else first) HumanName."""
    names = [n for n in (resource or {}).get("name") or [] if isinstance(n, dict)]
    name = next((n for n in names if n.get("use") == "official"), names[0] if names else {})
    family = _require(name.get("family"), element, f"{what} has no family name")
    given = [g for g in name.get("given") or [] if isinstance(g, str)]
    return clean(family, 60), clean(given[0], 35) if given else "", clean(" ".join(given[1:]), 25)


def address_segments(address: dict[str, Any] | None, loop: str, what: str) -> list[str]:
    """N3 and N4 of a FHIR Address; city, state and a 5- or 9-digit ZIP are required for a US address."""
    if not isinstance(address, dict):
        raise Missing(f"{loop} N3", f"{what} has no address")
    lines = [clean(x, 55) for x in address.get("line") or [] if isinstance(x, str) and x.strip()]
    _require(lines, f"{loop} N301", f"{what}'s address has no street line")
    city = _require(address.get("city"), f"{loop} N401", f"{what}'s address has no city")
    state = _require(address.get("state"), f"{loop} N402", f"{what}'s address has no state")
    postal = re.sub(r"\D", "", str(address.get("postalCode") or ""))
    if len(postal) not in (5, 9):
        raise Missing(f"{loop} N403", f"{what}'s address has no 5- or 9-digit ZIP code")
    return [_segment("N3", *lines[:2]), _segment("N4", clean(city, 30), clean(state, 2), postal)]


def _first_address(resource: dict[str, Any] | None) -> dict[str, Any] | None:
    addresses = [a for a in (resource or {}).get("address") or [] if isinstance(a, dict)]
    return next((a for a in addresses if a.get("use") in (None, "home", "work", "billing")), None)


def frequency_of(claim: dict[str, Any]) -> str:
    for extension in claim.get("extension") or []:
        if isinstance(extension, dict) and str(extension.get("url", "")).endswith(FREQUENCY_URL_SUFFIX):
            return str((extension.get("valueCoding") or {}).get("code") or "1")
    return "1"


def patient_control_number(claim: dict[str, Any]) -> str:
    """CLM01: the Claim's identifier value without the adapter's `fna-claim-` prefix (CLM01 holds 38)."""
    value = str(((claim.get("identifier") or [{}])[0]).get("value") or "")
    return value.removeprefix(CLAIM_PREFIX)


@dataclass
class _Ctx:
    claim: dict[str, Any]
    resolve: Resolve
    tables: X12Tables
    payer_claim_numbers: Mapping[str, str] | None
    """None: not known yet (first_missing), REF*F8 is not checked."""
    billing_address: dict[str, Any] | None = None


def _provider_organization(ctx: _Ctx) -> dict[str, Any] | None:
    """The Organization Claim.provider refers to: contained in the Claim (`#id`), else the input's resource."""
    ref = (ctx.claim.get("provider") or {}).get("reference")
    if not isinstance(ref, str):
        return None
    if ref.startswith("#"):
        return next((c for c in ctx.claim.get("contained") or []
                     if isinstance(c, dict) and c.get("id") == ref[1:]), None)
    return ctx.resolve(reference_of(ctx.claim["provider"]))


def _billing_provider(ctx: _Ctx) -> list[str]:
    """Loops 2000A and 2010AA: PRV*BI, NM1*85 (NPI), N3/N4, REF*EI (TIN), all from Claim.provider's Organization
    (contained in the Claim, or the input's); a logical reference gives only its NPI (or TIN) and name."""
    provider = ctx.claim.get("provider") or {}
    org = _provider_organization(ctx)
    where = str(provider.get("reference") or "Claim.provider")
    note = ", contained: written from config/billing-providers.yaml" if where.startswith("#") else ""
    if provider.get("reference") and org is None:
        raise Missing("2010AA NM1", f"the billing provider {where} is neither contained in the Claim nor in the input")
    logical = provider.get("identifier") or {}
    npi = _identifier(org, [NPI_SYSTEM]) or (logical.get("value") if logical.get("system") == NPI_SYSTEM else None)
    tin = _identifier(org, [TIN_SYSTEM]) or (logical.get("value") if logical.get("system") == TIN_SYSTEM else None)
    npi = _require(npi, "2010AA NM109", f"the billing provider ({where}{note}) has no NPI")
    what = f"the billing provider {where} (NPI {npi}{note})"
    tin = _require(tin, "2010AA REF02", f"{what} has no tax id (TIN, identifier system {TIN_SYSTEM})")
    name = _require((org or {}).get("name") or provider.get("display"), "2010AA NM103", f"{what} has no name")
    taxonomy = next((c["code"] for t in (org or {}).get("type") or []
                     for c in [_coding(t, TAXONOMY_SYSTEM)] if c), None)
    address = _first_address(org)
    out = [_segment("PRV", "BI", "PXC", taxonomy)] if taxonomy else []
    out.append(_segment("NM1", "85", "2", clean(name, 60), "", "", "", "", "XX", npi))
    ctx.billing_address = address
    out += address_segments(address, "2010AA", what)
    out.append(_segment("REF", "EI", tin))
    return out


def _coverage(ctx: _Ctx) -> dict[str, Any]:
    insurance = sorted((i for i in ctx.claim.get("insurance") or [] if isinstance(i, dict)),
                       key=lambda i: (not i.get("focal"), i.get("sequence", 0)))
    coverage = ctx.resolve(reference_of(insurance[0].get("coverage"))) if insurance else None
    return _require(coverage, "2000B SBR", "the Claim's Coverage (Claim.insurance.coverage) is not in the input")


def _subscriber(ctx: _Ctx, coverage: dict[str, Any], patient: dict[str, Any], hl: int) -> tuple[list[str], bool]:
    """Loops 2000B, 2010BA, 2010BB and (subscriber not the patient) 2000C/2010CA; True when 2000C is written."""
    relation = _coding(coverage.get("relationship"))
    code = _require((relation or {}).get("code"), "2000B SBR02",
                    "Coverage.relationship is missing: the subscriber's relationship to the patient is unknown")
    x12_relation = _require(ctx.tables.relationship.get(str(code)), "2000B SBR02",
                            f"Coverage.relationship {code!r} has no X12 code in config/x12.yaml relationship")
    filing = next((ctx.tables.claim_filing_indicator[(c.get("system"), c.get("code"))]
                   for c in (coverage.get("type") or {}).get("coding") or []
                   if isinstance(c, dict) and (c.get("system"), c.get("code")) in ctx.tables.claim_filing_indicator),
                  None)
    _require(filing, "2000B SBR09", "Coverage.type has no claim filing indicator in config/x12.yaml "
                                    "claim_filing_indicator")
    member = _require(coverage.get("subscriberId"), "2010BA NM109", "Coverage.subscriberId (member id) is missing")
    group = next((c.get("value") for c in coverage.get("class") or []
                  if isinstance(c, dict) and (_coding(c.get("type")) or {}).get("code") == "group"), None)
    payor = next((p for p in coverage.get("payor") or [] if isinstance(p, dict)), {})
    payer = ctx.resolve(reference_of(payor)) if reference_of(payor) else None
    if payer is None and isinstance(payor.get("identifier"), dict):  # a logical reference: its identifier, name
        payer = {"identifier": [payor["identifier"]], "name": payor.get("display")}
    payer_name = _require((payer or {}).get("name") or (ctx.claim.get("insurer") or {}).get("display"),
                          "2010BB NM103", "the payer (Coverage.payor) has no name")
    payer_id = _require(_identifier(payer, ctx.tables.payer_id_systems), "2010BB NM109",
                        "the payer (Coverage.payor) has no payer id (an identifier with a system in config/x12.yaml "
                        "payer_id_systems)")
    is_self = x12_relation == "18"
    if is_self:
        subscriber = patient
    else:
        subscriber = ctx.resolve(reference_of(coverage.get("subscriber")))
        _require(subscriber, "2010BA NM1", "Coverage.subscriber (someone other than the patient) is not in the input")
    last, first, middle = person_name(subscriber, "2010BA NM103", "the subscriber")
    out = [_segment("HL", hl, hl - 1, "22", "0" if is_self else "1"),
           _segment("SBR", "P", "18" if is_self else "", clean(group, 50) if group else "", "", "", "", "", "",
                    filing),
           _segment("NM1", "IL", "1", last, first, middle, "", "", "MI", clean(member, 80))]
    if is_self:
        out += address_segments(_first_address(patient), "2010BA", "the patient (the subscriber)")
        out.append(_demographics(patient, "2010BA", "the patient (the subscriber)"))
    out.append(_segment("NM1", "PR", "2", clean(payer_name, 60), "", "", "", "", "PI", clean(payer_id, 80)))
    if not is_self:
        p_last, p_first, p_middle = person_name(patient, "2010CA NM103", "the patient")
        out += [_segment("HL", hl + 1, hl, "23", "0"), _segment("PAT", x12_relation),
                _segment("NM1", "QC", "1", p_last, p_first, p_middle)]
        out += address_segments(_first_address(patient), "2010CA", "the patient")
        out.append(_demographics(patient, "2010CA", "the patient"))
    return out, not is_self


def _demographics(person: dict[str, Any] | None, loop: str, what: str) -> str:
    born = _require((person or {}).get("birthDate"), f"{loop} DMG02", f"{what} has no birth date")
    return _segment("DMG", "D8", _day(born), GENDER.get(str((person or {}).get("gender")), "U"))


def _practitioner(ctx: _Ctx, ref: str | None, loop: str, qualifier: str, what: str) -> list[str]:
    resource = ctx.resolve(ref)
    if resource and resource.get("resourceType") == "PractitionerRole":
        resource = ctx.resolve(reference_of(resource.get("practitioner"))) or resource
    _require(resource, f"{loop} NM1", f"{what} ({ref}) is not in the input")
    npi = _require(_identifier(resource, [NPI_SYSTEM]), f"{loop} NM109", f"{what} ({ref}) has no NPI")
    last, first, middle = person_name(resource, f"{loop} NM103", what)
    return [_segment("NM1", qualifier, "1", last, first, middle, "", "", "XX", npi)]


def _claim(ctx: _Ctx) -> list[str]:
    """Loop 2300 (CLM, REF*F8, HI), 2310A-C and the 2400 service lines."""
    claim = ctx.claim
    items = [i for i in claim.get("item") or [] if isinstance(i, dict)]
    _require(items, "2400 SV1", "the Claim has no items")
    place = (_coding(items[0].get("locationCodeableConcept")) or {}).get("code")
    place = _require(place, "2300 CLM05-1", "the Claim has no place of service (item.locationCodeableConcept)")
    frequency = frequency_of(claim)
    total = _require((claim.get("total") or {}).get("value"), "2300 CLM02", "the Claim has no total")
    out = [_segment("CLM", clean(patient_control_number(claim), 38), _amount(total), "", "",
                    f"{place}:B:{frequency}", "Y", "A", "Y", "Y")]
    if frequency in ("7", "8"):
        prior = next((reference_of(r.get("claim")) for r in claim.get("related") or [] if isinstance(r, dict)), None)
        number = ctx.payer_claim_numbers.get(prior or "") if ctx.payer_claim_numbers is not None else "?"
        out.append(_segment("REF", "F8", clean(_require(
            number, "2300 REF02 (F8)", f"the payer's claim control number of the Claim it "
                                       f"{'replaces' if frequency == '7' else 'voids'} ({prior}) is not known: no "
                                       "ClaimResponse identifier"), 50)))
    diagnoses = sorted((d for d in claim.get("diagnosis") or [] if isinstance(d, dict)),
                       key=lambda d: d.get("sequence", 0))
    codes = [(_coding(d.get("diagnosisCodeableConcept")) or {}).get("code") for d in diagnoses]
    _require(codes and all(codes), "2300 HI01", "the Claim has no ICD-10-CM diagnosis")
    pointer = {d.get("sequence"): n for n, d in enumerate(diagnoses[:12], start=1)}
    out.append(_segment("HI", *(f"{'ABK' if n == 0 else 'ABF'}:{str(c).replace('.', '')}"
                                for n, c in enumerate(codes[:12]))))
    if claim.get("referral"):
        request = ctx.resolve(reference_of(claim["referral"]))
        requester = reference_of((request or {}).get("requester"))
        what = f"the referring provider (requester of {reference_of(claim['referral'])})"
        out += _practitioner(ctx, requester, "2310A", "DN", what)
    rendering = next((reference_of(t.get("provider")) for t in claim.get("careTeam") or []
                      if isinstance(t, dict) and (_coding(t.get("role")) or {}).get("code") == "primary"), None)
    out += _practitioner(ctx, _require(rendering, "2310B NM1", "the Claim has no primary careTeam member"),
                         "2310B", "82", "the rendering provider")
    out += _service_facility(ctx, items[0], place)
    for n, item in enumerate(items, start=1):
        out += _line(item, n, pointer)
    return out


def _service_facility(ctx: _Ctx, item: dict[str, Any], place: str) -> list[str]:
    """Loop 2310C for a place of service that is a facility, when the Encounter names a Location with an address
    other than the billing provider's (the same place is not sent again)."""
    if place not in ctx.tables.facility_places_of_service:
        return []
    encounter = ctx.resolve(next((reference_of(e) for e in item.get("encounter") or []), None)) or {}
    for entry in encounter.get("location") or []:
        location = ctx.resolve(reference_of((entry or {}).get("location")))
        if location and isinstance(location.get("address"), dict) and location.get("name"):
            if _same_place(location["address"], ctx.billing_address):
                return []
            npi = _identifier(location, [NPI_SYSTEM])
            return [_segment("NM1", "77", "2", clean(location["name"], 60), "", "", "", "",
                             "XX" if npi else "", npi or ""),
                    *address_segments(location["address"], "2310C", "the service facility")]
    return []


def _same_place(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    def key(address: dict[str, Any]) -> tuple[str, ...]:
        postal = re.sub(r"\D", "", str(address.get("postalCode") or ""))[:5]
        return (*(str(x).strip().lower() for x in address.get("line") or []), postal)
    return b is not None and key(a) == key(b)


def _line(item: dict[str, Any], n: int, pointer: Mapping[Any, int]) -> list[str]:
    coding = _require(_coding(item.get("productOrService")), "2400 SV101-2", f"item {n} has no procedure code")
    modifiers = [c["code"] for m in item.get("modifier") or [] for c in [_coding(m)] if c][:4]
    units = (item.get("quantity") or {}).get("value")
    net = _require((item.get("net") or {}).get("value"), "2400 SV102", f"item {n} has no charge (item.net)")
    pointers = [str(pointer[s]) for s in item.get("diagnosisSequence") or [] if s in pointer][:4]
    _require(pointers, "2400 SV107", f"item {n} points at no diagnosis")
    served = _require(item.get("servicedDate") or (item.get("servicedPeriod") or {}).get("start"),
                      "2400 DTP03", f"item {n} has no date of service")
    return [_segment("LX", n),
            _segment("SV1", ":".join(["HC", coding["code"], *modifiers]), _amount(net), "UN",
                     _amount(_require(units, "2400 SV104", f"item {n} has no quantity")), "", "", ":".join(pointers)),
            _segment("DTP", "472", "D8", _day(served))]


def claim_segments(claim: dict[str, Any], resolve: Resolve, tables: X12Tables, hl: int,
                   payer_claim_numbers: Mapping[str, str] | None = None) -> tuple[list[str], int]:
    """The 2000A-2400 segments of one Claim, starting at HL number `hl`; returns them and the next HL number.
    Raises Missing naming the first required element it lacks."""
    ctx = _Ctx(claim, resolve, tables, payer_claim_numbers)
    patient = _require(resolve(reference_of(claim.get("patient"))), "2010BA NM1",
                       "the patient (Claim.patient) is not in the input")
    billing = [_segment("HL", hl, "", "20", "1"), *_billing_provider(ctx)]
    subscriber, with_patient = _subscriber(ctx, _coverage(ctx), patient, hl + 1)
    body = _claim(ctx)
    return [*billing, *subscriber, *body], hl + (3 if with_patient else 2)


def first_missing(claim: dict[str, Any], resolve: Resolve, tables: X12Tables) -> str | None:
    """The first element the 837P requires that `claim` (with its resources) lacks, as `<element> is required
    (<why>)`; None when it has them all. A replacement's or void's REF*F8 is not asked for here: the payer's
    claim number is known only once its answer is read (adapter/x12/step.py)."""
    try:
        claim_segments(claim, resolve, tables, 1, None)
    except Missing as missing:
        return f"{missing.element} is required ({missing.detail})"
    return None


def build_interchange(claims: Sequence[dict[str, Any]], resolve: Resolve, tables: X12Tables, control: Control,
                      payer_claim_numbers: Mapping[str, str] | None = None) -> Interchange:
    """One interchange (ISA/GS/ST) holding every Claim of `claims` that has what the 837P requires."""
    result = Interchange(None)
    body: list[str] = []
    hl = 1
    for claim in claims:
        value = str(((claim.get("identifier") or [{}])[0]).get("value") or claim.get("id") or "?")
        try:
            segments, hl_next = claim_segments(claim, resolve, tables, hl, payer_claim_numbers or {})
        except Missing as missing:
            procedures = tuple(r for r in (reference_of(p.get("procedureReference"))
                                           for p in claim.get("procedure") or [] if isinstance(p, dict)) if r)
            result.problems.append(ClaimProblem(value, procedures, missing.element, missing.detail))
            continue
        body += segments
        hl = hl_next
        result.claims.append(value)
    if not body:
        return result
    number = f"{control.number:09d}"
    day, time = control.created.strftime("%Y%m%d"), control.created.strftime("%H%M")
    t = tables
    header = [_segment("ST", "837", "0001", IMPLEMENTATION),
              _segment("BHT", "0019", "00", number, day, time, "CH"),
              _segment("NM1", "41", "2", clean(t.submitter.name, 60), "", "", "", "", "46", clean(t.submitter.id, 80)),
              _segment("PER", "IC", clean(t.submitter_contact, 60), "TE", t.submitter_phone),
              _segment("NM1", "40", "2", clean(t.receiver.name, 60), "", "", "", "", "46", clean(t.receiver.id, 80))]
    transaction = [*header, *body]
    transaction.append(_segment("SE", len(transaction) + 1, "0001"))
    isa = "*".join(["ISA", "00", " " * 10, "00", " " * 10, t.sender_qualifier, t.sender_id.ljust(15),
                    t.receiver_qualifier, t.receiver_id.ljust(15), day[2:], time, "^", "00501", number, "0",
                    t.usage, ":"]) + "~"
    segments = [isa, _segment("GS", "HC", t.sender_id, t.receiver_id, day, time, control.number, "X", IMPLEMENTATION),
                *transaction, _segment("GE", 1, control.number), _segment("IEA", 1, number)]
    result.text = "\n".join(segments) + "\n"
    return result
