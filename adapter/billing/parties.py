"""Who and where of a Claim: billing provider, payer, place of service, referral and the ChargeItems' account.

Each decision says where it came from (for `explain` and the notes); what cannot be decided is a `Gap`
with a review reason, never a guess. Pure: reads the resource index and the tables only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from adapter.extraction.index import ResourceIndex
from adapter.extraction.procedures import Finding, ProcedureFacts
from adapter.tables.billing import NPI_SYSTEM, TIN_SYSTEM, BillingOrganization, BillingProviders, BillingTables

Gap = Finding
"""Something the Claim needs and the input plus tables cannot give: a review reason and a sentence."""
CONTAINED_PROVIDER = "billing-provider"
"""The id of the Organization a Claim contains for a configured billing provider (Claim.provider
`#billing-provider`)."""
TAXONOMY_SYSTEM = "http://nucc.org/provider-taxonomy"


@dataclass(frozen=True)
class BillingProvider:
    reference: dict[str, Any]
    """Claim.provider: a literal reference to the input's Organization, or (a configured organization not on
    the server) `#billing-provider`, the Organization in `contained`, with its NPI (else TIN) and name."""
    venue: str | None
    """`Organization/x` when the provider is a server resource: what a ChargeItemDefinition's venue names."""
    source: str
    display: str
    contained: dict[str, Any] | None = None
    """The Organization the Claim contains (a configured organization without `reference`): NPI, TIN, taxonomy,
    address; what the X12 837P billing provider (loop 2010AA) reads."""


def contained_organization(org: BillingOrganization) -> dict[str, Any]:
    """A configured billing organization as the Organization a Claim contains: everything the 837P's loop 2010AA
    needs (NPI, TIN, taxonomy, address) travels in the Claim."""
    out: dict[str, Any] = {"resourceType": "Organization", "id": CONTAINED_PROVIDER}
    identifiers = [{"system": NPI_SYSTEM, "value": org.npi}] if org.npi else []
    identifiers += [{"system": TIN_SYSTEM, "value": org.tin}] if org.tin else []
    out["identifier"] = identifiers
    out["active"] = True
    if org.taxonomy:
        out["type"] = [{"coding": [{"system": TAXONOMY_SYSTEM, "code": org.taxonomy}]}]
    out["name"] = org.name
    if org.address:
        out["address"] = [{"use": "work", **org.address}]
    return out


def configured_provider(org: BillingOrganization, where: str) -> BillingProvider:
    """Claim.provider of a configured organization: a literal reference to its server Organization
    (`reference`), else `#billing-provider` and the Organization contained in the Claim."""
    ref: dict[str, Any] = {"reference": org.reference} if org.reference else {
        "reference": f"#{CONTAINED_PROVIDER}", "type": "Organization"}
    if org.npi or org.tin:
        ref["identifier"] = {"system": NPI_SYSTEM if org.npi else TIN_SYSTEM, "value": org.npi or org.tin}
    ref["display"] = org.name
    return BillingProvider(ref, org.reference, where, org.name,
                           None if org.reference else contained_organization(org))


def with_contained_provider(claim: dict[str, Any], providers: BillingProviders) -> dict[str, Any]:
    """`claim` (one a release before the contained billing provider wrote) with it: when Claim.provider is a
    logical reference whose NPI (else TIN) is a configured organization's, that organization, contained. Used
    for the void of such a Claim, so the 837P has the billing provider it needs; any other Claim as it is."""
    provider = claim.get("provider")
    if not isinstance(provider, dict) or provider.get("reference") or claim.get("contained"):
        return claim
    ident = provider.get("identifier") if isinstance(provider.get("identifier"), dict) else {}
    system, value = ident.get("system"), ident.get("value")
    org = next((o for o in providers.organizations.values() if not o.reference and value
                and value == (o.npi if system == NPI_SYSTEM else o.tin if system == TIN_SYSTEM else None)), None)
    if org is None:
        return claim
    built = configured_provider(org, "")
    return {**claim, "provider": built.reference, "contained": [built.contained]}  # void_claim orders the keys


@dataclass(frozen=True)
class PlaceOfService:
    code: str
    display: str
    source: str


def _identifier(resource: dict[str, Any] | None, system: str) -> str | None:
    for ident in (resource or {}).get("identifier") or []:
        if isinstance(ident, dict) and ident.get("system") == system and ident.get("value"):
            return str(ident["value"])
    return None


def _codings(concept: Any) -> list[tuple[str, str]]:
    if not isinstance(concept, dict):
        return []
    return [(str(c.get("system", "")), str(c["code"])) for c in concept.get("coding") or []
            if isinstance(c, dict) and c.get("code")]


def _organization_reference(ref: str, index: ResourceIndex) -> dict[str, Any]:
    """A Reference to an Organization of the input, with its NPI (else TIN) and name when the input has them."""
    org = index.get(ref)
    out: dict[str, Any] = {"reference": ref}
    npi, tin = _identifier(org, NPI_SYSTEM), _identifier(org, TIN_SYSTEM)
    if npi or tin:
        out["identifier"] = {"system": NPI_SYSTEM if npi else TIN_SYSTEM, "value": npi or tin}
    if org and isinstance(org.get("name"), str):
        out["display"] = org["name"]
    return out


def billing_provider(procedures: list[ProcedureFacts], performer: str, encounter: str, index: ResourceIndex,
                     tables: BillingTables) -> BillingProvider | Gap:
    """The performer's PractitionerRole.organization, else performer.onBehalfOf, else the configured one.

    The PractitionerRole and onBehalfOf are those of the performer entry extraction chose as rendering
    (whatever reference form the input used)."""
    for facts in procedures:
        if facts.rendering != performer:
            continue
        role = facts.rendering_role
        if role:
            org = index.key_of((index.get(role) or {}).get("organization"), role)
            if org and org.startswith("Organization/"):
                ref = _organization_reference(org, index)
                return BillingProvider(ref, org, f"{role}.organization", ref.get("display", org))
        behalf = facts.on_behalf_of
        if behalf and behalf.startswith("Organization/"):
            ref = _organization_reference(behalf, index)
            return BillingProvider(ref, behalf, "Procedure.performer.onBehalfOf", ref.get("display", behalf))
    providers = tables.providers
    key, source = None, ""
    npi = _identifier(index.get(performer), NPI_SYSTEM)
    if performer in providers.by_performer:
        key, source = providers.by_performer[performer], f"by_performer {performer}"
    elif npi and npi in providers.by_performer:
        key, source = providers.by_performer[npi], f"by_performer NPI {npi}"
    if key is None:
        enc = index.get(encounter) or {}
        departments = [index.key_of(enc.get("serviceProvider"), encounter)]
        departments += [index.key_of(loc.get("location"), encounter) for loc in enc.get("location") or []
                        if isinstance(loc, dict)]
        for dept in departments:
            if dept and dept in providers.by_department:
                key, source = providers.by_department[dept], f"by_department {dept}"
                break
    if key is None and providers.default:
        key, source = providers.default, "default"
    if key is None:
        return Gap("missing-billing-provider",
                   f"no billing organization: {performer} acts through no PractitionerRole with an organization "
                   "and no performer.onBehalfOf, and config/billing-providers.yaml has no match and no default")
    return configured_provider(providers.organizations[key], f"config/billing-providers.yaml {source} -> {key}")


def _period_covers(period: Any, day: date) -> bool:
    """Whether a Period contains `day`, compared as calendar dates to the precision given (`2026`, `2026-03`,
    `2026-03-10`, or a dateTime, whose date counts whole): an open end is no limit."""
    if not isinstance(period, dict):
        return True
    iso = day.isoformat()
    start, end = period.get("start"), period.get("end")
    if isinstance(start, str) and start and iso[:len(start[:10])] < start[:10]:
        return False
    return not (isinstance(end, str) and end and iso[:len(end[:10])] > end[:10])


def coverages_on(index: ResourceIndex, patient: str, day: date) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """The patient's active Coverages in force on the date of service (`Coverage.period` contains it), in claim
    order; and the active ones whose period does not (expired, or not yet begun), as `Coverage/x (period)`.

    A Coverage out of its period is never the Claim's insurance: without another, the session has no
    Coverage (the usual rule: ChargeItems and the `no-coverage` warning)."""
    found, out_of_period = [], []
    for ref, cov in index.active_coverages(patient):
        if _period_covers(cov.get("period"), day):
            found.append((ref, cov))
        else:
            period = cov.get("period") or {}
            out_of_period.append(f"{ref} ({period.get('start', '...')} to {period.get('end', '...')})")
    return found, out_of_period


def insurer(coverage: dict[str, Any], coverage_ref: str, index: ResourceIndex) -> dict[str, Any] | Gap:
    """The focal Coverage's payor, when it is an Organization (a Patient or RelatedPerson payor is self-pay)."""
    for payor in coverage.get("payor") or []:
        if not isinstance(payor, dict):
            continue
        ref = index.key_of(payor, coverage_ref)
        if ref and ref.startswith("Organization/"):
            return _organization_reference(ref, index)
        if payor.get("type") == "Organization" and isinstance(payor.get("identifier"), dict):
            return {k: v for k, v in payor.items() if k in ("type", "identifier", "display")}
    named = ", ".join(index.key_of(p, coverage_ref) or "?" for p in coverage.get("payor") or []
                      if isinstance(p, dict)) or "none"
    return Gap("missing-payer", f"the focal {coverage_ref} names no payer Organization (payor: {named}): "
                                "a claim needs the insurer")


def place_of_service(encounter: str, index: ResourceIndex, tables: BillingTables) -> PlaceOfService | Gap:
    """Encounter location, location type, service type, class through config/place-of-service.yaml."""
    pos = tables.place_of_service
    enc = index.get(encounter)

    def found(code: str, source: str) -> PlaceOfService:
        return PlaceOfService(code, pos.names[code], source)

    if enc:
        for loc in enc.get("location") or []:
            ref = index.key_of(loc.get("location"), encounter) if isinstance(loc, dict) else None
            if ref and ref in pos.by_location:
                return found(pos.by_location[ref], f"by_location {ref}")
            for key in _codings_of_types((index.get(ref) or {}).get("type")):
                if key in pos.by_location_type:
                    return found(pos.by_location_type[key], f"by_location_type {key[0]}|{key[1]} of {ref}")
        for concept in _as_list(enc.get("serviceType")):
            for key in _codings(concept):
                if key in pos.by_service_type:
                    return found(pos.by_service_type[key], f"by_service_type {key[0]}|{key[1]}")
        for key in [(str(c.get("system", "")), str(c.get("code"))) for c in _as_list(enc.get("class"))
                    if isinstance(c, dict) and c.get("code")]:
            if key in pos.by_class:
                return found(pos.by_class[key], f"by_class {key[1]} of {encounter}")
    if pos.default:
        why = f"{encounter} matches no rule" if enc else ("no Encounter" if not encounter else f"{encounter} not read")
        return found(pos.default, f"default ({why})")
    what = f"{encounter} matches no rule" if enc else "the session has no Encounter in the input"
    return Gap("missing-place-of-service", f"{what} in config/place-of-service.yaml and no default is set")


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value] if value else []


def _codings_of_types(types: Any) -> list[tuple[str, str]]:
    return [key for concept in _as_list(types) for key in _codings(concept)]


def referral(procedures: list[ProcedureFacts], index: ResourceIndex) -> str | None:
    """The first ServiceRequest a Procedure of the session is basedOn."""
    for facts in procedures:
        for based in facts.resource.get("basedOn") or []:
            ref = index.key_of(based, facts.ref)
            if ref and ref.startswith("ServiceRequest/"):
                return ref
    return None


class Accounts:
    """Active Accounts of the input by subject, built once per run (not once per session)."""

    def __init__(self, index: ResourceIndex) -> None:
        self.index = index
        self.by_subject: dict[str, list[str]] = {}
        for ref, account in index.of_type("Account"):
            if account.get("status") != "active":
                continue
            for subject in account.get("subject") or []:
                target = index.key_of(subject, ref)
                if target:
                    self.by_subject.setdefault(target, []).append(ref)

    def _active(self, ref: str | None, day: date) -> bool:
        account = self.index.get(ref)
        if not account or account.get("status") != "active":
            return False
        period = account.get("servicePeriod") or {}
        start, end = str(period.get("start") or "")[:10], str(period.get("end") or "")[:10]
        return not ((start and day.isoformat() < start) or (end and day.isoformat() > end))

    def of_session(self, patient: str, encounter: str, day: date) -> tuple[list[str], str | None]:
        """The encounter's active Accounts, else the patient's single active one; (refs, why-none-or-ambiguous)."""
        enc = self.index.get(encounter) or {}
        own = [r for r in (self.index.key_of(a, encounter) for a in enc.get("account") or [])
               if r and self._active(r, day)]
        if own:
            return own, None
        mine = sorted(r for r in self.by_subject.get(patient, []) if self._active(r, day))
        if len(mine) > 1:
            return [], (f"{patient} has {len(mine)} active Accounts ({', '.join(mine)}) and the Encounter names "
                        "none: ChargeItem.account left empty")
        return mine, None
