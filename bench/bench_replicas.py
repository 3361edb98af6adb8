"""Backlog drain rate with 1, 2 and 3 `run` replicas on one PostgreSQL state and one HAPI server, next to the
HAPI-bound ceiling: the same session transactions written raw (no reads, no coding), one at a time and from as
many threads as there are replicas.

Each round loads N generated Procedures (fresh ids) into HAPI, creates a fresh database for the state, starts
the replicas as real processes with the cursor at the server's clock, and times from their start until every
expected ChargeItem is on the server and the shared queue is empty.

    scripts/hapi start; scripts/postgres start      # each prints its URL last
    .venv/bin/python bench/bench_replicas.py --server http://127.0.0.1:8089/fhir \\
        --postgres postgresql://charge-adapter-pg@127.0.0.1:55432/charge_adapter [--procedures 1000] [--replicas 1 2 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sync import _session_bundles
from generate import generate, put_all

from adapter.client import FhirClient
from adapter.config import load_tables
from adapter.pipeline import process
from adapter.sources.files import SourcedResource
from adapter.state import open_state
from adapter.sync import Syncer

TABLES = load_tables()
CHARGE_SYSTEM = TABLES.settings.charge_identifier_system


@contextmanager
def fresh_database(base_url: str) -> Iterator[str]:
    """A new, empty database on the cluster of `base_url` for one round (dropped afterwards)."""
    import psycopg

    name = "bench_" + uuid.uuid4().hex[:10]
    with psycopg.connect(base_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(base_url)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(base_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def round_with(replicas: int, args: argparse.Namespace, client: FhirClient, tmp: Path) -> tuple[float, int]:
    prefix = f"q{replicas}" + uuid.uuid4().hex[:5]
    resources = list(generate(args.procedures, prefix=prefix))
    report = process([SourcedResource(r, "generated") for r in resources], TABLES)
    wanted = {ci["identifier"][0]["value"] for s in report.built.sessions for ci in s.charge_items}
    patients = sorted(f"Patient/{r['id']}" for r in resources if r["resourceType"] == "Patient")
    with fresh_database(args.postgres) as url:
        state = open_state(url)
        state.set_cursor(next(client.search("Procedure", {"_count": "0"}))["meta"]["lastUpdated"])
        put_all(client, resources, 500)
        procs = []
        config = {"server": {"url": args.server}, "state": {"location": url},
                  "poll": {"interval_seconds": 1, "overlap_seconds": 5, "page_size": 100},
                  "worker": {"batch": 10, "lease_seconds": 30, "retry_initial_seconds": 0.5, "retry_max_seconds": 5}}
        started = time.perf_counter()
        for i in range(replicas):
            config["serve"] = {"port": 18100 + i, "safety_poll_seconds": 0}
            path = tmp / f"{prefix}-{i}.yaml"
            path.write_text(json.dumps(config))
            log = (tmp / f"{prefix}-{i}.log").open("w")
            procs.append(subprocess.Popen([sys.executable, "-m", "adapter", "--config", str(path), "run"],
                                          stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()))
        try:
            while True:
                time.sleep(0.5)
                found = on_server(client, patients)
                if found >= wanted and state.queue_depth() == 0:
                    break
                if time.perf_counter() - started > args.timeout:
                    raise SystemExit(f"{replicas} replica(s): not drained after {args.timeout} s "
                                     f"({len(found & wanted)}/{len(wanted)} charges)")
            elapsed = time.perf_counter() - started
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(60)
            state.close()
    return elapsed, len(report.facts)


def on_server(client: FhirClient, patients: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(patients), 200):
        for item in client.search_all("ChargeItem", {"subject": ",".join(patients[start:start + 200]),
                                                     "identifier": f"{CHARGE_SYSTEM}|", "_count": "1000",
                                                     "_elements": "identifier"}, via_post=True):
            found.add(item["identifier"][0]["value"])
    return found


def raw_ceiling(args: argparse.Namespace, client: FhirClient, threads: int) -> tuple[float, int, int]:
    """The session transactions of a fresh backlog written bare, from `threads` threads: what HAPI can take."""
    prefix = f"raw{threads}" + uuid.uuid4().hex[:5]
    resources = list(generate(args.procedures, prefix=prefix))
    since = next(client.search("Procedure", {"_count": "0"}))["meta"]["lastUpdated"]
    put_all(client, resources, 500)
    bundles = [re.sub(r'("value": "|\|)fna-', rf"\1{prefix}x-", b) for b in _session_bundles(Syncer(client, TABLES),
                                                                                             since)]
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda text: client.transaction(json.loads(text)), bundles))
    procedures = sum(1 for r in resources if r["resourceType"] == "Procedure")
    return time.perf_counter() - started, procedures, len(bundles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True)
    parser.add_argument("--postgres", required=True, help="a URL on the cluster; each round gets a database of its own")
    parser.add_argument("--procedures", type=int, default=1000)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    client = FhirClient(args.server, pool_size=8)
    client.check_server()
    print(f"{args.procedures} Procedures per round, {os.cpu_count()} cores; HAPI and PostgreSQL on this machine")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.replicas:
            elapsed, procedures = round_with(n, args, client, Path(tmp))
            print(f"{n} replica(s): drained {procedures} Procedures in {elapsed:.1f} s = "
                  f"{procedures / elapsed:.0f} Procedures/s (from process start, start-up included)")
    for threads in sorted({1, max(args.replicas)}):
        elapsed, procedures, transactions = raw_ceiling(args, client, threads)
        print(f"HAPI ceiling, raw session transactions from {threads} thread(s): {transactions} in {elapsed:.1f} s = "
              f"{procedures / elapsed:.0f} Procedures/s")


if __name__ == "__main__":
    main()
