"""A scan of everything the adapter logged during the test session for text that must never be there.

Sources: the adapter's loggers in this process (captured at DEBUG, the most talkative level), the stderr of
every `charge-adapter` process and CLI invocation the tests ran, and the log files of the processes they
started. Forbidden: the free text of the fixture resources (BodyStructure descriptions, notes), patient
names, and the test tokens; and, outside DEBUG lines, patient references (`Patient/<id>`).

`tests/conftest.py` runs the scan when the session ends and fails the run if it finds anything.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "fhir"
PATIENT_REFERENCE = re.compile(r"\bPatient/[A-Za-z0-9][A-Za-z0-9\-.]{0,63}\b")
_MIN = 4

_lock = threading.Lock()
_texts: list[tuple[str, str]] = []
_files: list[Path] = []
_secrets: set[str] = set()


def add_text(origin: str, text: str | None, *, debug: bool = False) -> None:
    """stderr (or any log text) produced by the adapter, with where it came from; `debug`: it ran at -vv,
    where patient references are allowed (free text, names and tokens never are)."""
    if text:
        with _lock:
            _texts.append((origin + (" [debug]" if debug else ""), text))


def add_file(path: Path) -> None:
    """A log file an adapter process writes; read when the session ends."""
    with _lock:
        _files.append(Path(path))


def secret(value: str) -> str:
    """A credential the tests use: it must never appear in a log."""
    with _lock:
        _secrets.add(value)
    return value


class Capture(logging.Handler):
    """Collects the adapter's log records in this process."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            add_text("in-process log", self.format(record))
        except Exception:  # a broken record must not break the test that logged it
            self.handleError(record)


def _resources(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        if isinstance(value.get("resourceType"), str):
            yield value
        for item in value.values():
            yield from _resources(item)
    elif isinstance(value, list):
        for item in value:
            yield from _resources(item)


def _fixture_documents() -> Iterator[Any]:
    for path in sorted(FIXTURES.rglob("*")):
        if path.suffix == ".json" and path.name not in ("expected.json", "output.json"):
            try:
                yield json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue  # the deliberately broken inputs
        elif path.suffix == ".ndjson":
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    yield json.loads(line)
                except ValueError:
                    continue


def forbidden_texts(documents: Iterable[Any] | None = None) -> dict[str, str]:
    """Text -> what it is, from FHIR resources: descriptions, notes, patient names."""
    found: dict[str, str] = {}
    for document in _fixture_documents() if documents is None else documents:
        for resource in _resources(document):
            kind = resource["resourceType"]
            if isinstance(resource.get("description"), str) and kind not in ("Bundle",):
                found[resource["description"]] = f"{kind}.description"
            for note in resource.get("note") or []:
                if isinstance(note, dict) and isinstance(note.get("text"), str):
                    found[note["text"]] = f"{kind}.note"
            if kind in ("Patient", "RelatedPerson"):
                for name in resource.get("name") or []:
                    if not isinstance(name, dict):
                        continue
                    for part in [name.get("family"), name.get("text"), *(name.get("given") or [])]:
                        if isinstance(part, str):
                            found[part] = "patient name"
    return {text: what for text, what in found.items() if len(text.strip()) >= _MIN}


def scan(texts: Iterable[tuple[str, str]] | None = None, forbidden: dict[str, str] | None = None,
         secrets: Iterable[str] | None = None) -> tuple[int, list[str]]:
    """(lines scanned, findings). Without arguments: everything collected in this session."""
    with _lock:
        collected = list(_texts) if texts is None else list(texts)
        files = list(_files) if texts is None else []
        tokens = set(_secrets) if secrets is None else set(secrets)
    for path in files:
        if path.exists():
            collected.append((str(path), path.read_text(encoding="utf-8", errors="replace")))
    forbidden = forbidden_texts() if forbidden is None else forbidden
    words = {text: what for text, what in forbidden.items()}
    words.update({token: "a token" for token in tokens if len(token) >= 8})
    pattern = re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))) if words else None
    findings: list[str] = []
    lines = 0
    for origin, text in collected:
        for line in text.splitlines():
            lines += 1
            hit = pattern.search(line) if pattern else None
            if hit:
                findings.append(f"{origin}: {words[hit.group(0)]} in: {line[:200]}")
            elif not origin.endswith("[debug]") and " DEBUG " not in f" {line}" and PATIENT_REFERENCE.search(line):
                findings.append(f"{origin}: a patient reference outside debug level in: {line[:200]}")
    return lines, findings
