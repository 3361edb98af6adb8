"""The on-disk index of one streaming run: every copy of every resource read, and what the in-memory index
would have decided about them (which copy is current, duplicates, conflicts, who owns what).

SQLite in a temporary folder, written without journal or fsync (it lives only as long as the run), rows
inserted in batches inside one transaction. Resources are stored as compact JSON text and parsed again only
when a batch needs them. The decisions about copies of one resource are taken by replaying those copies into
a real `ResourceIndex`, so they cannot drift from the in-memory path.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.errors import InputError
from adapter.extraction.index import Entry, ResourceIndex, identifier_triples
from adapter.redact import FREE_TEXT_KEYS, FreeText
from adapter.sources.files import EntryProblem, ReadResult, SourcedResource

DELETED, MODIFIER_FREE, HAS_ID = 1, 2, 4
"""Bits of `copy.flags`."""
FLUSH_ROWS = 20_000
"""Rows buffered in memory before they are inserted (one executemany each)."""

SCHEMA = """
CREATE TABLE copy(seq INTEGER PRIMARY KEY, key TEXT, type TEXT NOT NULL, origin TEXT NOT NULL, full_url TEXT,
                  url TEXT, flags INTEGER NOT NULL, body BLOB NOT NULL);
CREATE TABLE problem(seq INTEGER PRIMARY KEY, origin TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE ident(system BLOB NOT NULL, value BLOB NOT NULL, type TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE text(s BLOB PRIMARY KEY, n INTEGER NOT NULL, length INTEGER NOT NULL) WITHOUT ROWID;
"""
"""`copy.key`: the entry key (`Type/id`, or the fullUrl of a resource without an id; NULL when it has neither);
`url`: the fullUrl without `_history`, what references resolve against; `text`: each free-text string and in
how many copies it occurs (those of superseded copies are taken away once the current ones are known)."""


_FREE_TEXT_MARKERS = tuple(f'"{key}":'.encode() for key in FREE_TEXT_KEYS)
"""A resource whose JSON holds none of these keys has no free text to collect."""


def encode(text: str) -> bytes:
    """UTF-8 that keeps lone surrogates (JSON may carry them); byte order is code point order."""
    return text.encode("utf-8", "surrogatepass")


def decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


def dumps(resource: dict[str, Any]) -> bytes:
    return encode(json.dumps(resource, ensure_ascii=False, separators=(",", ":")))


def loads(body: bytes) -> Any:
    return json.loads(decode(body))


def _without_version(url: str) -> str:
    return url.split("/_history/", 1)[0]


@dataclass(frozen=True)
class Copy:
    """One stored copy of a resource."""

    seq: int
    key: str | None
    type: str
    origin: str
    full_url: str | None
    flags: int
    resource: dict[str, Any]

    @property
    def deleted(self) -> bool:
        return bool(self.flags & DELETED)

    def sourced(self) -> SourcedResource:
        return SourcedResource(self.resource, self.origin, self.full_url, self.deleted,
                               bool(self.flags & MODIFIER_FREE))

    def entry(self) -> Entry | None:
        """The index entry this copy is when it is the current one (None for a resource without any key)."""
        if self.key is None:
            return None
        return Entry(self.key, self.resource, self.origin, self.full_url, deleted=self.deleted,
                     modifier_free=bool(self.flags & MODIFIER_FREE))


@dataclass
class Versions:
    """What `ResourceIndex` decides about the copies of one key: the current entry, the older ones (for
    version-specific references), and the origins of copies that differ without a version to tell them apart."""

    entry: Entry
    superseded: list[Entry]
    conflicts: list[str] | None


class Store:
    """Copies in, decisions and lookups out. Not thread-safe; one per run."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "index.sqlite"
        self.db = sqlite3.connect(self.path, isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "locking_mode=EXCLUSIVE", "temp_store=FILE",
                       "cache_size=-65536"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(SCHEMA)
        self.db.execute("BEGIN")
        self.next_seq = 0
        self.next_problem = 0
        self.unnamed = 0
        """Copies without an id that are not Procedures: each is a problem of its own ("X has no id")."""
        self._copies: list[tuple[Any, ...]] = []
        self._idents: list[tuple[Any, ...]] = []
        self._problems: list[tuple[Any, ...]] = []
        self._texts: Counter[str] = Counter()

    def close(self) -> None:
        self.db.close()

    def script(self, sql: str) -> None:
        """Run several statements (executescript commits first) and go on in a new transaction."""
        if self.db.in_transaction:
            self.db.execute("COMMIT")
        self.db.executescript(sql)
        self.db.execute("BEGIN")

    # ------------------------------------------------------------------------------------------- reading
    def add(self, item: SourcedResource) -> None:
        resource = item.resource
        rid = resource.get("id")
        kind = str(resource.get("resourceType"))
        has_id = isinstance(rid, str) and bool(rid)
        key = f"{kind}/{rid}" if has_id else item.full_url or None
        url = _without_version(item.full_url) if item.full_url and key is not None else None
        flags = (DELETED if item.deleted else 0) | (MODIFIER_FREE if item.modifier_free else 0) | \
            (HAS_ID if has_id else 0)
        seq = self.next_seq
        self.next_seq += 1
        if not has_id and kind != "Procedure" and not item.full_url:
            self.unnamed += 1
        body = dumps(resource)
        self._copies.append((seq, key, kind, item.origin, item.full_url, url, flags, body))
        if key is not None and not item.deleted:  # a DELETE's body is no current resource's identifier
            self._idents += [(encode(system), encode(value), kind_, seq)
                             for kind_, system, value in identifier_triples(resource)]
        if not item.deleted and any(marker in body for marker in _FREE_TEXT_MARKERS):  # most carry no free text
            self._texts.update(FreeText.strings_of(resource))
        if len(self._copies) >= FLUSH_ROWS:
            self.flush()

    def add_problem(self, problem: EntryProblem) -> None:
        self._problems.append((self.next_problem, problem.origin, problem.reason))
        self.next_problem += 1
        if len(self._problems) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._copies:
            self.db.executemany("INSERT INTO copy VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self._copies)
            self._copies.clear()
        if self._idents:
            self.db.executemany("INSERT INTO ident VALUES (?, ?, ?, ?)", self._idents)
            self._idents.clear()
        if self._problems:
            self.db.executemany("INSERT INTO problem VALUES (?, ?, ?)", self._problems)
            self._problems.clear()
        self._count_texts(self._texts)
        self._texts = Counter()

    def _count_texts(self, counts: Counter[str]) -> None:
        if counts:
            self.db.executemany("INSERT INTO text(s, n, length) VALUES (?, ?, ?) "
                                "ON CONFLICT(s) DO UPDATE SET n = n + excluded.n",
                                [(encode(s), n, len(s)) for s, n in counts.items()])

    def rollback(self, seq: int, problem: int) -> None:
        """Take back every copy and problem from `seq`/`problem` on (a file that turned out unreadable)."""
        self.flush()
        gone: Counter[str] = Counter()
        for (body,) in self.db.execute("SELECT body FROM copy WHERE seq >= ?", (seq,)):
            gone.update(FreeText.strings_of(loads(body)))
        self._count_texts(Counter({s: -n for s, n in gone.items()}))
        self.db.execute("DELETE FROM copy WHERE seq >= ?", (seq,))
        self.db.execute("DELETE FROM ident WHERE seq >= ?", (seq,))
        self.db.execute("DELETE FROM problem WHERE seq >= ?", (problem,))
        self.next_seq, self.next_problem = seq, problem
        self.unnamed = self.db.execute("SELECT count(*) FROM copy WHERE flags & ? = 0 AND type != 'Procedure' "
                                       "AND full_url IS NULL", (HAS_ID,)).fetchone()[0]

    # ---------------------------------------------------------------------------------- after reading
    def finish_reading(self) -> None:
        """Index what was read and settle every resource's versions, as `ResourceIndex.add` would."""
        self.flush()
        self.script("""
            CREATE INDEX copy_key ON copy(key, seq) WHERE key IS NOT NULL;
            CREATE INDEX copy_url ON copy(url, seq) WHERE url IS NOT NULL;
            CREATE INDEX ident_value ON ident(system, value);
            CREATE TABLE entry(key TEXT PRIMARY KEY, seq INTEGER NOT NULL, first INTEGER NOT NULL, n INTEGER NOT NULL,
                               flags INTEGER NOT NULL, type TEXT NOT NULL, listed INTEGER);
            INSERT INTO entry SELECT key, max(seq), min(seq), count(*), flags, type, NULL FROM copy
                WHERE key IS NOT NULL GROUP BY key;
            UPDATE entry SET listed = seq WHERE flags & 1 = 0;
            CREATE INDEX entry_seq ON entry(seq);
            CREATE TABLE duplicate(seq INTEGER NOT NULL, key TEXT NOT NULL, kept TEXT NOT NULL, old TEXT NOT NULL);
            CREATE TABLE conflict(seq INTEGER NOT NULL, key TEXT NOT NULL, origins TEXT NOT NULL);
        """)
        multi = [key for (key,) in self.db.execute("SELECT key FROM entry WHERE n > 1")]
        gone: Counter[str] = Counter()
        for key in multi:
            self._settle(key, gone)
        self._count_texts(Counter({s: -n for s, n in gone.items()}))

    def copies(self, key: str) -> list[Copy]:
        return [self._copy(row) for row in self.db.execute(
            "SELECT seq, key, type, origin, full_url, flags, body FROM copy WHERE key = ? ORDER BY seq", (key,))]

    @staticmethod
    def _copy(row: tuple[Any, ...]) -> Copy:
        seq, key, kind, origin, full_url, flags, body = row
        return Copy(seq, key, kind, origin, full_url, flags, loads(body))

    def _settle(self, key: str, gone: Counter[str]) -> None:
        """Replay the copies of `key` in read order into a real index: the current copy, the duplicate and
        conflict reports (with the copy that caused each), where the key sits among the current resources,
        and the free text of copies that are no longer current."""
        index = ResourceIndex()
        copies = self.copies(key)
        seq_of = {id(c.resource): c.seq for c in copies}
        listed: int | None = None
        conflict_at: int | None = None
        for c in copies:
            before, present = len(index.duplicates), key in index.by_ref
            index.add(c.sourced())
            self.db.executemany("INSERT INTO duplicate VALUES (?, ?, ?, ?)",
                                [(c.seq, *dup) for dup in index.duplicates[before:]])
            if not present and key in index.by_ref:
                listed = c.seq  # (re-)entered the current resources here: `of_type` lists it in this place
            elif key not in index.by_ref:
                listed = None
            if conflict_at is None and key in index.conflicts:
                conflict_at = c.seq
        current = index.entries[key]
        winner = seq_of[id(current.resource)]
        if conflict_at is not None:
            self.db.execute("INSERT INTO conflict VALUES (?, ?, ?)",
                            (conflict_at, key, json.dumps(index.conflicts[key])))
        flags = next(c.flags for c in copies if c.seq == winner)
        self.db.execute("UPDATE entry SET seq = ?, flags = ?, listed = ? WHERE key = ?", (winner, flags, listed, key))
        for c in copies:
            if c.seq != winner and c.flags & HAS_ID and not c.flags & DELETED:  # id-less copies all stay
                gone.update(FreeText.strings_of(c.resource))

    def versions(self, key: str) -> Versions:
        """The versions of a key with several copies, decided by replaying them (see `_settle`)."""
        index = ResourceIndex.build(c.sourced() for c in self.copies(key))
        return Versions(index.entries[key], index.superseded.get(key, []), index.conflicts.get(key))

    # --------------------------------------------------------------------------------------- lookups
    def current(self, key: str) -> tuple[Copy, int] | None:
        """The current copy of a key and how many copies it has (None when the input has no such key)."""
        row = self.db.execute(
            f"SELECT {self._COLUMNS}, e.n FROM entry e JOIN copy c ON c.seq = e.seq WHERE e.key = ?", (key,)).fetchone()
        return (self._copy(row[:7]), row[7]) if row else None

    def key_of_url(self, url: str) -> str | None:
        """The key the last copy read with this fullUrl (without `_history`) gave it."""
        row = self.db.execute("SELECT key FROM copy WHERE url = ? ORDER BY seq DESC LIMIT 1", (url,)).fetchone()
        return row[0] if row else None

    def identifier_keys(self, kind: str | None, system: str, value: str) -> list[str]:
        """Current resources with this identifier: once per identifier element for a `kind` (in the order keys
        were first read), else each key once, sorted (as `ResourceIndex._identifier_matches`)."""
        if kind:
            return [k for (k,) in self.db.execute(
                "SELECT e.key FROM ident i JOIN entry e ON e.seq = i.seq WHERE i.system = ? AND i.value = ? "
                "AND i.type = ? ORDER BY e.first, i.rowid", (encode(system), encode(value), kind))]
        return sorted({k for (k,) in self.db.execute(
            "SELECT e.key FROM ident i JOIN entry e ON e.seq = i.seq WHERE i.system = ? AND i.value = ?",
            (encode(system), encode(value)))})

    def listed(self, prefix: str) -> Iterator[Copy]:
        """Current resources whose key starts with `prefix`, in the order the in-memory index lists them."""
        for row in self.db.execute(
                f"SELECT {self._COLUMNS} FROM entry e JOIN copy c ON c.seq = e.seq "
                "WHERE e.key >= ? AND e.key < ? AND e.listed IS NOT NULL ORDER BY e.listed",
                (prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))):
            yield self._copy(row)

    _COLUMNS = "c.seq, c.key, c.type, c.origin, c.full_url, e.flags, c.body"

    def keyed_procedures(self) -> Iterator[tuple[Copy, int]]:
        """The current copy of every `Procedure/...` key, with the seq its key was first read at (coding order)."""
        for row in self.db.execute(
                f"SELECT {self._COLUMNS}, e.first FROM entry e JOIN copy c ON c.seq = e.seq "
                "WHERE e.key >= 'Procedure/' AND e.key < 'Procedure0' ORDER BY e.first"):
            yield self._copy(row[:7]), row[7]

    def procedures_without_id(self) -> Iterator[Copy]:
        """Every Procedure read without an id, in read order (each is coded on its own, like `without_id`)."""
        for row in self.db.execute("SELECT seq, key, type, origin, full_url, flags, body FROM copy "
                                   "WHERE flags & ? = 0 AND type = 'Procedure' ORDER BY seq", (HAS_ID,)):
            yield self._copy(row)

    def copy_at(self, seq: int) -> Copy:
        row = self.db.execute("SELECT seq, key, type, origin, full_url, flags, body FROM copy WHERE seq = ?",
                              (seq,)).fetchone()
        return self._copy(row)

    def problems(self) -> Iterator[EntryProblem]:
        for origin, reason in self.db.execute("SELECT origin, reason FROM problem ORDER BY seq"):
            yield EntryProblem(origin, reason)


class SpillingRead(ReadResult):
    """A `ReadResult` whose resources and problems go to the store as they are read."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.resources = _Appender(store.add)  # type: ignore[assignment]
        self.problems = _Appender(store.add_problem)  # type: ignore[assignment]
        self.unreadable: list[InputError] = []

    def mark(self) -> tuple[int, int]:
        return self.store.next_seq, self.store.next_problem

    def discard(self, mark: tuple[int, int]) -> None:
        self.store.rollback(*mark)


class _Appender:
    def __init__(self, sink: Any) -> None:
        self.append = sink
