"""Code tables and settings, loaded from `config/` and validated before anything is coded.

Every table is data: a coder or analyst changes a YAML file, never the engine. Each error names the
file and the entry, because the person reading it is fixing a table, not reading a traceback.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from adapter.dated import Effective, Rows, collect, effective_of
from adapter.errors import ConfigError, check_keys
from adapter.local_codes import LOCAL_CODES_FILE, LocalCodes, load_local_codes
from adapter.tables.billing import BILLING_FILES, DEFINITIONS_DIR, ICD10CM, BillingTables, load_billing_tables
from adapter.tables.hl7v2 import FILE as HL7V2_FILE
from adapter.tables.hl7v2 import Hl7v2Tables, load_hl7v2_tables
from adapter.tables.x12 import X12Tables, load_x12_tables
from adapter.urls import normalize_base

CodeKey = tuple[str, str]
"""(system, code) of a coding."""

TABLE_FILES = ("fna-valueset.yaml", "modalities.yaml", "cpt-fna.yaml", "mue.yaml", "settings.yaml", "input.yaml",
               "including-procedures.yaml")
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
DEFAULT_CANONICAL_BASE = "http://fhir-charge-adapter.org/fhir"
"""Where this project's identifier systems and extension live unless `urls.canonical_base` says otherwise.
Not an example domain: the HL7 validator rejects example.org/.com/.net in identifier systems and extensions."""


def canonical_urls(base: str) -> dict[str, str]:
    """The project's URLs under one canonical base (also the names in the conformance package)."""
    base = base.rstrip("/")
    return {"modifier_extension": f"{base}/StructureDefinition/cpt-modifier",
            "charge_identifier_system": f"{base}/sid/charge-line",
            "claim_identifier_system": f"{base}/sid/claim",
            "fingerprint_extension": f"{base}/StructureDefinition/written-fingerprint",
            "offsets_extension": f"{base}/StructureDefinition/offsets-charge",
            "replaces_extension": f"{base}/StructureDefinition/replaces",
            "claim_frequency_extension": f"{base}/StructureDefinition/claim-frequency",
            "claim_frequency_system": f"{base}/CodeSystem/claim-frequency"}


_DEFAULT_URLS = canonical_urls(DEFAULT_CANONICAL_BASE)
EXAMPLE_DOMAINS = ("example.org", "example.com", "example.net", "acme.com", "acme.org")


@dataclass(frozen=True)
class FamilyEntry:
    """Primary and add-on CPT code of one guidance modality."""

    modality: str
    primary: str
    primary_display: str
    add_on: str
    add_on_display: str


@dataclass(frozen=True)
class MueLimit:
    """One row of config/mue.yaml: the most units of a code per the adjudication indicator's unit of counting.

    `mai` is CMS's MUE Adjudication Indicator: 1 = a claim-line edit (each line is checked on its own), 2 = a
    date-of-service edit by policy (all lines of the day added up; an absolute limit), 3 = a date-of-service edit
    on clinical grounds (added up per day; units above it need medical-necessity documentation). A row without
    one is counted per day, the strictest reading."""

    units: int
    source: str
    mai: int | None = None
    rationale: str = ""

    @property
    def per_day(self) -> bool:
        return self.mai != 1


MAI_MEANING = {1: "MAI 1, a claim-line edit: each line is checked on its own",
               2: "MAI 2, a date-of-service edit by policy: units of the day are added up and the limit is absolute",
               3: "MAI 3, a date-of-service edit on clinical grounds: units of the day are added up; more need "
                  "medical-necessity documentation",
               None: "no adjudication indicator: units of the day are added up (the strictest reading)"}


@dataclass(frozen=True)
class IncludingCode:
    """A procedure code whose service already includes fine needle aspiration (config/including-procedures.yaml)."""

    system: str
    code: str
    display: str
    source: str

    def label(self) -> str:
        name = "CPT" if "ama-assn.org" in self.system else ("SNOMED CT" if "snomed" in self.system else self.system)
        return f"{name} {self.code} ({self.display})"


@dataclass(frozen=True)
class Modifier:
    code: str
    system: str
    display: str


@dataclass(frozen=True)
class Settings:
    fhir_version: str = "4.0.1"
    time_zone: str = "UTC"
    when_missing: str = "review"
    distinct_modifier: str = "59"
    claims: bool = True
    require_837p: bool = False
    """True: a Claim lacking an element the X12 837P requires waits in review naming it (ChargeItems written)."""
    when_price_missing: str = "review"
    """`review`: the Claim waits in review (ChargeItems are written); `warn`: written without a price."""
    guidance_code_system: str = "http://fhir-charge-adapter.example.org/fhir/CodeSystem/guidance"
    """An input code system (the project code `none` in procedure-method), never written by the adapter."""
    canonical_base: str = DEFAULT_CANONICAL_BASE
    modifier_extension: str = _DEFAULT_URLS["modifier_extension"]
    charge_identifier_system: str = _DEFAULT_URLS["charge_identifier_system"]
    claim_identifier_system: str = _DEFAULT_URLS["claim_identifier_system"]
    fingerprint_extension: str = _DEFAULT_URLS["fingerprint_extension"]
    """On every ChargeItem and Claim written online: a hash of what we wrote (docs/output.md, ownership)."""
    offsets_extension: str = _DEFAULT_URLS["offsets_extension"]
    """On a credit: the ChargeItem it offsets."""
    replaces_extension: str = _DEFAULT_URLS["replaces_extension"]
    """On a replacement ChargeItem or Claim: the one it replaces."""
    claim_frequency_extension: str = _DEFAULT_URLS["claim_frequency_extension"]
    claim_frequency_system: str = _DEFAULT_URLS["claim_frequency_system"]

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)


@dataclass(frozen=True)
class CodeTables:
    """Everything the pure engine needs to know about codes, in lookup-ready form."""

    fna: frozenset[CodeKey]
    core_needle_biopsy: frozenset[CodeKey]
    modalities: dict[str, str]
    method_codes: dict[CodeKey, Rows[str]]
    procedure_codes: dict[CodeKey, Rows[str]]
    cpt_system: str
    family: dict[str, Rows[FamilyEntry]]
    """Modality -> its primary and add-on codes, by date of service (rule effective-dates)."""
    never_emit: dict[str, str]
    modifiers: dict[str, Modifier]
    mue: dict[str, Rows[MueLimit]]
    settings: Settings = field(default_factory=Settings)
    billing: BillingTables = field(default_factory=BillingTables)
    """Billing providers, place of service, diagnosis map and prices (adapter/tables/billing.py)."""
    version: str = ""
    """Short hash of the table files: which rules produced a charge, for the audit trail."""
    guidance_procedures: dict[CodeKey, Rows[str]] = field(default_factory=dict)
    """Procedure.code of a separate imaging-guidance Procedure -> its modality (evidence, never billed)."""
    including: dict[CodeKey, Rows[IncludingCode]] = field(default_factory=dict)
    """Procedure codes whose service already includes the FNA (config/including-procedures.yaml)."""
    rendering_functions: frozenset[CodeKey] = frozenset()
    non_rendering_functions: frozenset[CodeKey] = frozenset()
    rendering_actor_types: frozenset[str] = frozenset({"Practitioner", "PractitionerRole"})
    laterality: dict[CodeKey, str] = field(default_factory=dict)
    """Laterality qualifier code -> `left`, `right` or `bilateral`."""
    laterality_extensions: frozenset[str] = frozenset()
    known_modifier_extensions: frozenset[str] = frozenset()
    local_bases: frozenset[str] = frozenset()
    """Normalized base URLs whose absolute references name local resources (config/input.yaml local_bases)."""
    mue_sources: dict[str, str] = field(default_factory=dict)
    """Where each MUE value comes from (a source, or `site decision: ...`)."""
    hl7v2: Hl7v2Tables = field(default_factory=Hl7v2Tables)
    """HL7 v2 charge messages: sender, receiver, version, value maps (config/hl7v2.yaml)."""
    local_codes: LocalCodes = field(default_factory=LocalCodes)
    """The site's procedure codes mapped to SNOMED CT/CPT (config/local-codes.json), and FNA words (input.yaml)."""
    x12: X12Tables = field(default_factory=X12Tables)
    """X12 837P claims: envelope, value maps (config/x12.yaml), billing providers' addresses and taxonomy."""

    def display_of(self, modality: str) -> str:
        return self.modalities.get(modality, modality)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot be read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise ConfigError(str(path), where, f"not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", "must be a mapping at the top level")
    return data


def _str(value: Any, file: Path, entry: str) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(str(file), entry, "must be a non-empty string")
    return value.strip()


def _list(data: dict[str, Any], key: str, file: Path, required: bool = True) -> list[Any]:
    value = data.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise ConfigError(str(file), key, "must be a non-empty list")
    return value


def _mapping(value: Any, file: Path, entry: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(str(file), entry, "must be a mapping")
    return value


def _codings(items: list[Any], key: str, file: Path, extra: tuple[str, ...] = (),
             dated: bool = False) -> list[tuple[CodeKey, dict[str, Any]]]:
    """Codings of a list (`system`, `code`, an optional `display`, and the `extra` keys the caller reads);
    `dated`: one code may have several rows, kept apart by `effective` (checked by adapter.dated.collect)."""
    out: list[tuple[CodeKey, dict[str, Any]]] = []
    seen: set[CodeKey] = set()
    for i, raw in enumerate(items):
        entry = f"{key}[{i}]"
        item = _mapping(raw, file, entry)
        check_keys(item, ("system", "code", "display", *extra), file, entry)
        system = _str(item.get("system"), file, f"{entry}.system")
        code = _str(item.get("code"), file, f"{entry}.code")
        if (system, code) in seen and not dated:
            raise ConfigError(str(file), entry, f"duplicate code {system}|{code}")
        seen.add((system, code))
        out.append(((system, code), item))
    return out


def _load_settings(path: Path) -> Settings:
    data = _read_yaml(path) if path.exists() else {}
    known = {"fhir_version", "session", "guidance", "coding", "output", "pricing", "urls"}
    for key in data:
        if key not in known:
            raise ConfigError(str(path), str(key), f"unknown setting (known: {', '.join(sorted(known))})")
    session = _mapping(data.get("session", {}), path, "session")
    guidance = _mapping(data.get("guidance", {}), path, "guidance")
    coding = _mapping(data.get("coding", {}), path, "coding")
    output = _mapping(data.get("output", {}), path, "output")
    pricing = _mapping(data.get("pricing", {}), path, "pricing")
    urls = _mapping(data.get("urls", {}), path, "urls")
    output_keys = ("claims", "require_837p")
    for name, section, keys in (("session", session, ("time_zone",)), ("guidance", guidance, ("when_missing",)),
                                ("coding", coding, ("distinct_modifier",)), ("output", output, output_keys),
                                ("pricing", pricing, ("when_missing",))):
        check_keys(section, keys, path, name)
    for key in urls:
        if key not in ("canonical_base", "guidance_code_system"):
            raise ConfigError(str(path), f"urls.{key}", "unknown setting (known: canonical_base, "
                              "guidance_code_system); identifier systems and the extension URL follow canonical_base")
    defaults = Settings()
    values: dict[str, Any] = {
        "fhir_version": _str(data.get("fhir_version", defaults.fhir_version), path, "fhir_version"),
        "time_zone": _str(session.get("time_zone", defaults.time_zone), path, "session.time_zone"),
        "when_missing": _str(guidance.get("when_missing", defaults.when_missing), path, "guidance.when_missing"),
        "distinct_modifier": _str(
            coding.get("distinct_modifier", defaults.distinct_modifier), path, "coding.distinct_modifier"
        ),
        "claims": output.get("claims", defaults.claims),
        "require_837p": output.get("require_837p", defaults.require_837p),
        "when_price_missing": _str(pricing.get("when_missing", defaults.when_price_missing), path,
                                   "pricing.when_missing"),
        "guidance_code_system": _str(urls.get("guidance_code_system", defaults.guidance_code_system), path,
                                     "urls.guidance_code_system"),
    }
    base = _str(urls.get("canonical_base", defaults.canonical_base), path, "urls.canonical_base").rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ConfigError(str(path), "urls.canonical_base", f"{base!r} must be an http(s) URL")
    host = urlsplit(base).hostname or ""
    if any(host == name or host.endswith("." + name) for name in EXAMPLE_DOMAINS):
        raise ConfigError(str(path), "urls.canonical_base",
                          f"{base!r} is an example domain, which FHIR validators reject in identifier systems")
    values["canonical_base"] = base
    values.update(canonical_urls(base))
    if values["when_price_missing"] not in ("review", "warn"):
        raise ConfigError(str(path), "pricing.when_missing", "must be 'review' or 'warn'")
    if values["when_missing"] not in ("review", "none"):
        raise ConfigError(str(path), "guidance.when_missing", "must be 'review' or 'none'")
    if not isinstance(values["claims"], bool):
        raise ConfigError(str(path), "output.claims", "must be true or false")
    if not isinstance(values["require_837p"], bool):
        raise ConfigError(str(path), "output.require_837p", "must be true or false")
    try:
        ZoneInfo(values["time_zone"])
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(str(path), "session.time_zone", f"unknown time zone {values['time_zone']!r}") from None
    return Settings(**values)


def load_tables(config_dir: str | os.PathLike[str] | None = None) -> CodeTables:
    """Load and cross-check every table in `config_dir` (default: the repository's `config/`)."""
    base = Path(config_dir) if config_dir else Path(os.environ.get("CHARGE_ADAPTER_TABLES", DEFAULT_CONFIG_DIR))
    if not base.is_dir():
        raise ConfigError(str(base), "", "configuration folder not found")

    vs_file, mod_file, cpt_file, mue_file = (base / name for name in TABLE_FILES[:4])
    settings = _load_settings(base / "settings.yaml")

    valueset = _read_yaml(vs_file)
    check_keys(valueset, ("fna", "core_needle_biopsy"), vs_file, "")
    fna = frozenset(k for k, _ in _codings(_list(valueset, "fna", vs_file), "fna", vs_file))
    core = frozenset(
        k for k, _ in _codings(_list(valueset, "core_needle_biopsy", vs_file, required=False),
                               "core_needle_biopsy", vs_file)
    )
    if fna & core:
        raise ConfigError(str(vs_file), "core_needle_biopsy", "codes may not also be in fna")

    mods = _read_yaml(mod_file)
    check_keys(mods, ("modalities", "method_codes", "procedure_codes", "guidance_procedures"), mod_file, "")
    modalities_raw = _mapping(mods.get("modalities"), mod_file, "modalities")
    modalities = {}
    for k, v in modalities_raw.items():
        check_keys(_mapping(v, mod_file, f"modalities.{k}"), ("display",), mod_file, f"modalities.{k}")
        modalities[str(k)] = _str(v.get("display", k), mod_file, f"modalities.{k}.display")

    def modality_table(key: str, required: bool) -> dict[CodeKey, Rows[str]]:
        rows: list[tuple[CodeKey, Effective, str, str]] = []
        for i, (k, item) in enumerate(_codings(_list(mods, key, mod_file, required), key, mod_file,
                                               ("modality", "effective"), dated=True)):
            modality = _str(item.get("modality"), mod_file, f"{key}[{i}].modality")
            if modality not in modalities:
                raise ConfigError(str(mod_file), f"{key}[{i}].modality",
                                  f"{modality!r} is not one of the modalities ({', '.join(modalities)})")
            rows.append((k, effective_of(item, mod_file, f"{key}[{i}]"), modality, f"{key}[{i}]"))
        return collect(rows, mod_file, lambda k: f"{k[0]}|{k[1]}")

    method_codes = modality_table("method_codes", True)
    procedure_codes = modality_table("procedure_codes", False)
    guidance_procedures = modality_table("guidance_procedures", False)
    none_key = (settings.guidance_code_system, "none")
    if none_key not in method_codes or {v for _, v in method_codes[none_key].rows} != {"none"}:
        raise ConfigError(str(mod_file), "method_codes",
                          f"must map the project code {none_key[0]}|none to modality none")

    cpt = _read_yaml(cpt_file)
    check_keys(cpt, ("system", "never_emit", "family", "modifiers"), cpt_file, "")
    cpt_system = _str(cpt.get("system"), cpt_file, "system")
    never_emit: dict[str, str] = {}
    for i, raw in enumerate(_list(cpt, "never_emit", cpt_file)):
        item = _mapping(raw, cpt_file, f"never_emit[{i}]")
        check_keys(item, ("code", "why"), cpt_file, f"never_emit[{i}]")
        never_emit[_str(item.get("code"), cpt_file, f"never_emit[{i}].code")] = _str(
            item.get("why"), cpt_file, f"never_emit[{i}].why")
    family_raw = _mapping(cpt.get("family"), cpt_file, "family")
    for modality in modalities:
        if modality not in family_raw:
            raise ConfigError(str(cpt_file), f"family.{modality}", "missing: every modality needs its codes")
    used: dict[str, str] = {}
    family_rows: list[tuple[str, Effective, FamilyEntry, str]] = []
    for modality, raw in family_raw.items():
        if modality not in modalities:
            raise ConfigError(str(cpt_file), f"family.{modality}", f"{modality!r} is not a modality of {mod_file.name}")
        if isinstance(raw, list) and not raw:
            raise ConfigError(str(cpt_file), f"family.{modality}", "must have at least one row")
        for n, row in enumerate(raw if isinstance(raw, list) else [raw]):  # one row, or rows by date of service
            entry = f"family.{modality}" + (f"[{n}]" if isinstance(raw, list) else "")
            item = _mapping(row, cpt_file, entry)
            check_keys(item, ("primary", "primary_display", "add_on", "add_on_display", "effective"), cpt_file, entry)
            fam = FamilyEntry(
                modality=str(modality),
                primary=_str(item.get("primary"), cpt_file, f"{entry}.primary"),
                primary_display=_str(item.get("primary_display", item.get("primary")), cpt_file, entry),
                add_on=_str(item.get("add_on"), cpt_file, f"{entry}.add_on"),
                add_on_display=_str(item.get("add_on_display", item.get("add_on")), cpt_file, entry),
            )
            if fam.primary == fam.add_on:
                raise ConfigError(str(cpt_file), entry, f"code {fam.primary} is used twice in the family")
            for code in (fam.primary, fam.add_on):
                if code in never_emit:
                    raise ConfigError(str(cpt_file), entry, f"{code} may never be emitted: {never_emit[code]}")
                if used.setdefault(code, str(modality)) != modality:  # rows of one modality may repeat a code
                    raise ConfigError(str(cpt_file), entry, f"code {code} is used twice in the family")
                # a CPT FNA code in Procedure.code is evidence of its modality (on every date: what a code means
                # does not change; whether it may be billed on a date is the family row's question)
                procedure_codes.setdefault((cpt_system, code), Rows(((Effective(), fam.modality),)))
            family_rows.append((str(modality), effective_of(item, cpt_file, entry), fam, entry))
    family = collect(family_rows, cpt_file, lambda m: f"family.{m}")

    modifiers: dict[str, Modifier] = {}
    for code, raw in _mapping(cpt.get("modifiers"), cpt_file, "modifiers").items():
        item = _mapping(raw, cpt_file, f"modifiers.{code}")
        check_keys(item, ("system", "display"), cpt_file, f"modifiers.{code}")
        modifiers[str(code)] = Modifier(
            str(code), _str(item.get("system"), cpt_file, f"modifiers.{code}.system"),
            _str(item.get("display", code), cpt_file, f"modifiers.{code}.display"))
    if settings.distinct_modifier not in modifiers:
        raise ConfigError(str(base / "settings.yaml"), "coding.distinct_modifier",
                          f"{settings.distinct_modifier!r} is not in {cpt_file.name} modifiers "
                          f"({', '.join(modifiers)})")

    mue, mue_sources = load_mue(mue_file, _read_yaml(mue_file))
    including = _load_including(base / "including-procedures.yaml")
    reading = _load_input(base / "input.yaml" if (base / "input.yaml").exists() else DEFAULT_CONFIG_DIR / "input.yaml")

    billing = load_billing_tables(base, _read_yaml,
                                  "config" if base.resolve() == DEFAULT_CONFIG_DIR else str(base))
    needed = {cpt_system: f"{cpt_file.name} system", ICD10CM: "ICD-10-CM diagnoses",
              **{m.system: f"{cpt_file.name} modifiers.{m.code}" for m in modifiers.values()}}
    hl7v2 = load_hl7v2_tables(base, _read_yaml, needed)
    local_codes = load_local_codes(base, cpt_system, _read_yaml)
    x12 = load_x12_tables(base, _read_yaml)

    digest = hashlib.sha256()
    definitions = sorted((base / DEFINITIONS_DIR).glob("*.json")) if (base / DEFINITIONS_DIR).is_dir() else []
    for path in [*(base / name for name in (*TABLE_FILES, *BILLING_FILES, HL7V2_FILE, LOCAL_CODES_FILE)),
                 *definitions]:
        if path.exists():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return CodeTables(
        fna=fna, core_needle_biopsy=core, modalities=modalities, method_codes=method_codes,
        procedure_codes=procedure_codes, cpt_system=cpt_system, family=family, never_emit=never_emit,
        modifiers=modifiers, mue=mue, settings=settings, billing=billing, version=digest.hexdigest()[:12],
        guidance_procedures=guidance_procedures, mue_sources=mue_sources, hl7v2=hl7v2, local_codes=local_codes,
        including=including, x12=x12,
        **reading,
    )


def load_mue(mue_file: Path, data: dict[str, Any]) -> tuple[dict[str, Rows[MueLimit]], dict[str, str]]:
    """config/mue.yaml: per code one row (a mapping, or a bare number) or a list of rows by date of service, each
    with `units`, a `source` or `site_decision`, and optionally `mai` (1, 2, 3), `rationale` and `effective`."""
    rows: list[tuple[str, Effective, MueLimit, str]] = []
    check_keys(data, ("limits",), mue_file, "")
    for code, raw in _mapping(data.get("limits", {}), mue_file, "limits").items():
        for n, row in enumerate(raw if isinstance(raw, list) else [raw]):
            entry = f"limits.{code}" + (f"[{n}]" if isinstance(raw, list) else "")
            limit, source, mai, rationale = row, "", None, ""
            effective = Effective()
            if isinstance(row, dict):
                check_keys(row, ("units", "source", "site_decision", "mai", "rationale", "effective"), mue_file, entry)
                limit = row.get("units")
                if row.get("source") is not None:
                    source = _str(row.get("source"), mue_file, f"{entry}.source")
                elif row.get("site_decision") is not None:
                    source = "site decision: " + _str(row.get("site_decision"), mue_file, f"{entry}.site_decision")
                else:
                    raise ConfigError(str(mue_file), entry, "needs a source or a site_decision")
                mai = row.get("mai")
                if mai is not None and mai not in (1, 2, 3):
                    raise ConfigError(str(mue_file), f"{entry}.mai", "must be 1 (line), 2 (day, policy) or 3 (day, "
                                                                     "clinical): the CMS MUE adjudication indicator")
                if row.get("rationale") is not None:
                    rationale = _str(row.get("rationale"), mue_file, f"{entry}.rationale")
                effective = effective_of(row, mue_file, entry)
            # CMS publishes MUE 0 for codes never payable per day; a hand-written row needs at least 1
            least = 0 if mai is not None else 1
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < least:
                raise ConfigError(str(mue_file), entry, f"must be a whole number of at least {least}")
            rows.append((str(code), effective, MueLimit(limit, source, mai, rationale), entry))
    mue = collect(rows, mue_file, lambda c: f"limits.{c}")
    return mue, {code: r.any.source for code, r in mue.items()}


def _load_including(path: Path) -> dict[CodeKey, Rows[IncludingCode]]:
    """config/including-procedures.yaml: the codes whose service includes the FNA (optional: none without it)."""
    if not path.exists():
        return {}
    data = _read_yaml(path)
    rows: list[tuple[CodeKey, Effective, IncludingCode, str]] = []
    for i, (key, item) in enumerate(_codings(_list(data, "codes", path, required=False), "codes", path,
                                                      ("source", "effective"), dated=True)):
        entry = f"codes[{i}]"
        found = IncludingCode(key[0], key[1], _str(item.get("display"), path, f"{entry}.display"),
                              _str(item.get("source"), path, f"{entry}.source"))
        rows.append((key, effective_of(item, path, entry), found, entry))
    return collect(rows, path, lambda k: f"{k[0]}|{k[1]}")


def _load_input(path: Path) -> dict[str, Any]:
    """config/input.yaml: performer functions, actor types, laterality, known modifierExtensions."""
    data = _read_yaml(path)
    check_keys(data, ("rendering_functions", "non_rendering_functions", "rendering_actor_types", "laterality",
                      "laterality_extensions", "known_modifier_extensions", "local_bases", "fna_text_words"), path, "")

    def codes(key: str) -> frozenset[CodeKey]:
        return frozenset(k for k, _ in _codings(_list(data, key, path, required=False), key, path))

    def strings(key: str) -> frozenset[str]:
        return frozenset(_str(v, path, f"{key}[{i}]") for i, v in enumerate(_list(data, key, path, required=False)))

    laterality: dict[CodeKey, str] = {}
    for i, (k, item) in enumerate(_codings(_list(data, "laterality", path, required=False), "laterality", path,
                                                     ("side",))):
        side = _str(item.get("side"), path, f"laterality[{i}].side")
        if side not in ("left", "right", "bilateral"):
            raise ConfigError(str(path), f"laterality[{i}].side", "must be left, right or bilateral")
        laterality[k] = side
    rendering = codes("rendering_functions")
    if not rendering:
        raise ConfigError(str(path), "rendering_functions", "must name at least one function (e.g. v3 PPRF)")
    actor_types = strings("rendering_actor_types") or frozenset({"Practitioner", "PractitionerRole"})
    bases: set[str] = set()
    for i, url in enumerate(_list(data, "local_bases", path, required=False)):
        text = _str(url, path, f"local_bases[{i}]")
        base = normalize_base(text)
        if base is None or urlsplit(text).scheme.lower() not in ("http", "https") or "?" in text or "#" in text:
            raise ConfigError(str(path), f"local_bases[{i}]", f"{text!r} is not a FHIR base URL such as "
                                                                "https://ehr.example.org/fhir")
        bases.add(base)
    return {"rendering_functions": rendering, "non_rendering_functions": codes("non_rendering_functions"),
            "rendering_actor_types": actor_types, "laterality": laterality,
            "laterality_extensions": strings("laterality_extensions"),
            "known_modifier_extensions": strings("known_modifier_extensions"), "local_bases": frozenset(bases)}
