"""Durable state in one SQLite file: polling cursor, processed Procedure versions, the work queue, the review
queue and the audit log.

Every change is one short transaction in WAL mode, so a process killed at any moment leaves the file
consistent: a notification acknowledged with 2xx is already on disk, and work taken from the queue goes
back to `pending` when its worker dies before finishing (its lease expires).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.errors import AdapterError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cursor (name TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS processed (
    procedure TEXT NOT NULL, version TEXT NOT NULL, outcome TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (procedure, version));
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, payload TEXT NOT NULL, source TEXT NOT NULL,
    received_at REAL NOT NULL, status TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL, last_error TEXT);
CREATE INDEX IF NOT EXISTS queue_pending ON queue (status, id);
CREATE TABLE IF NOT EXISTS review (
    id INTEGER PRIMARY KEY AUTOINCREMENT, procedure TEXT NOT NULL, patient TEXT, kind TEXT NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'open', attempts INTEGER NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS review_open ON review (procedure, reason) WHERE status = 'open';
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, procedure TEXT NOT NULL, version TEXT,
    session TEXT, codes TEXT NOT NULL, table_version TEXT NOT NULL, written TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (subscription TEXT PRIMARY KEY, last_number INTEGER NOT NULL);
"""

QUEUE_KINDS = ("procedure", "delete", "fetch", "poll", "resources")


class InstanceLockedError(AdapterError):
    """Another process already runs the adapter on this state file."""


@dataclass(frozen=True)
class WorkItem:
    """One unit of received work.

    kind: `procedure` {"resource": Procedure}; `delete` {"reference": "Procedure/x"}; `fetch`
    {"reference": "Procedure/x"} (id-only notification: read it from the server); `poll` {"reason": ...}
    (ping, empty notification, event gap); `resources` {"resources": [...]} (a Bundle an engine pushed).
    """

    kind: str
    payload: dict[str, Any]
    source: str
    id: int = 0
    attempts: int = 0


@dataclass(frozen=True)
class ReviewEntry:
    id: int
    procedure: str
    patient: str | None
    kind: str
    reason: str
    detail: str
    status: str
    attempts: int
    first_seen: float
    last_seen: float


class StateStore:
    """Thread-safe access to the state file (one connection per thread)."""

    def __init__(self, path: str | os.PathLike[str], *, lease_seconds: float = 300.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lease_seconds = lease_seconds
        self._local = threading.local()
        self._db().executescript(SCHEMA)  # idempotent DDL; executescript manages its own transaction
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: state schema {row[0]} is newer than this adapter "
                                   f"({SCHEMA_VERSION}); upgrade the adapter")

    def lock_instance(self) -> None:
        """Only one `run` or `serve` per state file: two would race on the same charges and cursor."""
        handle = (self.path.parent / (self.path.name + ".lock")).open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise InstanceLockedError(f"{self.path}: another charge-adapter run/serve is using this state file") \
                from None
        self._instance_lock = handle  # held until the process exits

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged notification must survive power loss
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- cursor -------------------------------------------------------------------------------------------

    def cursor(self, name: str = "poll") -> str | None:
        row = self._db().execute("SELECT value FROM cursor WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    def set_cursor(self, value: str, name: str = "poll") -> None:
        with self._tx() as db:
            db.execute("INSERT INTO cursor VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET value=excluded.value, "
                       "updated_at=excluded.updated_at", (name, value, time.time()))

    # -- processed versions -------------------------------------------------------------------------------

    def seen(self, procedure: str, version: str) -> bool:
        row = self._db().execute("SELECT 1 FROM processed WHERE procedure=? AND version=?",
                                 (procedure, version)).fetchone()
        return row is not None

    def mark_processed(self, versions: list[tuple[str, str, str]]) -> None:
        """(Procedure ref, versionId, outcome) triples."""
        now = time.time()
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO processed VALUES (?, ?, ?, ?)",
                           [(p, v, o, now) for p, v, o in versions])

    # -- work queue ---------------------------------------------------------------------------------------

    def enqueue(self, items: list[WorkItem]) -> list[int]:
        """Persist received work; returns when it is on disk (call before acknowledging the sender)."""
        for item in items:
            if item.kind not in QUEUE_KINDS:
                raise ValueError(f"unknown work kind {item.kind!r}")
        now = time.time()
        ids = []
        with self._tx() as db:
            for item in items:
                cur = db.execute("INSERT INTO queue (kind, payload, source, received_at) VALUES (?, ?, ?, ?)",
                                 (item.kind, json.dumps(item.payload, separators=(",", ":")), item.source, now))
                ids.append(int(cur.lastrowid or 0))
        return ids

    def take(self, limit: int = 50) -> list[WorkItem]:
        """Lease up to `limit` pending items (or items whose lease ran out because their worker died)."""
        now = time.time()
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, kind, payload, source, attempts FROM queue WHERE status='pending' "
                "OR (status='leased' AND lease_until < ?) ORDER BY id LIMIT ?", (now, limit)).fetchall()
            db.executemany("UPDATE queue SET status='leased', lease_until=?, attempts=attempts+1 WHERE id=?",
                           [(now + self.lease_seconds, r[0]) for r in rows])
        return [WorkItem(kind, json.loads(payload), source, rid, attempts + 1)
                for rid, kind, payload, source, attempts in rows]

    def finish(self, ids: list[int], error: str | None = None, *, retry: bool = False) -> None:
        """Done; or failed with `error` (back to pending when `retry`)."""
        status = "done" if error is None else ("pending" if retry else "failed")
        with self._tx() as db:
            db.executemany("UPDATE queue SET status=?, lease_until=NULL, last_error=? WHERE id=?",
                           [(status, error, i) for i in ids])

    def queue_depth(self) -> int:
        row = self._db().execute("SELECT count(*) FROM queue WHERE status IN ('pending', 'leased')").fetchone()
        return int(row[0])

    def queue_counts(self) -> dict[str, int]:
        return dict(self._db().execute("SELECT status, count(*) FROM queue GROUP BY status").fetchall())

    # -- topic subscription event numbers ------------------------------------------------------------------

    def last_event_number(self, subscription: str) -> int | None:
        row = self._db().execute("SELECT last_number FROM events WHERE subscription=?", (subscription,)).fetchone()
        return int(row[0]) if row else None

    def set_event_number(self, subscription: str, number: int) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO events VALUES (?, ?) ON CONFLICT(subscription) DO UPDATE SET "
                       "last_number=max(last_number, excluded.last_number)", (subscription, number))

    # -- review queue -------------------------------------------------------------------------------------

    def open_review(self, procedure: str, patient: str | None, kind: str, reason: str, detail: str) -> None:
        """Add or refresh an open entry; `kind` is `needs-review` or `write-failed`."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO review (procedure, patient, kind, reason, detail, attempts, first_seen, last_seen) "
                "VALUES (?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT(procedure, reason) WHERE status='open' DO UPDATE SET "
                "detail=excluded.detail, attempts=attempts+1, last_seen=excluded.last_seen",
                (procedure, patient, kind, reason, detail, now, now))

    def resolve_reviews(self, procedures: list[str], keep: Collection[tuple[str, str]] = ()) -> int:
        """Close open entries of these Procedures, except the (procedure, reason) pairs still in `keep`."""
        closed = 0
        with self._tx() as db:
            for proc in procedures:
                rows = db.execute("SELECT id, reason FROM review WHERE procedure=? AND status='open'",
                                  (proc,)).fetchall()
                for rid, reason in rows:
                    if (proc, reason) not in keep:
                        db.execute("UPDATE review SET status='resolved', last_seen=? WHERE id=?", (time.time(), rid))
                        closed += 1
        return closed

    def reviews(self, status: str | None = "open") -> list[ReviewEntry]:
        sql = "SELECT * FROM review" + (" WHERE status=?" if status else "") + " ORDER BY id"
        return [ReviewEntry(*row) for row in self._db().execute(sql, (status,) if status else ()).fetchall()]

    def review(self, review_id: int) -> ReviewEntry | None:
        row = self._db().execute("SELECT * FROM review WHERE id=?", (review_id,)).fetchone()
        return ReviewEntry(*row) if row else None

    # -- audit ------------------------------------------------------------------------------------------

    def audit(self, records: list[dict[str, Any]]) -> None:
        """Each: procedure, version, session, codes (list), table_version, written (list of Type/id/_history/n)."""
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "INSERT INTO audit (at, procedure, version, session, codes, table_version, written) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(now, r["procedure"], r.get("version"), r.get("session"), json.dumps(r["codes"]),
                  r["table_version"], json.dumps(r["written"])) for r in records])

    def audit_for(self, procedure: str) -> list[dict[str, Any]]:
        rows = self._db().execute("SELECT at, version, session, codes, table_version, written FROM audit "
                                  "WHERE procedure=? ORDER BY id", (procedure,)).fetchall()
        return [{"at": at, "version": v, "session": s, "codes": json.loads(c), "table_version": t,
                 "written": json.loads(w)} for at, v, s, c, t, w in rows]

    def counts(self) -> dict[str, int]:
        db = self._db()
        return {
            "processed": db.execute("SELECT count(*) FROM processed").fetchone()[0],
            "review_open": db.execute("SELECT count(*) FROM review WHERE status='open'").fetchone()[0],
            "audit": db.execute("SELECT count(*) FROM audit").fetchone()[0],
            "queue_depth": self.queue_depth(),
        }
