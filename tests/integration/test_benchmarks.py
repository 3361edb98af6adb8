"""Every script in bench/ runs in its smoke mode (`--smoke`: tiny sizes) against the real servers, so a benchmark
that stopped working fails CI instead of rotting: it must exit 0 within its time limit and print its figures.
No figure is asserted: speed is measured by the benches and read by people, never tested.

A new bench_*.py or profile_*.py is picked up by itself and must accept `--smoke` (the benches that need HAPI
get `--server`, bench_replicas.py also `--postgres`). On a timeout the bench's whole process group is killed,
so no `serve` or replica it started is left running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name.startswith(("bench_", "profile_")))
NEEDS_SERVER = {"bench_sync.py", "bench_notifications.py", "bench_replicas.py"}
NEEDS_POSTGRES = {"bench_replicas.py"}
PRINTS = {
    "bench_hl7v2.py": r"generated, fresh: +\d+ DFT\^P03 .* messages/s.*delivered over MLLP: +\d+ messages",
    "bench_offline.py": r"stream +200 Procedures.*memory +200 Procedures",
    "profile_offline.py": r"function calls",
    "bench_sync.py": r"ratio sync/raw: +\d.*HTTP requests per Procedure: +\d.*removed \d+ resources",
    "bench_notifications.py": r"latency, HAPI rest-hook .*p50.*drain: 20 queued Procedures.*removed \d+ resources "
                              r"and Subscription/",
    "bench_replicas.py": r"1 replica\(s\): drained 20 Procedures.*HAPI ceiling.*removed \d+ resources",
}
"""What each bench prints when it worked (a bench not listed: any output)."""
TIMEOUT_S = 240
"""Per bench, on a shared 2-core machine (they take 3-35 s there)."""


def test_every_bench_is_covered() -> None:
    assert {p.name for p in SCRIPTS} >= set(PRINTS)
    assert "generate.py" not in {p.name for p in SCRIPTS}  # a library, not a bench


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_the_bench_runs_in_smoke_mode(script: Path, request: pytest.FixtureRequest) -> None:
    command = [sys.executable, str(script), "--smoke"]
    if script.name in NEEDS_SERVER:
        command += ["--server", request.getfixturevalue("hapi_url")]
    if script.name in NEEDS_POSTGRES:
        command += ["--postgres", request.getfixturevalue("postgres_url")]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{script.name} --smoke did not finish in {TIMEOUT_S} s\n{out[-2000:]}\n{err[-2000:]}",
                    pytrace=False)
    assert proc.returncode == 0, f"{script.name} --smoke failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}"
    assert re.search(PRINTS.get(script.name, r"\S"), out, re.DOTALL), f"{script.name} printed:\n{out[-2000:]}"
