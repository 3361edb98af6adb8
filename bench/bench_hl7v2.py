"""HL7 v2 sink figures: DFT^P03 messages built and strictly validated per second, and MLLP delivery through the
sink (ledger in an SQLite state file, one reused connection) to the real listener process of the tests (the
`hl7` package's asyncio server). Prints the figures.

Built and validated means `messages.render`: the text from the field helpers, every value checked against its
HL7 datatype, length and table, and each new message shape validated in full by hl7apy (once per process).
Three inputs:
- generated sessions (bench/generate.py, with the MRN, names and visit numbers a message needs), all values
  new: a fresh process's shapes and value verdicts, so the figure is what a new feed gets, and the same
  messages again (a warm process). `records` adds reading the run (`session_charges`) and the control ids;
- the bundled scenarios' sessions, repeated ROUNDS times;
- the hl7apy object-tree builder this replaced (tests/unit/hl7v2/hl7apy_reference.py) on a sample of the same
  generated sessions, interleaved with the string builder on the same sample, for the ratio.

    .venv/bin/python bench/bench_hl7v2.py [ROUNDS] [PROCEDURES]   (default 5 rounds, 3000 Procedures)
    .venv/bin/python bench/bench_hl7v2.py --smoke                  (tiny sizes: checks the bench runs, for CI)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from generate import generate  # noqa: E402

from adapter.config import load_tables  # noqa: E402
from adapter.hl7v2 import checks  # noqa: E402
from adapter.hl7v2.ledger import SqliteLedger  # noqa: E402
from adapter.hl7v2.messages import (  # noqa: E402
    CHARGE,
    SHAPES,
    SessionCharges,
    control_id,
    dry_run_messages,
    render,
    session_charges,
)
from adapter.hl7v2.mllp import MllpClient, MllpSettings  # noqa: E402
from adapter.hl7v2.sink import Hl7v2Sink  # noqa: E402
from adapter.pipeline import process_paths  # noqa: E402
from adapter.state.sqlite import SqliteState  # noqa: E402
from tests.integration.helpers import free_port  # noqa: E402
from tests.unit.hl7v2.hl7apy_reference import render_with_hl7apy  # noqa: E402

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
FAMILIES = ["Garcia", "Nguyen", "O'Brien", "Okafor", "Schmidt", "Kowalski", "Haddad", "Silva"]
GIVEN = ["Ana", "Li", "Maria", "Samir", "Helen", "Jonas", "Aiko", "Tomas"]


def hl7v2_ready(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Generated resources with what a message needs and bench/generate.py leaves out: the Patient's MRN and
    name, the Encounter's visit number, the Practitioner's name. Each value its own, as in a real feed."""
    for n, resource in enumerate(resources):
        kind = resource["resourceType"]
        if kind in ("Patient", "Encounter"):
            code = "MR" if kind == "Patient" else "VN"
            resource["identifier"] = [{"type": {"coding": [{"system": V2_0203, "code": code}]},
                                       "value": f"{code}-{resource['id']}"}]
        if kind in ("Patient", "Practitioner"):
            resource["name"] = [{"family": FAMILIES[n % len(FAMILIES)], "given": [GIVEN[n // 3 % len(GIVEN)]]}]
    return resources


def fresh_process() -> None:
    """Forget the shapes hl7apy has validated and the value verdicts, as in a process that just started."""
    SHAPES.clear()
    checks.forget_references()


def render_all(sessions: list[SessionCharges], now: datetime, tables: Any, build: Any = render) -> int:
    for sc in sessions:
        versions = [(c.line, c.version(sc.visit)) for c in sc.charges]
        build(CHARGE, sc.visit, sc.charges, control_id(CHARGE, versions), now, tables.hl7v2)
    return len(sessions)


def timed(work: Any) -> tuple[int, float, float]:
    """(what `work` returns, wall seconds, CPU seconds of this process): on a shared machine the CPU time is the
    steadier figure."""
    start, cpu = time.perf_counter(), time.process_time()
    count = work()
    return count, time.perf_counter() - start, time.process_time() - cpu


def rate(count: int, elapsed: float, cpu: float) -> str:
    return (f"{count} DFT^P03 in {elapsed:.2f} s = {count / elapsed:,.0f} messages/s "
            f"({1000 * elapsed / count:.2f} ms each; {count / cpu:,.0f} per CPU second)")


def main() -> None:
    smoke = "--smoke" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--smoke"]
    rounds = int(args[0]) if args else (1 if smoke else 5)
    procedures = int(args[1]) if len(args) > 1 else (60 if smoke else 3000)
    sample = 3 if smoke else 40
    tables = load_tables()
    now = datetime(2026, 4, 1, 12, tzinfo=UTC)

    with tempfile.TemporaryDirectory() as tmp:
        feed = Path(tmp) / "generated.ndjson"
        feed.write_text("".join(json.dumps(r) + "\n" for r in hl7v2_ready(list(generate(procedures, "h7")))))
        generated = process_paths([feed], tables, now)
    sessions, reviews = session_charges(generated, tables)
    if not sessions or reviews:
        raise SystemExit(f"bench: the generated input gave {len(sessions)} sessions and {len(reviews)} reviews "
                         f"(first: {reviews[0].detail if reviews else '-'})")
    subset = sessions[:sample]
    fresh: list[tuple[int, float, float]] = []
    reference: list[tuple[int, float, float]] = []
    for _ in range(2):  # interleaved: the machine is shared, so each builder gets both quiet and busy moments
        fresh_process()
        fresh.append(timed(lambda: render_all(sessions, now, tables)))
        reference.append(timed(lambda: render_all(subset, now, tables, render_with_hl7apy)))
    count, elapsed, cpu = (sum(run[i] for run in fresh) for i in range(3))
    print(f"generated, fresh:      {rate(count, elapsed, cpu)}; {SHAPES.verified} shapes validated by hl7apy "
          "(each run a fresh process's)")
    string_cpu = cpu / count
    count, elapsed, cpu = timed(lambda: render_all(sessions, now, tables))
    print(f"generated, warm:       {rate(count, elapsed, cpu)} (the same messages again)")
    fresh_process()
    count, elapsed, cpu = timed(lambda: len(dry_run_messages(generated, tables, now)[0]))
    print(f"generated, records:    {rate(count, elapsed, cpu)} (fresh; reading the run, control ids, build, "
          "validate)")
    count, elapsed, cpu = (sum(run[i] for run in reference) for i in range(3))
    print(f"hl7apy builder:        {rate(count, elapsed, cpu)} on {len(subset)} of the sessions; the string builder "
          f"(fresh) {cpu / count / string_cpu:.0f}x as fast per CPU second (runs interleaved)")

    report = process_paths(sorted((ROOT / "fixtures/fhir/scenarios").glob("*/input.json")), tables, now)
    fresh_process()
    built, elapsed, cpu = timed(lambda: sum(len(dry_run_messages(report, tables, now)[0]) for _ in range(rounds)))
    print(f"scenarios x{rounds}:         {rate(built, elapsed, cpu)} (fresh; records included)")

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
            client.close()
            if not result.sent or result.failures:
                raise SystemExit(f"bench: MLLP delivery sent {result.sent}, failures {result.failures[:1]}")
            print(f"delivered over MLLP:   {result.sent} messages for {len(patients)} patients in {elapsed:.2f} s "
                  f"= {result.sent / elapsed:.0f} messages/s (build, validate, record, send, ACK, mark sent); "
                  f"{client.connections} connection(s)")
            print(f"re-run, nothing new:   {rerun.sent} sent, {rerun.unchanged} unchanged in {rerun_elapsed:.2f} s")
        finally:
            listener.terminate()
            listener.wait(10)


if __name__ == "__main__":
    main()
