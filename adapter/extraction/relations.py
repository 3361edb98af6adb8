"""Rules that relate Procedures to each other before they are coded: units are lesions, not records.

- A child Procedure (`partOf` an FNA) records passes, specimens or guidance of that FNA: it adds no lesion,
  and its guidance evidence is the FNA's.
- A separate imaging-guidance Procedure (76942, 77002, 77012, 77021, or a SNOMED guidance procedure) next
  to an FNA is evidence of the FNA's modality and is never billed.
- The same procedure delivered twice (same identifier, or same patient, provider, time and site) is
  billed once; copies that disagree go to review.

Pure: works on the facts of one run, in an order that does not depend on the input's order.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

from adapter.config import CodeTables
from adapter.extraction.procedures import (
    Disposition,
    Kind,
    Lesion,
    ProcedureFacts,
    Rule,
    decide_modality,
)

KEEP_ON_CHILDREN = {"other-patient", "unknown-modifier-extension", "version-conflict", "unresolved-reference"}
"""Findings of a child Procedure that still need an analyst: the rest concern billing it cannot affect."""


def link(facts: list[ProcedureFacts], tables: CodeTables) -> None:
    """Fold children and guidance Procedures into their FNA, decide modalities, fold duplicate deliveries."""
    ordered = sorted(facts, key=ProcedureFacts.sort_key)
    by_ref = {f.ref: f for f in ordered}
    used: set[str] = set()
    _children(ordered, by_ref, used)
    _siblings(ordered, used)
    for proc in ordered:
        if proc.kind is Kind.FNA and proc.disposition in (Disposition.BILLABLE, Disposition.REVIEW):
            decide_modality(proc, tables)
        elif proc.kind is Kind.GUIDANCE:
            proc.disposition = Disposition.SKIPPED
            proc.findings.clear()
    _duplicates(ordered)


def _root(proc: ProcedureFacts, by_ref: dict[str, ProcedureFacts]) -> ProcedureFacts | None:
    """The FNA at the top of a `partOf` chain above `proc` (None when no FNA is above it)."""
    seen = {proc.ref}
    found: ProcedureFacts | None = None
    current = proc
    while True:
        parent = next((by_ref[t.key] for t in current.part_of if t.key in by_ref), None)
        if parent is None or parent.ref in seen:
            return found
        seen.add(parent.ref)
        if parent.kind is Kind.FNA:
            found = parent
        current = parent


def _children(ordered: list[ProcedureFacts], by_ref: dict[str, ProcedureFacts], used: set[str]) -> None:
    for child in ordered:
        if child.kind not in (Kind.FNA, Kind.GUIDANCE) or not child.part_of:
            continue
        if child.disposition is Disposition.NO_CHARGE:
            continue
        for target in child.part_of:
            if target.key is None:
                child.flag("unresolved-reference", f"partOf {target.written}: {target.problem}")
            elif target.key not in by_ref and child.kind is Kind.FNA:
                child.flag("unresolved-reference", f"partOf {target.key} is not in the input: whether this FNA "
                                                   "records part of another one decides its units")
        parent = _root(child, by_ref)
        if parent is None:
            if child.kind is Kind.FNA and all(t.key in by_ref for t in child.part_of):
                child.note(Rule.PART_OF, "partOf names no FNA: billed as a procedure of its own")
            continue
        if parent.patient and child.patient and parent.patient != child.patient:
            child.flag("other-patient", f"partOf {parent.ref} belongs to {parent.patient}, not to the Procedure's "
                                        f"subject {child.patient}: wrong-patient data is never billed (nor used as "
                                        "its guidance evidence)")
            continue
        used.add(child.ref)
        evidence = [replace(e, element=f"{child.ref} (partOf child) {e.element}") for e in child.evidence]
        if child.status == "completed":
            parent.evidence += evidence
        said = "; its guidance evidence counts for the FNA" if evidence else ""
        if child.kind is Kind.GUIDANCE:
            child.note(Rule.GUIDANCE, f"imaging guidance recorded for {parent.ref} (partOf): evidence of its "
                                      "modality, included in the FNA code and never billed")
            parent.note(Rule.GUIDANCE, f"{child.ref} (partOf child, imaging guidance) is evidence of its modality")
            continue
        keep = [f for f in child.findings if f.reason in KEEP_ON_CHILDREN]
        dropped = len(child.findings) - len(keep)
        child.findings = keep
        child.note(Rule.PART_OF, f"part of {parent.ref}: records passes, specimens or guidance of that FNA and "
                                 f"adds no lesion{said}"
                                 + (f" ({dropped} finding(s) about billing it on its own do not apply)"
                                    if dropped else ""))
        parent.note(Rule.PART_OF, f"{child.ref} is part of it and adds no lesion{said}")
        if keep:
            child.disposition = Disposition.REVIEW
        else:
            child.disposition = Disposition.MERGED
            child.merged_into = parent.ref
            child.merge_basis = "part-of"


def _site_keys(proc: ProcedureFacts) -> set[str]:
    return {lesion.body_structure or lesion.site_key or "" for lesion in proc.lesions} - {""}


def _siblings(ordered: list[ProcedureFacts], used: set[str]) -> None:
    fnas: dict[tuple[str, str], list[ProcedureFacts]] = defaultdict(list)
    for proc in ordered:
        if proc.kind is Kind.FNA and proc.patient and proc.service_date and proc.disposition in (
                Disposition.BILLABLE, Disposition.REVIEW):
            fnas[(proc.patient, proc.service_date)].append(proc)
    for guide in ordered:
        if guide.kind is not Kind.GUIDANCE or guide.ref in used:
            continue
        if guide.status != "completed" or not guide.patient or not guide.service_date:
            guide.note(Rule.GUIDANCE, "imaging guidance, never billed; not used as evidence (not completed, or no "
                                      "patient or date)")
            continue
        candidates = [f for f in fnas.get((guide.patient, guide.service_date), [])
                      if not (f.encounter and guide.encounter and f.encounter != guide.encounter)]
        sites = _site_keys(guide)
        if sites:
            candidates = [f for f in candidates if _site_keys(f) & sites]
        if len(candidates) != 1:
            guide.note(Rule.GUIDANCE, f"imaging guidance, never billed; {len(candidates)} FNAs of the same patient "
                                      "and day could be its own, so it is evidence for none")
            continue
        fna = candidates[0]
        fna.evidence += [replace(e, element=f"{guide.ref} (sibling) {e.element}") for e in guide.evidence]
        guide.note(Rule.GUIDANCE, f"imaging guidance for {fna.ref} (same patient, day"
                                  f"{', encounter' if guide.encounter else ''}{', site' if sites else ''}): evidence "
                                  "of its modality, included in the FNA code and never billed")
        fna.note(Rule.GUIDANCE, f"{guide.ref} (sibling imaging guidance) is evidence of its modality")


def _lesion_identity(lesion: Lesion) -> str:
    if lesion.body_structure:
        return lesion.body_structure
    if "#site:" in lesion.key:
        return "site:" + lesion.key.split("#site:", 1)[1]
    return "(no site)"


def _billing_facts(proc: ProcedureFacts) -> tuple[object, ...]:
    return (proc.session, proc.modality, frozenset(_lesion_identity(lesion) for lesion in proc.lesions))


def _duplicates(ordered: list[ProcedureFacts]) -> None:
    candidates = [p for p in ordered if p.kind is Kind.FNA and p.disposition in
                  (Disposition.BILLABLE, Disposition.REVIEW)]
    parent: dict[str, str] = {p.ref: p.ref for p in candidates}
    why: dict[str, str] = {}
    basis: dict[str, str] = {}

    def find(ref: str) -> str:
        while parent[ref] != ref:
            parent[ref] = parent[parent[ref]]
            ref = parent[ref]
        return ref

    def union(a: str, b: str, reason: str, kind: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
        why.setdefault(b, reason)
        basis.setdefault(b, kind)

    first: dict[object, str] = {}
    for proc in candidates:
        for system, value in proc.identifiers:
            key = ("identifier", system, value)
            if key in first:
                union(first[key], proc.ref, f"the same Procedure.identifier {system}|{value}",
                      "the same Procedure.identifier")
            else:
                first[key] = proc.ref
        if proc.patient and proc.rendering and proc.performed:
            key = ("delivery", proc.patient, proc.rendering, proc.performed,
                   frozenset(_lesion_identity(lesion) for lesion in proc.lesions))
            if key in first:
                union(first[key], proc.ref, "the same patient, provider, performed time and site",
                      "the same patient, provider, performed time and site")
            else:
                first[key] = proc.ref
    groups: dict[str, list[ProcedureFacts]] = defaultdict(list)
    for proc in candidates:
        groups[find(proc.ref)].append(proc)
    for members in groups.values():
        if len(members) < 2:
            continue
        kept = members[0]  # earliest performed, then lowest id: `ordered` is sorted that way
        if len({_billing_facts(p) for p in members}) > 1:
            said = "; ".join(f"{p.ref}: {p.session.text() if p.session else 'no session'}, "
                             f"{p.modality or 'no modality'}, {len(p.lesions)} lesion(s)" for p in members)
            for proc in members:
                proc.conflicting_copies = frozenset(p.ref for p in members if p is not proc)
                proc.flag("duplicate-conflict", f"{', '.join(p.ref for p in members if p is not proc)} "
                                                f"{'is' if len(members) == 2 else 'are'} the same procedure "
                                                f"({why.get(proc.ref) or why.get(members[1].ref)}) but the copies "
                                                f"disagree: {said}")
            continue
        for proc in members[1:]:
            proc.disposition = Disposition.MERGED
            proc.merged_into = kept.ref
            proc.merge_basis = f"duplicate ({basis.get(proc.ref, 'the same procedure')})"
            proc.findings.clear()
            proc.note(Rule.DUPLICATE, f"a second delivery of {kept.ref} ({why.get(proc.ref, 'the same procedure')}): "
                                      "billed once, under that Procedure")
            kept.note(Rule.DUPLICATE, f"{proc.ref} is a second delivery of it ({why.get(proc.ref, '')}): billed once")
