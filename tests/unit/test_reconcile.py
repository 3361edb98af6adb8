"""Reconciliation with what the server holds: pure planning of updates, voids and protected charges."""

from __future__ import annotations

from adapter.sinks.reconcile import plan

from .test_engine_rules import TABLES, coverage, procedure, run


def test_reconcile_voids_unwanted_charges_and_leaves_reviewed_ones() -> None:
    report = run(procedure("f1", "us", ("a",)), coverage())
    wanted = report.built.sessions[0].charge_items[0]
    stale = {**wanted, "id": "old", "meta": {"versionId": "3"},
             "identifier": [{**wanted["identifier"][0], "value": "fna-gone"}]}
    unchanged = {**wanted, "id": "same", "meta": {"versionId": "1"}}
    result = plan(report, [stale, unchanged], TABLES)
    entries = [e for s in result.sessions for e in s.entries]
    assert [e["request"]["method"] for e in entries] == ["PUT", "PUT"]  # the Claim, and the void
    void = entries[-1]
    assert void["request"] == {"method": "PUT", "url": "ChargeItem/old", "ifMatch": 'W/"3"'}
    assert void["resource"]["status"] == "entered-in-error" and "meta" not in void["resource"]
    assert result.unchanged == 1

    held = run(procedure("f1", "us", ("a",), status="stopped"), coverage())
    assert plan(held, [stale | {"service": [{"reference": "Procedure/f1"}]}], TABLES).protected == 1

    broken = {**stale, "code": "not a CodeableConcept"}
    assert [ref for ref, _ in plan(report, [broken], TABLES).unvoidable] == ["ChargeItem/old"]
