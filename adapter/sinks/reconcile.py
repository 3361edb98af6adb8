"""Compare what the engine wants with what the server holds, and plan the fewest writes that make them agree,
changing only what is still ours.

Pure: no I/O. Lines are matched on their deterministic identifier (with its chain of replacements: `base`,
`base-r2`, ...; credits `...-credit`). What stands where is told by `ownership.standing`:
- ours (as we wrote it, status still ours): unchanged lines are not written at all (a re-run sends nothing),
  changed ones are updated in place (`If-Match` on the version read, so a line billed meanwhile is never
  overwritten), lines no longer wanted become `entered-in-error` and Claims no longer wanted `cancelled`;
- passed on (a ChargeItem `billed`, a Claim a ClaimResponse answers): never changed. A line whose coding
  changed gets a credit (the same code, modifiers and performer with negative quantity and price, pointing at
  it) and, when still wanted, its replacement beside it; a Claim gets a replacement Claim (frequency 7, naming
  the one it replaces) or a void Claim (frequency 8);
- edited by someone else: their edit wins. Nothing is written for that line; if our coding changed since we
  wrote it, the Procedures wait in review (`changed-on-server`), showing both versions;
- voided by someone else: respected until the coding of its Procedures changes, then a new line is written.
Charges that point at a Procedure whose coding is uncertain (`protected_procedures`) are left as they are.
Nothing is deleted.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from adapter.billing.parties import with_contained_provider
from adapter.building.identifiers import full_url
from adapter.building.narrative import charge_item_text, claim_text
from adapter.building.resources import WRITE_TIME_FIELDS, SessionOutput, conditional_url, instant
from adapter.config import CodeTables, Settings
from adapter.extraction.index import reference_of
from adapter.pipeline import RunReport
from adapter.sinks.ownership import (
    SERVER_MANAGED,
    VOID_STATUS,
    Chain,
    Standing,
    chain_key,
    credit_value,
    fingerprint,
    generation_value,
    identifier_value,
    payload,
    recorded_fingerprint,
    same_content,
    stamped,
    standing,
)
from adapter.validation import InvalidOutputError, validate_resource

IGNORED = SERVER_MANAGED
RELATED_CLAIM = "http://terminology.hl7.org/CodeSystem/ex-relatedclaimrelationship"
FREQUENCY_DISPLAY = {"1": "Original claim", "7": "Replacement of prior claim", "8": "Void of prior claim"}


class Drift:
    """Kinds of difference between what the coding wants and what the server holds (`reconcile`)."""

    MISSING = "missing"
    """Wanted, and the server holds no live line for it (never written, lost, voided and wanted again)."""
    OUTDATED = "outdated"
    """Ours, and the coding now wants other content: updated in place."""
    UNKNOWN = "unknown"
    """Ours, and unknown to the coding (its session no longer bills it): voided in place."""
    BILLED_WRONG = "billed-wrong"
    """Billed or answered by a payer, and the coding now differs: credited / replaced, never changed."""
    CHANGED_BY_OTHERS = "changed-by-others"
    """Changed on the server by someone else, and our coding differs from both: nothing written, review."""
    KINDS = (MISSING, OUTDATED, UNKNOWN, BILLED_WRONG, CHANGED_BY_OTHERS)
    REPAIRABLE = (MISSING, OUTDATED, UNKNOWN, BILLED_WRONG)


@dataclass(frozen=True)
class DriftItem:
    kind: str
    resource: str
    """`Type/id` on the server, or `Type?identifier=...` for what is missing."""
    session: str
    procedures: tuple[str, ...]
    detail: str


@dataclass(frozen=True)
class Conflict:
    """A line changed on the server by someone else where our re-code would write something else."""

    procedures: tuple[str, ...]
    detail: str


@dataclass
class SessionPlan:
    """The writes of one session (or of one patient's stale charges), sent as one transaction."""

    label: str
    procedures: list[str]
    entries: list[dict[str, Any]] = field(default_factory=list)
    unchanged: int = 0
    voids: int = 0
    credits: int = 0
    corrections: list[str] = field(default_factory=list)
    """Why each credit, replacement or void Claim of this session is written (for the audit trail)."""
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
    """(Type/id, why) of corrections (voids, credits, replacements) that fail validation: reported, never sent."""
    drift: list[DriftItem] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    edits_kept: int = 0
    """Lines changed or voided on the server by someone else whose coding did not change: left as they are."""

    @property
    def writes(self) -> int:
        return sum(len(s.entries) for s in self.sessions)

    @property
    def unchanged(self) -> int:
        return sum(s.unchanged for s in self.sessions)

    def drift_counts(self) -> Counter[str]:
        return Counter(d.kind for d in self.drift)

    def within(self, procedures: set[str]) -> Plan:
        """Only the sessions (and drift, and conflicts) that bill one of `procedures`: `reconcile --since` compares
        and repairs what changed in its window, whatever else a shared server holds."""
        def touches(refs: Iterable[str]) -> bool:
            return not procedures.isdisjoint(refs)
        return Plan([s for s in self.sessions if touches(s.procedures)], self.protected, self.unvoidable,
                    [d for d in self.drift if touches(d.procedures)],
                    [c for c in self.conflicts if touches(c.procedures)], self.edits_kept)


def _billed_procedures(resource: dict[str, Any]) -> set[str]:
    if resource.get("resourceType") == "ChargeItem":
        return {r for r in (reference_of(s) for s in resource.get("service") or []) if r}
    return {r for r in (reference_of(p.get("procedureReference")) for p in resource.get("procedure") or []) if r}


def _in_place(existing: dict[str, Any], body: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """PUT `body` over `existing`, only if nobody changed it since we read it (If-Match on its version)."""
    kind = existing["resourceType"]
    body = stamped({**{k: v for k, v in body.items() if k not in ("meta",)}, "id": existing["id"]},
                   settings.fingerprint_extension)
    request: dict[str, Any] = {"method": "PUT", "url": f"{kind}/{existing['id']}"}
    version = (existing.get("meta") or {}).get("versionId")
    if version:
        request["ifMatch"] = f'W/"{version}"'
    return {"fullUrl": f"{kind}/{existing['id']}", "resource": body, "request": request}


def void_entry(existing: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """PUT the stored resource back with a void status, only if nobody changed it since we read it."""
    kind = existing["resourceType"]
    body = {k: v for k, v in existing.items() if k not in ("meta", "text")}
    body["status"] = VOID_STATUS[kind]
    validate_resource(body, f"voided {kind}/{existing['id']}")
    return _in_place(existing, body, settings or Settings())


def new_entry(resource: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """A conditional update on the resource's identifier (a create, where nothing holds it yet)."""
    body = stamped(resource, settings.fingerprint_extension)
    ident = body["identifier"][0]
    return {"fullUrl": full_url(ident["system"], ident["value"]), "resource": body,
            "request": {"method": "PUT", "url": conditional_url(body)}}


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


def _with_identifier(resource: dict[str, Any], value: str) -> dict[str, Any]:
    out = dict(resource)
    out["identifier"] = [{**resource["identifier"][0], "value": value}, *resource["identifier"][1:]]
    return out


def _extension(resource: dict[str, Any], extension: dict[str, Any]) -> dict[str, Any]:
    """`resource` with one more extension (after its own), keys in R4 order."""
    out: dict[str, Any] = {}
    for key, value in resource.items():
        if key == "identifier" and "extension" not in out:
            out["extension"] = [extension]
        if key == "extension":
            value = [*value, extension]
        out[key] = value
    return out


def _negated(money: Any) -> Any:
    if isinstance(money, dict) and isinstance(money.get("value"), int | float):
        return {**money, "value": -money["value"]}
    return money


def _line_label(resource: dict[str, Any]) -> str:
    code = resource.get("code") if resource.get("resourceType") == "ChargeItem" else None
    if isinstance(code, dict):
        return str(code.get("text") or ((code.get("coding") or [{}])[0]).get("code") or "?")
    return "Claim"


def credit_for(billed: dict[str, Any], settings: Settings, written_at: str, why: str) -> dict[str, Any]:
    """The ChargeItem that offsets `billed` exactly: its code, modifiers, performer, dates, services and account,
    with negative quantity and price, pointing at it (`offsets-charge`), under the identifier `<its>-credit`."""
    ident = identifier_value(billed, settings.charge_identifier_system) or str(billed.get("id"))
    credit: dict[str, Any] = {"resourceType": "ChargeItem", "text": None}
    own = [e for e in billed.get("extension") or [] if isinstance(e, dict)
           and e.get("url") == settings.modifier_extension]
    credit["extension"] = [*own, {"url": settings.offsets_extension,
                                  "valueReference": {"reference": f"ChargeItem/{billed['id']}"}}]
    credit["identifier"] = [{"system": settings.charge_identifier_system, "value": credit_value(ident)}]
    for key in ("definitionCanonical",):
        if key in billed:
            credit[key] = billed[key]
    credit["status"] = "billable"
    for key in ("code", "subject", "context", "occurrenceDateTime", "occurrencePeriod", "performer",
                "performingOrganization", "costCenter"):
        if key in billed:
            credit[key] = copy.deepcopy(billed[key])
    quantity = dict(billed.get("quantity") or {})
    quantity["value"] = -(quantity.get("value") if isinstance(quantity.get("value"), int | float) else 1)
    credit["quantity"] = quantity
    if "bodysite" in billed:
        credit["bodysite"] = billed["bodysite"]
    if "priceOverride" in billed:
        credit["priceOverride"] = _negated(billed["priceOverride"])
        credit["overrideReason"] = f"credit of ChargeItem/{billed['id']}"
    credit["enteredDate"] = written_at
    for key in ("reason", "service", "account"):
        if key in billed:
            credit[key] = copy.deepcopy(billed[key])
    credit["note"] = [{"text": f"Credit of ChargeItem/{billed['id']} ({_line_label(billed)}), which has passed to "
                               f"billing: {why}"}]
    credit["text"] = charge_item_text(credit)
    return credit


def _frequency(settings: Settings, code: str) -> dict[str, Any]:
    return {"url": settings.claim_frequency_extension,
            "valueCoding": {"system": settings.claim_frequency_system, "code": code,
                            "display": FREQUENCY_DISPLAY[code]}}


def _related_prior(claim: dict[str, Any], prior: str) -> dict[str, Any]:
    """`claim` naming `prior` (`Claim/id`) as the claim it follows (`Claim.related`, relationship `prior`), placed
    where R4 puts `related` (after `priority`)."""
    related = {"claim": {"reference": prior}, "relationship": {"coding": [{"system": RELATED_CLAIM, "code": "prior"}]}}
    items = [(k, v) for k, v in claim.items() if k != "related"]
    before = ("resourceType", "text", "extension", "identifier", "status", "type", "subType", "use", "patient",
              "billablePeriod", "created", "enterer", "insurer", "provider", "priority", "fundsReserve")
    cut = max((i for i, (k, _) in enumerate(items) if k in before), default=len(items) - 1) + 1
    return dict([*items[:cut], ("related", [related]), *items[cut:]])


def replacement_claim(wanted: dict[str, Any], prior: str, value: str, settings: Settings) -> dict[str, Any]:
    """The Claim that replaces `prior` (answered by a payer): the coding's Claim under the next identifier of the
    chain, naming `prior` (`related` prior) with claim frequency 7."""
    own = [e for e in wanted.get("extension") or [] if e.get("url") != settings.claim_frequency_extension]
    first = {**wanted, "extension": own} if own else {k: v for k, v in wanted.items() if k != "extension"}
    claim = _related_prior(_extension(_with_identifier(first, value), _frequency(settings, "7")), prior)
    claim["text"] = claim_text(claim)
    return claim


def void_claim(prior: dict[str, Any], value: str, settings: Settings, written_at: str) -> dict[str, Any]:
    """The Claim that voids `prior` (frequency 8): its content repeated, naming it, under the chain's next id."""
    ours = (settings.claim_frequency_extension, settings.fingerprint_extension, settings.replaces_extension)
    own = [e for e in prior.get("extension") or [] if isinstance(e, dict) and e.get("url") not in ours]
    body = {k: copy.deepcopy(v) for k, v in prior.items()
            if k not in (*SERVER_MANAGED, "extension", "resourceType", "related")}
    contained = {"contained": body.pop("contained")} if "contained" in body else {}
    claim = {"resourceType": "Claim", "text": None, **contained, "extension": [*own, _frequency(settings, "8")],
             **body}
    claim = _with_identifier(claim, value)
    claim["status"] = "active"
    claim[WRITE_TIME_FIELDS["Claim"]] = written_at
    claim = _related_prior(claim, f"Claim/{prior['id']}")
    claim["text"] = claim_text(claim)
    return claim


def replacement_line(wanted: dict[str, Any], prior: str, value: str, settings: Settings) -> dict[str, Any]:
    """The coding's ChargeItem under the chain's identifier `value`, naming the line it replaces (`replaces`)."""
    return _extension(_with_identifier(wanted, value),
                      {"url": settings.replaces_extension, "valueReference": {"reference": prior}})


def _replaced(resource: dict[str, Any], settings: Settings) -> str | None:
    """The `Type/id` a replacement names (ChargeItem `replaces`, Claim `related` prior)."""
    for extension in resource.get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == settings.replaces_extension:
            return reference_of(extension.get("valueReference"))
    for related in resource.get("related") or []:
        if isinstance(related, dict):
            return reference_of(related.get("claim"))
    return None


def positioned(kind: str, wanted: dict[str, Any], value: str, prior: str | None, settings: Settings) -> dict[str, Any]:
    """`wanted` as written at the chain position `value`: itself for the first write, else the replacement that
    names `prior`."""
    if value == identifier_value(wanted, identifier_system(kind, settings)) or prior is None:
        return _with_identifier(wanted, value)
    if kind == "ChargeItem":
        return replacement_line(wanted, prior, value, settings)
    return replacement_claim(wanted, prior, value, settings)


def identifier_system(kind: str, settings: Settings) -> str:
    return settings.charge_identifier_system if kind == "ChargeItem" else settings.claim_identifier_system


def _summary(resource: dict[str, Any]) -> str:
    """What a line or Claim bills, for a review that shows two versions (codes, units, status; no free text)."""
    if resource.get("resourceType") == "ChargeItem":
        mods = [((e.get("valueCodeableConcept") or {}).get("coding") or [{}])[0].get("code")
                for e in resource.get("extension") or [] if isinstance(e, dict)
                and str(e.get("url", "")).endswith("/cpt-modifier")]
        code = ((resource.get("code") or {}).get("coding") or [{}])[0].get("code")
        price = (resource.get("priceOverride") or {}).get("value")
        return (f"{code}{''.join(f'-{m}' for m in mods if m)} x{(resource.get('quantity') or {}).get('value')}, "
                f"status {resource.get('status')}" + (f", price {price}" if price is not None else ""))
    items = ", ".join(
        f"{((i.get('productOrService') or {}).get('coding') or [{}])[0].get('code')}"
        f"{''.join('-' + ((m.get('coding') or [{}])[0].get('code') or '') for m in i.get('modifier') or [])}"
        f" x{(i.get('quantity') or {}).get('value')}" for i in resource.get("item") or [])
    return f"items {items or 'none'}, status {resource.get('status')}"


def _changed_fields(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    a, b = payload(ours), payload(theirs)
    return sorted(k for k in {*a, *b} if a.get(k) != b.get(k))


@dataclass(frozen=True)
class _OthersVoid:
    """A wanted line (or Claim) that someone else voided on the server."""

    kind: str
    wanted: dict[str, Any]
    ref: str
    following: str
    """The identifier value of the next generation of its chain."""
    procedures: tuple[str, ...]
    label: str


class _Planner:
    def __init__(self, tables: CodeTables, answered: frozenset[str], written_at: str) -> None:
        self.settings = tables.settings
        self.providers = tables.billing.providers
        """For the void of a Claim written before the contained billing provider (`with_contained_provider`)."""
        self.answered = answered
        self.written_at = written_at
        self.result = Plan()
        self.voided_by_others: list[tuple[SessionPlan, _OthersVoid]] = []
        self.systems = {"ChargeItem": self.settings.charge_identifier_system,
                        "Claim": self.settings.claim_identifier_system}

    def chains(self, existing: list[dict[str, Any]]) -> dict[tuple[str, str], Chain]:
        chains: dict[tuple[str, str], Chain] = {}
        for res in existing:
            kind = res.get("resourceType", "")
            value = identifier_value(res, self.systems.get(kind, ""))
            if not value or not res.get("id"):
                continue
            key = chain_key(value)
            chain = chains.setdefault((kind, key.base), Chain(key.base))
            (chain.credits if key.credit else chain.generations)[key.generation] = res
        return chains

    def decide(self, kind: str, base: str, wanted: dict[str, Any] | None, chain: Chain | None,
               target: SessionPlan) -> None:
        """Add to `target` what brings one line's (or Claim's) chain to `wanted` (None: no longer wanted)."""
        current = chain.current if chain is not None else None
        shown = wanted if wanted is not None else current
        label = _line_label(shown) if shown is not None else kind
        procedures = tuple(sorted(_billed_procedures(shown or {})))
        if current is None or chain is None:
            if wanted is not None:
                self._add(target, new_entry(wanted, self.settings), Drift.MISSING,
                          f"{kind}?identifier={self.systems[kind]}|{base}", procedures, f"{label}: not on the server")
            return
        ref = f"{kind}/{current['id']}"
        following = generation_value(base, chain.current_generation + 1)
        if kind == "ChargeItem" and chain.credited:  # passed on and offset by a credit: only a new line remains
            if wanted is not None:
                line = replacement_line(wanted, ref, following, self.settings)
                self._add(target, new_entry(line, self.settings), Drift.MISSING, ref, procedures,
                          f"{label}: credited, wanted again")
            return
        if kind == "Claim" and wanted is None and recorded_frequency(current, self.settings) == "8":
            return  # a void Claim: nothing left to void
        value = identifier_value(current, self.systems[kind]) or base
        expected = (positioned(kind, wanted, value, _replaced(current, self.settings), self.settings)
                    if wanted is not None else None)
        where = standing(current, self.answered)
        if where is Standing.OURS:
            prior = self._answered_prior(kind, chain, current)
            if expected is None and prior is not None:  # our unanswered replacement becomes the void of the prior
                self._void_answered_in_place(target, current, prior, value, ref, procedures, label)
            elif expected is None:
                self._void(target, current, ref, procedures, label)
            elif same_content(current, expected):
                target.unchanged += 1
            else:
                self._add(target, _in_place(current, expected, self.settings), Drift.OUTDATED, ref, procedures,
                          f"{label}: {', '.join(_changed_fields(current, expected))} changed")
            return
        if where is Standing.VOIDED_BY_US:
            if expected is not None:
                self._add(target, _in_place(current, expected, self.settings), Drift.MISSING, ref, procedures,
                          f"{label}: voided earlier, wanted again")
            return
        coding_unchanged = expected is not None and (
            fingerprint(expected) == recorded_fingerprint(current) or same_content(current, expected))
        if where is Standing.PASSED_ON:
            if coding_unchanged:
                target.unchanged += 1
            else:
                self._correct_passed_on(kind, wanted, current, following, target, ref, procedures, label)
            return
        # changed by someone else: their edit (or their void) wins while our coding is what it was
        if where is Standing.VOIDED_BY_OTHERS and wanted is not None:
            void = _OthersVoid(kind, wanted, ref, following, procedures, label)
            if coding_unchanged:  # unless the coding of its session changes (`settle`)
                self.voided_by_others.append((target, void))
            else:
                self._write_beside(target, void)
            return
        if coding_unchanged or where is Standing.VOIDED_BY_OTHERS:
            self.result.edits_kept += 1
            return
        ours = f"we would now write {_summary(expected)}" if expected is not None else "we would now void it"
        changed = _changed_fields(current, expected or {}) if expected is not None else ["status"]
        detail = (f"{ref} ({label}) was changed on the server since we wrote it (now {_summary(current)}; "
                  f"differs in: {', '.join(changed)}); {ours}. Nothing written for it: compare the server's "
                  "version with the coding (explain), then correct it on the server, or set it entered-in-error "
                  "so the coding is written beside it")
        conflict_procs = procedures or tuple(sorted(_billed_procedures(current)))
        self.result.conflicts.append(Conflict(conflict_procs, detail))
        self.result.drift.append(DriftItem(Drift.CHANGED_BY_OTHERS, ref, target.label, conflict_procs, detail))

    def _correct_passed_on(self, kind: str, wanted: dict[str, Any] | None, current: dict[str, Any], following: str,
                           target: SessionPlan, ref: str, procedures: tuple[str, ...], label: str) -> None:
        """A billed line: its credit, and the new line beside it; an answered Claim: its replacement or void."""
        why = (f"the coding of session {target.label} changed" if wanted is not None
               else f"session {target.label} no longer bills it")
        try:
            if kind == "ChargeItem":
                credit = credit_for(current, self.settings, self.written_at, why)
                validate_resource(credit, f"credit of {ref}")
                entries = [new_entry(credit, self.settings)]
                if wanted is not None:
                    entries.append(new_entry(replacement_line(wanted, ref, following, self.settings), self.settings))
                target.credits += 1
            elif wanted is not None:
                claim = replacement_claim(wanted, ref, following, self.settings)
                validate_resource(claim, f"replacement of {ref}")
                entries = [new_entry(claim, self.settings)]
            else:
                claim = void_claim(with_contained_provider(current, self.providers), following, self.settings,
                                   self.written_at)
                validate_resource(claim, f"void of {ref}")
                entries = [new_entry(claim, self.settings)]
        except InvalidOutputError as exc:
            self.result.unvoidable.append((ref, str(exc)))
            return
        done = ("credited, and the new coding written beside it" if kind == "ChargeItem" and wanted is not None
                else "credited" if kind == "ChargeItem" else "replaced" if wanted is not None else "voided")
        self._add(target, entries[0], Drift.BILLED_WRONG, ref, procedures,
                  f"{label} has passed on ({_summary(current)}): {done}")
        target.corrections.append(f"{'credit of' if kind == 'ChargeItem' else 'replaces' if wanted else 'voids'} "
                                  f"{ref} ({label}): {why}")
        target.entries += entries[1:]

    def settle(self, target: SessionPlan, drift_before: int) -> None:
        """The lines of `target` that someone else voided and whose own coding did not change: respected, unless
        the coding of their session changed in this pass (then written anew beside the voided ones)."""
        changed = len(self.result.drift) > drift_before
        for session, void in self.voided_by_others:
            if session is not target:
                continue
            if changed:
                self._write_beside(target, void)
            else:
                self.result.edits_kept += 1
        self.voided_by_others = [(s, v) for s, v in self.voided_by_others if s is not target]

    def _write_beside(self, target: SessionPlan, void: _OthersVoid) -> None:
        body = positioned(void.kind, void.wanted, void.following, void.ref, self.settings)
        self._add(target, new_entry(body, self.settings), Drift.MISSING, void.ref, void.procedures,
                  f"{void.label}: voided on the server, and the coding of its session has changed since")

    def _answered_prior(self, kind: str, chain: Chain, current: dict[str, Any]) -> dict[str, Any] | None:
        """For a replacement Claim: the earlier generation it replaces, if a payer answered that one."""
        if kind != "Claim" or recorded_frequency(current, self.settings) == "8":
            return None
        prior = _replaced(current, self.settings)
        found = next((r for r in chain.generations.values() if f"Claim/{r.get('id')}" == prior), None)
        return found if found is not None and prior in self.answered else None

    def _void_answered_in_place(self, target: SessionPlan, current: dict[str, Any], prior: dict[str, Any],
                                value: str, ref: str, procedures: tuple[str, ...], label: str) -> None:
        """A replacement Claim nobody answered yet, while the Claim it replaces was answered: the session no longer
        bills, so the payer must get the void of the answered one. The replacement is still ours: it becomes
        that void (frequency 8) in place."""
        try:
            claim = void_claim(with_contained_provider(prior, self.providers), value, self.settings, self.written_at)
            validate_resource(claim, f"void of Claim/{prior['id']}")
        except InvalidOutputError as exc:
            self.result.unvoidable.append((ref, str(exc)))
            return
        self._add(target, _in_place(current, claim, self.settings), Drift.UNKNOWN, ref, procedures,
                  f"{label}: no longer billed by the coding; it becomes the void of the answered Claim/{prior['id']}")
        target.corrections.append(f"voids Claim/{prior['id']} ({label}): session {target.label} no longer bills it")

    def _void(self, target: SessionPlan, current: dict[str, Any], ref: str, procedures: tuple[str, ...],
              label: str) -> None:
        try:
            entry = void_entry(current, self.settings)
        except InvalidOutputError as exc:
            self.result.unvoidable.append((ref, str(exc)))
            return
        self._add(target, entry, Drift.UNKNOWN, ref, procedures, f"{label}: no longer billed by the coding")
        target.voids += 1

    def _add(self, target: SessionPlan, entry: dict[str, Any], kind: str | None, ref: str,
             procedures: tuple[str, ...], detail: str) -> None:
        target.entries.append(entry)
        if kind is not None:
            self.result.drift.append(DriftItem(kind, ref, target.label, procedures, detail))


def recorded_frequency(claim: dict[str, Any], settings: Settings) -> str | None:
    for extension in claim.get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == settings.claim_frequency_extension:
            return (extension.get("valueCoding") or {}).get("code")
    return None


def plan(report: RunReport, existing: list[dict[str, Any]], tables: CodeTables, *,
         answered: Iterable[str] = (), now: datetime | None = None) -> Plan:
    """The writes that bring the server from `existing` (our earlier output) to what `report` wants.

    `answered`: `Claim/id` of the Claims a ClaimResponse refers to (they have passed to the payer). `now`: the
    time of writing of credits and void Claims (default: the clock)."""
    planner = _Planner(tables, frozenset(answered), instant(now or datetime.now(UTC)))
    result = planner.result
    chains = planner.chains(existing)
    handled: set[tuple[str, str]] = set()
    session_of: dict[str, SessionPlan] = {}
    for out in report.built.sessions:
        sp = _session_plan(out, planner, chains, handled)
        result.sessions.append(sp)
        for ref in sp.procedures:
            session_of[ref] = sp

    under_review = protected_procedures((r.procedure for r in report.reviews),
                                        (p.ref for out in report.built.sessions for p in out.session.procedures))
    orphans: dict[str, SessionPlan] = {}
    for key, chain in sorted(chains.items()):
        if key in handled:
            continue
        current = chain.current
        if current is None:
            continue  # credits only: nothing left to undo
        billed = _billed_procedures(current)
        if billed & under_review:
            result.protected += 1
            continue
        target = next((session_of[r] for r in sorted(billed) if r in session_of), None)
        if target is None:  # its Procedures are gone from every coded session (e.g. entered-in-error)
            owner = reference_of(current.get("subject") or current.get("patient")) or "unknown patient"
            target = orphans.setdefault(owner, SessionPlan(f"stale charges of {owner}", sorted(billed)))
        planner.decide(key[0], key[1], None, chain, target)
    result.sessions += [orphans[k] for k in sorted(orphans)]
    return result


def _session_plan(out: SessionOutput, planner: _Planner, chains: dict[tuple[str, str], Chain],
                  handled: set[tuple[str, str]]) -> SessionPlan:
    sp = SessionPlan(out.session.key.text(), [p.ref for p in out.session.procedures])
    drift_before = len(planner.result.drift)
    for resource in out.resources():
        kind = resource["resourceType"]
        base = identifier_value(resource, planner.systems[kind]) or ""
        handled.add((kind, base))
        planner.decide(kind, base, resource, chains.get((kind, base)), sp)
    planner.settle(sp, drift_before)
    return sp
