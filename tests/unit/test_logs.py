"""`logging.format: json`: one JSON object per line with the same (redacted) message as the text format."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from adapter import logs, redact
from tests.integration.helpers import free_port


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("adapter.worker", logging.WARNING, __file__, 1, message, args, None)


def test_json_lines_carry_the_text_formats_message_and_its_redaction() -> None:
    redact.configure("omit")
    try:
        line = record("session %s failed: %s", redact.patient("Patient/p-secret-1"), "HTTP 503")
        text = logs.formatter("text").format(line)
        data = json.loads(logs.formatter("json").format(line))
    finally:
        redact.configure("omit")  # the default every other test expects
    assert data["message"] == text.split(": ", 1)[1] and "p-secret-1" not in data["message"]
    assert (data["level"], data["logger"], data["thread"]) == ("WARNING", "adapter.worker", "MainThread")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", data["time"]) and "asctime" not in data


def test_a_config_that_asks_for_json_gets_json_log_lines_on_stderr(tmp_path: Path) -> None:
    config = tmp_path / "adapter.yaml"
    config.write_text(f"state: {tmp_path / 'state.sqlite'}\nserver:\n  url: http://127.0.0.1:{free_port()}/fhir\n"
                      "  retry_seconds: 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARGE_ADAPTER")}
    result = subprocess.run([sys.executable, "-m", "adapter", "-vv", "--config", str(config), "run", "--once"],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**env, "CHARGE_ADAPTER__LOGGING__FORMAT": "json"})
    log_lines = [line for line in result.stderr.splitlines() if line.startswith("{")]
    assert result.returncode == 2 and "connection failed" in result.stderr
    assert log_lines, result.stderr
    for line in log_lines:
        data = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(data)
