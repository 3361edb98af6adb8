"""What may appear in logs and on stderr: no free text from resources, and patient references only on request.

* Free text (BodyStructure descriptions, notes, narrative, names, displays) never leaves through logs or
  stderr: `FreeText` collects it from the input resources and masks it in any message built from them
  (review details embed lesion labels, for instance). `explain` and `review show` are where an analyst
  sees everything.
* Patient references (`Patient/123`) are omitted from log lines and stderr by default; at debug level
  (`-vv`) they are shown, and with `logging.patient_references: hashed` they become a keyed hash that is
  stable for one installation (the key is the state's random installation id), so lines about one
  patient can be followed without naming them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from typing import Any

import ahocorasick

PATIENT_REFERENCE = re.compile(r"\bPatient/[A-Za-z0-9\-.]{1,64}")
MASK = "[text]"
FREE_TEXT_KEYS = frozenset({"description", "text", "div", "display", "family", "given", "prefix", "suffix",
                            "comment", "valueString", "valueMarkdown", "name", "alias", "line"})
"""Keys whose string values are free text in FHIR resources (a superset: masking a code display is harmless)."""
_MIN_MASKED = 4


class _Mode:
    patients = "omit"  # omit | hashed | plain
    key = b""


def configure(patients: str, key: str | bytes = b"") -> None:
    """`patients`: `omit` (default), `hashed` (needs `key`) or `plain` (debug level)."""
    if patients not in ("omit", "hashed", "plain"):
        raise ValueError(f"unknown patient reference mode {patients!r}")
    _Mode.patients = patients
    _Mode.key = key.encode() if isinstance(key, str) else key


def patient(reference: str | None) -> str:
    """How a patient reference may appear in a log line or on stderr."""
    if not reference:
        return "-"
    if _Mode.patients == "plain":
        return reference
    if _Mode.patients == "hashed" and _Mode.key:
        digest = hmac.new(_Mode.key, reference.encode(), hashlib.sha256).hexdigest()[:12]
        return f"Patient/#{digest}"
    return "Patient/***"


def patients(references: Iterable[str]) -> str:
    refs = sorted(set(references))
    if _Mode.patients == "omit":
        return f"{len(refs)} patient{'s' if len(refs) != 1 else ''}"
    return ", ".join(patient(r) for r in refs)


def scrub(text: str) -> str:
    """`text` with every patient reference replaced as `patient()` would show it."""
    if _Mode.patients == "plain":
        return text
    return PATIENT_REFERENCE.sub(lambda m: patient(m.group(0)), text)


class FreeText:
    """The free-text strings of some resources, to mask them in messages built from those resources."""

    def __init__(self, strings: Iterable[str] = ()) -> None:
        self.strings: set[str] = {s for s in strings if len(s.strip()) >= _MIN_MASKED}
        self._matcher: Any = None

    @classmethod
    def of(cls, resources: Iterable[dict[str, Any]]) -> FreeText:
        found: set[str] = set()
        for resource in resources:
            _collect(resource, found)
        return cls(found)

    @staticmethod
    def strings_of(resource: dict[str, Any]) -> set[str]:
        """The strings of one resource that `FreeText.of` would mask."""
        found: set[str] = set()
        _collect(resource, found)
        return {s for s in found if len(s.strip()) >= _MIN_MASKED}

    def _automaton(self) -> Any:
        """An Aho-Corasick automaton of the collected strings (each word's value is its length), built once."""
        if self._matcher is None and self.strings:
            automaton = ahocorasick.Automaton()
            for s in self.strings:
                automaton.add_word(s, len(s))
            automaton.make_automaton()
            self._matcher = automaton
        return self._matcher

    def add(self, other: FreeText) -> None:
        self.strings |= other.strings
        self._matcher = None

    def mask(self, text: str) -> str:
        """`text` with every collected string replaced by `[text]`, then patients scrubbed.

        Scanned from the left: at the first position where some collected string starts, the longest one
        starting there is replaced, and the scan goes on after it (what a regex alternation of the strings,
        longest first, replaces). One pass over `text` against the automaton, whatever the number of strings."""
        automaton = self._automaton()
        if automaton is not None:
            text = mask_matches(text, automaton.iter(text))
        return scrub(text)


def mask_matches(text: str, matches: Iterable[tuple[int, int]]) -> str:
    """`text` with the leftmost-longest, non-overlapping of `matches` ((end index, length) pairs, as
    `ahocorasick.Automaton.iter` gives them) replaced by `[text]`."""
    longest: dict[int, int] = {}
    for end, length in matches:
        start = end - length + 1
        if longest.get(start, 0) < length:
            longest[start] = length
    if not longest:
        return text
    out: list[str] = []
    at = 0
    for start in sorted(longest):
        if start >= at:
            out.append(text[at:start])
            out.append(MASK)
            at = start + longest[start]
    out.append(text[at:])
    return "".join(out)


def _collect(value: Any, found: set[str], key: str = "") -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _collect(v, found, k)
    elif isinstance(value, list):
        for v in value:
            _collect(v, found, key)
    elif isinstance(value, str) and key in FREE_TEXT_KEYS:
        found.add(value)
