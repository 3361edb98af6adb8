"""Session-wide: the adapter's logs are collected from every test and scanned when the session ends
(tests/logscan.py); a finding fails the run."""

from __future__ import annotations

import logging
from collections.abc import Iterator
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
