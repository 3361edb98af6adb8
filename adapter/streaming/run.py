"""One streaming run: read and spill, group Procedures into units, code batches of units, then write the
output and the diagnostics in the order the in-memory path gives them.

Orders to reproduce (see `pipeline`, `coding.engine`, `building.resources`, `report.diagnostics`):

- Bundle entries and table rows: sessions sorted by `SessionKey` (date, patient, performer, encounter), each
  session's ChargeItems then its Claim.
- Reviews: first those of Procedures without a session, in coding order (the order Procedure keys were first
  read, then Procedures without an id in read order); then those of held sessions, by session; then the MUE
  holds, by (date, patient, performer) and, within one of those, as the batch gave them; then the Claims'
  gaps, by session. Warnings by session. Duplicates, conflicts and problems in read order. Merged, no-charge and
  skipped Procedures in coding order.

Every batch keeps the relative order of what it produces; each item is stored with the key that places it
among the other batches' items, and the final SELECTs sort by it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from adapter import jsonout
from adapter.building.resources import OutputWarning, transaction_entry
from adapter.coding.engine import Review
from adapter.config import CodeTables
from adapter.errors import AdapterError, ExitCode, InputError
from adapter.extraction.index import Entry, identifier_triples
from adapter.extraction.procedures import SessionKey
from adapter.extraction.timezones import fna_bases, utc_feed_warning
from adapter.pipeline import ProcedureItem, RunReport, batch_gc, code_index
from adapter.report import (
    CHARGE_HEADERS,
    charge_rows,
    conflict_line,
    duplicate_line,
    info_line,
    merged_line,
    no_charge_line,
    output_counts,
    problem_line,
    review_line,
    skipped_line,
    summary_text,
    table_lines,
    unreadable_line,
    warning_line,
)
from adapter.sources.files import EntryProblem, iter_files, read_paths
from adapter.streaming.index import StoredIndex
from adapter.streaming.masking import StoredFreeText
from adapter.streaming.store import HAS_ID, SpillingRead, Store, decode, encode

log = logging.getLogger("adapter.streaming")

BATCH_PROCEDURES = 500
"""Procedures coded together (whole units; a unit larger than this is one batch)."""
STREAM_THRESHOLD_BYTES = 64 << 20
"""`dry-run` streams when its input files add up to more than this (`--stream`/`--no-stream` decide otherwise)."""

# diagnostics categories, in the order `report.diagnostics` lists them
_REVIEW_UNCODED, _REVIEW_HELD, _REVIEW_MUE, _REVIEW_CLAIM, _WARNING, _MERGED, _NO_CHARGE, _SKIPPED = range(8)
_NO_KEY = (b"", b"", b"", b"")


def input_bytes(paths: Iterable[str | os.PathLike[str]]) -> int:
    """The size of the input files (what `dry-run` compares with the streaming threshold)."""
    total = 0
    for path in iter_files(paths):
        try:
            total += path.stat().st_size
        except OSError:
            continue
    return total


@dataclass
class Counts:
    """What the summary line counts, added up over the batches."""

    procedures: int = 0
    sessions: int = 0
    lines: int = 0
    units: int = 0
    claims: int = 0
    reviewed: int = 0
    no_charge: int = 0
    skipped: int = 0
    batches: int = 0
    time_bases: set[str] = field(default_factory=set)
    """How the FNAs' dates of service were read (the UTC-feed warning of rule date-of-service)."""


@dataclass
class StreamResult:
    """What a streaming run leaves after its output is written: its diagnostics, in order, and its summary."""

    store: Store
    unreadable: list[InputError]
    counts: Counts
    problems: int
    reviews: int
    notes: list[EntryProblem] = field(default_factory=list)
    """Info-level lines of the reading (a searchset's outcome entries), in read order."""
    _masker: StoredFreeText | None = field(default=None, repr=False)

    @property
    def exit_code(self) -> int:
        if self.unreadable:
            return ExitCode.UNAVAILABLE
        if self.reviews or self.problems:
            return ExitCode.REVIEW
        return ExitCode.OK

    def summary(self) -> str:
        c = self.counts
        return summary_text(c.procedures, c.sessions, c.lines, c.units, c.claims, c.reviewed, c.no_charge, c.skipped,
                            len(self.unreadable))

    def mask(self, text: str) -> str:
        if self._masker is None:
            self._masker = StoredFreeText(self.store, self._details)
        return self._masker.mask(text)

    def _details(self) -> Iterator[str]:
        """Every text `diagnostics` masks: the details of reviews and warnings."""
        for kind, payload in self.store.db.execute("SELECT kind, payload FROM diag WHERE kind IN ('review', "
                                                   "'warning')"):
            yield json.loads(payload)[3 if kind == "review" else 2]

    def diagnostics(self) -> Iterator[str]:
        """The lines `report.diagnostics` gives for the same input, in the same order."""
        db = self.store.db
        for err in self.unreadable:
            yield unreadable_line(err)
        for problem in self.store.problems():
            yield problem_line(problem)
        if self.store.unnamed:  # (a scan of every copy: only when there are some)
            for origin, kind in db.execute("SELECT origin, type FROM copy WHERE flags & ? = 0 "
                                           "AND type != 'Procedure' AND full_url IS NULL ORDER BY seq", (HAS_ID,)):
                yield problem_line_of(origin, kind)
        for note in self.notes:
            yield info_line(note)
        for kind, payload in db.execute(
                "SELECT kind, payload FROM diag WHERE cat < ? ORDER BY cat, a, d, p, f, e, n", (_MERGED,)):
            yield self._line(kind, payload)
        for key, origins in db.execute("SELECT key, origins FROM conflict WHERE substr(key, 1, 10) != 'Procedure/' "
                                       "ORDER BY seq"):
            yield conflict_line(key, json.loads(origins))
        for key, kept, old in db.execute("SELECT key, kept, old FROM duplicate ORDER BY seq, rowid"):
            yield duplicate_line(key, kept, old)
        for kind, payload in db.execute(
                "SELECT kind, payload FROM diag WHERE cat >= ? ORDER BY cat, a, d, p, f, e, n", (_MERGED,)):
            yield self._line(kind, payload)
        utc = utc_feed_warning(self.counts.time_bases)
        if utc:
            yield utc

    def _line(self, kind: str, payload: str) -> str:
        if kind == "review":
            return review_line(Review(*json.loads(payload)), self.mask)
        if kind == "warning":
            code, subject, detail = json.loads(payload)
            return warning_line(OutputWarning(code, subject, detail), self.mask)
        return payload


def problem_line_of(origin: str, kind: str) -> str:
    """The problem `RunReport.problems` reports for a resource without an id (other than a Procedure)."""
    return problem_line(EntryProblem(origin, f"{kind} has no id"))


# ------------------------------------------------------------------------------------------ the run
class SpillError(AdapterError):
    """The streaming path's temporary index cannot be used (no room on its disk, a folder that cannot be written)."""


@contextmanager
def _index_errors(folder: object, os_errors: bool = True) -> Iterator[None]:
    """SQLite and file-system failures of the temporary index as one line naming its folder (exit 2). While the
    output is written, only SQLite's count: an OSError there is the output's (a closed pipe, a full disk)."""
    caught: tuple[type[BaseException], ...] = (sqlite3.Error, OSError) if os_errors else (sqlite3.Error,)
    try:
        yield
    except caught as exc:
        raise SpillError(f"the streaming index in {folder} cannot be used ({exc}); it needs free disk space of "
                         "about six times the input: choose another folder with --workdir") from None


class StreamRun:
    """Read `paths`, code them batch by batch, spill what comes out. Use as a context manager: the temporary
    folder (the on-disk index, the spilled output) is removed on exit."""

    def __init__(self, tables: CodeTables, now: datetime | None = None, *, compact: bool = False,
                 workdir: str | os.PathLike[str] | None = None, batch_procedures: int = BATCH_PROCEDURES) -> None:
        self.tables = tables
        self.now = now or datetime.now(UTC)  # one time of writing for every batch, as one in-memory run has
        self.compact = compact
        self.batch_procedures = batch_procedures
        with _index_errors(workdir or tempfile.gettempdir()):
            self._tmp = tempfile.TemporaryDirectory(prefix="charge-adapter-", dir=workdir)
            self.store = Store(Path(self._tmp.name))
        self.counts = Counts()
        self.widths = [len(h) for h in CHARGE_HEADERS]
        self._n = 0
        self._reviews = 0
        self.unreadable: list[InputError] = []
        self.notes: list[EntryProblem] = []

    def __enter__(self) -> StreamRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()
        self._tmp.cleanup()

    @property
    def folder(self) -> Path:
        return Path(self._tmp.name)

    # ------------------------------------------------------------------------------------ pass 1
    def read(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        """Spill every resource of `paths` (the same readers, the same errors as `process_paths`)."""
        with _index_errors(self.folder):
            read = SpillingRead(self.store)
            read_paths(paths, read)
            self.unreadable += read.unreadable
            self.notes += read.notes
            self.store.finish_reading()

    # ------------------------------------------------------------------------------------ pass 2
    def code(self, on_batch: Callable[[RunReport, list[str]], None] | None = None,
             progress: Callable[[int], None] | None = None) -> StreamResult:
        """Code every unit, batch by batch; `on_batch(report, patients)` sees each batch's report (to write it
        to a server), `progress(n)` the number of Procedures each batch coded."""
        with _index_errors(self.folder):
            return self._code(on_batch, progress)

    def _code(self, on_batch: Callable[[RunReport, list[str]], None] | None,
              progress: Callable[[int], None] | None) -> StreamResult:
        self.store.script("""
            CREATE TABLE out(d BLOB, p BLOB, f BLOB, e BLOB, n INTEGER, body BLOB NOT NULL);
            CREATE TABLE row(d BLOB, p BLOB, f BLOB, e BLOB, n INTEGER, cells TEXT NOT NULL);
            CREATE TABLE diag(cat INTEGER NOT NULL, a INTEGER NOT NULL, d BLOB, p BLOB, f BLOB, e BLOB,
                              n INTEGER NOT NULL, kind TEXT NOT NULL, payload TEXT NOT NULL);
        """)
        batches = group_units(self.store, self.batch_procedures, self.tables.local_bases)
        definitions = [(c.key, c.resource) for c in self.store.listed("ChargeItemDefinition/") if c.key]
        first = True
        with batch_gc():
            for lo, hi in batches:
                report, patients = self._code_batch(lo, hi, definitions)
                if self.counts.batches % 50 == 0:
                    log.info("streaming: %d of %d batches coded (%d Procedures)", self.counts.batches, len(batches),
                             self.counts.procedures)
                if on_batch is not None:
                    on_batch(report, patients)
                if progress is not None:
                    progress(len(report.facts))
                del report
                gc.collect()  # a batch's facts and sessions hold reference cycles: free them before the next
                if first:  # what the first batch loaded for good (model classes, tables): never scanned again
                    gc.freeze()
                    first = False
        self.store.script("""
            CREATE INDEX out_order ON out(d, p, f, e, n);
            CREATE INDEX row_order ON row(d, p, f, e, n);
            CREATE INDEX diag_order ON diag(cat, a, d, p, f, e, n);
        """)
        problems = self.store.db.execute("SELECT count(*) FROM problem").fetchone()[0] + self.store.unnamed
        return StreamResult(self.store, self.unreadable, self.counts, problems, self._reviews, self.notes)

    def _code_batch(self, lo: int, hi: int, definitions: list[tuple[str, dict[str, Any]]]
                    ) -> tuple[RunReport, list[str]]:
        db = self.store.db
        rows = db.execute("SELECT key, seq, ord, owner FROM proc WHERE unit >= ? AND unit < ? ORDER BY ord",
                          (lo, hi)).fetchall()
        owners = sorted({owner for _, _, _, owner in rows if owner})
        owned: dict[str, list[str]] = {}
        for start in range(0, len(owners), 500):
            chunk = owners[start:start + 500]
            for kind, key in db.execute(f"SELECT type, key FROM owned WHERE owner IN ({', '.join('?' * len(chunk))}) "
                                        "ORDER BY rowid", chunk):
                owned.setdefault(kind, []).append(key)
        index = StoredIndex(self.store, owned, definitions=definitions, local_bases=self.tables.local_bases)
        items: list[ProcedureItem] = []
        order: list[int] = []
        for key, seq, ord_, _ in rows:
            if key is not None:
                entry = index.entries.get(key)
                assert entry is not None
                items.append((entry.resource, entry.origin, entry))
            else:
                copy = self.store.copy_at(seq)
                items.append((copy.resource, copy.origin, None))
            order.append(ord_)
        report = code_index(index, items, self.tables, self.now)
        self._spill(report, order)
        self.counts.batches += 1
        return report, [o for o in owners if o.startswith("Patient/")]

    def _spill(self, report: RunReport, order: list[int]) -> None:
        """Store what one batch produced, each item with the key that orders it among all batches'."""
        c = self.counts
        c.procedures += len(report.facts)
        sessions, lines, units, claims = output_counts(report)
        c.sessions += sessions
        c.lines += lines
        c.units += units
        c.claims += claims
        c.reviewed += len({r.procedure for r in report.reviews})
        c.no_charge += len(report.coding.no_charge)
        c.skipped += len(report.coding.skipped)
        c.time_bases.update(fna_bases(report.facts))
        self._reviews += len(report.reviews)

        fact_order = {f.ref: o for f, o in zip(report.facts, order, strict=True)}
        session_of = {p.ref: s.key for s in report.coding.sessions for p in s.procedures}
        out_rows: list[tuple[Any, ...]] = []
        table_rows: list[tuple[Any, ...]] = []
        for built in report.built.sessions:
            key = _session_key(built.session.key)
            for i, resource in enumerate(built.resources()):
                out_rows.append((*key, i, encode(self._entry_text(transaction_entry(resource)))))
            for i, row in enumerate(charge_rows(built)):
                cells = [str(cell) for cell in row]
                self.widths = [max(w, len(cell)) for w, cell in zip(self.widths, cells, strict=True)]
                table_rows.append((*key, i, json.dumps(cells, ensure_ascii=False)))
        self.store.db.executemany("INSERT INTO out VALUES (?, ?, ?, ?, ?, ?)", out_rows)
        self.store.db.executemany("INSERT INTO row VALUES (?, ?, ?, ?, ?, ?)", table_rows)

        diags: list[tuple[Any, ...]] = []

        def add(category: int, a: int, key: tuple[bytes, ...], kind: str, payload: str) -> None:
            diags.append((category, a, *key, self._n, kind, payload))
            self._n += 1

        coding = report.coding
        for i, review in enumerate(coding.reviews):
            payload = json.dumps([review.procedure, review.origin, review.reason, review.detail], ensure_ascii=False)
            if i < coding.session_reviews_from:
                add(_REVIEW_UNCODED, fact_order[review.procedure], _NO_KEY, "review", payload)
            elif i < coding.mue_reviews_from:
                add(_REVIEW_HELD, 0, _session_key(session_of[review.procedure]), "review", payload)
            else:
                session = session_of[review.procedure]
                add(_REVIEW_MUE, 0, (*_session_key(session)[:3], b""), "review", payload)
        for review in report.built.reviews:
            payload = json.dumps([review.procedure, review.origin, review.reason, review.detail], ensure_ascii=False)
            add(_REVIEW_CLAIM, 0, _session_key(session_of[review.procedure]), "review", payload)
        for warning in report.built.warnings:
            assert warning.session is not None
            add(_WARNING, 0, _session_key(warning.session), "warning",
                json.dumps([warning.code, warning.subject, warning.detail], ensure_ascii=False))
        for category, found, line in ((_MERGED, coding.merged, merged_line), (_NO_CHARGE, coding.no_charge,
                                      no_charge_line), (_SKIPPED, coding.skipped, skipped_line)):
            for proc in found:
                add(category, fact_order[proc.ref], _NO_KEY, "line", line(proc))
        self.store.db.executemany("INSERT INTO diag VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", diags)

    def _entry_text(self, entry: dict[str, Any]) -> str:
        """One Bundle entry as `jsonout.dumps` of the whole Bundle writes it (indented: two levels in)."""
        if self.compact:
            return jsonout.dumps(entry, compact=True)
        return "    " + jsonout.dumps(entry).replace("\n", "\n    ")

    # ------------------------------------------------------------------------------------ output
    def write_bundle(self, out: TextIO) -> None:
        """The transaction Bundle `dry-run` prints, written entry by entry (and its final newline)."""
        with _index_errors(self.folder, os_errors=False):
            self._write_bundle(out)

    def _write_bundle(self, out: TextIO) -> None:
        rows = self.store.db.execute("SELECT body FROM out ORDER BY d, p, f, e, n")
        first = rows.fetchone()
        if first is None:
            out.write(jsonout.dumps({"resourceType": "Bundle", "type": "transaction"}, self.compact) + "\n")
            return
        if self.compact:
            out.write('{"resourceType":"Bundle","type":"transaction","entry":[')
            sep = ","
        else:
            out.write('{\n  "resourceType": "Bundle",\n  "type": "transaction",\n  "entry": [\n')
            sep = ",\n"
        out.write(decode(first[0]))
        for (body,) in rows:
            out.write(sep)
            out.write(decode(body))
        out.write("]}\n" if self.compact else "\n  ]\n}\n")

    def write_table(self, out: TextIO) -> None:
        """The charges table of `dry-run --format table` (and its final newline)."""
        with _index_errors(self.folder, os_errors=False):
            self._write_table(out)

    def _write_table(self, out: TextIO) -> None:
        rows = self.store.db.execute("SELECT cells FROM row ORDER BY d, p, f, e, n")
        first = rows.fetchone()
        if first is None:
            out.write("No charges.\n")
            return

        def cells() -> Iterator[list[str]]:
            yield json.loads(first[0])
            for (text,) in rows:
                yield json.loads(text)

        for line in table_lines(CHARGE_HEADERS, cells(), self.widths):
            out.write(line + "\n")


def _session_key(key: SessionKey) -> tuple[bytes, bytes, bytes, bytes]:
    return encode(key.date), encode(key.patient), encode(key.performer), encode(key.encounter)


# ---------------------------------------------------------------------------------- units of coding
def group_units(store: Store, batch_procedures: int = BATCH_PROCEDURES,
                local_bases: frozenset[str] = frozenset()) -> list[tuple[int, int]]:
    """Find each Procedure's unit and return batches of units as ranges of unit numbers.

    A unit is the patient its subject resolves to (any reference form, resolved by `ResourceIndex` over the
    store), else the Procedure alone; units whose Procedures are linked by `partOf` or share a
    `Procedure.identifier` (the engine relates those across patients) are merged. Also records, for the
    batches, the active Coverages by beneficiary and the active Accounts by subject."""
    store.script("""
        CREATE TABLE proc(seq INTEGER NOT NULL, key TEXT, ord INTEGER NOT NULL, owner TEXT, name TEXT NOT NULL,
                          unit INTEGER);
        CREATE TABLE part(name TEXT NOT NULL, target TEXT NOT NULL);
        CREATE TABLE pident(system BLOB NOT NULL, value BLOB NOT NULL, name TEXT NOT NULL);
        CREATE TABLE owned(owner TEXT NOT NULL, type TEXT NOT NULL, key TEXT NOT NULL);
        CREATE TABLE unit(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
    """)
    db = store.db
    resolver = StoredIndex(store, keys_only=True, local_bases=local_bases)
    procs: list[tuple[Any, ...]] = []
    parts: list[tuple[str, str]] = []
    idents: list[tuple[bytes, bytes, str]] = []
    total = store.next_seq

    def flush() -> None:
        db.executemany("INSERT INTO proc VALUES (?, ?, ?, ?, ?, NULL)", procs)
        db.executemany("INSERT INTO part VALUES (?, ?)", parts)
        db.executemany("INSERT INTO pident VALUES (?, ?, ?)", idents)
        procs.clear()
        parts.clear()
        idents.clear()
        resolver.forget()

    def note(seq: int, key: str | None, ord_: int, resource: dict[str, Any], entry: Entry | None, deleted: bool,
             alone: str) -> None:
        owner: str | None = None
        if not deleted:
            subject = resource.get("subject")
            owner = resolver.resolve(subject, entry).key if subject is not None else None
            name = owner if owner is not None else alone
            parts.extend((name, t) for t in (resolver.resolve(p, entry).key for p in resource.get("partOf") or [])
                         if t and t.startswith("Procedure/"))
            idents.extend((encode(s), encode(v), name) for s, v in {(s, v) for _, s, v in identifier_triples(resource)})
        procs.append((seq, key, ord_, owner, owner if owner is not None else alone))
        if len(procs) >= 10_000:
            flush()

    for copy, first in store.keyed_procedures():
        note(copy.seq, copy.key, first, copy.resource, copy.entry(), copy.deleted, "\0" + str(copy.key))
    for copy in store.procedures_without_id():
        note(copy.seq, None, total + copy.seq, copy.resource, None, False, f"\0#{copy.seq}")
    flush()

    owned: list[tuple[str, str, str]] = []
    for copy in store.listed("Coverage/"):
        if copy.resource.get("status") == "active":
            beneficiary = resolver.resolve(copy.resource.get("beneficiary"), copy.entry()).key
            if beneficiary and copy.key:
                owned.append((beneficiary, "Coverage", copy.key))
        if len(owned) >= 10_000:
            db.executemany("INSERT INTO owned VALUES (?, ?, ?)", owned)
            owned.clear()
            resolver.forget()
    for copy in store.listed("Account/"):
        if copy.resource.get("status") != "active" or not copy.key:
            continue
        entry = copy.entry()
        for subject in copy.resource.get("subject") or []:
            target = resolver.resolve(subject, entry).key
            if target:
                owned.append((target, "Account", copy.key))
        if len(owned) >= 10_000:
            db.executemany("INSERT INTO owned VALUES (?, ?, ?)", owned)
            owned.clear()
            resolver.forget()
    db.executemany("INSERT INTO owned VALUES (?, ?, ?)", owned)
    store.script("""
        CREATE INDEX proc_name ON proc(name);
        CREATE INDEX proc_key ON proc(key) WHERE key IS NOT NULL;
        CREATE INDEX owned_owner ON owned(owner);
        CREATE INDEX pident_value ON pident(system, value);
    """)
    _merge_units(store)
    store.script("""
        INSERT INTO unit(name) SELECT name FROM proc GROUP BY name ORDER BY min(ord);
        UPDATE proc SET unit = (SELECT id FROM unit WHERE unit.name = proc.name);
        CREATE INDEX proc_unit ON proc(unit, ord);
    """)
    batches: list[tuple[int, int]] = []
    start: int | None = None
    size = 0
    last = 0
    for unit, count in db.execute("SELECT unit, count(*) FROM proc GROUP BY unit ORDER BY unit"):
        if start is None:
            start = unit
        size += count
        last = unit
        if size >= batch_procedures:
            batches.append((start, unit + 1))
            start, size = None, 0
    if start is not None:
        batches.append((start, last + 1))
    return batches


def _merge_units(store: Store) -> None:
    """Union of units joined by `partOf` or a shared identifier; each merged unit takes its smallest name."""
    db = store.db
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        root = name
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(name, name) != root:
            parent[name], name = root, parent[name]
        return root

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
            parent.setdefault(min(ra, rb), min(ra, rb))

    for a, b in db.execute("SELECT DISTINCT part.name, proc.name FROM part JOIN proc ON proc.key = part.target "
                           "WHERE part.name != proc.name").fetchall():
        union(a, b)
    shared = db.execute("SELECT system, value FROM pident GROUP BY system, value "
                        "HAVING count(DISTINCT name) > 1").fetchall()
    for system, value in shared:
        names = [n for (n,) in db.execute("SELECT DISTINCT name FROM pident WHERE system = ? AND value = ?",
                                          (system, value))]
        for other in names[1:]:
            union(names[0], other)
    moves = [(find(name), name) for name in parent if find(name) != name]
    db.executemany("UPDATE proc SET name = ? WHERE name = ?", moves)


def stream_paths(paths: Iterable[str | os.PathLike[str]], tables: CodeTables, now: datetime | None = None,
                 **options: Any) -> StreamRun:
    """Read and code `paths` (the caller writes the output and closes the run)."""
    run = StreamRun(tables, now, **options)
    try:
        run.read(paths)
    except BaseException:
        run.close()
        raise
    return run

