"""What a benchmark wrote to a FHIR server, removed again: the generated resources it loaded and every ChargeItem
and Claim the adapter (or a raw write) made for their patients. Shared by the benches that use HAPI.

Deleted in transactions grouped by patient: generate.py gives each patient a graph of its own (Practitioner,
Organization, Coverage, Encounter, BodyStructures, Procedures), and a resource may only be deleted together with
whatever still references it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from adapter.client.errors import FhirConflict

OUTPUT_SEARCHES = (("ChargeItem", "subject"), ("Claim", "patient"))
"""What the adapter writes, and the search parameter naming the patient."""


def _owner(resource_id: str, stems: set[str]) -> str:
    """The patient stem a generated id belongs to: generate.py names everything of patient `<stem>-pat`
    `<stem>-...` (a prefix may hold '-' itself, so every '-' is tried)."""
    for at in range(len(resource_id)):
        if resource_id[at] == "-" and resource_id[:at] in stems:
            return resource_id[:at]
    return resource_id


def written_for(client: Any, patients: list[str]) -> list[tuple[str, str]]:
    """(Patient/x, Type/id) of every ChargeItem and Claim on the server for `patients` (Patient/x references)."""
    found: list[tuple[str, str]] = []
    for kind, param in OUTPUT_SEARCHES:
        for start in range(0, len(patients), 100):
            chunk = patients[start:start + 100]
            for item in client.search_all(kind, {param: ",".join(chunk), "_count": "500", "_elements": param},
                                          via_post=True):
                found.append(((item.get(param) or {}).get("reference", ""), f"{kind}/{item['id']}"))
    return found


def remove(client: Any, resources: Iterable[dict[str, Any]], batch: int = 400) -> int:
    """Delete `resources` (generated, with client-assigned ids) and what was written for their patients; returns
    how many resources were deleted. Safe after a failed run: only what is on the server is deleted."""
    loaded = list(resources)
    stems = {r["id"].removesuffix("-pat") for r in loaded if r["resourceType"] == "Patient"}
    groups: dict[str, list[str]] = {}
    for resource in loaded:
        groups.setdefault(_owner(resource["id"], stems), []).append(f"{resource['resourceType']}/{resource['id']}")
    for patient, ref in written_for(client, sorted(f"Patient/{stem}-pat" for stem in stems)):
        groups.setdefault(_owner(patient.removeprefix("Patient/"), stems), []).append(ref)
    deleted = 0
    entries: list[dict[str, Any]] = []
    for refs in groups.values():
        entries += [{"request": {"method": "DELETE", "url": ref}} for ref in dict.fromkeys(refs)]
        if len(entries) >= batch:
            deleted += _delete(client, entries)
            entries = []
    if entries:
        deleted += _delete(client, entries)
    return deleted


def _delete(client: Any, entries: list[dict[str, Any]], attempts: int = 6) -> int:
    """One delete transaction, tried again on HAPI's 409 "version constraint failure": HAPI's own background
    work (indexing, Subscription matching) may hold a row of the batch for a moment; the delete is idempotent."""
    for attempt in range(1, attempts + 1):
        try:
            client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries}, idempotent=True)
            return len(entries)
        except FhirConflict:
            if attempt == attempts:
                raise
            time.sleep(0.5 * attempt)
    return 0
