"""Configuration and state faults as an operator meets them: `charge-adapter` in a real process exits 3 naming
the file and the key for configuration, 2 naming the state file and what to do for the environment, and
never prints a traceback."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapter.cli import cli
from adapter.state.sqlite import SqliteState
from tests import logscan
from tests.integration.adapter_process import mount_namespace
from tests.integration.helpers import free_port
from tests.unit.test_settings import BAD_VALUES

TOKEN = logscan.secret("cli-fault-test-token")


def adapter(tmp_path: Path, config: str, *args: str, env: dict[str, str] | None = None,
            wrapper: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "adapter.yaml"
    path.write_text(config)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CHARGE_ADAPTER")}
    result = subprocess.run([*(wrapper or []), sys.executable, "-m", "adapter", "--config", str(path), *args],
                            capture_output=True, text=True, env={**environment, **(env or {})}, timeout=60,
                            check=False)
    logscan.add_text(f"charge-adapter {' '.join(args)} (stderr)", result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.mark.parametrize(("text", "key", "message"), BAD_VALUES, ids=[b[1] + ":" + b[2][:20] for b in BAD_VALUES])
def test_every_bad_config_value_exits_3_naming_file_and_key(tmp_path: Path, text: str, key: str,
                                                           message: str) -> None:
    path = tmp_path / "adapter.yaml"
    path.write_text(text)
    result = CliRunner().invoke(cli, ["--config", str(path), "status"])
    assert result.exit_code == 3, result.output
    assert f"configuration error: {path}: {key}: " in result.stderr and message in result.stderr


def test_config_errors_found_when_the_service_starts_exit_3(tmp_path: Path) -> None:
    state = f"state: {tmp_path / 'state.sqlite'}\n"
    server = "server:\n  url: http://127.0.0.1:1/fhir\n"
    cases = [
        (server + "  auth: {type: bearer, token_env: CHARGE_TEST_NO_SUCH_TOKEN}\n", ("run", "--once"),
         "server.auth.token_env: environment variable CHARGE_TEST_NO_SUCH_TOKEN is not set"),
        (server + "  auth: {type: basic, username: svc, password_env: CHARGE_TEST_NO_SUCH_PASSWORD}\n",
         ("review", "replay", "--all"), "server.auth.password_env: environment variable"),
        (server + "serve:\n  token_env: CHARGE_TEST_NO_SUCH_TOKEN\n", ("serve",),
         "serve.token_env: environment variable CHARGE_TEST_NO_SUCH_TOKEN for the receiver bearer token"),
        (server + "serve:\n  hmac_secret_env: CHARGE_TEST_NO_SUCH_SECRET\n", ("serve",),
         "serve.hmac_secret_env: environment variable CHARGE_TEST_NO_SUCH_SECRET"),
        ("", ("run", "--once"), "server.url: no FHIR server configured"),
        (server + "  ca_bundle: /no/such/ca.pem\n", ("run", "--once"), "server.ca_bundle: CA bundle not found"),
        ("poll:\n  page_size: 2.7\n", ("run", "--once"), "poll.page_size: must be a whole number"),
    ]
    for config, args, message in cases:
        result = adapter(tmp_path, state + config, *args, env={"CHARGE_ADAPTER_RECEIVER_TOKEN": TOKEN})
        assert result.returncode == 3, (args, result.stderr)
        assert f"configuration error: {tmp_path / 'adapter.yaml'}: {message}" in result.stderr, result.stderr


def test_an_auth_file_of_sync_names_its_key(tmp_path: Path) -> None:
    auth = tmp_path / "auth.yaml"
    auth.write_text("{type: bearer, token_env: CHARGE_TEST_NO_SUCH_TOKEN}\n")
    result = subprocess.run([sys.executable, "-m", "adapter", "sync", "--server", "http://127.0.0.1:1/fhir",
                             "--auth-file", str(auth)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 3
    assert f"{auth}: token_env: environment variable CHARGE_TEST_NO_SUCH_TOKEN is not set" in result.stderr


def _damaged(path: Path) -> None:
    SqliteState(path).close()
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 8192)


def _truncated(path: Path) -> None:
    state = SqliteState(path)
    state.enqueue([])
    state.prune(0, 0)
    state.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _newer(path: Path) -> None:
    SqliteState(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()


STATE_FAULTS = [
    ("not a database", lambda p: p.write_text("server:\n  url: x\n"), 3, "is not an SQLite database"),
    ("damaged", _damaged, 2, "the file is damaged"),
    ("truncated", _truncated, 2, "the file is damaged"),
    ("newer schema", _newer, 3, "upgrade the adapter"),
    ("a folder", lambda p: p.mkdir(), 3, "is a folder"),
    ("two names", lambda p: (SqliteState(p).close(), os.link(p, p.with_name("copy.sqlite"))), 3, "hard links"),
]


@pytest.mark.parametrize(("fault", "make", "code", "message"), STATE_FAULTS, ids=[f[0] for f in STATE_FAULTS])
def test_a_bad_state_file_is_one_clear_error(tmp_path: Path, fault: str, make: object, code: int,
                                             message: str) -> None:
    path = tmp_path / "state.sqlite"
    make(path)  # type: ignore[operator]
    for command in (("status",), ("run", "--once")):
        result = adapter(tmp_path, f"state: {path}\nserver:\n  url: http://127.0.0.1:1/fhir\n", *command)
        assert result.returncode == code, result.stderr
        assert f"state {path}: " in result.stderr and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_a_read_only_state_is_an_environment_error(tmp_path: Path) -> None:
    """The state's folder on a read-only bind mount (EROFS: not even root writes through it)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    SqliteState(folder / "state.sqlite").close()
    result = adapter(tmp_path, f"state: {folder / 'state.sqlite'}\n", "status",
                     wrapper=mount_namespace("--readonly", str(folder)))
    assert result.returncode == 2, result.stderr
    assert "read-only: the adapter's user needs write access to the file and its folder" in result.stderr


def test_the_lock_holds_through_symlinks_and_relative_paths(tmp_path: Path) -> None:
    real = tmp_path / "data" / "state.sqlite"
    holder = SqliteState(real)
    holder.acquire_instance_lock()  # a running `serve` in another process, as far as the lock can tell
    (tmp_path / "link.sqlite").symlink_to(real)
    for location in (str(tmp_path / "link.sqlite"), "data/../data/state.sqlite"):
        path = tmp_path / "adapter.yaml"
        path.write_text(f"state: {location}\nserver:\n  url: http://127.0.0.1:1/fhir\n")
        result = subprocess.run([sys.executable, "-m", "adapter", "--config", str(path), "run", "--once"],
                                capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False)
        assert result.returncode == 2
        assert f"state {real}: another charge-adapter run/serve is using this state file" in result.stderr


def test_a_port_in_use_is_an_environment_error_naming_the_key(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = adapter(tmp_path, f"state: {tmp_path / 's.sqlite'}\nserver:\n  url: http://127.0.0.1:1/fhir\n"
                                   f"serve:\n  port: {port}\n", "serve", env={"CHARGE_ADAPTER_RECEIVER_TOKEN": TOKEN})
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use (serve.host, serve.port in " in result.stderr


def _config_url(url: str) -> tuple[str, dict[str, str]]:
    """A PostgreSQL URL fit for a config file (no password in it: the environment carries it), and that env."""
    from adapter.state.pgurl import parse

    password = parse(url).password
    if not password:
        return url, {}
    return (url.replace(f":{password}@", "@", 1) + "&password_env=CHARGE_TEST_PG_PASSWORD",
            {"CHARGE_TEST_PG_PASSWORD": password})


def test_status_reads_a_postgresql_state(tmp_path: Path, pg_url: str) -> None:
    from adapter.state.base import WorkItem
    from adapter.state.postgres import PostgresState

    state = PostgresState(pg_url)
    state.enqueue([WorkItem("poll", {"reason": "ping"}, "rest-hook")])
    state.set_cursor("2026-03-01T10:00:00Z")
    url, env = _config_url(pg_url)
    result = adapter(tmp_path, f"state: {url}\n", "status", env=env)
    assert result.returncode == 0, result.stderr
    assert f"state:     {state.location}" in result.stdout
    assert "cursor:    2026-03-01T10:00:00Z" in result.stdout and "queue:     pending 1" in result.stdout


def test_an_unreachable_or_missing_postgresql_state_exits_2_in_one_line(tmp_path: Path, postgres_url: str) -> None:
    secret = logscan.secret("pg-secret-" + os.urandom(6).hex())
    port = free_port()
    config = f"state:\n  location: postgresql://svc@127.0.0.1:{port}/adapter\n  password_env: CHARGE_TEST_PG_PASSWORD\n"
    result = adapter(tmp_path, config, "status", env={"CHARGE_TEST_PG_PASSWORD": secret})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert result.stderr.startswith(f"error: state postgresql://svc@127.0.0.1:{port}/adapter?password_env="
                                    f"CHARGE_TEST_PG_PASSWORD: cannot connect to 127.0.0.1:{port} (")
    assert secret not in result.stderr + result.stdout
    url, env = _config_url(postgres_url)
    missing = url.split("?")[0].rsplit("/", 1)[0] + "/no_such_database_x" + url[len(url.split("?")[0]):]
    result = adapter(tmp_path, f"state: {missing}\n", "status", env=env)
    assert result.returncode == 2, result.stderr
    assert "database no_such_database_x does not exist on " in result.stderr and "create it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
