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
from adapter.extraction.index import reference_of
from adapter.extraction.procedures import body_structure_references
from adapter.sources.files import SourcedResource

BATCH = 100
"""References per search: keeps form bodies and server-side OR lists reasonable."""
PAGE = 500
PROCEDURE_INCLUDES = (
    ("_include", "Procedure:encounter"), ("_include", "Procedure:performer"),
    ("_include:iterate", "PractitionerRole:organization"), ("_include:iterate", "Encounter:location"),
    ("_include:iterate", "Encounter:account"), ("_include:iterate", "Encounter:service-provider"),
)
"""What billing needs of each Procedure comes with it: its Encounter (with locations, accounts and service
provider), its performers (Practitioners, PractitionerRoles with their organizations)."""


def chunks(items: list[str], size: int = BATCH) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass
class PatientContext:
    """Everything needed to code and reconcile a set of patients."""

    resources: list[SourcedResource] = field(default_factory=list)
    charge_items: list[dict[str, Any]] = field(default_factory=list)
    claims: list[dict[str, Any]] = field(default_factory=list)


class ServerSource:
    def __init__(self, client: FhirClient, tables: CodeTables, page_size: int = PAGE) -> None:
        self.client = client
        self.tables = tables
        self.page_size = page_size
        codes = sorted(tables.fna | tables.core_needle_biopsy)
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

        Besides what coding needs (BodyStructures, Conditions, Coverages), billing reads the Encounters (place
        of service, department, accounts) with their Locations, the performers and their PractitionerRoles,
        the Organizations named as payor, role organization, onBehalfOf or service provider, the patients'
        Accounts, and the active ChargeItemDefinitions (prices)."""
        ctx = PatientContext()
        wanted = sorted(set(patients))
        origin = self.client.base_url
        procedures: list[dict[str, Any]] = []
        included: list[dict[str, Any]] = []
        for batch in chunks(wanted):
            for res in self._search("Procedure", [("patient", ",".join(batch)), ("code", self.code_param),
                                                  ("_count", str(PAGE)), *PROCEDURE_INCLUDES]):
                (procedures if res.get("resourceType") == "Procedure" else included).append(res)
        refs = _References()
        for proc in procedures:
            refs.add_ids("BodyStructure", _body_structure_ids(proc))
            refs.add(*(proc.get("reasonReference") or []), proc.get("encounter"))
            for performer in proc.get("performer") or []:
                if isinstance(performer, dict):
                    refs.add(performer.get("actor"), performer.get("onBehalfOf"))
        fetched = list(procedures)
        refs.discard({f"{r.get('resourceType')}/{r.get('id')}" for r in included})
        first = included + self._fetch(refs, ("BodyStructure", "Condition", "Encounter", "PractitionerRole"))
        for batch in chunks(wanted):
            joined = ",".join(batch)
            first += self._search("Coverage", [("beneficiary", joined), ("status", "active"), ("_count", str(PAGE)),
                                               ("_include", "Coverage:payor")])
            first += self._search("Account", {"patient": joined, "status": "active", "_count": str(PAGE)})
            ctx.charge_items += self._search("ChargeItem", {
                "subject": joined, "identifier": f"{self.tables.settings.charge_identifier_system}|",
                "_count": str(PAGE)})
            ctx.claims += self._search("Claim", {
                "patient": joined, "identifier": f"{self.tables.settings.claim_identifier_system}|",
                "_count": str(PAGE)})
        have = {f"{r.get('resourceType')}/{r.get('id')}" for r in first}
        for res in first:
            kind = res.get("resourceType")
            if kind == "Encounter":
                refs.add(res.get("serviceProvider"), *(res.get("account") or []),
                         *((loc or {}).get("location") for loc in res.get("location") or [] if isinstance(loc, dict)))
            elif kind == "PractitionerRole":
                refs.add(res.get("organization"), res.get("practitioner"))
            elif kind == "Coverage":
                refs.add(*(res.get("payor") or []))
        refs.discard(have)
        fetched += first + self._fetch(refs, ("Organization", "Location", "Account", "Practitioner"))
        fetched += self._search("ChargeItemDefinition", {"status": "active", "_count": str(PAGE)})
        unique = {f"{r['resourceType']}/{r.get('id')}": r for r in fetched}  # an include can repeat across pages
        ctx.resources = [SourcedResource(r, f"{origin}/{ref}") for ref, r in unique.items()]
        return ctx

    def _fetch(self, refs: _References, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for kind in kinds:
            for batch in chunks(sorted(refs.ids.get(kind, ()))):
                found += self._search(kind, {"_id": ",".join(batch), "_count": str(PAGE)})
        return found


class _References:
    """Ids to read, by resource type, from literal references met in the resources read so far."""

    def __init__(self) -> None:
        self.ids: dict[str, set[str]] = {}

    def add_ids(self, kind: str, ids: Iterable[str]) -> None:
        self.ids.setdefault(kind, set()).update(ids)

    def add(self, *values: Any) -> None:
        for value in values:
            ref = reference_of(value)
            if ref and "/" in ref and "?" not in ref:
                kind, rid = ref.split("/", 1)
                self.ids.setdefault(kind, set()).add(rid)

    def discard(self, refs: set[str]) -> None:
        for ref in refs:
            kind, _, rid = ref.partition("/")
            self.ids.get(kind, set()).discard(rid)


def _body_structure_ids(proc: dict[str, Any]) -> set[str]:
    return {ref.split("/", 1)[1] for _, ref, _ in body_structure_references(proc)
            if ref and ref.startswith("BodyStructure/")}
