"""The state contract: what the service needs from durable storage, independent of where it is kept.

Every method is one transaction: it happens completely or not at all, whatever kills the process. Methods
are coarse and named for their intent (`record_pass`, `lease`, `retry`, `dead_letter`) so a backend can
implement each as a single statement batch. Backends translate their driver's errors into the
`adapter.errors.StateError` family at their boundary; nothing else in the adapter sees a driver exception.

Backends: `adapter.state.sqlite` (one file, one running instance: the default), `adapter.state.memory`
(tests), `adapter.state.postgres` (several replicas on one database). What replicas need is part of the
contract and every backend implements it: an `instance_id` per process, work leases that expire (`lease`),
patient claims that expire (`claim_patients`), roles held by one replica at a time under a lease (`lead`:
the poller), and a heartbeat per replica (`replicas` lists them). A backend says with `shared` whether
several processes may run on it at once.

Times are Unix seconds; `now` arguments exist so tests need not wait. Stored times that are compared with each
other come from one clock, the state's (the database server's, in the transaction, for PostgreSQL): a wait
is given as a `delay` and turned into a time there, never computed from a replica's own clock.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable


class WorkKind(StrEnum):
    """What a queued work item asks for (its payload in brackets)."""

    PROCEDURE = "procedure"
    """{"resource": Procedure}: a notification with the resource, or a Procedure an engine pushed."""
    DELETE = "delete"
    """{"reference": "Procedure/x"}: the Procedure is gone; recode the patients it was billed to."""
    FETCH = "fetch"
    """{"reference": "Procedure/x"}: an id-only notification; read the Procedure from the server."""
    POLL = "poll"
    """{"reason": ...}: something changed and only a poll can tell what (ping, empty event, event gap)."""
    RESOURCES = "resources"
    """{"resources": [...]}: a Bundle an engine pushed; its resources replace the server's copies."""
    PATIENT = "patient"
    """{"reference": "Patient/x"}: recode this patient from the server (a failed write being retried)."""


class ReviewKind(StrEnum):
    NEEDS_REVIEW = "needs-review"
    """The engine could not code a Procedure with confidence (its reason says why)."""
    WRITE_REJECTED = "write-rejected"
    """The FHIR server refused the charges for a reason in our data (4xx): retrying cannot help."""
    PROCESSING_FAILED = "processing-failed"
    """Received work failed with an unexpected error `worker.max_attempts` times (a bug)."""
    WRITE_FAILED = "write-failed"
    """Written by adapters before 0.2 for any failed write; still shown and replayed."""


class Outcome(StrEnum):
    """What happened to one Procedure version in a pass."""

    CODED = "coded"
    NO_CHARGE = "no-charge"
    REVIEW = "review"
    FAILED = "failed"
    """The server rejected its session's charges (a data problem, reviewed)."""
    RETRY = "retry"
    """Its session could not be written for a passing reason: not recorded, its patient stays due."""
    DEFERRED = "deferred"
    """Not written because the process was stopping: done on the next pass."""
    DELETED = "deleted"


RECORDED_OUTCOMES = frozenset({Outcome.CODED, Outcome.NO_CHARGE, Outcome.REVIEW, Outcome.FAILED, Outcome.DELETED})


@dataclass(frozen=True)
class WorkItem:
    """One unit of queued work (see `WorkKind` for payloads).

    `dedupe`: while an item with the same key is queued, enqueueing another only brings the queued one's
    `not_before` forward (patient retries use `patient:Patient/x`). `attempts` counts leases, including
    the current one; `not_before` is when the item may run again after a failure.
    """

    kind: str
    payload: dict[str, Any]
    source: str
    id: int = 0
    attempts: int = 0
    dedupe: str | None = None
    not_before: float = 0.0
    last_error: str | None = None
    received_at: float = 0.0
    delay: float | None = None
    """Seconds from the state's clock, when it is stored, until the item may run (set instead of `not_before`)."""

    def due_at(self, now: float) -> float:
        """`not_before` on the state's clock `now` (the time of the storing transaction)."""
        return now + self.delay if self.delay is not None else self.not_before


@dataclass(frozen=True)
class Retry:
    """Put a leased item back: it runs again at `not_before` (or `delay` seconds after the state's clock at
    storing), with `error` kept as its reason."""

    id: int
    not_before: float
    error: str
    delay: float | None = None

    def due_at(self, now: float) -> float:
        return now + self.delay if self.delay is not None else self.not_before


@dataclass(frozen=True)
class NewReview:
    """An entry to open (or refresh, when one for the same Procedure and reason is open).

    `patients` are what `review replay` recodes; `resources` is pushed content (an engine's Procedure or
    Bundle) that replay re-applies exactly as it was received.
    """

    procedure: str
    kind: str
    reason: str
    detail: str
    patients: tuple[str, ...] = ()
    resources: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class ReviewEntry:
    id: int
    procedure: str
    patients: tuple[str, ...]
    kind: str
    reason: str
    detail: str
    status: str
    attempts: int
    first_seen: float
    last_seen: float
    resources: tuple[dict[str, Any], ...] = ()

    @property
    def patient(self) -> str | None:
        return self.patients[0] if self.patients else None


@dataclass(frozen=True)
class ReviewAction:
    """Who did what to a review entry (a dismissal with its note, a replay asked for): the worklist's audit."""

    review_id: int
    at: float
    actor: str
    """`web:<login>`, `task:Task/<id>/_history/<n>` or `cli`."""
    action: str
    """`dismiss` or `replay`."""
    note: str = ""


@dataclass(frozen=True)
class Processed:
    """A Procedure version whose outcome is final (see `RECORDED_OUTCOMES`)."""

    procedure: str
    version: str
    outcome: str


@dataclass(frozen=True)
class AuditRecord:
    """Procedure version -> codes -> code-table version -> written resources (`Type/id/_history/n`)."""

    procedure: str
    version: str | None
    session: str | None
    codes: tuple[str, ...]
    table_version: str
    written: tuple[str, ...]


@dataclass
class PassRecord:
    """Everything one pass decided, written by `record_pass` in one transaction.

    A kill before it leaves nothing of the pass (the work is redone: writes are idempotent); a kill after
    it leaves all of it. Order inside: new work and reviews, resolutions, processed versions, audit,
    cursors, the fate of the leased items, released claims.
    """

    processed: list[Processed] = field(default_factory=list)
    reviews: list[NewReview] = field(default_factory=list)
    resolve: list[str] = field(default_factory=list)
    """Procedures whose open review entries are closed, except the (procedure, reason) pairs in `keep`."""
    keep: set[tuple[str, str]] = field(default_factory=set)
    resolve_ids: list[int] = field(default_factory=list)
    """Review entries closed by id (replayed work that now went through)."""
    audit: list[AuditRecord] = field(default_factory=list)
    due: list[WorkItem] = field(default_factory=list)
    """New work, typically patients to retry (with `dedupe` and `not_before`)."""
    cursors: dict[str, str] = field(default_factory=dict)
    acked: list[int] = field(default_factory=list)
    retried: list[Retry] = field(default_factory=list)
    dead: list[tuple[int, str]] = field(default_factory=list)
    release: list[str] = field(default_factory=list)
    """Patients whose claims by `owner` end."""
    owner: str = ""
    lead: str | None = None
    """A role (`lead`) `owner` must still hold when the record commits, else nothing is written (LeadLost): a
    poller that lost its role while paused never moves the shared cursor under its successor."""


@dataclass(frozen=True)
class StateStats:
    """What health checks and metrics need, read in one go."""

    queue_depth: int
    """Pending and leased items."""
    retry_backlog: int
    """Queued items that failed at least once and wait for their retry."""
    oldest_queued_at: float | None
    """When the oldest pending or leased item was received."""
    dead: int
    reviews_open: int
    cursor: str | None
    read_at: float | None = None
    """The state's clock when these were read (the database server's, for PostgreSQL): ages are computed
    against it, never against the local clock (None: the local clock)."""


@dataclass(frozen=True)
class ReplicaInfo:
    """One process that worked on this state, as `status` shows it."""

    instance: str
    started: float
    last_seen: float
    """Its last heartbeat (every few seconds while it runs)."""
    roles: tuple[str, ...] = ()
    """Roles it holds under an unexpired lease (`poll`)."""
    claims: int = 0
    """Patients it holds under an unexpired claim (being recoded now)."""
    leased: int = 0
    """Work items it holds under an unexpired lease."""


@runtime_checkable
class StateBackend(Protocol):
    """What every state backend provides (see the module docstring for the transaction rules)."""

    location: str
    """Where the state lives, for messages (a resolved file path, a URL without credentials)."""
    instance_id: str
    """This process's identity among replicas: host, pid and a random part."""
    shared: bool
    """True when several `run`/`serve` processes may work on this state at once (replicas): polling then only
    queues the changed patients, under the `poll` role, and every replica's worker codes them."""

    # -- lifetime ------------------------------------------------------------------------------------------

    def acquire_instance_lock(self) -> None:
        """Make sure no other process runs `run`/`serve` where that is unsafe (one SQLite file: one process);
        raises InstanceLocked. Held until the process ends. Replica-capable backends register the instance."""

    def close(self) -> None:
        """Release this thread's connection (others close with the process)."""

    def installation_id(self) -> str:
        """A random id created with the state and never changed (the key for hashed patient references)."""

    # -- cursors and processed versions ----------------------------------------------------------------------

    def cursor(self, name: str = "poll") -> str | None: ...

    def set_cursor(self, value: str, name: str = "poll") -> None: ...

    def seen(self, procedure: str, version: str) -> bool:
        """True when this Procedure version has a final outcome (see `RECORDED_OUTCOMES`)."""

    # -- work queue ----------------------------------------------------------------------------------------

    def enqueue(self, items: list[WorkItem], *, event: tuple[str, int] | None = None,
                timeout: float | None = None) -> list[int]:
        """Persist received work (durable when this returns: acknowledge the sender only then).

        An item with a `dedupe` key merges into a *pending* item with the same key (its `not_before` moves
        forward, never back); an item with that key that is leased is being worked on with what was read
        before, so a new pending item is queued beside it.

        `event`: (subscription, event number) stored with the items, never moving back. `timeout`: the longest
        wait for a busy state before StateUnavailable (the receiver's request deadline).
        """

    def lease(self, limit: int, *, owner: str = "", now: float | None = None) -> list[WorkItem]:
        """Up to `limit` items that are due (`not_before` passed), oldest first, or whose lease ran out because
        their worker died; each lease counts as an attempt."""

    def ack(self, ids: Collection[int]) -> None:
        """These items are done."""

    def retry(self, retries: Collection[Retry]) -> None:
        """Put leased items back with their own `not_before` and reason."""

    def dead_letter(self, ids: Collection[int], error: str, reviews: Iterable[NewReview] = ()) -> None:
        """Give items up and open review entries for a person to decide on, together."""

    def queue_counts(self) -> dict[str, int]:
        """Items by status: pending, leased, done, failed."""

    def queue_depth(self) -> int: ...

    def queued(self, limit: int = 100) -> list[WorkItem]:
        """Pending and leased items, oldest first (for status output and tests)."""

    # -- a pass ----------------------------------------------------------------------------------------------

    def record_pass(self, record: PassRecord) -> None:
        """Write everything one pass decided, in one transaction."""

    def claim_patients(self, patients: Collection[str], owner: str, seconds: float,
                       now: float | None = None) -> set[str]:
        """Claim patients for `seconds`; returns those granted (unclaimed, expired, or already `owner`'s).
        Two replicas never recode one patient at the same time."""

    def release_patients(self, patients: Collection[str], owner: str) -> None: ...

    # -- roles held by one replica at a time -------------------------------------------------------------------

    def lead(self, role: str, owner: str, seconds: float, now: float | None = None) -> bool:
        """Take or renew `role` for `seconds`; True when `owner` holds it now (it was free, expired, or its own).
        A holder that dies loses it when the lease runs out."""

    def resign(self, role: str, owner: str) -> None:
        """Give `role` up at once (a clean stop), if `owner` holds it."""

    def replicas(self, now: float | None = None) -> list[ReplicaInfo]:
        """Every instance with a heartbeat, newest first, with the roles, claims and leases it holds now."""

    # -- topic subscription event numbers ----------------------------------------------------------------------

    def last_event_number(self, subscription: str) -> int | None: ...

    def set_event_number(self, subscription: str, number: int) -> None:
        """Remember the highest event number seen (never moves back)."""

    # -- review queue ----------------------------------------------------------------------------------------

    def open_review(self, review: NewReview) -> None:
        """Add or refresh an entry (attempts + 1, newest detail)."""

    def reviews(self, status: str | None = "open") -> list[ReviewEntry]: ...

    def review(self, review_id: int) -> ReviewEntry | None: ...

    def dismiss_review(self, review_id: int, actor: str, note: str = "") -> bool:
        """Close an open entry as `dismissed` (nobody will fix it: a coder decided) and audit it, together.
        False when it was not open (resolved or dismissed before)."""

    def record_review_action(self, action: ReviewAction) -> None:
        """Audit an action on an entry that changes no status by itself (a replay asked for)."""

    def review_actions(self, review_id: int) -> list[ReviewAction]:
        """The entry's actions, oldest first."""

    # -- audit -----------------------------------------------------------------------------------------------

    def audit_for(self, procedure: str) -> list[AuditRecord]: ...

    # -- health and housekeeping ---------------------------------------------------------------------------------

    def heartbeat(self, now: float | None = None, *, timeout: float | None = None) -> float:
        """Record that this instance is alive: a small write that also proves the state is writable, within
        `timeout` seconds (client-side) or StateUnavailable. Returns the local clock minus the state's clock
        (the database server's for PostgreSQL; 0.0 where the state's clock is the local one)."""

    def stats(self, now: float | None = None, *, timeout: float | None = None) -> StateStats: ...

    def counts(self) -> dict[str, int]:
        """processed, review_open, audit, queue_depth."""

    def prune(self, done_before: float, audit_before: float) -> dict[str, int]:
        """Delete done work finished before `done_before`, audit rows older than `audit_before`, expired claims
        and roles, and replicas silent since before `done_before`; then compact what the backend needs
        compacting (SQLite: checkpoint and truncate the WAL). Returns counts by kind (queue, audit, claims)."""


def new_instance_id() -> str:
    """`host:pid:random`: unique per process, readable in a list of replicas."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def owner_alive(owner: str) -> bool:
    """Whether the process behind an instance id (`host:pid:random`) may still run: False only when it was on
    this host and its pid is gone."""
    host, _, rest = owner.partition(":")
    pid_text = rest.split(":", 1)[0]
    if host != socket.gethostname()[:40] or not pid_text.isdigit():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, not ours to signal
        return True
    return True


def patient_work(patient: str, error: str, not_before: float = 0.0, source: str = "retry", *,
                 delay: float | None = None) -> WorkItem:
    """Recode `patient` from the server at `not_before`, or `delay` seconds from the state's clock (at most one
    such item is queued per patient)."""
    return WorkItem(WorkKind.PATIENT, {"reference": patient}, source, dedupe=f"patient:{patient}",
                    not_before=not_before, last_error=error, delay=delay)


def check_kinds(items: Iterable[WorkItem]) -> None:
    known = set(WorkKind)
    for item in items:
        if item.kind not in known:
            raise ValueError(f"unknown work kind {item.kind!r}")
