"""DFT^P03 charge messages: what a coded session's charges carry, and the message built and validated with hl7apy.

Two steps, so a reversal can repeat exactly what an earlier message carried:

1. `session_charges` reads a run (pure): per coded session a `Visit` (what PID and PV1 say) and one `Charge`
   per line (what its FT1 says), or the review reasons naming what the message needs and the input lacks.
   These records are what the ledger keeps for every message sent.
2. `render` turns a Visit and Charges into one DFT^P03 (FT1-6 CG for charges, CD for the credit of earlier
   charges), written by string formatting and validated strictly for the configured version: structure,
   cardinality, data types, lengths, and every value of an HL7 table (hl7apy reports those as warnings; here
   they are errors). checks.py says how: every value each time, each message shape by hl7apy once.

docs/output.md lists the source of every field.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from adapter.billing.diagnoses import plan_diagnoses
from adapter.billing.parties import referral
from adapter.billing.pricing import chargemaster_row
from adapter.coding.engine import Review
from adapter.config import CodeTables
from adapter.errors import OutputError
from adapter.extraction.index import ResourceIndex
from adapter.extraction.procedures import ProcedureFacts
from adapter.hl7v2.checks import ShapeCheck, ValueProblem, check_values
from adapter.tables.billing import NPI_SYSTEM
from adapter.tables.hl7v2 import Hl7v2Tables, IdentifierRule

IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
NPI_AUTHORITY = "NPI&2.16.840.1.113883.4.6&ISO"
"""XCN.9: the NPI's assigning authority (CMS NPPES OID)."""
CHARGE, CREDIT = "CG", "CD"
"""FT1-6 transaction types (HL7 table 0017)."""
_SEX = {"male": "M", "female": "F", "other": "O", "unknown": "U"}
_SPECIAL = re.compile(r"[\r\n\t|^&~\\]")
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


_LOCAL_SYSTEM_WARNING = re.compile(r"^Warning: Value 99[A-Z0-9]{1,3} not in table HL70396 ")
"""Table 0396 reserves 99zzz for local coding systems (the chargemaster's); hl7apy's copy does not list them."""


class InvalidMessageError(OutputError):
    """A message failed hl7apy's strict validation: a bug or a bad table, never sent."""


def escape(value: Any) -> str:
    """A value for an HL7 v2 field: delimiters escaped, line breaks and tabs as spaces, trimmed."""
    text = str(value)
    if not _SPECIAL.search(text):  # the common case: nothing to replace
        return text.strip()
    text = re.sub(r"[\r\n\t]+", " ", text).strip()
    for raw, escaped in _ESCAPES:
        text = text.replace(raw, escaped)
    return text


def hl7_time(value: str) -> str:
    """A FHIR date or dateTime as an HL7 TS, keeping its precision and offset (`Z` is +0000)."""
    match = re.match(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2}))?(?:\.\d+)?"
                     r"(Z|[+-]\d{2}:\d{2})?)?)?)?$", value.strip())
    if not match:
        raise ValueError(f"not a FHIR date or dateTime: {value!r}")
    year, month, day, hour, minute, second, zone = match.groups()
    out = year + (month or "") + (day or "")
    if hour:
        out += hour + minute + (second or "00")
        if zone:
            out += "+0000" if zone == "Z" else zone.replace(":", "")
    return out


def hl7_now(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("the clock must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


# -- records: what a message carries ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Person:
    """A provider as an XCN: NPI (when known) and name."""

    npi: str = ""
    family: str = ""
    given: str = ""
    middle: str = ""
    prefix: str = ""

    def xcn(self) -> str:
        parts = [self.npi, self.family, self.given, self.middle, "", self.prefix, "", "",
                 NPI_AUTHORITY if self.npi else "", "L" if self.family else "", "", "", "NPI" if self.npi else ""]
        return "^".join(escape(p) if i not in (8,) else p for i, p in enumerate(parts)).rstrip("^")


@dataclass(frozen=True)
class Coded:
    """A CE: code, text, HL7 coding system (table 0396)."""

    code: str
    text: str
    system: str

    def ce(self) -> str:
        return "^".join((escape(self.code), escape(self.text), escape(self.system)))


@dataclass(frozen=True)
class Visit:
    """What PID and PV1 carry. `patient` (Patient/x) is the ledger's key and never part of a message."""

    patient: str
    mrn: str
    mrn_authority: str
    mrn_type: str
    family: str
    given: str
    middle: str
    birth_date: str
    sex: str
    visit_number: str
    visit_authority: str
    visit_type: str
    patient_class: str
    attending: Person | None = None

    @property
    def account(self) -> dict[str, str]:
        """What a charge is posted to: a change here is a new charge (and the credit of the old one)."""
        return {"mrn": self.mrn, "mrn_authority": self.mrn_authority, "visit": self.visit_number,
                "visit_authority": self.visit_authority, "class": self.patient_class}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Visit:
        attending = data.get("attending")
        return cls(**{**data, "attending": Person(**attending) if attending else None})


@dataclass(frozen=True)
class Charge:
    """What one FT1 carries."""

    line: str
    """The charge line's deterministic identifier (ChargeItem.identifier value): FT1-2."""
    session: str
    procedures: tuple[str, ...]
    service_time: str
    """HL7 TS of the earliest Procedure of the line: FT1-4."""
    code: Coded
    modifiers: tuple[Coded, ...]
    transaction: Coded
    """FT1-7: the chargemaster charge code, or the CPT code when the chargemaster has no row."""
    units: int
    unit_price: str | None
    currency: str | None
    performer: Person
    ordering: Person | None
    diagnoses: tuple[Coded, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Charge:
        return cls(
            line=data["line"], session=data["session"], procedures=tuple(data["procedures"]),
            service_time=data["service_time"], code=Coded(**data["code"]),
            modifiers=tuple(Coded(**m) for m in data["modifiers"]), transaction=Coded(**data["transaction"]),
            units=int(data["units"]), unit_price=data.get("unit_price"), currency=data.get("currency"),
            performer=Person(**data["performer"]),
            ordering=Person(**data["ordering"]) if data.get("ordering") else None,
            diagnoses=tuple(Coded(**d) for d in data["diagnoses"]))

    @property
    def label(self) -> str:
        return "-".join((self.code.code, *(m.code for m in self.modifiers)))

    def version(self, visit: Visit) -> str:
        """The charge version: a digest of everything billed (what, how many, for how much, by whom, for which
        diagnoses, on which account). Equal versions are the same charge; a new version replaces the old."""
        content = {k: v for k, v in self.to_json().items() if k not in ("session", "procedures")}
        content["account"] = visit.account
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class SessionCharges:
    """One coded session, ready for a message."""

    session: str
    patient: str
    procedures: list[str]
    visit: Visit
    charges: list[Charge] = field(default_factory=list)


# -- reading the run -----------------------------------------------------------------------------------------

def _codings(concept: Any) -> list[dict[str, Any]]:
    if not isinstance(concept, dict):
        return []
    return [c for c in concept.get("coding") or [] if isinstance(c, dict) and c.get("code")]


def _identifier(resource: dict[str, Any], rule: IdentifierRule) -> str | None:
    """The identifier with the rule's v2-0203 type, else the first of the rule's systems."""
    idents = [i for i in resource.get("identifier") or [] if isinstance(i, dict) and i.get("value")]
    for ident in idents:
        if any(c.get("code") == rule.type and c.get("system", IDENTIFIER_TYPE) == IDENTIFIER_TYPE
               for c in _codings(ident.get("type"))):
            return str(ident["value"])
    for system in rule.systems:
        for ident in idents:
            if ident.get("system") == system:
                return str(ident["value"])
    return None


def _name(resource: dict[str, Any] | None) -> tuple[str, str, str, str]:
    """(family, given, middle, prefix) of the official name, else the first."""
    names = [n for n in (resource or {}).get("name") or [] if isinstance(n, dict)]
    if not names:
        return "", "", "", ""
    name = next((n for n in names if n.get("use") == "official"), names[0])
    given = [g for g in name.get("given") or [] if isinstance(g, str)]
    prefix = [p for p in name.get("prefix") or [] if isinstance(p, str)]
    return (str(name.get("family") or ""), given[0] if given else "", " ".join(given[1:]),
            prefix[0] if prefix else "")


def _practitioner(ref: str, index: ResourceIndex) -> dict[str, Any] | None:
    """A Practitioner, or the practitioner of a PractitionerRole (its own identifiers count too)."""
    resource = index.get(ref)
    if ref.startswith("PractitionerRole/") and resource:
        return index.get(index.key_of(resource.get("practitioner"), ref)) or None
    return resource


def _person(ref: str | None, index: ResourceIndex) -> Person | None:
    if not ref:
        return None
    practitioner = _practitioner(ref, index)
    role = index.get(ref) if ref.startswith("PractitionerRole/") else None
    npi = ""
    for source in (practitioner, role):
        for ident in (source or {}).get("identifier") or []:
            if isinstance(ident, dict) and ident.get("system") == NPI_SYSTEM and ident.get("value") and not npi:
                npi = str(ident["value"])
    family, given, middle, prefix = _name(practitioner)
    if not npi and not family:
        return None
    return Person(npi, family, given, middle, prefix)


def _attending(encounter: dict[str, Any] | None, encounter_ref: str, index: ResourceIndex) -> Person | None:
    for participant in (encounter or {}).get("participant") or []:
        if not isinstance(participant, dict):
            continue
        types = [c.get("code") for t in participant.get("type") or [] for c in _codings(t)]
        if "ATND" in types:
            return _person(index.key_of(participant.get("individual"), encounter_ref), index)
    return None


def _ordering(procs: list[ProcedureFacts], index: ResourceIndex) -> Person | None:
    """The requester of the ServiceRequest the session's Procedures are basedOn."""
    request = referral(procs, index)
    if not request:
        return None
    return _person(index.key_of((index.get(request) or {}).get("requester"), request), index)


def _visit(out_key: Any, index: ResourceIndex, tables: Hl7v2Tables) -> tuple[Visit | None, list[tuple[str, str]]]:
    """The session's Visit, or the gaps: (review reason, what is missing and where it was looked for)."""
    gaps: list[tuple[str, str]] = []
    patient = index.get(out_key.patient) or {}
    mrn = _identifier(patient, tables.mrn)
    if not mrn:
        systems = f" nor one of the systems {', '.join(tables.mrn.systems)}" if tables.mrn.systems else ""
        gaps.append(("hl7v2-missing-mrn", f"PID-3 needs the MRN: {out_key.patient} has no identifier of type "
                                          f"{tables.mrn.type}{systems} (config/hl7v2.yaml mrn)"))
    family, given, middle, _ = _name(patient)
    if not family and not given:
        gaps.append(("hl7v2-missing-patient-name", f"PID-5 needs the patient's name: {out_key.patient} has none"))
    encounter = index.get(out_key.encounter) if out_key.encounter else None
    visit_number, patient_class = None, None
    if not out_key.encounter:
        gaps.append(("hl7v2-missing-visit-number", "PV1-19 needs the visit number: the session has no Encounter"))
    elif encounter is None:
        gaps.append(("hl7v2-missing-visit-number", f"PV1-19 needs the visit number: {out_key.encounter} is not "
                                                   "in the input"))
    else:
        visit_number = _identifier(encounter, tables.visit_number)
        if not visit_number:
            systems = f" nor one of the systems {', '.join(tables.visit_number.systems)}" \
                if tables.visit_number.systems else ""
            gaps.append(("hl7v2-missing-visit-number", f"PV1-19 needs the visit number: {out_key.encounter} has no "
                                                       f"identifier of type {tables.visit_number.type}{systems} "
                                                       "(config/hl7v2.yaml visit_number)"))
        klass = encounter.get("class")
        code = klass.get("code") if isinstance(klass, dict) else None
        patient_class = tables.patient_class.get(str(code)) if code else None
        if not patient_class:
            gaps.append(("hl7v2-missing-patient-class", f"PV1-2 needs the patient class: {out_key.encounter} class "
                                                        f"{code or '(none)'} is not in config/hl7v2.yaml "
                                                        "patient_class"))
    if gaps:
        return None, gaps
    assert mrn and visit_number and patient_class
    birth = patient.get("birthDate")
    return Visit(out_key.patient, mrn, tables.mrn.assigning_authority, tables.mrn.type, family, given, middle,
                 hl7_time(birth) if isinstance(birth, str) else "", _SEX.get(str(patient.get("gender")), ""),
                 visit_number, tables.visit_number.assigning_authority, tables.visit_number.type, patient_class,
                 _attending(encounter, out_key.encounter, index)), []


def session_charges(report: Any, tables: CodeTables) -> tuple[list[SessionCharges], list[Review]]:
    """Every coded session of `report` (a `pipeline.RunReport`) as Visit + Charges, or reviews naming what is
    missing. Pure: reads the run and the tables."""
    conf = tables.hl7v2
    systems = conf.coding_systems
    out: list[SessionCharges] = []
    reviews: list[Review] = []
    index: ResourceIndex = report.index
    for built in report.built.sessions:
        session = built.session
        key = session.key
        visit, gaps = _visit(key, index, conf)
        performer = _person(key.performer, index)
        if performer is None or not performer.npi:
            gaps.append(("hl7v2-missing-npi", f"FT1-20 needs the performing provider's NPI: {key.performer} has no "
                                              f"identifier {NPI_SYSTEM}"))
        plan = plan_diagnoses(session, index, tables.billing)
        if plan.problems:
            gaps.append(("hl7v2-missing-diagnosis", "FT1-19 needs an ICD-10-CM diagnosis for every line: "
                                                    + "; ".join(plan.problems)))
        if gaps:
            reviews += [Review(p.ref, p.origin, reason, f"HL7 v2 charges of session {key.text()} wait: {detail}")
                        for reason, detail in gaps for p in session.procedures]
            continue
        assert visit is not None and performer is not None
        ordering = _ordering(session.procedures, index)
        diagnoses = [Coded(c["code"], c.get("display", ""), systems[c["system"]]) for c in plan.codings]
        day = date.fromisoformat(key.date)
        charges = SessionCharges(key.text(), key.patient, [p.ref for p in session.procedures], visit)
        for n, (line, item) in enumerate(zip(session.lines, built.charge_items, strict=True)):
            price = built.prices[n] if n < len(built.prices) else None
            row = chargemaster_row(tables.billing.pricing.chargemaster, line.code, line.modifiers, day)
            cpt = Coded(line.code, line.display, systems[tables.cpt_system])
            transaction = Coded(row.charge_code, row.description, conf.charge_code_system) if row else cpt
            procs = [p for p in session.procedures if p.ref in line.procedures]
            first = min(procs, key=ProcedureFacts.sort_key).performed_text or key.date
            modifiers = tuple(Coded(m, tables.modifiers[m].display, systems[tables.modifiers[m].system])
                              for m in line.modifiers)
            charges.charges.append(Charge(
                line=item["identifier"][0]["value"], session=key.text(), procedures=tuple(line.procedures),
                service_time=hl7_time(first), code=cpt, modifiers=modifiers, transaction=transaction,
                units=line.units, unit_price=str(price.unit) if price else None,
                currency=price.currency if price else None, performer=performer, ordering=ordering,
                diagnoses=tuple(diagnoses[i - 1] for i in plan.pointers[n])))
        out.append(charges)
    return out, reviews


# -- the message ----------------------------------------------------------------------------------------------

def _cx(value: str, authority: str, kind: str) -> str:
    return f"{escape(value)}^^^{escape(authority)}^{escape(kind)}"


SHAPES = ShapeCheck()
"""The DFT^P03 shapes hl7apy has validated in this process: each is verified in full once."""


def _money(amount: Decimal, currency: str | None) -> str:
    text = f"{amount.quantize(Decimal('0.01'))}"
    return f"{text}&{currency}" if currency else text


def control_id(kind: str, versions: list[tuple[str, str]], generation: int = 0) -> str:
    """MSH-10, deterministic per charge version: the same lines in the same versions give the same id, so a
    resend is recognisable; `generation` counts earlier messages of this content the receiver rejected."""
    text = kind + "|" + "|".join(f"{line}={version}" for line, version in sorted(versions)) + f"|{generation}"
    return hashlib.sha256(text.encode()).hexdigest()[:20].upper()


def _segment(*fields: str) -> str:
    """A segment as hl7apy writes it: trailing empty fields left out."""
    return "|".join(fields).rstrip("|")


def render(kind: str, visit: Visit, charges: list[Charge], control: str, now: datetime, tables: Hl7v2Tables) -> str:
    """One DFT^P03 (segments separated by CR), validated strictly; raises InvalidMessageError.

    Built by string formatting from the field helpers (what hl7apy's object tree wrote, byte for byte: the tests
    compare the two builders), then checked: every value against its datatype, length and table
    (`checks.check_values`), and the message's shape by hl7apy's strict validation the first time it is met."""
    if kind not in (CHARGE, CREDIT) or not charges:
        raise ValueError(f"a {kind} message needs charges")
    stamp = hl7_now(now)
    sign = -1 if kind == CREDIT and tables.credit_sign == "negative" else 1
    version = tables.version
    early = version in ("2.3.1", "2.4")
    msh = ["MSH", "^~\\&", escape(tables.sending_application), escape(tables.sending_facility),
           escape(tables.receiving_application), escape(tables.receiving_facility), stamp, "",
           "DFT^P03" if early else "DFT^P03^DFT_P03", control, tables.processing_id, version]
    segments = [
        "",  # MSH, once the text is known to be ASCII or not
        _segment("EVN", "P03", stamp),
        _segment("PID", "1", "", _cx(visit.mrn, visit.mrn_authority, visit.mrn_type), "",
                 "^".join(escape(p) for p in (visit.family, visit.given, visit.middle)).rstrip("^"), "",
                 visit.birth_date, visit.sex),
        _segment("PV1", "1", visit.patient_class, "", "", "", "", visit.attending.xcn() if visit.attending else "",
                 *[""] * 11, _cx(visit.visit_number, visit.visit_authority, visit.visit_type)),
    ]
    diagnoses: list[Coded] = []
    for n, charge in enumerate(charges, start=1):
        extended = unit_amount = ""
        if charge.unit_price is not None:
            unit = Decimal(charge.unit_price)
            extended = _money(sign * unit * charge.units, charge.currency)
            unit_amount = _money(unit, charge.currency)
        segments.append(_segment(
            "FT1", str(n), escape(charge.line), "", charge.service_time, stamp, kind, _ce(charge.transaction), "", "",
            str(sign * charge.units), extended, unit_amount, *[""] * 6, "~".join(_ce(d) for d in charge.diagnoses),
            charge.performer.xcn(), charge.ordering.xcn() if charge.ordering else "", "", "", "",
            _ce(charge.code), "~".join(_ce(m) for m in charge.modifiers)))
        diagnoses += [d for d in charge.diagnoses if d not in diagnoses]
    for n, diagnosis in enumerate(diagnoses, start=1):  # table 0359: 1 is the primary diagnosis
        segments.append(_segment("DG1", str(n), "", _ce(diagnosis), "", "", "F", *[""] * 8, "1" if n == 1 else ""))
    segments[0] = _segment(*msh)
    text = "\r".join(segments)
    if not text.isascii():  # names with accents: say how the bytes are encoded (table 0211)
        segments[0] = _segment(*msh, "", "", "", "", "", "UNICODE" if early else "UNICODE UTF-8")
        text = "\r".join(segments)
    what = f"DFT^P03 {control}"
    try:
        check_values(text, version)
    except ValueProblem as exc:
        raise InvalidMessageError(f"{what} is not a valid HL7 v{version} DFT^P03: {exc}") from None
    shapes = SHAPES.needs_check(text, version)
    if shapes is not None:
        validate(text, version, what)
        SHAPES.accepted(shapes)
    return text


def _ce(coded: Coded) -> str:
    """A CE as hl7apy writes it: trailing empty components left out."""
    return coded.ce().rstrip("^")


def validate(text: str, version: str, what: str = "message") -> Any:
    """Parse `text` back and validate it strictly with hl7apy: structure, cardinality, data types and table
    values (hl7apy's warnings count as errors). Returns the parsed message; raises InvalidMessageError."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    try:
        parsed = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    except HL7apyException as exc:
        raise InvalidMessageError(f"{what} is not a valid HL7 v{version} DFT^P03: {exc}") from None
    if parsed.version != version:
        raise InvalidMessageError(f"{what} is HL7 v{parsed.version}, not v{version}")
    _strictly_valid(parsed, version, what)
    return parsed


def _strictly_valid(message: Any, version: str, what: str) -> None:
    """hl7apy's validation of a message structure, its warnings (table values) counted as errors."""
    from hl7apy.exceptions import HL7apyException
    from hl7apy.validation import Validator

    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.txt"
        try:
            Validator.validate(message, report_file=str(report))
        except HL7apyException as exc:
            raise InvalidMessageError(f"{what} is not a valid HL7 v{version} DFT^P03: {exc}") from None
        finally:
            problems = report.read_text().splitlines() if report.exists() else []
    problems = [p for p in problems if not _LOCAL_SYSTEM_WARNING.search(p)]
    if problems:
        raise InvalidMessageError(f"{what} is not a valid HL7 v{version} DFT^P03: {'; '.join(problems)}")


def readable(text: str) -> str:
    """A message for people: one segment per line."""
    return text.replace("\r", "\n").rstrip("\n") + "\n"


def dry_run_messages(report: Any, tables: CodeTables, now: datetime) -> tuple[list[str], list[Review]]:
    """The DFT^P03 of every coded session of a run, as the sink would first send them (no earlier charges)."""
    sessions, reviews = session_charges(report, tables)
    texts: list[str] = []
    for sc in sessions:
        versions = [(c.line, c.version(sc.visit)) for c in sc.charges]
        try:
            texts.append(render(CHARGE, sc.visit, sc.charges, control_id(CHARGE, versions), now, tables.hl7v2))
        except InvalidMessageError as exc:
            reviews += [Review(p, p, "hl7v2-invalid-message", str(exc)) for p in sc.procedures]
    return texts, reviews

