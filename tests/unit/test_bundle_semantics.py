"""What a Bundle entry means by its Bundle's type and its request (docs/input-contract.md, bundle-semantics): the
reader's answers for the shapes the feed fixtures do not carry, and serve's engine push of a DELETE entry."""

from __future__ import annotations

from typing import Any

from adapter.sources.files import ReadResult, flatten
from adapter.sources.notifications import engine_post

PROC = {"resourceType": "Procedure", "id": "b-1", "status": "completed", "subject": {"reference": "Patient/b-pat"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "48635004"}]}}


def read(bundle: dict[str, Any]) -> ReadResult:
    result = ReadResult()
    flatten(bundle, "in.json", result)
    return result


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def test_a_delete_entry_that_carries_its_resource_is_a_delete_with_that_content() -> None:
    result = read(bundle("transaction", {"resource": PROC, "request": {"method": "DELETE", "url": "Procedure/b-1"}}))
    (item,) = result.resources
    assert item.deleted and item.resource["code"] == PROC["code"] and not result.problems


def test_a_conditional_delete_is_applied_by_the_body_it_carries_and_reported_without_one() -> None:
    conditional = {"method": "DELETE", "url": "Procedure?identifier=urn:x|1"}
    carried = read(bundle("batch", {"resource": PROC, "request": conditional}))
    assert [(i.resource["id"], i.deleted) for i in carried.resources] == [("b-1", True)]
    bare = read(bundle("batch", {"request": conditional}))
    assert not bare.resources and "is the server's to tell" in bare.problems[0].reason


def test_read_requests_carry_no_data_and_a_patch_is_not_applied() -> None:
    result = read(bundle("batch", {"request": {"method": "GET", "url": "Patient?name=x"}},
                         {"request": {"method": "HEAD", "url": "Patient/x"}},
                         {"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json"},
                          "request": {"method": "PATCH", "url": "Procedure/b-1"}}))
    assert not result.resources
    assert [p.origin for p in result.problems] == ["in.json#entry[2]"] and "PATCH" in result.problems[0].reason


def test_a_put_without_id_takes_the_id_of_its_url() -> None:
    body = {k: v for k, v in PROC.items() if k != "id"}
    (item,) = read(bundle("transaction", {"resource": body, "request": {"method": "PUT", "url": "Procedure/b-9"}})
                   ).resources
    assert item.resource["id"] == "b-9" and "id" not in body


def test_a_searchset_outcome_is_a_note_and_elsewhere_an_operation_outcome_is_data() -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "too-costly",
                                                              "diagnostics": "Patient Smith: too many results"}]}
    searched = read(bundle("searchset", {"resource": outcome, "search": {"mode": "outcome"}}))
    assert not searched.resources and not searched.problems
    assert searched.notes[0].reason.startswith("OperationOutcome of the search (search.mode outcome: warning "
                                               "too-costly)")
    assert "Smith" not in searched.notes[0].reason  # its text may carry search values: never shown
    assert len(read(bundle("collection", {"resource": outcome, "search": {"mode": "outcome"}})).resources) == 1


def test_a_message_must_start_with_its_header_whose_focus_is_in_the_message() -> None:
    header = {"resourceType": "MessageHeader", "id": "h", "eventCoding": {"code": "x"},
              "source": {"endpoint": "urn:x"}, "focus": [{"reference": "urn:uuid:1"}, {"reference": "Procedure/b-1"},
                                                         {"reference": "Procedure/b-2"}]}
    good = read(bundle("message", {"fullUrl": "urn:uuid:0", "resource": header},
                       {"fullUrl": "urn:uuid:1", "resource": {**PROC, "id": "b-0"}},
                       {"fullUrl": "urn:uuid:2", "resource": PROC}))
    assert [p.reason.split(" is not")[0] for p in good.problems] == ["MessageHeader.focus[2] Procedure/b-2"]
    headless = read(bundle("message", {"fullUrl": "urn:uuid:2", "resource": PROC}))
    assert len(headless.resources) == 1 and "must start with its MessageHeader" in headless.problems[0].reason


def test_an_engine_push_of_a_delete_entry_queues_a_delete_and_never_the_old_resource() -> None:
    live = {"resource": {**PROC, "id": "b-2"}, "request": {"method": "PUT", "url": "Procedure/b-2"}}
    pushed = bundle("transaction", live, {"resource": PROC, "request": {"method": "DELETE", "url": "Procedure/b-1"}})
    received = engine_post(pushed)
    kinds = [(w.kind, w.payload.get("reference")) for w in received.items]
    assert kinds == [("resources", None), ("delete", "Procedure/b-1")]
    assert [r["id"] for r in received.items[0].payload["resources"]] == ["b-2"]
    only = engine_post(bundle("batch", {"request": {"method": "DELETE", "url": "Procedure/b-1"}}))
    assert [(w.kind, w.payload["reference"]) for w in only.items] == [("delete", "Procedure/b-1")]
