"""The X12 folder sink: one 837P interchange per batch of Claims, written as one file for a clearinghouse's pickup.

A batch is the Claims a sync pass writes (new, replacement and void Claims; those left as they are, and Claims
cancelled before they passed on, are not sent). Its interchange control number (ISA13, GS06, BHT03) and time
come from the register in the state, keyed by the batch's content: the same batch delivered again (a crash
after the file was written, a pass repeated) gets the same number and time, so the same file, byte for byte,
under the same name (`837P-<ISA13>.x12`), never a second interchange of the same Claims. The interchange is stored
in the register before the file is written and marked written after; one a folder outage kept from being
written is written by the next pass (`flush`). The file appears complete or not at all
(adapter.hl7v2.files.FolderTransport).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from adapter.building.claim837 import ClaimProblem, Control, Resolve, build_interchange
from adapter.errors import StateError
from adapter.hl7v2.files import FolderTransport
from adapter.hl7v2.mllp import TransportError
from adapter.tables.x12 import X12Tables

MAX_CONTROL = 999_999_999
_VOLATILE = ("id", "meta", "text", "created")
"""Claim fields that differ between two plannings of the same Claim: left out of the batch key."""


def batch_key(claims: Iterable[dict[str, Any]]) -> str:
    """The batch's identity: its Claims' identifiers and content (without server-managed and write-time fields)."""
    parts = sorted(json.dumps({k: v for k, v in c.items() if k not in _VOLATILE}, sort_keys=True) for c in claims)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class ControlRegister(Protocol):
    def assign(self, batch: str, now: datetime) -> Control:
        """The batch's recorded control number and time, else the next number with `now` (recorded first)."""
        ...

    def keep(self, number: int, text: str) -> None:
        """Store the interchange's text (pending until `written`); a stored text is kept as it is."""
        ...

    def pending(self) -> list[tuple[int, str]]:
        """Interchanges stored and not yet written, in number order."""
        ...

    def written(self, number: int) -> None: ...


class MemoryRegister:
    def __init__(self) -> None:
        self._batches: dict[str, Control] = {}
        self._texts: dict[int, tuple[str, bool]] = {}
        self._lock = threading.Lock()

    def keep(self, number: int, text: str) -> None:
        self._texts.setdefault(number, (text, False))

    def pending(self) -> list[tuple[int, str]]:
        return [(n, t) for n, (t, done) in sorted(self._texts.items()) if not done]

    def written(self, number: int) -> None:
        self._texts[number] = (self._texts[number][0], True)

    def assign(self, batch: str, now: datetime) -> Control:
        with self._lock:
            if batch not in self._batches:
                number = len(self._batches) + 1
                if number > MAX_CONTROL:
                    raise StateError("memory", "X12 interchange control numbers exhausted")
                self._batches[batch] = Control(number, now)
            return self._batches[batch]


class SqliteRegister:
    """Tables of its own in the SQLite state file (created on first use)."""

    def __init__(self, path: str | Path, busy_timeout: float = 5.0) -> None:
        self.path = str(path)
        self.busy_timeout = busy_timeout

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        db.execute("CREATE TABLE IF NOT EXISTS x12_interchange (batch TEXT PRIMARY KEY, number INTEGER NOT NULL "
                   "UNIQUE, created TEXT NOT NULL, text TEXT, written INTEGER NOT NULL DEFAULT 0)")
        return db

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        try:
            db = self._connect()
            try:
                return db.execute(sql, args).fetchall()
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise StateError(self.path, f"X12 interchanges cannot be recorded ({exc})") from None

    def keep(self, number: int, text: str) -> None:
        self._run("UPDATE x12_interchange SET text = ? WHERE number = ? AND text IS NULL", (text, number))

    def pending(self) -> list[tuple[int, str]]:
        rows = self._run("SELECT number, text FROM x12_interchange WHERE written = 0 AND text IS NOT NULL "
                         "ORDER BY number")
        return [(int(n), str(t)) for n, t in rows]

    def written(self, number: int) -> None:
        self._run("UPDATE x12_interchange SET written = 1 WHERE number = ?", (number,))

    def assign(self, batch: str, now: datetime) -> Control:
        try:
            db = self._connect()
            try:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute("SELECT number, created FROM x12_interchange WHERE batch = ?", (batch,)).fetchone()
                if row is None:
                    number = db.execute("SELECT coalesce(max(number), 0) + 1 FROM x12_interchange").fetchone()[0]
                    if number > MAX_CONTROL:
                        raise StateError(self.path, "X12 interchange control numbers exhausted (999999999)")
                    row = (number, now.astimezone(UTC).isoformat())
                    db.execute("INSERT INTO x12_interchange (batch, number, created) VALUES (?, ?, ?)", (batch, *row))
                db.execute("COMMIT")
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise StateError(self.path, f"X12 control numbers cannot be recorded ({exc})") from None
        return Control(int(row[0]), datetime.fromisoformat(row[1]))


def open_register(state: Any) -> ControlRegister:
    """The register beside a state backend: in its SQLite file or PostgreSQL database, or in memory beside the
    memory state (the PostgreSQL driver is imported only for a PostgreSQL state)."""
    import sys

    from adapter.state.memory import MemoryState
    from adapter.state.sqlite import SqliteState

    if isinstance(state, SqliteState):
        return SqliteRegister(state.path, state.busy_timeout)
    if isinstance(state, MemoryState):
        return MemoryRegister()
    postgres = sys.modules.get("adapter.state.postgres")
    if postgres is not None and isinstance(state, postgres.PostgresState):
        from adapter.x12.pg_register import PostgresRegister

        return PostgresRegister(state)
    raise StateError(getattr(state, "location", "?"), "the X12 sink keeps its interchange control numbers in the "
                                                      "state, and this state backend has none: use an SQLite or "
                                                      "PostgreSQL state")


class X12Folder(FolderTransport):
    def file_name(self, seq: int, control_id: str) -> str:
        return f"837P-{control_id}.x12"


@dataclass
class X12Result:
    files: list[str] = field(default_factory=list)
    claims: int = 0
    problems: list[ClaimProblem] = field(default_factory=list)
    failure: str | None = None
    """The folder could not be written: the batch is written again (same number) by the next pass."""


class X12Sink:
    def __init__(self, tables: X12Tables, register: ControlRegister, folder: str | Path,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.tables = tables
        self.register = register
        self.transport = X12Folder(folder)
        self.clock = clock or (lambda: datetime.now(UTC))

    def deliver(self, claims: list[dict[str, Any]], resolve: Resolve,
                payer_claim_numbers: Mapping[str, str] | None = None) -> X12Result:
        """Write the interchange of the Claims that have what the 837P needs; report the others."""
        result = X12Result()
        if not claims:
            return self.flush(result)
        probe = build_interchange(claims, resolve, self.tables, Control(1, self.clock()), payer_claim_numbers)
        result.problems = probe.problems
        sendable = [c for c in claims if str(((c.get("identifier") or [{}])[0]).get("value")) in set(probe.claims)]
        if not sendable:
            return self.flush(result)
        control = self.register.assign(batch_key(sendable), self.clock())
        interchange = build_interchange(sendable, resolve, self.tables, control, payer_claim_numbers)
        assert interchange.text is not None
        self.register.keep(control.number, interchange.text)
        result.claims = len(interchange.claims)
        self.flush(result)
        return result

    def flush(self, result: X12Result | None = None) -> X12Result:
        """Write every stored interchange not written yet (an earlier pass's, after a folder outage), in order."""
        result = result or X12Result()
        for number, text in self.register.pending():
            name = f"{number:09d}"
            try:
                self.transport.send(text, name)
            except TransportError as exc:
                result.failure = str(exc)
                return result
            self.register.written(number)
            result.files.append(self.transport.file_name(0, name))
        return result


WITHOUT_REQUIRE_837P = (
    "sinks.x12 is on while output.require_837p is false (config/settings.yaml): a Claim written to FHIR while it "
    "lacks an element the 837P requires is reported (x12-missing-element) but sent only once the Claim itself "
    "changes; set output.require_837p: true so such a Claim waits in review and goes once it can")
"""Logged at start of a service with the x12 sink and `require_837p` off (docs/output.md "X12 837P")."""


def from_settings(conf: Any, tables: X12Tables, state: Any) -> X12Sink:
    """The sink of `sinks.x12` (adapter.settings.X12SinkSettings), its register in `state`."""
    return X12Sink(tables, open_register(state), conf.folder)
