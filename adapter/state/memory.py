"""The state contract in memory, for tests of the worker and runner in one process (`state: memory:`).

Nothing survives the process. One lock makes every method atomic, which is all the contract asks.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from typing import Any

from adapter.errors import InstanceLocked, LeadLost
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
)


@dataclass
class _Row:
    item: WorkItem
    status: str = "pending"
    lease_until: float = 0.0
    finished_at: float = 0.0
    leased_by: str = ""


class MemoryState:
    """Thread-safe, process-local state.

    `shared=True` plays a replica-capable backend inside one process: `replica()` opens another handle on the
    same data with an instance id of its own, as another process on a shared database would.
    """

    def __init__(self, *, lease_seconds: float = 300.0, instance_id: str | None = None, shared: bool = False) -> None:
        self.location = "memory:"
        self.shared = shared
        self.instance_id = instance_id or new_instance_id()
        self.lease_seconds = lease_seconds
        self._lock = threading.RLock()
        self._installation = uuid.uuid4().hex
        self._cursors: dict[str, str] = {}
        self._processed: dict[tuple[str, str], str] = {}
        self._queue: dict[int, _Row] = {}
        self._ids = itertools.count(1)
        self._review_ids = itertools.count(1)
        self._reviews: dict[int, ReviewEntry] = {}
        self._review_actions: list[ReviewAction] = []
        self._audit: list[tuple[float, AuditRecord]] = []
        self._events: dict[str, int] = {}
        self._claims: dict[str, tuple[str, float]] = {}
        self._replicas: dict[str, list[float]] = {}
        self._leads: dict[str, tuple[str, float]] = {}
        self._lock_holder: list[bool] = [False]

    def replica(self, instance_id: str | None = None) -> MemoryState:
        """Another handle on the same data, for another replica in the same process."""
        other = copy.copy(self)  # the containers (and the lock) are shared, not copied
        other.instance_id = instance_id or new_instance_id()
        return other

    def acquire_instance_lock(self) -> None:
        with self._lock:
            if self.shared:
                self._heartbeat(time.time())
                return
            if self._lock_holder[0]:
                raise InstanceLocked(self.location, "another run/serve is using this state")
            self._lock_holder[0] = True

    def close(self) -> None:
        pass

    def installation_id(self) -> str:
        return self._installation

    # -- cursors and processed versions --------------------------------------------------------------------------

    def cursor(self, name: str = "poll") -> str | None:
        with self._lock:
            return self._cursors.get(name)

    def set_cursor(self, value: str, name: str = "poll") -> None:
        with self._lock:
            self._cursors[name] = value

    def seen(self, procedure: str, version: str) -> bool:
        with self._lock:
            return (procedure, version) in self._processed

    # -- work queue ------------------------------------------------------------------------------------------

    def enqueue(self, items: list[WorkItem], *, event: tuple[str, int] | None = None,
                timeout: float | None = None) -> list[int]:
        check_kinds(items)
        _check_json(item.payload for item in items)
        with self._lock:
            ids = [self._enqueue_one(item, time.time()) for item in items]
            if event is not None:
                self._events[event[0]] = max(self._events.get(event[0], event[1]), event[1])
            return ids

    def _enqueue_one(self, item: WorkItem, now: float) -> int:
        if item.dedupe:
            for rid, row in self._queue.items():
                if row.item.dedupe == item.dedupe and row.status == "pending":
                    row.item = replace(row.item, not_before=min(row.item.not_before, item.due_at(now)),
                                       last_error=item.last_error or row.item.last_error)
                    return rid
        rid = next(self._ids)
        self._queue[rid] = _Row(replace(item, id=rid, attempts=0, payload=copy.deepcopy(item.payload),
                                        received_at=item.received_at or now, not_before=item.due_at(now),
                                        delay=None))
        return rid

    def lease(self, limit: int, *, owner: str = "", now: float | None = None) -> list[WorkItem]:
        now = time.time() if now is None else now
        out = []
        with self._lock:
            for rid in sorted(self._queue):
                row = self._queue[rid]
                if len(out) >= limit:
                    break
                due = row.status == "pending" and row.item.not_before <= now
                if due or (row.status == "leased" and row.lease_until < now):
                    row.status, row.lease_until = "leased", now + self.lease_seconds
                    row.leased_by = owner or self.instance_id
                    row.item = replace(row.item, attempts=row.item.attempts + 1)
                    out.append(replace(row.item, payload=copy.deepcopy(row.item.payload)))
        return out

    def ack(self, ids: Collection[int]) -> None:
        with self._lock:
            self._ack(ids, time.time())

    def _ack(self, ids: Collection[int], now: float) -> None:
        for i in ids:
            if i in self._queue:
                self._queue[i].status, self._queue[i].finished_at = "done", now

    def retry(self, retries: Collection[Retry]) -> None:
        with self._lock:
            self._retry(retries, time.time())

    def _retry(self, retries: Collection[Retry], now: float) -> None:
        for r in retries:
            if r.id in self._queue:
                row = self._queue[r.id]
                row.status = "pending"
                row.item = replace(row.item, not_before=r.due_at(now), last_error=r.error)

    def dead_letter(self, ids: Collection[int], error: str, reviews: Iterable[NewReview] = ()) -> None:
        reviews = list(reviews)
        _check_json([r.resources for r in reviews])
        with self._lock:
            self._dead([(i, error) for i in ids], time.time())
            for review in reviews:
                self._open_review(review, time.time())

    def _dead(self, dead: Collection[tuple[int, str]], now: float) -> None:
        for i, error in dead:
            if i in self._queue:
                row = self._queue[i]
                row.status, row.finished_at = "failed", now
                row.item = replace(row.item, last_error=error)

    def queue_counts(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for row in self._queue.values():
                counts[row.status] = counts.get(row.status, 0) + 1
            return counts

    def queue_depth(self) -> int:
        with self._lock:
            return sum(1 for row in self._queue.values() if row.status in ("pending", "leased"))

    def queued(self, limit: int = 100) -> list[WorkItem]:
        with self._lock:
            return [row.item for _, row in sorted(self._queue.items())
                    if row.status in ("pending", "leased")][:limit]

    # -- a pass ------------------------------------------------------------------------------------------------

    def record_pass(self, record: PassRecord) -> None:
        check_kinds(record.due)
        _check_json([*(item.payload for item in record.due), *(r.resources for r in record.reviews)])
        now = time.time()
        with self._lock:
            if record.lead and not self._holds(record.lead, record.owner, now):
                raise LeadLost(self.location, f"{record.owner} no longer holds the {record.lead!r} role")
            for item in record.due:
                self._enqueue_one(item, now)
            for review in record.reviews:
                self._open_review(review, now)
            self._resolve(record.resolve, record.keep, now)
            for rid in record.resolve_ids:
                entry = self._reviews.get(rid)
                if entry is not None and entry.status == "open":
                    self._reviews[rid] = replace(entry, status="resolved", last_seen=now)
            for p in record.processed:
                self._processed[(p.procedure, p.version)] = str(p.outcome)
            self._audit += [(now, a) for a in record.audit]
            self._cursors.update(record.cursors)
            self._ack(record.acked, now)
            self._retry(record.retried, now)
            self._dead(record.dead, now)
            for patient in record.release:
                if self._claims.get(patient, ("", 0.0))[0] == record.owner:
                    del self._claims[patient]

    def claim_patients(self, patients: Collection[str], owner: str, seconds: float,
                       now: float | None = None) -> set[str]:
        now = time.time() if now is None else now
        granted = set()
        with self._lock:
            for patient in set(patients):
                holder, until = self._claims.get(patient, ("", 0.0))
                if not holder or holder == owner or until < now:
                    self._claims[patient] = (owner, now + seconds)
                    granted.add(patient)
        return granted

    def release_patients(self, patients: Collection[str], owner: str) -> None:
        with self._lock:
            for patient in patients:
                if self._claims.get(patient, ("", 0.0))[0] == owner:
                    del self._claims[patient]

    # -- roles ---------------------------------------------------------------------------------------------------

    def lead(self, role: str, owner: str, seconds: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._lock:
            holder, until = self._leads.get(role, ("", 0.0))
            if holder and holder != owner and until >= now:
                return False
            self._leads[role] = (owner, now + seconds)
            return True

    def _holds(self, role: str, owner: str, now: float) -> bool:
        holder, until = self._leads.get(role, ("", 0.0))
        return holder == owner and until >= now

    def resign(self, role: str, owner: str) -> None:
        with self._lock:
            if self._leads.get(role, ("", 0.0))[0] == owner:
                del self._leads[role]

    def replicas(self, now: float | None = None) -> list[ReplicaInfo]:
        now = time.time() if now is None else now
        with self._lock:
            def count(pairs: Iterable[tuple[str, float]], instance: str) -> int:
                return sum(1 for holder, until in pairs if holder == instance and until >= now)

            out = []
            for instance, (started, seen) in self._replicas.items():
                roles = tuple(sorted(r for r, (holder, until) in self._leads.items()
                                     if holder == instance and until >= now))
                leased = count(((row.leased_by, row.lease_until) for row in self._queue.values()
                                if row.status == "leased"), instance)
                out.append(ReplicaInfo(instance, started, seen, roles, count(self._claims.values(), instance), leased))
            return sorted(out, key=lambda r: (-r.last_seen, r.instance))

    # -- topic subscription event numbers --------------------------------------------------------------------------

    def last_event_number(self, subscription: str) -> int | None:
        with self._lock:
            return self._events.get(subscription)

    def set_event_number(self, subscription: str, number: int) -> None:
        with self._lock:
            self._events[subscription] = max(self._events.get(subscription, number), number)

    # -- review queue ----------------------------------------------------------------------------------------

    def open_review(self, review: NewReview) -> None:
        _check_json([review.resources])
        with self._lock:
            self._open_review(review, time.time())

    def _open_review(self, review: NewReview, now: float) -> None:
        for rid, entry in self._reviews.items():
            if entry.status == "open" and (entry.procedure, entry.reason) == (review.procedure, review.reason):
                self._reviews[rid] = replace(
                    entry, detail=review.detail, kind=str(review.kind), attempts=entry.attempts + 1, last_seen=now,
                    patients=review.patients or entry.patients, resources=review.resources or entry.resources)
                return
        rid = next(self._review_ids)
        self._reviews[rid] = ReviewEntry(rid, review.procedure, tuple(review.patients), str(review.kind),
                                         review.reason, review.detail, "open", 1, now, now,
                                         copy.deepcopy(tuple(review.resources)))

    def _resolve(self, procedures: Collection[str], keep: Collection[tuple[str, str]], now: float) -> None:
        wanted = set(procedures)
        for rid, entry in list(self._reviews.items()):
            if entry.status == "open" and entry.procedure in wanted and (entry.procedure, entry.reason) not in keep:
                self._reviews[rid] = replace(entry, status="resolved", last_seen=now)

    def dismiss_review(self, review_id: int, actor: str, note: str = "") -> bool:
        with self._lock:
            entry = self._reviews.get(review_id)
            if entry is None or entry.status != "open":
                return False
            now = time.time()
            self._reviews[review_id] = replace(entry, status="dismissed", last_seen=now)
            self._review_actions.append(ReviewAction(review_id, now, actor, "dismiss", note))
            return True

    def record_review_action(self, action: ReviewAction) -> None:
        with self._lock:
            self._review_actions.append(action)

    def review_actions(self, review_id: int) -> list[ReviewAction]:
        with self._lock:
            return [a for a in self._review_actions if a.review_id == review_id]

    def reviews(self, status: str | None = "open") -> list[ReviewEntry]:
        with self._lock:
            return [e for _, e in sorted(self._reviews.items()) if status is None or e.status == status]

    def review(self, review_id: int) -> ReviewEntry | None:
        with self._lock:
            return self._reviews.get(review_id)

    # -- audit ---------------------------------------------------------------------------------------------------

    def audit_for(self, procedure: str) -> list[AuditRecord]:
        with self._lock:
            return [a for _, a in self._audit if a.procedure == procedure]

    # -- health and housekeeping -----------------------------------------------------------------------------------

    def heartbeat(self, now: float | None = None, *, timeout: float | None = None) -> float:
        with self._lock:
            self._heartbeat(time.time() if now is None else now)
        return 0.0

    def _heartbeat(self, now: float) -> None:
        started = self._replicas.get(self.instance_id, [now, now])[0]
        self._replicas[self.instance_id] = [started, now]

    def stats(self, now: float | None = None, *, timeout: float | None = None) -> StateStats:
        with self._lock:
            queued = [row for row in self._queue.values() if row.status in ("pending", "leased")]
            return StateStats(
                queue_depth=len(queued),
                retry_backlog=sum(1 for row in queued if row.status == "pending" and row.item.attempts > 0),
                oldest_queued_at=min((row.item.received_at for row in queued), default=None),
                dead=sum(1 for row in self._queue.values() if row.status == "failed"),
                reviews_open=sum(1 for e in self._reviews.values() if e.status == "open"),
                cursor=self._cursors.get("poll"), read_at=time.time() if now is None else now)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"processed": len(self._processed),
                    "review_open": sum(1 for e in self._reviews.values() if e.status == "open"),
                    "audit": len(self._audit), "queue_depth": self.queue_depth()}

    def prune(self, done_before: float, audit_before: float) -> dict[str, int]:
        with self._lock:
            done = [i for i, row in self._queue.items() if row.status == "done" and row.finished_at < done_before]
            for i in done:
                del self._queue[i]
            before = len(self._audit)
            self._audit[:] = [(at, a) for at, a in self._audit if at >= audit_before]
            now = time.time()
            expired = [p for p, (_, until) in self._claims.items() if until < now]
            for p in expired:
                del self._claims[p]
            for role in [r for r, (_, until) in self._leads.items() if until < now]:
                del self._leads[role]
            for instance in [i for i, (_, seen) in self._replicas.items() if seen < done_before]:
                del self._replicas[instance]
            return {"queue": len(done), "audit": before - len(self._audit), "claims": len(expired)}

    # handy for tests: what was processed, by outcome
    def processed(self) -> dict[tuple[str, str], str]:
        with self._lock:
            return dict(self._processed)



def _check_json(values: Iterable[Any]) -> None:
    """Payloads and resources must be JSON, as every durable backend stores them (checked before any change)."""
    for value in values:
        json.dumps(value)
