"""Read FNA Procedures, and everything their coding needs, from a FHIR server in a few batched searches.

A changed Procedure can change the codes of every other Procedure of its session, so the unit of work is
the patient: all of a patient's FNA (and core biopsy) Procedures are read and coded together, with the
BodyStructures, Conditions and Coverages they reference, and the charges this adapter wrote before.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from adapter.client import FhirClient
from adapter.config import CodeTables
from adapter.extraction.index import reference_of
from adapter.extraction.procedures import body_structure_extensions
from adapter.sources.files import SourcedResource

BATCH = 100
"""References per search: keeps form bodies and server-side OR lists reasonable."""
PAGE = 500


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
        # FNAs, core biopsies (same-lesion rule) and separate imaging-guidance Procedures (modality evidence)
        codes = sorted(tables.fna | tables.core_needle_biopsy | set(tables.guidance_procedures))
        self.code_param = ",".join(f"{system}|{code}" for system, code in codes)

    def _search(self, resource_type: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
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
        """All FNA Procedures of these patients and what they reference, plus our earlier output."""
        ctx = PatientContext()
        wanted = sorted(set(patients))
        origin = self.client.base_url
        procedures: list[dict[str, Any]] = []
        for batch in chunks(wanted):
            procedures += self._search("Procedure", {"patient": ",".join(batch), "code": self.code_param,
                                                     "_count": str(PAGE)})
        fetched = list(procedures)
        parents = _ids((r for proc in procedures for r in proc.get("partOf") or []), "Procedure")
        parents -= {str(proc.get("id")) for proc in procedures}
        fetched += self._by_id("Procedure", parents)  # a parent that is not an FNA: its child is billed alone
        structures = _ids((v for proc in procedures for _, v, _ in body_structure_extensions(proc)), "BodyStructure")
        conditions = _ids((r for proc in procedures for r in proc.get("reasonReference") or []), "Condition")
        encounters = _ids((proc.get("encounter") for proc in procedures), "Encounter")
        fetched += self._by_id("BodyStructure", structures) + self._by_id("Condition", conditions)
        found_encounters = self._by_id("Encounter", encounters)
        fetched += found_encounters
        roles = _ids((perf.get("actor") for proc in procedures for perf in proc.get("performer") or []
                      if isinstance(perf, dict)), "PractitionerRole")
        roles |= _ids((part.get("individual") for enc in found_encounters for part in enc.get("participant") or []
                       if isinstance(part, dict)), "PractitionerRole")
        fetched += self._by_id("PractitionerRole", roles)  # its practitioner is the rendering provider
        for batch in chunks(wanted):
            joined = ",".join(batch)
            fetched += self._search("Coverage", {"beneficiary": joined, "status": "active", "_count": str(PAGE)})
            ctx.charge_items += self._search("ChargeItem", {
                "subject": joined, "identifier": f"{self.tables.settings.charge_identifier_system}|",
                "_count": str(PAGE)})
            ctx.claims += self._search("Claim", {
                "patient": joined, "identifier": f"{self.tables.settings.claim_identifier_system}|",
                "_count": str(PAGE)})
        ctx.resources = [SourcedResource(r, f"{origin}/{r['resourceType']}/{r.get('id')}") for r in fetched]
        return ctx

    def _by_id(self, kind: str, ids: set[str]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for batch in chunks(sorted(ids)):
            found += self._search(kind, {"_id": ",".join(batch), "_count": str(PAGE)})
        return found


def _ids(references: Iterable[Any], kind: str) -> set[str]:
    """Ids of the `kind/id` references among `references` (server data: references are relative)."""
    out: set[str] = set()
    for value in references:
        ref = reference_of(value)
        if ref and ref.startswith(kind + "/") and "?" not in ref:
            out.add(ref.split("/", 1)[1])
    return out
