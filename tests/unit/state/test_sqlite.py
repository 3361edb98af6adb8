"""What only the SQLite backend has: the file, its schema versions, its faults, its lock and its WAL."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest

from adapter.errors import InstanceLocked, StateCorrupt, StateSchemaError, StateUnavailable
from adapter.state import open_state
from adapter.state.base import WorkItem
from adapter.state.sqlite import _MIGRATIONS, SCHEMA, SCHEMA_VERSION, SqliteState


def test_the_file_is_wal_and_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    SqliteState(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StateSchemaError, match="state schema 99 is newer than this adapter"):
        SqliteState(path)


def test_a_state_of_the_first_version_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO queue (kind, payload, source, received_at) VALUES ('poll', '{}', 'rest-hook', 1.0)")
    db.execute("INSERT INTO review (procedure, patient, kind, reason, detail, attempts, first_seen, last_seen) "
               "VALUES ('Procedure/a', 'Patient/1', 'write-failed', 'write-failed', 'HTTP 503', 1, 1.0, 1.0)")
    db.commit()
    db.close()
    state = SqliteState(path)
    [entry] = state.reviews()
    assert (entry.patients, entry.kind) == (("Patient/1",), "write-failed")
    [item] = state.lease(5)
    assert item.kind == "poll" and item.attempts == 1


def test_a_state_of_the_previous_version_is_upgraded(tmp_path: Path) -> None:
    """A file written by the adapter before roles existed (schema 2) opens, keeps its work, and gains them."""
    path = tmp_path / "v2.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    for statement in _MIGRATIONS[2]:
        db.execute(statement)
    db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    db.execute("INSERT INTO queue (kind, payload, source, received_at, status, dedupe, lease_until) VALUES "
               "('patient', '{\"reference\": \"Patient/1\"}', 'retry', 1.0, 'leased', 'patient:Patient/1', 2.0)")
    db.commit()
    db.close()
    state = SqliteState(path)
    check = sqlite3.connect(path)
    assert check.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    check.close()
    assert state.lead("poll", "me", 60) and not state.lead("poll", "other", 60)
    # the leased item (its worker died long ago) is kept; new work for the patient queues beside it
    state.enqueue([WorkItem("patient", {"reference": "Patient/1"}, "poll", dedupe="patient:Patient/1")])
    assert [i.attempts for i in state.lease(5)] == [1, 1]


@pytest.mark.parametrize(("content", "error", "message"), [
    (b"server:\n  url: http://x\n", StateSchemaError, "is not an SQLite database"),
    (b"SQLite format 3\x00" + b"\xff" * 5000, StateCorrupt, "the file is damaged"),
])
def test_a_file_that_is_no_state_is_refused_untouched(tmp_path: Path, content: bytes, error: type[Exception],
                                                      message: str) -> None:
    path = tmp_path / "state.sqlite"
    path.write_bytes(content)
    with pytest.raises(error, match=message) as caught:
        SqliteState(path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == content
    assert not (tmp_path / "state.sqlite-wal").exists() or error is StateCorrupt


def test_a_truncated_state_is_reported_as_damaged(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    state = SqliteState(path)
    state.enqueue([WorkItem("poll", {"reason": "x" * 2000}, "t") for _ in range(200)])
    state.prune(0, 0)  # checkpoint: everything in the main file
    state.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    (tmp_path / "state.sqlite-wal").unlink(missing_ok=True)
    (tmp_path / "state.sqlite-shm").unlink(missing_ok=True)
    with pytest.raises(StateCorrupt, match=r"damaged.*move the file"):
        SqliteState(path).queued(1000)


def test_folders_foreign_databases_and_hard_links_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StateSchemaError, match="is a folder"):
        SqliteState(tmp_path)
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE patients (id TEXT)")
    db.commit()
    db.close()
    with pytest.raises(StateSchemaError, match="database of something else"):
        SqliteState(other)
    real = tmp_path / "state.sqlite"
    SqliteState(real).close()
    os.link(real, tmp_path / "alias.sqlite")
    with pytest.raises(StateSchemaError, match="2 names \\(hard links\\)"):
        SqliteState(tmp_path / "alias.sqlite")


def test_symlinks_and_relative_paths_take_the_same_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "data" / "state.sqlite"
    first = SqliteState(real)
    first.acquire_instance_lock()
    (tmp_path / "link.sqlite").symlink_to(real)
    with pytest.raises(InstanceLocked):
        SqliteState(tmp_path / "link.sqlite").acquire_instance_lock()
    monkeypatch.chdir(tmp_path / "data")
    with pytest.raises(InstanceLocked):
        open_state("./state.sqlite").acquire_instance_lock()  # type: ignore[attr-defined]
    with pytest.raises(InstanceLocked):
        open_state(f"sqlite:///{real}").acquire_instance_lock()  # type: ignore[attr-defined]
    assert SqliteState(tmp_path / "link.sqlite").location == str(real)


def test_a_locked_database_is_unavailable_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    state = SqliteState(path, busy_timeout=0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StateUnavailable, match=r"locked by another connection \(waited 0.1 s\)"):
            state.enqueue([WorkItem("poll", {}, "t")], timeout=0.1)
        with pytest.raises(StateUnavailable, match=r"waited 0\.2 s"):
            state.heartbeat()
        assert state.queue_depth() == 0  # reading still works in WAL mode
    finally:
        holder.execute("ROLLBACK")
    state.enqueue([WorkItem("poll", {}, "t")])
    assert state.queue_depth() == 1


def test_prune_checkpoints_the_wal(tmp_path: Path) -> None:
    state = SqliteState(tmp_path / "s.sqlite")
    ids = state.enqueue([WorkItem("poll", {"reason": "x" * 1000}, "t") for _ in range(500)])
    state.lease(500)
    state.ack(ids)
    assert state.wal_bytes() > 100_000
    assert state.prune(done_before=9e12, audit_before=0)["queue"] == 500
    assert state.wal_bytes() == 0


def _enqueue_then_die(path: str) -> None:
    state = SqliteState(path)
    state.enqueue([WorkItem("poll", {"reason": "acknowledged"}, "rest-hook")])
    os._exit(0)  # no clean shutdown, no close(): as if killed right after the 2xx


def test_an_acknowledged_item_survives_an_abrupt_exit(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite")
    proc = multiprocessing.get_context("spawn").Process(target=_enqueue_then_die, args=(path,))
    proc.start()
    proc.join(30)
    assert [i.payload for i in SqliteState(path).lease(5)] == [{"reason": "acknowledged"}]


def test_one_state_file_one_instance_but_other_files_are_free(tmp_path: Path) -> None:
    SqliteState(tmp_path / "a.sqlite").acquire_instance_lock()
    SqliteState(tmp_path / "b.sqlite").acquire_instance_lock()


def test_an_unreadable_state_file_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission denied cannot be staged for root (who runs CI), so the OS error is injected here."""
    path = tmp_path / "state.sqlite"
    SqliteState(path).close()
    real_open = Path.open

    def denied(self: Path, *args: object, **kwargs: object) -> object:
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(StateUnavailable, match=r"cannot read the file \(Permission denied\): the adapter's user needs "
                                               r"read and write access"):
        SqliteState(path)


def test_the_instance_lock_drops_the_claims_and_leases_of_a_process_that_died(tmp_path: Path) -> None:
    """kill -9 leaves patient claims and work leases behind; with the lock held no other run/serve is alive, so a
    restart takes them back at once instead of waiting out the lease (its own, and live processes', stay)."""
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    gone = f"{socket.gethostname()[:40]}:{dead.stdout.strip()}:abc123"
    alive = f"{socket.gethostname()[:40]}:{os.getpid()}:def456"
    path = tmp_path / "state.sqlite"
    before = SqliteState(path, lease_seconds=300)
    assert before.claim_patients({"Patient/a"}, gone, 300) == {"Patient/a"}
    assert before.claim_patients({"Patient/b"}, alive, 300) == {"Patient/b"}
    before.enqueue([WorkItem("patient", {"reference": "Patient/c"}, "poll")])
    assert len(before.lease(5, owner=gone)) == 1
    before.close()
    restarted = SqliteState(path, lease_seconds=300)
    restarted.acquire_instance_lock()
    assert restarted.claim_patients({"Patient/a", "Patient/b"}, restarted.instance_id, 300) == {"Patient/a"}
    assert [i.payload["reference"] for i in restarted.lease(5)] == ["Patient/c"]
