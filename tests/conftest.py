"""Session-wide: the adapter's logs are collected from every test and scanned when the session ends
(tests/logscan.py); a finding fails the run."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click.testing
import pytest

from tests import logscan


@pytest.fixture(scope="session", autouse=True)
def _collect_adapter_logs() -> Iterator[None]:
    logger = logging.getLogger("adapter")
    handler = logscan.Capture()
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    invoke = click.testing.CliRunner.invoke

    def recording_invoke(self: click.testing.CliRunner, *args: Any, **kwargs: Any) -> click.testing.Result:
        result = invoke(self, *args, **kwargs)
        logscan.add_text("CLI stderr (in-process)", result.stderr)
        return result

    click.testing.CliRunner.invoke = recording_invoke  # type: ignore[method-assign]
    try:
        yield
    finally:
        click.testing.CliRunner.invoke = invoke  # type: ignore[method-assign]
        logger.removeHandler(handler)
        logger.setLevel(previous)


@pytest.fixture(scope="session")
def synthea_population() -> Path:
    """The fixed Synthea population (scripts/synthea): generated on first use, then cached under .cache/synthea/;
    the folder of its FHIR files."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "scripts/synthea"), "generate"], cwd=root, capture_output=True,
                          text=True, timeout=1500, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, f"scripts/synthea failed:\n{done.stderr[-3000:]}"
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server's URL: CHARGE_ADAPTER_TEST_POSTGRES, or the cluster `scripts/postgres start` runs (and
    this session stops again if it started it). Fails, naming the reason, when there is none: never a skip."""
    from tests import pg

    from_env = os.environ.get(pg.ENV, "").strip()
    if from_env:
        yield from_env
        return
    already_running = pg.script("status", timeout=60).returncode == 0
    try:
        url, failure = pg.start(), ""
    except RuntimeError as exc:
        url, failure = "", str(exc)
    if failure:
        pytest.fail(failure, pytrace=False)
    try:
        yield url
    finally:
        if not already_running:
            pg.script("stop", timeout=120)


@pytest.fixture
def pg_url(postgres_url: str) -> Iterator[str]:
    """The URL of an empty state: a schema of its own in the test server, dropped after the test."""
    from tests import pg

    schema = pg.new_schema()
    yield pg.with_schema(postgres_url, schema)
    pg.drop_schema(postgres_url, schema)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    lines, findings = logscan.scan()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if findings:
        reporter.write_sep("=", f"log scan: {len(findings)} finding(s) in {lines} log lines", red=True)
        for finding in findings[:50]:
            reporter.write_line(finding)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        reporter.write_line(f"log scan: {lines} log lines, no description text, patient name, token or "
                            "patient reference outside debug level")
