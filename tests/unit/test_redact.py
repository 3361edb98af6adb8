"""What may reach logs and stderr (adapter.redact), and the session's log scan that checks it (tests/logscan.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter import redact
from adapter.redact import FreeText
from tests import logscan

BODY_STRUCTURE = {"resourceType": "BodyStructure", "id": "bs-1", "description": "Left thyroid lobe nodule, 16 mm",
                  "location": {"coding": [{"code": "69748006", "display": "Thyroid structure"}]},
                  "patient": {"reference": "Patient/p1"}}
PATIENT = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Abernathy", "given": ["Rosalind"]}]}


@pytest.fixture(autouse=True)
def _default_mode() -> Iterator[None]:
    redact.configure("omit")  # whatever a test before this module left
    yield
    redact.configure("omit")


def test_free_text_of_the_resources_is_masked_in_messages() -> None:
    text = FreeText.of([BODY_STRUCTURE, PATIENT])
    detail = "BodyStructure/bs-1 (Left thyroid lobe nodule, 16 mm / Thyroid structure) of Patient/p1 Rosalind"
    assert text.mask(detail) == "BodyStructure/bs-1 ([text] / [text]) of Patient/*** [text]"


def regex_mask(strings: set[str], text: str) -> str:
    """The masking before the automaton, kept as the oracle: one alternation of every string, longest first."""
    if strings:
        pattern = re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))
        text = pattern.sub(redact.MASK, text)
    return redact.scrub(text)


PIECES = st.text(alphabet="ab .\u00e9\U0001f600\ud800", min_size=0, max_size=9)
"""A small alphabet (overlaps and prefixes are frequent), with a non-BMP character and a lone surrogate."""


@settings(max_examples=300, deadline=None)
@given(st.lists(PIECES, max_size=12), st.lists(st.tuples(st.integers(0, 11), PIECES), max_size=8), PIECES)
def test_the_automaton_masks_what_the_regex_alternation_masked(strings: list[str], joins: list[tuple[int, str]],
                                                                 tail: str) -> None:
    """Strings inside strings, overlapping strings, strings sharing prefixes, text made of them and glue."""
    free = FreeText(strings)
    text = "".join(strings[i % len(strings)] + glue if strings else glue for i, glue in joins) + tail + " Patient/p1"
    assert free.mask(text) == regex_mask(free.strings, text)


def test_the_leftmost_then_longest_string_is_masked() -> None:
    free = FreeText(["abcd", "bcdefg", "abcdef", "cdef"])
    assert free.mask("xabcdefgh bcdefgh") == "x[text]gh [text]h" == regex_mask(free.strings, "xabcdefgh bcdefgh")


@pytest.mark.parametrize(("mode", "shown"), [("omit", "Patient/***"), ("plain", "Patient/p1")])
def test_patient_references_follow_the_mode(mode: str, shown: str) -> None:
    redact.configure(mode)
    assert redact.scrub("session of Patient/p1 on 2026-01-01") == f"session of {shown} on 2026-01-01"


def test_hashed_patient_references_are_stable_and_keyed() -> None:
    redact.configure("hashed", "installation-a")
    first = redact.patient("Patient/p1")
    assert first.startswith("Patient/#") and first == redact.patient("Patient/p1") != redact.patient("Patient/p2")
    redact.configure("hashed", "installation-b")
    assert redact.patient("Patient/p1") != first  # another installation's key: not comparable, not reversible
    assert "p1" not in first and redact.scrub("of Patient/p1") == f"of {redact.patient('Patient/p1')}"


def test_the_log_scan_finds_what_it_is_there_to_find() -> None:
    forbidden = logscan.forbidden_texts([{"resourceType": "Bundle", "entry": [{"resource": BODY_STRUCTURE},
                                                                            {"resource": PATIENT}]}])
    assert forbidden == {"Left thyroid lobe nodule, 16 mm": "BodyStructure.description", "Abernathy": "patient name",
                         "Rosalind": "patient name"}
    logs = [("a", "INFO adapter.sync: coded BodyStructure/bs-1"),
            ("b", "WARNING adapter.sync: lesion Left thyroid lobe nodule, 16 mm"),
            ("c", "ERROR adapter.cli: Authorization: Bearer s3cret-token-value"),
            ("d", "INFO adapter.service: recoding Patient/p1"),
            ("e", "DEBUG adapter.service: recoding Patient/p1"),
            ("f", "recoding Patient/p1 at -vv")]
    lines, findings = logscan.scan([*logs[:5], (logs[5][0] + " [debug]", logs[5][1])], forbidden,
                                   secrets=["s3cret-token-value"])
    assert lines == 6
    assert [f.split(":", 1)[0] for f in findings] == ["b", "c", "d"]
