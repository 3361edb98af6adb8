"""Shared by the worklist's integration tests: fixing scenario 80's payer on the server, waiting for a page."""

from __future__ import annotations

from typing import Any

import requests

from adapter.client import FhirClient

from .helpers import resources_of


def give_scenario_80_a_payer(client: FhirClient, bundle: dict[str, Any], ns: str) -> None:
    """What the analyst gets fixed for `missing-payer`: the Coverage names an insurer Organization (a change
    that no Procedure poll sees, so only a replay codes it)."""
    payer = client.update({"resourceType": "Organization", "id": f"{ns}-s80-payer", "active": True,
                           "name": "Test Payer"})
    coverage = next(r for r in resources_of(bundle) if r["resourceType"] == "Coverage")
    client.update({**coverage, "payor": [{"reference": f"Organization/{payer['id']}"}],
                   "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                        "code": "EHCPOL"}]}})


def page_answers(base: str) -> bool:
    try:
        return requests.get(f"{base}/login", timeout=2).status_code == 200
    except requests.RequestException:
        return False
