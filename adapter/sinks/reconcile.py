"""Compare what the engine wants with what the server holds, and plan the fewest writes that make them agree.

Pure: no I/O. Lines are matched on their deterministic identifier. Unchanged lines are not written at all
(a re-run sends nothing); changed ones are conditional updates; lines no longer wanted become
`entered-in-error` and Claims no longer wanted `cancelled` (nothing is deleted). Charges that point at a
Procedure whose coding is uncertain (`protected_procedures`: it is under review and no session with it was
built) are left exactly as they are until an analyst has looked; a session whose ChargeItems are built while
only its Claim waits is reconciled like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from adapter.building.resources import WRITE_TIME_FIELDS, SessionOutput, transaction_entry
from adapter.config import CodeTables
from adapter.extraction.index import reference_of
from adapter.pipeline import RunReport
from adapter.validation import InvalidOutputError, validate_resource

VOID_STATUS = {"ChargeItem": "entered-in-error", "Claim": "cancelled"}
IGNORED = ("id", "meta", "text")


@dataclass
class SessionPlan:
    """The writes of one session (or of one patient's stale charges), sent as one transaction."""

    label: str
    procedures: list[str]
    entries: list[dict[str, Any]] = field(default_factory=list)
    unchanged: int = 0
    voids: int = 0
    written: list[str] = field(default_factory=list)
    """`Type/id/_history/n` of each resource the server wrote, filled in after the transaction."""
    failure: str | None = None
    deferred: bool = False
    """Not sent because the process is stopping; its Procedures are done on the next pass."""

    def bundle(self) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "transaction", "entry": self.entries}


@dataclass
class Plan:
    sessions: list[SessionPlan] = field(default_factory=list)
    protected: int = 0
    """Existing charges left alone because the coding of a Procedure they bill is uncertain."""
    unvoidable: list[tuple[str, str]] = field(default_factory=list)
    """(Type/id, why) of stale charges whose voided form fails validation: reported, never sent."""

    @property
    def writes(self) -> int:
        return sum(len(s.entries) for s in self.sessions)

    @property
    def unchanged(self) -> int:
        return sum(s.unchanged for s in self.sessions)


def _identifier(resource: dict[str, Any], system: str) -> str | None:
    for ident in resource.get("identifier") or []:
        if ident.get("system") == system and ident.get("value"):
            return str(ident["value"])
    return None


def _compared(resource: dict[str, Any]) -> dict[str, Any]:
    skip = (*IGNORED, WRITE_TIME_FIELDS.get(resource.get("resourceType", ""), ""))
    return {k: v for k, v in resource.items() if k not in skip}


def same_content(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Equal but for server-managed elements (id, meta), the narrative (generated from the rest) and the time
    of writing (`ChargeItem.enteredDate`, `Claim.created`): re-coding the same input is never a change."""
    return _compared(existing) == _compared(wanted)


def _billed_procedures(resource: dict[str, Any]) -> set[str]:
    if resource.get("resourceType") == "ChargeItem":
        return {r for r in (reference_of(s) for s in resource.get("service") or []) if r}
    return {r for r in (reference_of(p.get("procedureReference")) for p in resource.get("procedure") or []) if r}


def void_entry(existing: dict[str, Any]) -> dict[str, Any]:
    """PUT the stored resource back with a void status, only if nobody changed it since we read it."""
    kind = existing["resourceType"]
    body = {k: v for k, v in existing.items() if k not in ("meta", "text")}
    body["status"] = VOID_STATUS[kind]
    validate_resource(body, f"voided {kind}/{existing['id']}")
    request: dict[str, Any] = {"method": "PUT", "url": f"{kind}/{existing['id']}"}
    version = (existing.get("meta") or {}).get("versionId")
    if version:
        request["ifMatch"] = f'W/"{version}"'
    return {"fullUrl": f"{kind}/{existing['id']}", "resource": body, "request": request}


def protected_procedures(reviewed: Iterable[str], produced: Iterable[str]) -> set[str]:
    """The Procedures whose earlier charges a sink leaves exactly as they are: those under review (`reviewed`)
    whose session's charges this sink could not produce (`produced`: the Procedures of every session it did).

    The rule of both sinks. A Procedure the engine could not code (its own review, or its held session), or
    whose session's output could not be built, keeps what it had: voiding or crediting it now would un-bill a
    service whose right code is not known yet. A Procedure whose session's charges were produced while only
    the Claim waits (missing payer, billing provider, place of service, diagnosis, price) is coded with
    certainty: its stale charges are voided or credited like in any other change, or they would be billed
    twice beside the new ones."""
    return set(reviewed) - set(produced)


def plan(report: RunReport, existing: list[dict[str, Any]], tables: CodeTables) -> Plan:
    """The writes that bring the server from `existing` (our earlier output) to what `report` wants."""
    settings = tables.settings
    systems = {"ChargeItem": settings.charge_identifier_system, "Claim": settings.claim_identifier_system}
    stored: dict[tuple[str, str], dict[str, Any]] = {}
    for res in existing:
        ident = _identifier(res, systems.get(res.get("resourceType", ""), ""))
        if ident:
            stored[(res["resourceType"], ident)] = res

    result = Plan()
    wanted: set[tuple[str, str]] = set()
    session_of: dict[str, SessionPlan] = {}
    for out in report.built.sessions:
        sp = _session_plan(out, stored, systems, wanted)
        result.sessions.append(sp)
        for ref in sp.procedures:
            session_of[ref] = sp

    under_review = protected_procedures((r.procedure for r in report.reviews),
                                        (p.ref for out in report.built.sessions for p in out.session.procedures))
    orphans: dict[str, SessionPlan] = {}
    for key, res in sorted(stored.items()):
        if key in wanted or res.get("status") == VOID_STATUS[key[0]]:
            continue
        billed = _billed_procedures(res)
        if billed & under_review:
            result.protected += 1
            continue
        target = next((session_of[r] for r in sorted(billed) if r in session_of), None)
        if target is None:  # its Procedures are gone from every coded session (e.g. entered-in-error)
            owner = reference_of(res.get("subject") or res.get("patient")) or "unknown patient"
            target = orphans.setdefault(owner, SessionPlan(f"stale charges of {owner}", sorted(billed)))
        try:
            entry = void_entry(res)
        except InvalidOutputError as exc:
            result.unvoidable.append((f"{key[0]}/{res.get('id')}", str(exc)))
            continue
        target.entries.append(entry)
        target.voids += 1
    result.sessions += [orphans[k] for k in sorted(orphans)]
    return result


def _session_plan(out: SessionOutput, stored: dict[tuple[str, str], dict[str, Any]], systems: dict[str, str],
                  wanted: set[tuple[str, str]]) -> SessionPlan:
    sp = SessionPlan(out.session.key.text(), [p.ref for p in out.session.procedures])
    for resource in out.resources():
        key = (resource["resourceType"], _identifier(resource, systems[resource["resourceType"]]) or "")
        wanted.add(key)
        current = stored.get(key)
        if current is not None and same_content(current, resource):
            sp.unchanged += 1
            continue
        sp.entries.append(transaction_entry(resource))
    return sp
