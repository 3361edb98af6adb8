"""`dry-run` of N generated Procedures against a json-only pass over the same input, interleaved run by run.

The json-only pass is the floor of any pass over the data in Python: read every NDJSON line with `json.loads`,
index the resources by `type/id`, write as many resources as the dry-run's Bundle has entries with `json.dumps`
(compact: the json module's fastest). `dry-run` is the command as a user runs it (indented Bundle, every written
resource validated, diagnostics and summary on stderr). Both are whole processes (start-up included), one after
the other, so each pair sees the same load: the ratio is taken per pair.

    .venv/bin/python bench/bench_dry_run.py [N] [--runs R] [--review] [--smoke]

Target (issue 21): the 10,000-Procedure dry-run within 3x of the json-only pass, under 400 MiB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import write_ndjson
from measure import machine, run

NOW = "2026-04-01T12:00:00Z"


def json_only(path: str, entries: int) -> None:
    """The baseline's child: read, index, write `entries` resources, with the json module alone."""
    index: dict[str, dict[str, object]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                resource = json.loads(line)
                index[f"{resource['resourceType']}/{resource.get('id')}"] = resource
    values = list(index.values())
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": values[i % len(values)]} for i in range(entries)]}
    sys.stdout.write(json.dumps(bundle, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--review", action="store_true", help="every Procedure waits for review (free text to mask)")
    parser.add_argument("--smoke", action="store_true", help="200 Procedures, one run: that it works, not figures")
    parser.add_argument("--json-only", nargs=2, metavar=("PATH", "ENTRIES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json_only:
        json_only(args.json_only[0], int(args.json_only[1]))
        return
    n, runs = (200, 1) if args.smoke else (args.n, args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.ndjson"
        write_ndjson(path, n, review=args.review)
        print(f"== dry-run of {n:,} Procedures ({path.stat().st_size / 1e6:,.0f} MB of NDJSON"
              f"{', every one waiting for review' if args.review else ''}); {machine()}", flush=True)
        ratios, cpu_ratios, rss, times = [], [], [], []
        for i in range(runs):
            out = Path(tmp) / "dry-run.json"
            dry = run(["-m", "adapter", "dry-run", "--now", NOW, str(path)], out)
            if dry.returncode not in (0, 1):
                raise SystemExit(f"dry-run failed ({dry.returncode}): {dry.stderr_tail}")
            entries = len(json.loads(out.read_text(encoding="utf-8")).get("entry", []))
            base = run([__file__, "--json-only", str(path), str(entries)], Path(tmp) / "json-only.json")
            if base.returncode != 0:
                raise SystemExit(f"json-only pass failed: {base.stderr_tail}")
            ratios.append(dry.wall_s / base.wall_s)
            cpu_ratios.append(dry.cpu_s / base.cpu_s)
            rss.append(dry.peak_rss_mib)
            times.append(dry.wall_s)
            print(f"   run {i + 1}: dry-run {dry.wall_s:.2f} s ({dry.cpu_s:.2f} CPU s), peak RSS "
                  f"{dry.peak_rss_mib:,.0f} MiB, {entries:,} entries | json-only {base.wall_s:.2f} s "
                  f"({base.cpu_s:.2f} CPU s), {base.peak_rss_mib:,.0f} MiB | ratio {ratios[-1]:.2f} "
                  f"(CPU {dry.cpu_s / base.cpu_s:.2f}); {machine()}", flush=True)
        print(f"   dry-run {min(times):.2f}-{max(times):.2f} s, peak RSS {max(rss):,.0f} MiB; ratio to json-only "
              f"{min(ratios):.2f}-{max(ratios):.2f} (median {statistics.median(ratios):.2f}), in CPU time "
              f"{min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}", flush=True)


if __name__ == "__main__":
    main()
