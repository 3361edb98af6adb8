"""Every command with bad arguments, as a newcomer types them: never a traceback, the exit code of the README's
table, and a message that names the option, file, key, server (host:port) or id it is about.

The commands run in-process (click's runner: an exception that escapes would be the traceback a shell shows),
and a few of them again in real processes, as a shell runs them; the FHIR server they are pointed at is a port
nothing listens on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapter.cli import cli
from adapter.state import NewReview
from adapter.state.sqlite import SqliteState
from tests import logscan
from tests.integration.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = str(ROOT / "fixtures/fhir/scenarios/01-single-us/input.json")
TOKEN = logscan.secret("bad-arguments-test-token")


def readme_exit_codes() -> dict[str, int]:
    """The README's exit-code table: the meaning of each row -> its code."""
    rows = re.findall(r"^\| `(\d)` \| (.+) \|$", (ROOT / "README.md").read_text(encoding="utf-8"), re.M)
    assert [code for code, _ in rows] == ["0", "1", "2", "3"], "the README's exit-code table changed shape"
    return {text: int(code) for code, text in rows}


def readme_code(phrase: str) -> int:
    """The code of the one README row that says `phrase`: the test reads the table, it does not repeat it."""
    found = [code for text, code in readme_exit_codes().items() if phrase in text]
    assert len(found) == 1, f"{phrase!r} is in {len(found)} rows of the README's exit-code table"
    return found[0]


BAD_ARGUMENT, UNAVAILABLE, UNKNOWN_ID = "a bad argument or option", "the FHIR server (its host:port named)", \
    "an unknown id in `explain --procedure`"
UNREADABLE = "an input file or folder (PATH) could not be read"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("bad-arguments")
    port = free_port()
    state = tmp / "state.sqlite"
    SqliteState(state).close()
    (tmp / "adapter.yaml").write_text(f"state: {state}\nserver:\n  url: http://127.0.0.1:{port}/fhir\n"
                                      "  retry_seconds: 0\n")
    (tmp / "bad-key.yaml").write_text(f"state: {state}\npoll:\n  intervall_seconds: 5\n")
    (tmp / "bad-port.yaml").write_text(f"state: {state}\nserve:\n  port: 70000\n")
    no_chargemaster = tmp / "no-chargemaster"
    shutil.copytree(ROOT / "config", no_chargemaster)
    (no_chargemaster / "chargemaster.yaml").unlink()
    typo = tmp / "typo"
    shutil.copytree(ROOT / "config", typo)
    master = typo / "chargemaster.yaml"
    master.write_text(master.read_text().replace("unit_price:", "unit_prise:", 1))
    return {"tmp": str(tmp), "config": str(tmp / "adapter.yaml"), "bad_key": str(tmp / "bad-key.yaml"),
            "bad_port": str(tmp / "bad-port.yaml"),
            "server": f"http://127.0.0.1:{port}/fhir", "host_port": f"127.0.0.1:{port}",
            "no_chargemaster": str(no_chargemaster), "typo": str(typo)}


def cases(s: dict[str, str]) -> list[tuple[tuple[str, ...], str, tuple[str, ...]]]:
    """(arguments, the README row of the expected exit code, what stderr must name)."""
    config = ("--config", s["config"])
    return [
        (("--no-such-option",), BAD_ARGUMENT, ("--no-such-option",)),
        (("dry-run",), BAD_ARGUMENT, ("PATHS",)),
        (("dry-run", "--format", "pdf", FIXTURE), BAD_ARGUMENT, ("--format", "pdf")),
        (("dry-run", "--now", "yesterday", FIXTURE), BAD_ARGUMENT, ("--now",)),
        (("dry-run", "no/such/file.json"), UNREADABLE, ("no/such/file.json",)),
        (("--tables", "/no/such/tables", "dry-run", FIXTURE), BAD_ARGUMENT, ("/no/such/tables",)),
        (("--tables", s["no_chargemaster"], "dry-run", FIXTURE), BAD_ARGUMENT,
         (f"{s['no_chargemaster']}/chargemaster.yaml: file not found",)),
        (("--tables", s["typo"], "dry-run", FIXTURE), BAD_ARGUMENT, ("unit_prise: unknown key",)),
        (("explain",), BAD_ARGUMENT, ("PATHS",)),
        (("explain", FIXTURE, "--procedure", "unknown"), UNKNOWN_ID, ("no such Procedure: Procedure/unknown",)),
        (("sync", "--server", "notaurl"), BAD_ARGUMENT, ("--server 'notaurl'", "http(s) URL")),
        (("sync", "--server", s["server"], "--since", "last week"), BAD_ARGUMENT, ("--since", "last week")),
        (("sync", "--server", s["server"], "--ca-bundle", "/no/such/ca.pem"), BAD_ARGUMENT, ("/no/such/ca.pem",)),
        (("sync", "--server", s["server"]), UNAVAILABLE, (s["host_port"], "connection failed")),
        (("backfill",), BAD_ARGUMENT, ("--server",)),
        (("backfill", "--server", "ftp://x"), BAD_ARGUMENT, ("--server 'ftp://x'",)),
        (("backfill", "--write", FIXTURE), BAD_ARGUMENT, ("--write needs --server",)),
        (("backfill", "/no/such/export"), UNREADABLE, ("/no/such/export",)),
        (("backfill", FIXTURE, "--out", "/no/such/folder/out.json"), UNREADABLE, ("/no/such/folder/out.json",)),
        (("conformance", "export"), BAD_ARGUMENT, ("--out",)),
        (("conformance", "install", "--server", "notaurl"), BAD_ARGUMENT, ("--server 'notaurl'",)),
        (("--config", "/no/such/adapter.yaml", "status"), BAD_ARGUMENT, ("/no/such/adapter.yaml: file not found",)),
        (("--config", s["bad_key"], "status"), BAD_ARGUMENT, ("poll.intervall_seconds: unknown key",)),
        ((*config, "status", "--format", "xml"), BAD_ARGUMENT, ("--format",)),
        ((*config, "review", "show", "999"), UNKNOWN_ID, ("no such review entry: 999",)),
        ((*config, "review", "show", "abc"), BAD_ARGUMENT, ("REVIEW_ID",)),
        ((*config, "review", "replay", "999"), UNKNOWN_ID, ("no such review entry: 999",)),
        ((*config, "review", "replay"), BAD_ARGUMENT, ("give one review ID or --all",)),
        ((*config, "review", "list", "--format", "csv"), BAD_ARGUMENT, ("--format",)),
        ((*config, "run", "--once"), UNAVAILABLE, (s["host_port"], "connection failed")),
        ((*config, "run", "--twice"), BAD_ARGUMENT, ("--twice",)),
        (("--config", s["bad_port"], "serve"), BAD_ARGUMENT, ("serve.port: must be a whole number",)),
        ((*config, "subscribe", "--timeout", "soon"), BAD_ARGUMENT, ("--timeout",)),
        ((*config, "subscribe"), UNAVAILABLE, (s["host_port"],)),
    ]


def invoke(args: tuple[str, ...]) -> tuple[int, str, BaseException | None]:
    env = {k: None for k in os.environ if k.startswith("CHARGE_ADAPTER")}
    result = CliRunner().invoke(cli, list(args), env={**env, "CHARGE_ADAPTER_RECEIVER_TOKEN": TOKEN})
    escaped = None if result.exception is None or isinstance(result.exception, SystemExit) else result.exception
    return result.exit_code, result.stderr, escaped


def run(args: tuple[str, ...], cwd: str) -> tuple[int, str, BaseException | None]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARGE_ADAPTER")}
    env["CHARGE_ADAPTER_RECEIVER_TOKEN"] = TOKEN
    result = subprocess.run([sys.executable, "-m", "adapter", *args], capture_output=True, text=True, cwd=cwd,
                            env=env, timeout=60, check=False)
    return result.returncode, result.stderr, None


IN_REAL_PROCESSES = ("sync --server notaurl", "backfill --server ftp://x", "explain", "review replay 999")


def test_every_command_with_bad_arguments_exits_as_the_readme_says_naming_what_is_wrong(
        setup: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(setup["tmp"])
    table = cases(setup)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        results = [invoke(args) for args, _, _ in table]
    finally:  # `run` installs its own (to stop cleanly): this process keeps pytest's
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    real = [i for i, (args, _, _) in enumerate(table) if any(" ".join(args).startswith(p) or
                                                              " ".join(args).endswith(p) for p in IN_REAL_PROCESSES)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        processes = list(pool.map(lambda i: run(table[i][0], setup["tmp"]), real))
    wrong = []
    checked = [*zip(table, results, strict=True), *((table[i], p) for i, p in zip(real, processes, strict=True))]
    for (args, row, named), (code, stderr, escaped) in checked:
        logscan.add_text(f"charge-adapter {' '.join(args)} (stderr)", stderr)
        expected = readme_code(row)
        problems = [f"exit {code}, README says {expected}"] if code != expected else []
        problems += [f"a traceback ({escaped!r})"] if escaped is not None or "Traceback" in stderr else []
        problems += ["an internal error"] if "internal error" in stderr else []
        problems += [f"does not name {text!r}" for text in named if text not in stderr]
        if problems:
            wrong.append(f"{' '.join(args)}: {'; '.join(problems)}\n    stderr: {stderr.strip()[-400:]}")
    assert len(real) >= 4 and not wrong, "\n".join(wrong)


def test_review_counts_and_json_agree_across_status_review_list_and_show(tmp_path: Path) -> None:
    state_file = tmp_path / "state.sqlite"
    state = SqliteState(state_file)
    # one Procedure with two reasons is two entries, as the state stores them and `run` now counts them
    for reason in ("missing-diagnosis", "mue-exceeded"):
        state.open_review(NewReview("Procedure/p1", "needs-review", reason, f"{reason} detail", ("Patient/a",)))
    state.open_review(NewReview("Procedure/p2", "needs-review", "missing-price", "no row", ("Patient/b",)))
    state.close()
    config = tmp_path / "adapter.yaml"
    config.write_text(f"state: {state_file}\n")
    runner = CliRunner()
    status = runner.invoke(cli, ["--config", str(config), "status", "--format", "json"])
    listed = runner.invoke(cli, ["--config", str(config), "review", "list", "--format", "json"])
    assert status.exit_code == 0 and listed.exit_code == 0, status.output + listed.output
    entries = json.loads(listed.stdout)
    assert json.loads(status.stdout)["reviews_open"] == len(entries) == 3
    assert "review:    3 open" in runner.invoke(cli, ["--config", str(config), "status"]).stdout
    shown = runner.invoke(cli, ["--config", str(config), "review", "show", str(entries[0]["id"]), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    detail = json.loads(shown.stdout)
    assert detail["procedure"] == "Procedure/p1" and detail["reason"] == "missing-diagnosis"
    assert detail["detail"] == "missing-diagnosis detail" and detail["audit"] == [] and detail["pushed"] == []


def test_shell_completion_as_the_readme_documents_it() -> None:
    """The README's `eval "$(_CHARGE_ADAPTER_COMPLETE=bash_source charge-adapter)"` and what it then completes."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "_CHARGE_ADAPTER_COMPLETE=bash_source" in readme and "_CHARGE_ADAPTER_COMPLETE=zsh_source" in readme
    env = {k: v for k, v in os.environ.items() if not k.startswith("_CHARGE_ADAPTER")}
    script = subprocess.run([sys.executable, "-m", "adapter"], capture_output=True, text=True, check=False,
                            env={**env, "_CHARGE_ADAPTER_COMPLETE": "bash_source"}, timeout=60)
    assert script.returncode == 0 and "complete -o nosort -F _charge_adapter_completion" in script.stdout
    words = subprocess.run([sys.executable, "-m", "adapter"], capture_output=True, text=True, check=False,
                           env={**env, "_CHARGE_ADAPTER_COMPLETE": "bash_complete",
                                "COMP_WORDS": "charge-adapter status --format ", "COMP_CWORD": "3"}, timeout=60)
    assert words.stdout.split() == ["plain,text", "plain,json"]
