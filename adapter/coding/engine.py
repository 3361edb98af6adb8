"""The coding rules: from Procedure facts to CPT lines per billing session. Pure, table-driven, explained.

Per session, lesions are ordered (performed start, Procedure id, position in the Procedure) and grouped by
guidance modality. Each group gives its primary code x1 and its add-on x(n-1); the first modality (that
of the earliest lesion) keeps a plain primary, every other modality's primary takes the distinct-service
modifier. A session with any Procedure that needs review is held whole: its add-on units depend on it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from adapter.config import MAI_MEANING, CodeTables
from adapter.extraction.procedures import Disposition, Finding, Kind, Lesion, ProcedureFacts, Rule, SessionKey


@dataclass(frozen=True)
class ChargeLine:
    session: SessionKey
    code: str
    display: str
    modality: str
    role: str
    """`primary` or `add-on`."""
    modifiers: tuple[str, ...]
    units: int
    lesions: tuple[Lesion, ...]
    procedures: tuple[str, ...]
    rule: str
    """Why this line: which lesions, which rule; without the code itself (see `explanation`)."""

    @property
    def explanation(self) -> str:
        return f"{self.label} x{self.units}: {self.rule}"

    @property
    def label(self) -> str:
        return "-".join((self.code, *self.modifiers))


@dataclass(frozen=True)
class Review:
    procedure: str
    origin: str
    reason: str
    detail: str


@dataclass
class Session:
    key: SessionKey
    procedures: list[ProcedureFacts]
    lesions: list[tuple[Lesion, str, str]] = field(default_factory=list)
    """(lesion, modality, Procedure ref) in counting order, each lesion once."""
    repeats: list[tuple[Lesion, str]] = field(default_factory=list)
    """Lesions met again in a later Procedure of the session: (lesion, Procedure ref)."""
    lines: list[ChargeLine] = field(default_factory=list)
    held: bool = False

    @property
    def first_modality(self) -> str | None:
        return self.lesions[0][1] if self.lesions else None


@dataclass
class CodingResult:
    sessions: list[Session] = field(default_factory=list)
    reviews: list[Review] = field(default_factory=list)
    no_charge: list[ProcedureFacts] = field(default_factory=list)
    skipped: list[ProcedureFacts] = field(default_factory=list)
    merged: list[ProcedureFacts] = field(default_factory=list)
    """Procedures billed under another one: duplicate deliveries and `partOf` children."""
    session_reviews_from: int = 0
    mue_reviews_from: int = 0
    """Where in `reviews` those of held sessions (in session order) and those of the MUE check begin; before them
    come the reviews of Procedures without a session (in input order). The streaming path merges batches by it."""

    @property
    def lines(self) -> list[ChargeLine]:
        return [line for s in self.sessions if not s.held for line in s.lines]

    @property
    def coded_sessions(self) -> list[Session]:
        return [s for s in self.sessions if not s.held]


def _lesion_list(lesions: list[Lesion]) -> str:
    return ", ".join(f"{lesion.label} [{lesion.element}]" for lesion in lesions)


def _count_lesions(session: Session) -> list[tuple[tuple[str, str], Finding]]:
    """Fills session.lesions in counting order; a lesion seen under two modalities is a finding for both."""
    seen: dict[str, tuple[str, str]] = {}
    findings: list[tuple[tuple[str, str], Finding]] = []
    for proc in session.procedures:
        for lesion in proc.lesions:
            if lesion.key in seen:
                modality, first_ref = seen[lesion.key]
                session.repeats.append((lesion, proc.ref))
                copies = first_ref in proc.conflicting_copies  # one procedure twice: that is duplicate-conflict
                if proc.modality and modality and proc.modality != modality and not copies:
                    findings.append(((first_ref, proc.ref), Finding("lesion-modality-conflict",
                                            f"{lesion.label} is sampled under {modality} in {first_ref} and "
                                            f"under {proc.modality} in {proc.ref}")))
                continue
            seen[lesion.key] = (proc.modality or "", proc.ref)
            session.lesions.append((lesion, proc.modality or "", proc.ref))
    return findings


def _build_lines(session: Session, tables: CodeTables) -> None:
    groups: dict[str, list[tuple[Lesion, str]]] = defaultdict(list)
    for lesion, modality, ref in session.lesions:
        groups[modality].append((lesion, ref))
    first = session.first_modality
    distinct = tables.settings.distinct_modifier
    for modality, members in groups.items():  # dicts keep first-appearance order
        fam = tables.family[modality].on(session.key.date)
        assert fam is not None, "checked by _family_rows before lines are built"
        name = tables.display_of(modality)
        lesion, ref = members[0]
        if modality == first:
            modifiers: tuple[str, ...] = ()
            why_mod = f"{name} is the session's first modality (earliest lesion), so no modifier"
        else:
            modifiers = (distinct,)
            why_mod = (f"an additional modality in a session that began with {tables.display_of(first or '')}, "
                       f"so modifier {distinct}")
        session.lines.append(ChargeLine(
            session.key, fam.primary, fam.primary_display, modality, "primary", modifiers, 1, (lesion,), (ref,),
            f"first lesion under {name} in this session: {_lesion_list([lesion])}; {why_mod}"))
        extra = members[1:]
        if extra:
            session.lines.append(ChargeLine(
                session.key, fam.add_on, fam.add_on_display, modality, "add-on", (), len(extra),
                tuple(lesion for lesion, _ in extra), tuple(sorted({r for _, r in extra})),
                f"each additional lesion under {name} "
                f"({len(members)} lesions, the first billed as {fam.primary}): "
                f"{_lesion_list([lesion for lesion, _ in extra])}; add-on codes never take a modifier"))


def _family_rows(session: Session, tables: CodeTables) -> list[tuple[str, Finding]]:
    """Every modality of the session needs a row of config/cpt-fna.yaml valid on its date of service (rule
    effective-dates): before 1 January 2019 the FNA family did not exist, and no code is guessed for it."""
    out: list[tuple[str, Finding]] = []
    for _, modality, ref in session.lesions:
        rows = tables.family.get(modality)
        if rows is not None and rows.on(session.key.date) is None:
            out.append((ref, Finding("no-row-for-date", f"config/cpt-fna.yaml has no {tables.display_of(modality)} "
                                                        f"row valid on {session.key.date} (rows: {rows.periods()}): "
                                                        "no FNA code is known for that date")))
    return list(dict.fromkeys(out))


def _same_lesion(fna: Lesion, core: Lesion) -> bool:
    """One BodyStructure; or, when either has none, the same coded site and laterality."""
    if fna.body_structure and core.body_structure:
        return fna.body_structure == core.body_structure
    return fna.site_key is not None and fna.site_key == core.site_key


def _core_conflicts(session: Session, cores: list[ProcedureFacts]) -> list[tuple[str, Finding]]:
    out: list[tuple[str, Finding]] = []
    for core in cores:
        for lesion in core.lesions:
            for fna_lesion, _, ref in session.lesions:
                if _same_lesion(fna_lesion, lesion):
                    how = "BodyStructure" if lesion.body_structure and fna_lesion.body_structure else \
                        "coded site and laterality"
                    out.append((ref, Finding(
                        "core-biopsy-same-lesion",
                        f"{core.ref} (core needle biopsy) sampled the same lesion {lesion.label} on this day (same "
                        f"{how}): FNA and core biopsy of one lesion are billable together only when the FNA "
                        "sample was inadequate")))
    return out


def _hold(session: Session, own: dict[str, list[Finding]], result: CodingResult, because: str = "") -> None:
    session.held = True
    session.lines.clear()
    held_refs = [p.ref for p in session.procedures if own.get(p.ref)]
    why = because or (f"{', '.join(held_refs)} needs review: its lesions decide this Procedure's primary/add-on "
                      "codes")
    for proc in session.procedures:
        findings = own.get(proc.ref) or [Finding("session-held", f"held with its session because {why}")]
        result.reviews.extend(Review(proc.ref, proc.origin, f.reason, f.detail) for f in findings)


def code_procedures(facts: list[ProcedureFacts], tables: CodeTables) -> CodingResult:
    """Codes every session of `facts`. Pure: same facts and tables, same result."""
    result = CodingResult()
    by_session: dict[SessionKey, list[ProcedureFacts]] = defaultdict(list)
    cores: dict[tuple[str, str], list[ProcedureFacts]] = defaultdict(list)
    for proc in facts:
        if proc.disposition is Disposition.SKIPPED or proc.kind is Kind.GUIDANCE:
            result.skipped.append(proc)
        elif proc.kind is Kind.CORE:  # not ours to bill, but it can make an FNA of the same lesion unbillable
            result.skipped.append(proc)
            if proc.status == "completed" and proc.patient and proc.service_date:
                cores[(proc.patient, proc.service_date)].append(proc)
        elif proc.disposition is Disposition.NO_CHARGE:
            result.no_charge.append(proc)
        elif proc.disposition is Disposition.MERGED:
            result.merged.append(proc)
        elif proc.session is None:
            result.reviews.extend(Review(proc.ref, proc.origin, f.reason, f.detail) for f in proc.findings)
        else:
            by_session[proc.session].append(proc)

    result.session_reviews_from = len(result.reviews)
    forced = _join_sessions(by_session)
    for key in sorted(by_session):
        session = Session(key, sorted(by_session[key], key=ProcedureFacts.sort_key))
        result.sessions.append(session)
        own: dict[str, list[Finding]] = {p.ref: list(p.findings) for p in session.procedures}
        for refs, finding in _count_lesions(session):
            for ref in refs:
                own[ref].append(finding)
        for ref, finding in _core_conflicts(session, cores.get((key.patient, key.date), [])):
            own[ref].append(finding)
        for ref, finding in _family_rows(session, tables):
            own[ref].append(finding)
        if any(own.values()) or key in forced:
            _hold(session, own, result, forced.get(key, "") if not any(own.values()) else "")
            continue
        _build_lines(session, tables)
    result.mue_reviews_from = len(result.reviews)
    _check_mue(result, tables)
    return result


def _join_sessions(by_session: dict[SessionKey, list[ProcedureFacts]]) -> dict[SessionKey, str]:
    """A Procedure without an encounter joins the session of the same patient, provider and date when exactly
    one such session has an encounter. With several, it needs review and every candidate session waits for
    it (its lesion could change their codes). Returns the sessions to hold, with why."""
    with_encounter: dict[tuple[str, str, str], list[SessionKey]] = defaultdict(list)
    for key in by_session:
        if key.encounter:
            with_encounter[(key.date, key.patient, key.performer)].append(key)
    forced: dict[SessionKey, str] = {}
    for key in sorted(k for k in by_session if not k.encounter):
        targets = sorted(with_encounter.get((key.date, key.patient, key.performer), []))
        if len(targets) == 1:
            target = targets[0]
            for proc in by_session[key]:
                proc.note(Rule.SESSION, f"no encounter: joins the one session of the same patient, provider and date "
                                        f"({target.encounter})")
                proc.session = target
            by_session[target].extend(by_session.pop(key))
        elif targets:
            names = ", ".join(t.encounter for t in targets)
            for proc in by_session[key]:
                proc.flag("session-ambiguous", f"no encounter, and {len(targets)} sessions of the same patient, "
                                               f"provider and date ({names}) could be its own")
            waiting = ", ".join(p.ref for p in by_session[key])
            for target in targets:
                forced[target] = f"{waiting} (no encounter) may belong to this session and needs review"
    return forced


def _check_mue(result: CodingResult, tables: CodeTables) -> None:
    """MUE limits are per patient and provider: with a date-of-service indicator (MAI 2 or 3, or none) the units
    of a code are added up over every session of that day (two encounters on one day are two sessions, but one
    MUE day); with MAI 1 (a claim-line edit) each line is checked on its own. The row is the one valid on the date
    of service; a code with rows, none valid then, is not checked against a guess: review. Over the limit ->
    review, never cut."""
    per_day: dict[tuple[str, str, str, str], list[tuple[Session, ChargeLine]]] = defaultdict(list)
    for session in result.coded_sessions:
        for n, line in enumerate(session.lines):
            if line.code in tables.mue:
                row = tables.mue[line.code].on(session.key.date)
                per_line = row is not None and not row.per_day
                per_day[(session.key.patient, session.key.performer, session.key.date,
                         line.code + (f"#{id(session)}:{n}" if per_line else ""))].append((session, line))
    over: dict[int, tuple[Session, dict[str, list[Finding]]]] = {}
    for (_, _, day, _), members in per_day.items():
        code = members[0][1].code
        rows = tables.mue[code]
        row = rows.on(day)
        units = sum(line.units for _, line in members)
        if row is None:
            finding = Finding("no-row-for-date", f"config/mue.yaml has rows for {code} ({rows.periods()}) but none "
                                                 f"valid on {day}: its MUE limit that day is unknown (import the "
                                                 "quarter's CMS table: charge-adapter mue import)")
        elif units <= row.units:
            continue
        else:
            where = "" if len(members) == 1 else f" on {day} over {len(members)} sessions"
            why = f" ({row.rationale})" if row.rationale else ""
            finding = Finding("mue-exceeded", f"{code} x{units}{where} exceeds its MUE limit of {row.units} "
                                              f"(config/mue.yaml{why}; {MAI_MEANING[row.mai]}); never cut silently")
        for session, line in members:
            _, own = over.setdefault(id(session), (session, {p.ref: [] for p in session.procedures}))
            for ref in line.procedures:
                own[ref].append(finding)
    for session, own in over.values():
        _hold(session, own, result)
