"""The message ledger: the durable record of every HL7 v2 message, behind its own small contract.

The rules the sink relies on (every implementation keeps them; tests/unit/hl7v2/test_ledger_contract.py
checks them for each):

- `record` stores messages before they are sent, in one transaction, each with the next sequence number.
  A control id (MSH-10) is stored once: recording it again returns the stored message unchanged.
- A message stays `pending` until the receiver acknowledges it (`acknowledged`: AA, or the file was
  written). A process that dies in between finds it pending and sends the stored text again, byte for byte,
  with the same control id.
- `rejected` (AE/AR) closes a message and, in the same transaction, cancels every later pending message of
  the same patient: those were planned on the rejected one going through.
- `history(patient)` is the patient's messages in sequence order: what each carried (the Visit and the
  charges with their versions) is what corrections are planned from.
- A send without a usable answer (`attempt_failed`) counts an attempt and sets when the message may be sent
  again (`not_before`, on the ledger's clock: the database server's for PostgreSQL); `pending` says whether
  each message is `due` by that clock. `PARKED` (infinity) means never by itself: the message waits in
  review until `unpark` (what `review replay` of its `hl7v2-unacknowledged` entry does). `unreached` keeps
  the error of a send that reached nobody (no connection), counting nothing.
- A rejection holds the patient: `holds(patient)` lists the rejected messages not released since, and while
  it lists any the sink sends nothing new for that patient. `release(patients)` (what `review replay` of the
  refusal's entry does) releases every rejection recorded so far; a later rejection holds the patient again.

Every method is one transaction. Implementations: SQLite (the state file of the SQLite state backend, in
tables of its own with their own schema step), PostgreSQL (`adapter.hl7v2.pg_ledger`: the PostgreSQL state's
database, its own migration component) and memory (tests, `state: memory:`); `adapter.hl7v2.ledgers.open_ledger`
picks the one beside a state. Driver errors become
`StateError`s at this boundary, as in adapter/state.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from adapter.errors import StateCorrupt, StateSchemaError, StateUnavailable


class MessageStatus(StrEnum):
    PENDING = "pending"
    """Recorded, not yet acknowledged: sent (again) with the same bytes until it is."""
    SENT = "sent"
    """The receiver answered AA, or the file was written."""
    REJECTED = "rejected"
    """The receiver answered AE or AR: its charges did not go through (a review entry says why)."""
    CANCELLED = "cancelled"
    """Never sent: an earlier message of the same patient was rejected, and this one was planned on it."""


PARKED = math.inf
"""`not_before` of a message that got no ACK `sinks.hl7v2.attempts` times: it waits for `review replay`."""


@dataclass(frozen=True)
class LedgerSummary:
    """What `status` says about the HL7 v2 path (ages on the ledger's clock)."""

    pending: int = 0
    parked: int = 0
    oldest_pending_seconds: float | None = None
    last_failure: str | None = None
    """The error of the latest send that failed, when no message has been acknowledged since."""
    last_failure_seconds: float | None = None


@dataclass(frozen=True)
class NewMessage:
    """A message to record. `charges`: one entry per FT1, `{"line", "version", "charge"}` (charge as JSON)."""

    control_id: str
    patient: str
    session: str
    kind: str
    """FT1-6 of every line: CG (charges) or CD (credits of earlier charges)."""
    text: str
    """The message as sent (segments separated by CR)."""
    visit: dict[str, Any]
    charges: tuple[dict[str, Any], ...]
    procedures: tuple[str, ...]


@dataclass(frozen=True)
class LedgerMessage(NewMessage):
    seq: int = 0
    status: str = MessageStatus.PENDING
    attempts: int = 0
    """Sends that got no usable answer."""
    created_at: float = 0.0
    finished_at: float | None = None
    ack_code: str | None = None
    ack_text: str | None = None
    last_error: str | None = None
    not_before: float = 0.0
    """When it may be sent again after a send without an ACK (the ledger's clock); PARKED: after replay."""
    last_attempt_at: float | None = None
    due: bool = True
    """`not_before` has passed, by the ledger's clock at reading."""

    @property
    def parked(self) -> bool:
        return self.status == MessageStatus.PENDING and self.not_before == PARKED

    @property
    def versions(self) -> list[tuple[str, str]]:
        return [(c["line"], c["version"]) for c in self.charges]


@runtime_checkable
class Ledger(Protocol):
    location: str

    def record(self, messages: Sequence[NewMessage], now: float | None = None) -> list[LedgerMessage]:
        """Store new messages as pending, in order, in one transaction; known control ids are returned as stored."""

    def pending(self, patient: str | None = None, limit: int = 1000) -> list[LedgerMessage]:
        """Pending messages (of one patient, or all), in sequence order."""

    def history(self, patient: str) -> list[LedgerMessage]:
        """Every message of a patient, in sequence order."""

    def message(self, control_id: str) -> LedgerMessage | None: ...

    def attempt_failed(self, control_id: str, error: str, retry_in: float = 0.0) -> None:
        """A send got no usable answer (no ACK in time, a lost connection): counted, the message stays pending
        and is due again `retry_in` seconds from now (PARKED: after `unpark`)."""

    def unreached(self, control_id: str, error: str) -> None:
        """A send reached nobody (no connection): the error is kept, nothing is counted."""

    def unpark(self, patients: Collection[str]) -> None:
        """The patients' parked messages are due again, their attempts counted from zero (review replay)."""

    def summary(self) -> LedgerSummary: ...

    def acknowledged(self, control_id: str, code: str, text: str, now: float | None = None) -> None:
        """The receiver took the message: `sent`."""

    def rejected(self, control_id: str, code: str, text: str, now: float | None = None) -> list[str]:
        """The receiver refused it: `rejected`, and the patient's later pending messages `cancelled` (their
        control ids are returned), in one transaction."""

    def patients_billed_for(self, procedure: str) -> set[str]:
        """Patients with a message whose charges bill `procedure` (a deleted Procedure's charges to reverse)."""

    def holds(self, patient: str) -> list[LedgerMessage]:
        """The patient's rejected messages not released since (sequence order): while any, nothing new is sent."""

    def release(self, patients: Collection[str], now: float | None = None) -> None:
        """Release the patients' rejections recorded so far (their review entries are being replayed)."""

    def counts(self) -> dict[str, int]:
        """Messages by status."""

    def close(self) -> None: ...


# -- memory ---------------------------------------------------------------------------------------------------

class MemoryLedger:
    """Thread-safe and process-local: one lock makes every method atomic."""

    def __init__(self) -> None:
        self.location = "memory:"
        self._lock = threading.RLock()
        self._seq = itertools.count(1)
        self._messages: dict[str, LedgerMessage] = {}
        self._released: dict[str, int] = {}
        """patient -> the sequence number up to which its rejections are released."""

    def record(self, messages: Sequence[NewMessage], now: float | None = None) -> list[LedgerMessage]:
        now = time.time() if now is None else now
        out = []
        with self._lock:
            for new in messages:
                stored = self._messages.get(new.control_id)
                if stored is None:
                    stored = LedgerMessage(**_fields_of(new), seq=next(self._seq), created_at=now)
                    self._messages[new.control_id] = stored
                out.append(stored)
        return out

    def _sorted(self, keep: Callable[[LedgerMessage], bool]) -> list[LedgerMessage]:
        now = time.time()
        with self._lock:
            return sorted((replace(m, due=m.not_before <= now) for m in self._messages.values() if keep(m)),
                          key=lambda m: m.seq)

    def pending(self, patient: str | None = None, limit: int = 1000) -> list[LedgerMessage]:
        return self._sorted(lambda m: m.status == MessageStatus.PENDING
                            and (patient is None or m.patient == patient))[:limit]

    def history(self, patient: str) -> list[LedgerMessage]:
        return self._sorted(lambda m: m.patient == patient)

    def message(self, control_id: str) -> LedgerMessage | None:
        with self._lock:
            return self._messages.get(control_id)

    def attempt_failed(self, control_id: str, error: str, retry_in: float = 0.0) -> None:
        with self._lock:
            stored = self._messages.get(control_id)
            if stored is not None and stored.status == MessageStatus.PENDING:
                now = time.time()
                self._messages[control_id] = replace(stored, attempts=stored.attempts + 1, last_error=error,
                                                     not_before=now + retry_in, last_attempt_at=now)

    def unreached(self, control_id: str, error: str) -> None:
        with self._lock:
            stored = self._messages.get(control_id)
            if stored is not None and stored.status == MessageStatus.PENDING:
                self._messages[control_id] = replace(stored, last_error=error, last_attempt_at=time.time())

    def unpark(self, patients: Collection[str]) -> None:
        with self._lock:
            for m in self._sorted(lambda m: m.patient in patients and m.parked):
                self._messages[m.control_id] = replace(m, not_before=0.0, attempts=0)

    def summary(self) -> LedgerSummary:
        return _summary(list(self._sorted(lambda _m: True)), time.time())

    def acknowledged(self, control_id: str, code: str, text: str, now: float | None = None) -> None:
        self._finish(control_id, MessageStatus.SENT, code, text, now)

    def rejected(self, control_id: str, code: str, text: str, now: float | None = None) -> list[str]:
        with self._lock:
            stored = self._finish(control_id, MessageStatus.REJECTED, code, text, now)
            if stored is None:
                return []
            later = [m for m in self._sorted(lambda m: m.patient == stored.patient and m.seq > stored.seq
                                             and m.status == MessageStatus.PENDING)]
            for other in later:
                self._messages[other.control_id] = replace(
                    other, status=MessageStatus.CANCELLED, finished_at=time.time() if now is None else now,
                    last_error=f"cancelled: {control_id} before it was rejected")
            return [m.control_id for m in later]

    def _finish(self, control_id: str, status: str, code: str, text: str, now: float | None) -> LedgerMessage | None:
        with self._lock:
            stored = self._messages.get(control_id)
            if stored is None or stored.status != MessageStatus.PENDING:
                return None
            self._messages[control_id] = replace(stored, status=status, ack_code=code, ack_text=text,
                                                 finished_at=time.time() if now is None else now)
            return stored

    def patients_billed_for(self, procedure: str) -> set[str]:
        return {m.patient for m in self._sorted(lambda m: procedure in m.procedures)}

    def holds(self, patient: str) -> list[LedgerMessage]:
        with self._lock:
            released = self._released.get(patient, 0)
            return self._sorted(lambda m: m.patient == patient and m.status == MessageStatus.REJECTED
                                and m.seq > released)

    def release(self, patients: Collection[str], now: float | None = None) -> None:
        with self._lock:
            for patient in patients:
                seqs = [m.seq for m in self._messages.values() if m.patient == patient]
                if seqs:
                    self._released[patient] = max(seqs)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self._sorted(lambda _m: True):
            out[m.status] = out.get(m.status, 0) + 1
        return out

    def close(self) -> None:
        return None


def _summary(messages: list[LedgerMessage], now: float) -> LedgerSummary:
    pending = [m for m in messages if m.status == MessageStatus.PENDING]
    acked = max((m.finished_at or 0.0 for m in messages if m.status == MessageStatus.SENT), default=None)
    failed = max((m for m in pending if m.last_attempt_at and m.last_error), key=lambda m: m.last_attempt_at or 0.0,
                 default=None)
    return summary_of(len(pending), sum(1 for m in pending if m.parked),
                      min((m.created_at for m in pending), default=None), acked,
                      (failed.last_error, failed.last_attempt_at) if failed else None, now)


def summary_of(pending: int, parked: int, oldest: float | None, last_ack: float | None,
               failed: tuple[Any, Any] | None, now: float) -> LedgerSummary:
    """The summary from counts and times on one clock; a failure older than the latest ACK is over."""
    error, at = failed or (None, None)
    current = error is not None and at is not None and (last_ack is None or at > last_ack)
    return LedgerSummary(int(pending or 0), int(parked or 0), max(0.0, now - oldest) if oldest is not None else None,
                         error if current else None, max(0.0, now - at) if current else None)


def _fields_of(new: NewMessage) -> dict[str, Any]:
    return {name: getattr(new, name) for name in NewMessage.__dataclass_fields__}


# -- SQLite ----------------------------------------------------------------------------------------------------

LEDGER_SCHEMA_VERSION = 3
_SCHEMA = {
    1: [
        "CREATE TABLE IF NOT EXISTS hl7v2_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS hl7v2_message (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
        "control_id TEXT NOT NULL UNIQUE, patient TEXT NOT NULL, session TEXT NOT NULL, kind TEXT NOT NULL, "
        "status TEXT NOT NULL, text TEXT NOT NULL, visit TEXT NOT NULL, charges TEXT NOT NULL, "
        "procedures TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, "
        "finished_at REAL, ack_code TEXT, ack_text TEXT, last_error TEXT)",
        "CREATE INDEX IF NOT EXISTS hl7v2_message_patient ON hl7v2_message (patient, seq)",
        "CREATE INDEX IF NOT EXISTS hl7v2_message_status ON hl7v2_message (status, seq)",
    ],
    2: [  # rejections released by `review replay`: a patient's rejected messages up to `seq` hold nothing
        "CREATE TABLE IF NOT EXISTS hl7v2_release (patient TEXT PRIMARY KEY, seq INTEGER NOT NULL, "
        "released_at REAL NOT NULL)",
    ],
    3: [  # resends back off per message; a message that is never acknowledged waits in review (PARKED)
        "ALTER TABLE hl7v2_message ADD COLUMN not_before REAL NOT NULL DEFAULT 0",
        "ALTER TABLE hl7v2_message ADD COLUMN last_attempt_at REAL",
    ],
}
"""Schema steps of the ledger's own tables (`hl7v2_meta` holds its version), apart from the state's."""
_COLUMNS = ("control_id, patient, session, kind, text, visit, charges, procedures, seq, status, attempts, "
            "created_at, finished_at, ack_code, ack_text, last_error, not_before, last_attempt_at")

T = TypeVar("T")


def _translated(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(self: SqliteLedger, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise
        except sqlite3.Error as exc:
            text = str(exc).lower()
            if isinstance(exc, sqlite3.OperationalError) and "malformed" not in text and "corrupt" not in text:
                raise StateUnavailable(self.location, f"HL7 v2 ledger: {exc}") from None
            raise StateCorrupt(self.location, f"HL7 v2 ledger: the file is damaged ({exc})") from None
        except OSError as exc:
            raise StateUnavailable(self.location, f"HL7 v2 ledger: {exc.strerror or exc}") from None

    return wrapper


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class SqliteLedger:
    """The ledger in the SQLite state file (WAL, `synchronous=FULL`), one connection per thread."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path).expanduser().resolve()
        self.location = str(self.path)
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._migrate()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA synchronous=FULL")  # a message recorded as pending must survive power loss
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    @_translated
    def _migrate(self) -> None:
        self._db().execute("PRAGMA journal_mode=WAL")
        with self._tx() as db:
            db.execute(_SCHEMA[1][0])
            row = db.execute("SELECT value FROM hl7v2_meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > LEDGER_SCHEMA_VERSION:
                raise StateSchemaError(self.location, f"HL7 v2 ledger schema {version} is newer than this adapter "
                                                      f"({LEDGER_SCHEMA_VERSION}): upgrade the adapter")
            for step in range(version + 1, LEDGER_SCHEMA_VERSION + 1):
                for statement in _SCHEMA[step]:
                    db.execute(statement)
            db.execute("INSERT INTO hl7v2_meta VALUES ('schema_version', ?) ON CONFLICT(key) DO UPDATE SET "
                       "value=excluded.value", (str(LEDGER_SCHEMA_VERSION),))

    @staticmethod
    def _message(row: tuple[Any, ...]) -> LedgerMessage:
        (control_id, patient, session, kind, text, visit, charges, procedures, seq, status, attempts, created_at,
         finished_at, ack_code, ack_text, last_error, not_before, last_attempt_at, due) = row
        return LedgerMessage(control_id, patient, session, kind, text, json.loads(visit),
                             tuple(json.loads(charges)), tuple(json.loads(procedures)), seq, status, attempts,
                             created_at, finished_at, ack_code, ack_text, last_error, float(not_before),
                             last_attempt_at, bool(due))

    def _select(self, where: str, args: tuple[Any, ...], db: sqlite3.Connection | None = None) -> list[LedgerMessage]:
        rows = (db or self._db()).execute(f"SELECT {_COLUMNS}, not_before <= ? FROM hl7v2_message WHERE {where}",
                                          (time.time(), *args)).fetchall()
        return [self._message(r) for r in rows]

    @_translated
    def record(self, messages: Sequence[NewMessage], now: float | None = None) -> list[LedgerMessage]:
        now = time.time() if now is None else now
        with self._tx() as db:
            for new in messages:
                db.execute(
                    "INSERT INTO hl7v2_message (control_id, patient, session, kind, status, text, visit, charges, "
                    "procedures, created_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?) "
                    "ON CONFLICT(control_id) DO NOTHING",
                    (new.control_id, new.patient, new.session, new.kind, new.text, _json(new.visit),
                     _json(list(new.charges)), _json(list(new.procedures)), now))
            stored = {m.control_id: m for m in self._select(
                f"control_id IN ({','.join('?' * len(messages))})", tuple(m.control_id for m in messages), db)} \
                if messages else {}
        return [stored[m.control_id] for m in messages]

    @_translated
    def pending(self, patient: str | None = None, limit: int = 1000) -> list[LedgerMessage]:
        if patient is None:
            return self._select("status='pending' ORDER BY seq LIMIT ?", (limit,))
        return self._select("status='pending' AND patient=? ORDER BY seq LIMIT ?", (patient, limit))

    @_translated
    def history(self, patient: str) -> list[LedgerMessage]:
        return self._select("patient=? ORDER BY seq", (patient,))

    @_translated
    def message(self, control_id: str) -> LedgerMessage | None:
        found = self._select("control_id=?", (control_id,))
        return found[0] if found else None

    @_translated
    def attempt_failed(self, control_id: str, error: str, retry_in: float = 0.0) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE hl7v2_message SET attempts=attempts+1, last_error=?, not_before=?, last_attempt_at=? "
                       "WHERE control_id=? AND status='pending'", (error, now + retry_in, now, control_id))

    @_translated
    def unreached(self, control_id: str, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE hl7v2_message SET last_error=?, last_attempt_at=? WHERE control_id=? AND "
                       "status='pending'", (error, time.time(), control_id))

    @_translated
    def unpark(self, patients: Collection[str]) -> None:
        with self._tx() as db:
            db.executemany("UPDATE hl7v2_message SET not_before=0, attempts=0 WHERE patient=? AND status='pending' "
                           "AND not_before=?", [(p, PARKED) for p in sorted(set(patients))])

    @_translated
    def summary(self) -> LedgerSummary:
        db = self._db()
        pending, parked, oldest, last_ack = db.execute(
            "SELECT sum(status='pending'), sum(status='pending' AND not_before=?), "
            "min(CASE WHEN status='pending' THEN created_at END), max(CASE WHEN status='sent' THEN finished_at END) "
            "FROM hl7v2_message", (PARKED,)).fetchone()
        failed = db.execute("SELECT last_error, last_attempt_at FROM hl7v2_message WHERE status='pending' AND "
                            "last_error IS NOT NULL AND last_attempt_at IS NOT NULL ORDER BY last_attempt_at DESC "
                            "LIMIT 1").fetchone()
        return summary_of(pending, parked, oldest, last_ack, failed, time.time())

    @_translated
    def acknowledged(self, control_id: str, code: str, text: str, now: float | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE hl7v2_message SET status='sent', ack_code=?, ack_text=?, finished_at=? "
                       "WHERE control_id=? AND status='pending'",
                       (code, text, time.time() if now is None else now, control_id))

    @_translated
    def rejected(self, control_id: str, code: str, text: str, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT patient, seq FROM hl7v2_message WHERE control_id=? AND status='pending'",
                             (control_id,)).fetchone()
            if row is None:
                return []
            db.execute("UPDATE hl7v2_message SET status='rejected', ack_code=?, ack_text=?, finished_at=? "
                       "WHERE control_id=?", (code, text, now, control_id))
            later = [r[0] for r in db.execute("SELECT control_id FROM hl7v2_message WHERE patient=? AND seq>? AND "
                                              "status='pending' ORDER BY seq", row).fetchall()]
            db.executemany("UPDATE hl7v2_message SET status='cancelled', finished_at=?, last_error=? "
                           "WHERE control_id=?",
                           [(now, f"cancelled: {control_id} before it was rejected", c) for c in later])
        return later

    @_translated
    def patients_billed_for(self, procedure: str) -> set[str]:
        rows = self._db().execute("SELECT DISTINCT m.patient FROM hl7v2_message m, json_each(m.procedures) p "
                                  "WHERE p.value=?", (procedure,)).fetchall()
        return {r[0] for r in rows}

    @_translated
    def holds(self, patient: str) -> list[LedgerMessage]:
        return self._select("patient=? AND status='rejected' AND seq > coalesce((SELECT seq FROM hl7v2_release r "
                            "WHERE r.patient=hl7v2_message.patient), 0) ORDER BY seq", (patient,))

    @_translated
    def release(self, patients: Collection[str], now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            for patient in sorted(set(patients)):
                db.execute("INSERT INTO hl7v2_release (patient, seq, released_at) SELECT patient, max(seq), ? "
                           "FROM hl7v2_message WHERE patient=? GROUP BY patient ON CONFLICT(patient) DO UPDATE "
                           "SET seq=excluded.seq, released_at=excluded.released_at", (now, patient))

    @_translated
    def counts(self) -> dict[str, int]:
        return dict(self._db().execute("SELECT status, count(*) FROM hl7v2_message GROUP BY status").fetchall())

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
