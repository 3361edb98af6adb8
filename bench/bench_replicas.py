"""Backlog drain rate with 1, 2 and 3 `run` replicas on one PostgreSQL state and one HAPI server, next to the
HAPI-bound ceiling: the same session transactions written raw (no reads, no coding), one at a time and from as
many threads as there are replicas.

Each round loads N generated Procedures (fresh ids) into HAPI, creates a fresh database for the state, starts
the replicas as real processes with the cursor at the server's clock, and times from their start until the
replicas recorded the outcome of the last Procedure (read from the state afterwards: the bench only counts rows
in PostgreSQL once a second while the replicas work, and searches HAPI for the expected ChargeItems after the
clock stopped). Everything loaded and written is deleted from HAPI at the end, also after a failure.

    scripts/hapi start; scripts/postgres start      # each prints its URL last
    .venv/bin/python bench/bench_replicas.py --server http://127.0.0.1:8089/fhir \\
        --postgres postgresql://charge-adapter-pg@127.0.0.1:55432/charge_adapter [--procedures 1000] [--replicas 1 2 3]
    .venv/bin/python bench/bench_replicas.py --server ... --postgres ... --smoke   (20 Procedures, 1 replica: CI)
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
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sync import _session_bundles
from cleanup import remove
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


def round_with(replicas: int, args: argparse.Namespace, client: FhirClient, tmp: Path,
               loaded: list[dict[str, Any]]) -> tuple[float, int]:
    import psycopg

    prefix = f"q{replicas}" + uuid.uuid4().hex[:5]
    resources = list(generate(args.procedures, prefix=prefix))
    loaded += resources
    report = process([SourcedResource(r, "generated") for r in resources], TABLES)
    wanted = {ci["identifier"][0]["value"] for s in report.built.sessions for ci in s.charge_items}
    patients = sorted(f"Patient/{r['id']}" for r in resources if r["resourceType"] == "Patient")
    procedures = sum(1 for r in resources if r["resourceType"] == "Procedure")
    with fresh_database(args.postgres) as url:
        state = open_state(url)
        state.set_cursor(next(client.search("Procedure", {"_count": "0"}))["meta"]["lastUpdated"])
        state.close()
        put_all(client, resources, 500)
        procs = []
        config = {"server": {"url": args.server}, "state": {"location": url},
                  "poll": {"interval_seconds": 1, "overlap_seconds": 5, "page_size": 100},
                  "worker": {"batch": 10, "lease_seconds": 30, "retry_initial_seconds": 0.5, "retry_max_seconds": 5}}
        with psycopg.connect(url, autocommit=True) as db:
            started = time.time()
            for i in range(replicas):
                config["serve"] = {"port": 18100 + i, "safety_poll_seconds": 0}
                path = tmp / f"{prefix}-{i}.yaml"
                path.write_text(json.dumps(config))
                log = (tmp / f"{prefix}-{i}.log").open("w")
                procs.append(subprocess.Popen([sys.executable, "-m", "adapter", "--config", str(path), "run"],
                                              stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()))
            try:
                finished = wait_recorded(db, procedures, started, args.timeout, replicas)
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    proc.wait(60)
    found = on_server(client, patients)  # after the clock stopped
    if not found >= wanted:
        raise SystemExit(f"{replicas} replica(s): {len(wanted - found)} of {len(wanted)} charges are not on the "
                         "server although every Procedure was recorded as done")
    return finished - started, len(report.facts)


def wait_recorded(db: Any, procedures: int, started: float, timeout: float, replicas: int) -> float:
    """When the replicas recorded the last of `procedures` outcomes with the queue empty (time.time()), read from
    the state once a second: how often it is read does not change the figure."""
    while True:
        time.sleep(1)
        done, last, queued = db.execute(
            "SELECT count(*), max(at), (SELECT count(*) FROM queue WHERE status IN ('pending', 'leased')) "
            "FROM processed").fetchone()
        if done >= procedures and queued == 0:
            return float(last)
        if time.time() - started > timeout:
            raise SystemExit(f"{replicas} replica(s): not drained after {timeout} s ({done}/{procedures} "
                             f"Procedures recorded, {queued} queued)")


def on_server(client: FhirClient, patients: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(patients), 200):
        for item in client.search_all("ChargeItem", {"subject": ",".join(patients[start:start + 200]),
                                                     "identifier": f"{CHARGE_SYSTEM}|", "_count": "1000",
                                                     "_elements": "identifier"}, via_post=True):
            found.add(item["identifier"][0]["value"])
    return found


def raw_ceiling(args: argparse.Namespace, client: FhirClient, threads: int,
                loaded: list[dict[str, Any]]) -> tuple[float, int, int]:
    """The session transactions of a fresh backlog written bare, from `threads` threads: what HAPI can take."""
    prefix = f"raw{threads}" + uuid.uuid4().hex[:5]
    resources = list(generate(args.procedures, prefix=prefix))
    loaded += resources
    since = next(client.search("Procedure", {"_count": "0"}))["meta"]["lastUpdated"]
    put_all(client, resources, 500)
    bundles = [json.loads(re.sub(r'("value": "|\|)fna-', rf"\1{prefix}x-", b))
               for b in _session_bundles(Syncer(client, TABLES), since)]  # parsed before the clock starts
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(client.transaction, bundles))
    procedures = sum(1 for r in resources if r["resourceType"] == "Procedure")
    return time.perf_counter() - started, procedures, len(bundles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True)
    parser.add_argument("--postgres", required=True, help="a URL on the cluster; each round gets a database of its own")
    parser.add_argument("--procedures", type=int, default=None, help="default 1000 (20 with --smoke)")
    parser.add_argument("--replicas", type=int, nargs="+", default=None, help="default 1 2 3 (1 with --smoke)")
    parser.add_argument("--timeout", type=float, default=None, help="per round, default 900 s (120 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the bench works")
    args = parser.parse_args()
    args.procedures = args.procedures or (20 if args.smoke else 1000)
    args.replicas = args.replicas or ([1] if args.smoke else [1, 2, 3])
    args.timeout = args.timeout or (120 if args.smoke else 900)
    client = FhirClient(args.server, pool_size=8)
    client.check_server()
    print(f"{args.procedures} Procedures per round, {os.cpu_count()} cores; HAPI and PostgreSQL on this machine")
    loaded: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in args.replicas:
                elapsed, procedures = round_with(n, args, client, Path(tmp), loaded)
                print(f"{n} replica(s): drained {procedures} Procedures in {elapsed:.1f} s = "
                      f"{procedures / elapsed:.0f} Procedures/s (from process start, start-up included)")
        for threads in sorted({1, max(args.replicas)}):
            elapsed, procedures, transactions = raw_ceiling(args, client, threads, loaded)
            print(f"HAPI ceiling, raw session transactions from {threads} thread(s): {transactions} in {elapsed:.1f} s "
                  f"= {procedures / elapsed:.0f} Procedures/s")
    finally:
        started = time.perf_counter()
        removed = remove(client, loaded)
        print(f"removed {removed} resources from the server in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
