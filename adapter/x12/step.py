"""The X12 sink's part of a sync pass: the Claims the pass wrote, as one 837P interchange (adapter/x12/sink.py)."""

from __future__ import annotations

import logging
from typing import Any

from adapter.building.claim837 import REASON, frequency_of
from adapter.client.errors import FhirError
from adapter.coding.engine import Review
from adapter.extraction.index import reference_of
from adapter.x12.sink import X12Result, X12Sink

log = logging.getLogger("adapter.x12")


def written_claims(writes: Any, failed: dict[str, Any]) -> list[dict[str, Any]]:
    """The active Claims of the sessions whose FHIR transaction went through (or was not needed: sinks.fhir off)."""
    return [e["resource"] for s in writes.sessions if s.label not in failed and not s.deferred and not s.failure
            for e in s.entries
            if e["resource"].get("resourceType") == "Claim" and e["resource"].get("status") == "active"]


def payer_claim_numbers(client: Any, claims: list[dict[str, Any]]) -> dict[str, str]:
    """The payer's claim control number (REF*F8) of each Claim a replacement or void names: the identifier of the
    ClaimResponse that answered it (one search per correction; corrections are rare)."""
    numbers: dict[str, str] = {}
    for claim in claims:
        if frequency_of(claim) not in ("7", "8"):
            continue
        prior = next((reference_of(r.get("claim")) for r in claim.get("related") or []), None)
        if not prior or prior in numbers:
            continue
        try:
            for response in client.search_all("ClaimResponse", {"request": prior}):
                value = next((i.get("value") for i in response.get("identifier") or [] if i.get("value")), None)
                if response.get("resourceType") == "ClaimResponse" and value:
                    numbers[prior] = str(value)
                    break
        except FhirError as exc:  # the Claim is reported (REF*F8 unknown), never sent without it
            log.warning("the ClaimResponse of %s could not be read: %s", prior, exc)
    return numbers


def send_x12(sink: X12Sink, client: Any, report: Any, writes: Any, failed: dict[str, Any]) -> tuple[X12Result,
                                                                                                     list[Review]]:
    claims = written_claims(writes, failed)
    result = sink.deliver(claims, report.index.get, payer_claim_numbers(client, claims))
    reviews = [Review(p, p, REASON, problem.text) for problem in result.problems for p in problem.procedures]
    if result.failure:
        log.warning("X12 interchange not written (written again by the next pass): %s", result.failure)
    return result, reviews
