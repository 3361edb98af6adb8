"""What the service's parts hand each other: a pass's result, a batch's plan, the status; and small helpers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from adapter.extraction.index import reference_of
from adapter.state.base import ReplicaInfo
from adapter.sync import SyncSummary


def parse_instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class Status:
    cursor: str | None
    lag_seconds: float | None
    queue: dict[str, int]
    reviews_open: int
    processed: int
    retry_backlog: int = 0
    replicas: list[ReplicaInfo] = field(default_factory=list)
    """On a shared state: every instance with a heartbeat, and what it holds."""


@dataclass
class PassResult:
    """A sync of some patients and the claims it held."""

    summary: SyncSummary
    claimed: set[str] = field(default_factory=set)
    busy: set[str] = field(default_factory=set)
    """Patients another instance was recoding: retried shortly."""


@dataclass
class WorkPlan:
    """What a batch of work items asks for, and which patients each item touches."""

    patients: set[str] = field(default_factory=set)
    loose: list[dict[str, Any]] = field(default_factory=list)
    touches: dict[int, set[str]] = field(default_factory=dict)
    pushed: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Per patient: resources an engine pushed (kept on review entries so replay re-applies them)."""
    polls: list[int] = field(default_factory=list)


def pushed_for(resources: Iterable[dict[str, Any]], patient: str) -> list[dict[str, Any]]:
    """The pushed resources that belong to `patient` (or to nobody in particular, like a BodyStructure)."""
    out = []
    for resource in resources:
        if resource.get("resourceType") == "Patient":
            owner: str | None = f"Patient/{resource.get('id')}"
        else:
            owner = reference_of(resource.get("subject") or resource.get("patient") or resource.get("beneficiary"))
        if owner is None or owner == patient:
            out.append(resource)
    return out


def refs(reference: str | None) -> tuple[str, ...]:
    return (reference,) if reference else ()
