"""One fixture for every HL7 v2 ledger implementation: the contract suite runs once per implementation.

PostgreSQL: the server of the `postgres_url` fixture (tests/conftest.py), a fresh schema per test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapter.hl7v2.ledger import Ledger, MemoryLedger, SqliteLedger
from adapter.state.sqlite import SqliteState

MakeLedger = Callable[[], Ledger]


@pytest.fixture(params=["sqlite", "memory", "postgres"])
def make_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeLedger]:
    """Opens the ledger under test; a second call opens a second handle on the same ledger (as another process
    would, for SQLite and PostgreSQL: in a state the state backend created) or, in memory, the same object."""
    opened: list[Ledger] = []
    memory: list[MemoryLedger] = []

    def make() -> Ledger:
        if request.param == "sqlite":
            path = tmp_path / "state.sqlite"
            if not path.exists():
                SqliteState(path).close()
            ledger: Ledger = SqliteLedger(path)
        elif request.param == "postgres":
            from adapter.hl7v2.pg_ledger import PostgresLedger
            from adapter.state.postgres import PostgresState

            ledger = PostgresLedger(PostgresState(request.getfixturevalue("pg_url")))
        else:
            if not memory:
                memory.append(MemoryLedger())
            ledger = memory[0]
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        ledger.close()


@pytest.fixture
def ledger(make_ledger: MakeLedger) -> Ledger:
    return make_ledger()
