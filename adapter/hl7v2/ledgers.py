"""Which message ledger goes with which state backend: `open_ledger`.

A module above the ledgers (adapter/hl7v2/ledger.py: the contract, SQLite and memory; pg_ledger.py:
PostgreSQL) so that they do not import each other: the PostgreSQL ledger builds on the contract, and only this
chooser knows both.
"""

from __future__ import annotations

import sys
from typing import Any

from adapter.errors import StateError
from adapter.hl7v2.ledger import Ledger, MemoryLedger, SqliteLedger


def open_ledger(state: Any) -> Ledger:
    """The ledger beside a state backend: in its SQLite file or PostgreSQL database, or in memory beside the
    memory state (the PostgreSQL driver is imported only for a PostgreSQL state)."""
    from adapter.state.memory import MemoryState
    from adapter.state.sqlite import SqliteState

    if isinstance(state, SqliteState):
        return SqliteLedger(state.path, busy_timeout=state.busy_timeout)
    if isinstance(state, MemoryState):
        return MemoryLedger()
    postgres = sys.modules.get("adapter.state.postgres")  # loaded if the state is one of its
    if postgres is not None and isinstance(state, postgres.PostgresState):
        from adapter.hl7v2.pg_ledger import PostgresLedger

        return PostgresLedger(state)
    raise StateError(getattr(state, "location", "?"), "the HL7 v2 sink keeps its message ledger in the state, and "
                                                      "this state backend has no ledger: use an SQLite or PostgreSQL "
                                                      "state")
