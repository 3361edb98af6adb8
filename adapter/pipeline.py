"""One pass of the engine over a set of resources: index -> extract -> code -> build.

Sources (files, a FHIR server, notifications) only differ in how resources arrive; all of them call
`process` so an online charge is exactly what `dry-run` shows for the same data.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from adapter.building.resources import BuildResult, build_outputs
from adapter.coding.engine import CodingResult, Review, code_procedures
from adapter.config import CodeTables
from adapter.errors import ExitCode
from adapter.extraction.index import Entry, ResourceIndex, normalize_bases
from adapter.extraction.procedures import ProcedureFacts, extract
from adapter.extraction.relations import link
from adapter.sources.files import EntryProblem, ReadResult, SourcedResource, read_paths

EXIT_OK, EXIT_REVIEW, EXIT_UNREADABLE = ExitCode.OK, ExitCode.REVIEW, ExitCode.UNAVAILABLE


@dataclass
class RunReport:
    index: ResourceIndex
    facts: list[ProcedureFacts]
    coding: CodingResult
    built: BuildResult
    read: ReadResult = field(default_factory=ReadResult)

    @property
    def reviews(self) -> list[Review]:
        return [*self.coding.reviews, *self.built.reviews]

    @property
    def problems(self) -> list[EntryProblem]:
        """Parts of the input that are not usable resources, and resources without an id (or a `fullUrl`, which
        identifies one as FHIR's Bundle rules say: a transaction's create, say)."""
        extra = [EntryProblem(item.origin, f"{item.resource.get('resourceType')} has no id")
                 for item in self.index.without_id
                 if item.resource.get("resourceType") != "Procedure" and not item.full_url]
        return [*self.read.problems, *extra]

    @property
    def exit_code(self) -> int:
        if self.read.unreadable:
            return EXIT_UNREADABLE
        if self.reviews or self.problems:
            return EXIT_REVIEW
        return EXIT_OK


def local_bases(tables: CodeTables, server_base: str | None = None) -> frozenset[str]:
    """The bases whose absolute references are local: config/input.yaml local_bases, and online the server."""
    return tables.local_bases | normalize_bases([server_base] if server_base else [])


@contextmanager
def batch_gc() -> Iterator[None]:
    """Fewer and smaller cyclic-GC passes while a batch runs: the engine makes many small acyclic dicts (and
    validation many short-lived models); the default young-generation threshold (700) spent about a fifth of a
    10,000-Procedure run scanning them, and full passes re-scanned every long-lived object. What survives a young
    pass (the input and output of the batch) lives until the batch ends, so the middle generation is scanned only
    after 1,000 young passes (50 million allocations): at 20 a 10,000-Procedure run spent 0.4 s rescanning it."""
    old = gc.get_threshold()
    gc.set_threshold(50_000, 1_000, 20)
    gc.freeze()  # what exists before the batch (modules, the FHIR model classes, tables) outlives it: never scan it
    try:
        yield
    finally:
        # what the batch made and kept joins the oldest generation unscanned (freeze, then unfreeze everything):
        # else the first young pass after the batch would rescan all of it in the middle generation
        gc.freeze()
        gc.unfreeze()
        gc.set_threshold(*old)


def process(resources: Iterable[SourcedResource], tables: CodeTables, now: datetime | None = None,
            server_base: str | None = None) -> RunReport:
    """Code every FNA Procedure among `resources`; pure apart from reading the given dicts and, when `now`
    (the time of writing stamped on the output) is not given, the clock. `server_base`: the FHIR server the
    resources were read from (online), whose absolute references are local like those on `local_bases`."""
    with batch_gc():
        return _process(resources, tables, now, server_base)


def _process(resources: Iterable[SourcedResource], tables: CodeTables, now: datetime | None,
             server_base: str | None = None) -> RunReport:
    index = ResourceIndex.build(resources, local_bases(tables, server_base))
    return code_index(index, procedures_of(index), tables, now)


ProcedureItem = tuple[dict[str, Any], str, Entry | None]
"""A Procedure to code: its resource, its origin, and its index entry (None for a Procedure without an id)."""


def procedures_of(index: ResourceIndex) -> list[ProcedureItem]:
    """Every Procedure of the index in coding order: by key in the order keys were first read, then those
    without an id in read order. The streaming path (adapter/streaming) codes its batches in this order too."""
    found: list[ProcedureItem] = [(entry.resource, entry.origin, entry)
                                  for key, entry in index.entries.items() if key.startswith("Procedure/")]
    found += [(item.resource, item.origin, None) for item in index.without_id
              if item.resource.get("resourceType") == "Procedure"]
    return found


def code_index(index: ResourceIndex, procedures: Iterable[ProcedureItem], tables: CodeTables,
               now: datetime | None) -> RunReport:
    """Code `procedures` against `index`: the in-memory index of a whole input, or the streaming path's
    on-disk index scoped to a batch of patients."""
    facts = [extract(resource, origin, index, tables, entry) for resource, origin, entry in procedures]
    link(facts, tables)
    coding = code_procedures(facts, tables)
    built = build_outputs(coding, index, tables, now)
    return RunReport(index, facts, coding, built)


def process_paths(paths: Iterable[str | os.PathLike[str]], tables: CodeTables,
                  now: datetime | None = None) -> RunReport:
    with batch_gc():
        read = read_paths(paths)
        report = process(read.resources, tables, now)
    report.read = read
    return report
