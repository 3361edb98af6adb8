"""Receiver figures against a real HAPI server and a real `charge-adapter serve` process:

1. notification-to-ChargeItem latency, p50/p95, for (a) HAPI's rest-hook Subscription delivery and (b) an
   integration engine pushing the Procedure straight to the receiver;
2. drain rate of a queued backlog: N Procedures already in the durable queue when `serve` starts.

A Procedure counts as charged when `serve` records its outcome in the state (after its ChargeItems are on the
server): the bench reads that time from the state file, so nothing but the adapter's own work and HAPI's
delivery runs while a latency or the drain is timed (no searches on HAPI); that the ChargeItems are on HAPI is
checked afterwards. Everything the bench loads and the adapter writes is deleted at the end, and the
Subscription too, also after a failure.

    scripts/hapi start
    .venv/bin/python bench/bench_notifications.py --server http://127.0.0.1:8089/fhir [--samples 20] [--backlog 500]
    .venv/bin/python bench/bench_notifications.py --server ... --smoke      (2 samples, backlog 20: for CI)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cleanup import remove
from generate import generate, put_all

from adapter.client import FhirClient
from adapter.config import load_tables
from adapter.errors import AdapterError
from adapter.state.base import WorkItem
from adapter.state.sqlite import SqliteState

TOKEN = "bench-token"
CHARGE_SYSTEM = load_tables().settings.charge_identifier_system


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def charge_count(client: FhirClient, patient: str) -> int:
    page = next(client.search("ChargeItem", {"subject": patient, "identifier": f"{CHARGE_SYSTEM}|",
                                             "_summary": "count"}))
    return int(page.get("total", 0))


def recorded_at(state: Path, procedures: list[str], timeout: float = 60, every: float = 0.2) -> float:
    """When `serve` recorded the outcome of the last of `procedures` (Procedure/x), as time.time(): read from its
    state file, which the bench only reads (every `every` s, which does not change the figure)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=10) as db:
            marks = ",".join("?" * len(procedures))
            done, last = db.execute(f"SELECT count(DISTINCT procedure), max(at) FROM processed WHERE procedure IN "
                                    f"({marks})", procedures).fetchone()
        if done >= len(procedures):
            return float(last)
        time.sleep(every)
    raise RuntimeError(f"serve recorded no outcome for {len(procedures)} Procedure(s) ({procedures[0]}...) after "
                       f"{timeout} s")


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms (n={len(ordered)})"


class Serve:
    def __init__(self, server: str, tmp: Path, sub_id: str) -> None:
        self.subscription = sub_id
        self.port = free_port()
        self.state = tmp / "state.sqlite"
        self.config = tmp / "adapter.yaml"
        self.config.write_text(json.dumps({
            "server": {"url": server}, "state_path": str(self.state),
            "serve": {"port": self.port, "safety_poll_seconds": 0, "subscription_id": sub_id}}))
        self.env = {**os.environ, "CHARGE_ADAPTER_RECEIVER_TOKEN": TOKEN}
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "adapter", "--config", str(self.config), *args], env=self.env,
                       check=True, capture_output=True)

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "adapter", "--config", str(self.config), "serve"],
                                     env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("serve did not come up")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True)
    parser.add_argument("--samples", type=int, default=None, help="default 20 (2 with --smoke)")
    parser.add_argument("--backlog", type=int, default=None, help="default 500 (20 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the bench works")
    args = parser.parse_args()
    samples = args.samples or (2 if args.smoke else 20)
    backlog = args.backlog or (20 if args.smoke else 500)
    client = FhirClient(args.server)
    run = uuid.uuid4().hex[:6]
    loaded: list[dict[str, Any]] = []
    subscription = f"bench-{run}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            serve = Serve(args.server, Path(tmp), subscription)
            measure(client, serve, run, samples, backlog, loaded)
    finally:
        delete_subscription(client, subscription)
        started = time.perf_counter()
        removed = remove(client, loaded)
        print(f"removed {removed} resources and Subscription/{subscription} from the server in "
              f"{time.perf_counter() - started:.1f} s")


def delete_subscription(client: FhirClient, subscription: str) -> None:
    try:
        client.delete("Subscription", subscription)
    except AdapterError as exc:  # never created (serve did not start): nothing to remove
        if "404" not in str(exc) and "410" not in str(exc):
            raise


Resources = list[dict[str, Any]]


def sample(prefix: str, seed: int, loaded: Resources) -> tuple[Resources, str]:
    """One generated Procedure with its patient's resources (remembered in `loaded` for the cleanup), and its
    reference."""
    resources = list(generate(1, prefix=prefix, seed=seed))
    loaded += resources
    proc = next(r for r in resources if r["resourceType"] == "Procedure")
    return resources, f"Procedure/{proc['id']}"


def delivering(client: FhirClient, serve: Serve, run: str, loaded: Resources, attempts: int = 6) -> None:
    """Wait, outside the timed samples, until HAPI delivers: its REST API says a Subscription is `active` before
    its matcher has loaded it, so a write in the first seconds may never be notified (`serve`'s safety poll
    covers that in production; the bench turns it off). Each attempt is a new Procedure, so a new notification."""
    for attempt in range(attempts):
        resources, proc = sample(f"l{run}w{attempt}-", 1000 + attempt, loaded)
        put_all(client, resources)
        try:
            recorded_at(serve.state, [proc], timeout=15)
            return
        except RuntimeError:
            continue
    raise RuntimeError(f"HAPI delivered no notification for Subscription/{serve.subscription} in {attempts} "
                       "attempts of 15 s")


def measure(client: FhirClient, serve: Serve, run: str, samples: int, backlog: int,
            loaded: list[dict[str, Any]]) -> None:
    serve.start()
    try:
        serve.cli("subscribe")
        delivering(client, serve, run, loaded)
        hapi: list[float] = []
        for i in range(samples):
            resources, proc = sample(f"l{run}h{i}-", i, loaded)
            started = time.time()
            put_all(client, resources)
            hapi.append(recorded_at(serve.state, [proc]) - started)
        client.delete("Subscription", serve.subscription)
        time.sleep(6)  # HAPI keeps delivering for a few seconds after the delete
        pushed: list[float] = []
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
        for i in range(samples):
            resources, proc = sample(f"l{run}e{i}-", i, loaded)
            put_all(client, resources)
            body = json.dumps(next(r for r in resources if r["resourceType"] == "Procedure"))
            started = time.time()
            requests.post(f"http://127.0.0.1:{serve.port}/notify", data=body, headers=headers,
                          timeout=10).raise_for_status()
            pushed.append(recorded_at(serve.state, [proc]) - started)
    finally:
        serve.stop()
    charged = [r["subject"]["reference"] for r in loaded if r["resourceType"] == "Procedure"]
    missing = [p for p in charged if not charge_count(client, p)]
    if missing:
        raise SystemExit(f"bench: recorded as done but no ChargeItem on the server for {missing[:3]}")
    print(f"latency, HAPI rest-hook Subscription -> ChargeItem: {percentiles(hapi)}")
    print(f"latency, engine push to the receiver -> ChargeItem: {percentiles(pushed)}")

    # drain rate: a backlog already in the durable queue when serve starts
    resources = list(generate(backlog, prefix=f"d{run}"))
    loaded += resources
    put_all(client, resources)
    store = SqliteState(serve.state)
    procedures = [r for r in resources if r["resourceType"] == "Procedure"]
    store.enqueue([WorkItem("procedure", {"resource": p}, "rest-hook") for p in procedures])
    store.close()
    started = time.time()
    serve.start()
    try:
        finished = recorded_at(serve.state, [f"Procedure/{p['id']}" for p in procedures], timeout=600, every=0.5)
    finally:
        serve.stop()
    elapsed = finished - started
    missing = [p for p in {p["subject"]["reference"] for p in procedures} if not charge_count(client, p)]
    if missing:
        raise SystemExit(f"bench: backlog drained but no ChargeItem on the server for {missing[:3]}")
    print(f"drain: {len(procedures)} queued Procedures in {elapsed:.1f} s = {len(procedures) / elapsed:.0f} "
          f"Procedures/s (including serve start-up)")


if __name__ == "__main__":
    main()
