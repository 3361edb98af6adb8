"""config/hl7v2.yaml: the sender and receiver of every DFT^P03 and how FHIR values become HL7 v2 values.

Loaded and checked with the other code tables (`CodeTables.hl7v2`); every error names the file and the key.
The file is optional: without it the defaults below apply (no assigning authority, no extra identifier
systems). Pure data: no hl7apy import here, so loading the tables stays cheap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.errors import ConfigError

FILE = "hl7v2.yaml"
SUPPORTED_VERSIONS = ("2.3.1", "2.4", "2.5", "2.5.1")
"""Versions whose DFT^P03 has every field the adapter fills, in the same place (checked by the tests)."""
PATIENT_CLASSES = ("B", "C", "E", "I", "N", "O", "P", "R", "U")
"""HL7 table 0004."""
_LOCAL_SYSTEM = re.compile(r"^99[A-Z0-9]{1,3}$")
_SAFE = re.compile(r"^[A-Za-z0-9 .\-_]{1,40}$")
"""Header values travel unescaped in MSH: no delimiters, no control characters."""


@dataclass(frozen=True)
class IdentifierRule:
    """Which FHIR Identifier becomes a CX field (PID-3, PV1-19)."""

    type: str
    systems: tuple[str, ...] = ()
    assigning_authority: str = ""


@dataclass(frozen=True)
class Hl7v2Tables:
    version: str = "2.5.1"
    sending_application: str = "CHARGE-ADAPTER"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"
    mrn: IdentifierRule = IdentifierRule("MR")
    visit_number: IdentifierRule = IdentifierRule("VN")
    patient_class: dict[str, str] = field(default_factory=lambda: {"AMB": "O", "IMP": "I", "EMER": "E"})
    coding_systems: dict[str, str] = field(default_factory=lambda: {
        "http://www.ama-assn.org/go/cpt": "C4", "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets": "HCPCS",
        "http://hl7.org/fhir/sid/icd-10-cm": "I10"})
    charge_code_system: str = "99CDM"
    credit_sign: str = "negative"


def _text(value: Any, file: Path, key: str, *, empty: bool = False) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if value is None and empty:
        return ""
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise ConfigError(str(file), key, "must be a non-empty string" if not empty else "must be a string")
    return value.strip()


def _header_value(value: Any, file: Path, key: str, *, empty: bool = False) -> str:
    text = _text(value, file, key, empty=empty)
    if text and not _SAFE.match(text):
        raise ConfigError(str(file), key, f"{text[:40]!r} may only hold letters, digits, space, '.', '-' and '_' "
                                          "(at most 40): HL7 delimiters are not allowed in MSH")
    return text


def _mapping(value: Any, file: Path, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(str(file), key, "must be a mapping")
    return value


def _identifier_rule(raw: Any, file: Path, key: str, default: IdentifierRule) -> IdentifierRule:
    data = _mapping(raw, file, key)
    for name in data:
        if name not in ("type", "systems", "assigning_authority"):
            raise ConfigError(str(file), f"{key}.{name}", "unknown key (known: assigning_authority, systems, type)")
    systems = data.get("systems") or []
    if not isinstance(systems, list):
        raise ConfigError(str(file), f"{key}.systems", "must be a list of identifier systems")
    return IdentifierRule(
        _header_value(data.get("type", default.type), file, f"{key}.type"),
        tuple(_text(s, file, f"{key}.systems[{i}]") for i, s in enumerate(systems)),
        _header_value(data.get("assigning_authority", ""), file, f"{key}.assigning_authority", empty=True))


def coding_system_ok(name: str, version: str) -> bool:
    """A name of HL7 table 0396 (coding systems) in `version` (hl7apy's copy of the table), or a local 99zzz."""
    if _LOCAL_SYSTEM.match(name):
        return True
    from hl7apy import load_reference
    from hl7apy.exceptions import ChildNotFound

    try:
        table = load_reference("HL70396", "Table", version)
    except ChildNotFound:  # older versions have no table 0396 in hl7apy: nothing to check against
        return bool(re.match(r"^[A-Z][A-Z0-9\-]{0,11}$", name))
    return name in table[1]


def load_hl7v2_tables(base: Path, read_yaml: Any, needed: dict[str, str] | None = None) -> Hl7v2Tables:
    """config/hl7v2.yaml in `base` (defaults when absent); `read_yaml` is the config loader's reader.

    `needed`: FHIR code systems the messages will carry (-> which table says so), each of which must have its
    HL7 name in `coding_systems`."""
    file = base / FILE
    data = read_yaml(file) if file.exists() else {}
    defaults = Hl7v2Tables()
    known = {f for f in Hl7v2Tables.__dataclass_fields__}
    for key in data:
        if key not in known:
            raise ConfigError(str(file), str(key), f"unknown key (known: {', '.join(sorted(known))})")
    version = _text(data.get("version", defaults.version), file, "version")
    if version not in SUPPORTED_VERSIONS:
        raise ConfigError(str(file), "version", f"{version!r} is not supported (supported: "
                                                f"{', '.join(SUPPORTED_VERSIONS)})")
    classes = {str(k): _text(v, file, f"patient_class.{k}")
               for k, v in _mapping(data.get("patient_class", defaults.patient_class), file, "patient_class").items()}
    for key, value in classes.items():
        if value not in PATIENT_CLASSES:
            raise ConfigError(str(file), f"patient_class.{key}", f"{value!r} is not an HL7 patient class (table "
                                                                 f"0004: {', '.join(PATIENT_CLASSES)})")
    systems = {str(k): _text(v, file, f"coding_systems.{k}")
               for k, v in _mapping(data.get("coding_systems", defaults.coding_systems), file,
                                    "coding_systems").items()}
    for key, value in systems.items():
        if not coding_system_ok(value, version):
            raise ConfigError(str(file), f"coding_systems.{key}", f"{value!r} is not an HL7 table 0396 name")
    for system, where in (needed or {}).items():
        if system not in systems:
            raise ConfigError(str(file), "coding_systems", f"has no HL7 name for {system} ({where})")
    charge_system = _text(data.get("charge_code_system", defaults.charge_code_system), file, "charge_code_system")
    if not coding_system_ok(charge_system, version):
        raise ConfigError(str(file), "charge_code_system", f"{charge_system!r} is not an HL7 table 0396 name "
                                                           "(local ones are 99zzz, e.g. 99CDM)")
    sign = _text(data.get("credit_sign", defaults.credit_sign), file, "credit_sign")
    if sign not in ("negative", "positive"):
        raise ConfigError(str(file), "credit_sign", "must be negative or positive")
    processing = _text(data.get("processing_id", defaults.processing_id), file, "processing_id")
    if processing not in ("P", "T", "D"):
        raise ConfigError(str(file), "processing_id", "must be P (production), T (training) or D (debugging)")
    return Hl7v2Tables(
        version=version,
        sending_application=_header_value(data.get("sending_application", defaults.sending_application), file,
                                          "sending_application"),
        sending_facility=_header_value(data.get("sending_facility", ""), file, "sending_facility", empty=True),
        receiving_application=_header_value(data.get("receiving_application", ""), file, "receiving_application",
                                            empty=True),
        receiving_facility=_header_value(data.get("receiving_facility", ""), file, "receiving_facility",
                                         empty=True),
        processing_id=processing,
        mrn=_identifier_rule(data.get("mrn"), file, "mrn", defaults.mrn),
        visit_number=_identifier_rule(data.get("visit_number"), file, "visit_number", defaults.visit_number),
        patient_class=classes, coding_systems=systems, charge_code_system=charge_system, credit_sign=sign)
