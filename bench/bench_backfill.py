"""`backfill` (the streaming path) of 10,000 and 100,000 generated Procedures from NDJSON: CPU per Procedure, which
must not grow with the input (memory neither). Each size is a whole process writing its Bundle to a file, so its
CPU time is everything the command does: reading and spilling, coding, writing, the diagnostics and their masking.

    .venv/bin/python bench/bench_backfill.py [N ...] [--codable] [--smoke]

Default: 10000 100000, every Procedure waiting for review with free text of its own to mask (the case whose CPU
per Procedure grew 5.6x from 10k to 100k before issue 21); --codable for the input that codes cleanly. CPU time is
less disturbed than wall time on a shared machine. Target (issue 21): 100k within 1.2x the CPU per Procedure of 10k.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import write_ndjson
from measure import machine, run

NOW = "2026-04-01T12:00:00Z"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[10_000, 100_000])
    parser.add_argument("--codable", action="store_true", help="sessions that code cleanly (no reviews)")
    parser.add_argument("--workdir", help="where the input, the output and the streaming index are written")
    parser.add_argument("--smoke", action="store_true", help="200 and 400 Procedures: that it works, not figures")
    args = parser.parse_args()
    sizes = [200, 400] if args.smoke else args.sizes
    per: list[float] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in sizes:
            path = Path(tmp) / f"input-{n}.ndjson"
            write_ndjson(path, n, review=not args.codable)
            out = Path(tmp) / "out.json"
            done = run(["-m", "adapter", "backfill", "--now", NOW, "--workdir", tmp, "--out", str(out), str(path)],
                       Path(tmp) / "stdout.txt")
            if done.returncode not in (0, 1):
                raise SystemExit(f"backfill of {n} failed ({done.returncode}): {done.stderr_tail}")
            per.append(done.cpu_s / n * 1000)
            print(f"== backfill of {n:,} Procedures ({path.stat().st_size / 1e6:,.0f} MB of NDJSON, "
                  f"{'codable' if args.codable else 'every one waiting for review'}): {done.wall_s:,.1f} s, "
                  f"{done.cpu_s:,.1f} CPU s = {per[-1]:.2f} ms CPU per Procedure, peak RSS "
                  f"{done.peak_rss_mib:,.0f} MiB, output {out.stat().st_size / 1e6:,.0f} MB; {machine()}", flush=True)
            path.unlink()
            out.unlink()
    if len(per) > 1:
        print(f"   CPU per Procedure, largest over smallest: {per[-1] / per[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
