"""Durable state behind one small contract (`base.StateBackend`), opened by `open_state`.

`state.location` in the config selects the backend: a file path (or `sqlite:///path`) is the SQLite backend,
the default; `postgresql://user@host:port/db` (or `postgres://`) is the PostgreSQL backend, for several
replicas (its driver, psycopg, is imported only then); `memory:` keeps everything in the process (tests only).
"""

from __future__ import annotations

from adapter.errors import StateUnavailable
from adapter.state.base import (
    AuditRecord,
    NewReview,
    Outcome,
    PassRecord,
    Processed,
    ReplicaInfo,
    Retry,
    ReviewAction,
    ReviewEntry,
    ReviewKind,
    StateBackend,
    StateStats,
    WorkItem,
    WorkKind,
)
from adapter.state.pgurl import is_postgres_url, safe_location

__all__ = [
    "AuditRecord",
    "NewReview",
    "Outcome",
    "PassRecord",
    "Processed",
    "ReplicaInfo",
    "Retry",
    "ReviewAction",
    "ReviewEntry",
    "ReviewKind",
    "StateBackend",
    "StateStats",
    "WorkItem",
    "WorkKind",
    "is_postgres_url",
    "open_state",
    "sqlite_path",
]

MEMORY = ("memory:", ":memory:")


def sqlite_path(location: str) -> str | None:
    """The file path of an SQLite location (a path or `sqlite:///path`), None for other schemes."""
    if location.startswith("sqlite:///"):
        return location[len("sqlite://"):]
    if location.startswith("sqlite:"):
        return location[len("sqlite:"):]
    if "://" in location or location in MEMORY:
        return None
    return location


def open_state(location: str, *, busy_timeout: float = 5.0, lease_seconds: float = 300.0,
               instance_id: str | None = None, statement_timeout: float = 30.0) -> StateBackend:
    """The backend for `location`; raises StateError (with what to do) when it cannot be used."""
    if location in MEMORY:
        from adapter.state.memory import MemoryState

        return MemoryState(lease_seconds=lease_seconds, instance_id=instance_id)
    if is_postgres_url(location):
        try:
            from adapter.state.postgres import PostgresState
        except ImportError as exc:
            raise StateUnavailable(safe_location(location), f"the PostgreSQL driver cannot be loaded ({exc}): "
                                                            "install psycopg (pip install 'psycopg[binary]')") from None
        return PostgresState(location, busy_timeout=busy_timeout, lease_seconds=lease_seconds,
                             instance_id=instance_id, statement_timeout=statement_timeout)
    path = sqlite_path(location)
    if path is None:
        raise ValueError(f"no state backend for {location.split(':', 1)[0]}: URLs (settings reject it first)")
    from adapter.state.sqlite import SqliteState

    return SqliteState(path, busy_timeout=busy_timeout, lease_seconds=lease_seconds, instance_id=instance_id)
