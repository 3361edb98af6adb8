"""batch_gc changes how often the cyclic GC runs during a batch, and nothing after it."""

from __future__ import annotations

import gc
import weakref

from adapter.pipeline import batch_gc


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic GC frees it


def test_thresholds_and_frozen_objects_are_as_before_after_a_batch() -> None:
    before = gc.get_threshold()
    with batch_gc():
        assert gc.get_threshold()[0] > before[0]
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_cycles_made_during_a_batch_are_still_collected_after_it() -> None:
    """What the batch made joins the oldest generation, not the frozen one (which no pass ever scans)."""
    with batch_gc():
        node = _Node()
        gone = weakref.ref(node)
        del node
    gc.collect()
    assert gone() is None
