"""Continuous operation against a real HAPI server and a real receiver process (`charge-adapter serve`):
polling with a durable cursor, Subscription delivery, duplicate notifications, a kill in the middle of a
backlog, reconciliation after edits, review and replay, and bad requests to the receiver.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from adapter.client import FhirClient
from adapter.errors import FhirError
from adapter.pipeline import process
from adapter.sources.files import SourcedResource
from adapter.state.sqlite import SqliteState

from .adapter_process import TABLES, TOKEN, Adapter, billed, charges, expected_identifiers
from .helpers import namespaced, patients_of, resources_of, server_now, wait_for

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from generate import generate, put_all  # noqa: E402

StateStore = SqliteState


@pytest.fixture
def adapter(tmp_path: Path, hapi_url: str) -> Iterator[Adapter]:
    runner = Adapter(tmp_path, hapi_url)
    yield runner
    runner.stop_all()


def test_run_polls_from_its_cursor_and_is_idempotent(client: FhirClient, adapter: Adapter, fhir_ns: str) -> None:
    adapter.start_cursor_at(server_now(client))
    bundle = namespaced("13", fhir_ns)  # three modalities: 10009, 10005-59, 10011-59
    client.transaction(bundle)
    patients = patients_of(resources_of(bundle))
    first = adapter.cmd("run", "--once")
    assert first.returncode == 0, first.stderr
    assert billed(client, patients) == [("10005-59", 1), ("10009", 1), ("10011-59", 1)]
    versions = {c["id"]: c["meta"]["versionId"] for c in charges(client, patients)}
    again = adapter.cmd("run", "--once")
    assert again.returncode == 0 and "written 0" in again.stderr, again.stderr
    assert {c["id"]: c["meta"]["versionId"] for c in charges(client, patients)} == versions
    status = adapter.cmd("status").stdout
    assert re.search(r"cursor:\s+20\d\d-", status) and "review:    0 open" in status


def test_review_then_fix_then_replay_bills_once(client: FhirClient, adapter: Adapter, fhir_ns: str) -> None:
    adapter.start_cursor_at(server_now(client))
    bundle = namespaced("31", fhir_ns)  # no guidance evidence: modality-missing
    client.transaction(bundle)
    patients = patients_of(resources_of(bundle))
    assert adapter.cmd("run", "--once").returncode == 1
    listing = adapter.cmd("review", "list").stdout
    assert "modality-missing" in listing and f"{fhir_ns}-s31-fna-1" in listing
    review_id = re.search(r"^(\d+)\s", listing.splitlines()[2]).group(1)  # type: ignore[union-attr]
    assert "no guidance evidence" in adapter.cmd("review", "show", review_id).stdout
    assert billed(client, patients) == []

    # the analyst gets the source system fixed: the Procedure now says ultrasound guidance
    proc = next(r for r in resources_of(bundle) if r["resourceType"] == "Procedure")
    proc.setdefault("extension", []).append({
        "url": "http://hl7.org/fhir/StructureDefinition/procedure-method",
        "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "61593002"}]}})
    client.update(proc)
    replay = adapter.cmd("review", "replay", review_id)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert billed(client, patients) == [("10005", 1)]
    assert adapter.cmd("review", "replay", "--all").returncode == 0  # nothing open, nothing changes
    assert len(charges(client, patients)) == 1
    assert "Nothing needs review" in adapter.cmd("review", "list").stdout





@pytest.fixture
def serving(client: FhirClient, tmp_path: Path, hapi_url: str) -> Iterator[Adapter]:
    runner = Adapter(tmp_path, hapi_url, serve={"subscription_id": f"cas-{uuid.uuid4().hex[:8]}"})
    runner.start_cursor_at(server_now(client))
    runner.start("serve")
    runner.wait_healthy()
    yield runner
    runner.stop_all()
    with contextlib.suppress(FhirError):  # cleanup only
        client.delete("Subscription", json.loads(runner.config.read_text())["serve"]["subscription_id"])


def test_subscription_delivers_to_serve_and_charges_appear(client: FhirClient, serving: Adapter,
                                                          fhir_ns: str) -> None:
    subscribed = serving.cmd("subscribe")
    assert subscribed.returncode == 0, subscribed.stderr
    assert "is active" in subscribed.stdout
    bundle = namespaced("11", fhir_ns)  # 10005, 10006, 10007-59
    client.transaction(bundle)
    patients = patients_of(resources_of(bundle))
    wait_for(lambda: billed(client, patients) == [("10005", 1), ("10006", 1), ("10007-59", 1)], 180,
             "ChargeItems written from the notifications")
    metrics = requests.get(f"{serving.url}/metrics", timeout=5).text
    assert re.search(r'charge_adapter_received_total\{kind="rest-hook-update"\} [1-9]', metrics), metrics

    # a Procedure edited after it was billed is reconciled through the next notification
    fluoro = next(r for r in resources_of(bundle) if r["id"] == f"{fhir_ns}-s11-fna-2")
    fluoro["status"] = "entered-in-error"
    client.update(fluoro)
    wait_for(lambda: billed(client, patients) == [("10005", 1), ("10006", 1)], 180, "the voided add-on modality")


def test_a_second_instance_on_the_same_state_file_is_refused(serving: Adapter) -> None:
    second = serving.cmd("run", "--once")
    assert second.returncode == 2 and "another charge-adapter run/serve is using" in second.stderr


def test_the_same_notification_twice_writes_once(client: FhirClient, serving: Adapter, fhir_ns: str) -> None:
    bundle = namespaced("01", fhir_ns)
    client.transaction(bundle)
    proc = client.read("Procedure", f"{fhir_ns}-s01-fna-1")
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
    url = f"{serving.url}/notify/Procedure/{proc['id']}"
    for _ in range(2):
        assert requests.put(url, data=json.dumps(proc), headers=headers, timeout=10).status_code == 200
    patients = patients_of(resources_of(bundle))
    wait_for(lambda: billed(client, patients) == [("10005", 1)], 60, "the charge")
    wait_for(lambda: StateStore(serving.state).queue_depth() == 0, 60, "the queue to drain")
    [item] = charges(client, patients)
    assert item["meta"]["versionId"] == "1"
    written = [a for a in StateStore(serving.state).audit_for(f"Procedure/{proc['id']}") if a.written]
    assert len(written) == 1


@pytest.mark.parametrize(("headers", "body", "path", "status"), [
    ({}, b"{}", "/notify/Procedure/x", 401),
    ({"Authorization": "Bearer wrong"}, b"{}", "/notify/Procedure/x", 401),
    ({"Authorization": f"Bearer {TOKEN}"}, b"not json", "/notify/Procedure/x", 400),
    ({"Authorization": f"Bearer {TOKEN}"}, b'{"resourceType": "Patient", "id": "x"}', "/notify/Procedure/x", 422),
    ({"Authorization": f"Bearer {TOKEN}"}, b'{"resourceType": "Procedure", "id": "x", "note": [{"text": "'
     + b"a" * (6 * 1024 * 1024) + b'"}]}', "/notify/Procedure/x", 413),
])
def test_bad_requests_get_the_right_4xx_and_change_nothing(serving: Adapter, headers: dict[str, str], body: bytes,
                                                           path: str, status: int) -> None:
    before = StateStore(serving.state).queue_counts()
    answer = requests.put(f"{serving.url}{path}", data=body, timeout=30,
                          headers={"Content-Type": "application/fhir+json", **headers})
    assert answer.status_code == status
    assert answer.json()["resourceType"] == "OperationOutcome"
    assert StateStore(serving.state).queue_counts() == before





def test_a_deleted_procedure_is_seen_in_the_history(client: FhirClient, tmp_path: Path, hapi_url: str,
                                                    fhir_ns: str) -> None:
    # without review Tasks: a Task's focus, like a billed ChargeItem, makes HAPI refuse the delete (409)
    adapter = Adapter(tmp_path, hapi_url, worklist={"tasks": False})
    adapter.start_cursor_at(server_now(client))
    bundle = namespaced("31", fhir_ns)  # nothing billed, so HAPI lets the Procedure be deleted
    client.transaction(bundle)
    assert adapter.cmd("run", "--once").returncode == 1
    client.delete("Procedure", f"{fhir_ns}-s31-fna-1")
    assert adapter.cmd("run", "--once").returncode in (0, 1)
    assert StateStore(adapter.state).seen(f"Procedure/{fhir_ns}-s31-fna-1", "deleted")
    assert "Nothing needs review" in adapter.cmd("review", "list").stdout


def notify(serving: Adapter, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{serving.url}/notify", data=json.dumps(body), timeout=10,
                         headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"})


def test_an_engine_bundle_push_is_coded(client: FhirClient, serving: Adapter, fhir_ns: str) -> None:
    bundle = namespaced("02", fhir_ns)  # three ultrasound lesions: 10005 + 10006 x2
    client.transaction(bundle)  # the engine also fed the FHIR server, which must hold what is billed
    pushed = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": r} for r in resources_of(bundle)]}
    assert notify(serving, pushed).status_code == 200
    wait_for(lambda: billed(client, patients_of(bundle)) == [("10005", 1), ("10006", 2)], 60, "the pushed charges")


def test_an_engine_bundle_with_urn_uuid_references_is_coded(client: FhirClient, serving: Adapter,
                                                            fhir_ns: str) -> None:
    """Engines write references between the entries of a pushed Bundle as urn:uuid fullUrls."""
    bundle = namespaced("13", fhir_ns)  # three modalities in one session
    client.transaction(bundle)
    resources = resources_of(bundle)
    urn = {f"{r['resourceType']}/{r['id']}": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, fhir_ns + r['id'])}"
           for r in resources}
    text = json.dumps(resources)
    for ref, full_url in urn.items():
        text = text.replace(f'"reference": "{ref}"', f'"reference": "{full_url}"')
    rewritten = json.loads(text)
    assert "urn:uuid:" in json.dumps([r.get("subject") for r in rewritten if r["resourceType"] == "Procedure"])
    pushed = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"fullUrl": urn[f"{r['resourceType']}/{r['id']}"], "resource": r} for r in rewritten]}
    offline = process([SourcedResource(r, "fixture") for r in resources], TABLES)
    expected = sorted((line.label, line.units) for line in offline.coding.lines)
    assert len(expected) == 3  # 10005, 10007-59, 10009-59 (three modalities)
    assert notify(serving, pushed).status_code == 200
    wait_for(lambda: billed(client, patients_of(bundle)) == expected, 60, "the charges pushed with urn:uuid references")


def test_topic_notifications_id_only_and_empty(client: FhirClient, serving: Adapter, fhir_ns: str) -> None:
    """R4 backport notifications (Parameters status): an id-only event is read from the server; an empty
    event and a gap in event numbers make the receiver poll."""
    subscription = f"Subscription/topic-{fhir_ns}"

    def backport(kind: str, since: int, events: list[tuple[int, str | None]],
                 entries: list[dict[str, Any]]) -> dict[str, Any]:
        params: list[dict[str, Any]] = [
            {"name": "subscription", "valueReference": {"reference": subscription}},
            {"name": "topic", "valueCanonical": "http://example.org/topic/fna-procedure"},
            {"name": "status", "valueCode": "active"}, {"name": "type", "valueCode": kind},
            {"name": "events-since-subscription-start", "valueString": str(since)}]
        for number, focus in events:
            part: list[dict[str, Any]] = [{"name": "event-number", "valueString": str(number)}]
            if focus:
                part.append({"name": "focus", "valueReference": {"reference": focus}})
            params.append({"name": "notification-event", "part": part})
        return {"resourceType": "Bundle", "type": "history", "entry": [
            {"fullUrl": "urn:uuid:6e4b1a5c-0c7e-4d59-9d6a-1f2a3b4c5d6e",
             "resource": {"resourceType": "Parameters", "parameter": params},
             "request": {"method": "GET", "url": f"{subscription}/$status"}, "response": {"status": "200"}},
            *entries]}

    assert notify(serving, backport("handshake", 0, [], [])).status_code == 200
    one = namespaced("07", fhir_ns)  # CT: 10009
    client.transaction(one)
    proc = f"Procedure/{fhir_ns}-s07-fna-1"
    id_only = [{"fullUrl": f"{client.base_url}/{proc}", "request": {"method": "PUT", "url": proc},
                "response": {"status": "200"}}]
    assert notify(serving, backport("event-notification", 1, [(1, proc)], id_only)).status_code == 200
    wait_for(lambda: billed(client, patients_of(one)) == [("10009", 1)], 60, "the id-only event's charge")

    # an empty event (no focus, no entries) only says "something changed": the receiver polls for it
    two = namespaced("09", fhir_ns)  # MR: 10011
    client.transaction(two)
    assert notify(serving, backport("event-notification", 2, [(2, None)], [])).status_code == 200
    wait_for(lambda: billed(client, patients_of(two)) == [("10011", 1)], 60, "the charge found by polling")
    assert StateStore(serving.state).last_event_number(subscription) == 2


def run_on_a_backlog(client: FhirClient, adapter: Adapter, prefix: str,
                     procedures: int) -> tuple[subprocess.Popen[str], list[dict[str, Any]], list[str]]:
    """Load a generated backlog, start `run` on it, and return once it has coded the first pages."""
    resources = list(generate(procedures, prefix=prefix))
    adapter.start_cursor_at(server_now(client))
    put_all(client, resources)
    proc = adapter.start("run")
    wait_for(lambda: StateStore(adapter.state).counts()["processed"] >= 20, 120, "the first Procedures coded", 0.1)
    return proc, resources, patients_of(resources)


@pytest.mark.bulk
def test_killed_in_the_middle_of_a_backlog_ends_with_exactly_the_expected_charges(
        client: FhirClient, adapter: Adapter, fhir_ns: str) -> None:
    proc, resources, patients = run_on_a_backlog(client, adapter, f"{fhir_ns}k", 300)
    proc.kill()  # SIGKILL: no clean shutdown
    proc.wait(30)
    partial = len(charges(client, patients))
    expected = expected_identifiers(resources)
    assert 0 < partial < sum(expected.values()), "the kill should land in the middle of the backlog"
    resumed = adapter.cmd("run", "--once")
    assert resumed.returncode == 0, resumed.stderr
    on_server = Counter(c["identifier"][0]["value"] for c in charges(client, patients))
    assert on_server == expected  # none missing, none twice


@pytest.mark.bulk
def test_sigterm_stops_after_the_current_session_and_a_restart_finishes(
        client: FhirClient, adapter: Adapter, fhir_ns: str) -> None:
    proc, resources, patients = run_on_a_backlog(client, adapter, f"{fhir_ns}t", 300)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0  # a clean stop, well before the backlog is done
    log = (adapter.tmp / "adapter-0.log").read_text()
    assert "SIGTERM: stopping after the current work" in log
    assert adapter.cmd("run", "--once").returncode == 0
    assert Counter(c["identifier"][0]["value"] for c in charges(client, patients)) == expected_identifiers(resources)
