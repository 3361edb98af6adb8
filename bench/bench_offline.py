"""Offline throughput: code N generated Procedures from an NDJSON file, end to end (read, code, build,
validate, serialise), on one core. Prints Procedures per second and peak memory (max RSS).

    .venv/bin/python bench/bench_offline.py [N]        (default 10000; target: under 10 s)
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import write_ndjson

from adapter.cli import output_bundle
from adapter.config import load_tables
from adapter.pipeline import process_paths


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "procedures.ndjson"
        resources = write_ndjson(path, n)
        tables = load_tables()
        start = time.perf_counter()
        report = process_paths([path], tables)
        coded = time.perf_counter()
        text = json.dumps(output_bundle(report))
        serialised = time.perf_counter()
        json.dumps(output_bundle(report), indent=2)
        indented = time.perf_counter() - serialised
        elapsed = serialised - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = report.coding.lines
    print(f"procedures:            {len(report.facts)} ({resources} resources in the input file)")
    print(f"sessions coded:        {len(report.coding.coded_sessions)}; lines {len(lines)}; "
          f"claims {sum(1 for s in report.built.sessions if s.claim)}; reviews {len(report.reviews)}")
    print(f"output bundle:         {len(text) / 1e6:.1f} MB")
    print(f"read+code+build+validate: {coded - start:.2f} s; compact JSON output: {serialised - coded:.2f} s "
          f"(indented, the dry-run default, would add {indented:.2f} s)")
    print(f"elapsed (one core):    {elapsed:.2f} s")
    print(f"procedures per second: {len(report.facts) / elapsed:,.0f}")
    print(f"peak memory (max RSS): {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
