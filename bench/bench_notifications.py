"""Receiver figures against a real HAPI server and a real `charge-adapter serve` process:

1. notification-to-ChargeItem latency, p50/p95, for (a) HAPI's rest-hook Subscription delivery and (b) an
   integration engine pushing the Procedure straight to the receiver;
2. drain rate of a queued backlog: N Procedures already in the durable queue when `serve` starts.

    scripts/hapi start
    .venv/bin/python bench/bench_notifications.py --server http://127.0.0.1:8089/fhir [--samples 20] [--backlog 500]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import generate, put_all

from adapter.client import FhirClient
from adapter.state.base import WorkItem
from adapter.state.sqlite import SqliteState

TOKEN = "bench-token"
CHARGE_SYSTEM = "http://fhir-charge-adapter.example.org/fhir/NamingSystem/charge-line"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def charge_count(client: FhirClient, patient: str) -> int:
    page = next(client.search("ChargeItem", {"subject": patient, "identifier": f"{CHARGE_SYSTEM}|",
                                             "_summary": "count"}))
    return int(page.get("total", 0))


def wait_charged(client: FhirClient, patient: str, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if charge_count(client, patient):
            return time.monotonic()
        time.sleep(0.05)
    raise RuntimeError(f"no ChargeItem for {patient} after {timeout} s")


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms (n={len(ordered)})"


class Serve:
    def __init__(self, server: str, tmp: Path, sub_id: str) -> None:
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
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--backlog", type=int, default=500)
    args = parser.parse_args()
    client = FhirClient(args.server)
    run = uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory() as tmp:
        serve = Serve(args.server, Path(tmp), f"bench-{run}")
        serve.start()
        try:
            serve.cli("subscribe")
            hapi: list[float] = []
            for i in range(args.samples):
                resources = list(generate(1, prefix=f"l{run}h{i}-", seed=i))
                started = time.monotonic()
                put_all(client, resources)
                hapi.append(wait_charged(client, f"Patient/l{run}h{i}-1-pat") - started)
            client.delete("Subscription", f"bench-{run}")
            time.sleep(6)  # HAPI keeps delivering for a few seconds after the delete
            pushed: list[float] = []
            headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
            for i in range(args.samples):
                resources = list(generate(1, prefix=f"l{run}e{i}-", seed=i))
                put_all(client, resources)
                proc = next(r for r in resources if r["resourceType"] == "Procedure")
                started = time.monotonic()
                requests.post(f"http://127.0.0.1:{serve.port}/notify", data=json.dumps(proc), headers=headers,
                              timeout=10).raise_for_status()
                pushed.append(wait_charged(client, f"Patient/l{run}e{i}-1-pat") - started)
        finally:
            serve.stop()
        print(f"latency, HAPI rest-hook Subscription -> ChargeItem: {percentiles(hapi)}")
        print(f"latency, engine push to the receiver -> ChargeItem: {percentiles(pushed)}")

        # drain rate: a backlog already in the durable queue when serve starts
        resources = list(generate(args.backlog, prefix=f"d{run}"))
        put_all(client, resources)
        store = SqliteState(serve.state)
        procedures = [r for r in resources if r["resourceType"] == "Procedure"]
        store.enqueue([WorkItem("procedure", {"resource": p}, "rest-hook") for p in procedures])
        started = time.monotonic()
        serve.start()
        try:
            while store.queue_depth():
                time.sleep(0.05)
            elapsed = time.monotonic() - started
        finally:
            serve.stop()
        last = procedures[-1]["subject"]["reference"]
        assert charge_count(client, last), "backlog drained but the last patient has no charge"
        print(f"drain: {len(procedures)} queued Procedures in {elapsed:.1f} s = {len(procedures) / elapsed:.0f} "
              f"Procedures/s (including serve start-up)")


if __name__ == "__main__":
    main()
