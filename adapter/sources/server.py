"""Read FNA Procedures, and everything their coding needs, from a FHIR server in a few batched searches.

A changed Procedure can change the codes of every other Procedure of its session, so the unit of work is
the patient: all of a patient's FNA (and core biopsy) Procedures are read and coded together, with the
BodyStructures, Conditions and Coverages they reference, and the charges this adapter wrote before.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from adapter.client import FhirClient, SearchParams
from adapter.config import CodeTables
from adapter.extraction.index import identifier_token, local_reference, normalize_bases
from adapter.extraction.procedures import body_structure_extensions
from adapter.sources.files import SourcedResource

BATCH = 100
"""References per search: keeps form bodies and server-side OR lists reasonable."""
PAGE = 500
ID_BATCH = PAGE
"""Ids per `_id` search: each matches at most one resource, so a full batch is still one page (the lesions of
1,000 Procedures take 4 searches instead of 19)."""
PROCEDURE_INCLUDES = (
    ("_include", "Procedure:encounter"), ("_include", "Procedure:performer"), ("_include", "Procedure:patient"),
    ("_include:iterate", "PractitionerRole:organization"), ("_include:iterate", "Encounter:location"),
    ("_include:iterate", "Encounter:account"), ("_include:iterate", "Encounter:service-provider"),
)
"""What billing needs of each Procedure comes with it: its Encounter (with locations, accounts and service
provider), its performers (Practitioners, PractitionerRoles with their organizations), its Patient (the MRN, name,
birth date and sex an HL7 v2 charge message carries)."""


def chunks(items: list[str], size: int = BATCH) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass
class PatientContext:
    """Everything needed to code and reconcile a set of patients."""

    resources: list[SourcedResource] = field(default_factory=list)
    charge_items: list[dict[str, Any]] = field(default_factory=list)
    claims: list[dict[str, Any]] = field(default_factory=list)
    answered: set[str] = field(default_factory=set)
    """`Claim/id` of our Claims that a ClaimResponse refers to: passed to the payer, never changed by us."""


class ServerSource:
    def __init__(self, client: FhirClient, tables: CodeTables, page_size: int = PAGE,
                 local: frozenset[str] | None = None) -> None:
        self.client = client
        self.tables = tables
        self.page_size = page_size
        self.local = local if local is not None else tables.local_bases | normalize_bases([client.base_url])
        """Bases whose absolute references are read from this server (its own, and config local_bases)."""
        # FNAs, core biopsies (same-lesion rule), separate imaging-guidance Procedures (modality evidence), the
        # site's mapped local codes (config/local-codes.json) and procedures whose code includes the FNA (rule
        # included-fna: a same-session EUS/EBUS makes the FNA bill nothing)
        codes = sorted(tables.fna | tables.core_needle_biopsy | set(tables.guidance_procedures)
                       | set(tables.local_codes.targets) | set(tables.including))
        self.code_param = ",".join(f"{system}|{code}" for system, code in codes)

    def _search(self, resource_type: str, params: SearchParams) -> Iterator[dict[str, Any]]:
        # POST _search keeps patient references out of URLs and access logs (and out of URL length limits)
        for resource, mode in self.client.search_all_with_mode(resource_type, params, via_post=True):
            if mode in (None, "match", "include") and resource.get("resourceType") != "OperationOutcome":
                yield resource

    def count_changed(self, since: str | None) -> int | None:
        params: dict[str, Any] = {"code": self.code_param, "_summary": "count", "_total": "accurate"}
        if since:
            params["_lastUpdated"] = f"ge{since}"
        page = next(self.client.search("Procedure", params, via_post=True))
        total = page.get("total")
        return total if isinstance(total, int) else None

    def changed_pages(self, since: str | None) -> Iterator[list[dict[str, Any]]]:
        """Pages of FNA/core Procedures changed since `since` (all when None), oldest change first."""
        params: dict[str, Any] = {"code": self.code_param, "_sort": "_lastUpdated,_id", "_count": str(self.page_size)}
        if since:
            params["_lastUpdated"] = f"ge{since}"
        for page in self.client.search("Procedure", params, via_post=True):
            found = [e["resource"] for e in page.get("entry") or []
                     if isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") == "Procedure"]
            if found:
                yield found

    def deleted_since(self, since: str) -> list[str]:
        """Procedures deleted at or after `since`: deletes reach no search, and HAPI sends no notification."""
        deleted: list[str] = []
        for page in self.client.history("Procedure", {"_since": since, "_count": str(self.page_size)}):
            for entry in page.get("entry") or []:
                request = entry.get("request") or {}
                if request.get("method") == "DELETE" and str(request.get("url", "")).startswith("Procedure/"):
                    deleted.append("/".join(str(request["url"]).split("/")[:2]))
        return sorted(set(deleted))

    def context(self, patients: Iterable[str]) -> PatientContext:
        """All FNA Procedures of these patients and what they reference, plus our earlier output.

        Coding needs the BodyStructures, Conditions, Encounters (a performer may only be named there),
        PractitionerRoles (their practitioner renders), `partOf` parents that are not FNAs and Coverages.
        Billing also reads the Encounters' Locations, accounts and service provider, the role organizations,
        payors and onBehalfOf Organizations, the patients' Accounts, and the active ChargeItemDefinitions.
        References are followed a few levels deep (Encounter -> participant role -> organization)."""
        ctx = PatientContext()
        wanted = sorted(set(patients))
        origin = self.client.base_url
        procedures: list[dict[str, Any]] = []
        first: list[dict[str, Any]] = []
        for batch in chunks(wanted):
            for res in self._search("Procedure", [("patient", ",".join(batch)), ("code", self.code_param),
                                                  ("_count", str(PAGE)), *PROCEDURE_INCLUDES]):
                (procedures if res.get("resourceType") == "Procedure" else first).append(res)
        for batch in chunks(wanted):
            joined = ",".join(batch)
            first += self._search("Coverage", [("beneficiary", joined), ("status", "active"), ("_count", str(PAGE)),
                                               ("_include", "Coverage:payor")])
            first += self._search("Account", {"patient": joined, "status": "active", "_count": str(PAGE)})
        ctx.charge_items, ctx.claims, ctx.answered = self.our_charges(wanted)
        have = {_key(r) for r in (*procedures, *first)}
        searched: set[tuple[str, str]] = set()
        fetched = [*procedures, *first]
        pending = list(fetched)
        for _ in range(FOLLOW_DEPTH):
            refs = _References(self.local)
            for res in pending:
                refs.add_from(res)
            refs.discard(have)
            refs.discard_searched(searched)
            searched |= {(kind, token) for kind, tokens in refs.identifiers.items() for token in tokens}
            pending = [r for r in self._fetch(refs) if _key(r) not in have]
            if not pending:
                break
            have |= {_key(r) for r in pending}
            fetched += pending
        fetched += self._search("ChargeItemDefinition", {"status": "active", "_count": str(PAGE)})
        unique = {_key(r): r for r in fetched}  # an include can repeat across pages
        ctx.resources = [SourcedResource(r, f"{origin}/{ref}") for ref, r in unique.items()]
        return ctx

    def our_charges(self, patients: Iterable[str]
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], set[str]]:
        """The ChargeItems and Claims this adapter wrote for these patients (by our identifier systems), and which
        of the Claims a ClaimResponse answers (read with them, `_revinclude`: no extra request)."""
        charge_items: list[dict[str, Any]] = []
        claims: list[dict[str, Any]] = []
        answered: set[str] = set()
        for batch in chunks(sorted(set(patients))):
            joined = ",".join(batch)
            charge_items += self._search("ChargeItem", {
                "subject": joined, "identifier": f"{self.tables.settings.charge_identifier_system}|",
                "_count": str(PAGE)})
            for res in self._search("Claim", {
                    "patient": joined, "identifier": f"{self.tables.settings.claim_identifier_system}|",
                    "_revinclude": "ClaimResponse:request", "_count": str(PAGE)}):
                if res.get("resourceType") == "Claim":
                    claims.append(res)
                elif res.get("resourceType") == "ClaimResponse":
                    answered |= answered_claims(res, self.local)
        return charge_items, claims, answered

    def _fetch(self, refs: _References) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for kind in sorted(refs.ids):
            for batch in chunks(sorted(refs.ids[kind]), ID_BATCH):
                found += self._search(kind, {"_id": ",".join(batch), "_count": str(PAGE)})
        for kind in sorted(refs.identifiers):  # logical and conditional references: every match, to tell one from many
            for batch in chunks(sorted(refs.identifiers[kind])):
                found += self._search(kind, {"identifier": ",".join(batch), "_count": str(PAGE)})
        return found


FOLLOW_DEPTH = 3
"""Rounds of reference following: Procedure -> Encounter -> participant PractitionerRole -> Organization."""


def answered_claims(claim_response: dict[str, Any], bases: frozenset[str] = frozenset()) -> set[str]:
    """The `Claim/id` a ClaimResponse answers (its `request`), unless it was entered in error."""
    if claim_response.get("status") == "entered-in-error":
        return set()
    ref = local_reference(claim_response.get("request"), bases)
    return {ref} if ref and ref.startswith("Claim/") else set()


def _key(resource: dict[str, Any]) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id')}"


class _References:
    """Ids to read, by resource type, from the references of the resources read so far: literal ones on this
    server (relative, or absolute on a local base; never another server's), and logical or conditional ones
    by identifier (`Type?identifier=system|value`, `{type, identifier}`), searched as `identifier=system|value`."""

    FOLLOWED = frozenset({"BodyStructure", "Condition", "Encounter", "PractitionerRole", "Practitioner",
                          "Organization", "Location", "Account", "Procedure", "ServiceRequest", "Patient",
                          "Coverage"})

    def __init__(self, local: frozenset[str] = frozenset()) -> None:
        self.local = local
        self.ids: dict[str, set[str]] = {}
        self.identifiers: dict[str, set[str]] = {}
        """Type -> `system|value` tokens of logical and conditional references."""

    def add(self, *values: Any) -> None:
        for value in values:
            ref = local_reference(value, self.local)
            if ref is not None:
                kind, rid = ref.split("/", 1)
                if kind in self.FOLLOWED:
                    self.ids.setdefault(kind, set()).add(rid)
                continue
            kind, token = identifier_token(value)
            if kind in self.FOLLOWED and token:
                self.identifiers.setdefault(kind, set()).add(token)

    def add_from(self, res: dict[str, Any]) -> None:
        """What coding and billing read of `res`."""
        kind = res.get("resourceType")
        if kind == "Procedure":
            self.add(*(value for _, value, _ in body_structure_extensions(res)))
            self.add(*(res.get("reasonReference") or []), res.get("encounter"), *(res.get("partOf") or []),
                     *(res.get("basedOn") or []), res.get("location"))  # location: its time zone (date-of-service)
            for performer in res.get("performer") or []:
                if isinstance(performer, dict):
                    self.add(performer.get("actor"), performer.get("onBehalfOf"))
        elif kind == "Encounter":
            self.add(res.get("serviceProvider"), *(res.get("account") or []),
                     *((loc or {}).get("location") for loc in res.get("location") or [] if isinstance(loc, dict)),
                     *((part or {}).get("individual") for part in res.get("participant") or []
                       if isinstance(part, dict)),
                     *((diag or {}).get("condition") for diag in res.get("diagnosis") or [] if isinstance(diag, dict)))
        elif kind == "PractitionerRole":
            self.add(res.get("organization"), res.get("practitioner"))
        elif kind == "Coverage":
            self.add(*(res.get("payor") or []))
        elif kind == "Account":  # whose Coverages they are (other-patient)
            self.add(*((cov or {}).get("coverage") for cov in res.get("coverage") or [] if isinstance(cov, dict)))
        elif kind == "ServiceRequest":  # the ordering provider of an HL7 v2 charge (FT1-21); its insurance
            self.add(res.get("requester"), *(res.get("insurance") or []))

    def discard(self, refs: set[str]) -> None:
        for ref in refs:
            kind, _, rid = ref.partition("/")
            self.ids.get(kind, set()).discard(rid)

    def discard_searched(self, searched: set[tuple[str, str]]) -> None:
        """Identifier searches already made (a search is answered whole: no need to repeat it)."""
        for kind, token in searched:
            self.identifiers.get(kind, set()).discard(token)

