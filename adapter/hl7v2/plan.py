"""Corrections: from what a patient's sessions charge now and what earlier messages charged, the messages to send.

Pure. A charge already sent is never edited in place: when its line is no longer wanted (voided) or wanted
in another version (units, price, diagnoses, account changed ...), the earlier line is credited (FT1-6 CD,
repeating exactly what the earlier message carried, to the account it was posted to) and the new version
charged (CG) after it. Unchanged charges are not sent again. Charges of Procedures whose session's charges
could not be produced (the Procedure could not be coded, or its message lacks what the input does not give)
are left as they are until an analyst has looked: the FHIR side's rule (`reconcile.protected_procedures`).
A session whose charges are here while its Claim waits is corrected like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from adapter.hl7v2.ledger import LedgerMessage, MessageStatus, NewMessage
from adapter.hl7v2.messages import CHARGE, CREDIT, Charge, SessionCharges, Visit, control_id
from adapter.sinks.reconcile import protected_procedures

Render = Callable[[str, Visit, list[Charge], str], str]
"""(kind, visit, charges, control id) -> the message text (validated); raises InvalidMessageError."""


@dataclass(frozen=True)
class ActiveCharge:
    """A charge line the receiver holds: charged by a sent (or still pending) message, not credited since."""

    line: str
    version: str
    charge: dict[str, Any]
    visit: dict[str, Any]
    session: str
    seq: int
    position: int
    """Its FT1's place in the charging message: credits list lines in the order they were charged."""


@dataclass
class PatientPlan:
    messages: list[NewMessage] = field(default_factory=list)
    unchanged: int = 0
    protected: int = 0
    """Charges left alone because a Procedure they bill is under review and its session's charges are not here."""


def active_charges(history: Iterable[LedgerMessage]) -> dict[str, ActiveCharge]:
    """Fold a patient's messages in sequence order: CG lines become active, CD lines end them. Rejected and
    cancelled messages changed nothing at the receiver."""
    active: dict[str, ActiveCharge] = {}
    for message in history:
        if message.status not in (MessageStatus.SENT, MessageStatus.PENDING):
            continue
        for position, entry in enumerate(message.charges):
            if message.kind == CHARGE:
                active[entry["line"]] = ActiveCharge(entry["line"], entry["version"], entry["charge"], message.visit,
                                                     message.session, message.seq, position)
            else:
                active.pop(entry["line"], None)
    return active


def _generation(history: list[LedgerMessage], kind: str, versions: list[tuple[str, str]]) -> int:
    """How many earlier messages carried exactly this content: a resent content gets a new control id."""
    wanted = sorted(versions)
    return sum(1 for m in history if m.kind == kind and sorted(m.versions) == wanted)


def _entries(charges: list[tuple[Charge, str]]) -> tuple[dict[str, Any], ...]:
    return tuple({"line": c.line, "version": v, "charge": c.to_json()} for c, v in charges)


def plan_patient(patient: str, sessions: list[SessionCharges], history: list[LedgerMessage],
                 under_review: set[str], render: Render) -> PatientPlan:
    """The messages that bring the receiver from `history` to `sessions` (all coded sessions of `patient`):
    credits first (in the order the credited lines were charged), then each session's new charges.

    `under_review`: every Procedure with a review (the engine's, a waiting Claim's, the sink's own). Only those
    whose session is not in `sessions` keep their earlier charges as they are."""
    result = PatientPlan()
    active = active_charges(history)
    under_review = protected_procedures(under_review, (p for sc in sessions for p in sc.procedures))
    wanted: dict[str, tuple[SessionCharges, Charge, str]] = {}
    for sc in sessions:
        for charge in sc.charges:
            wanted[charge.line] = (sc, charge, charge.version(sc.visit))
    to_credit: list[ActiveCharge] = []
    for line, held in sorted(active.items(), key=lambda item: (item[1].seq, item[1].position)):
        now = wanted.get(line)
        if now is not None and _holds(held, now[1], now[2]):
            result.unchanged += 1
            continue
        if now is None and under_review & set(held.charge.get("procedures") or ()):
            result.protected += 1
            continue
        to_credit.append(held)
    groups: dict[tuple[str, str], list[ActiveCharge]] = {}
    for held in to_credit:  # one credit message per session and account it was charged to
        groups.setdefault((held.session, _key(held.visit)), []).append(held)
    for members in groups.values():
        versions = [(h.line, h.version) for h in members]
        control = control_id(CREDIT, versions, _generation(history, CREDIT, versions))
        visit = Visit.from_json(members[0].visit)
        charges = [Charge.from_json(h.charge) for h in members]
        text = render(CREDIT, visit, charges, control)
        result.messages.append(NewMessage(
            control, patient, members[0].session, CREDIT, text, members[0].visit,
            tuple({"line": h.line, "version": h.version, "charge": h.charge} for h in members),
            tuple(sorted({p for h in members for p in h.charge.get("procedures") or ()}))))
    for sc in sessions:
        fresh = [(c, v) for c in sc.charges for v in [wanted[c.line][2]]
                 if c.line not in active or not _holds(active[c.line], c, v)]
        if not fresh:
            continue
        versions = [(c.line, v) for c, v in fresh]
        control = control_id(CHARGE, versions, _generation(history, CHARGE, versions))
        text = render(CHARGE, sc.visit, [c for c, _ in fresh], control)
        result.messages.append(NewMessage(control, patient, sc.session, CHARGE, text, sc.visit.to_json(),
                                          _entries(fresh), tuple(sc.procedures)))
    return result


def _holds(held: ActiveCharge, charge: Charge, version: str) -> bool:
    """Whether the receiver's line is `charge` as wanted: the same version, billing the same Procedures. A line
    whose Procedures changed (one record replaced by another, the same units) is credited and charged again,
    as the FHIR sink updates the ChargeItem's `service`: the ledger then knows which Procedures the line bills,
    and a later review of the Procedure it billed before protects nothing it no longer bills."""
    return held.version == version and sorted(held.charge.get("procedures") or ()) == sorted(charge.procedures)


def _key(visit: dict[str, Any]) -> str:
    import json

    return json.dumps(visit, sort_keys=True)
