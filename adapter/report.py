"""Human-facing text: the charges table, the diagnostics list and the `explain` answer to "why this code?".

Nothing here prints patient names: sessions are shown by reference (`Patient/id`) only, and the diagnostics
(stderr) mask free text from the resources (adapter.redact); `explain` (stdout) is the detailed answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from adapter.building.resources import OutputWarning, SessionOutput
from adapter.coding.engine import Review, Session
from adapter.config import CodeTables
from adapter.extraction.procedures import RULE_OF_REASON, Kind, ProcedureFacts, Rule
from adapter.extraction.timezones import fna_bases, utc_feed_warning
from adapter.pipeline import RunReport
from adapter.redact import FreeText, scrub
from adapter.sources.files import EntryProblem


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(table_lines(cells[0], cells[1:], widths))


def table_lines(headers: Sequence[str], rows: Iterable[Sequence[str]], widths: Sequence[int]) -> Iterator[str]:
    """The lines of a text table whose column widths are known (the streaming path writes rows as it reads them)."""
    yield "  ".join(c.ljust(w) for c, w in zip(headers, widths, strict=True)).rstrip()
    yield "  ".join("-" * w for w in widths)
    for row in rows:
        yield "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()


def charge_rows(out: SessionOutput) -> list[tuple[object, ...]]:
    """The table rows of one session's charges."""
    key = out.session.key
    return [(key.date, key.patient, key.performer, line.code, "-".join(line.modifiers) or "", line.units,
             ", ".join(r.split("/", 1)[1] for r in line.procedures), "yes" if out.claim else "no")
            for line in out.session.lines]


CHARGE_HEADERS = ("Date", "Patient", "Performer", "CPT", "Mod", "Units", "Procedures", "Claim")


def charges_table(report: RunReport) -> str:
    rows = [row for out in report.built.sessions for row in charge_rows(out)]
    if not rows:
        return "No charges."
    return text_table(CHARGE_HEADERS, rows)


def free_text_of(report: RunReport) -> FreeText:
    """The free text of every input resource, to keep it out of stderr (see adapter.redact)."""
    return FreeText.of([*report.index.by_ref.values(), *(item.resource for item in report.index.without_id)])


def diagnostics(report: RunReport) -> list[str]:
    """One line per thing an analyst should know, most urgent first.

    These lines go to stderr: free text from the resources is masked and patient references follow the
    redaction mode; `explain` shows everything. The streaming path (adapter/streaming) writes the same lines,
    in the same order, from the same functions.
    """
    text: FreeText | None = None

    def mask(line: str) -> str:  # the input's free text is collected only for a line that may hold some
        nonlocal text
        if text is None:
            text = free_text_of(report)
        return text.mask(line)

    out = [unreadable_line(err) for err in report.read.unreadable]
    out += [problem_line(p) for p in report.problems]
    out += [info_line(n) for n in report.read.notes]
    out += [review_line(r, mask) for r in report.reviews]
    out += [warning_line(w, mask) for w in report.built.warnings]
    out += [conflict_line(ref, origins) for ref, origins in report.index.conflicts.items()
            if not ref.startswith("Procedure/")]
    out += [duplicate_line(ref, kept, old) for ref, kept, old in report.index.duplicates]
    out += [merged_line(f) for f in report.coding.merged]
    out += [no_charge_line(f) for f in report.coding.no_charge]
    out += [skipped_line(f) for f in report.coding.skipped]
    utc = utc_feed_warning(fna_bases(report.facts))
    return [*out, utc] if utc else out


def unreadable_line(err: object) -> str:
    return f"error: cannot read {err}"


def problem_line(problem: EntryProblem) -> str:
    return f"error: {problem.origin}: {problem.reason}"


def info_line(note: EntryProblem) -> str:
    return f"info: {note.origin}: {note.reason}"


def review_line(review: Review, mask: Callable[[str], str]) -> str:
    return f"review: {review.procedure} ({review.origin}): {review.reason}: {mask(review.detail)}"


def warning_line(warning: OutputWarning, mask: Callable[[str], str]) -> str:
    return f"warning: {warning.code}: {mask(warning.detail)}"


def conflict_line(ref: str, origins: Sequence[str]) -> str:
    # the resource may be a Patient: its reference follows the redaction mode, like every line on stderr
    return scrub(f"warning: {ref} has {len(origins)} different copies with the same version ({', '.join(origins)}): "
                 "the copy used was chosen by content, not by recency")


def duplicate_line(ref: str, kept: str, old: str) -> str:
    return scrub(f"warning: duplicate {ref}: {kept} replaces {old}")


def merged_line(proc: ProcedureFacts) -> str:
    return f"{_merged_label(proc)}: {proc.ref}: billed under {proc.merged_into}"


def no_charge_line(proc: ProcedureFacts) -> str:
    if proc.included_in == proc.ref:
        return f"no charge: {proc.ref}: its own Procedure.code includes the FNA (an endoscopic code)"
    if proc.included_in:
        return f"no charge: {proc.ref}: included in {proc.included_in} (its code includes the FNA)"
    return f"no charge: {proc.ref}: {proc.no_charge_why or f'status {proc.status}'}"


def skipped_line(proc: ProcedureFacts) -> str:
    return f"skipped: {proc.ref}: {_skip_reason(proc)}"


def output_counts(report: RunReport) -> tuple[int, int, int, int]:
    """(sessions, charge lines, units, claims) of what the output holds: a session held back while it was built
    (its output failed validation, or a ChargeItem could not be made) is in review, not counted as coded."""
    built = report.built.sessions
    return (len(built), sum(len(s.charge_items) for s in built),
            sum(line.units for s in built for line in s.session.lines), sum(1 for s in built if s.claim))


def summary(report: RunReport) -> str:
    sessions, lines, units, claims = output_counts(report)
    return summary_text(len(report.facts), sessions, lines, units, claims,
                        len({r.procedure for r in report.reviews}), len(report.coding.no_charge),
                        len(report.coding.skipped), len(report.read.unreadable))


def summary_text(procedures: int, sessions: int, lines: int, units: int, claims: int, reviewed: int,
                 no_charge: int, skipped: int, unreadable: int) -> str:
    return (f"{procedures} Procedures: {sessions} sessions coded, {lines} charge lines ({units} units), "
            f"{claims} claims, {reviewed} need review, {no_charge} no charge, {skipped} skipped, "
            f"{unreadable} unreadable files")


def _merged_label(proc: ProcedureFacts) -> str:
    return "part of" if any(rule == Rule.PART_OF for rule, _ in proc.notes) else "duplicate"


def _merged_rule(proc: ProcedureFacts) -> str:
    return str(Rule.PART_OF if _merged_label(proc) == "part of" else Rule.DUPLICATE)


def _skip_rule(proc: ProcedureFacts) -> str:
    if proc.kind is Kind.CORE:
        return str(Rule.CORE)
    if proc.kind is Kind.GUIDANCE:
        return str(Rule.GUIDANCE)
    if proc.kind is Kind.INCLUDING:
        return str(Rule.INCLUDED)
    return str(Rule.KIND)


def _skip_reason(proc: ProcedureFacts) -> str:
    if proc.kind is Kind.CORE:
        return "core needle biopsy, not an FNA (config/fna-valueset.yaml core_needle_biopsy)"
    if proc.kind is Kind.GUIDANCE:
        return "imaging guidance: included in the FNA code, never billed (config/modalities.yaml guidance_procedures)"
    if proc.kind is Kind.INCLUDING:
        return ("its code already includes the FNA (config/including-procedures.yaml): not ours to bill, it is billed "
                "under its own code by its own workflow")
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
            if proc.included_in:
                out.append(f"No charge {proc.ref}: included in {proc.included_in} (rule {Rule.INCLUDED})")
            elif proc.no_charge_why:
                out.append(f"No charge {proc.ref}: {proc.no_charge_why} (rule {Rule.TEST_DATA})")
            else:
                out.append(f"No charge {proc.ref}: status {proc.status} is not billable (rule {Rule.STATUS})")
            out += _notes(proc, "  ")
    for proc in report.coding.skipped:
        if not wanted or proc.ref == wanted:
            out.append(f"Skipped {proc.ref}: {_skip_reason(proc)} (rule {_skip_rule(proc)})")
            out += _notes(proc, "  ")
    if wanted and not out:
        out.append(f"{wanted} is not in the input")
    return "\n".join(out).rstrip() + "\n"
