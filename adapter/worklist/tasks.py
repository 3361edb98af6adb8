"""Review items mirrored as FHIR Tasks, and a coder's actions on them read back.

Each open review entry has one Task on the FHIR server, found by an identifier of ours (system
`{canonical_base}/sid/review-item`, value `{installation id}-{entry id}`), written with a conditional update:
status `requested` (or `in-progress` once someone works on it), intent `order`, focus the Procedure, for the
Patient, code the review reason (CodeSystem review-reason of our conformance package), businessStatus what is
wrong, statusReason what would fix it, input the element to change. Only texts of our own tables go on it: the
detail of an entry (which quotes the input) stays in the adapter's state and on the worklist page.

A turn (`TaskMirror.turn`, in `run`/`serve`'s loops and after `run --once`) first reads what coders did:
a Task set to `cancelled` dismisses its entry (the Task's last note is the dismissal's note); a Task whose
businessStatus is the code `replay` of CodeSystem review-task-status (or the text `replay`) has its entry
replayed. Then it writes what changed: a new entry's Task, a resolved entry's Task as `completed` (coded), a
dismissed one's as `cancelled`. A Task whose managed elements already say what the entry says is not written
again, so a re-run that changes nothing writes no Task version. Elements a coder adds (note, owner, ...) are
kept; an update is conditional on the version read (If-Match), so a coder's concurrent edit is never lost:
the Task is looked at again on the next turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from typing import Any

from adapter.client import FhirClient
from adapter.client.errors import FhirConflict
from adapter.state.base import ReviewAction, ReviewEntry, StateBackend
from adapter.validation import validate_resource
from adapter.worklist.reasons import TASK_INPUTS, TASK_STATUSES, help_for

log = logging.getLogger(__name__)

REPLAY = "replay"
"""The businessStatus code (CodeSystem review-task-status) a coder sets to have the item replayed."""
ACTIVE_STATUSES = ("draft", "requested", "received", "accepted", "ready", "in-progress", "on-hold", "failed",
                   "rejected")
"""Task statuses that are not final: a resolved entry's Task in one of them is completed or cancelled."""
MANAGED = ("identifier", "status", "intent", "code", "focus", "for", "businessStatus", "statusReason", "input",
           "authoredOn")
"""The elements the adapter owns: a Task is written only when one of them differs."""
CHUNK = 40
"""Identifiers per search (`identifier=a,b,...`): short enough for any server's URL limit."""


def task_urls(base: str) -> dict[str, str]:
    base = base.rstrip("/")
    return {"identifier": f"{base}/sid/review-item", "reason": f"{base}/CodeSystem/review-reason",
            "status": f"{base}/CodeSystem/review-task-status", "input": f"{base}/CodeSystem/review-task-input"}


@dataclass
class MirrorResult:
    written: int = 0
    created: int = 0
    dismissed: list[int] = field(default_factory=list)
    replayed: list[int] = field(default_factory=list)
    conflicts: int = 0

    def text(self) -> str:
        return (f"review Tasks: {self.written} written ({self.created} new), {len(self.dismissed)} dismissed and "
                f"{len(self.replayed)} replayed through their Task")


def _instant(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _code_of(concept: Any, system: str) -> str | None:
    for coding in (concept or {}).get("coding") or []:
        if isinstance(coding, dict) and coding.get("system") == system:
            return str(coding.get("code"))
    return None


class TaskMirror:
    """Writes review entries as Tasks and applies coders' Task actions; `replay` recodes entries by id."""

    def __init__(self, client: FhirClient, state: StateBackend, canonical_base: str,
                 replay: Callable[[list[int]], Any]) -> None:
        self.client, self.state, self.replay = client, state, replay
        self.urls = task_urls(canonical_base)
        self._prefix = f"{state.installation_id()}-"

    # -- what a Task says ------------------------------------------------------------------------------------

    def identifier_value(self, entry_id: int) -> str:
        return f"{self._prefix}{entry_id}"

    def entry_id(self, task: dict[str, Any]) -> int | None:
        """The entry a Task of ours mirrors (None: another installation's, or not ours)."""
        for ident in task.get("identifier") or []:
            value = str(ident.get("value") or "")
            if ident.get("system") == self.urls["identifier"] and value.startswith(self._prefix):
                rest = value[len(self._prefix):]
                return int(rest) if rest.isdigit() else None
        return None

    def task_for(self, entry: ReviewEntry, current: dict[str, Any] | None = None) -> dict[str, Any]:
        """The Task for `entry`: the managed elements from the entry, everything else as `current` has it."""
        row = help_for(entry.reason)
        if entry.status == "open":
            working = current is not None and current.get("status") == "in-progress"
            status, business = ("in-progress" if working else "requested"), "waiting"
        elif entry.status == "dismissed":
            status, business = "cancelled", "dismissed"
        else:
            status, business = "completed", "coded"
        reason = {"system": self.urls["reason"], "code": entry.reason, "display": row.display}
        task: dict[str, Any] = {k: v for k, v in (current or {}).items() if k not in ("meta", "text", *MANAGED)}
        task.update({
            "resourceType": "Task",
            "identifier": [{"system": self.urls["identifier"], "value": self.identifier_value(entry.id)}],
            "status": status, "intent": "order",
            "code": {"coding": [reason]},
            "authoredOn": _instant(entry.first_seen),
            "businessStatus": {"coding": [{"system": self.urls["status"], "code": business,
                                           "display": TASK_STATUSES[business][0]}], "text": row.display},
            "statusReason": {"coding": [reason], "text": row.fix},
            "input": [{"type": {"coding": [{"system": self.urls["input"], "code": "element",
                                            "display": TASK_INPUTS["element"][0]}]}, "valueString": row.element}],
        })
        if entry.procedure.startswith("Procedure/"):
            task["focus"] = {"reference": entry.procedure}
        if entry.patient:
            task["for"] = {"reference": entry.patient}
        task["text"] = {"status": "generated", "div": (
            f'<div xmlns="http://www.w3.org/1999/xhtml"><p>Review item: {escape(row.display)} '
            f"({escape(entry.reason)}), {status}.</p><p>Element: {escape(row.element)}</p>"
            f"<p>Fix: {escape(row.fix)}</p></div>")}
        order = ["resourceType", "id", "text", *MANAGED]
        return {k: task[k] for k in sorted(task, key=lambda k: order.index(k) if k in order else len(order))}

    @staticmethod
    def same(task: dict[str, Any], other: dict[str, Any]) -> bool:
        return all(task.get(k) == other.get(k) for k in MANAGED)

    # -- a turn ---------------------------------------------------------------------------------------------------

    def turn(self) -> MirrorResult:
        """Apply coders' actions, then mirror every entry whose Task is missing or says something else."""
        result = MirrorResult()
        open_entries = {e.id: e for e in self.state.reviews("open")}
        tasks = self._tasks_of(open_entries)
        self._apply_actions(open_entries, tasks, result)
        if result.dismissed or result.replayed:
            open_entries = {e.id: e for e in self.state.reviews("open")}
        active = {i: t for i, t in self._active_tasks().items() if i not in open_entries}
        wanted: dict[int, ReviewEntry] = dict(open_entries)
        for entry_id in [*active, *result.dismissed, *result.replayed]:
            if entry_id not in wanted:
                entry = self.state.review(entry_id)
                if entry is not None:
                    wanted[entry_id] = entry
        for entry_id, entry in sorted(wanted.items()):
            current = tasks.get(entry_id) or active.get(entry_id)
            if current is not None and current.get("status") not in ACTIVE_STATUSES and entry.status != "open" \
                    and entry_id not in result.dismissed:
                continue  # final on the server and closed here: nothing more to say
            self._write(entry, current, result, replayed=entry_id in result.replayed)
        if result.written or result.dismissed or result.replayed:
            log.info("%s", result.text())
        return result

    def _apply_actions(self, open_entries: dict[int, ReviewEntry], tasks: dict[int, dict[str, Any]],
                       result: MirrorResult) -> None:
        for entry_id, task in sorted(tasks.items()):
            if entry_id not in open_entries:
                continue
            actor = f"task:Task/{task.get('id')}/_history/{(task.get('meta') or {}).get('versionId', '?')}"
            if task.get("status") == "cancelled":
                notes = [n.get("text", "") for n in task.get("note") or [] if isinstance(n, dict)]
                if self.state.dismiss_review(entry_id, actor, notes[-1] if notes else ""):
                    result.dismissed.append(entry_id)
            elif self._asks_replay(task):
                self.state.record_review_action(ReviewAction(entry_id, time.time(), actor, "replay"))
                result.replayed.append(entry_id)
        if result.replayed:
            self.replay(result.replayed)

    def _asks_replay(self, task: dict[str, Any]) -> bool:
        business = task.get("businessStatus") or {}
        return _code_of(business, self.urls["status"]) == REPLAY or \
            str(business.get("text") or "").strip().lower() == REPLAY

    def _write(self, entry: ReviewEntry, current: dict[str, Any] | None, result: MirrorResult, *,
               replayed: bool) -> None:
        base = current
        if replayed and current is not None and entry.status == "open":
            base = {**current, "status": "in-progress"}  # someone works on it: the replay did not fix it
        task = self.task_for(entry, base)
        if current is not None and self.same(task, current):
            return
        task["lastModified"] = _instant(max(time.time(), entry.first_seen))  # inv-1: never before authoredOn
        validate_resource(task, f"Task for review entry {entry.id}")
        if current is None:
            ident = task["identifier"][0]
            self.client.conditional_update("Task", f"identifier={ident['system']}|{ident['value']}", task)
            result.created += 1
        else:
            task["id"] = current["id"]
            try:
                self.client.update(task, if_match=(current.get("meta") or {}).get("versionId"))
            except FhirConflict:  # a coder changed it since it was read: looked at again next turn
                result.conflicts += 1
                return
        result.written += 1

    # -- reading Tasks ------------------------------------------------------------------------------------------

    def _search(self, params: dict[str, str]) -> Iterable[dict[str, Any]]:
        for resource in self.client.search_all("Task", {**params, "_count": "200"}):
            if resource.get("resourceType") == "Task":
                yield resource

    def _tasks_of(self, entries: dict[int, ReviewEntry]) -> dict[int, dict[str, Any]]:
        """The Tasks of these entries, by entry id (any status)."""
        out: dict[int, dict[str, Any]] = {}
        ids = sorted(entries)
        system = self.urls["identifier"]
        for start in range(0, len(ids), CHUNK):
            values = ",".join(f"{system}|{self.identifier_value(i)}" for i in ids[start:start + CHUNK])
            for task in self._search({"identifier": values}):
                entry_id = self.entry_id(task)
                if entry_id is not None:
                    out[entry_id] = task
        return out

    def _active_tasks(self) -> dict[int, dict[str, Any]]:
        """Every Task of this installation that is not final yet, by entry id."""
        out: dict[int, dict[str, Any]] = {}
        for task in self._search({"identifier": f"{self.urls['identifier']}|", "status": ",".join(ACTIVE_STATUSES)}):
            entry_id = self.entry_id(task)
            if entry_id is not None:
                out[entry_id] = task
        return out


def task_loop_turn(mirror: TaskMirror, every: float) -> Callable[[], float]:
    """A `Loop` turn for run/serve: one mirror turn, then wait `every` seconds."""
    def turn() -> float:
        mirror.turn()
        return every
    return turn


def mirror_of(service: Any) -> TaskMirror | None:
    """The Task mirror of a `Service` (None when worklist.tasks is off)."""
    if not service.settings.worklist.tasks:
        return None
    return TaskMirror(service.client, service.state, service.tables.settings.canonical_base, service.replay)
