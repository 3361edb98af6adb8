"""One command in a child process: its wall time, CPU time and peak memory (of that child alone, from wait4)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Measured:
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    returncode: int
    stderr_tail: str


def run(args: list[str], stdout: Path, timeout: float = 7200.0) -> Measured:
    """Run `python args...` (this interpreter, the repository on the path) with stdout to a file."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    err = stdout.with_suffix(".stderr")
    with stdout.open("wb") as out, err.open("wb") as errors:
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, *args], stdout=out, stderr=errors, env=env)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    tail = err.read_text(encoding="utf-8", errors="replace")[-1500:]
    err.unlink()
    return Measured(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, child.returncode, tail)


def machine() -> str:
    """The load, for the record: other processes share the cores and disturb wall times."""
    load = os.getloadavg()
    return f"{os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
