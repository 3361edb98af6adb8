"""Online cost of `sync` against a real HAPI server, compared with the raw cost of writing the same resources.

Loads N generated Procedures (with their patients, encounters, lesions, coverages) into HAPI, then times:
  1. `sync` (read changed Procedures, batched context reads, coding, reconciliation, one transaction per
     session), and
  2. the raw cost: the very same ChargeItems and Claims written with bare transactions of the same size
     (one per session, no reads), into a fresh namespace so nothing is a no-op update,
and prints the ratio and the HTTP requests per Procedure. A second sync (nothing to write) is timed too.

Everything it loads and writes is deleted again at the end (bench/cleanup.py), also after a failure.

    scripts/hapi start    # prints the base URL
    .venv/bin/python bench/bench_sync.py --server http://127.0.0.1:8089/fhir [--procedures 1000]
    .venv/bin/python bench/bench_sync.py --server ... --smoke    (20 Procedures: checks the bench runs, for CI)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cleanup import remove
from generate import generate, put_all

from adapter.client import FhirClient
from adapter.config import load_tables
from adapter.pipeline import process
from adapter.sinks.reconcile import plan
from adapter.sync import Syncer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True)
    parser.add_argument("--procedures", type=int, default=None, help="default 1000 (20 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the bench works")
    args = parser.parse_args()
    procedures = args.procedures or (20 if args.smoke else 1000)
    tables = load_tables()
    client = FhirClient(args.server, pool_size=4)
    client.check_server()
    prefix = "b" + uuid.uuid4().hex[:6]
    resources = list(generate(procedures, prefix=prefix))
    try:
        measure(client, tables, resources, procedures)
    finally:
        started = time.perf_counter()
        removed = remove(client, resources)
        print(f"removed {removed} resources from the server in {time.perf_counter() - started:.1f} s")


def measure(client: FhirClient, tables: Any, resources: list[dict[str, Any]], procedures: int) -> None:
    since = next(client.search("Procedure", {"_count": "0"}))["meta"]["lastUpdated"]
    started = time.perf_counter()
    put_all(client, resources, 500)
    print(f"loaded {len(resources)} resources ({procedures} Procedures) in {time.perf_counter() - started:.1f} s")

    syncer = Syncer(client, tables)
    before = client.request_count
    started = time.perf_counter()
    summary = syncer.sync(since)
    sync_s = time.perf_counter() - started
    sync_requests = client.request_count - before
    print(f"sync:   {sync_s:.2f} s, {sync_requests} HTTP requests; {summary.text()}")

    before = client.request_count
    started = time.perf_counter()
    again = syncer.sync(since)
    print(f"re-run: {time.perf_counter() - started:.2f} s, {client.request_count - before} HTTP requests, "
          f"written {again.written}, unchanged {again.unchanged}")

    # raw: the same session transactions again, under new identifiers so HAPI really creates every resource
    # (rebuilt and parsed before the clock starts: only the writes are timed)
    raw_prefix = "r" + uuid.uuid4().hex[:6]
    renamed = [json.loads(re.sub(r'("value": "|\|)fna-', rf"\1{raw_prefix}-", b))
               for b in _session_bundles(syncer, since)]
    before = client.request_count
    started = time.perf_counter()
    for bundle in renamed:
        client.transaction(bundle)
    raw_s = time.perf_counter() - started
    raw_requests = client.request_count - before
    print(f"raw:    {raw_s:.2f} s, {raw_requests} HTTP requests ({len(renamed)} transactions)")
    print(f"ratio sync/raw:                {sync_s / raw_s:.2f} (target 1.15 or better)")
    print(f"HTTP requests per Procedure:   {sync_requests / summary.procedures:.3f} "
          f"(raw writes alone: {raw_requests / summary.procedures:.3f}; target 0.55 or fewer)")


def _session_bundles(syncer: Syncer, since: str) -> list[str]:
    """The transactions a first sync sends, rebuilt as if the server held no earlier charges (not timed)."""
    bundles: list[str] = []
    done: set[str] = set()
    for page in syncer.source.changed_pages(since):
        patients = sorted({p["subject"]["reference"] for p in page} - done)
        done.update(patients)
        ctx = syncer.source.context(patients)
        writes = plan(process(ctx.resources, syncer.tables), [], syncer.tables)
        bundles += [json.dumps(s.bundle()) for s in writes.sessions if s.entries]
    return bundles


if __name__ == "__main__":
    main()
