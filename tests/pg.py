"""PostgreSQL for the tests: the server named by CHARGE_ADAPTER_TEST_POSTGRES (a URL), or the throwaway cluster
`scripts/postgres start` runs under the work tree. Tests keep apart by a fresh schema each.

Fixtures (`postgres_url` for the session, `pg_url` for one test) are in tests/conftest.py; this module holds
what they and the PostgreSQL-only tests share.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ENV = "CHARGE_ADAPTER_TEST_POSTGRES"
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "postgres"
START_TIMEOUT_S = 300


def script(*args: str, env: dict[str, str] | None = None,
           timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False, env={**os.environ, **(env or {})})


def start(env: dict[str, str] | None = None) -> str:
    """`scripts/postgres start`; its URL (the last line), or RuntimeError with everything it said."""
    try:
        started = script("start", env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"scripts/postgres start could not run: {exc}") from None
    lines = [line.strip() for line in started.stdout.splitlines() if line.strip()]
    if started.returncode != 0 or not lines or not lines[-1].startswith("postgresql://"):
        raise RuntimeError(f"scripts/postgres start failed (exit {started.returncode}): it needs PostgreSQL's server "
                           f"package (Debian: postgresql) and a free port (PG_PORT); or set {ENV} to a server's "
                           f"URL:\n{started.stdout}\n{started.stderr}")
    return lines[-1]


def admin(url: str) -> Any:
    """An autocommit connection for setting up and breaking things (the URL's role: the cluster's owner)."""
    import psycopg

    from adapter.state.pgurl import parse

    target = parse(url)
    params: dict[str, Any] = dict(target.params)
    if target.password:
        params["password"] = target.password
    conn = psycopg.connect(autocommit=True, connect_timeout=10, application_name="charge-adapter tests", **params)
    conn.execute("SET lock_timeout = 30000")
    return conn


def new_schema() -> str:
    return "t_" + uuid.uuid4().hex[:12]


def with_schema(url: str, schema: str) -> str:
    base, _, query = url.partition("?")
    kept = [p for p in query.split("&") if p and not p.startswith("schema=")]
    return base + "?" + "&".join([*kept, f"schema={schema}"])


def drop_schema(url: str, schema: str) -> None:
    with admin(url) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def terminate(url: str, application_prefix: str) -> int:
    """End every server process whose application_name starts with the prefix; how many there were."""
    with admin(url) as conn:
        rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s "
                            "AND pid <> pg_backend_pid()", (application_prefix.replace("%", r"\%") + "%",)).fetchall()
    return len(rows)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def second_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """A cluster of its own (own port and folder), for tests that stop the server: the shared one keeps running.
    Yields its URL and the environment that makes scripts/postgres act on it."""
    folder = ROOT / ".postgres" / "extra" / uuid.uuid4().hex[:8]
    env = {"PG_PORT": str(free_port()), "PG_STATE_DIR": str(folder)}
    try:
        yield start(env), env
    finally:
        script("stop", env=env, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
