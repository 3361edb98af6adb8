"""One fixture for every state backend: the contract suite runs once per backend.

PostgreSQL: the server of the `postgres_url` fixture (tests/conftest.py), a fresh schema per test; it is started
only when a postgres test runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapter.state.base import StateBackend
from adapter.state.memory import MemoryState
from adapter.state.sqlite import SqliteState

MakeState = Callable[..., StateBackend]


@pytest.fixture(params=["sqlite", "memory", "postgres"])
def make_state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeState]:
    """Opens the backend under test; a second call opens a second handle on the same state, with an instance id
    of its own, as another process would (in memory: a replica handle on the same data)."""
    opened: list[StateBackend] = []
    memory: list[MemoryState] = []

    def make(**options: Any) -> StateBackend:
        if request.param == "sqlite":
            state: StateBackend = SqliteState(tmp_path / "state.sqlite", **options)
        elif request.param == "postgres":
            from adapter.state.postgres import PostgresState

            state = PostgresState(request.getfixturevalue("pg_url"), **options)
        else:
            if not memory:
                memory.append(MemoryState(**options))
                state = memory[0]
            else:
                state = memory[0].replica()
        opened.append(state)
        return state

    yield make
    for state in opened:
        state.close()


@pytest.fixture
def state(make_state: MakeState) -> StateBackend:
    return make_state()
