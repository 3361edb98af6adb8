"""Fixtures for integration tests against a real HAPI FHIR JPA server (R4).

``hapi_url`` uses ``HAPI_URL`` when set; otherwise it runs ``scripts/hapi start`` once per session
(building tests/hapi-server on first use) and stops the server at the end only if it started it.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from adapter.client import FhirClient

REPO_ROOT = Path(__file__).resolve().parents[2]
HAPI_SCRIPT = REPO_ROOT / "scripts" / "hapi"
FHIR_JSON = "application/fhir+json"
# Build (first use) + start-up; scripts/hapi has its own readiness timeout (HAPI_START_TIMEOUT).
START_COMMAND_TIMEOUT_S = 1200


def _run_hapi(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(HAPI_SCRIPT), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture(scope="session")
def hapi_url() -> Iterator[str]:
    """Base URL of a running HAPI FHIR R4 server, e.g. ``http://127.0.0.1:8089/fhir``."""
    from_env = os.environ.get("HAPI_URL", "").strip()
    if from_env:
        yield from_env.rstrip("/")
        return

    already_running = _run_hapi("status", timeout=60).returncode == 0
    started = _run_hapi("start", timeout=START_COMMAND_TIMEOUT_S)
    if started.returncode != 0:
        pytest.fail(
            f"scripts/hapi start failed (exit {started.returncode}):\n{started.stdout}\n{started.stderr}",
            pytrace=False,
        )
    lines = [line.strip() for line in started.stdout.splitlines() if line.strip()]
    if not lines or not lines[-1].startswith("http"):
        pytest.fail(f"scripts/hapi start printed no base URL:\n{started.stdout}", pytrace=False)
    try:
        yield lines[-1].rstrip("/")
    finally:
        if not already_running:
            _run_hapi("stop", timeout=120)


@pytest.fixture
def fhir_ns() -> str:
    """Unique per-test prefix for client-assigned ids and identifier values, e.g. ``t1a2b3c4d``."""
    return "t" + uuid.uuid4().hex[:8]


@pytest.fixture
def fhir_session() -> Iterator[requests.Session]:
    """``requests.Session`` that sends and accepts ``application/fhir+json``."""
    session = requests.Session()
    session.headers.update({"Accept": FHIR_JSON, "Content-Type": FHIR_JSON})
    try:
        yield session
    finally:
        session.close()


@pytest.fixture(scope="module")
def client(hapi_url: str) -> Iterator[FhirClient]:
    """The adapter's own FHIR client against the test server."""
    with FhirClient(hapi_url) as fhir:
        yield fhir


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `bulk` (hundreds of writes) run last: after them HAPI was seen to take up to two minutes to
    deliver the next rest-hook notification, so the Subscription tests run first."""
    items.sort(key=lambda item: item.get_closest_marker("bulk") is not None)  # stable: the rest keep their order


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bulk: writes hundreds of resources to HAPI; runs after the other tests")
