"""`charge-adapter conformance install` on a real HAPI server: written once, then left alone."""

from __future__ import annotations

from click.testing import CliRunner

from adapter import conformance
from adapter.cli import cli
from adapter.client import FhirClient
from adapter.config import load_tables

TABLES = load_tables()


def test_install_is_idempotent(client: FhirClient) -> None:
    first = CliRunner().invoke(cli, ["conformance", "install", "--server", client.base_url])
    assert first.exit_code == 0, first.output
    sd = list(client.search_all("StructureDefinition", {"url": TABLES.settings.modifier_extension}))
    assert len(sd) == 1
    version = sd[0]["meta"]["versionId"]
    again = CliRunner().invoke(cli, ["conformance", "install", "--server", client.base_url])
    assert again.exit_code == 0, again.output
    assert f"0 written, {len(conformance.resources())} unchanged" in again.output
    assert client.read("StructureDefinition", sd[0]["id"])["meta"]["versionId"] == version
    systems = {ns["uniqueId"][0]["value"] for ns in client.search_all("NamingSystem", {"_count": "100"})}
    assert {TABLES.settings.charge_identifier_system, TABLES.settings.claim_identifier_system} <= systems
