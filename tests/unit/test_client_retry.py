"""Retry policy: what is retried, how long it waits, when it gives up."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from email.utils import formatdate

import pytest

from adapter.client import (
    FhirClient,
    FhirRateLimited,
    FhirServerError,
    FhirTransportError,
    RetryPolicy,
    is_idempotent_transaction,
    parse_retry_after,
)

from .fault_server import FaultServer, Reply, Seen, outcome

OK_PATIENT = Reply(200, {"resourceType": "Patient", "id": "1"})
BUSY = Reply(503, outcome("busy"))


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


class Sleeps(list[float]):
    """Records requested waits instead of sleeping, so the tests stay fast."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client_for(server: FaultServer, sleeps: Sleeps, **policy: float) -> FhirClient:
    return FhirClient(server.url, retry=RetryPolicy(sleep=sleeps, **policy))  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_429_retry_after_seconds_then_success(server: FaultServer) -> None:
    server.on("GET", "/fhir/Patient/1", Reply(429, outcome("too many"), {"Retry-After": "7"}), OK_PATIENT)
    sleeps = Sleeps()
    client = client_for(server, sleeps)
    assert client.read("Patient", "1")["id"] == "1"
    assert sleeps == [7.0]
    assert client.request_count == 2 and len(server.seen()) == 2


def test_429_retry_after_http_date_then_success(server: FaultServer) -> None:
    when = formatdate(time.time() + 30, usegmt=True)
    server.on("GET", "/fhir/Patient/1", Reply(429, outcome("too many"), {"Retry-After": when}), OK_PATIENT)
    sleeps = Sleeps()
    client = client_for(server, sleeps)
    client.read("Patient", "1")
    assert len(sleeps) == 1 and 27.0 <= sleeps[0] <= 30.0
    assert client.request_count == 2


def test_retry_after_is_capped(server: FaultServer) -> None:
    far = formatdate(time.time() + 86400, usegmt=True)
    server.on(
        "GET",
        "/fhir/Patient/1",
        Reply(429, headers={"Retry-After": "3600"}),
        Reply(429, headers={"Retry-After": far}),
        OK_PATIENT,
    )
    sleeps = Sleeps()
    client_for(server, sleeps, max_retry_after=12.0).read("Patient", "1")
    assert sleeps == [12.0, 12.0]


def test_persistent_429_gives_up_after_attempts(server: FaultServer) -> None:
    server.on("GET", "/fhir/Patient/1", Reply(429, outcome("quota exceeded"), {"Retry-After": "1"}))
    sleeps = Sleeps()
    client = client_for(server, sleeps, attempts=3)
    with pytest.raises(FhirRateLimited, match="quota exceeded"):
        client.read("Patient", "1")
    assert client.request_count == 3 and sleeps == [1.0, 1.0]


def test_503_then_success_uses_bounded_backoff(server: FaultServer) -> None:
    server.on("GET", "/fhir/Patient/1", BUSY, Reply(502), Reply(504), OK_PATIENT)
    sleeps = Sleeps()
    client = client_for(server, sleeps, backoff_initial=0.5, backoff_max=2.0)
    assert client.read("Patient", "1")["resourceType"] == "Patient"
    assert client.request_count == 4
    assert len(sleeps) == 3 and all(0.0 <= s <= 2.0 for s in sleeps)


def test_500_is_not_retried(server: FaultServer) -> None:
    server.on("GET", "/fhir/Patient/1", Reply(500, outcome("boom")), OK_PATIENT)
    client = client_for(server, Sleeps())
    with pytest.raises(FhirServerError):
        client.read("Patient", "1")
    assert client.request_count == 1


def test_connection_refused_raises_transport_error_after_n_attempts() -> None:
    sleeps = Sleeps()
    client = FhirClient(f"http://127.0.0.1:{free_port()}/fhir", retry=RetryPolicy(attempts=4, sleep=sleeps))
    with pytest.raises(FhirTransportError) as caught:
        client.read("Patient", "1")
    assert caught.value.attempts == 4 and client.request_count == 4 and len(sleeps) == 3
    assert "after 4 attempts" in str(caught.value)


def test_read_timeout_is_retried(server: FaultServer) -> None:
    def slow(_: Seen) -> Reply:
        time.sleep(0.3)
        return OK_PATIENT

    server.on("GET", "/fhir/Patient/1", slow, OK_PATIENT)
    client = FhirClient(server.url, timeout=(1.0, 0.1), retry=RetryPolicy(sleep=Sleeps()))
    assert client.read("Patient", "1")["id"] == "1"
    assert client.request_count == 2


def test_non_idempotent_post_is_not_retried(server: FaultServer) -> None:
    server.on("POST", "/fhir/ChargeItem", BUSY, Reply(201, {"resourceType": "ChargeItem", "id": "9"}))
    client = client_for(server, Sleeps())
    with pytest.raises(FhirServerError):
        client.create({"resourceType": "ChargeItem"})
    assert client.request_count == 1 and len(server.seen("POST")) == 1


def test_non_idempotent_post_not_retried_on_dropped_connection(server: FaultServer) -> None:
    server.on("POST", "/fhir/ChargeItem", Reply(drop=True), Reply(201, {"resourceType": "ChargeItem"}))
    client = client_for(server, Sleeps())
    with pytest.raises(FhirTransportError) as caught:
        client.create({"resourceType": "ChargeItem"})
    assert caught.value.attempts == 1 and len(server.seen("POST")) == 1


def test_conditional_create_is_retried(server: FaultServer) -> None:
    server.on("POST", "/fhir/ChargeItem", BUSY, Reply(201, {"resourceType": "ChargeItem", "id": "9"}))
    client = client_for(server, Sleeps())
    created = client.create({"resourceType": "ChargeItem"}, if_none_exist={"identifier": "urn:x|1"})
    assert created["id"] == "9" and client.request_count == 2
    assert server.seen()[0].headers["If-None-Exist"] == "identifier=urn%3Ax%7C1"


IDEMPOTENT_TX = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {"resource": {"resourceType": "ChargeItem"}, "request": {"method": "PUT", "url": "ChargeItem?identifier=a|1"}},
        {
            "resource": {"resourceType": "Procedure"},
            "request": {"method": "POST", "url": "Procedure", "ifNoneExist": "identifier=a|2"},
        },
        {"request": {"method": "DELETE", "url": "ChargeItem/old"}},
    ],
}
PLAIN_POST_TX = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [{"resource": {"resourceType": "ChargeItem"}, "request": {"method": "POST", "url": "ChargeItem"}}],
}
TX_RESPONSE = Reply(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": []})


def test_idempotent_transaction_is_retried(server: FaultServer) -> None:
    server.on("POST", "/fhir", BUSY, TX_RESPONSE)
    client = client_for(server, Sleeps())
    assert client.transaction(IDEMPOTENT_TX)["type"] == "transaction-response"
    assert client.request_count == 2
    assert server.seen()[1].json() == IDEMPOTENT_TX


def test_non_idempotent_transaction_is_not_retried(server: FaultServer) -> None:
    server.on("POST", "/fhir", BUSY, TX_RESPONSE)
    client = client_for(server, Sleeps())
    with pytest.raises(FhirServerError):
        client.transaction(PLAIN_POST_TX)
    assert client.request_count == 1


def test_caller_can_mark_post_idempotent(server: FaultServer) -> None:
    server.on("POST", "/fhir", BUSY, TX_RESPONSE)
    client = client_for(server, Sleeps())
    client.transaction(PLAIN_POST_TX, idempotent=True)
    assert client.request_count == 2


def test_search_via_post_is_retried(server: FaultServer) -> None:
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    server.on("POST", "/fhir/Procedure/_search", BUSY, Reply(200, bundle))
    client = client_for(server, Sleeps())
    assert list(client.search("Procedure", {"code": "10021"}, via_post=True)) == [bundle]
    assert client.request_count == 2
    assert server.seen()[1].form() == {"code": "10021"}


def test_max_total_time_stops_retries(server: FaultServer) -> None:
    server.on("GET", "/fhir/Patient/1", BUSY, OK_PATIENT)
    client = client_for(server, Sleeps(), max_total=0.0)
    with pytest.raises(FhirServerError):
        client.read("Patient", "1")
    assert client.request_count == 1


def test_retry_is_logged_without_query(server: FaultServer, caplog: pytest.LogCaptureFixture) -> None:
    server.on("GET", "/fhir/Patient", BUSY, Reply(200, {"resourceType": "Bundle", "type": "searchset"}))
    client = client_for(server, Sleeps())
    with caplog.at_level(logging.DEBUG, logger="adapter.client"):
        list(client.search("Patient", {"identifier": "mrn|777"}))
    retries = [r for r in caplog.records if r.levelno == logging.INFO]  # the caller reports an outage once
    assert len(retries) == 1 and "GET /fhir/Patient after HTTP 503" in retries[0].getMessage()
    assert all("777" not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("bundle", "expected"),
    [
        (IDEMPOTENT_TX, True),
        (PLAIN_POST_TX, False),
        ({"resourceType": "Bundle", "type": "transaction", "entry": []}, True),
        ({"entry": [{"request": {"method": "PATCH", "url": "ChargeItem/1"}}]}, False),
        ({"entry": [{"request": {"method": "GET", "url": "Patient?x=1"}}, {"resource": {}}]}, False),
        ({"entry": [{"request": {"method": "head", "url": "Patient/1"}}]}, True),
    ],
)
def test_is_idempotent_transaction(bundle: dict, expected: bool) -> None:
    assert is_idempotent_transaction(bundle) is expected


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(formatdate(now + 45, usegmt=True), now=now) == pytest.approx(45.0)
    assert parse_retry_after(formatdate(now - 45, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-5") is None
