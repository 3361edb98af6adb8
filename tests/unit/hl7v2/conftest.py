"""One fixture for every HL7 v2 ledger implementation: the contract suite runs once per implementation.

Add an implementation by adding a param (PostgreSQL: a URL from the environment, a fresh schema per test).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapter.hl7v2.ledger import Ledger, MemoryLedger, SqliteLedger
from adapter.state.sqlite import SqliteState

MakeLedger = Callable[[], Ledger]


@pytest.fixture(params=["sqlite", "memory"])
def make_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeLedger]:
    """Opens the ledger under test; a second call opens a second handle on the same ledger (as another process
    would, for SQLite: in a state file the state backend created) or, in memory, the same object."""
    opened: list[Ledger] = []
    memory: list[MemoryLedger] = []

    def make() -> Ledger:
        if request.param == "sqlite":
            path = tmp_path / "state.sqlite"
            if not path.exists():
                SqliteState(path).close()
            ledger: Ledger = SqliteLedger(path)
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
