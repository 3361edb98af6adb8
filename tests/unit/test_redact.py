"""What may reach logs and stderr (adapter.redact), and the session's log scan that checks it (tests/logscan.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
