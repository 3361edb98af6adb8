"""Every value of an ER7 message checked against hl7apy's reference, and each message shape verified by hl7apy once.

hl7apy's strict validation of a whole message (an object tree, every field re-parsed, a report file) costs
about 20 ms; a charge feed sends the same few shapes again and again with other values. So the work is split:

- `check_values` (every message, ~0.1 ms): each non-empty field, component and subcomponent against what
  hl7apy's reference says of that position in the message's version: its base datatype, built with hl7apy's
  own datatype classes in strict mode (a date that is no date, a number that is none, an ST over 199
  characters), the reference's maximum length, and the HL7 table when hl7apy has a copy of it (the local
  99zzz coding systems of table 0396 excepted, as in `messages.validate`). A position the reference does not
  know, or components where the datatype has none, is an error too.
- `ShapeCheck` (once per shape): the sequence of segment names and each segment's skeleton (delimiters kept,
  which positions hold a value) decide everything hl7apy's structure validation looks at: segments, groups,
  cardinality, allowed children, datatypes. A message with a sequence or a segment shape not seen before is
  parsed back and validated strictly by hl7apy; the others only need `check_values`.

The reference data is read once per version and position, lazily.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_LOCAL_SYSTEM = re.compile(r"^99[A-Z0-9]{1,3}$")
"""Table 0396 reserves 99zzz for local coding systems; hl7apy's copy does not list them."""
_VALUE = re.compile(r"[^|^~&\r]+")
_REWRITTEN = frozenset({"DT", "TM", "DTM", "NM", "SI"})
"""Base datatypes hl7apy stores as numbers or times: their text is written anew."""
_VERDICTS = 20_000
"""Leaf verdicts remembered per version (then forgotten all at once): under 10 MiB."""
_FINE: tuple[str, ...] = ()


@dataclass(frozen=True)
class Leaf:
    """One position holding a value: its name (for errors), base datatype, maximum length, table."""

    name: str
    datatype: str
    max_length: int
    table: str | None
    values: frozenset[str] | None
    """The table's values, when hl7apy has the table; None: nothing to check against."""


@dataclass(frozen=True)
class Composite:
    """A field or component of a composite datatype: its parts by position (1-based in `name`)."""

    name: str
    datatype: str
    parts: tuple[Leaf | Composite, ...]


class ValueProblem(ValueError):
    """What `check_values` found: every problem of a message, each naming its position."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class Reference:
    """hl7apy's reference for one HL7 version, read lazily and kept: positions, datatype builders, tables."""

    def __init__(self, version: str) -> None:
        from hl7apy import load_library

        self.version = version
        self._fields: dict[tuple[str, int], Leaf | Composite | None] = {}
        self._tables: dict[str, frozenset[str] | None] = {}
        self._lock = threading.Lock()
        self._verdicts: dict[tuple[str, str], tuple[str, ...]] = {}
        self._builders = self._datatype_builders(load_library(version).get_base_datatypes())

    @staticmethod
    def _datatype_builders(base: dict[str, Any]) -> dict[str, Callable[[str], Any]]:
        """What hl7apy's `datatype_factory` does for each base datatype, without its per-call library lookup."""
        from hl7apy import factories
        from hl7apy.consts import VALIDATION_LEVEL

        strict = VALIDATION_LEVEL.STRICT
        special = {"DT": factories.date_factory, "TM": factories.timestamp_factory,
                   "DTM": factories.datetime_factory, "NM": factories.numeric_factory,
                   "SI": factories.sequence_id_factory}
        builders: dict[str, Callable[[str], Any]] = {}
        for name, cls in base.items():
            if name in special:
                builders[name] = lambda value, f=special[name], c=cls: f(value, c, validation_level=strict)
            else:
                builders[name] = lambda value, c=cls: c(value, validation_level=strict)
        return builders

    def field(self, segment: str, number: int) -> Leaf | Composite | None:
        key = (segment, number)
        try:
            return self._fields[key]
        except KeyError:
            pass
        with self._lock:
            if key not in self._fields:
                self._fields[key] = self._load_field(segment, number)
            return self._fields[key]

    def _load_field(self, segment: str, number: int) -> Leaf | Composite | None:
        from hl7apy import load_reference
        from hl7apy.exceptions import ChildNotFound

        name = f"{segment}_{number}"
        try:
            ref = load_reference(name, "Field", self.version)
        except ChildNotFound:
            return None
        return self._element(f"{segment}-{number}", ref)

    def _element(self, name: str, ref: Any) -> Leaf | Composite:
        from hl7apy import load_reference
        from hl7apy.core import is_base_datatype

        kind, _children, datatype, _long_name, table, max_length = ref[:6]
        if kind == "leaf" or datatype == "varies" or is_base_datatype(datatype, self.version):
            return Leaf(name, datatype, max_length if isinstance(max_length, int) else -1, table,
                        self._table(table) if table else None)
        structure = load_reference(datatype, "Datatypes_Structs", self.version)
        return Composite(name, datatype, tuple(self._element(f"{name}.{n}", child[1])
                                               for n, child in enumerate(structure, start=1)))

    def _table(self, table: str) -> frozenset[str] | None:
        if table not in self._tables:
            from hl7apy import load_reference
            from hl7apy.exceptions import ChildNotFound

            try:
                self._tables[table] = frozenset(load_reference(table, "Table", self.version)[1])
            except ChildNotFound:
                self._tables[table] = None
        return self._tables[table]

    def check_leaf(self, leaf: Leaf, value: str, problems: list[str]) -> None:
        """`value` (ER7 text, escapes as written) against the leaf's datatype, length and table. A pure function
        of the position and the value, so remembered: a feed repeats most values (codes, providers, times)."""
        key = (leaf.name, value)
        found = self._verdicts.get(key)
        if found is None:
            fresh: list[str] = []
            self._check_leaf(leaf, value, fresh)
            found = tuple(fresh) if fresh else _FINE
            if len(self._verdicts) >= _VERDICTS:
                self._verdicts.clear()
            self._verdicts[key] = found
        problems += found

    def _check_leaf(self, leaf: Leaf, value: str, problems: list[str]) -> None:
        if leaf.values is not None and value not in leaf.values \
                and not (leaf.table == "HL70396" and _LOCAL_SYSTEM.match(value)):
            problems.append(f"{leaf.name}: value {value} not in table {leaf.table}")
        if -1 < leaf.max_length < len(value):
            problems.append(f"{leaf.name}: exceeded max length ({leaf.max_length}): {value[:40]}")
        build = self._builders.get(leaf.datatype)
        if build is None:  # 'varies' or a type without a class: hl7apy checks nothing either
            return
        from hl7apy.exceptions import HL7apyException

        try:
            built = build(value)
        except (ValueError, TypeError, HL7apyException) as exc:
            problems.append(f"{leaf.name}: {value[:40]!r} is not a valid {leaf.datatype} ({type(exc).__name__}"
                            f"{': ' + str(exc) if str(exc) else ''})")
            return
        # hl7apy writes numbers and times back in its own form, and escapes a backslash that starts no escape
        # sequence: a value it would write differently is not what was meant
        if (leaf.datatype in _REWRITTEN or "\\" in value) and built.to_er7() != value:
            problems.append(f"{leaf.name}: {value[:40]!r} is not in the canonical form of a {leaf.datatype} "
                            f"({built.to_er7()[:40]!r})")


_REFERENCES: dict[str, Reference] = {}
_REFERENCES_LOCK = threading.Lock()


def forget_references() -> None:
    """Drop what was read from hl7apy and every value verdict (the benchmarks measure a fresh process)."""
    with _REFERENCES_LOCK:
        _REFERENCES.clear()


def reference(version: str) -> Reference:
    with _REFERENCES_LOCK:
        if version not in _REFERENCES:
            _REFERENCES[version] = Reference(version)
        return _REFERENCES[version]


def check_values(text: str, version: str) -> None:
    """Every value of the ER7 message `text` (segments separated by CR, default delimiters) against hl7apy's
    reference of `version`; raises ValueProblem naming every position that fails."""
    ref = reference(version)
    problems: list[str] = []
    for segment in text.split("\r"):
        if not segment:
            continue
        fields = segment.split("|")
        name = fields[0]
        if name == "MSH":  # MSH-1 is the separator itself and MSH-2 the encoding characters
            numbered = enumerate(fields[2:], start=3)
        else:
            numbered = enumerate(fields[1:], start=1)
        for number, field_text in numbered:
            if not field_text.strip():
                continue
            spec = ref.field(name, number)
            if spec is None:
                problems.append(f"{name}-{number}: not a field of {name} in HL7 v{version}")
                continue
            for repetition in field_text.split("~"):
                _check_element(ref, spec, repetition, "^", problems)
    if problems:
        raise ValueProblem(problems)


def _check_element(ref: Reference, spec: Leaf | Composite, text: str, separator: str, problems: list[str]) -> None:
    if not text.strip():  # hl7apy's parser skips blank parts as absent
        return
    if isinstance(spec, Leaf):
        if "^" in text or "&" in text:
            problems.append(f"{spec.name}: is a {spec.datatype}, which has no components: {text[:40]}")
            return
        ref.check_leaf(spec, text, problems)
        return
    parts = text.split(separator)
    if len(parts) > len(spec.parts):
        problems.append(f"{spec.name}: a {spec.datatype} has {len(spec.parts)} parts, not {len(parts)}")
        parts = parts[:len(spec.parts)]
    inner = "&" if separator == "^" else None
    for part_spec, part in zip(spec.parts, parts, strict=False):
        if not part.strip():
            continue
        if inner is None:  # below subcomponents nothing can nest
            if isinstance(part_spec, Composite):
                problems.append(f"{part_spec.name}: a {part_spec.datatype} cannot be written inside a "
                                "subcomponent")
                continue
            ref.check_leaf(part_spec, part, problems)
        else:
            _check_element(ref, part_spec, part, inner, problems)


def skeleton(text: str) -> str:
    """The message's shape: segment names and delimiters kept, every value replaced by `x`."""
    return "\r".join(segment[:3] + _VALUE.sub("x", segment[3:]) for segment in text.split("\r"))


class ShapeCheck:
    """Which shapes hl7apy's strict validation has accepted, so that each is verified once: the sequence of
    segment names (what the message structure and its groups depend on) and each segment's skeleton (what a
    segment's validation depends on: which fields, components, repetitions hold a value), per version and
    MSH-9. hl7apy validates a message as the sum of its segments against their references, so a message whose
    sequence and segments are all known needs only `check_values`. Bounded: past `limit` keys the oldest are
    forgotten (and verified again when met)."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._known: dict[tuple[str, ...], None] = {}
        self._lock = threading.Lock()
        self.verified = 0
        """How many messages hl7apy validated in full (each with a new sequence or segment shape)."""

    def clear(self) -> None:
        with self._lock:
            self._known.clear()
            self.verified = 0

    def needs_check(self, text: str, version: str) -> list[tuple[str, ...]] | None:
        """The shapes of `text` hl7apy has not accepted yet, or None when it has accepted them all."""
        segments = text.split("\r")
        header = segments[0].split("|")
        message_type = header[8] if len(header) > 8 else ""
        keys = [("sequence", version, message_type, "\r".join(s[:3] for s in segments))]
        keys += [("segment", version, message_type, s[:3] + _VALUE.sub("x", s[3:])) for s in segments]
        unknown = [key for key in keys if key not in self._known]
        return unknown or None

    def accepted(self, keys: list[tuple[str, ...]]) -> None:
        with self._lock:
            self.verified += 1
            for key in keys:
                self._known[key] = None
            while len(self._known) > self.limit:
                del self._known[next(iter(self._known))]
