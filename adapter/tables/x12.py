"""config/x12.yaml (the 837P envelope and value maps) and the billing providers' 837P details.

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
PROVIDERS_FILE = "billing-providers.yaml"
_ID = re.compile(r"^[A-Za-z0-9 ]{1,15}$")
_TAXONOMY = re.compile(r"^[0-9A-Z]{9}X$")


@dataclass(frozen=True)
class Party:
    name: str
    id: str


@dataclass(frozen=True)
class ProviderDetails:
    """What config/billing-providers.yaml says of an organization beyond its name and identifiers."""

    name: str
    npi: str | None
    tin: str | None
    taxonomy: str | None
    address: dict[str, Any] | None
    """FHIR Address shape: line (list), city, state, postalCode."""


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
    providers: tuple[ProviderDetails, ...] = ()

    def provider(self, npi: str | None, tin: str | None) -> ProviderDetails | None:
        """The configured organization with this NPI (else this TIN)."""
        return (next((p for p in self.providers if npi and p.npi == npi), None)
                or next((p for p in self.providers if tin and p.tin == tin), None))


def _text(value: Any, file: Path, key: str, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
        raise ConfigError(str(file), key, "must be a non-empty text")
    text = str(value).strip()
    if pattern is not None and not pattern.match(text):
        raise ConfigError(str(file), key, f"{text!r} is not allowed here")
    return text


def _providers(base: Path, read_yaml: Any) -> tuple[ProviderDetails, ...]:
    file = base / PROVIDERS_FILE
    if not file.exists():
        return ()
    out = []
    for key, raw in _mapping(read_yaml(file).get("organizations"), file, "organizations").items():
        item = _mapping(raw, file, f"organizations.{key}")
        taxonomy = item.get("taxonomy")
        if taxonomy is not None:
            taxonomy = _text(taxonomy, file, f"organizations.{key}.taxonomy", _TAXONOMY)
        address = item.get("address")
        if address is not None:
            address = _mapping(address, file, f"organizations.{key}.address")
            for part in ("city", "state", "postalCode"):
                _text(address.get(part), file, f"organizations.{key}.address.{part}")
            lines = address.get("line")
            if not isinstance(lines, list) or not lines or not all(isinstance(x, str) and x for x in lines):
                raise ConfigError(str(file), f"organizations.{key}.address.line", "must be a list of 1 or 2 texts")
            address = {**address, "postalCode": str(address["postalCode"])}
        tin = item.get("tin")
        out.append(ProviderDetails(str(item.get("name") or key), str(item["npi"]) if item.get("npi") else None,
                                   str(tin).replace("-", "") if tin else None, taxonomy, address))
    return tuple(out)


def load_x12_tables(base: Path, read_yaml: Any) -> X12Tables:
    """config/x12.yaml in `base` (defaults when absent) and the 837P details of config/billing-providers.yaml."""
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
        _providers(base, read_yaml),
    )
