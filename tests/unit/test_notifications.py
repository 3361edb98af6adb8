"""Parsing of everything a notifier can send into work items (pure functions, no store, no HTTP)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapter.sources.notifications import (
    ReceiveError,
    decode_resource,
    engine_post,
    is_topic_notification,
    parse_topic_notification,
    procedure_reference,
    rest_hook_delete,
    rest_hook_ping,
    rest_hook_put,
    subscription_of,
)
from adapter.state.base import WorkItem

SUB = "Subscription/fna-charges"
FHIR = "application/fhir+json"


def procedure(pid: str, version: str = "1") -> dict[str, Any]:
    return {"resourceType": "Procedure", "id": pid, "meta": {"versionId": version}, "status": "completed",
            "subject": {"reference": "Patient/p1"}}


# -- builders for topic-based notifications -------------------------------------------------------------------


def r4_status(kind: str, since: Any = None, events: list[tuple[Any, str | None]] = (),  # type: ignore[assignment]
              since_key: str = "valueString", number_key: str = "valueString",
              subscription: str = "http://hapi.example/fhir/Subscription/fna-charges") -> dict[str, Any]:
    """R4 backport status: a Parameters resource."""
    params: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": subscription}},
        {"name": "topic", "valueCanonical": "http://example.org/topics/fna-procedure"},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": kind},
    ]
    if since is not None:
        params.append({"name": "events-since-subscription-start", since_key: since})
    for number, focus in events:
        parts: list[dict[str, Any]] = [{"name": "event-number", number_key: number},
                                       {"name": "timestamp", "valueInstant": "2026-03-02T10:00:00Z"}]
        if focus:
            parts.append({"name": "focus", "valueReference": {"reference": focus}})
        params.append({"name": "notification-event", "part": parts})
    return {"resourceType": "Parameters", "parameter": params}


def r5_status(kind: str, since: Any = None, events: list[tuple[Any, str | None]] = (),  # type: ignore[assignment]
              subscription: str = "Subscription/fna-charges") -> dict[str, Any]:
    """R4B/R5 status: a SubscriptionStatus resource."""
    status: dict[str, Any] = {"resourceType": "SubscriptionStatus", "status": "active", "type": kind,
                              "subscription": {"reference": subscription},
                              "topic": "http://example.org/topics/fna-procedure"}
    if since is not None:
        status["eventsSinceSubscriptionStart"] = since
    if events:
        status["notificationEvent"] = [
            {"eventNumber": n, **({"focus": {"reference": f}} if f else {})} for n, f in events]
    return status


def bundle(status: dict[str, Any], *entries: dict[str, Any], bundle_type: str = "history") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": bundle_type, "timestamp": "2026-03-02T10:00:01Z",
            "entry": [{"fullUrl": "urn:uuid:6b2f0d2e-0000-4000-8000-000000000001", "resource": status}, *entries]}


def full(resource: dict[str, Any]) -> dict[str, Any]:
    return {"fullUrl": f"http://hapi.example/fhir/{resource['resourceType']}/{resource['id']}", "resource": resource,
            "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
            "response": {"status": "200"}}


def id_only(reference: str, method: str = "PUT") -> dict[str, Any]:
    return {"fullUrl": f"http://hapi.example/fhir/{reference}", "request": {"method": method, "url": reference},
            "response": {"status": "200"}}


def topic(items: list[WorkItem]) -> list[tuple[str, dict[str, Any], str]]:
    return [(i.kind, i.payload, i.source) for i in items]


def poll(reason: str) -> tuple[str, dict[str, Any], str]:
    return ("poll", {"reason": reason}, "topic")


# -- classic rest-hook ------------------------------------------------------------------------------------------


def test_rest_hook_put_is_a_procedure_item() -> None:
    proc = procedure("fna-1")
    received = rest_hook_put("fna-1", proc)
    assert received.kind == "rest-hook-update"
    # the same version sent again (to another replica, or retried) merges into the queued item
    assert received.items == [WorkItem("procedure", {"resource": proc}, "rest-hook",
                                        dedupe="procedure:Procedure/fna-1/_history/1")]
    unversioned = {k: v for k, v in proc.items() if k != "meta"}
    assert rest_hook_put("fna-1", unversioned).items[0].dedupe is None


def test_rest_hook_delete_and_ping() -> None:
    assert rest_hook_delete("fna-1").items == [WorkItem("delete", {"reference": "Procedure/fna-1"}, "rest-hook")]
    assert rest_hook_ping().items == [WorkItem("poll", {"reason": "rest-hook ping"}, "rest-hook")]


@pytest.mark.parametrize(("path_id", "body", "status", "code"), [
    ("fna-2", procedure("fna-1"), 400, "invalid"),                              # body id differs from path id
    ("fna-1", {"resourceType": "Procedure", "status": "completed"}, 400, "invalid"),  # body without id
    ("fna-1", {"resourceType": "Patient", "id": "fna-1"}, 422, "not-supported"),  # wrong type for the route
    ("bad id!", procedure("bad id!"), 400, "invalid"),                         # not a FHIR id
    ("x" * 65, procedure("x" * 65), 400, "invalid"),
])
def test_rest_hook_put_refusals(path_id: str, body: dict[str, Any], status: int, code: str) -> None:
    with pytest.raises(ReceiveError) as exc:
        rest_hook_put(path_id, body)
    assert (exc.value.status, exc.value.code) == (status, code)


def test_rest_hook_delete_refuses_invalid_id() -> None:
    with pytest.raises(ReceiveError) as exc:
        rest_hook_delete("a/b")
    assert exc.value.status == 400


# -- body decoding --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [FHIR, "application/json", "application/fhir+json; charset=UTF-8",
                                          "Application/FHIR+JSON;fhirVersion=4.0", "application/json+fhir"])
def test_json_content_types_are_accepted(content_type: str) -> None:
    assert decode_resource(b'{"resourceType":"Procedure","id":"a"}', content_type)["id"] == "a"


def test_utf8_bom_is_accepted() -> None:
    assert decode_resource(b'\xef\xbb\xbf{"resourceType":"Procedure"}', FHIR)["resourceType"] == "Procedure"


@pytest.mark.parametrize(("body", "content_type", "status", "code"), [
    (b"<Procedure/>", "application/fhir+xml", 415, "not-supported"),
    (b'{"resourceType":"Procedure"}', None, 415, "not-supported"),
    (b'{"resourceType":"Procedure"}', "text/plain", 415, "not-supported"),
    (b'{"resourceType":"Procedure"}', "application/fhir+json; charset=iso-8859-1", 415, "not-supported"),
    (b"not json at all", FHIR, 400, "structure"),
    (b'{"resourceType": "Procedure",', FHIR, 400, "structure"),
    (b'{"resourceType":"Procedure","x":NaN}', FHIR, 400, "structure"),
    (b"\xff\xfe{}", FHIR, 400, "structure"),
    (b"[" * 100000 + b"]" * 100000, FHIR, 400, "structure"),
    (b"[1, 2]", FHIR, 400, "invalid"),
    (b'"Procedure"', FHIR, 400, "invalid"),
    (b'{"id": "x"}', FHIR, 400, "invalid"),
    (b'{"resourceType": 7}', FHIR, 400, "invalid"),
])
def test_invalid_bodies(body: bytes, content_type: str | None, status: int, code: str) -> None:
    with pytest.raises(ReceiveError) as exc:
        decode_resource(body, content_type)
    assert (exc.value.status, exc.value.code) == (status, code)


def test_errors_never_echo_the_body() -> None:
    secret = b'{"resourceType":"Procedure","note":[{"text":"Jane Doe 1970-01-01"}]'  # truncated: invalid JSON
    with pytest.raises(ReceiveError) as exc:
        decode_resource(secret, FHIR)
    assert "Jane" not in exc.value.message


# -- integration engine -------------------------------------------------------------------------------------


def test_engine_procedure() -> None:
    proc = procedure("fna-9")
    received = engine_post(proc)
    assert received.kind == "engine-procedure"
    assert received.items == [WorkItem("procedure", {"resource": proc}, "engine")]


@pytest.mark.parametrize("bundle_type", ["transaction", "batch", "collection", "searchset", "message"])
def test_engine_bundle_is_one_resources_item(bundle_type: str) -> None:
    proc = procedure("fna-1")
    body_site = {"resourceType": "BodyStructure", "id": "bs1"}
    payload = {"resourceType": "Bundle", "type": bundle_type,
               "entry": [{"resource": proc}, {"request": {"method": "GET", "url": "Patient/p1"}},
                         {"resource": body_site}]}
    received = engine_post(payload)
    assert received.kind == "engine-bundle"
    assert received.items == [WorkItem("resources", {"resources": [proc, body_site]}, "engine")]


def test_engine_bundle_references_between_entries_become_type_and_id() -> None:
    """urn:uuid (and other absolute) fullUrls are resolved inside the Bundle before the entries are queued."""
    proc = dict(procedure("fna-1"), subject={"reference": "urn:uuid:0b3c"},
                extension=[{"url": "http://hl7.org/fhir/StructureDefinition/procedure-targetBodyStructure",
                            "valueReference": {"reference": "http://engine/fhir/BodyStructure/bs1/_history/2"}}],
                encounter={"reference": "urn:uuid:no-such-entry"}, performer=[{"actor": {"reference": "urn:uuid:9f1"}}])
    payload = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:fna", "resource": proc},
        {"fullUrl": "urn:uuid:0b3c", "resource": {"resourceType": "Patient", "id": "p1"}},
        {"fullUrl": "http://engine/fhir/BodyStructure/bs1", "resource": {"resourceType": "BodyStructure", "id": "bs1"}},
        {"fullUrl": "urn:uuid:9f1", "resource": {"resourceType": "Practitioner"}}]}  # a create: no id yet
    queued = engine_post(payload).items[0].payload["resources"][0]
    assert queued["subject"] == {"reference": "Patient/p1"}
    assert queued["extension"][0]["valueReference"] == {"reference": "BodyStructure/bs1"}
    assert queued["encounter"] == {"reference": "urn:uuid:no-such-entry"}  # not in the Bundle: kept as written
    assert queued["performer"][0]["actor"] == {"reference": "urn:uuid:9f1"}  # no id: the server will give one
    assert payload["entry"][0]["resource"]["subject"] == {"reference": "urn:uuid:0b3c"}  # the input is not changed


@pytest.mark.parametrize(("payload", "status", "code"), [
    ({"resourceType": "Observation", "id": "o1"}, 422, "not-supported"),
    ({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Patient"}}]},
     400, "invalid"),
    ({"resourceType": "Bundle", "type": "collection"}, 400, "invalid"),
    ({"resourceType": "Bundle", "type": "document", "entry": [{"resource": procedure("a")}]}, 422, "not-supported"),
    ({"resourceType": "Bundle", "type": "transaction-response"}, 422, "not-supported"),
    ({"resourceType": "Bundle", "entry": [{"resource": procedure("a")}]}, 422, "not-supported"),
    ({"resourceType": "Bundle", "type": "batch", "entry": {"resource": procedure("a")}}, 400, "structure"),
    ({"resourceType": "Bundle", "type": "batch", "entry": ["Procedure/a"]}, 400, "structure"),
    ({"resourceType": "Bundle", "type": "batch", "entry": [{"resource": {"id": "a"}}]}, 400, "structure"),
])
def test_engine_refusals(payload: dict[str, Any], status: int, code: str) -> None:
    with pytest.raises(ReceiveError) as exc:
        engine_post(payload)
    assert (exc.value.status, exc.value.code) == (status, code)


# -- topic-based: R4 backport (Parameters) ------------------------------------------------------------------


def test_notification_bundles_are_recognised() -> None:
    assert is_topic_notification(bundle(r4_status("heartbeat")))
    assert is_topic_notification(bundle(r5_status("heartbeat"), bundle_type="subscription-notification"))
    assert not is_topic_notification({"resourceType": "Bundle", "type": "transaction"})
    assert not is_topic_notification(procedure("a"))


def test_subscription_key_is_normalised() -> None:
    assert subscription_of(bundle(r4_status("heartbeat"))) == SUB
    versioned = r4_status("heartbeat", subscription="Subscription/fna-charges/_history/3")
    assert subscription_of(bundle(versioned)) == SUB
    assert subscription_of(bundle(r5_status("heartbeat", subscription="urn:uuid:1234"))) == "urn:uuid:1234"


def test_r4_handshake_is_acknowledged_without_work() -> None:
    result = parse_topic_notification(bundle(r4_status("handshake", "0")), None)
    assert (result.items, result.highest_event_number, result.subscription, result.type) == ([], 0, SUB, "handshake")


def test_r4_heartbeat_without_gap() -> None:
    result = parse_topic_notification(bundle(r4_status("heartbeat", "12")), 12)
    assert result.items == []
    assert result.highest_event_number == 12


def test_r4_heartbeat_with_gap_polls() -> None:
    result = parse_topic_notification(bundle(r4_status("heartbeat", "14")), 12)
    assert topic(result.items) == [poll(f"event gap on {SUB}: heartbeat reports 14 event(s), last seen 12")]
    assert result.highest_event_number == 14


def test_r4_heartbeat_with_unknown_last_number_is_the_baseline() -> None:
    result = parse_topic_notification(bundle(r4_status("heartbeat", "14")), None)
    assert (result.items, result.highest_event_number) == ([], 14)


@pytest.mark.parametrize(("key", "value"), [("valueString", "7"), ("valueInteger", 7), ("valueUnsignedInt", 7),
                                            ("valuePositiveInt", 7), ("valueInteger64", "7")])
def test_r4_events_since_accepts_string_and_integer_variants(key: str, value: Any) -> None:
    result = parse_topic_notification(bundle(r4_status("heartbeat", value, since_key=key)), 7)
    assert (result.items, result.highest_event_number) == ([], 7)


def test_r4_full_resource_event_notification() -> None:
    p1, p2 = procedure("fna-1", "2"), procedure("fna-2")
    patient = {"resourceType": "Patient", "id": "p1"}
    note = bundle(r4_status("event-notification", "6", [("5", "Procedure/fna-1"), ("6", "Procedure/fna-2")]),
                  full(p1), full(p2), full(patient))
    result = parse_topic_notification(note, 4)
    assert topic(result.items) == [("procedure", {"resource": p1}, "topic"), ("procedure", {"resource": p2}, "topic")]
    assert (result.highest_event_number, result.type) == (6, "event-notification")


def test_r4_id_only_event_notification() -> None:
    note = bundle(r4_status("event-notification", "3", [("2", "Procedure/fna-1"), ("3", "Procedure/fna-2")]),
                  id_only("Procedure/fna-1/_history/4"), id_only("Procedure/fna-2"))
    result = parse_topic_notification(note, 1)
    assert topic(result.items) == [("fetch", {"reference": "Procedure/fna-1"}, "topic"),
                                   ("fetch", {"reference": "Procedure/fna-2"}, "topic")]
    assert result.highest_event_number == 3


def test_id_only_from_full_url_and_delete_entries() -> None:
    entries = [{"fullUrl": "http://hapi.example/fhir/Procedure/fna-7/_history/2"},
               id_only("Procedure/fna-8", method="DELETE"),
               {"fullUrl": "urn:uuid:6b2f0d2e-0000-4000-8000-000000000009"}]  # nothing to fetch
    result = parse_topic_notification(bundle(r4_status("event-notification", "2", [("1", None), ("2", None)]),
                                             *entries), 0)
    assert topic(result.items) == [("fetch", {"reference": "Procedure/fna-7"}, "topic"),
                                   ("delete", {"reference": "Procedure/fna-8"}, "topic")]


def test_id_only_with_focus_references_only() -> None:
    note = bundle(r4_status("event-notification", "9", [
        ("8", "http://hapi.example/fhir/Procedure/fna-3/_history/1"), ("9", "Procedure/fna-3")]))
    result = parse_topic_notification(note, 7)
    assert topic(result.items) == [("fetch", {"reference": "Procedure/fna-3"}, "topic")]


def test_r4_empty_event_notification_polls() -> None:
    result = parse_topic_notification(bundle(r4_status("event-notification", "5", [("5", None)])), 4)
    assert topic(result.items) == [poll(f"empty event notification from {SUB}")]
    assert result.highest_event_number == 5


def test_event_notification_gap_adds_a_poll() -> None:
    p = procedure("fna-1")
    note = bundle(r4_status("event-notification", "10", [("10", "Procedure/fna-1")]), full(p))
    result = parse_topic_notification(note, 7)
    assert topic(result.items) == [("procedure", {"resource": p}, "topic"),
                                   poll(f"event gap on {SUB}: expected event 8, got 10")]
    assert result.highest_event_number == 10


def test_no_gap_for_next_event_replays_or_unknown_last() -> None:
    note = bundle(r4_status("event-notification", "8", [("8", "Procedure/fna-1")]), id_only("Procedure/fna-1"))
    for last in (7, 8, 12, None):  # next event; the same again; an old one replayed; first ever seen
        result = parse_topic_notification(note, last)
        assert topic(result.items) == [("fetch", {"reference": "Procedure/fna-1"}, "topic")], last


def test_empty_notification_with_gap_polls_once() -> None:
    result = parse_topic_notification(bundle(r4_status("event-notification", "9", [("9", None)])), 2)
    assert [i.kind for i in result.items] == ["poll"]


def test_gap_without_event_numbers_uses_events_since() -> None:
    note = bundle(r4_status("event-notification", "6"), id_only("Procedure/fna-1"))
    assert [i.kind for i in parse_topic_notification(note, 5).items] == ["fetch"]
    assert [i.kind for i in parse_topic_notification(note, 4).items] == ["fetch", "poll"]
    assert parse_topic_notification(note, 4).highest_event_number == 6


def test_non_procedure_focus_and_resources_are_ignored() -> None:
    patient = {"resourceType": "Patient", "id": "p1"}
    note = bundle(r4_status("event-notification", "3", [("3", "Patient/p1")]), full(patient),
                  id_only("Observation/o1"))
    result = parse_topic_notification(note, 2)
    assert (result.items, result.highest_event_number) == ([], 3)


# -- topic-based: R4B / R5 (SubscriptionStatus) ------------------------------------------------------------


@pytest.mark.parametrize("bundle_type", ["history", "subscription-notification"])
def test_r5_handshake_and_heartbeat(bundle_type: str) -> None:
    hand = parse_topic_notification(bundle(r5_status("handshake", "0"), bundle_type=bundle_type), None)
    assert (hand.items, hand.highest_event_number, hand.subscription, hand.type) == ([], 0, SUB, "handshake")
    beat = parse_topic_notification(bundle(r5_status("heartbeat", 3), bundle_type=bundle_type), 3)
    assert (beat.items, beat.highest_event_number, beat.type) == ([], 3, "heartbeat")
    gap = parse_topic_notification(bundle(r5_status("heartbeat", "5"), bundle_type=bundle_type), 3)
    assert topic(gap.items) == [poll(f"event gap on {SUB}: heartbeat reports 5 event(s), last seen 3")]


def test_r5_full_resource() -> None:
    p = procedure("fna-4", "3")
    note = bundle(r5_status("event-notification", "21", [("21", "Procedure/fna-4")]), full(p),
                  bundle_type="subscription-notification")
    result = parse_topic_notification(note, 20)
    assert topic(result.items) == [("procedure", {"resource": p}, "topic")]
    assert result.highest_event_number == 21


def test_r4b_id_only_with_integer_event_numbers() -> None:
    note = bundle(r5_status("event-notification", 4, [(3, "Procedure/fna-5"), (4, "Procedure/fna-6")]),
                  id_only("Procedure/fna-5"), id_only("Procedure/fna-6"))
    result = parse_topic_notification(note, 2)
    assert topic(result.items) == [("fetch", {"reference": "Procedure/fna-5"}, "topic"),
                                   ("fetch", {"reference": "Procedure/fna-6"}, "topic")]
    assert result.highest_event_number == 4


def test_r5_empty_and_gap() -> None:
    note = bundle(r5_status("event-notification", "30", [("30", None)]), bundle_type="subscription-notification")
    assert topic(parse_topic_notification(note, 29).items) == [poll(f"empty event notification from {SUB}")]
    assert [i.kind for i in parse_topic_notification(note, 20).items] == ["poll"]
    fetch = bundle(r5_status("event-notification", "30", [("30", "Procedure/fna-1")]))
    assert topic(parse_topic_notification(fetch, 20).items) == [
        ("fetch", {"reference": "Procedure/fna-1"}, "topic"), poll(f"event gap on {SUB}: expected event 21, got 30")]


def test_r5_query_status_and_query_event() -> None:
    status = parse_topic_notification(bundle(r5_status("query-status", "8")), 6)
    assert [i.kind for i in status.items] == ["poll"]
    events = parse_topic_notification(bundle(r5_status("query-event", "8", [("7", "Procedure/a"), ("8", None)]),
                                             bundle_type="history"), 6)
    assert topic(events.items) == [("fetch", {"reference": "Procedure/a"}, "topic")]


# -- topic-based: invalid ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("note", "status", "code"), [
    ({"resourceType": "Bundle", "type": "history"}, 400, "structure"),
    ({"resourceType": "Bundle", "type": "history", "entry": [{"resource": procedure("a")}]}, 400, "structure"),
    ({"resourceType": "Bundle", "type": "history", "entry": [{"fullUrl": "Procedure/a"}]}, 400, "structure"),
    (bundle(r5_status("unknown-kind")), 400, "code-invalid"),
    (bundle({"resourceType": "SubscriptionStatus", "subscription": {"reference": SUB}}), 400, "required"),
    (bundle({"resourceType": "SubscriptionStatus", "type": "heartbeat"}), 400, "required"),
    (bundle({"resourceType": "Parameters", "parameter": [{"name": "type", "valueCode": "heartbeat"}]}),
     400, "required"),
    (bundle({"resourceType": "Parameters", "parameter": {"name": "type"}}), 400, "structure"),
    (bundle(r5_status("heartbeat", "-3")), 400, "value"),
    (bundle(r5_status("heartbeat", -3)), 400, "value"),
    (bundle(r5_status("heartbeat", "many")), 400, "value"),
    (bundle(r5_status("heartbeat", True)), 400, "value"),
    (bundle(r5_status("event-notification", "1", [("one", "Procedure/a")])), 400, "value"),
    (bundle(r4_status("event-notification", "1", [("x", "Procedure/a")])), 400, "value"),
    (bundle({**r5_status("heartbeat"), "subscription": "Subscription/a"}), 400, "structure"),
])
def test_invalid_topic_notifications(note: dict[str, Any], status: int, code: str) -> None:
    with pytest.raises(ReceiveError) as exc:
        parse_topic_notification(note, 1)
    assert (exc.value.status, exc.value.code) == (status, code), exc.value.message


def test_procedure_reference_normalisation() -> None:
    assert procedure_reference("Procedure/a") == "Procedure/a"
    assert procedure_reference("http://x/fhir/Procedure/a/_history/2") == "Procedure/a"
    assert procedure_reference("Procedure/a?_format=json") == "Procedure/a"
    assert procedure_reference("Patient/a") is None
    assert procedure_reference("urn:uuid:abc") is None
    assert procedure_reference(None) is None


def test_work_items_are_json_serialisable() -> None:
    note = bundle(r4_status("event-notification", "2", [("2", "Procedure/fna-1")]), full(procedure("fna-1")))
    for item in parse_topic_notification(note, 0).items:
        json.dumps(item.payload)
