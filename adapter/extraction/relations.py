"""Rules that relate Procedures to each other before they are coded: units are lesions, not records.

- A child Procedure (`partOf` an FNA) records passes, specimens or guidance of that FNA: it adds no lesion,
  and its guidance evidence is the FNA's.
- A separate imaging-guidance Procedure (76942, 77002, 77012, 77021, or a SNOMED guidance procedure) next
  to an FNA is evidence of the FNA's modality and is never billed.
- The same procedure delivered twice (same identifier, or same patient, provider, time and site) is
  billed once; copies that disagree go to review.
- An FNA done as part of a procedure whose code already includes the aspiration (EUS-/EBUS-guided sampling:
  config/including-procedures.yaml), as its `partOf` child or in the same session by the same provider, bills
  nothing (rule included-fna).

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
    including_codes,
)

KEEP_ON_CHILDREN = {"other-patient", "unknown-modifier-extension", "version-conflict", "unresolved-reference"}
"""Findings of a child Procedure that still need an analyst: the rest concern billing it cannot affect."""


def link(facts: list[ProcedureFacts], tables: CodeTables) -> None:
    """Fold children and guidance Procedures into their FNA, decide modalities, fold duplicate deliveries."""
    ordered = sorted(facts, key=ProcedureFacts.sort_key)
    by_ref = {f.ref: f for f in ordered}
    used: set[str] = set()
    _included(ordered, by_ref, tables)
    _children(ordered, by_ref, used)
    _siblings(ordered, used)
    for proc in ordered:
        if proc.kind is Kind.FNA and proc.disposition in (Disposition.BILLABLE, Disposition.REVIEW):
            decide_modality(proc, tables)
        elif proc.kind in (Kind.GUIDANCE, Kind.INCLUDING):
            proc.disposition = Disposition.SKIPPED
            proc.findings.clear()
    _duplicates(ordered)


def _including_label(proc: ProcedureFacts, tables: CodeTables) -> tuple[str, str]:
    """(the including codes of `proc` valid on the FNA's date, those not valid on it) as text for explain."""
    valid: list[str] = []
    late: list[str] = []
    for key, _ in including_codes(proc.resource, tables):
        rows = tables.including[key]
        row = rows.on(proc.service_date)
        if row is not None:
            valid.append(f"{row.label()}; source: {row.source}")
        else:
            late.append(f"{key[0]}|{key[1]} (config/including-procedures.yaml rows: {rows.periods()})")
    return "; ".join(valid), "; ".join(late)


def _ancestors(proc: ProcedureFacts, by_ref: dict[str, ProcedureFacts]) -> list[ProcedureFacts]:
    """The Procedures above `proc` along `partOf` (nearest first; a cycle ends the walk)."""
    out: list[ProcedureFacts] = []
    seen = {proc.ref}
    current = proc
    while True:
        parent = next((by_ref[t.key] for t in current.part_of if t.key in by_ref), None)
        if parent is None or parent.ref in seen:
            return out
        seen.add(parent.ref)
        out.append(parent)
        current = parent


NOT_OURS = ("it is not ours to bill (not an FNA code): it is billed under its own code, by the workflow of the "
            "endoscopy or bronchoscopy")


def _include(fna: ProcedureFacts, including: ProcedureFacts, how: str, tables: CodeTables) -> None:
    """`fna` bills nothing: `including`'s code already includes its aspiration (or, when the code is not valid on
    the date of service, review no-row-for-date)."""
    valid, late = _including_label(including, tables)
    if not valid:
        fna.flag("no-row-for-date", f"{including.ref} ({how}) is coded {late}: no row valid on {fna.service_date}, "
                                    "so whether its code includes this FNA cannot be told")
        return
    keep = [f for f in including.findings if f.reason in KEEP_ON_CHILDREN]
    if keep and including is not fna:
        for finding in keep:
            fna.flag(finding.reason, f"{including.ref} ({how}, whose code includes this FNA): {finding.detail}")
        return
    fna.included_in = including.ref
    own = [f for f in fna.findings if f.reason in KEEP_ON_CHILDREN]  # still needs an analyst (as a child would)
    fna.findings = own
    if not own:
        fna.disposition = Disposition.NO_CHARGE
    whose = "its own Procedure.code" if including is fna else f"{including.ref} ({how})"
    other = "the endoscopic code" if including is fna else including.ref
    fna.note(Rule.INCLUDED, f"{whose} is coded {valid}: that code's service already includes the fine needle "
                            f"aspiration, so the FNA bills nothing (NCCI: a component of a more comprehensive "
                            f"service is not reported separately); {other}: {NOT_OURS}")


def _structures(proc: ProcedureFacts) -> set[str]:
    return {lesion.body_structure for lesion in proc.lesions if lesion.body_structure}


def _included(ordered: list[ProcedureFacts], by_ref: dict[str, ProcedureFacts], tables: CodeTables) -> None:
    """FNAs whose aspiration another procedure's code already includes (config/including-procedures.yaml): the FNA
    itself coded with such a code too, a `partOf` ancestor, or a completed Procedure of the same session (patient,
    rendering provider, date of service and encounter when both have one). A same-session procedure that names
    other BodyStructures than the FNA's may be a separate service (distinct site): review."""
    if not tables.including:
        return
    includers = [p for p in ordered if p.kind is Kind.INCLUDING and p.status == "completed"]
    for fna in ordered:
        if fna.kind is not Kind.FNA or fna.disposition not in (Disposition.BILLABLE, Disposition.REVIEW):
            continue
        if including_codes(fna.resource, tables):
            _include(fna, fna, "itself", tables)
            continue
        parent = next((a for a in _ancestors(fna, by_ref) if a.kind is Kind.INCLUDING or
                       (a.kind is Kind.FNA and including_codes(a.resource, tables))), None)
        if parent is not None:
            if parent.status == "completed":
                _include(fna, parent, "partOf", tables)
            else:
                fna.note(Rule.INCLUDED, f"partOf {parent.ref}, whose code includes the FNA, has status "
                                        f"{parent.status}: it includes nothing, so the FNA is billed on its own")
            continue
        if not (fna.patient and fna.rendering and fna.service_date):
            continue
        same = [p for p in includers if p.patient == fna.patient and p.rendering == fna.rendering
                and p.service_date == fna.service_date
                and not (p.encounter and fna.encounter and p.encounter != fna.encounter)]
        if not same:
            continue
        mine = _structures(fna)
        apart = [p for p in same if mine and _structures(p) and not (_structures(p) & mine)]
        if len(apart) == len(same):
            names = ", ".join(f"{p.ref} ({_including_label(p, tables)[0] or 'no valid row'})" for p in apart)
            fna.flag("included-fna-distinct-site", f"{names}, in the same session by the same provider, includes "
                                                   "an FNA, but names other BodyStructures than this FNA's: a "
                                                   "separate site may be billed apart (with a distinct-service "
                                                   "modifier), or this is that sampling; a coder decides")
            continue
        _include(fna, next(p for p in same if p not in apart), "the same session, by the same provider", tables)


def _root(proc: ProcedureFacts, by_ref: dict[str, ProcedureFacts]) -> ProcedureFacts | None:
    """The FNA at the top of a `partOf` chain above `proc` (None when no FNA is above it)."""
    return next((a for a in reversed(_ancestors(proc, by_ref)) if a.kind is Kind.FNA), None)


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
