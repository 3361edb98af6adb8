"""`charge-adapter mue import`: the CMS practitioner MUE table (CSV, as CMS publishes it each quarter) into
config/mue.yaml, as rows valid for that quarter (rule effective-dates).

CMS's file starts with notice lines, then a header row, then one row per HCPCS/CPT code. The columns read are
the published ones: HCPCS/CPT code, the practitioner services MUE value, the MUE adjudication indicator (MAI:
"1 Line Edit", "2 Date of Service Edit: Policy", "3 Date of Service Edit: Clinical") and the MUE rationale.
Columns are found by their header, not their position. For each imported code, the rows already in mue.yaml that
overlap the quarter give way: one that began earlier now ends the day before the quarter, one that began within
it is replaced. Everything else in the file (its comments, the other codes) stays as it was.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import yaml

from adapter.errors import ConfigError

QUARTER_RE = re.compile(r"^(\d{4})[-_ ]?Q([1-4])$", re.IGNORECASE)


@dataclass(frozen=True)
class CmsMueRow:
    code: str
    units: int
    mai: int
    rationale: str


@dataclass
class ImportResult:
    imported: list[str]
    trimmed: list[str]
    missing: list[str]
    start: date
    end: date


def quarter_dates(quarter: str) -> tuple[date, date]:
    """`2026Q2` -> (2026-04-01, 2026-06-30)."""
    match = QUARTER_RE.match(quarter.strip())
    if not match:
        raise ConfigError("--quarter", quarter, "must be a calendar quarter such as 2026Q2")
    year, number = int(match.group(1)), int(match.group(2))
    start = date(year, 3 * number - 2, 1)
    after = date(year + 1, 1, 1) if number == 4 else date(year, 3 * number + 1, 1)
    return start, after - timedelta(days=1)


def _column(header: list[str], *words: str) -> int | None:
    for i, name in enumerate(header):
        folded = " ".join(name.split()).casefold()
        if all(w in folded for w in words):
            return i
    return None


def parse_cms_mue(text: str, where: str) -> list[CmsMueRow]:
    """The rows of a CMS practitioner MUE CSV; errors name the file and the line."""
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    first = 0
    for first, header in enumerate(rows, start=1):  # noqa: B007 (first: where the code rows begin)
        code_col = _column(header, "hcpcs")
        value_col = _column(header, "mue value") or _column(header, "mue values")
        mai_col = _column(header, "adjudication indicator")
        why_col = _column(header, "rationale")
        if code_col is not None and value_col is not None and mai_col is not None:
            break
    else:
        raise ConfigError(where, "", "no header row with the HCPCS/CPT code, MUE value and MUE adjudication indicator "
                                     "columns: is this the CMS practitioner services MUE table (CSV)?")
    out: list[CmsMueRow] = []
    for line, row in enumerate(rows[first:], start=first + 1):
        if not row or not any(cell.strip() for cell in row):
            continue
        cells = row + [""] * (max(code_col, value_col, mai_col, why_col or 0) + 1 - len(row))
        code = cells[code_col].strip()
        if not code:
            continue
        value, mai_text = cells[value_col].strip(), cells[mai_col].strip()
        if not value.isdigit():
            raise ConfigError(where, f"line {line}", f"{code}: MUE value {value!r} is not a whole number")
        mai = mai_text[:1]
        if mai not in ("1", "2", "3"):
            raise ConfigError(where, f"line {line}", f"{code}: MUE adjudication indicator {mai_text!r} is not 1, 2 "
                                                     "or 3")
        rationale = " ".join(cells[why_col].split()) if why_col is not None else ""
        out.append(CmsMueRow(code, int(value), int(mai), rationale))
    if not out:
        raise ConfigError(where, "", "the header row is followed by no code rows")
    return out


def _rows_of(raw: Any) -> list[dict[str, Any]]:
    if isinstance(raw, list):
        return [dict(r) if isinstance(r, dict) else {"units": r} for r in raw]
    return [dict(raw) if isinstance(raw, dict) else {"units": raw}]


def _as_day(value: Any) -> date | None:
    return value if isinstance(value, date) or value is None else date.fromisoformat(str(value))


def merge(limits: dict[str, Any], rows: list[CmsMueRow], codes: set[str] | None, start: date, end: date,
          source: str) -> tuple[dict[str, Any], ImportResult]:
    """The `limits` mapping with the quarter's rows of `codes` (all of the file's when None)."""
    result = ImportResult([], [], [], start, end)
    found = {r.code: r for r in rows}
    wanted = sorted(codes) if codes is not None else sorted(found)
    merged = dict(limits)
    for code in wanted:
        row = found.get(code)
        if row is None:
            result.missing.append(code)
            continue
        kept: list[dict[str, Any]] = []
        for old in _rows_of(merged[code]) if code in merged else []:
            eff = old.get("effective") or {}
            old_start, old_end = _as_day(eff.get("start")), _as_day(eff.get("end"))
            if (old_end is not None and old_end < start) or (old_start is not None and old_start > end):
                kept.append(old)
            elif old_start is None or old_start < start:  # began before the quarter: it ends the day before
                old["effective"] = {k: v for k, v in (("start", old_start), ("end", start - timedelta(days=1))) if v}
                kept.append(old)
                result.trimmed.append(code)
            else:
                result.trimmed.append(code)  # began within the quarter: replaced
        new: dict[str, Any] = {"units": row.units, "mai": row.mai}
        if row.rationale:
            new["rationale"] = row.rationale
        new["source"] = source
        new["effective"] = {"start": start, "end": end}
        merged[code] = sorted([*kept, new], key=lambda r: _as_day((r.get("effective") or {}).get("start")) or date.min)
        result.imported.append(code)
    return merged, result


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()


def render(header: str, limits: dict[str, Any]) -> str:
    """mue.yaml text: the comment header kept, one flow mapping per row."""
    out = [header.rstrip("\n"), "limits:"] if header.strip() else ["limits:"]
    for code in limits:
        rows = _rows_of(limits[code])
        if len(rows) == 1 and "effective" not in rows[0]:
            out.append(f'  "{code}": {_flow(rows[0])}')
        else:
            out.append(f'  "{code}":')
            out += [f"    - {_flow(r)}" for r in rows]
    return "\n".join(out) + "\n"


def import_file(csv_path: Path, mue_path: Path, quarter: str, codes: set[str] | None) -> ImportResult:
    """Read the CMS CSV, merge its quarter into `mue_path`, check the result loads, then replace the file."""
    from adapter.config import load_mue  # the loader is the judge of what is written

    start, end = quarter_dates(quarter)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = csv_path.read_text(encoding="cp1252")
    except OSError as exc:
        raise ConfigError(str(csv_path), "", f"cannot be read ({exc.strerror})") from None
    rows = parse_cms_mue(text, str(csv_path))
    current = mue_path.read_text(encoding="utf-8") if mue_path.exists() else ""
    data = yaml.safe_load(current) or {}
    if not isinstance(data, dict):
        raise ConfigError(str(mue_path), "", "must be a mapping at the top level")
    header = current.split("\nlimits:", 1)[0] + "\n" if "\nlimits:" in current else ""
    source = f"CMS practitioner services MUE table {quarter.upper()} ({csv_path.name})"
    limits, result = merge(data.get("limits") or {}, rows, codes, start, end, source)
    text = render(header, limits)
    load_mue(mue_path, yaml.safe_load(text))  # refuse to write a table the adapter would not load
    tmp = mue_path.with_suffix(".yaml.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(mue_path)
    return result
