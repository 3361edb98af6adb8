"""Read FHIR JSON, NDJSON and folders of them into plain resource dicts, remembering where each came from.

A file that cannot be read is reported with its path and the reason, and the other files are still
read: one bad input never hides the rest.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter import jsonin
from adapter.errors import InputError
from adapter.extraction.index import SourcedResource

FHIR_SUFFIXES = (".json", ".ndjson", ".jsonl")


@dataclass(frozen=True)
class EntryProblem:
    """A part of a readable file that is not a usable resource (an entry without one, say)."""

    origin: str
    reason: str


@dataclass
class ReadResult:
    """What was read. `resources` and `problems` only need `append` (the streaming path spills them to disk
    as they come); `mark` and `discard` take back what one file gave when it turns out unreadable."""

    resources: list[SourcedResource] = field(default_factory=list)
    problems: list[EntryProblem] = field(default_factory=list)
    unreadable: list[InputError] = field(default_factory=list)
    notes: list[EntryProblem] = field(default_factory=list)
    """What is reported at info level only (a searchset's outcome entries): never a problem, never exit 1."""

    def mark(self) -> tuple[int, int]:
        return len(self.resources), len(self.problems)

    def discard(self, mark: tuple[int, int]) -> None:
        del self.resources[mark[0]:]
        del self.problems[mark[1]:]


def iter_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Files named directly, and FHIR files found below folders (sorted, so runs are repeatable)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for found in sorted(path.rglob("*")):
                if found.is_file() and found.suffix.lower() in FHIR_SUFFIXES:
                    yield found
        else:
            yield path


def flatten(resource: dict[str, Any], origin: str, result: ReadResult, modifier_free: bool = False) -> None:
    """Add a resource, or every resource inside a Bundle (of any type, nested Bundles too), as its type says
    (docs/input-contract.md, bundle-semantics): an entry whose `request.method` is DELETE deletes its resource,
    whether or not it carries a body; a GET/HEAD entry is a read request and carries no data; a PATCH is not
    applied; a searchset's `search.mode: outcome` entry is reported at info level; a message Bundle starts with
    its MessageHeader, whose focus must be in the message."""
    if resource.get("resourceType") != "Bundle":
        result.resources.append(SourcedResource(resource, origin, modifier_free=modifier_free))
        return
    entries = resource.get("entry") or []
    if not isinstance(entries, list):
        result.problems.append(EntryProblem(origin, "Bundle.entry is not a list"))
        return
    kind = resource.get("type")
    if kind == "message":
        _check_message(entries, origin, result)
    for i, entry in enumerate(entries):
        where = f"{origin}#entry[{i}]"
        if not isinstance(entry, dict):
            result.problems.append(EntryProblem(where, "entry is not a JSON object"))
            continue
        inner = entry.get("resource")
        request = entry.get("request") if isinstance(entry.get("request"), dict) else {}
        method = request.get("method")
        if method == "DELETE":  # deleted, whether or not the entry still carries the old resource
            body = inner if isinstance(inner, dict) and isinstance(inner.get("resourceType"), str) else None
            tombstone = _tombstone(request, entry.get("response") or {}, body)
            if tombstone:
                result.resources.append(SourcedResource(tombstone, where, deleted=True))
            else:
                result.problems.append(EntryProblem(where, f"DELETE {str(request.get('url', ''))[:80]!r} names no "
                                                           "resource by Type/id and carries none: what it deletes "
                                                           "is the server's to tell (not applied)"))
            continue
        if inner is None:
            if method not in ("GET", "HEAD"):  # a read request of a batch carries no data by design
                result.problems.append(EntryProblem(where, "entry has no resource"))
            continue
        if not isinstance(inner, dict) or not isinstance(inner.get("resourceType"), str):
            result.problems.append(EntryProblem(where, "entry resource has no resourceType"))
            continue
        if method == "PATCH":
            result.problems.append(EntryProblem(where, f"PATCH {str(request.get('url', ''))[:80]!r}: a patch is "
                                                       "not applied offline; read the patched resource instead"))
            continue
        search = entry.get("search") if isinstance(entry.get("search"), dict) else {}
        if kind == "searchset" and search.get("mode") == "outcome":
            result.notes.append(EntryProblem(where, _outcome_summary(inner)))
            continue
        if method == "PUT" and not inner.get("id"):  # `PUT Type/id` gives the resource that id
            named = _DELETED_URL.match(str(request.get("url", "")).split("?", 1)[0].strip())
            if named and named.group(1) == inner["resourceType"]:
                inner = {**inner, "id": named.group(2)}
        full_url = entry.get("fullUrl")
        if inner.get("resourceType") == "Bundle" or not isinstance(full_url, str) or not full_url.strip():
            flatten(inner, where, result, modifier_free)
        else:
            result.resources.append(SourcedResource(inner, where, full_url.strip(), modifier_free=modifier_free))


def _outcome_summary(outcome: dict[str, Any]) -> str:
    """What a searchset's outcome entry says, by severity and code only (its text may carry search values)."""
    issues = [i for i in outcome.get("issue") or [] if isinstance(i, dict)]
    said = ", ".join(f"{i.get('severity', '?')} {i.get('code', '?')}" for i in issues[:5]) or "no issue"
    return f"{outcome.get('resourceType')} of the search (search.mode outcome: {said}): not data, nothing to code"


def _check_message(entries: list[Any], origin: str, result: ReadResult) -> None:
    """A message Bundle's first entry is its MessageHeader (bdl-12); its `focus` is the data of the message and
    must be in the Bundle. Every entry is still read (nothing is lost); what is wrong is a problem."""
    first = entries[0] if entries and isinstance(entries[0], dict) else {}
    header = first.get("resource") if isinstance(first.get("resource"), dict) else {}
    if header.get("resourceType") != "MessageHeader":
        result.problems.append(EntryProblem(origin, "a message Bundle must start with its MessageHeader (FHIR "
                                                    "bdl-12): its entries are read, but what the message is about "
                                                    "is not known"))
        return
    urls: set[str] = set()
    for entry in entries[1:]:
        res = entry.get("resource") if isinstance(entry, dict) and isinstance(entry.get("resource"), dict) else {}
        if isinstance(entry, dict) and isinstance(entry.get("fullUrl"), str):
            urls.add(entry["fullUrl"].strip())
        if isinstance(res.get("resourceType"), str) and isinstance(res.get("id"), str):
            urls.add(f"{res['resourceType']}/{res['id']}")
    for j, focus in enumerate(header.get("focus") or []):
        literal = focus.get("reference") if isinstance(focus, dict) else None
        written = literal.strip().split("/_history/", 1)[0] if isinstance(literal, str) else ""
        tail = "/".join(written.split("/")[-2:])
        if written not in urls and tail not in urls:
            result.problems.append(EntryProblem(f"{origin}#entry[0]", f"MessageHeader.focus[{j}] "
                                                f"{written or '(no reference)'} is not in the message: the data "
                                                "the message is about is missing"))


_DELETED_URL = re.compile(r"^(?:.*/)?([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/([^/]+))?$")
_ETAG = re.compile(r'^(?:W/)?"?([^"]+)"?$')


def _tombstone(request: dict[str, Any], response: dict[str, Any],
               body: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The deleted resource of a DELETE entry: type and id from `request.url` (else from the body it still
    carries), version from the URL, `response.etag`/`lastModified`, else the body's `meta`. A body is kept as
    the tombstone's content (what kind of Procedure was deleted), never as a live resource."""
    url = str(request.get("url", ""))
    match = _DELETED_URL.match(url.split("?", 1)[0].strip()) if "?" not in url else None
    if match:
        kind, rid, version = match.group(1), match.group(2), match.group(3)
    elif body is not None and isinstance(body.get("id"), str) and body["id"]:
        kind, rid, version = body["resourceType"], body["id"], None
    else:
        return None
    same = body is not None and body.get("resourceType") == kind and body.get("id") in (rid, None)
    old = body.get("meta") if same and body is not None and isinstance(body.get("meta"), dict) else {}
    meta: dict[str, Any] = {k: v for k, v in old.items() if k in ("versionId", "lastUpdated")}
    etag = _ETAG.match(str(response.get("etag", "")).strip())
    version = version or (etag.group(1) if etag else None)
    if version:
        meta["versionId"] = version
    if isinstance(response.get("lastModified"), str):
        meta["lastUpdated"] = response["lastModified"]
    return {**(body if same and body is not None else {}), "resourceType": kind, "id": rid, "meta": meta}


def _read_json(path: Path, text: str, result: ReadResult) -> None:
    try:
        data = jsonin.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(str(path), f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        raise InputError(str(path), "not a FHIR resource (no resourceType)")
    flatten(data, str(path), result, "modifierExtension" not in text)


CHUNK_BYTES = 4 << 20
"""NDJSON is read this many bytes at a time (cut after the last newline), so a large export never sits in memory."""
_BOM = b"\xef\xbb\xbf"


def _ndjson_lines(path: Path, chunk_bytes: int) -> Iterator[str]:
    """The lines of an NDJSON file as `str.splitlines` gives them for the whole decoded text, read piece by piece.

    Each piece ends just after a `\\n` (an ASCII byte, never inside a UTF-8 sequence, and the last character of
    any line break that spans two characters), so splitting each piece gives the lines of the whole file.
    Raises InputError for bytes that are not UTF-8, with their offset as the whole-file decoding reports it."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise InputError(str(path), "no such file or folder") from None
    except OSError as exc:
        raise InputError(str(path), f"cannot be read ({exc.strerror})") from None
    with handle:
        offset, carry, first = 0, b"", True  # offset: bytes decoded so far, after a leading BOM
        while True:
            try:
                block = handle.read(chunk_bytes)
            except OSError as exc:
                raise InputError(str(path), f"cannot be read ({exc.strerror})") from None
            data = carry + block
            cut = len(data) if not block else data.rfind(b"\n") + 1
            piece, carry = data[:cut], data[cut:]
            if first and piece:
                piece = piece[len(_BOM):] if piece.startswith(_BOM) else piece
                first = False
            if piece:
                try:
                    text = piece.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise InputError(str(path), f"not UTF-8 text (byte {offset + exc.start})") from None
                offset += len(piece)
                yield from text.splitlines()
            if not block:
                return


def _read_ndjson(path: Path, result: ReadResult, chunk_bytes: int = CHUNK_BYTES) -> None:
    bad: list[str] = []
    blank = True
    for number, line in enumerate(_ndjson_lines(path, chunk_bytes), start=1):
        if not line.strip():
            continue
        blank = False
        try:
            data = jsonin.loads(line)  # orjson where it gives what json.loads gives
        except json.JSONDecodeError as exc:
            bad.append(f"line {number} is not valid JSON ({exc.msg})")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
            bad.append(f"line {number} is not a FHIR resource (no resourceType)")
            continue
        flatten(data, f"{path}:{number}", result, "modifierExtension" not in line)
    if blank:
        raise InputError(str(path), "file is empty")
    if bad:
        # the good lines were kept; the file is still reported as not fully readable
        raise InputError(str(path), "; ".join(bad))


def read_file(path: Path, result: ReadResult, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Read one file into `result`; raises InputError when it cannot be read (fully).

    A file that is not UTF-8 text gives nothing at all, even from the lines before the bad byte."""
    if path.suffix.lower() in (".ndjson", ".jsonl"):
        mark = result.mark()
        try:
            _read_ndjson(path, result, chunk_bytes)
        except InputError as exc:
            if exc.reason.startswith(("not UTF-8 text", "cannot be read", "file is empty")):
                result.discard(mark)
            raise
        return
    if _is_large(path):  # one huge Bundle: entry by entry (adapter/sources/large_bundle.py), else read whole
        from adapter.sources.large_bundle import read_bundle

        if read_bundle(path, result, flatten):
            return
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(str(path), "no such file or folder") from None
    except OSError as exc:
        raise InputError(str(path), f"cannot be read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(str(path), f"not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise InputError(str(path), "file is empty")
    _read_json(path, text, result)


def _is_large(path: Path) -> bool:
    from adapter.sources.large_bundle import STREAM_BYTES

    try:
        return path.stat().st_size > STREAM_BYTES
    except OSError:
        return False


def read_paths(paths: Iterable[str | os.PathLike[str]], result: ReadResult | None = None) -> ReadResult:
    """Read every file into `result` (a new one by default); unreadable ones are collected in `unreadable`,
    never raised."""
    result = ReadResult() if result is None else result
    for path in iter_files(paths):
        try:
            read_file(path, result)
        except InputError as exc:
            result.unreadable.append(exc)
    return result
