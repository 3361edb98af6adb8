"""config/x12.yaml: the 837P envelope and value maps (the billing provider's details are on the Claim).

Pure data: loading these stays cheap, and the builder (adapter.building.claim837) never reads files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.errors import ConfigError
from adapter.tables.hl7v2 import _mapping

FILE = "x12.yaml"
_ID = re.compile(r"^[A-Za-z0-9 ]{1,15}$")


@dataclass(frozen=True)
class Party:
    name: str
    id: str


@dataclass(frozen=True)
class X12Tables:
    sender_qualifier: str = "ZZ"
    sender_id: str = "CHARGEADAPTER"
    receiver_qualifier: str = "ZZ"
    receiver_id: str = "RECEIVER"
    usage: str = "T"
    submitter: Party = Party("Charge Adapter", "SUBMITTER")
    submitter_contact: str = "Billing Office"
    submitter_phone: str = "0000000000"
    receiver: Party = Party("Clearinghouse", "RECEIVER")
    claim_filing_indicator: dict[tuple[str, str], str] = field(default_factory=dict)
    relationship: dict[str, str] = field(default_factory=lambda: {"self": "18"})
    payer_id_systems: tuple[str, ...] = ()
    facility_places_of_service: frozenset[str] = frozenset()


def _text(value: Any, file: Path, key: str, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
        raise ConfigError(str(file), key, "must be a non-empty text")
    text = str(value).strip()
    if pattern is not None and not pattern.match(text):
        raise ConfigError(str(file), key, f"{text!r} is not allowed here")
    return text


def load_x12_tables(base: Path, read_yaml: Any) -> X12Tables:
    """config/x12.yaml in `base` (defaults when absent)."""
    file = base / FILE
    data = read_yaml(file) if file.exists() else {}
    known = {"sender_qualifier", "sender_id", "receiver_qualifier", "receiver_id", "usage", "submitter", "receiver",
             "claim_filing_indicator", "relationship", "payer_id_systems", "facility_places_of_service"}
    for key in data:
        if key not in known:
            raise ConfigError(str(file), str(key), f"unknown key (known: {', '.join(sorted(known))})")
    d = X12Tables()
    usage = _text(data.get("usage", d.usage), file, "usage")
    if usage not in ("T", "P"):
        raise ConfigError(str(file), "usage", f"{usage!r} is not T (test) or P (production)")
    submitter = _mapping(data.get("submitter"), file, "submitter")
    receiver = _mapping(data.get("receiver"), file, "receiver")
    phone = _text(submitter.get("phone", d.submitter_phone), file, "submitter.phone")
    if not re.fullmatch(r"\d{10}", phone):
        raise ConfigError(str(file), "submitter.phone", f"{phone!r} is not a 10-digit telephone number")
    filing: dict[tuple[str, str], str] = {}
    rows = data.get("claim_filing_indicator") or []
    if not isinstance(rows, list):
        raise ConfigError(str(file), "claim_filing_indicator", "must be a list of {system, code, indicator}")
    for n, row in enumerate(rows):
        entry = _mapping(row, file, f"claim_filing_indicator[{n}]")
        key = (_text(entry.get("system"), file, f"claim_filing_indicator[{n}].system"),
               _text(entry.get("code"), file, f"claim_filing_indicator[{n}].code"))
        filing[key] = _text(entry.get("indicator"), file, f"claim_filing_indicator[{n}].indicator",
                            re.compile(r"^[0-9A-Z]{2}$"))
    relationship = {str(k): _text(v, file, f"relationship.{k}", re.compile(r"^[0-9A-Z]{2}$"))
                    for k, v in _mapping(data.get("relationship", d.relationship), file, "relationship").items()}
    return X12Tables(
        _text(data.get("sender_qualifier", d.sender_qualifier), file, "sender_qualifier", re.compile(r"^\w\w$")),
        _text(data.get("sender_id", d.sender_id), file, "sender_id", _ID),
        _text(data.get("receiver_qualifier", d.receiver_qualifier), file, "receiver_qualifier",
              re.compile(r"^\w\w$")),
        _text(data.get("receiver_id", d.receiver_id), file, "receiver_id", _ID),
        usage,
        Party(_text(submitter.get("name", d.submitter.name), file, "submitter.name"),
              _text(submitter.get("id", d.submitter.id), file, "submitter.id")),
        _text(submitter.get("contact", d.submitter_contact), file, "submitter.contact"),
        phone,
        Party(_text(receiver.get("name", d.receiver.name), file, "receiver.name"),
              _text(receiver.get("id", d.receiver.id), file, "receiver.id")),
        filing,
        relationship,
        tuple(str(s) for s in data.get("payer_id_systems") or ()),
        frozenset(str(s) for s in data.get("facility_places_of_service") or ()),
    )
