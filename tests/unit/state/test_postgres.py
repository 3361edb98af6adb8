"""What only the PostgreSQL backend has: its migrations, several replicas at once on real connections, a server
that goes away, and the messages for a wrong database, role or password (never showing the password)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from adapter.errors import StateSchemaError, StateUnavailable
from adapter.hl7v2.ledgers import open_ledger
from adapter.hl7v2.pg_ledger import LEDGER_MIGRATIONS, PostgresLedger
from adapter.state import open_state
from adapter.state.base import WorkItem, patient_work
from adapter.state.pgurl import parse
from adapter.state.postgres import MIGRATIONS, SCHEMA_VERSION, VERSION_TABLE, VERSION_TABLE_DDL, PostgresState
from tests import logscan, pg


def poll(reason: str = "ping") -> WorkItem:
    return WorkItem("poll", {"reason": reason}, "rest-hook")


def backend_pid(state: PostgresState) -> int:
    return int(state.transaction(lambda cur: cur.execute("SELECT pg_backend_pid()").fetchone()[0]))  # type: ignore[index]


def in_threads(count: int, work: Callable[[int, threading.Barrier], Any]) -> list[Any]:
    """Run `work(index, barrier)` in `count` threads that start together; their results, or their exception."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = work(index, barrier)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    return results


# -- migrations ---------------------------------------------------------------------------------------------------

def create_version_1(url: str, schema: str) -> None:
    """The state as the previous release created it (schema version 1), with rows of every kind in it."""
    with pg.admin(url) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'SET search_path TO "{schema}"')
        with conn.transaction():
            conn.execute(VERSION_TABLE_DDL)
            for statement in dict(MIGRATIONS)[1]:
                conn.execute(statement)
            conn.execute(f"INSERT INTO {VERSION_TABLE} VALUES ('state', 1, 1.0, '0.1.0')")
            conn.execute("INSERT INTO cursor VALUES ('poll', '2026-03-01T10:00:00Z', 1.0)")
            conn.execute("INSERT INTO processed VALUES ('Procedure/a', '3', 'coded', 1.0)")
            conn.execute("INSERT INTO queue (kind, payload, source, received_at, status, attempts, lease_until, "
                         "dedupe, leased_by) VALUES ('patient', '{\"reference\":\"Patient/1\"}', 'retry', 1.0, "
                         "'leased', 1, 2.0, 'patient:Patient/1', 'old-replica')")
            conn.execute("INSERT INTO queue (kind, payload, source, received_at) VALUES "
                         "('poll', '{\"reason\":\"ping\"}', 'rest-hook', 1.5)")
            conn.execute("INSERT INTO review (procedure, patient, kind, reason, detail, attempts, first_seen, "
                         "last_seen, patients) VALUES ('Procedure/b', 'Patient/2', 'needs-review', 'modality-missing', "
                         "'no modality', 1, 1.0, 1.0, '[\"Patient/2\"]')")
            conn.execute("INSERT INTO audit (at, procedure, version, session, codes, table_version, written) VALUES "
                         "(1.0, 'Procedure/a', '3', 's', '[\"10005 x1\"]', 't1', '[\"ChargeItem/c/_history/1\"]')")
            conn.execute("INSERT INTO events VALUES ('Subscription/s', 41)")
            conn.execute("INSERT INTO replicas VALUES ('old-replica', 1.0, 2.0)")


def test_a_state_of_the_previous_schema_version_opens_and_upgrades(postgres_url: str) -> None:
    schema = pg.new_schema()
    url = pg.with_schema(postgres_url, schema)
    try:
        create_version_1(postgres_url, schema)
        with pg.admin(postgres_url) as conn:
            installation = conn.execute(f'SELECT value FROM "{schema}".meta WHERE key = %s',
                                        ("installation_id",)).fetchone()[0]
        state = PostgresState(url)
        assert state.schema_versions() == {"state": SCHEMA_VERSION} and SCHEMA_VERSION == 3
        with pg.admin(postgres_url) as conn:
            history = conn.execute(f'SELECT component, version, adapter FROM "{schema}".{VERSION_TABLE} '
                                   "ORDER BY version").fetchall()
        assert [(c, v) for c, v, _ in history] == [("state", 1), ("state", 2), ("state", 3)]
        # every row is still there and usable
        assert state.installation_id() == installation
        assert state.cursor() == "2026-03-01T10:00:00Z" and state.seen("Procedure/a", "3")
        [review] = state.reviews()
        assert (review.procedure, review.patients, review.reason) == ("Procedure/b", ("Patient/2",), "modality-missing")
        assert state.audit_for("Procedure/a")[0].written == ("ChargeItem/c/_history/1",)
        assert state.last_event_number("Subscription/s") == 41
        assert state.replicas()[0].instance == "old-replica"
        # and what version 2 added works: roles, and new work beside a leased item of the same key
        assert state.lead("poll", "me", 60) and not state.lead("poll", "other", 60)
        [new] = state.enqueue([patient_work("Patient/1", "changed", 0.0)])
        leased = state.lease(10)
        assert sorted(i.payload.get("reference", i.payload.get("reason")) for i in leased) == \
            ["Patient/1", "Patient/1", "ping"]
        assert {i.id: i.attempts for i in leased}[new] == 1 and max(i.attempts for i in leased) == 2
        state.close()
        assert PostgresState(url).schema_versions() == {"state": SCHEMA_VERSION}  # opening again changes nothing
    finally:
        pg.drop_schema(postgres_url, schema)


def test_a_newer_schema_is_refused_and_left_alone(pg_url: str, postgres_url: str) -> None:
    state = PostgresState(pg_url)
    state.enqueue([poll()])
    schema = parse(pg_url).schema
    with pg.admin(postgres_url) as conn:
        conn.execute(f"INSERT INTO \"{schema}\".{VERSION_TABLE} VALUES ('state', 99, 1.0, '9.9')")
    with pytest.raises(StateSchemaError, match=r"state schema 99 is newer than this adapter \(3\): upgrade the "
                                               r"adapter") as caught:
        PostgresState(pg_url)
    assert pg_url.split("?")[0] in str(caught.value)
    assert state.queue_depth() == 1


def test_a_newer_ledger_schema_is_refused(pg_url: str, postgres_url: str) -> None:
    PostgresLedger(PostgresState(pg_url))
    with pg.admin(postgres_url) as conn:
        conn.execute(f"INSERT INTO \"{parse(pg_url).schema}\".{VERSION_TABLE} VALUES ('hl7v2-ledger', 7, 1.0, '9')")
    newest = LEDGER_MIGRATIONS[-1][0]
    with pytest.raises(StateSchemaError, match=rf"HL7 v2 ledger schema 7 is newer than this adapter \({newest}\)"):
        PostgresLedger(PostgresState(pg_url))


def test_a_ledger_of_the_first_version_is_upgraded_and_keeps_its_refusals(pg_url: str) -> None:
    """Ledger schema 1 (before refusals held a patient) opens; a refusal recorded then holds the patient."""
    state = PostgresState(pg_url)
    state.migrate("hl7v2-ledger", LEDGER_MIGRATIONS, upto=1, label="HL7 v2 ledger schema")
    state.transaction(lambda cur: cur.execute(  # a refusal as the version-1 ledger recorded it
        "INSERT INTO hl7v2_message (control_id, patient, session, kind, status, text, visit, charges, procedures, "
        "created_at, finished_at, ack_code, ack_text) VALUES ('c1', 'Patient/1', 's', 'CG', 'rejected', 'MSH|...', "
        "'{}', '[]', '[\"Procedure/a\"]'::jsonb, 1.0, 2.0, 'AE', 'unknown account')"))
    ledger = PostgresLedger(state)
    assert state.schema_versions()["hl7v2-ledger"] == LEDGER_MIGRATIONS[-1][0]
    assert [m.control_id for m in ledger.holds("Patient/1")] == ["c1"]
    ledger.release(["Patient/1"])
    assert ledger.holds("Patient/1") == []


def test_a_schema_of_something_else_is_refused_untouched(postgres_url: str) -> None:
    schema = pg.new_schema()
    try:
        with pg.admin(postgres_url) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
            conn.execute(f'CREATE TABLE "{schema}".patients (id text)')
        with pytest.raises(StateSchemaError, match=r"holds 1 tables of something else \(patients\) and no adapter "
                                                   r"state: give the adapter an empty database or a schema of its own"):
            PostgresState(pg.with_schema(postgres_url, schema))
        with pg.admin(postgres_url) as conn:
            tables = conn.execute("SELECT relname FROM pg_class WHERE relnamespace = %s::regnamespace "
                                  "AND relkind = 'r'", (schema,)).fetchall()
        assert tables == [("patients",)]
    finally:
        pg.drop_schema(postgres_url, schema)


def test_replicas_starting_at_once_upgrade_once(pg_url: str) -> None:
    def start(index: int, barrier: threading.Barrier) -> str:
        barrier.wait()
        state = PostgresState(pg_url)
        PostgresLedger(state)
        installation = state.installation_id()
        state.close()
        return installation

    assert len(set(in_threads(6, start))) == 1
    assert PostgresState(pg_url).schema_versions() == {"state": SCHEMA_VERSION,
                                                       "hl7v2-ledger": LEDGER_MIGRATIONS[-1][0]}


def test_open_state_chooses_postgres_for_both_schemes(pg_url: str) -> None:
    for url in (pg_url, pg_url.replace("postgresql://", "postgres://", 1)):
        state = open_state(url, busy_timeout=2.0, lease_seconds=30.0)
        assert isinstance(state, PostgresState) and state.shared and state.lease_seconds == 30.0
        state.close()
    assert isinstance(open_ledger(PostgresState(pg_url)), PostgresLedger)  # the HL7 v2 sink's ledger beside it


# -- several replicas at once ------------------------------------------------------------------------------------

def test_concurrent_workers_never_lease_the_same_item(pg_url: str) -> None:
    ids = PostgresState(pg_url).enqueue([poll(str(i)) for i in range(300)])

    def work(index: int, barrier: threading.Barrier) -> list[int]:
        state = PostgresState(pg_url)
        barrier.wait()
        taken: list[int] = []
        while batch := state.lease(7, owner=f"worker-{index}"):
            assert all(item.attempts == 1 for item in batch)
            taken += [item.id for item in batch]
            state.ack([item.id for item in batch])
        state.close()
        return taken

    results = in_threads(4, work)
    every = [i for taken in results for i in taken]
    assert len(every) == len(set(every)) and sorted(every) == sorted(ids)
    assert PostgresState(pg_url).queue_counts() == {"done": 300}


def _claim_all(url: str, owner: str, patients: list[str], barrier: Any, out: Any) -> None:
    state = PostgresState(url)
    barrier.wait()
    granted: set[str] = set()
    for start in range(0, len(patients), 10):
        granted |= state.claim_patients(patients[start:start + 10], owner, 600)
    out.put((owner, sorted(granted)))


def test_two_processes_claiming_the_same_patients_get_disjoint_sets(pg_url: str) -> None:
    patients = [f"Patient/{i}" for i in range(200)]
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(2), context.Queue()
    orders = [patients, list(reversed(patients))]  # they meet in the middle, in opposite lock order
    procs = [context.Process(target=_claim_all, args=(pg_url, f"replica-{i}", orders[i], barrier, out))
             for i in range(2)]
    for proc in procs:
        proc.start()
    granted = dict(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    first, second = set(granted["replica-0"]), set(granted["replica-1"])
    assert not first & second and first | second == set(patients)


def test_replicas_racing_for_a_role_have_one_winner(pg_url: str) -> None:
    roles = [f"role-{i}" for i in range(15)]

    def race(index: int, barrier: threading.Barrier) -> list[bool]:
        state = PostgresState(pg_url)
        won = []
        for role in roles:
            barrier.wait()
            won.append(state.lead(role, f"replica-{index}", 60))
        state.close()
        return won

    results = in_threads(5, race)
    for column in range(len(roles)):
        assert sum(result[column] for result in results) == 1


def test_concurrent_enqueues_of_one_dedupe_key_create_one_pending_item(pg_url: str) -> None:
    def enqueue(index: int, barrier: threading.Barrier) -> list[int]:
        state = PostgresState(pg_url)
        ids = []
        for round_ in range(12):
            barrier.wait()
            [item_id] = state.enqueue([patient_work(f"Patient/{round_}", f"from {index}", 0.0)])
            ids.append(item_id)
        state.close()
        return ids

    results = in_threads(6, enqueue)
    for round_ in range(12):
        assert len({result[round_] for result in results}) == 1
    assert PostgresState(pg_url).queue_depth() == 12


def test_a_deadlock_victim_is_run_again(pg_url: str) -> None:
    """Two transactions locking two rows in opposite order: PostgreSQL ends one, which is retried and succeeds."""
    a, b = PostgresState(pg_url).enqueue([poll("a"), poll("b")])
    runs: list[int] = []

    def both(index: int, barrier: threading.Barrier) -> str:
        state = PostgresState(pg_url)
        first, second = (a, b) if index == 0 else (b, a)

        def body(cur: Any) -> str:
            runs.append(index)
            cur.execute("SELECT id FROM queue WHERE id = %s FOR UPDATE", (first,))
            if runs.count(index) == 1:
                barrier.wait()  # both hold their first row: each now waits for the other's
            cur.execute("UPDATE queue SET last_error = %s WHERE id = %s", (f"by {index}", second))
            return "done"

        result = state.transaction(body)
        state.close()
        return result

    assert in_threads(2, both) == ["done", "done"]
    assert sorted(runs) in ([0, 0, 1], [0, 1, 1])  # one of them ran twice


def test_enqueue_gives_up_within_its_timeout_when_the_key_is_locked(pg_url: str, postgres_url: str) -> None:
    state = PostgresState(pg_url, busy_timeout=0.5)
    [item_id] = state.enqueue([patient_work("Patient/1", "changed", 0.0)])
    with pg.admin(postgres_url) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (state.lock_key("dedupe", "patient:Patient/1"),))
        with pytest.raises(StateUnavailable, match=r"waited 0\.2 s for (a lock held|the database in vain)"):
            state.enqueue([patient_work("Patient/1", "again", 0.0)], timeout=0.2)
        assert state.enqueue([patient_work("Patient/2", "other", 0.0)], timeout=0.2)  # other keys pass
        holder.execute("SELECT pg_advisory_unlock_all()")
        with holder.transaction():
            holder.execute(f'SELECT 1 FROM "{parse(pg_url).schema}".queue WHERE id = %s FOR UPDATE', (item_id,))
            with pytest.raises(StateUnavailable, match=r"waited 0\.5 s for a lock held by another connection"):
                state.enqueue([patient_work("Patient/1", "again", 0.0)])  # the default wait: busy_timeout
            assert [i.id for i in state.lease(5)] == [item_id + 1]  # leasing skips the locked row
    assert state.enqueue([patient_work("Patient/1", "again", 0.0)]) == [item_id]


# -- a server that goes away --------------------------------------------------------------------------------------

def test_a_terminated_connection_is_replaced_on_the_next_call(pg_url: str) -> None:
    state = PostgresState(pg_url)
    state.enqueue([poll("before")])
    before = backend_pid(state)
    assert pg.terminate(pg_url, f"charge-adapter {state.instance_id}"[:63]) == 1
    assert state.queue_depth() == 1  # run again on a new connection: nothing had been committed
    after = backend_pid(state)
    assert after != before
    state.enqueue([poll("after")])
    assert [i.payload["reason"] for i in state.lease(5)] == ["before", "after"]


def test_a_call_whose_connection_drops_raises_state_unavailable(pg_url: str) -> None:
    state = PostgresState(pg_url)

    def suicide(cur: Any) -> None:
        cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    with pytest.raises(StateUnavailable, match=r"lost the connection to the server \(terminating connection due to "
                                               r"administrator command\).*the next call reconnects") as caught:
        state.transaction(suicide)
    assert str(caught.value).startswith(f"state {state.location}: ")
    state.enqueue([poll()])
    assert state.queue_depth() == 1


@pytest.fixture
def own_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    with pg.second_cluster() as cluster:
        yield cluster


def test_a_stopped_server_is_unavailable_and_a_restarted_one_is_used_again(
        own_cluster: tuple[str, dict[str, str]]) -> None:
    url, env = own_cluster
    secret = logscan.secret("ignored-by-trust-" + uuid.uuid4().hex[:8])
    with_password = url.replace("://postgres@", f"://postgres:{secret}@", 1)
    assert secret in with_password
    state = PostgresState(pg.with_schema(with_password, "adapter"))
    assert secret not in state.location and state.location.startswith(url.split("?")[0])
    state.enqueue([poll("kept")])
    assert pg.script("stop", env=env).returncode == 0
    for _ in range(2):  # the call that finds the connection gone, and the one after it
        with pytest.raises(StateUnavailable) as caught:
            state.queue_depth()
        message = str(caught.value)
        assert message.startswith(f"state {state.location}: ") and secret not in message
        assert "cannot connect to 127.0.0.1:" in message and "check that PostgreSQL runs there" in message
    assert pg.start(env).startswith("postgresql://")
    assert [i.payload for i in state.lease(5)] == [{"reason": "kept"}]


def test_a_server_that_trusts_everyone_says_which_role_does_not_exist(
        own_cluster: tuple[str, dict[str, str]]) -> None:
    url, env = own_cluster
    hba = pg.ROOT / env["PG_STATE_DIR"] / "data" / "pg_hba.conf"
    hba.write_text("host all all 127.0.0.1/32 trust\n")
    with pg.admin(url) as conn:
        conn.execute("SELECT pg_reload_conf()")
    with pytest.raises(StateUnavailable, match=r"role no_such_role_x does not exist on 127\.0\.0\.1:\d+: create it "
                                               r"\(CREATE ROLE no_such_role_x LOGIN"):
        PostgresState(url.replace("://postgres@", "://no_such_role_x@", 1))


def test_a_wrong_database_or_role_says_what_to_do(postgres_url: str) -> None:
    target = parse(postgres_url)
    host = f"{target.params['host']}:{target.params['port']}"
    with pytest.raises(StateUnavailable, match=r"database no_such_db_x does not exist on .*: create it \(createdb "):
        PostgresState(f"postgresql://{target.params['user']}@{host}/no_such_db_x")
    # the server asks an unknown role for its password (it does not tell which roles exist)
    with pytest.raises(StateUnavailable, match=r"authentication failed for role no_such_role_x on .*: check the "
                                               "role's name and its password"):
        PostgresState(f"postgresql://no_such_role_x:x@{host}/{target.params['dbname']}")


@pytest.fixture
def password_role(postgres_url: str) -> Iterator[tuple[str, str, str]]:
    """A role that needs its password, owning a schema of its own: (role, password, its URL without password)."""
    role, schema = "r_" + uuid.uuid4().hex[:10], pg.new_schema()
    password = logscan.secret("pw-" + uuid.uuid4().hex)
    with pg.admin(postgres_url) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        conn.execute(f'CREATE SCHEMA "{schema}" AUTHORIZATION {role}')
    target = parse(postgres_url)
    url = f"postgresql://{role}@{target.params['host']}:{target.params['port']}/{target.params['dbname']}"
    try:
        try:
            pg.admin(url.replace(f"://{role}@", f"://{role}:not-{password}@")).close()
        except Exception:  # refused, as it must be
            pass
        else:
            pytest.fail(f"the server of {pg.ENV} lets role {role} in with a wrong password (pg_hba.conf trust): "
                        "the password tests need scram-sha-256 (or md5) for roles other than the owner, as "
                        "scripts/postgres sets up", pytrace=False)
        yield role, password, pg.with_schema(url, schema)
    finally:
        pg.drop_schema(postgres_url, schema)
        with pg.admin(postgres_url) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_passwords_are_taken_from_the_environment_and_never_shown(
        password_role: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    role, password, url = password_role
    wrong = logscan.secret("wrong-" + uuid.uuid4().hex)
    monkeypatch.setenv("CHARGE_TEST_PG_PASSWORD", wrong)
    texts = []
    with pytest.raises(StateUnavailable, match=rf"authentication failed for role {role} on .*: check the role.s "
                                               "name and its password") as caught:
        PostgresState(url + "&password_env=CHARGE_TEST_PG_PASSWORD")
    texts.append(str(caught.value))
    with pytest.raises(StateUnavailable, match="authentication failed") as caught:
        PostgresState(url.replace(f"://{role}@", f"://{role}:{wrong}@"))
    texts.append(str(caught.value))
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", os.devnull)
    with pytest.raises(StateUnavailable, match=f"the server wants a password for role {role} and none was given"
                       ) as caught:
        PostgresState(url)
    texts.append(str(caught.value))
    with pytest.raises(StateUnavailable, match=r"environment variable CHARGE_TEST_PG_UNSET \(state.password_env\) is "
                                               "not set or empty") as caught:
        PostgresState(url + "&password_env=CHARGE_TEST_PG_UNSET")
    texts.append(str(caught.value))
    monkeypatch.setenv("CHARGE_TEST_PG_PASSWORD", password)
    state = PostgresState(url + "&password_env=CHARGE_TEST_PG_PASSWORD")
    state.enqueue([poll()])
    texts.append(state.location)
    in_url = PostgresState(url.replace(f"://{role}@", f"://{role}:{password}@"))
    assert in_url.queue_depth() == 1
    texts.append(in_url.location)
    monkeypatch.setenv("PGPASSWORD", password)  # libpq's own variable works too
    assert PostgresState(url).queue_depth() == 1
    for text in texts:
        assert password not in text and wrong not in text, text


def test_a_role_without_rights_on_the_schema_is_told_what_it_needs(
        password_role: tuple[str, str, str], postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, password, url = password_role
    monkeypatch.setenv("CHARGE_TEST_PG_PASSWORD", password)
    PostgresState(url + "&password_env=CHARGE_TEST_PG_PASSWORD").close()  # the owner creates the state
    other, other_password = "r_" + uuid.uuid4().hex[:10], uuid.uuid4().hex
    with pg.admin(postgres_url) as conn:
        conn.execute(f"CREATE ROLE {other} LOGIN PASSWORD '{other_password}'")
    try:
        monkeypatch.setenv("CHARGE_TEST_PG_PASSWORD", other_password)
        foreign = url.replace(f"://{parse(url).params['user']}@", f"://{other}@") + \
            "&password_env=CHARGE_TEST_PG_PASSWORD"
        with pytest.raises(StateUnavailable, match=rf"permission denied for schema {parse(url).schema}: role {other} "
                                                   "must own it, or be granted USAGE"):
            PostgresState(foreign)
    finally:
        with pg.admin(postgres_url) as conn:
            conn.execute(f"DROP ROLE {other}")
