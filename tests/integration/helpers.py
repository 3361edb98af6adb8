"""Shared by the integration tests: scenario loading under a namespace, the server's clock, waiting."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapter.client import FhirClient

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "fixtures/fhir/scenarios"


def namespaced(scenario: str, ns: str) -> dict[str, Any]:
    """Scenario `NN` with every id prefixed by `ns`, so a test can change it without touching the others."""
    folder = next(SCENARIOS.glob(f"{scenario}-*"))
    return json.loads(re.sub(r"\b([sn]\d{2,3})-", rf"{ns}-\1-", (folder / "input.json").read_text()))


def resources_of(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"]]


def patients_of(bundle_or_resources: dict[str, Any] | list[dict[str, Any]]) -> list[str]:
    resources = resources_of(bundle_or_resources) if isinstance(bundle_or_resources, dict) else bundle_or_resources
    return [f"Patient/{r['id']}" for r in resources if r["resourceType"] == "Patient"]


def server_now(client: FhirClient) -> str:
    """The server's clock (a search Bundle's meta.lastUpdated), never the local one."""
    return next(client.search("Procedure", {"_count": "0"}))["meta"]["lastUpdated"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
