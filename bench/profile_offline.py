"""Where the offline path spends its time: the run of bench_offline.py (read, code, build, validate, compact JSON)
under cProfile, on one core. Prints the top functions by own time and by cumulative time.

    .venv/bin/python bench/profile_offline.py [N] [TOP]        (default 3000 Procedures, top 30)
    .venv/bin/python bench/profile_offline.py --smoke          (100 Procedures, top 5: for CI)
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import write_ndjson

from adapter.cli import output_bundle
from adapter.config import load_tables
from adapter.pipeline import process_paths


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--smoke"]
    smoke = len(args) < len(sys.argv) - 1  # a tiny run that checks the profile runs (CI)
    n = int(args[0]) if args else (100 if smoke else 3_000)
    top = int(args[1]) if len(args) > 1 else (5 if smoke else 30)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "procedures.ndjson"
        write_ndjson(path, n)
        tables = load_tables()
        profile = cProfile.Profile()
        profile.enable()
        report = process_paths([path], tables)
        json.dumps(output_bundle(report))
        profile.disable()
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


if __name__ == "__main__":
    main()
