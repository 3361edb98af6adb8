"""Several replicas on one PostgreSQL state and one HAPI server, as real processes: `run` and `serve` share the
work, a replica killed with SIGKILL loses nothing, the same notification delivered to two replicas is processed
once, and `status` shows who holds what."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapter.client import FhirClient
from adapter.extraction.index import seen_version
from adapter.pipeline import process
from adapter.sources.files import SourcedResource
from adapter.state import open_state
from adapter.state.base import StateBackend

from .adapter_process import TABLES, Adapter, charges, expected_identifiers, notify_put
from .helpers import namespaced, patients_of, resources_of, server_now, wait_for

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from generate import generate, put_all  # noqa: E402

LEASE_SECONDS = 10
"""The shortest lease the settings allow: a killed replica's work comes back this soon."""


class Replicas:
    """Adapter processes, each with its own config and port, all on one state."""

    def __init__(self, tmp: Path, hapi_url: str, state_url: str) -> None:
        self.tmp, self.hapi_url, self.state_url = tmp, hapi_url, state_url
        self.adapters: list[Adapter] = []
        self.running: dict[int, subprocess.Popen[str]] = {}
        self.commands: dict[int, str] = {}

    def start(self, command: str) -> int:
        index = len(self.adapters)
        folder = self.tmp / f"replica-{index}"
        folder.mkdir()
        adapter = Adapter(folder, self.hapi_url, state={"location": self.state_url},
                          worker={"lease_seconds": LEASE_SECONDS, "batch": 10, "retry_initial_seconds": 0.5,
                                  "retry_max_seconds": 5})
        self.adapters.append(adapter)
        self.running[index] = adapter.start(command)
        self.commands[index] = command
        return index

    def holder_of(self, role: str, state: StateBackend) -> list[int]:
        """The running replica that holds `role`, if any (instance ids are host:pid:random)."""
        pids = {int(r.instance.split(":")[-2]) for r in state.replicas() if role in r.roles}
        return [i for i, proc in self.running.items() if proc.pid in pids]

    def kill(self, index: int) -> None:
        proc = self.running.pop(index)
        proc.kill()  # SIGKILL: no clean shutdown, leases and claims left behind
        proc.wait(30)

    def stop_all(self) -> None:
        for adapter in self.adapters:
            adapter.stop_all()

    def status(self) -> str:
        result = self.adapters[0].cmd("status")
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture
def replicas(tmp_path: Path, hapi_url: str, pg_url: str) -> Iterator[Replicas]:
    group = Replicas(tmp_path, hapi_url, pg_url)
    yield group
    group.stop_all()


def with_reviews(resources: list[dict[str, Any]], every: int) -> list[dict[str, Any]]:
    """Every `every`-th Procedure loses its guidance evidence: it and its session go to review."""
    procedures = [r for r in resources if r["resourceType"] == "Procedure"]
    for proc in procedures[::every]:
        proc["extension"] = [e for e in proc["extension"] if not e["url"].endswith("procedure-method")]
    return resources


def open_reviews(state: StateBackend, prefix: str) -> set[tuple[str, str]]:
    return {(e.procedure, e.reason) for e in state.reviews() if e.procedure.startswith(f"Procedure/{prefix}")}


def versions_on_server(client: FhirClient, kind: str, patients: list[str]) -> Counter[str]:
    found: Counter[str] = Counter()
    param = "subject" if kind == "ChargeItem" else "patient"
    for start in range(0, len(patients), 100):
        for resource in client.search_all(kind, {param: ",".join(patients[start:start + 100]), "_count": "1000"},
                                          via_post=True):
            found[resource["meta"]["versionId"]] += 1
    return found


@pytest.mark.bulk
def test_three_replicas_drain_a_backlog_while_one_is_killed_twice(
        client: FhirClient, replicas: Replicas, fhir_ns: str) -> None:
    prefix = f"{fhir_ns}r"
    resources = with_reviews(list(generate(2000, prefix=prefix, seed=11)), every=97)
    patients = patients_of(resources)
    expected = expected_identifiers(resources)
    single = process([SourcedResource(r, "generated") for r in resources], TABLES)
    wanted_reviews = {(r.procedure, r.reason) for r in single.reviews}
    assert wanted_reviews, "the backlog should hold Procedures that need review"

    state = open_state(replicas.state_url)
    state.set_cursor(server_now(client))
    put_all(client, resources)
    seed = random.randrange(1 << 30)
    print(f"kill moments from random seed {seed}")  # shown when the test fails, to replay the same moments
    rng = random.Random(seed)
    for command in ("run", "serve", "run"):
        replicas.start(command)

    # first kill: the replica that holds the poll role, while it queues the backlog (or just after)
    [poller] = wait_for(lambda: replicas.holder_of("poll", state), 120, "a replica to take the poll role")
    time.sleep(rng.uniform(0.0, 2.0))
    replicas.kill(poller)
    replicas.start("run")
    # second kill: a replica chosen at random while the workers code
    wait_for(lambda: len(charges(client, patients)) >= 200, 240, "the first charges", 0.5)
    time.sleep(rng.uniform(0.5, 3.0))
    victim = rng.choice(sorted(replicas.running))
    command = replicas.commands[victim]
    replicas.kill(victim)
    replicas.start(command)

    status = replicas.status()  # while they work: every replica, what it holds, the backlog
    assert "replicas:" in status and "work item(s) leased" in status and "queue:" in status, status

    def drained() -> bool:
        return state.queue_depth() == 0 and sum(identifiers(client, patients).values()) == sum(expected.values())

    wait_for(drained, 600, "the replicas to drain the backlog", 2.0)
    on_server = identifiers(client, patients)
    assert on_server == expected  # none missing, none twice
    # what one process writes on a fresh backlog: every ChargeItem and Claim once, never a second version
    assert set(versions_on_server(client, "ChargeItem", patients)) == {"1"}
    assert set(versions_on_server(client, "Claim", patients)) == {"1"}
    assert open_reviews(state, prefix) == wanted_reviews
    assert len(state.replicas()) == 5  # three running, two killed
    wait_for(lambda: "replicas:  3 alive, 2 silent" in replicas.status(), 60, "the killed replicas to fall silent")


def identifiers(client: FhirClient, patients: list[str]) -> Counter[str]:
    return Counter(c["identifier"][0]["value"] for c in charges(client, patients))


def test_the_same_notification_to_two_replicas_at_once_is_processed_once(
        client: FhirClient, replicas: Replicas, fhir_ns: str) -> None:
    bundle = namespaced("02", fhir_ns)  # one ultrasound-guided FNA
    client.transaction(bundle)
    [proc] = [r for r in resources_of(bundle) if r["resourceType"] == "Procedure"]
    stored = client.read("Procedure", proc["id"])
    first, second = replicas.start("serve"), replicas.start("serve")
    for index in (first, second):
        replicas.adapters[index].wait_healthy()
    answers: list[int] = []
    barrier = threading.Barrier(2)

    def deliver(index: int) -> None:
        barrier.wait()
        answers.append(notify_put(replicas.adapters[index], stored).status_code)

    threads = [threading.Thread(target=deliver, args=(i,)) for i in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers == [200, 200]
    patients = patients_of(bundle)
    wait_for(lambda: charges(client, patients), 60, "the charge")
    state = open_state(replicas.state_url)
    wait_for(lambda: state.queue_depth() == 0, 60, "both notifications handled")
    time.sleep(2)  # a second coding, if there were one, would have had time to write
    written = charges(client, patients)
    assert identifiers(client, patients) == expected_identifiers(resources_of(bundle))
    assert {c["meta"]["versionId"] for c in written} == {"1"}
    reference = f"Procedure/{proc['id']}"
    assert len(state.audit_for(reference)) == 1  # written once, by one replica
    coded = [replicas.adapters[i].metric("charge_adapter_coded_total") or 0 for i in (first, second)]
    assert sorted(coded) == [0, 1]  # and coded once: the other replica found it queued once, or already done
    assert state.seen(reference, seen_version(stored))


def test_status_shows_the_replicas_and_what_each_holds(replicas: Replicas) -> None:
    replicas.start("run")
    replicas.start("serve")
    state = open_state(replicas.state_url)
    wait_for(lambda: len(state.replicas()) == 2 and any(r.roles for r in state.replicas()), 60,
             "both replicas to beat and one to hold the poll role")
    status = replicas.status()
    assert "replicas:  2 alive, 0 silent" in status, status
    assert status.count("roles poll;") == 1, status
    replicas.stop_all()  # a clean stop (SIGTERM) gives the role up at once, without waiting for its lease
    assert not any(r.roles for r in state.replicas())
