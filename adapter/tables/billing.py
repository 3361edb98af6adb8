"""The billing tables in `config/`: billing providers, place of service, diagnosis map, chargemaster and
ChargeItemDefinition files. Loaded and checked once, like the code tables; every error names file and entry.

Each file is required (a missing one is a configuration error naming it, not silently an empty table whose
decisions would all go to review); a table may be empty (`items: []`). Unknown keys are named as unknown.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from adapter.dated import day_of
from adapter.errors import ConfigError, check_keys

CodeKey = tuple[str, str]
BILLING_FILES = ("billing-providers.yaml", "place-of-service.yaml", "diagnosis-map.yaml", "chargemaster.yaml")
DEFINITIONS_DIR = "charge-definitions"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
TIN_SYSTEM = "urn:oid:2.16.840.1.113883.4.4"
_TAXONOMY = re.compile(r"^[0-9A-Z]{9}X$")
POS_SYSTEM = "https://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set"


def npi_is_valid(npi: str) -> bool:
    """The NPI check digit: Luhn over the number prefixed with 80840 (CMS NPI standard)."""
    if len(npi) != 10 or not npi.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed("80840" + npi)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@dataclass(frozen=True)
class BillingOrganization:
    key: str
    name: str
    npi: str | None = None
    tin: str | None = None
    reference: str | None = None
    """`Organization/x` when the organization exists on the server (which then holds its details); else it is
    written as an Organization contained in the Claim, with the details below."""
    taxonomy: str | None = None
    """NUCC provider taxonomy code (the X12 837P PRV*BI), written as a `type` of the contained Organization."""
    address: dict[str, Any] | None = None
    """FHIR Address shape: line (1 or 2 texts), city, state, postalCode (digits; the 837P N3/N4)."""


@dataclass(frozen=True)
class BillingProviders:
    organizations: dict[str, BillingOrganization] = field(default_factory=dict)
    by_performer: dict[str, str] = field(default_factory=dict)
    """Performer reference (`Practitioner/x`, `PractitionerRole/x`) or its NPI -> organization key."""
    by_department: dict[str, str] = field(default_factory=dict)
    """`Organization/x` (Encounter.serviceProvider) or `Location/x` (Encounter.location) -> organization key."""
    default: str | None = None


@dataclass(frozen=True)
class PlaceOfServiceTable:
    system: str = POS_SYSTEM
    names: dict[str, str] = field(default_factory=dict)
    by_location: dict[str, str] = field(default_factory=dict)
    by_location_type: dict[CodeKey, str] = field(default_factory=dict)
    by_service_type: dict[CodeKey, str] = field(default_factory=dict)
    by_class: dict[CodeKey, str] = field(default_factory=dict)
    default: str | None = None


@dataclass(frozen=True)
class ChargemasterRow:
    cpt: str
    modifiers: tuple[str, ...] | None
    """None: any modifiers; a tuple: exactly these (more specific than None)."""
    charge_code: str
    description: str
    revenue_code: str | None
    unit_price: Decimal
    start: date | None = None
    end: date | None = None

    def applies(self, code: str, modifiers: tuple[str, ...], day: date) -> bool:
        return (self.cpt == code and (self.modifiers is None or self.modifiers == modifiers)
                and (self.start is None or self.start <= day) and (self.end is None or day <= self.end))


@dataclass(frozen=True)
class PricingTables:
    currency: str = "USD"
    chargemaster: tuple[ChargemasterRow, ...] = ()
    definitions: tuple[tuple[str, dict[str, Any]], ...] = ()
    """(origin, ChargeItemDefinition) read from config/charge-definitions/*.json."""
    chargemaster_file: str = "config/chargemaster.yaml"
    """Where the chargemaster was read from, for the messages of a line it has no row for."""


@dataclass(frozen=True)
class BillingTables:
    providers: BillingProviders = field(default_factory=BillingProviders)
    place_of_service: PlaceOfServiceTable = field(default_factory=PlaceOfServiceTable)
    diagnosis_map: dict[CodeKey, tuple[str, str]] = field(default_factory=dict)
    """(system, code) of a non-ICD-10-CM reason -> (ICD-10-CM code, display)."""
    pricing: PricingTables = field(default_factory=PricingTables)


def _text(value: Any, file: Path, entry: str, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(str(file), entry, "must be a non-empty string")
    return value.strip()


def _req(value: Any, file: Path, entry: str) -> str:
    text = _text(value, file, entry)
    assert text is not None
    return text


def _mapping(value: Any, file: Path, entry: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(str(file), entry, "must be a mapping")
    return value


def _items(value: Any, file: Path, entry: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(str(file), entry, "must be a list")
    return value


def _coded_rules(data: dict[str, Any], key: str, file: Path, codes: dict[str, str]) -> dict[CodeKey, str]:
    out: dict[CodeKey, str] = {}
    for i, raw in enumerate(_items(data.get(key), file, key)):
        entry = f"{key}[{i}]"
        item = _mapping(raw, file, entry)
        check_keys(item, ("system", "code", "display", "pos"), file, entry)
        pair = (_req(item.get("system"), file, f"{entry}.system"), _req(item.get("code"), file, f"{entry}.code"))
        if pair in out:
            raise ConfigError(str(file), entry, f"duplicate code {pair[0]}|{pair[1]}")
        out[pair] = _pos_code(item.get("pos"), file, f"{entry}.pos", codes)
    return out


def _pos_code(value: Any, file: Path, entry: str, codes: dict[str, str]) -> str:
    code = _req(value, file, entry)
    if code not in codes:
        raise ConfigError(str(file), entry, f"{code!r} is not one of the place-of-service codes in `codes`")
    return code


def _address(value: Any, file: Path, entry: str) -> dict[str, Any] | None:
    """A US postal address: 1 or 2 street lines, city, a 2-letter state and a 5- or 9-digit ZIP code."""
    if value is None:
        return None
    item = _mapping(value, file, entry)
    check_keys(item, ("line", "city", "state", "postalCode"), file, entry)
    lines = item.get("line")
    if not isinstance(lines, list) or not 1 <= len(lines) <= 2:
        raise ConfigError(str(file), f"{entry}.line", "must be a list of 1 or 2 street lines")
    state = _req(item.get("state"), file, f"{entry}.state")
    if not re.fullmatch(r"[A-Z]{2}", state):
        raise ConfigError(str(file), f"{entry}.state", f"{state!r} is not a 2-letter state code such as IL")
    postal = _req(item.get("postalCode"), file, f"{entry}.postalCode")
    if not re.fullmatch(r"\d{5}(-?\d{4})?", postal):
        raise ConfigError(str(file), f"{entry}.postalCode", f"{postal!r} is not a 5- or 9-digit ZIP code")
    return {"line": [_req(x, file, f"{entry}.line[{i}]") for i, x in enumerate(lines)],
            "city": _req(item.get("city"), file, f"{entry}.city"), "state": state, "postalCode": postal}


def load_providers(file: Path, data: dict[str, Any]) -> BillingProviders:
    check_keys(data, ("organizations", "by_performer", "by_department", "default"), file, "")
    orgs: dict[str, BillingOrganization] = {}
    for key, raw in _mapping(data.get("organizations"), file, "organizations").items():
        entry = f"organizations.{key}"
        item = _mapping(raw, file, entry)
        check_keys(item, ("name", "npi", "tin", "reference", "taxonomy", "address"), file, entry)
        npi = _text(item.get("npi"), file, f"{entry}.npi", required=False)
        if npi is not None and not npi_is_valid(npi):
            raise ConfigError(str(file), f"{entry}.npi", f"{npi!r} is not a valid NPI (10 digits, check digit)")
        tin = _text(item.get("tin"), file, f"{entry}.tin", required=False)
        if tin is not None and not (len(tin.replace("-", "")) == 9 and tin.replace("-", "").isdigit()):
            raise ConfigError(str(file), f"{entry}.tin", f"{tin!r} is not a 9-digit TIN/EIN")
        reference = _text(item.get("reference"), file, f"{entry}.reference", required=False)
        if reference is not None and not reference.startswith("Organization/"):
            raise ConfigError(str(file), f"{entry}.reference", "must be an Organization reference (Organization/id)")
        if reference is None and npi is None and tin is None:
            raise ConfigError(str(file), entry, "needs an npi or tin (or a reference to an Organization)")
        taxonomy = _text(item.get("taxonomy"), file, f"{entry}.taxonomy", required=False)
        if taxonomy is not None and not _TAXONOMY.match(taxonomy):
            raise ConfigError(str(file), f"{entry}.taxonomy", f"{taxonomy!r} is not a NUCC taxonomy code "
                                                              "(9 letters or digits and X, e.g. 193200000X)")
        address = _address(item.get("address"), file, f"{entry}.address")
        if reference is not None and (taxonomy or address):
            raise ConfigError(str(file), entry, f"taxonomy and address belong on {reference}: the Claim refers to "
                                                "that Organization, which holds them (leave out `reference` to "
                                                "have them written in the Claim)")
        orgs[str(key)] = BillingOrganization(str(key), _req(item.get("name"), file, f"{entry}.name"),
                                             npi, tin.replace("-", "") if tin else None, reference, taxonomy,
                                             address)

    def keyed(name: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in _mapping(data.get(name), file, name).items():
            target = _req(v, file, f"{name}.{k}")
            if target not in orgs:
                raise ConfigError(str(file), f"{name}.{k}", f"{target!r} is not one of the organizations")
            out[str(k)] = target
        return out

    default = _text(data.get("default"), file, "default", required=False)
    if default is not None and default not in orgs:
        raise ConfigError(str(file), "default", f"{default!r} is not one of the organizations")
    return BillingProviders(orgs, keyed("by_performer"), keyed("by_department"), default)


def load_place_of_service(file: Path, data: dict[str, Any]) -> PlaceOfServiceTable:
    check_keys(data, ("system", "codes", "by_location", "by_location_type", "by_service_type", "by_class", "default"),
               file, "")
    codes = {str(k): _req(v, file, f"codes.{k}") for k, v in _mapping(data.get("codes"), file, "codes").items()}
    by_location = {str(k): _pos_code(v, file, f"by_location.{k}", codes)
                   for k, v in _mapping(data.get("by_location"), file, "by_location").items()}
    default = data.get("default")
    return PlaceOfServiceTable(
        system=_req(data.get("system", POS_SYSTEM), file, "system"), names=codes, by_location=by_location,
        by_location_type=_coded_rules(data, "by_location_type", file, codes),
        by_service_type=_coded_rules(data, "by_service_type", file, codes),
        by_class=_coded_rules(data, "by_class", file, codes),
        default=None if default is None else _pos_code(default, file, "default", codes))


def load_diagnosis_map(file: Path, data: dict[str, Any]) -> dict[CodeKey, tuple[str, str]]:
    check_keys(data, ("map",), file, "")
    out: dict[CodeKey, tuple[str, str]] = {}
    for i, raw in enumerate(_items(data.get("map"), file, "map")):
        entry = f"map[{i}]"
        item = _mapping(raw, file, entry)
        check_keys(item, ("system", "code", "display", "icd10cm", "icd10cm_display"), file, entry)
        key = (_req(item.get("system"), file, f"{entry}.system"), _req(item.get("code"), file, f"{entry}.code"))
        if key[0] == ICD10CM:
            raise ConfigError(str(file), entry, "maps to ICD-10-CM; an ICD-10-CM code needs no mapping")
        if key in out:
            raise ConfigError(str(file), entry, f"duplicate code {key[0]}|{key[1]}")
        out[key] = (_req(item.get("icd10cm"), file, f"{entry}.icd10cm"),
                    _req(item.get("icd10cm_display"), file, f"{entry}.icd10cm_display"))
    return out


_day = day_of


def load_chargemaster(file: Path, data: dict[str, Any]) -> tuple[str, tuple[ChargemasterRow, ...]]:
    check_keys(data, ("currency", "items"), file, "")
    currency = _req(data.get("currency", "USD"), file, "currency")
    if not (len(currency) == 3 and currency.isalpha() and currency.isupper()):
        raise ConfigError(str(file), "currency", f"{currency!r} is not an ISO 4217 code such as USD")
    rows: list[ChargemasterRow] = []
    for i, raw in enumerate(_items(data.get("items"), file, "items")):
        entry = f"items[{i}]"
        item = _mapping(raw, file, entry)
        check_keys(item, ("cpt", "modifiers", "charge_code", "description", "revenue_code", "unit_price", "effective"),
                   file, entry)
        mods = item.get("modifiers")
        if mods is not None and not isinstance(mods, list):
            raise ConfigError(str(file), f"{entry}.modifiers", "must be a list (omit it for any modifiers)")
        try:
            price = Decimal(str(item.get("unit_price")))
        except InvalidOperation:
            price = Decimal(-1)
        if not price.is_finite() or price < 0:
            raise ConfigError(str(file), f"{entry}.unit_price", "must be a non-negative amount, e.g. 412.00")
        effective = _mapping(item.get("effective"), file, f"{entry}.effective")
        check_keys(effective, ("start", "end"), file, f"{entry}.effective")
        row = ChargemasterRow(
            cpt=_req(item.get("cpt"), file, f"{entry}.cpt"),
            modifiers=None if mods is None else tuple(_req(m, file, f"{entry}.modifiers") for m in mods),
            charge_code=_req(item.get("charge_code"), file, f"{entry}.charge_code"),
            description=_req(item.get("description"), file, f"{entry}.description"),
            revenue_code=_text(item.get("revenue_code"), file, f"{entry}.revenue_code", required=False),
            unit_price=price.quantize(Decimal("0.01")),
            start=_day(effective.get("start"), file, f"{entry}.effective.start"),
            end=_day(effective.get("end"), file, f"{entry}.effective.end"))
        if row.start and row.end and row.end < row.start:
            raise ConfigError(str(file), f"{entry}.effective", "ends before it starts")
        for other in rows:
            if (other.cpt, other.modifiers) == (row.cpt, row.modifiers) and _overlap(other, row):
                raise ConfigError(str(file), entry, f"{row.cpt} {'-'.join(row.modifiers or ()) or ''} overlaps "
                                                    f"charge code {other.charge_code} in time: which price?")
        rows.append(row)
    return currency, tuple(rows)


def _overlap(a: ChargemasterRow, b: ChargemasterRow) -> bool:
    return (a.start or date.min) <= (b.end or date.max) and (b.start or date.min) <= (a.end or date.max)


def load_definitions(folder: Path) -> tuple[tuple[str, dict[str, Any]], ...]:
    """ChargeItemDefinition JSON files (one resource, or a Bundle of them), validated as R4."""
    from adapter.validation import InvalidOutputError, validate_resource

    if not folder.is_dir():
        return ()
    found: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(str(path), "", f"not readable JSON ({exc})") from None
        resources = [e.get("resource") for e in data.get("entry") or []] if data.get("resourceType") == "Bundle" \
            else [data]
        for i, res in enumerate(resources):
            where = f"entry[{i}]" if data.get("resourceType") == "Bundle" else ""
            if not isinstance(res, dict) or res.get("resourceType") != "ChargeItemDefinition":
                raise ConfigError(str(path), where, "must be a ChargeItemDefinition (or a Bundle of them)")
            try:
                validate_resource(res, "ChargeItemDefinition")
            except InvalidOutputError as exc:
                raise ConfigError(str(path), where, str(exc)) from None
            found.append((f"{path.name}{'#' + where if where else ''}", res))
    return tuple(found)


def load_billing_tables(base: Path, read_yaml: Any, shown_as: str = "") -> BillingTables:
    """All billing tables in `base`; `read_yaml` is the config loader's YAML reader (errors name the file);
    `shown_as`: how the folder is named in the messages of coded lines (default: its path)."""
    files = [base / name for name in BILLING_FILES]
    data = [read_yaml(f) for f in files]  # a missing file: ConfigError "file not found" naming it
    currency, rows = load_chargemaster(files[3], data[3])
    return BillingTables(
        providers=load_providers(files[0], data[0]),
        place_of_service=load_place_of_service(files[1], data[1]),
        diagnosis_map=load_diagnosis_map(files[2], data[2]),
        pricing=PricingTables(currency, rows, load_definitions(base / DEFINITIONS_DIR),
                             f"{shown_as or base}/{BILLING_FILES[3]}"))
