"""Non-2xx answers map to typed errors carrying the status and the OperationOutcome text."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from adapter.client import (
    FhirBadRequest,
    FhirClient,
    FhirConflict,
    FhirError,
    FhirGone,
    FhirHttpError,
    FhirNotFound,
    FhirRateLimited,
    FhirServerError,
    FhirTransportError,
    FhirUnauthorized,
    FhirUnprocessable,
    RetryPolicy,
)
from adapter.errors import AdapterError

from .fault_server import FaultServer, Reply, outcome


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


def no_sleep(_seconds: float) -> None:
    pass


@pytest.mark.parametrize(
    ("status", "error", "text"),
    [
        (400, FhirBadRequest, "HAPI-1094: Resource Procedure/x not found, specified in path: ChargeItem.service"),
        (401, FhirUnauthorized, "HAPI-0333: Unauthorized"),
        (403, FhirUnauthorized, "HAPI-0334: Access denied"),
        (404, FhirNotFound, "HAPI-2001: Resource Patient/xyz is not known"),
        (409, FhirConflict, "HAPI-0989: Trying to update Patient/1/_history/1 but this is not the current version"),
        (410, FhirGone, "HAPI-0984: Resource was deleted"),
        (412, FhirConflict, "HAPI-0988: Failed to UPDATE resource with match URL because it matched 2 resources"),
        (422, FhirUnprocessable, "HAPI-0931: Invalid reference found at path 'ChargeItem.subject'"),
        (429, FhirRateLimited, "slow down"),
        (500, FhirServerError, "HAPI-0389: internal error"),
        (503, FhirServerError, "maintenance"),
    ],
)
def test_status_maps_to_typed_error(server: FaultServer, status: int, error: type[FhirHttpError], text: str) -> None:
    server.on("GET", "/fhir/Patient/xyz", Reply(status, outcome(text)))
    client = FhirClient(server.url, retry=RetryPolicy(attempts=2, sleep=no_sleep))
    with pytest.raises(error) as caught:
        client.read("Patient", "xyz")
    exc = caught.value
    assert isinstance(exc, FhirError) and isinstance(exc, AdapterError)
    assert exc.status == status
    assert exc.method == "GET"
    assert exc.outcome is not None and exc.outcome["resourceType"] == "OperationOutcome"
    assert exc.outcome_text == text
    host_port = server.url.split("//", 1)[1].split("/", 1)[0]
    assert str(exc) == f"HTTP {status} GET {host_port}/fhir/Patient/xyz: {text}"  # the server is named


def test_message_has_path_but_not_query(server: FaultServer) -> None:
    server.on("GET", "/fhir/Patient", Reply(400, outcome('HAPI-0524: Unknown search parameter "foo"')))
    client = FhirClient(server.url)
    with pytest.raises(FhirBadRequest) as caught:
        list(client.search("Patient", {"identifier": "urn:mrn|123456", "foo": "bar"}))
    assert "/fhir/Patient" in str(caught.value)
    assert "123456" not in str(caught.value) and "123456" not in caught.value.url
    assert 'Unknown search parameter "foo"' in str(caught.value)


def test_details_text_used_when_no_diagnostics(server: FaultServer) -> None:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "invalid", "details": {"text": "bad status"}},
            {"severity": "warning", "code": "informational", "diagnostics": "also this"},
        ],
    }
    server.on("POST", "/fhir/ChargeItem", Reply(422, body))
    with pytest.raises(FhirUnprocessable) as caught:
        FhirClient(server.url).create({"resourceType": "ChargeItem"})
    assert caught.value.outcome_text == "bad status; warning: also this"


def test_non_fhir_error_body_falls_back_to_reason(server: FaultServer) -> None:
    server.on("GET", "/fhir/Patient/1", Reply(502, "<html>Bad Gateway</html>", content_type="text/html"))
    client = FhirClient(server.url, retry=RetryPolicy.none())
    with pytest.raises(FhirServerError) as caught:
        client.read("Patient", "1")
    assert caught.value.outcome is None
    assert caught.value.outcome_text == "Bad Gateway"
    assert "<html>" not in str(caught.value)


def test_other_status_is_plain_http_error(server: FaultServer) -> None:
    server.on("GET", "/fhir/Patient/1", Reply(405, outcome("HAPI-0460: method not allowed")))
    with pytest.raises(FhirHttpError) as caught:
        FhirClient(server.url).read("Patient", "1")
    assert type(caught.value) is FhirHttpError and caught.value.status == 405


def test_redirects_are_not_followed(server: FaultServer) -> None:
    server.on("GET", "/fhir/Patient/1", Reply(302, headers={"Location": "http://example.invalid/fhir/Patient/1"}))
    client = FhirClient(server.url)
    with pytest.raises(FhirHttpError) as caught:
        client.read("Patient", "1")
    assert caught.value.status == 302
    assert client.request_count == 1


def test_transport_error_message_has_no_query() -> None:
    client = FhirClient("http://127.0.0.1:9/fhir", retry=RetryPolicy.none(), timeout=(1.0, 1.0))
    with pytest.raises(FhirTransportError) as caught:
        list(client.search("Patient", {"identifier": "secret-mrn-42"}))
    assert "secret-mrn-42" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.original is not None
    assert str(caught.value).startswith("GET 127.0.0.1:9/fhir/Patient: connection failed")


def test_ids_cannot_escape_the_path() -> None:
    client = FhirClient("http://127.0.0.1:9/fhir")
    for bad in ("../metadata", "a/b", "x?y=1", ""):
        with pytest.raises(ValueError):
            client.read("Patient", bad)
    with pytest.raises(ValueError):
        client.read("patient/../x", "1")
    assert client.request_count == 0
