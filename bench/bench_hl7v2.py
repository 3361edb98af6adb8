"""HL7 v2 sink figures: DFT^P03 built and strictly validated per second (every bundled scenario's sessions,
repeated), and MLLP delivery through the sink (ledger in an SQLite state file, one reused connection) to
the real listener process of the tests (the `hl7` package's asyncio server). Prints the figures.

    .venv/bin/python bench/bench_hl7v2.py [ROUNDS]     (default 5 rounds over the scenarios)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapter.config import load_tables  # noqa: E402
from adapter.hl7v2.ledger import SqliteLedger  # noqa: E402
from adapter.hl7v2.messages import dry_run_messages  # noqa: E402
from adapter.hl7v2.mllp import MllpClient, MllpSettings  # noqa: E402
from adapter.hl7v2.sink import Hl7v2Sink  # noqa: E402
from adapter.pipeline import process_paths  # noqa: E402
from adapter.state.sqlite import SqliteState  # noqa: E402
from tests.integration.helpers import free_port  # noqa: E402


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    tables = load_tables()
    now = datetime(2026, 4, 1, 12, tzinfo=UTC)
    report = process_paths(sorted((ROOT / "fixtures/fhir/scenarios").glob("*/input.json")), tables, now)
    start = time.perf_counter()
    built = 0
    for _ in range(rounds):
        messages, _reviews = dry_run_messages(report, tables, now)
        built += len(messages)
    elapsed = time.perf_counter() - start
    print(f"built and validated:   {built} DFT^P03 in {elapsed:.2f} s = {built / elapsed:.0f} messages/s "
          f"({1000 * elapsed / built:.1f} ms each)")

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        listener = subprocess.Popen([sys.executable, str(ROOT / "tests/integration/mllp_listener.py"), "--port",
                                     str(port), "--record", str(Path(tmp) / "received.jsonl")],
                                    stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout is not None and listener.stdout.readline().startswith("listening")
            state = SqliteState(Path(tmp) / "state.sqlite")
            client = MllpClient(MllpSettings("127.0.0.1", port))
            sink = Hl7v2Sink(tables, SqliteLedger(state.path), client, clock=lambda: now)
            patients = sorted({s.session.key.patient for s in report.built.sessions})
            start = time.perf_counter()
            result = sink.deliver(report, patients)
            elapsed = time.perf_counter() - start
            again = time.perf_counter()
            rerun = sink.deliver(report, patients)
            rerun_elapsed = time.perf_counter() - again
            print(f"delivered over MLLP:   {result.sent} messages for {len(patients)} patients in {elapsed:.2f} s "
                  f"= {result.sent / elapsed:.0f} messages/s (build, validate, record, send, ACK, mark sent); "
                  f"{client.connections} connection(s)")
            print(f"re-run, nothing new:   {rerun.sent} sent, {rerun.unchanged} unchanged in {rerun_elapsed:.2f} s")
        finally:
            listener.terminate()
            listener.wait(10)


if __name__ == "__main__":
    main()
