"""What each thread is waiting on right now (the state, the FHIR server, the HL7 v2 receiver), and since when.

Calls that cross a process boundary mark themselves with `waiting_on(...)`; the runner looks a loop's thread
up here, so `/healthz` says of a stuck loop what it waits on ("the state ... (record_pass) for 14 s") instead
of only that its turn is long. Marking is a dictionary write per call: cheap enough for every state call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_current: dict[int, tuple[str, float]] = {}
"""thread ident -> (what it waits on, monotonic time it started waiting); the outermost wait wins."""


@contextmanager
def waiting_on(what: str) -> Iterator[None]:
    ident = threading.get_ident()
    if ident in _current:  # a nested call (a ledger call inside a state transaction): the outer one names it
        yield
        return
    _current[ident] = (what, time.monotonic())
    try:
        yield
    finally:
        _current.pop(ident, None)


def of_thread(ident: int | None) -> tuple[str, float] | None:
    """(what, since) for the thread, or None when it waits on nothing we know of."""
    return _current.get(ident) if ident is not None else None
