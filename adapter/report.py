"""Human-facing text: the charges table, the diagnostics list and the `explain` answer to "why this code?".

Nothing here prints patient names: sessions are shown by reference (`Patient/id`) only, and the diagnostics
(stderr) mask free text from the resources (adapter.redact); `explain` (stdout) is the detailed answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from adapter.coding.engine import Session
from adapter.config import CodeTables
from adapter.extraction.procedures import RULE_OF_REASON, Kind, ProcedureFacts, Rule
from adapter.pipeline import RunReport
from adapter.redact import FreeText


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def charges_table(report: RunReport) -> str:
    rows = []
    for out in report.built.sessions:
        key = out.session.key
        for line in out.session.lines:
            rows.append((key.date, key.patient, key.performer, line.code, "-".join(line.modifiers) or "",
                         line.units, ", ".join(r.split("/", 1)[1] for r in line.procedures),
                         "yes" if out.claim else "no"))
    if not rows:
        return "No charges."
    return text_table(("Date", "Patient", "Performer", "CPT", "Mod", "Units", "Procedures", "Claim"), rows)


def free_text_of(report: RunReport) -> FreeText:
    """The free text of every input resource, to keep it out of stderr (see adapter.redact)."""
    return FreeText.of([*report.index.by_ref.values(), *(item.resource for item in report.index.without_id)])


def diagnostics(report: RunReport) -> list[str]:
    """One line per thing an analyst should know, most urgent first.

    These lines go to stderr: free text from the resources is masked and patient references follow the
    redaction mode; `explain` shows everything.
    """
    text = free_text_of(report)
    out = [f"error: cannot read {err}" for err in report.read.unreadable]
    out += [f"error: {p.origin}: {p.reason}" for p in report.problems]
    out += [f"review: {r.procedure} ({r.origin}): {r.reason}: {text.mask(r.detail)}" for r in report.reviews]
    out += [f"warning: {w.code}: {text.mask(w.detail)}" for w in report.built.warnings]
    out += [f"warning: {ref} has {len(origins)} different copies with the same version ({', '.join(origins)}): "
            "the copy used was chosen by content, not by recency"
            for ref, origins in report.index.conflicts.items() if not ref.startswith("Procedure/")]
    out += [f"warning: duplicate {ref}: {kept} replaces {old}" for ref, kept, old in report.index.duplicates]
    out += [f"{_merged_label(f)}: {f.ref}: billed under {f.merged_into}" for f in report.coding.merged]
    out += [f"no charge: {f.ref}: status {f.status}" for f in report.coding.no_charge]
    out += [f"skipped: {f.ref}: {_skip_reason(f)}" for f in report.coding.skipped]
    return out


def summary(report: RunReport) -> str:
    lines = report.coding.lines
    return (f"{len(report.facts)} Procedures: {len(report.coding.coded_sessions)} sessions coded, "
            f"{len(lines)} charge lines ({sum(line.units for line in lines)} units), "
            f"{sum(1 for s in report.built.sessions if s.claim)} claims, "
            f"{len({r.procedure for r in report.reviews})} need review, "
            f"{len(report.coding.no_charge)} no charge, {len(report.coding.skipped)} skipped, "
            f"{len(report.read.unreadable)} unreadable files")


def _merged_label(proc: ProcedureFacts) -> str:
    return "part of" if any(rule == Rule.PART_OF for rule, _ in proc.notes) else "duplicate"


def _merged_rule(proc: ProcedureFacts) -> str:
    return str(Rule.PART_OF if _merged_label(proc) == "part of" else Rule.DUPLICATE)


def _skip_rule(proc: ProcedureFacts) -> str:
    if proc.kind is Kind.CORE:
        return str(Rule.CORE)
    if proc.kind is Kind.GUIDANCE:
        return str(Rule.GUIDANCE)
    return str(Rule.KIND)


def _skip_reason(proc: ProcedureFacts) -> str:
    if proc.kind is Kind.CORE:
        return "core needle biopsy, not an FNA (config/fna-valueset.yaml core_needle_biopsy)"
    if proc.kind is Kind.GUIDANCE:
        return "imaging guidance: included in the FNA code, never billed (config/modalities.yaml guidance_procedures)"
    return "not an FNA biopsy (Procedure.code is not in config/fna-valueset.yaml)"


def _notes(proc: ProcedureFacts, indent: str) -> list[str]:
    return [f"{indent}(rule {rule}) {text}" for rule, text in proc.notes]


def _procedure_line(proc: ProcedureFacts, tables: CodeTables) -> list[str]:
    out = [f"  {proc.ref}  performed {proc.performed_text}  status {proc.status}  from {proc.origin}"]
    out += _notes(proc, "    ")
    if proc.modality:
        agreeing = sum(1 for ev in proc.evidence if ev.modality)
        why = (f"{agreeing} piece(s) of guidance evidence, all agreeing" if agreeing
               else "no guidance evidence (see below)")
        out.append(f"    (rule {Rule.MODALITY}) modality: {tables.display_of(proc.modality)}: {why}")
    for ev in proc.evidence:
        said = f"-> {tables.display_of(ev.modality)}" if ev.modality else "-> not a guidance code in the tables"
        out.append(f"      evidence {ev.describe()} {said}")
    if proc.modality_note:
        out.append(f"      (rule {Rule.MODALITY}) {proc.modality_note}")
    if proc.lesion_note:
        out.append(f"    (rule {Rule.LESIONS}) lesions: {proc.lesion_note}")
    return out


def explain_session(session: Session, report: RunReport, tables: CodeTables) -> list[str]:
    key = session.key
    state = "HELD for review" if session.held else "coded"
    out = [f"Session {key.date}  {key.patient}  {key.performer}  {key.encounter or '(no encounter)'}  [{state}]",
           " Procedures (in counting order):"]
    for proc in session.procedures:
        out += _procedure_line(proc, tables)
    out.append(" Lesions (each counted once, in order):")
    for n, (lesion, modality, ref) in enumerate(session.lesions, start=1):
        out.append(f"  {n}. {lesion.label}  from {ref} {lesion.element}  -> {tables.display_of(modality)}")
    for lesion, ref in session.repeats:
        out.append(f"  (rule {Rule.LESIONS}) again: {lesion.label} in {ref} {lesion.element}: the same lesion, "
                   "not counted twice")
    if session.held:
        out.append(" Lines: none while held; see the review list")
    else:
        out.append(" Lines:")
        out += [f"  (rule {Rule.CODING}) {line.explanation}" for line in session.lines]
        built = next((s for s in report.built.sessions if s.session is session), None)
        waiting = sorted({r.reason for r in report.built.reviews if r.procedure in {p.ref for p in session.procedures}})
        if built is None and waiting:
            rules = " ".join(dict.fromkeys(f"(rule {RULE_OF_REASON.get(w, w)})" for w in waiting))
            out.append(f" Nothing written: held in review ({', '.join(waiting)}) {rules}")
        elif built is not None and built.claim:
            out.append(f" Claim: yes (rule {Rule.BILLING})")
        elif waiting:
            out.append(f" Claim: waits in review ({', '.join(waiting)}); the ChargeItems are written "
                       f"(rule {Rule.BILLING})")
        else:
            out.append(f" Claim: none (no active Coverage, or claims are off) (rule {Rule.BILLING})")
        out += [f"  (rule {Rule.BILLING}) {note}" for note in (built.notes if built else [])]
    return out


def explain(report: RunReport, tables: CodeTables, procedure: str | None = None) -> str:
    """Per session: Procedures, modality evidence, lesions with their source elements, lines with rules."""
    wanted = None
    if procedure:
        wanted = procedure if procedure.startswith("Procedure/") else f"Procedure/{procedure}"
    out: list[str] = []
    for session in report.coding.sessions:
        if wanted and wanted not in {p.ref for p in session.procedures}:
            continue
        out += [*explain_session(session, report, tables), ""]
    for review in report.reviews:
        if not wanted or review.procedure == wanted:
            rule = RULE_OF_REASON.get(review.reason, review.reason)
            out.append(f"Review {review.procedure}: {review.reason} (rule {rule}): {review.detail}")
    for proc in report.facts:  # reviewed without a session: the decisions taken before it stopped
        if proc.session is None and proc.findings and (not wanted or proc.ref == wanted):
            out += _notes(proc, f"  {proc.ref} ")
    for proc in report.coding.merged:
        if not wanted or proc.ref == wanted:
            out.append(f"{_merged_label(proc).capitalize()} {proc.ref}: billed under {proc.merged_into} "
                       f"(rule {_merged_rule(proc)})")
            out += _notes(proc, "  ")
    for proc in report.coding.no_charge:
        if not wanted or proc.ref == wanted:
            out.append(f"No charge {proc.ref}: status {proc.status} is not billable (rule {Rule.STATUS})")
            out += _notes(proc, "  ")
    for proc in report.coding.skipped:
        if not wanted or proc.ref == wanted:
            out.append(f"Skipped {proc.ref}: {_skip_reason(proc)} (rule {_skip_rule(proc)})")
            out += _notes(proc, "  ")
    if wanted and not out:
        out.append(f"{wanted} is not in the input")
    return "\n".join(out).rstrip() + "\n"
