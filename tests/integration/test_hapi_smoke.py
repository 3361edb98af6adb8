"""Smoke tests proving that the HAPI FHIR test server is a real JPA server with the settings we rely on."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

TEST_SYSTEM = "urn:fhir-charge-adapter:test"
HTTP_TIMEOUT = 30


def _procedure(ns: str, proc_id: str, *, with_body_structure: bool = True) -> dict:
    procedure: dict = {
        "resourceType": "Procedure",
        "id": proc_id,
        "identifier": [{"system": TEST_SYSTEM, "value": ns}],
        "status": "completed",
        "code": {"text": "Fine needle aspiration biopsy"},
        "subject": {"reference": f"Patient/{ns}-pat"},
    }
    if with_body_structure:
        procedure["encounter"] = {"reference": f"Encounter/{ns}-enc"}
        procedure["performer"] = [{"actor": {"reference": f"Practitioner/{ns}-prac"}}]
        procedure["performedDateTime"] = "2026-01-15T10:30:00Z"
        procedure["extension"] = [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/procedure-targetBodyStructure",
                "valueReference": {"reference": f"BodyStructure/{ns}-bs"},
            }
        ]
    return procedure


def _put_entry(resource: dict) -> dict:
    return {
        "fullUrl": f"{resource['resourceType']}/{resource['id']}",
        "resource": resource,
        "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
    }


def _put(session: requests.Session, base: str, resource: dict) -> requests.Response:
    url = f"{base}/{resource['resourceType']}/{resource['id']}"
    resp = session.put(url, data=json.dumps(resource), timeout=HTTP_TIMEOUT)
    assert resp.status_code in (200, 201), resp.text
    return resp


def test_transaction_with_client_ids_and_read_back(hapi_url: str, fhir_session: requests.Session, fhir_ns: str) -> None:
    ns = fhir_ns
    resources = [
        {"resourceType": "Patient", "id": f"{ns}-pat", "name": [{"family": "Smoke", "given": [ns]}]},
        {"resourceType": "Practitioner", "id": f"{ns}-prac", "name": [{"family": "Cytopath"}]},
        {
            "resourceType": "Encounter",
            "id": f"{ns}-enc",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": f"Patient/{ns}-pat"},
        },
        {
            "resourceType": "BodyStructure",
            "id": f"{ns}-bs",
            "location": {"text": "Thyroid gland"},
            "patient": {"reference": f"Patient/{ns}-pat"},
        },
        _procedure(ns, f"{ns}-proc"),
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [_put_entry(r) for r in resources]}

    resp = fhir_session.post(hapi_url, data=json.dumps(bundle), timeout=HTTP_TIMEOUT)
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["resourceType"] == "Bundle"
    assert result["type"] == "transaction-response"
    assert len(result["entry"]) == len(resources)
    for sent, entry in zip(resources, result["entry"], strict=True):
        assert entry["response"]["status"].startswith("201"), entry
        assert entry["response"]["location"].startswith(f"{sent['resourceType']}/{sent['id']}/_history/1")

    read = fhir_session.get(f"{hapi_url}/Procedure/{ns}-proc", timeout=HTTP_TIMEOUT)
    assert read.status_code == 200, read.text
    procedure = read.json()
    assert procedure["id"] == f"{ns}-proc"
    assert procedure["meta"]["versionId"] == "1"
    assert procedure["subject"]["reference"] == f"Patient/{ns}-pat"
    assert procedure["encounter"]["reference"] == f"Encounter/{ns}-enc"
    assert procedure["identifier"] == [{"system": TEST_SYSTEM, "value": ns}]
    assert read.headers.get("ETag") == 'W/"1"'

    found = fhir_session.get(
        f"{hapi_url}/Procedure",
        params={"subject": f"Patient/{ns}-pat", "_total": "accurate"},
        timeout=HTTP_TIMEOUT,
    )
    assert found.status_code == 200, found.text
    assert found.json()["total"] == 1


@dataclass
class _Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class _Receiver:
    server: ThreadingHTTPServer
    requests: list[_Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def snapshot(self) -> list[_Received]:
        with self.lock:
            return list(self.requests)


@pytest.fixture
def hook_receiver() -> Iterator[_Receiver]:
    """Real HTTP receiver for rest-hook notifications, on 127.0.0.1 and a free port."""
    receiver: _Receiver

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with receiver.lock:
                receiver.requests.append(
                    _Received(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_PUT = do_POST = do_DELETE = _record

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver = _Receiver(server)
    thread = threading.Thread(target=server.serve_forever, name="hook-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _wait_for(predicate, timeout_s: float, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


def test_rest_hook_subscription_delivers_to_real_receiver(
    hapi_url: str, fhir_session: requests.Session, fhir_ns: str, hook_receiver: _Receiver
) -> None:
    ns = fhir_ns
    token = uuid.uuid4().hex
    _put(fhir_session, hapi_url, {"resourceType": "Patient", "id": f"{ns}-pat"})

    subscription = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": f"smoke test {ns}",
        "criteria": f"Procedure?identifier={TEST_SYSTEM}|{ns}",
        "channel": {
            "type": "rest-hook",
            "endpoint": f"{hook_receiver.base_url}/hook",
            "payload": "application/fhir+json",
            "header": [f"Authorization: Bearer {token}"],
        },
    }
    created = fhir_session.post(f"{hapi_url}/Subscription", data=json.dumps(subscription), timeout=HTTP_TIMEOUT)
    assert created.status_code == 201, created.text
    sub_id = created.json()["id"]
    try:

        def status() -> str | None:
            resp = fhir_session.get(f"{hapi_url}/Subscription/{sub_id}", timeout=HTTP_TIMEOUT)
            current = resp.json().get("status")
            return current if current == "active" else None

        assert _wait_for(status, timeout_s=60) == "active", "Subscription did not become active within 60 s"

        proc_id = f"{ns}-proc"
        _put(fhir_session, hapi_url, _procedure(ns, proc_id, with_body_structure=False))

        expected_path = f"/hook/Procedure/{proc_id}"

        def delivered() -> list[_Received]:
            return [r for r in hook_receiver.snapshot() if r.path == expected_path]

        hits = _wait_for(delivered, timeout_s=120)  # HAPI under load (a long-lived dev server) can lag
        assert hits, f"no notification within 120 s; receiver saw {hook_receiver.snapshot()}"
        time.sleep(2)  # a duplicate delivery would show up here
        hits = delivered()
        assert len(hits) == 1, hits
        hit = hits[0]
        assert hit.method == "PUT"
        assert hit.headers.get("authorization") == f"Bearer {token}"
        assert hit.headers.get("content-type", "").startswith("application/fhir+json")
        body = json.loads(hit.body)
        assert body["resourceType"] == "Procedure"
        assert body["id"].split("/_history")[0].endswith(proc_id)
        assert body["identifier"] == [{"system": TEST_SYSTEM, "value": ns}]
    finally:
        deleted = fhir_session.delete(f"{hapi_url}/Subscription/{sub_id}", timeout=HTTP_TIMEOUT)
        assert deleted.status_code in (200, 204), deleted.text


def test_reference_to_missing_procedure_is_rejected(
    hapi_url: str, fhir_session: requests.Session, fhir_ns: str
) -> None:
    ns = fhir_ns
    _put(fhir_session, hapi_url, {"resourceType": "Patient", "id": f"{ns}-pat"})
    charge_item = {
        "resourceType": "ChargeItem",
        "identifier": [{"system": TEST_SYSTEM, "value": ns}],
        "status": "billable",
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "10005"}]},
        "subject": {"reference": f"Patient/{ns}-pat"},
        "service": [{"reference": f"Procedure/{ns}-missing"}],
    }
    resp = fhir_session.post(f"{hapi_url}/ChargeItem", data=json.dumps(charge_item), timeout=HTTP_TIMEOUT)
    assert resp.status_code == 400, resp.text
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome"
    diagnostics = " ".join(issue.get("diagnostics", "") for issue in outcome["issue"])
    assert "HAPI-1094" in diagnostics
    assert f"Procedure/{ns}-missing" in diagnostics
