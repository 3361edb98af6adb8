"""The service config (YAML + environment) and the durable state store."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest

from adapter.errors import ConfigError
from adapter.settings import load_settings
from adapter.state.store import InstanceLockedError, StateStore, WorkItem


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "adapter.yaml"
    path.write_text(text)
    return path


def test_yaml_with_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  url: http://a/fhir\n  auth: {type: bearer, token_env: T}\npoll:\n"
                           "  interval_seconds: 10\nstate_path: s.sqlite\n")
    settings = load_settings(path, env={"CHARGE_ADAPTER__SERVER__URL": "http://b/fhir",
                                        "CHARGE_ADAPTER__SERVE__PORT": "9000", "OTHER": "x"})
    assert settings.server.url == "http://b/fhir" and settings.server.auth == {"type": "bearer", "token_env": "T"}
    assert settings.poll.interval_seconds == 10.0 and settings.serve.port == 9000
    assert settings.state_path == "s.sqlite"
    assert settings.serve.endpoint == "http://127.0.0.1:9000/notify"


@pytest.mark.parametrize(("text", "env", "message"), [
    ("server:\n  ur: x\n", {}, r"adapter.yaml: server.ur: unknown key"),
    ("poll:\n  interval_seconds: soon\n", {}, r"adapter.yaml: poll.interval_seconds: must be a number"),
    ("serve:\n  port: 70000\n", {}, r"serve.port: must be between"),
    ("servers: {}\n", {}, r"adapter.yaml: servers: unknown key"),
    ("server:\n  url: ftp://x\n", {}, r"server.url: must be an http"),
    ("", {"CHARGE_ADAPTER__NOPE__X": "1"}, r"CHARGE_ADAPTER__NOPE__X: unknown setting"),
    ("poll: [1]\n", {}, r"poll: must be a mapping"),
])
def test_bad_settings_name_the_key(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, text), env=env)


def test_queue_items_survive_a_new_process_and_leases_expire(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.sqlite", lease_seconds=0.0)
    ids = store.enqueue([WorkItem("poll", {"reason": "ping"}, "rest-hook"),
                         WorkItem("delete", {"reference": "Procedure/x"}, "rest-hook")])
    store.close()
    again = StateStore(tmp_path / "s.sqlite", lease_seconds=0.0)
    first = again.take(10)
    assert [i.id for i in first] == ids and [i.attempts for i in first] == [1, 1]
    # the worker died without finishing: with the lease run out, the items come back
    second = again.take(10)
    assert [i.id for i in second] == ids and [i.attempts for i in second] == [2, 2]
    again.finish(ids)
    assert again.take(10) == [] and again.queue_depth() == 0


def test_failed_items_retry_or_stop(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.sqlite")
    [a, b] = store.enqueue([WorkItem("poll", {}, "t"), WorkItem("poll", {}, "t")])
    store.take()
    store.finish([a], "server down", retry=True)
    store.finish([b], "bad payload", retry=False)
    assert [i.id for i in store.take()] == [a]
    assert store.queue_counts()["failed"] == 1


def test_unknown_work_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown work kind"):
        StateStore(tmp_path / "s.sqlite").enqueue([WorkItem("guess", {}, "t")])


def test_reviews_open_refresh_and_resolve(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.sqlite")
    store.open_review("Procedure/a", "Patient/p", "needs-review", "modality-missing", "first")
    store.open_review("Procedure/a", "Patient/p", "needs-review", "modality-missing", "second")
    store.open_review("Procedure/a", "Patient/p", "write-failed", "write-failed", "HTTP 400")
    [missing, failed] = store.reviews()
    assert failed.kind == "write-failed"
    assert (missing.attempts, missing.detail) == (2, "second")
    assert store.resolve_reviews(["Procedure/a"], keep={("Procedure/a", "write-failed")}) == 1
    assert [e.reason for e in store.reviews()] == ["write-failed"]
    assert store.review(missing.id).status == "resolved"  # type: ignore[union-attr]


def test_cursor_processed_audit_and_event_numbers(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.sqlite")
    assert store.cursor() is None
    store.set_cursor("2026-11-27T10:00:00.123+00:00")
    assert store.cursor() == "2026-11-27T10:00:00.123+00:00"
    store.mark_processed([("Procedure/a", "3", "coded")])
    assert store.seen("Procedure/a", "3") and not store.seen("Procedure/a", "4")
    store.audit([{"procedure": "Procedure/a", "version": "3", "session": "s", "codes": ["10005 x1"],
                  "table_version": "abc", "written": ["ChargeItem/1/_history/1"]}])
    assert store.audit_for("Procedure/a")[0]["written"] == ["ChargeItem/1/_history/1"]
    store.set_event_number("Subscription/s", 5)
    store.set_event_number("Subscription/s", 3)  # never goes back
    assert store.last_event_number("Subscription/s") == 5


def test_state_file_is_wal_and_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    StateStore(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="newer than this adapter"):
        StateStore(path)


def _enqueue_then_die(path: str) -> None:
    store = StateStore(path)
    store.enqueue([WorkItem("poll", {"reason": "acknowledged"}, "rest-hook")])
    os._exit(0)  # no clean shutdown, no close(): as if killed right after the 2xx


def test_an_acknowledged_item_survives_an_abrupt_exit(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite")
    proc = multiprocessing.get_context("spawn").Process(target=_enqueue_then_die, args=(path,))
    proc.start()
    proc.join(30)
    assert [i.payload for i in StateStore(path).take()] == [{"reason": "acknowledged"}]


def test_one_running_instance_per_state_file(tmp_path: Path) -> None:
    first = StateStore(tmp_path / "s.sqlite")
    first.lock_instance()
    with pytest.raises(InstanceLockedError, match="another charge-adapter run/serve is using"):
        StateStore(tmp_path / "s.sqlite").lock_instance()
    StateStore(tmp_path / "other.sqlite").lock_instance()  # a different state file is a different instance
