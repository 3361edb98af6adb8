"""Peak memory of `dry-run` over one JSON Bundle of N generated Procedures (read entry by entry, streamed).

    .venv/bin/python bench/bench_bundle.py [N ...] [--smoke]

Default: 100000 (about 250 MB in one file). 1,000,000 (2.5 GB; about an hour on this machine) is measured by
hand, not in CI. Targets (issue 21): 100k under 400 MiB, 1M under 1 GiB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import write_bundle
from measure import machine, run

NOW = "2026-04-01T12:00:00Z"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[100_000])
    parser.add_argument("--workdir", help="where the input, the output and the streaming index are written")
    parser.add_argument("--smoke", action="store_true", help="300 Procedures, streamed: that it works, not figures")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in [300] if args.smoke else args.sizes:
            path = Path(tmp) / f"bundle-{n}.json"
            write_bundle(path, n)
            out = Path(tmp) / "out.json"
            done = run(["-m", "adapter", "dry-run", "--stream", "--now", NOW, "--workdir", tmp, str(path)], out)
            if done.returncode not in (0, 1):
                raise SystemExit(f"dry-run of the {n} Bundle failed ({done.returncode}): {done.stderr_tail}")
            print(f"== one Bundle of {n:,} Procedures ({path.stat().st_size / 1e6:,.0f} MB): dry-run "
                  f"{done.wall_s:,.1f} s ({done.cpu_s:,.1f} CPU s, {n / done.cpu_s:,.0f} Procedures per CPU second), "
                  f"peak RSS {done.peak_rss_mib:,.0f} MiB, output {out.stat().st_size / 1e6:,.0f} MB; {machine()}",
                  flush=True)
            path.unlink()
            out.unlink()


if __name__ == "__main__":
    main()
