"""The state in one SQLite file (WAL mode, `synchronous=FULL`): the default backend, for one running instance.

Each contract method is one `BEGIN IMMEDIATE` transaction, so a process killed at any moment leaves the file
consistent: an acknowledged notification is already on disk, and leased work comes back when its lease
expires. sqlite3 errors are translated here, and only here, into the `StateError` family.

The file is opened by its resolved path (symlinks and relative paths lead to one name, so SQLite's `-wal`
and `-shm` files and the instance lock always sit beside the real file); a file with several names (hard
links) is refused, because SQLite and the lock could not tell them apart.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from adapter.errors import InstanceLocked, LeadLost, StateCorrupt, StateError, StateSchemaError, StateUnavailable
from adapter.state.base import (
    AuditRecord,
    NewReview,
    PassRecord,
    ReplicaInfo,
    Retry,
    ReviewAction,
    ReviewEntry,
    StateStats,
    WorkItem,
    check_kinds,
    new_instance_id,
    owner_alive,
)

SCHEMA_VERSION = 4
SQLITE_HEADER = b"SQLite format 3\x00"
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
"""Version 1, as adapters before 0.2 created it; `_MIGRATIONS` brings it to the current version."""

_MIGRATIONS: dict[int, list[str]] = {
    2: [
        "ALTER TABLE queue ADD COLUMN not_before REAL NOT NULL DEFAULT 0",
        "ALTER TABLE queue ADD COLUMN dedupe TEXT",
        "ALTER TABLE queue ADD COLUMN leased_by TEXT",
        "ALTER TABLE queue ADD COLUMN finished_at REAL",
        "CREATE INDEX IF NOT EXISTS queue_due ON queue (status, not_before, id)",
        "CREATE UNIQUE INDEX IF NOT EXISTS queue_dedupe ON queue (dedupe) "
        "WHERE dedupe IS NOT NULL AND status IN ('pending', 'leased')",
        "ALTER TABLE review ADD COLUMN patients TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE review ADD COLUMN resources TEXT NOT NULL DEFAULT '[]'",
        "UPDATE review SET patients = json_array(patient) WHERE patient IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS audit_procedure ON audit (procedure)",
        "CREATE INDEX IF NOT EXISTS audit_at ON audit (at)",
        "CREATE TABLE IF NOT EXISTS claims (patient TEXT PRIMARY KEY, owner TEXT NOT NULL, until REAL NOT NULL)",
        "CREATE TABLE IF NOT EXISTS replicas (instance TEXT PRIMARY KEY, started REAL NOT NULL, "
        "last_seen REAL NOT NULL)",
    ],
    3: [
        # a dedupe key merges into pending work only: leased work may have read the server before the change
        "DROP INDEX IF EXISTS queue_dedupe",
        "CREATE INDEX IF NOT EXISTS queue_dedupe_pending ON queue (dedupe) "
        "WHERE dedupe IS NOT NULL AND status = 'pending'",
        "CREATE TABLE IF NOT EXISTS leads (role TEXT PRIMARY KEY, owner TEXT NOT NULL, until REAL NOT NULL)",
    ],
    4: [  # the worklist's audit of who dismissed or replayed an entry
        "CREATE TABLE IF NOT EXISTS review_action (id INTEGER PRIMARY KEY AUTOINCREMENT, review_id INTEGER NOT NULL, "
        "at REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, note TEXT NOT NULL DEFAULT '')",
        "CREATE INDEX IF NOT EXISTS review_action_review ON review_action (review_id)",
    ],
}

_REVIEW_COLUMNS = ("id, procedure, patients, kind, reason, detail, status, attempts, first_seen, last_seen, "
                   "resources")
_ITEM_COLUMNS = "id, kind, payload, source, attempts, dedupe, not_before, last_error, received_at"

_WHAT_TO_DO_DAMAGED = ("stop the adapter, move the file (and its -wal and -shm files) aside and restore a backup, "
                       "or let the adapter start a new one: the next poll re-reads everything and writes nothing "
                       "twice, but open review entries and queued work in the old file are lost")

T = TypeVar("T")


def _describe(exc: sqlite3.Error, location: str, waited: float) -> StateError:
    """One sqlite3 error as the StateError a person can act on."""
    text = str(exc)
    lower = text.lower()
    if isinstance(exc, sqlite3.OperationalError):
        if "locked" in lower or "busy" in lower:
            return StateUnavailable(location, f"database is locked by another connection (waited {waited:g} s)")
        if "readonly" in lower or "read-only" in lower:
            return StateUnavailable(location, "read-only: the adapter's user needs write access to the file and "
                                              "its folder (SQLite creates -wal and -shm files beside it)")
        if "full" in lower:
            return StateUnavailable(location, "disk full: free space on the filesystem that holds the state")
        if "unable to open" in lower:
            return StateUnavailable(location, "cannot open the file: check that its folder exists and that the "
                                              "adapter's user may read and write both")
        if "disk i/o" in lower:
            return StateUnavailable(location, "I/O error reading or writing the file (the disk, the filesystem "
                                              "or its permissions)")
        if "malformed" in lower or "corrupt" in lower:
            return StateCorrupt(location, f"the file is damaged ({text}): {_WHAT_TO_DO_DAMAGED}")
        return StateUnavailable(location, text)
    return StateCorrupt(location, f"the file is damaged ({text}): {_WHAT_TO_DO_DAMAGED}")


def _translated(method: Callable[..., T]) -> Callable[..., T]:
    """Run a method with sqlite3 and OS errors translated into the StateError family."""

    @functools.wraps(method)
    def wrapper(self: SqliteState, *args: Any, **kwargs: Any) -> T:
        with self.translate_errors():
            return method(self, *args, **kwargs)

    return wrapper


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class SqliteState:
    """The state in one SQLite file; thread-safe (one connection per thread)."""

    shared = False

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0, lease_seconds: float = 300.0,
                 instance_id: str | None = None) -> None:
        self.path = Path(path).expanduser().resolve()
        self.location = str(self.path)
        self.busy_timeout = busy_timeout
        self.lease_seconds = lease_seconds
        self.instance_id = instance_id or new_instance_id()
        self._local = threading.local()
        self._instance_lock: Any = None
        self._check_file()
        with self.translate_errors():
            self._initialise()

    # -- opening ------------------------------------------------------------------------------------------------

    def _check_file(self) -> None:
        """Refuse, with what to do, anything SQLite would only report as a cryptic error (or not at all)."""
        path = self.path
        if path.is_dir():
            raise StateSchemaError(self.location, "is a folder: state.location must name a file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateUnavailable(self.location, f"cannot create its folder: {exc.strerror}") from None
        if not path.exists():
            if not os.access(path.parent, os.W_OK):
                raise StateUnavailable(self.location, "cannot create the file: its folder is read-only for the "
                                                      "adapter's user")
            return
        stat = path.stat()
        if stat.st_nlink > 1:
            raise StateSchemaError(self.location, f"the file has {stat.st_nlink} names (hard links): SQLite and the "
                                                  "one-instance lock need exactly one; remove the other links")
        try:
            with path.open("rb") as handle:
                header = handle.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise StateUnavailable(self.location, f"cannot read the file ({exc.strerror}): the adapter's user needs "
                                                  "read and write access to it and its folder") from None
        if header and header != SQLITE_HEADER:
            raise StateSchemaError(self.location, "is not an SQLite database, so not an adapter state: check "
                                                  "state.location (the file is left untouched)")
        if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
            raise StateUnavailable(self.location, "read-only: the adapter's user needs write access to the file and "
                                                  "its folder (SQLite creates -wal and -shm files beside it)")

    def _initialise(self) -> None:
        db = self._db()
        db.execute("PRAGMA journal_mode=WAL")
        with self._tx() as tx:
            tables = {r[0] for r in tx.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "meta" not in tables:
                raise StateSchemaError(self.location, "is an SQLite database of something else (no adapter tables): "
                                                      "check state.location (the file is left untouched)")
            for statement in filter(str.strip, SCHEMA.split(";")):  # not executescript: it would commit
                tx.execute(statement)
            row = tx.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StateSchemaError(self.location, f"state schema {version} is newer than this adapter "
                                                      f"({SCHEMA_VERSION}): upgrade the adapter")
            if version == 0:  # a new file: created as version 1, then migrated like any old one
                version = 1
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target]:
                    tx.execute(statement)
            tx.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT(key) DO UPDATE SET "
                       "value=excluded.value", (str(SCHEMA_VERSION),))
            tx.execute("INSERT OR IGNORE INTO meta VALUES ('installation_id', ?)", (uuid.uuid4().hex,))

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged notification must survive power loss
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            db.execute("PRAGMA journal_size_limit=16777216")  # the WAL shrinks back to 16 MiB after checkpoints
            self._local.db = db
            self._local.waited = self.busy_timeout
        return db

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        """sqlite3 and OS errors out of this block become StateError; programming errors stay what they are."""
        try:
            yield
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise
        except sqlite3.Error as exc:
            raise _describe(exc, self.location, getattr(self._local, "waited", self.busy_timeout)) from None
        except OSError as exc:
            raise StateUnavailable(self.location, f"{exc.strerror or exc}") from None

    @contextmanager
    def _tx(self, timeout: float | None = None) -> Iterator[sqlite3.Connection]:
        db = self._db()
        self._local.waited = self.busy_timeout if timeout is None else timeout  # for the error message
        if timeout is not None:
            db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
        finally:
            if timeout is not None:
                db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")

    def acquire_instance_lock(self) -> None:
        """Only one `run` or `serve` per state file: two would race on the same charges and cursor.

        The lock file sits beside the resolved path, so a symlink or a relative path to the same state takes
        the same lock (hard links were refused on opening).
        """
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            handle = lock_path.open("a")
        except OSError as exc:
            raise StateUnavailable(self.location, f"cannot create the lock file {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise InstanceLocked(self.location, "another charge-adapter run/serve is using this state file") from None
        self._instance_lock = handle  # held until the process exits
        self._drop_dead_claims()

    @_translated
    def _drop_dead_claims(self) -> None:
        """Patient claims and work leases of a run/serve that died (kill -9) on this host: with the instance lock
        held, no other one is running, so they would only make the restart wait out their lease."""
        with self._tx() as db:
            owners = {row[0] for row in db.execute("SELECT owner FROM claims UNION SELECT leased_by FROM queue "
                                                   "WHERE status='leased' AND leased_by IS NOT NULL")}
            dead = [owner for owner in owners if owner and owner != self.instance_id and not owner_alive(owner)]
            db.executemany("DELETE FROM claims WHERE owner=?", [(o,) for o in dead])
            db.executemany("UPDATE queue SET lease_until=0 WHERE status='leased' AND leased_by=?", [(o,) for o in dead])

    # the old name
    lock_instance = acquire_instance_lock

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    @_translated
    def installation_id(self) -> str:
        row = self._db().execute("SELECT value FROM meta WHERE key='installation_id'").fetchone()
        return str(row[0])

    # -- cursors and processed versions ------------------------------------------------------------------------

    @_translated
    def cursor(self, name: str = "poll") -> str | None:
        row = self._db().execute("SELECT value FROM cursor WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    @_translated
    def set_cursor(self, value: str, name: str = "poll") -> None:
        with self._tx() as db:
            self._set_cursor(db, name, value)

    @staticmethod
    def _set_cursor(db: sqlite3.Connection, name: str, value: str) -> None:
        db.execute("INSERT INTO cursor VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET value=excluded.value, "
                   "updated_at=excluded.updated_at", (name, value, time.time()))

    @_translated
    def seen(self, procedure: str, version: str) -> bool:
        row = self._db().execute("SELECT 1 FROM processed WHERE procedure=? AND version=?",
                                 (procedure, version)).fetchone()
        return row is not None

    # -- work queue ------------------------------------------------------------------------------------------

    @_translated
    def enqueue(self, items: list[WorkItem], *, event: tuple[str, int] | None = None,
                timeout: float | None = None) -> list[int]:
        check_kinds(items)
        now = time.time()
        with self._tx(timeout) as db:
            ids = [self._enqueue_one(db, item, now) for item in items]
            if event is not None:
                db.execute("INSERT INTO events VALUES (?, ?) ON CONFLICT(subscription) DO UPDATE SET "
                           "last_number=max(last_number, excluded.last_number)", event)
        return ids

    @staticmethod
    def _enqueue_one(db: sqlite3.Connection, item: WorkItem, now: float) -> int:
        if item.dedupe:
            row = db.execute("SELECT id FROM queue WHERE dedupe=? AND status='pending' ORDER BY id LIMIT 1",
                             (item.dedupe,)).fetchone()
            if row:
                db.execute("UPDATE queue SET not_before=min(not_before, ?), last_error=coalesce(?, last_error) "
                           "WHERE id=?", (item.due_at(now), item.last_error, row[0]))
                return int(row[0])
        cur = db.execute(
            "INSERT INTO queue (kind, payload, source, received_at, not_before, dedupe, last_error) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (str(item.kind), _json(item.payload), item.source, item.received_at or now, item.due_at(now),
             item.dedupe, item.last_error))
        return int(cur.lastrowid or 0)

    @_translated
    def lease(self, limit: int, *, owner: str = "", now: float | None = None) -> list[WorkItem]:
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM queue WHERE (status='pending' AND not_before <= ?) "
                "OR (status='leased' AND lease_until < ?) ORDER BY id LIMIT ?", (now, now, limit)).fetchall()
            db.executemany("UPDATE queue SET status='leased', lease_until=?, leased_by=?, attempts=attempts+1 "
                           "WHERE id=?", [(now + self.lease_seconds, owner or self.instance_id, r[0]) for r in rows])
        return [self._item(row, extra_attempt=True) for row in rows]

    @staticmethod
    def _item(row: tuple[Any, ...], extra_attempt: bool = False) -> WorkItem:
        rid, kind, payload, source, attempts, dedupe, not_before, last_error, received_at = row
        return WorkItem(kind, json.loads(payload), source, rid, attempts + (1 if extra_attempt else 0), dedupe,
                        not_before, last_error, received_at)

    @_translated
    def ack(self, ids: Collection[int]) -> None:
        with self._tx() as db:
            self._ack(db, ids, time.time())

    @staticmethod
    def _ack(db: sqlite3.Connection, ids: Collection[int], now: float) -> None:
        db.executemany("UPDATE queue SET status='done', lease_until=NULL, finished_at=? WHERE id=?",
                       [(now, i) for i in ids])

    @_translated
    def retry(self, retries: Collection[Retry]) -> None:
        with self._tx() as db:
            self._retry(db, retries, time.time())

    @staticmethod
    def _retry(db: sqlite3.Connection, retries: Collection[Retry], now: float) -> None:
        db.executemany("UPDATE queue SET status='pending', lease_until=NULL, not_before=?, last_error=? WHERE id=?",
                       [(r.due_at(now), r.error, r.id) for r in retries])

    @_translated
    def dead_letter(self, ids: Collection[int], error: str, reviews: Iterable[NewReview] = ()) -> None:
        now = time.time()
        with self._tx() as db:
            self._dead(db, [(i, error) for i in ids], now)
            for review in reviews:
                self._open_review(db, review, now)

    @staticmethod
    def _dead(db: sqlite3.Connection, dead: Collection[tuple[int, str]], now: float) -> None:
        db.executemany("UPDATE queue SET status='failed', lease_until=NULL, last_error=?, finished_at=? WHERE id=?",
                       [(error, now, i) for i, error in dead])

    @_translated
    def queue_counts(self) -> dict[str, int]:
        return dict(self._db().execute("SELECT status, count(*) FROM queue GROUP BY status").fetchall())

    @_translated
    def queue_depth(self) -> int:
        row = self._db().execute("SELECT count(*) FROM queue WHERE status IN ('pending', 'leased')").fetchone()
        return int(row[0])

    @_translated
    def queued(self, limit: int = 100) -> list[WorkItem]:
        rows = self._db().execute(f"SELECT {_ITEM_COLUMNS} FROM queue WHERE status IN ('pending', 'leased') "
                                  "ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [self._item(row) for row in rows]

    # -- a pass ------------------------------------------------------------------------------------------------

    @_translated
    def record_pass(self, record: PassRecord) -> None:
        check_kinds(record.due)
        now = time.time()
        with self._tx() as db:
            if record.lead and not self._holds(db, record.lead, record.owner, now):
                raise LeadLost(self.location, f"{record.owner} no longer holds the {record.lead!r} role")
            for item in record.due:
                self._enqueue_one(db, item, now)
            for review in record.reviews:
                self._open_review(db, review, now)
            self._resolve(db, record.resolve, record.keep, now)
            db.executemany("UPDATE review SET status='resolved', last_seen=? WHERE id=? AND status='open'",
                           [(now, i) for i in record.resolve_ids])
            db.executemany("INSERT OR REPLACE INTO processed VALUES (?, ?, ?, ?)",
                           [(p.procedure, p.version, str(p.outcome), now) for p in record.processed])
            db.executemany(
                "INSERT INTO audit (at, procedure, version, session, codes, table_version, written) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(now, a.procedure, a.version, a.session, _json(list(a.codes)), a.table_version,
                  _json(list(a.written))) for a in record.audit])
            for name, value in record.cursors.items():
                self._set_cursor(db, name, value)
            self._ack(db, record.acked, now)
            self._retry(db, record.retried, now)
            self._dead(db, record.dead, now)
            if record.release:
                db.executemany("DELETE FROM claims WHERE patient=? AND owner=?",
                               [(p, record.owner) for p in record.release])

    @_translated
    def claim_patients(self, patients: Collection[str], owner: str, seconds: float,
                       now: float | None = None) -> set[str]:
        now = time.time() if now is None else now
        granted: set[str] = set()
        with self._tx() as db:
            for patient in sorted(set(patients)):
                row = db.execute("SELECT owner, until FROM claims WHERE patient=?", (patient,)).fetchone()
                if row is None or row[0] == owner or row[1] < now:
                    db.execute("INSERT INTO claims VALUES (?, ?, ?) ON CONFLICT(patient) DO UPDATE SET "
                               "owner=excluded.owner, until=excluded.until", (patient, owner, now + seconds))
                    granted.add(patient)
        return granted

    @_translated
    def release_patients(self, patients: Collection[str], owner: str) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM claims WHERE patient=? AND owner=?", [(p, owner) for p in patients])

    # -- roles -------------------------------------------------------------------------------------------------

    @_translated
    def lead(self, role: str, owner: str, seconds: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute("INSERT INTO leads VALUES (?, ?, ?) ON CONFLICT(role) DO UPDATE SET owner=excluded.owner, "
                             "until=excluded.until WHERE leads.owner=excluded.owner OR leads.until < ?",
                             (role, owner, now + seconds, now))
            return cur.rowcount > 0

    @staticmethod
    def _holds(db: sqlite3.Connection, role: str, owner: str, now: float) -> bool:
        row = db.execute("SELECT 1 FROM leads WHERE role=? AND owner=? AND until >= ?", (role, owner, now)).fetchone()
        return row is not None

    @_translated
    def resign(self, role: str, owner: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM leads WHERE role=? AND owner=?", (role, owner))

    @_translated
    def replicas(self, now: float | None = None) -> list[ReplicaInfo]:
        now = time.time() if now is None else now
        db = self._db()
        roles: dict[str, list[str]] = {}
        for role, owner in db.execute("SELECT role, owner FROM leads WHERE until >= ? ORDER BY role", (now,)):
            roles.setdefault(owner, []).append(role)
        claims = dict(db.execute("SELECT owner, count(*) FROM claims WHERE until >= ? GROUP BY owner", (now,)))
        leased = dict(db.execute("SELECT leased_by, count(*) FROM queue WHERE status='leased' AND lease_until >= ? "
                                 "GROUP BY leased_by", (now,)))
        rows = db.execute("SELECT instance, started, last_seen FROM replicas ORDER BY last_seen DESC, instance")
        return [ReplicaInfo(i, started, seen, tuple(roles.get(i, ())), int(claims.get(i, 0)), int(leased.get(i, 0)))
                for i, started, seen in rows]

    # -- topic subscription event numbers ------------------------------------------------------------------------

    @_translated
    def last_event_number(self, subscription: str) -> int | None:
        row = self._db().execute("SELECT last_number FROM events WHERE subscription=?", (subscription,)).fetchone()
        return int(row[0]) if row else None

    @_translated
    def set_event_number(self, subscription: str, number: int) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO events VALUES (?, ?) ON CONFLICT(subscription) DO UPDATE SET "
                       "last_number=max(last_number, excluded.last_number)", (subscription, number))

    # -- review queue ----------------------------------------------------------------------------------------

    @_translated
    def open_review(self, review: NewReview) -> None:
        with self._tx() as db:
            self._open_review(db, review, time.time())

    @staticmethod
    def _open_review(db: sqlite3.Connection, review: NewReview, now: float) -> None:
        patients = _json(list(review.patients))
        db.execute(
            "INSERT INTO review (procedure, patient, kind, reason, detail, attempts, first_seen, last_seen, patients, "
            "resources) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?) ON CONFLICT(procedure, reason) WHERE status='open' "
            "DO UPDATE SET detail=excluded.detail, kind=excluded.kind, attempts=attempts+1, "
            "last_seen=excluded.last_seen, "
            "patients=CASE WHEN excluded.patients='[]' THEN patients ELSE excluded.patients END, "
            "patient=coalesce(excluded.patient, patient), "
            "resources=CASE WHEN excluded.resources='[]' THEN resources ELSE excluded.resources END",
            (review.procedure, review.patients[0] if review.patients else None, str(review.kind), review.reason,
             review.detail, now, now, patients, _json(list(review.resources))))

    @staticmethod
    def _resolve(db: sqlite3.Connection, procedures: Collection[str], keep: Collection[tuple[str, str]],
                 now: float) -> None:
        for proc in procedures:
            for rid, reason in db.execute("SELECT id, reason FROM review WHERE procedure=? AND status='open'",
                                          (proc,)).fetchall():
                if (proc, reason) not in keep:
                    db.execute("UPDATE review SET status='resolved', last_seen=? WHERE id=?", (now, rid))

    @staticmethod
    def _review(row: tuple[Any, ...]) -> ReviewEntry:
        rid, procedure, patients, kind, reason, detail, status, attempts, first, last, resources = row
        return ReviewEntry(rid, procedure, tuple(json.loads(patients)), kind, reason, detail, status, attempts,
                           first, last, tuple(json.loads(resources)))

    @_translated
    def reviews(self, status: str | None = "open") -> list[ReviewEntry]:
        sql = f"SELECT {_REVIEW_COLUMNS} FROM review" + (" WHERE status=?" if status else "") + " ORDER BY id"
        return [self._review(row) for row in self._db().execute(sql, (status,) if status else ()).fetchall()]

    @_translated
    def review(self, review_id: int) -> ReviewEntry | None:
        row = self._db().execute(f"SELECT {_REVIEW_COLUMNS} FROM review WHERE id=?", (review_id,)).fetchone()
        return self._review(row) if row else None

    @_translated
    def dismiss_review(self, review_id: int, actor: str, note: str = "") -> bool:
        now = time.time()
        with self._tx() as db:
            changed = db.execute("UPDATE review SET status='dismissed', last_seen=? WHERE id=? AND status='open'",
                                 (now, review_id)).rowcount
            if changed:
                db.execute("INSERT INTO review_action (review_id, at, actor, action, note) VALUES (?, ?, ?, ?, ?)",
                           (review_id, now, actor, "dismiss", note))
        return bool(changed)

    @_translated
    def record_review_action(self, action: ReviewAction) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO review_action (review_id, at, actor, action, note) VALUES (?, ?, ?, ?, ?)",
                       (action.review_id, action.at, action.actor, action.action, action.note))

    @_translated
    def review_actions(self, review_id: int) -> list[ReviewAction]:
        rows = self._db().execute("SELECT review_id, at, actor, action, note FROM review_action WHERE review_id=? "
                                  "ORDER BY id", (review_id,)).fetchall()
        return [ReviewAction(*row) for row in rows]

    # -- audit ---------------------------------------------------------------------------------------------------

    @_translated
    def audit_for(self, procedure: str) -> list[AuditRecord]:
        rows = self._db().execute("SELECT version, session, codes, table_version, written FROM audit "
                                  "WHERE procedure=? ORDER BY id", (procedure,)).fetchall()
        return [AuditRecord(procedure, v, s, tuple(json.loads(c)), t, tuple(json.loads(w))) for v, s, c, t, w in rows]

    # -- health and housekeeping -----------------------------------------------------------------------------------

    @_translated
    def heartbeat(self, now: float | None = None, *, timeout: float | None = None) -> float:
        now = time.time() if now is None else now
        with self._tx(timeout) as db:
            db.execute("INSERT INTO replicas VALUES (?, ?, ?) ON CONFLICT(instance) DO UPDATE SET "
                       "last_seen=excluded.last_seen", (self.instance_id, now, now))
        return 0.0  # one file, one host: the state's clock is this process's

    @_translated
    def stats(self, now: float | None = None, *, timeout: float | None = None) -> StateStats:
        db = self._db()
        read_at = time.time()
        depth, oldest, backlog = db.execute(
            "SELECT count(*), min(received_at), coalesce(sum(attempts > 0 AND status='pending'), 0) FROM queue "
            "WHERE status IN ('pending', 'leased')").fetchone()
        dead = db.execute("SELECT count(*) FROM queue WHERE status='failed'").fetchone()[0]
        reviews = db.execute("SELECT count(*) FROM review WHERE status='open'").fetchone()[0]
        cursor = db.execute("SELECT value FROM cursor WHERE name='poll'").fetchone()
        return StateStats(int(depth), int(backlog), oldest, int(dead), int(reviews), cursor[0] if cursor else None,
                          read_at)

    @_translated
    def counts(self) -> dict[str, int]:
        db = self._db()
        return {
            "processed": db.execute("SELECT count(*) FROM processed").fetchone()[0],
            "review_open": db.execute("SELECT count(*) FROM review WHERE status='open'").fetchone()[0],
            "audit": db.execute("SELECT count(*) FROM audit").fetchone()[0],
            "queue_depth": db.execute("SELECT count(*) FROM queue WHERE status IN ('pending', 'leased')")
            .fetchone()[0],
        }

    @_translated
    def prune(self, done_before: float, audit_before: float) -> dict[str, int]:
        with self._tx() as db:
            done = db.execute("DELETE FROM queue WHERE status='done' AND finished_at < ?", (done_before,)).rowcount
            audit = db.execute("DELETE FROM audit WHERE at < ?", (audit_before,)).rowcount
            claims = db.execute("DELETE FROM claims WHERE until < ?", (time.time(),)).rowcount
            db.execute("DELETE FROM leads WHERE until < ?", (time.time(),))
            db.execute("DELETE FROM replicas WHERE last_seen < ?", (done_before,))
        self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return {"queue": done, "audit": audit, "claims": claims}

    def wal_bytes(self) -> int:
        """Size of the write-ahead log (for tests and `status`)."""
        wal = self.path.with_name(self.path.name + "-wal")
        return wal.stat().st_size if wal.exists() else 0
