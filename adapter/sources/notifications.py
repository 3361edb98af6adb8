"""Turn what a notifier sends into durable work items. Pure: no I/O, no clock, no store.

Three kinds of sender reach the receiver (see adapter.sources.receive for the HTTP side):

* HAPI classic rest-hook Subscriptions: with a payload HAPI behaves like a FHIR client and sends
  `PUT {base}/Procedure/{id}` (create/update) and `DELETE {base}/Procedure/{id}`; without a payload it
  sends an empty `POST {base}` ("ping": something changed, go and look).
* Integration engines POST a Procedure, or a Bundle (transaction, batch, collection, searchset, message)
  carrying Procedures and the resources their coding needs.
* Topic-based subscriptions: a `history` (R4 backport, R4B) or `subscription-notification` (R5) Bundle
  whose first entry is the status, a `Parameters` resource on R4 or a `SubscriptionStatus` on R4B/R5.

Status codes the receiver answers for invalid input (decided here, documented once):

=====  ================  ==============================================================================
400    structure         body is not JSON (or not UTF-8); a Bundle/entry/status element has the wrong shape;
                         a history Bundle whose first entry is not a subscription status
400    invalid           JSON that is not a FHIR resource (no `resourceType`); an invalid id in the path;
                         the body id differs from the path id (or is missing); a Bundle without a Procedure
400    required / value  a notification status lacks its subscription or type, or has a malformed number
400    code-invalid      an unknown notification type
415    not-supported     a Content-Type other than JSON (`application/fhir+json`, `application/json`), a
                         missing Content-Type on a body, or a charset other than utf-8
422    not-supported     a resource of the wrong type for the route (a Patient PUT to /Procedure/x, a POSTed
                         Observation) or a Bundle type that is neither a notification nor a batch of
                         resources (document, *-response)
=====  ================  ==============================================================================

Authentication (401), size (413), routing (404/405) and store failures (503) are the receiver's business.
Only Procedures are billed, so references to and resources of other types are ignored, not refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from adapter.errors import ReceiveError
from adapter.extraction.index import parse_reference
from adapter.state.base import WorkItem

JSON_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
ENGINE_BUNDLE_TYPES = frozenset({"transaction", "batch", "collection", "searchset", "message"})
NOTIFICATION_BUNDLE_TYPES = frozenset({"history", "subscription-notification"})
STATUS_TYPES = frozenset({"handshake", "heartbeat", "event-notification", "query-status", "query-event"})
EVENT_TYPES = frozenset({"event-notification", "query-event"})
_INT_VALUE_KEYS = ("valueString", "valueInteger64", "valueInteger", "valueUnsignedInt", "valuePositiveInt",
                   "valueDecimal")

SOURCE_REST_HOOK = "rest-hook"
SOURCE_ENGINE = "engine"
SOURCE_TOPIC = "topic"


@dataclass(frozen=True)
class Received:
    """What one request turned into: `kind` names what arrived (for metrics and logs)."""

    kind: str
    items: list[WorkItem] = field(default_factory=list)


@dataclass(frozen=True)
class TopicNotification:
    """A parsed topic-based notification.

    `highest_event_number` is what to remember for the subscription (None: the notification carried
    none); `type` is the notification type (handshake, heartbeat, event-notification, ...).
    """

    items: list[WorkItem]
    highest_event_number: int | None
    subscription: str
    type: str


# -- body decoding ------------------------------------------------------------------------------------------


def check_content_type(content_type: str | None) -> None:
    """Refuse (415) anything but JSON in UTF-8: the adapter reads FHIR JSON only."""
    if not content_type:
        raise ReceiveError(415, "not-supported", "Content-Type is missing; send application/fhir+json")
    media, _, params = content_type.partition(";")
    if media.strip().lower() not in JSON_TYPES:
        raise ReceiveError(415, "not-supported",
                           f"Content-Type {media.strip()[:80]!r} is not supported; send application/fhir+json")
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise ReceiveError(415, "not-supported", "only the utf-8 charset is supported")


def decode_resource(body: bytes, content_type: str | None) -> dict[str, Any]:
    """The JSON body as a resource dict; never puts body content into an error message (it is PHI)."""
    check_content_type(content_type)
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReceiveError(400, "structure", f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise ReceiveError(400, "structure",
                           f"body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        raise ReceiveError(400, "structure", f"body is not JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ReceiveError(400, "invalid", f"body is a JSON {type(data).__name__}, not a FHIR resource")
    resource_type = data.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise ReceiveError(400, "invalid", "body is JSON but not a FHIR resource (no resourceType)")
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# -- classic rest-hook ------------------------------------------------------------------------------------


def check_id(resource_id: str) -> str:
    if not FHIR_ID.match(resource_id):
        raise ReceiveError(400, "invalid", "the id in the path is not a valid FHIR id")
    return resource_id


def rest_hook_put(resource_id: str, resource: dict[str, Any]) -> Received:
    """`PUT {base}/Procedure/{id}`: HAPI sends the created or updated Procedure."""
    check_id(resource_id)
    if resource.get("resourceType") != "Procedure":
        raise ReceiveError(422, "not-supported",
                           f"{_type_name(resource)} sent to Procedure/{resource_id}; only Procedures are accepted")
    body_id = resource.get("id")
    if body_id != resource_id:
        found = "has no id" if body_id is None else "has a different id"
        raise ReceiveError(400, "invalid", f"the Procedure in the body {found}; the path says Procedure/{resource_id}")
    return Received("rest-hook-update", [procedure_item(resource, SOURCE_REST_HOOK)])


def procedure_item(resource: dict[str, Any], source: str) -> WorkItem:
    """A Procedure the server sent. The same version sent twice (to two replicas, or retried by the server)
    merges into one queued item while it waits."""
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    version = meta.get("versionId")
    dedupe = f"procedure:Procedure/{resource.get('id')}/_history/{version}" \
        if isinstance(version, str) and isinstance(resource.get("id"), str) else None
    return WorkItem("procedure", {"resource": resource}, source, dedupe=dedupe)


def rest_hook_delete(resource_id: str) -> Received:
    """`DELETE {base}/Procedure/{id}`: the Procedure is gone, its charges must be voided."""
    check_id(resource_id)
    return Received("rest-hook-delete",
                    [WorkItem("delete", {"reference": f"Procedure/{resource_id}"}, SOURCE_REST_HOOK)])


def rest_hook_ping() -> Received:
    """Empty `POST {base}`: a payload-less Subscription fired; only a poll can tell what changed."""
    return Received("rest-hook-ping", [WorkItem("poll", {"reason": "rest-hook ping"}, SOURCE_REST_HOOK)])


# -- POSTed resources -------------------------------------------------------------------------------------


def is_topic_notification(resource: dict[str, Any]) -> bool:
    """A Bundle of a notification type; the receiver then needs the subscription's last event number."""
    return resource.get("resourceType") == "Bundle" and resource.get("type") in NOTIFICATION_BUNDLE_TYPES


def engine_post(resource: dict[str, Any]) -> Received:
    """A Procedure or a Bundle of resources POSTed by an integration engine (not a topic notification)."""
    resource_type = resource.get("resourceType")
    if resource_type == "Procedure":
        return Received("engine-procedure", [WorkItem("procedure", {"resource": resource}, SOURCE_ENGINE)])
    if resource_type != "Bundle":
        raise ReceiveError(422, "not-supported",
                           f"a POSTed {_type_name(resource)} is not handled; send a Procedure or a Bundle")
    bundle_type = resource.get("type")
    if bundle_type in NOTIFICATION_BUNDLE_TYPES:
        raise ReceiveError(400, "structure", "a notification Bundle must be parsed as a topic notification")
    if bundle_type not in ENGINE_BUNDLE_TYPES:
        shown = bundle_type if isinstance(bundle_type, str) else "(none)"
        raise ReceiveError(422, "not-supported", f"Bundle type {shown[:40]!r} is not handled; send a transaction, "
                           "batch, collection, searchset or message Bundle")
    entries = _entries(resource)
    deleted = sorted({ref for ref in (_deleted_procedure(e) for e in entries) if ref})
    resources = local_references([entry for entry in entries if "resource" in entry and _is_data(entry, bundle_type)])
    if not any(r.get("resourceType") == "Procedure" for r in resources) and not deleted:
        raise ReceiveError(400, "invalid", "the Bundle contains no Procedure")
    items = [WorkItem("resources", {"resources": resources}, SOURCE_ENGINE)] if resources else []
    items += [WorkItem("delete", {"reference": ref}, SOURCE_ENGINE) for ref in deleted]
    return Received("engine-bundle", items)


def _method(entry: dict[str, Any]) -> object:
    request = entry.get("request")
    return request.get("method") if isinstance(request, dict) else None


def _is_data(entry: dict[str, Any], bundle_type: object) -> bool:
    """Whether an entry's resource is data (docs/input-contract.md, bundle-semantics): not what a DELETE
    removes (even when the entry still carries it), not a PATCH's patch, not a searchset's outcome."""
    search = entry.get("search")
    outcome = bundle_type == "searchset" and isinstance(search, dict) and search.get("mode") == "outcome"
    return _method(entry) not in ("DELETE", "PATCH") and not outcome


def _deleted_procedure(entry: dict[str, Any]) -> str | None:
    """`Procedure/id` that a DELETE entry deletes (from `request.url`, else from the body it still carries)."""
    if _method(entry) != "DELETE":
        return None
    url = str(entry["request"].get("url", "")).split("/_history/", 1)[0].strip().rstrip("/")
    parts = url.split("/")
    if "?" not in url and len(parts) >= 2 and parts[-2] == "Procedure" and FHIR_ID.match(parts[-1]):
        return f"Procedure/{parts[-1]}"
    body = entry.get("resource")
    if isinstance(body, dict) and body.get("resourceType") == "Procedure" and isinstance(body.get("id"), str) \
            and FHIR_ID.match(body["id"]):
        return f"Procedure/{body['id']}"
    return None


def local_references(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries' resources, with references to other entries of the Bundle written as `Type/id`.

    Engines write references between the entries of a pushed Bundle as `urn:uuid:` (or other absolute)
    `fullUrl`s; the queue keeps resources without their entries, so such a reference is resolved here, per
    the FHIR Bundle rules, to the target's `Type/id`. A reference to an entry without an id (a transaction
    create: only the server will give it one) is kept as written and goes to review when a rule needs it."""
    targets: dict[str, str] = {}
    for entry in entries:
        full_url, res = entry.get("fullUrl"), entry["resource"]
        if isinstance(full_url, str) and full_url.strip() and isinstance(res.get("id"), str) and res["id"]:
            targets[full_url.strip().split("/_history/", 1)[0]] = f"{res['resourceType']}/{res['id']}"
    if not targets:
        return [entry["resource"] for entry in entries]
    return [_rewrite(entry["resource"], targets) for entry in entries]


def _rewrite(value: Any, targets: dict[str, str]) -> Any:
    if isinstance(value, list):
        return [_rewrite(item, targets) for item in value]
    if not isinstance(value, dict):
        return value
    out = {key: _rewrite(item, targets) for key, item in value.items()}
    reference = value.get("reference")
    if isinstance(reference, str):
        local = targets.get(reference.strip().split("/_history/", 1)[0])
        if local is not None:
            out["reference"] = local
    return out


def _type_name(resource: dict[str, Any]) -> str:
    value = resource.get("resourceType")
    return value[:64] if isinstance(value, str) else "a resource without resourceType"


def _entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    entries = bundle.get("entry", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ReceiveError(400, "structure", "Bundle.entry must be a list of objects")
    for index, entry in enumerate(entries):
        if "resource" in entry:
            res = entry["resource"]
            if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
                raise ReceiveError(400, "structure", f"Bundle.entry[{index}].resource is not a FHIR resource")
    return entries


# -- topic-based notifications ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Event:
    number: int | None
    focus: str | None


@dataclass(frozen=True)
class _Status:
    subscription: str
    type: str
    events_since: int | None
    events: list[_Event]


def procedure_reference(value: object) -> str | None:
    """`Procedure/{id}` from a relative, absolute or versioned reference/URL; None for anything else."""
    if not isinstance(value, str):
        return None
    parsed = parse_reference(value.split("?", 1)[0].split("#", 1)[0])
    return f"Procedure/{parsed[1]}" if parsed and parsed[0] == "Procedure" else None


def _subscription_key(reference: object) -> str:
    """A stable key for the subscription: `Subscription/{id}` when the reference has that shape."""
    if not isinstance(reference, str) or not reference.strip():
        raise ReceiveError(400, "required", "the notification status has no subscription reference")
    parsed = parse_reference(reference)
    if parsed and parsed[0] == "Subscription":
        return f"Subscription/{parsed[1]}"
    return reference.strip()[:200]


def _number(value: object, what: str) -> int:
    """integer64 arrives as a JSON string (R4 backport, R5) or a number (R4B servers, engines): take both."""
    if isinstance(value, bool):
        raise ReceiveError(400, "value", f"{what} is not a number")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    else:
        raise ReceiveError(400, "value", f"{what} is not a whole number")
    if number < 0:
        raise ReceiveError(400, "value", f"{what} is negative")
    return number


def _reference_of(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ReceiveError(400, "structure", f"{what} is not a Reference")
    ref = value.get("reference")
    return ref if isinstance(ref, str) else None


def _parameter_value(param: dict[str, Any]) -> tuple[str | None, object]:
    for key, value in param.items():
        if key.startswith("value"):
            return key, value
    return None, None


def _parameters(items: object, what: str) -> Iterator[dict[str, Any]]:
    if items is None:
        return
    if not isinstance(items, list) or not all(isinstance(p, dict) for p in items):
        raise ReceiveError(400, "structure", f"{what} must be a list of objects")
    yield from items


def _backport_number(param: dict[str, Any], what: str) -> int | None:
    for key in _INT_VALUE_KEYS:
        if key in param:
            return _number(param[key], what)
    return None


def _status_from_parameters(status: dict[str, Any]) -> _Status:
    """R4 backport: a Parameters resource whose parameters mirror SubscriptionStatus."""
    subscription: object = None
    kind: object = None
    events_since: int | None = None
    events: list[_Event] = []
    for param in _parameters(status.get("parameter"), "Parameters.parameter"):
        name = param.get("name")
        if name == "subscription":
            subscription = _reference_of(param.get("valueReference"), "the subscription parameter")
        elif name == "type":
            kind = _parameter_value(param)[1]
        elif name == "events-since-subscription-start":
            events_since = _backport_number(param, "events-since-subscription-start")
        elif name == "notification-event":
            number: int | None = None
            focus: str | None = None
            for part in _parameters(param.get("part"), "notification-event.part"):
                if part.get("name") == "event-number":
                    number = _backport_number(part, "event-number")
                elif part.get("name") == "focus":
                    focus = _reference_of(part.get("valueReference"), "notification-event focus")
            events.append(_Event(number, focus))
    return _Status(_subscription_key(subscription), _status_type(kind), events_since, events)


def _status_from_subscription_status(status: dict[str, Any]) -> _Status:
    """R4B/R5: a SubscriptionStatus resource."""
    subscription = _reference_of(status.get("subscription"), "SubscriptionStatus.subscription")
    since = status.get("eventsSinceSubscriptionStart")
    events_since = None if since is None else _number(since, "eventsSinceSubscriptionStart")
    events = []
    for event in _parameters(status.get("notificationEvent"), "SubscriptionStatus.notificationEvent"):
        number = event.get("eventNumber")
        events.append(_Event(None if number is None else _number(number, "notificationEvent.eventNumber"),
                             _reference_of(event.get("focus"), "notificationEvent.focus")))
    return _Status(_subscription_key(subscription), _status_type(status.get("type")), events_since, events)


def _status_type(kind: object) -> str:
    if kind is None:
        raise ReceiveError(400, "required", "the notification status has no type")
    if kind not in STATUS_TYPES:
        shown = kind[:40] if isinstance(kind, str) else type(kind).__name__
        raise ReceiveError(400, "code-invalid", f"unknown notification type {shown!r}")
    return str(kind)


def _status(bundle: dict[str, Any]) -> tuple[_Status, list[dict[str, Any]]]:
    """The notification status and the entries after it."""
    entries = _entries(bundle)
    first = entries[0].get("resource") if entries else None
    if first is None:
        raise ReceiveError(400, "structure", f"a {bundle.get('type')} Bundle must start with a subscription status "
                           "(Parameters on R4, SubscriptionStatus on R4B/R5)")
    if first["resourceType"] == "Parameters":
        return _status_from_parameters(first), entries[1:]
    if first["resourceType"] == "SubscriptionStatus":
        return _status_from_subscription_status(first), entries[1:]
    raise ReceiveError(400, "structure", f"a {bundle.get('type')} Bundle must start with a subscription status, "
                       f"not a {_type_name(first)}")


def subscription_of(bundle: dict[str, Any]) -> str:
    """The key under which the subscription's last event number is kept (raises ReceiveError if invalid)."""
    return _status(bundle)[0].subscription


def parse_topic_notification(bundle: dict[str, Any], last_event_number: int | None) -> TopicNotification:
    """Work items for one topic-based notification, given the last event number seen for its subscription.

    Gaps: when `last_event_number` is known and this notification starts beyond the next expected event
    (or a heartbeat reports more events than were seen), events were lost and a `poll` item is added. An
    unknown last number (the first notification the adapter sees) is taken as the baseline without a poll;
    the periodic sweep covers what happened before.
    """
    status, rest = _status(bundle)
    sub = status.subscription
    items: list[WorkItem] = []
    if status.type not in EVENT_TYPES:  # handshake, heartbeat, query-status: nothing to do but gap checks
        since = status.events_since
        if status.type != "handshake" and since is not None and last_event_number is not None \
                and since > last_event_number:
            items.append(_poll(f"event gap on {sub}: {status.type} reports {since} event(s), "
                               f"last seen {last_event_number}"))
        return TopicNotification(items, since, sub, status.type)

    items = _event_items(status, rest)
    numbers = [e.number for e in status.events if e.number is not None]
    if numbers:
        first, highest = min(numbers), max(numbers)
    elif status.events_since is not None:
        highest = status.events_since
        first = highest - max(1, len(status.events), len(rest)) + 1
    else:
        first = highest = None
    if last_event_number is not None and first is not None and first > last_event_number + 1 \
            and not any(i.kind == "poll" for i in items):
        items.append(_poll(f"event gap on {sub}: expected event {last_event_number + 1}, got {first}"))
    return TopicNotification(items, highest, sub, status.type)


def _poll(reason: str) -> WorkItem:
    return WorkItem("poll", {"reason": reason}, SOURCE_TOPIC)


def _event_items(status: _Status, rest: list[dict[str, Any]]) -> list[WorkItem]:
    """full-resource -> procedure items; id-only -> fetch (delete for DELETE entries); empty -> one poll."""
    items: list[WorkItem] = []
    covered: set[str] = set()
    for entry in rest:
        resource = entry.get("resource")
        request = entry.get("request") if isinstance(entry.get("request"), dict) else {}
        if resource is not None:
            if resource.get("resourceType") == "Procedure":
                items.append(procedure_item(resource, SOURCE_TOPIC))
                if isinstance(resource.get("id"), str):
                    covered.add(f"Procedure/{resource['id']}")
            continue
        ref = procedure_reference(request.get("url")) or procedure_reference(entry.get("fullUrl"))
        if ref is None or ref in covered:
            continue
        covered.add(ref)
        kind = "delete" if str(request.get("method", "")).upper() == "DELETE" else "fetch"
        items.append(WorkItem(kind, {"reference": ref}, SOURCE_TOPIC))
    for event in status.events:
        ref = procedure_reference(event.focus)
        if ref is not None and ref not in covered:
            covered.add(ref)
            items.append(WorkItem("fetch", {"reference": ref}, SOURCE_TOPIC))
    if not rest and not any(e.focus for e in status.events):
        items.append(_poll(f"empty event notification from {status.subscription}"))
    return items
