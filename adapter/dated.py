"""Table rows by date of service: every row of a code table may carry `effective: {start, end}`.

Codes change on fixed dates (the CPT FNA family began on 1 January 2019; CMS publishes MUEs quarterly), so the
date of service, not the day the adapter runs, chooses the row. A row without `effective` is valid on every date;
`start` and `end` are inclusive ISO dates, either may be omitted. Rows of one key must not overlap in time: the
loader refuses a table where two rows could answer for one date, so a lookup never has to choose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Generic, TypeVar

from adapter.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Effective:
    """When a row is valid: both ends inclusive, `None` open."""

    start: date | None = None
    end: date | None = None

    def covers(self, day: str | date | None) -> bool:
        """Whether the row is valid on `day`; a Procedure without a date of service takes any row (it is in review
        for its date already)."""
        if day is None:
            return True
        when = day if isinstance(day, date) else date.fromisoformat(day[:10])
        return (self.start is None or self.start <= when) and (self.end is None or when <= self.end)

    def overlaps(self, other: Effective) -> bool:
        return ((self.start is None or other.end is None or self.start <= other.end)
                and (other.start is None or self.end is None or other.start <= self.end))

    @property
    def always(self) -> bool:
        return self.start is None and self.end is None

    def text(self) -> str:
        if self.always:
            return "on every date"
        if self.end is None:
            return f"from {self.start}"
        if self.start is None:
            return f"until {self.end}"
        return f"{self.start} to {self.end}"


@dataclass(frozen=True)
class Rows(Generic[T]):
    """The rows of one key, each with when it is valid."""

    rows: tuple[tuple[Effective, T], ...]

    def on(self, day: str | date | None) -> T | None:
        """The row valid on `day`, or None when the table has none for that date."""
        for effective, value in self.rows:
            if effective.covers(day):
                return value
        return None

    def periods(self) -> str:
        """Where the table has rows, for a review that found none on its date."""
        return "; ".join(effective.text() for effective, _ in self.rows)

    @property
    def any(self) -> T:
        return self.rows[0][1]


def day_of(value: Any, file: Path, entry: str) -> date | None:
    if value is None:
        return None
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(str(file), entry, f"{value!r} is not a date (YYYY-MM-DD)") from None


def effective_of(item: dict[str, Any], file: Path, entry: str) -> Effective:
    """The `effective` of one table row (omitted: valid on every date)."""
    raw = item.get("effective")
    if raw is None:
        return Effective()
    if not isinstance(raw, dict) or set(raw) - {"start", "end"}:
        raise ConfigError(str(file), f"{entry}.effective", "must be a mapping with start and/or end (YYYY-MM-DD)")
    found = Effective(day_of(raw.get("start"), file, f"{entry}.effective.start"),
                      day_of(raw.get("end"), file, f"{entry}.effective.end"))
    if found.start and found.end and found.end < found.start:
        raise ConfigError(str(file), f"{entry}.effective", "ends before it starts")
    return found


def collect(items: Iterable[tuple[Any, Effective, T, str]], file: Path,
            describe: Callable[[Any], str] = str) -> dict[Any, Rows[T]]:
    """Group (key, effective, value, entry) rows by key; two rows of one key valid on one date are an error."""
    grouped: dict[Any, list[tuple[Effective, T, str]]] = {}
    for key, effective, value, entry in items:
        for other, _, other_entry in grouped.get(key, []):
            if other.overlaps(effective):
                raise ConfigError(str(file), entry, f"{describe(key)} overlaps {other_entry} in time "
                                                    f"({other.text()} and {effective.text()}): which row applies?")
        grouped.setdefault(key, []).append((effective, value, entry))
    return {key: Rows(tuple(sorted(((e, v) for e, v, _ in rows),
                                   key=lambda r: r[0].start or date.min)))
            for key, rows in grouped.items()}
