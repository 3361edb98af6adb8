"""`charge-adapter` as a real process with a config and a state of its own, and what the tests check it with.

Every process's output goes to the session's log scan (tests/logscan.py).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import requests

from adapter.client import FhirClient
from adapter.config import load_tables
from adapter.pipeline import process
from adapter.sources.files import SourcedResource
from adapter.state.sqlite import SqliteState
from tests import logscan

from .helpers import free_port, wait_for

TABLES = load_tables()
CHARGE_SYSTEM = TABLES.settings.charge_identifier_system
TOKEN = logscan.secret("test-receiver-token-not-a-secret")
HERE = Path(__file__).resolve().parent


ONLY_NEW = {"overlap_seconds": 0}
"""Poll settings for a test that counts what one pass did: no look-back before the cursor, so Procedures an
earlier test wrote in its last seconds (on the same server) are not picked up too."""


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class Adapter:
    """Runs `charge-adapter` as its own process. `sections` override the config (e.g. server={"url": ...});
    `wrapper` is a command the adapter runs under (a private mount namespace, see mount_ns.py)."""

    def __init__(self, tmp: Path, server_url: str, port: int | None = None, *, state_file: Path | None = None,
                 wrapper: list[str] | None = None, **sections: Any) -> None:
        self.tmp = tmp
        self.state = state_file or tmp / "state.sqlite"
        self.port = port or free_port()
        config = {"server": {"url": server_url}, "state": {"location": str(self.state)},
                  "poll": {"interval_seconds": 1, "overlap_seconds": 5, "page_size": 25},
                  "serve": {"port": self.port, "safety_poll_seconds": 0}}
        self.settings = merged(config, sections)
        self.config = tmp / "adapter.yaml"
        self.config.write_text(json.dumps(self.settings))
        self.env = {**os.environ, "CHARGE_ADAPTER_RECEIVER_TOKEN": TOKEN}
        self.wrapper = wrapper or []
        self.procs: list[subprocess.Popen[str]] = []

    def command(self, *args: str) -> list[str]:
        return [*self.wrapper, sys.executable, "-m", "adapter", "--config", str(self.config), *args]

    def cmd(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.command(*args), capture_output=True, text=True, env=self.env, timeout=timeout,
                                check=False)
        logscan.add_text(f"charge-adapter {' '.join(args)} (stderr)", result.stderr)
        return result

    def start(self, *args: str, verbose: str = "-v") -> subprocess.Popen[str]:
        path = self.tmp / f"adapter-{len(self.procs)}.log"
        log = path.open("w")
        logscan.add_file(path)
        proc = subprocess.Popen(self.command(verbose, *args), stdout=log, stderr=subprocess.STDOUT, text=True,
                                env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, index: int = 0) -> str:
        return (self.tmp / f"adapter-{index}.log").read_text()

    def start_cursor_at(self, cursor: str) -> None:
        SqliteState(self.state).set_cursor(cursor)

    def store(self) -> SqliteState:
        return SqliteState(self.state)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> tuple[int, dict[str, Any]]:
        answer = requests.get(f"{self.url}/healthz", timeout=5)
        return answer.status_code, answer.json()

    def metric(self, name: str) -> float | None:
        for line in requests.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def wait_healthy(self, timeout: float = 60) -> None:
        def up() -> bool:
            try:
                return requests.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False
        wait_for(up, timeout, "the adapter to answer /healthz with 200")

    def wait_listening(self, timeout: float = 60) -> None:
        def listening() -> bool:
            try:
                requests.get(f"{self.url}/healthz", timeout=2)
                return True
            except requests.ConnectionError:
                return False
        wait_for(listening, timeout, "the adapter to listen")

    def stop_all(self) -> None:
        """SIGTERM to each process group, then wait until the whole group is gone, not only the process we
        started: a wrapper such as `faketime` forks the adapter and dies at once on SIGTERM, which would leave
        the adapter running on with PPID 1. A group still alive after 30 s gets SIGUSR1 (its stacks) and SIGKILL."""
        for proc in self.procs:
            group = proc.pid
            if proc.poll() is not None and not live_members(group):
                continue
            with suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)
            if group_gone(proc, 30):
                continue
            with suppress(ProcessLookupError):
                os.killpg(group, signal.SIGUSR1)  # the stacks of the hung process, into its log
                time.sleep(1)
                os.killpg(group, signal.SIGKILL)
            if not group_gone(proc, 10):
                raise AssertionError(f"process group {group} ({' '.join(proc.args)}) outlived SIGKILL: "
                                     f"{live_members(group)}")


def live_members(group: int) -> list[int]:
    """The processes of a process group that have not exited (zombies have), read from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # state, ppid, pgrp, ...
        except OSError:
            continue  # exited while we looked
        if int(fields[2]) == group and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def group_gone(proc: subprocess.Popen[str], timeout: float) -> bool:
    """Whether `proc` exited and no process of its group is left, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None and not live_members(proc.pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)

def notify_put(adapter: Adapter, procedure: dict[str, Any], timeout: float = 10) -> requests.Response:
    """What a HAPI rest-hook Subscription with payload sends."""
    return requests.put(f"{adapter.url}/notify/Procedure/{procedure['id']}", data=json.dumps(procedure),
                        timeout=timeout, headers={"Authorization": f"Bearer {TOKEN}",
                                                  "Content-Type": "application/fhir+json"})


def notify_post(adapter: Adapter, body: dict[str, Any], timeout: float = 10) -> requests.Response:
    """What an integration engine (or a topic-based Subscription) sends."""
    return requests.post(f"{adapter.url}/notify", data=json.dumps(body), timeout=timeout,
                         headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"})


def charges(client: FhirClient, patients: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for start in range(0, len(patients), 100):
        out += client.search_all("ChargeItem", {"subject": ",".join(patients[start:start + 100]),
                                                "identifier": f"{CHARGE_SYSTEM}|", "_count": "1000"}, via_post=True)
    return out


def billed(client: FhirClient, patients: list[str]) -> list[tuple[str, float]]:
    return sorted((c["code"]["text"], c["quantity"]["value"]) for c in charges(client, patients)
                  if c["status"] == "billable")


def identifiers_on_server(client: FhirClient, patients: list[str]) -> Counter[str]:
    return Counter(c["identifier"][0]["value"] for c in charges(client, patients))


def expected_identifiers(resources: list[dict[str, Any]]) -> Counter[str]:
    report = process([SourcedResource(r, "generated") for r in resources], TABLES)
    return Counter(ci["identifier"][0]["value"] for s in report.built.sessions for ci in s.charge_items)


@functools.cache
def _unshare() -> tuple[str, ...]:
    """How to get a private mount namespace here; fails the test with the reason when the machine allows none."""
    unshare = ("unshare", "--mount", "--propagation", "private")
    if os.geteuid() != 0:
        unshare = ("unshare", "--user", "--map-root-user", "--mount", "--propagation", "private")
    probe = subprocess.run([*unshare, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/mnt"], capture_output=True,
                           text=True, check=False)
    if probe.returncode != 0:
        pytest.fail(f"this test stages a real filesystem fault in a private mount namespace, which this machine "
                    f"refuses ({' '.join(unshare)}: {probe.stderr.strip()}); run as root or allow user namespaces",
                    pytrace=False)
    return unshare


def mount_namespace(*options: str) -> list[str]:
    """A wrapper that runs a command in a private mount namespace prepared by mount_ns.py (e.g. a small
    tmpfs, a read-only bind mount). Root uses a mount namespace; anyone else a user namespace as well."""
    return [*_unshare(), sys.executable, str(HERE / "mount_ns.py"), *options, "--"]


def until(check: Any, timeout: float, every: float = 0.2) -> float:
    """Seconds until `check()` held (raises after `timeout`)."""
    started = time.monotonic()
    wait_for(check, timeout, "the condition", every)
    return time.monotonic() - started
