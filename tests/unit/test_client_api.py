"""FhirClient's REST methods: paths, headers, bodies, server checks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from adapter.client import (
    FhirClient,
    FhirConflict,
    FhirNotFound,
    UnsupportedServerError,
)
from adapter.client.client import FHIR_JSON

from .fault_server import FaultServer, Reply, outcome


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


def capability(version: str) -> Reply:
    return Reply(200, {"resourceType": "CapabilityStatement", "fhirVersion": version, "status": "active"})


def test_capabilities_are_cached_and_r4_accepted(server: FaultServer) -> None:
    server.on("GET", "/fhir/metadata", capability("4.0.1"))
    client = FhirClient(server.url)
    assert client.check_server()["fhirVersion"] == "4.0.1"
    client.capabilities()
    assert client.request_count == 1
    client.capabilities(refresh=True)
    assert client.request_count == 2


def test_r5_server_is_rejected(server: FaultServer) -> None:
    server.on("GET", "/fhir/metadata", capability("5.0.0"))
    with pytest.raises(UnsupportedServerError) as caught:
        FhirClient(server.url).check_server()
    assert "fhirVersion 5.0.0" in str(caught.value) and "4.0.1" in str(caught.value)


def test_metadata_that_is_not_a_capability_statement(server: FaultServer) -> None:
    server.on("GET", "/fhir/metadata", Reply(200, {"resourceType": "Bundle"}))
    with pytest.raises(UnsupportedServerError, match="CapabilityStatement"):
        FhirClient(server.url).check_server()


def test_read_vread_and_default_headers(server: FaultServer) -> None:
    server.on("GET", "/fhir/Procedure/p1", Reply(200, {"resourceType": "Procedure", "id": "p1"}))
    server.on("GET", "/fhir/Procedure/p1/_history/3", Reply(200, {"resourceType": "Procedure", "id": "p1"}))
    client = FhirClient(server.url + "/", user_agent="bench/1")
    assert client.read("Procedure", "p1")["id"] == "p1"
    assert client.vread("Procedure", "p1", 3)["id"] == "p1"
    first = server.seen()[0]
    assert first.headers["Accept"] == FHIR_JSON
    assert first.headers["User-Agent"] == "bench/1"
    assert "Authorization" not in first.headers


def test_create_sends_fhir_json(server: FaultServer) -> None:
    server.on("POST", "/fhir/ChargeItem", Reply(201, {"resourceType": "ChargeItem", "id": "c1"}))
    created = FhirClient(server.url).create({"resourceType": "ChargeItem", "status": "billable", "note": "é"})
    assert created["id"] == "c1"
    seen = server.seen()[0]
    assert seen.headers["Content-Type"] == f"{FHIR_JSON}; charset=utf-8"
    assert seen.headers["Prefer"] == "return=representation"
    assert seen.json() == {"resourceType": "ChargeItem", "status": "billable", "note": "é"}
    assert "If-None-Exist" not in seen.headers


def test_update_with_if_match_and_stale_version(server: FaultServer) -> None:
    server.on(
        "PUT",
        "/fhir/ChargeItem/c1",
        Reply(200, {"resourceType": "ChargeItem", "id": "c1", "meta": {"versionId": "3"}}),
        Reply(409, outcome("HAPI-0989: Trying to update ChargeItem/c1/_history/2 but this is not the current version")),
    )
    client = FhirClient(server.url)
    resource = {"resourceType": "ChargeItem", "id": "c1"}
    assert client.update(resource, if_match=2)["meta"]["versionId"] == "3"
    with pytest.raises(FhirConflict, match="HAPI-0989"):
        client.update(resource, if_match='W/"2"')
    assert [s.headers["If-Match"] for s in server.seen()] == ['W/"2"', 'W/"2"']
    assert "If-Match" not in server.seen()[0].headers.get("Prefer", "")


def test_update_needs_an_id() -> None:
    with pytest.raises(ValueError):
        FhirClient("http://127.0.0.1:9/fhir").update({"resourceType": "ChargeItem"})


def test_conditional_update_puts_to_type_with_query(server: FaultServer) -> None:
    server.on("PUT", "/fhir/ChargeItem", Reply(201, {"resourceType": "ChargeItem", "id": "new"}))
    client = FhirClient(server.url)
    item = {"resourceType": "ChargeItem", "identifier": [{"system": "urn:x", "value": "1"}]}
    assert client.conditional_update("ChargeItem", {"identifier": "urn:x|1"}, item)["id"] == "new"
    assert server.seen()[0].target == "/fhir/ChargeItem?identifier=urn%3Ax%7C1"
    client.conditional_update("ChargeItem", "identifier=urn:x|2", item)
    assert server.seen()[1].query == {"identifier": ["urn:x|2"]}
    with pytest.raises(ValueError):
        client.conditional_update("Claim", "identifier=a", item)


def test_delete_returns_outcome_or_empty(server: FaultServer) -> None:
    informational = outcome("Successfully deleted 1 resource(s)", "informational", "information")
    server.on("DELETE", "/fhir/ChargeItem/c1", Reply(200, informational), Reply(204))
    client = FhirClient(server.url)
    assert client.delete("ChargeItem", "c1")["resourceType"] == "OperationOutcome"
    assert client.delete("ChargeItem", "c1", if_match=4) == {}
    assert server.seen()[1].headers["If-Match"] == 'W/"4"'


def test_validate_returns_outcome_even_on_failure(server: FaultServer) -> None:
    failed = outcome("ChargeItem.status: minimum required = 1, but only found 0")
    server.on(
        "POST",
        "/fhir/ChargeItem/$validate",
        Reply(200, outcome("ok", "informational", "information")),
        Reply(412, failed),
        Reply(422, failed),
    )
    client = FhirClient(server.url)
    item = {"resourceType": "ChargeItem"}
    assert client.validate(item)["issue"][0]["severity"] == "information"
    assert client.validate(item, profile="http://example.org/p")["issue"][0]["severity"] == "error"
    assert client.validate(item)["issue"][0]["diagnostics"].startswith("ChargeItem.status")
    assert server.seen()[1].query == {"profile": ["http://example.org/p"]}


def test_validate_raises_for_non_validation_failures(server: FaultServer) -> None:
    server.on("POST", "/fhir/Foo/$validate", Reply(404, outcome('HAPI-1684: Unknown resource name "Foo"')))
    with pytest.raises(FhirNotFound):
        FhirClient(server.url).validate({"resourceType": "Foo"})


def test_operation_post_and_get(server: FaultServer) -> None:
    params = {"resourceType": "Parameters", "parameter": [{"name": "meta"}]}
    server.on("POST", "/fhir/ChargeItem/c1/$meta-add", Reply(200, params))
    server.on("GET", "/fhir/$meta", Reply(200, params))
    client = FhirClient(server.url)
    assert client.operation("ChargeItem/c1/$meta-add", params)["resourceType"] == "Parameters"
    assert server.seen()[0].json() == params
    client.operation("$meta", method="GET", params={"_format": "json"})
    assert server.seen()[1].query == {"_format": ["json"]}
    for bad in ("ChargeItem", "../$x", "http://evil/$x", "$x?y=1"):
        with pytest.raises(ValueError):
            client.operation(bad)


def test_invalid_json_success_body_is_an_error(server: FaultServer) -> None:
    server.on("GET", "/fhir/Patient/1", Reply(200, "not json", content_type="text/plain"))
    with pytest.raises(Exception, match="not a JSON object"):
        FhirClient(server.url).read("Patient", "1")


def test_base_url_validation() -> None:
    for bad in ("ftp://x/fhir", "127.0.0.1/fhir", "http://u:p@h/fhir", "http://h/fhir?x=1"):
        with pytest.raises(ValueError):
            FhirClient(bad)


def test_pool_size_and_context_manager() -> None:
    with FhirClient("http://127.0.0.1:9/fhir", pool_size=7) as client:
        adapter = client.session.get_adapter("http://127.0.0.1:9/fhir")
        assert adapter._pool_maxsize == 7  # type: ignore[attr-defined]
        assert adapter.max_retries.total == 0  # type: ignore[attr-defined]
