"""Offline throughput and memory: code N generated Procedures from an NDJSON file, end to end (read, code, build,
validate, serialise, write the compact Bundle to a file), on one core, each size and path in a fresh process so
peak memory (max RSS) figures are not mixed.

    .venv/bin/python bench/bench_offline.py [N ...] [--memory-up-to N] [--workdir DIR]
    .venv/bin/python bench/bench_offline.py --smoke      (200 Procedures, both paths: for CI)

Default: 10000. Every size runs the streaming path (dry-run --stream); sizes up to --memory-up-to (default 10000)
run the in-memory path too. Targets: 10,000 Procedures in under 10 s; 1,000,000 streamed with peak RSS under 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import write_ndjson


def _one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says


def child(path: str, mode: str, out: str, workdir: str | None) -> dict[str, Any]:
    """One measured run in this (fresh) process."""
    from adapter.cli import output_bundle
    from adapter.config import load_tables
    from adapter.pipeline import process_paths
    from adapter.streaming.run import StreamRun

    _one_core()
    tables = load_tables()
    figures: dict[str, Any] = {"mode": mode}
    start = time.perf_counter()
    if mode == "memory":
        report = process_paths([path], tables)
        coded = time.perf_counter()
        text = json.dumps(output_bundle(report))
        with open(out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        figures.update(procedures=len(report.facts), sessions=len(report.coding.coded_sessions),
                       reviews=len(report.reviews), read_code_s=coded - start)
    else:
        with StreamRun(tables, compact=True, workdir=workdir) as run:
            run.read([path])
            read = time.perf_counter()
            result = run.code()
            coded = time.perf_counter()
            with open(out, "w", encoding="utf-8") as handle:
                run.write_bundle(handle)
            figures.update(procedures=result.counts.procedures, sessions=result.counts.sessions,
                           reviews=result.reviews, read_s=read - start, code_s=coded - read,
                           temp_mb=sum(f.stat().st_size for f in run.folder.iterdir()) / 1e6)
    figures["elapsed_s"] = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures["cpu_s"] = usage.ru_utime + usage.ru_stime  # less disturbed than wall time on a shared machine
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures["output_mb"] = os.path.getsize(out) / 1e6
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[10_000])
    parser.add_argument("--memory-up-to", type=int, default=10_000,
                        help="also run the in-memory path for sizes up to this (its memory grows with the input)")
    parser.add_argument("--workdir", help="where the input, the output and the streaming index are written")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "MODE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="200 Procedures, both paths: checks the bench runs (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.sizes = [200]
    if args.child:
        print(json.dumps(child(*args.child, args.workdir)))
        return
    failed = False
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.sizes:
            path = Path(tmp) / f"procedures-{n}.ndjson"
            started = time.perf_counter()
            resources = write_ndjson(path, n)
            print(f"== {n:,} Procedures: {resources:,} resources, {path.stat().st_size / 1e6:,.0f} MB of NDJSON "
                  f"(generated in {time.perf_counter() - started:.0f} s)", flush=True)
            modes = ["stream", "memory"] if n <= args.memory_up_to else ["stream"]
            for mode in modes:
                out = Path(tmp) / f"bundle-{n}-{mode}.json"
                command = [sys.executable, __file__, "--child", str(path), mode, str(out)]
                if args.workdir:
                    command += ["--workdir", args.workdir]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(f"   {mode}: failed ({done.returncode})\n{done.stderr[-2000:]}", flush=True)
                    failed = True
                    continue
                f = json.loads(done.stdout.strip().splitlines()[-1])
                rate = f["procedures"] / f["elapsed_s"]
                split = (f"read+spill {f['read_s']:.1f} s, code {f['code_s']:.1f} s, temp index {f['temp_mb']:,.0f} MB"
                         if mode == "stream" else f"read+code+build+validate {f['read_code_s']:.1f} s")
                print(f"   {mode:6}  {f['procedures']:,} Procedures, {f['sessions']:,} sessions, "
                      f"{f['reviews']} reviews; elapsed {f['elapsed_s']:,.1f} s ({split}); {rate:,.0f} Procedures/s "
                      f"({f['procedures'] / f['cpu_s']:,.0f} per CPU second); "
                      f"peak RSS {f['peak_rss_mib']:,.0f} MiB; output {f['output_mb']:,.0f} MB", flush=True)
                out.unlink(missing_ok=True)
            path.unlink()
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
