"""`charge-adapter`: the command line. Results go to stdout, diagnostics to stderr, meaning in the exit code.

Exit codes (`adapter.errors.ExitCode`, the README's table): 0 every FNA Procedure was coded or is non-billable by
rule; 1 something needs review (or, online, the server rejected a session's charges), or an unknown id in
explain/review ("no such ..."); 2 an input file, the FHIR server (host:port named) or the state could not be used
(the rest is still processed and reported; work not written stays queued); 3 a bad argument or configuration
value (the message names the option, or the file and the key).

Commands only parse options, build the parts and wire them; every adapter exception is turned into its
message and exit code in one place (`AdapterGroup`), so no command prints errors of its own.
"""

from __future__ import annotations

import faulthandler
import getpass
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import yaml

from adapter import __version__, jsonout, logs, redact
from adapter.building.resources import transaction_bundle
from adapter.client import FhirClient
from adapter.config import CodeTables, load_tables
from adapter.errors import (
    AdapterError,
    ConfigError,
    ExitCode,
    FhirError,
    ListenError,
    StateSchemaError,
    exit_code_for,
)
from adapter.pipeline import RunReport, process_paths
from adapter.reconciliation import drift_table, reconcile
from adapter.report import charges_table, diagnostics, explain, summary, text_table
from adapter.runner import Loop, Runner
from adapter.service import Service, make_client, parse_instant
from adapter.settings import AppSettings, ServerSettings, SettingError, load_settings, secret
from adapter.sources.bulk import EXPORT_TYPES, BulkExport, ExportRequest
from adapter.sources.receive import (
    ReceiverSettings,
    ServerLimits,
    WaitressServer,
    bound_addresses,
    make_app,
    serve_app,
    stop_server,
)
from adapter.state import ReplicaInfo, ReviewEntry, StateBackend, open_state
from adapter.streaming.run import STREAM_THRESHOLD_BYTES, input_bytes, stream_paths
from adapter.sync import Syncer, SyncSummary
from adapter.worklist.reasons import help_for
from adapter.worklist.tasks import mirror_of, task_loop_turn
from adapter.worklist.web import mounted, worklist_of

log = logging.getLogger("adapter.cli")


class AdapterGroup(click.Group):
    """Runs a command; an adapter exception becomes one line on stderr and its exit code, never a traceback.

    A bad argument or option (click's usage errors) exits 3 like a bad config value: click's own default, 2,
    means "the environment failed" here. An exception nobody expected (a bug) is one line too, and its
    traceback is shown at -vv."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.UsageError as exc:
            exc.show()
            sys.exit(ExitCode.CONFIG)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(ExitCode.REVIEW)
        except BrokenPipeError:  # `charge-adapter dry-run ... | head`: the reader left; as click's standalone mode
            sys.stdout = typing.cast(typing.TextIO, click.utils.PacifyFlushWrapper(sys.stdout))
            sys.stderr = typing.cast(typing.TextIO, click.utils.PacifyFlushWrapper(sys.stderr))
            sys.exit(ExitCode.REVIEW)
        sys.exit(code if isinstance(code, int) else ExitCode.OK)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdapterError as exc:
            label = "configuration error" if exit_code_for(exc) == ExitCode.CONFIG and not isinstance(
                exc, StateSchemaError) else "error"
            click.echo(f"{label}: {redact.scrub(str(exc))}", err=True)
            ctx.exit(exit_code_for(exc))
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except OSError as exc:
            if exc.filename is None:
                raise
            # a file or folder the command reads or writes (--out, a download or work folder): exit 2 naming it
            click.echo(f"error: {exc.filename}: {exc.strerror or exc}", err=True)
            ctx.exit(ExitCode.UNAVAILABLE)
        except Exception as exc:
            if (ctx.obj or {}).get("verbose", 0) >= 2:
                raise
            click.echo(f"internal error: {type(exc).__name__}: {redact.scrub(str(exc))} (a bug in the adapter: run "
                       "it again with -vv for the traceback, and report it)", err=True)
            ctx.exit(ExitCode.UNAVAILABLE)


def _settings(ctx: click.Context) -> AppSettings:
    if "settings" not in ctx.obj:
        ctx.obj["settings"] = load_settings(ctx.obj.get("config_file"))
        logs.use_format(ctx.obj["settings"].logging.format)
    return ctx.obj["settings"]


def _tables(ctx: click.Context) -> CodeTables:
    folder = ctx.obj.get("tables_dir") or (_settings(ctx).tables if ctx.obj.get("config_file") else None)
    return load_tables(folder or None)


def _state(ctx: click.Context) -> StateBackend:
    """The state alone, for commands that need no FHIR server (status, review list/show)."""
    settings = _settings(ctx)
    state = open_state(settings.state.location, busy_timeout=settings.state.busy_timeout_seconds,
                       lease_seconds=settings.worker.lease_seconds)
    _redact_patients(ctx, settings, state)
    return state


def _service(ctx: click.Context) -> Service:
    service = Service(_settings(ctx), _tables(ctx))
    _redact_patients(ctx, service.settings, service.state)
    return service


def _redact_patients(ctx: click.Context, settings: AppSettings, state: StateBackend) -> None:
    """Patient references in log lines: shown at -vv, hashed when the config asks, omitted otherwise."""
    if ctx.obj.get("verbose", 0) < 2 and settings.logging.patient_references == "hashed":
        redact.configure("hashed", state.installation_id())


def _emit_diagnostics(report: RunReport, quiet: bool) -> None:
    for line in diagnostics(report):
        if not quiet or not line.startswith(("no charge:", "skipped:", "info:")):
            click.echo(line, err=True)
    click.echo(summary(report), err=True)


def output_bundle(report: RunReport) -> dict[str, Any]:
    return transaction_bundle([r for s in report.built.sessions for r in s.resources()])


@click.group(cls=AdapterGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="charge-adapter")
@click.option("--tables", "tables_dir", type=click.Path(file_okay=False), envvar="CHARGE_ADAPTER_TABLES",
              help="Folder of code tables and coding settings (default: the bundled config/).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), envvar="CHARGE_ADAPTER_CONFIG",
              help="The service's YAML config (server, state, poll, serve); keys can be overridden by "
                   "CHARGE_ADAPTER__SECTION__KEY variables.")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug, with patient references) to "
                                                  "stderr.")
@click.pass_context
def cli(ctx: click.Context, tables_dir: str | None, config_file: str | None, verbose: int) -> None:
    """Turn FHIR Procedures for FNA biopsies into CPT-coded ChargeItems and Claims."""
    ctx.ensure_object(dict)
    ctx.obj["tables_dir"] = tables_dir
    ctx.obj["config_file"] = config_file
    ctx.obj["verbose"] = verbose
    logs.configure(verbose)
    redact.configure("plain" if verbose >= 2 else "omit")


@cli.command("dry-run")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["json", "table", "hl7v2", "x12"]), default="json",
              show_default=True,
              help="json: one FHIR transaction Bundle; table: the charges for humans; hl7v2: the DFT^P03 charge "
                   "messages (one segment per line, a blank line between messages); x12: one X12 837P interchange "
                   "of the Claims (one segment per line).")
@click.option("--compact", is_flag=True, help="JSON on one line, without spaces (default: indented by two spaces).")
@click.option("--quiet", is_flag=True, help="Leave no-charge, skipped and info lines out of the diagnostics.")
@click.option("--now", "now", type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%SZ"]),
              help="Time of writing stamped on the output (Claim.created, ChargeItem.enteredDate), e.g. "
                   "2026-03-31T12:00:00Z; default: the clock. Give it for reproducible output.")
@click.option("--stream/--no-stream", "stream", default=None,
              help="Code through an on-disk index, patient by patient, with flat memory; the output is the same "
                   "byte for byte. Default: stream when the input files add up to more than 64 MiB (json and table "
                   "formats; hl7v2 is always coded in memory).")
@click.option("--workdir", type=click.Path(file_okay=False, exists=True), envvar="CHARGE_ADAPTER_WORKDIR",
              help="Where the streaming path keeps its temporary index (default: the system's temporary folder).")
@click.pass_context
def dry_run(ctx: click.Context, paths: tuple[str, ...], fmt: str, compact: bool, quiet: bool,
            now: datetime | None, stream: bool | None, workdir: str | None) -> None:
    """Code FHIR JSON/NDJSON files or folders and print what would be written, writing nothing."""
    tables = _tables(ctx)
    if now is not None and now.tzinfo is None:  # the literal Z form parses without a zone: it is UTC
        now = now.replace(tzinfo=UTC)
    if stream and fmt in ("hl7v2", "x12"):
        raise click.UsageError(f"--format {fmt} is coded in memory only; leave out --stream")
    if stream is None:
        stream = fmt not in ("hl7v2", "x12") and input_bytes(paths) > STREAM_THRESHOLD_BYTES
    if stream:
        ctx.exit(_stream_out(paths, tables, now, fmt, compact, quiet, workdir, None))
    report = process_paths(paths, tables, now)
    exit_code = report.exit_code
    if fmt == "json":
        jsonout.write_bundle(output_bundle(report), sys.stdout, compact)
    elif fmt == "hl7v2":
        exit_code = _print_hl7v2(report, tables, now)
    elif fmt == "x12":
        exit_code = _print_x12(report, tables, now)
    else:
        click.echo(charges_table(report))
    _emit_diagnostics(report, quiet)
    ctx.exit(exit_code)


def _stream_out(paths: tuple[str, ...], tables: CodeTables, now: datetime | None, fmt: str, compact: bool,
                quiet: bool, workdir: str | None, out_file: str | None,
                on_batch: Callable[[RunReport, list[str]], None] | None = None) -> int:
    """The streaming path's output (to stdout, or `out_file`), diagnostics and summary; returns the exit code."""
    with stream_paths(paths, tables, now, compact=compact, workdir=workdir) as run:
        total = run.store.db.execute("SELECT count(*) FROM entry WHERE key >= 'Procedure/' AND key < 'Procedure0'"
                                     ).fetchone()[0] if sys.stderr.isatty() else 0
        with click.progressbar(length=total, label="Procedures", file=sys.stderr, hidden=not total) as bar:
            result = run.code(on_batch, progress=bar.update)
        target = open(out_file, "w", encoding="utf-8") if out_file else sys.stdout  # noqa: SIM115
        try:
            if fmt == "json":
                run.write_bundle(target)
            else:
                run.write_table(target)
            target.flush()
        finally:
            if out_file:
                target.close()
        for line in result.diagnostics():
            if not quiet or not line.startswith(("no charge:", "skipped:", "info:")):
                click.echo(line, err=True)
        click.echo(result.summary(), err=True)
        return result.exit_code


def _print_hl7v2(report: RunReport, tables: CodeTables, now: datetime | None) -> int:
    """The messages on stdout, what keeps a session out of them on stderr; the exit code with those counted."""
    from adapter.hl7v2.messages import dry_run_messages, readable
    from adapter.report import free_text_of

    messages, reviews = dry_run_messages(report, tables, now or datetime.now(UTC))
    sys.stdout.write("\n".join(readable(text) for text in messages))
    text = free_text_of(report)
    for review in reviews:
        click.echo(f"review: {review.procedure}: {review.reason}: {text.mask(review.detail)}", err=True)
    return max(report.exit_code, ExitCode.REVIEW if reviews else ExitCode.OK)


def _print_x12(report: RunReport, tables: CodeTables, now: datetime | None) -> int:
    """The 837P on stdout; each Claim it cannot carry on stderr, naming the element it lacks."""
    from adapter.x12.dry_run import dry_run_interchange

    interchange = dry_run_interchange(report, tables, now or datetime.now(UTC))
    sys.stdout.write(interchange.text or "")
    for problem in interchange.problems:
        click.echo(f"review: {', '.join(problem.procedures) or problem.claim}: x12-missing-element: {problem.text}",
                   err=True)
    return max(report.exit_code, ExitCode.REVIEW if interchange.problems else ExitCode.OK)


@cli.command("explain")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--procedure", help="Only the session of this Procedure id.")
@click.pass_context
def explain_cmd(ctx: click.Context, paths: tuple[str, ...], procedure: str | None) -> None:
    """Per session: the lesions and where each came from, the modality and its evidence, each line's rule."""
    tables = _tables(ctx)
    report = process_paths(paths, tables)
    for err in report.read.unreadable:
        click.echo(f"error: cannot read {err}", err=True)
    wanted = procedure if not procedure or procedure.startswith("Procedure/") else f"Procedure/{procedure}"
    if wanted and wanted not in {f.ref for f in report.facts}:
        click.echo(f"no such Procedure: {wanted} is not in the input ({', '.join(paths)})", err=True)
        ctx.exit(max(report.exit_code, ExitCode.REVIEW))
    click.echo(explain(report, tables, procedure), nl=False)
    ctx.exit(report.exit_code)


def _client(server: str, auth_file: str | None, ca_bundle: str | None, client_cert: str | None) -> FhirClient:
    """A client from the command-line options; the same construction as the config file's `server:`."""
    auth: dict[str, Any] = {}
    if auth_file:
        try:
            loaded = yaml.safe_load(Path(auth_file).read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(auth_file, "", f"not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(auth_file, "", "must be a mapping such as {type: bearer, token_env: FHIR_TOKEN}")
        auth = loaded
    try:
        settings = ServerSettings(url=server, auth=auth, ca_bundle=ca_bundle or "", client_cert=client_cert or "")
    except SettingError as exc:  # named as the option (or the auth file's key) the value came from
        option = {"url": f"--server {server!r}", "ca_bundle": "--ca-bundle", "client_cert": "--client-cert"}
        if exc.key.startswith("auth.") and auth_file:
            raise ConfigError(auth_file, exc.key[len("auth."):], exc.reason) from None
        hint = " such as http://127.0.0.1:8089/fhir" if exc.key == "url" else ""
        raise ConfigError(option.get(exc.key, exc.key), "", exc.reason + hint) from None
    return make_client(settings, auth_file or "--server", auth_key="" if auth_file else "server.auth")


def _server_client(ctx: click.Context, server: str | None, auth_file: str | None, ca_bundle: str | None,
                   client_cert: str | None) -> FhirClient:
    """The client of --server and its options when given, else of the config file's `server:`."""
    if server:
        return _client(server, auth_file, ca_bundle, client_cert)
    settings = _settings(ctx)
    return make_client(settings.server, settings.source)


FHIR_DATETIME = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2}))?)?)?$")


def fhir_datetime(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A --since value, checked before any server is asked (a bad one is a usage error, exit 3)."""
    if value is not None and not FHIR_DATETIME.match(value):
        raise click.BadParameter(f"{value!r} is not a FHIR dateTime such as 2026-03-01 or 2026-03-01T00:00:00Z",
                                 param=param)
    return value


def server_options(func: Any) -> Any:
    """--server, --auth-file, --ca-bundle, --client-cert: how to reach the FHIR server."""
    func = click.option("--client-cert", type=click.Path(exists=True, dir_okay=False),
                        help="TLS client certificate (PEM with key).")(func)
    func = click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False),
                        help="CA bundle for TLS verification (verification is always on).")(func)
    func = click.option("--auth-file", type=click.Path(exists=True, dir_okay=False), envvar="CHARGE_ADAPTER_AUTH",
                        help="YAML auth settings, e.g. {type: bearer, token_env: FHIR_TOKEN}; secrets come from "
                             "environment variables or files named there.")(func)
    return click.option("--server", envvar="FHIR_SERVER_URL",
                        help="FHIR R4 base URL, e.g. http://127.0.0.1:8089/fhir (default: server.url of "
                             "--config)")(func)


@cli.command("sync")
@server_options
@click.option("--since", callback=fhir_datetime,
              help="Only Procedures changed at or after this FHIR dateTime (default: all).")
@click.option("--dry-run", is_flag=True, help="Code and plan, but write nothing.")
@click.pass_context
def sync_cmd(ctx: click.Context, server: str, auth_file: str | None, ca_bundle: str | None,
             client_cert: str | None, since: str | None, dry_run: bool) -> None:
    """One pass: code the FNA Procedures on the server and write their charges back, idempotently.

    Exits 2 when sessions could not be written for a passing reason (run it again), 1 when something needs
    review or the server rejected charges.
    """
    tables = _tables(ctx)
    if not server:
        _sync_sinks(_settings(ctx), dry_run)
    client = _server_client(ctx, server, auth_file, ca_bundle, client_cert)
    syncer = Syncer(client, tables, dry_run=dry_run)
    client.check_server()
    total = syncer.source.count_changed(since) if sys.stderr.isatty() else None
    with click.progressbar(length=total or 0, label="Procedures", file=sys.stderr, hidden=not total) as bar:
        result = syncer.sync(since, progress=bar.update)
    for review in result.reviews:
        click.echo(f"review: {review.procedure}: {review.reason}: {result.free_text.mask(review.detail)}", err=True)
    for outcome in result.outcomes:  # as dry-run lists them
        if outcome.merged_into:
            click.echo(f"{outcome.label}: {outcome.procedure}: billed under {outcome.merged_into}", err=True)
    for failure in result.failures:
        how = "will succeed on a later run" if failure.retryable else "rejected"
        click.echo(f"failed ({how}): session {redact.scrub(failure.session)} ({', '.join(failure.procedures)}): "
                   f"{redact.scrub(failure.reason)}", err=True)
    prefix = "dry run, nothing written: " if dry_run else ""
    click.echo(prefix + result.text())
    if result.to_retry:
        ctx.exit(ExitCode.UNAVAILABLE)
    ctx.exit(ExitCode.REVIEW if result.reviews or result.rejected else ExitCode.OK)


@cli.command("reconcile")
@server_options
@click.option("--since", help="Only Procedures changed (or deleted) at or after this FHIR dateTime, inclusive; "
                              "only their sessions are compared (default: every FNA Procedure on the server).")
@click.option("--repair", is_flag=True, help="Write what is missing, the updates and voids of our own lines, and "
                                             "the credits and replacements that are due; never lines that are no "
                                             "longer ours.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_context
def reconcile_cmd(ctx: click.Context, server: str, auth_file: str | None, ca_bundle: str | None,
                  client_cert: str | None, since: str | None, repair: bool, fmt: str) -> None:
    """Re-code every FNA Procedure on the server and compare with the charges it holds.

    Prints the drift by kind: missing on the server, outdated (ours, to update), unknown (ours, no longer
    billed by the coding), billed-wrong (billed or answered, to credit or replace), changed-by-others (edited
    on the server where our coding differs: review). Exits 0 when there is none (or `--repair` wrote all of
    it), 1 when there is (without `--repair` nothing is written), 2 when the server could not be used.
    """
    tables = _tables(ctx)
    client = _server_client(ctx, server, auth_file, ca_bundle, client_cert)
    result = reconcile(Syncer(client, tables), since, repair=repair)
    if fmt == "json":
        click.echo(redact.scrub(json.dumps(result.as_json(), indent=2)))
    else:
        click.echo(redact.scrub(drift_table(result)))
        if repair:
            click.echo(f"repaired: {result.summary.text()}")
    for failure in result.summary.failures:
        click.echo(f"failed: session {redact.scrub(failure.session)}: {redact.scrub(failure.reason)}", err=True)
    if repair and result.summary.to_retry:
        ctx.exit(ExitCode.UNAVAILABLE)
    ctx.exit(ExitCode.REVIEW if result.unrepaired else ExitCode.OK)


@cli.command("backfill")
@click.argument("paths", nargs=-1, type=click.Path())
@server_options
@click.option("--out", "out_file", type=click.Path(dir_okay=False),
              help="Write the Bundle (or the table) to this file instead of stdout.")
@click.option("--format", "fmt", type=click.Choice(["json", "table"]), default="json", show_default=True,
              help="json: one FHIR transaction Bundle (as dry-run); table: the charges for humans.")
@click.option("--compact", is_flag=True, help="JSON on one line, without spaces (default: indented by two spaces).")
@click.option("--quiet", is_flag=True, help="Leave no-charge, skipped and info lines out of the diagnostics.")
@click.option("--now", "now", type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%SZ"]),
              help="Time of writing stamped on the output (default: the clock).")
@click.option("--write", is_flag=True,
              help="Also write the charges to the FHIR server (--server), patient by patient, one transaction per "
                   "session, reconciled with what this adapter wrote before (re-running writes nothing new).")
@click.option("--workdir", type=click.Path(file_okay=False, exists=True), envvar="CHARGE_ADAPTER_WORKDIR",
              help="Where the temporary index (and a server's export) is kept while it runs (default: the system's "
                   "temporary folder).")
@click.option("--download-dir", type=click.Path(file_okay=False),
              help="Keep the server's exported NDJSON files in this folder (default: a temporary one, removed).")
@click.option("--level", type=click.Choice(["system", "patient"]), default="system", show_default=True,
              help="$export at [base]/$export (every resource) or [base]/Patient/$export (the Patient compartment: "
                   "shared resources such as Practitioners are not in it).")
@click.option("--types", default=",".join(EXPORT_TYPES), show_default=True,
              help="_type of the export: the resource types to export.")
@click.option("--since", callback=fhir_datetime,
              help="_since of the export: only resources changed at or after this FHIR instant.")
@click.option("--type-filter", "type_filters", multiple=True,
              help="_typeFilter of the export (repeatable), e.g. 'Procedure?date=ge2026-01-01'.")
@click.option("--poll-max-wait", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Longest wait between two polls of the export's status (a longer Retry-After is cut to it).")
@click.option("--export-timeout", type=click.FloatRange(min=1), default=6 * 3600.0, show_default=True,
              help="Seconds the export may take; then it is cancelled on the server.")
@click.pass_context
def backfill_cmd(ctx: click.Context, paths: tuple[str, ...], server: str | None, auth_file: str | None,
                 ca_bundle: str | None, client_cert: str | None, out_file: str | None, fmt: str, compact: bool,
                 quiet: bool, now: datetime | None, write: bool, workdir: str | None, download_dir: str | None,
                 level: str, types: str, since: str | None, type_filters: tuple[str, ...], poll_max_wait: float,
                 export_timeout: float) -> None:
    """Code a whole backlog with flat memory: NDJSON files or folders (a Bulk Data export), or the server's own
    $export (--server without PATH). Prints what dry-run prints for the same resources; with --write, also
    writes the charges to the server.

    PATH... and --server: the files are coded and --server is where --write writes. --server alone: the server's
    $export is downloaded (streamed to disk) and coded, and --write writes back to it. Without --server, the
    server is server.url of --config.
    """
    tables = _tables(ctx)
    if now is not None and now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    client = None
    if write or not paths:  # the server to export from or write to: --server, else the config file's server.url
        if not server and not ctx.obj.get("config_file"):
            raise click.UsageError("give NDJSON files or folders (a Bulk Data export), or --server URL to export "
                                   "from" if not write else "--write needs --server: the FHIR server to write to")
        client = _server_client(ctx, server, auth_file, ca_bundle, client_cert)
    if client is not None:
        client.check_server()
    syncer = Syncer(client, tables) if write and client is not None else None
    written = SyncSummary()

    def on_batch(report: RunReport, patients: list[str]) -> None:
        if syncer is not None:
            written.add(syncer.write_report(report, patients))

    with tempfile.TemporaryDirectory(prefix="charge-adapter-export-", dir=workdir) as tmp:
        if not paths:
            assert client is not None
            folder = Path(download_dir) if download_dir else Path(tmp)
            request = ExportRequest(level, tuple(t.strip() for t in types.split(",") if t.strip()), since,
                                    type_filters)
            export = BulkExport(client, request, max_wait=poll_max_wait, timeout=export_timeout,
                                progress=lambda text: log.info("export: %s", text))
            click.echo(f"exporting from {client.base_url} ({level} level) ...", err=True)
            result = export.run(folder)
            click.echo(f"export done: {len(result.files)} files, {result.bytes / 1e6:,.1f} MB"
                       + (f", transaction time {result.transaction_time}" if result.transaction_time else ""), err=True)
            for issue in result.errors:
                click.echo(f"export error: {issue}", err=True)
            paths = (str(folder),)
        code = _stream_out(paths, tables, now, fmt, compact, quiet, workdir, out_file,
                           on_batch if syncer is not None else None)
    if syncer is not None:
        for review in written.rejected:
            click.echo(f"failed (rejected): session {redact.scrub(review.session)} ({', '.join(review.procedures)}): "
                       f"{redact.scrub(review.reason)}", err=True)
        for failure in written.to_retry:
            click.echo(f"failed (will succeed on a later run): session {redact.scrub(failure.session)}: "
                       f"{redact.scrub(failure.reason)}", err=True)
        click.echo("written to the server: " + written.text(), err=True)
        if written.to_retry:
            code = max(code, ExitCode.UNAVAILABLE)
        elif written.rejected:
            code = max(code, ExitCode.REVIEW)
    ctx.exit(code)


def _sync_sinks(settings: AppSettings, dry_run: bool) -> None:
    """`sync` writes to the FHIR server only: HL7 v2 messages need the state's ledger (run, serve)."""
    if not settings.sinks.fhir and not dry_run:
        raise ConfigError(settings.source, "sinks.fhir", "is false and `sync` only writes to the FHIR server: use "
                                                         "`run --once`, which sends HL7 v2 messages")
    if settings.sinks.hl7v2.enabled:
        click.echo("note: sync writes to the FHIR server only; HL7 v2 charge messages are sent by run and serve "
                   "(they keep the message ledger in the state)", err=True)


def _stop_on_signals(stop: Callable[[], None]) -> threading.Event:
    """SIGTERM/SIGINT: finish the session being written, then stop cleanly; returns an event set once stopping.

    The handler only records the signal: calling into threading from a handler can deadlock when a second
    signal interrupts the first handler inside a lock (two SIGTERMs in a row do that). A watcher thread acts.
    """
    received: list[int] = []
    stopping = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        received.append(signum)

    def watch() -> None:
        while not received:
            time.sleep(0.1)
        click.echo(f"{signal.Signals(received[0]).name}: stopping after the current work", err=True)
        stop()
        stopping.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    threading.Thread(target=watch, name="signals", daemon=True).start()
    return stopping


def _serve_until_stopped(service: Service, loops: list[Loop], server: WaitressServer, path: str,
                         stop: threading.Event) -> None:
    """Start the loops and the HTTP server, wait for SIGTERM/SIGINT, stop both; the same for run and serve.
    `stop` is what the loops' work asks between sessions."""
    runner = Runner(loops, health=service.health, metrics=service.metrics)

    def stop_all() -> None:
        stop.set()
        runner.stop()

    stopping = _stop_on_signals(stop_all)
    listener = threading.Thread(target=server.run, name="http", daemon=True)
    runner.start()
    listener.start()
    host, port = bound_addresses(server)[0]
    click.echo(f"listening on http://{host}:{port}{path} (health /healthz, metrics /metrics)", err=True)
    while not stopping.wait(1.0):
        pass
    stop_server(server)
    if not runner.join(60):
        click.echo("a loop did not stop within 60 s; exiting anyway", err=True)
    service.stop()
    click.echo("stopped", err=True)


def _limits(settings: AppSettings) -> ServerLimits:
    conf = settings.serve
    return ServerLimits(threads=conf.threads, connection_limit=conf.connection_limit,
                        header_timeout=conf.header_timeout_seconds, body_timeout=conf.body_timeout_seconds,
                        idle_timeout=conf.idle_timeout_seconds, max_body_bytes=conf.max_body_bytes)


def _listen(app: Any, settings: AppSettings, metrics: Any) -> WaitressServer:
    conf = settings.serve
    try:
        return serve_app(app, conf.host, conf.port, limits=_limits(settings), metrics=metrics)
    except ListenError as exc:
        raise ListenError(f"{exc} (serve.host, serve.port in {settings.source})") from None


def _worker_loop(service: Service, stop: threading.Event, wake: threading.Event) -> Loop:
    return Loop("worker", lambda: 0.0 if service.work_once(stop) else 1.0, wake,
                service.settings.worker.retry_max_seconds)


def _monitor_loop(service: Service) -> Loop:
    service.health.watch_heartbeats()
    return Loop("monitor", service.monitor, max_backoff=service.monitor_every)


def _task_loops(service: Service, stop: threading.Event) -> list[Loop]:
    """Review items as FHIR Tasks, and coders' actions on them (adapter/worklist/tasks.py)."""
    mirror, every = mirror_of(service), service.settings.worklist.task_poll_seconds
    return [Loop("tasks", task_loop_turn(mirror, every), stop, max(every, 60.0))] if mirror and every else []


@cli.command("run")
@click.option("--once", is_flag=True, help="One poll over the backlog (and the retries due), then exit.")
@click.pass_context
def run_cmd(ctx: click.Context, once: bool) -> None:
    """Poll the FHIR server for changed FNA Procedures from the durable cursor, code and write them, forever.

    Serves /healthz and /metrics on serve.host:serve.port while it runs (not with --once).
    """
    service = _service(ctx)
    service.state.acquire_instance_lock()
    if once:
        _run_once(ctx, service)
        return
    stop, wake = threading.Event(), threading.Event()
    interval = service.settings.poll.interval_seconds

    def poll() -> float:
        service.client.check_server()
        reconciled = service.reconcile_if_due(stop)
        if reconciled is not None and reconciled.drift:
            click.echo(f"reconciled: {reconciled.summary.text()}", err=True)
        result = service.poll_once(stop)
        if result.procedures or result.failures:
            click.echo(result.text(), err=True)
        return interval

    server = _listen(make_app(service.state, None, service.metrics, health=service.health), service.settings,
                     service.metrics)
    backoff = max(interval, service.settings.worker.retry_max_seconds)
    loops = [Loop("poll", poll, stop, backoff), _worker_loop(service, stop, wake), _monitor_loop(service),
             *_task_loops(service, stop)]
    _serve_until_stopped(service, loops, server, "", stop)
    status = service.status()
    ctx.exit(ExitCode.REVIEW if status.reviews_open else ExitCode.OK)


def _run_once(ctx: click.Context, service: Service) -> None:
    """One poll, then whatever queued work is due now; exit 2 if work is left waiting for a retry."""
    stop = threading.Event()
    _stop_on_signals(stop.set)
    service.client.check_server()
    total = service.count_backlog() if sys.stderr.isatty() else None
    with click.progressbar(length=total or 0, label="Procedures", file=sys.stderr, hidden=not total) as bar:
        result = service.poll_once(stop, progress=bar.update)
    while not stop.is_set() and service.work_once(stop):
        pass
    click.echo(result.text(), err=True)
    mirror = mirror_of(service)
    if mirror is not None and not stop.is_set():
        try:
            click.echo(mirror.turn().text(), err=True)
        except FhirError as exc:
            click.echo(f"review Tasks not mirrored now (the next run does): {redact.scrub(str(exc))}", err=True)
    service.stop()  # a shared state's poll role is given up: the next run --once polls at once, not in 5 minutes
    status = service.status()
    click.echo(f"review: {status.reviews_open} entries open in the state (as status and review list count them)",
               err=True)
    waiting = sum(count for state, count in status.queue.items() if state in ("pending", "leased"))
    if waiting and not stop.is_set():
        click.echo(f"{waiting} queued item(s) wait for a retry (the FHIR server or the state failed); the next "
                   "run continues with them", err=True)
        ctx.exit(ExitCode.UNAVAILABLE)
    ctx.exit(ExitCode.REVIEW if status.reviews_open else ExitCode.OK)


@cli.command("serve")
@click.pass_context
def serve_cmd(ctx: click.Context) -> None:
    """Receive Subscription notifications and engine pushes, queue them durably, and code them."""
    service = _service(ctx)
    settings = service.settings
    conf = settings.serve
    token = secret(settings, "serve.token_env", "receiver bearer token")
    hmac_secret = secret(settings, "serve.hmac_secret_env", "receiver HMAC secret").encode() \
        if conf.hmac_secret_env else None
    receiver = ReceiverSettings(token=token, hmac_secret=hmac_secret, base_path=conf.base_path,
                                max_body_bytes=conf.max_body_bytes, request_timeout=conf.request_timeout_seconds)
    service.state.acquire_instance_lock()
    stop, wake = threading.Event(), threading.Event()
    app = make_app(service.state, receiver, service.metrics, on_enqueued=wake.set, health=service.health)
    if settings.worklist.page:  # the coder's worklist under /worklist (adapter/worklist/web.py)
        app = mounted(worklist_of(service, token, dict(os.environ)), app)
    server = _listen(app, settings, service.metrics)
    loops = [_worker_loop(service, stop, wake), _monitor_loop(service), *_task_loops(service, stop)]
    if conf.safety_poll_seconds > 0:  # push alone loses events (a sender gives up retrying)
        loops.append(Loop("safety-poll", lambda: (service.reconcile_if_due(stop), service.poll_once(stop),
                                                  conf.safety_poll_seconds)[2], stop,
                          max(conf.safety_poll_seconds, settings.worker.retry_max_seconds)))
    _serve_until_stopped(service, loops, server, receiver.base_path, stop)


def format_option(func: Any) -> Any:
    """--format text|json: for people, or for an engine's scripts (one JSON document on stdout)."""
    return click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
                        help="text for people; json: one JSON document on stdout, for scripts.")(func)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@cli.command("worklist")
@click.pass_context
def worklist_cmd(ctx: click.Context) -> None:
    """Serve the worklist page alone on worklist.host:worklist.port (for sites that do not run `serve`)."""
    service = _service(ctx)
    conf = service.settings.worklist
    token = "" if conf.users_env else secret(service.settings, "serve.token_env", "receiver bearer token")
    app = worklist_of(service, token, dict(os.environ))
    try:
        server = serve_app(app, conf.host, conf.port, limits=_limits(service.settings), metrics=service.metrics)
    except ListenError as exc:
        raise ListenError(f"{exc} (worklist.host, worklist.port in {service.settings.source})") from None
    stopping = _stop_on_signals(lambda: None)
    threading.Thread(target=server.run, name="http", daemon=True).start()
    host, port = bound_addresses(server)[0]
    click.echo(f"worklist on http://{host}:{port}/worklist/", err=True)
    while not stopping.wait(1.0):
        pass
    stop_server(server)
    click.echo("stopped", err=True)


@cli.command("status")
@format_option
@click.pass_context
def status_cmd(ctx: click.Context, fmt: str) -> None:
    """Cursor, lag, queue and review counts from the state."""
    state = _state(ctx)
    stats, counts, queue = state.stats(), state.counts(), state.queue_counts()
    now = getattr(state, "now", time.time)()  # the state's clock (the database's), not this host's
    if fmt == "json":
        _echo_json({"state": state.location, "cursor": stats.cursor,
                    "lag_seconds": round(now - parse_instant(stats.cursor).timestamp(), 3) if stats.cursor else None,
                    "queue": dict(sorted(queue.items())), "retry_backlog": stats.retry_backlog,
                    "reviews_open": counts["review_open"], "processed": counts["processed"],
                    "replicas": [{"instance": r.instance, "alive": now - r.last_seen <= REPLICA_ALIVE_SECONDS,
                                  "last_heartbeat": _utc(r.last_seen), "started": _utc(r.started),
                                  "roles": list(r.roles), "claims": r.claims, "leased": r.leased}
                                 for r in (state.replicas() if getattr(state, "shared", False) else [])]})
        return
    lag = f"{now - parse_instant(stats.cursor).timestamp():.0f} s" if stats.cursor else "-"
    click.echo(f"state:     {state.location}")
    click.echo(f"cursor:    {stats.cursor or '(none: the next poll reads everything)'}  lag {lag}")
    click.echo("queue:     " + (", ".join(f"{k} {v}" for k, v in sorted(queue.items())) or "empty")
               + (f" ({stats.retry_backlog} waiting for a retry)" if stats.retry_backlog else ""))
    click.echo(f"review:    {counts['review_open']} open")
    click.echo(f"processed: {counts['processed']} Procedure versions")
    if _settings(ctx).sinks.hl7v2.enabled:
        _echo_hl7v2(_settings(ctx), state)
    if getattr(state, "shared", False):
        _echo_replicas(state.replicas(), now)


def _echo_hl7v2(settings: AppSettings, state: StateBackend) -> None:
    """The HL7 v2 path from its ledger: what waits, what waits in review, and the receiver's latest failure."""
    from adapter.hl7v2.ledgers import open_ledger

    conf = settings.sinks.hl7v2
    where = f"mllp{'s' if conf.tls else ''}://{conf.host}:{conf.port}" if conf.transport == "mllp" else conf.folder
    summary = open_ledger(state).summary()
    oldest = f" (oldest {summary.oldest_pending_seconds:.0f} s)" if summary.oldest_pending_seconds is not None else ""
    parked = f", {summary.parked} unacknowledged waiting in review" if summary.parked else ""
    click.echo(f"hl7v2:     {where}: {summary.pending} message(s) pending{oldest}{parked}")
    if summary.last_failure:
        click.echo(f"           failing: {summary.last_failure} ({summary.last_failure_seconds:.0f} s ago)")


REPLICA_ALIVE_SECONDS = 30.0
"""A replica beats every few seconds (service.MONITOR_EVERY_SECONDS); silent this long, it is likely gone."""


def _echo_replicas(replicas: list[ReplicaInfo], now: float) -> None:
    """Who works on a shared state: alive (a heartbeat in the last 30 s) or silent, and what each holds."""
    alive = sum(1 for r in replicas if now - r.last_seen <= REPLICA_ALIVE_SECONDS)
    click.echo(f"replicas:  {alive} alive, {len(replicas) - alive} silent")
    for r in replicas:
        silent = now - r.last_seen
        state = "alive" if silent <= REPLICA_ALIVE_SECONDS else "silent"
        roles = f" roles {','.join(r.roles)};" if r.roles else ""
        click.echo(f"  {r.instance}  {state}, last heartbeat {silent:.0f} s ago, up {now - r.started:.0f} s;"
                   f"{roles} {r.claims} patient(s) claimed, {r.leased} work item(s) leased")


@cli.group("review")
def review_group() -> None:
    """What needs an analyst: list, show, replay."""


def _review_data(entry: ReviewEntry) -> dict[str, Any]:
    return {"id": entry.id, "procedure": entry.procedure, "patients": list(entry.patients), "kind": entry.kind,
            "reason": entry.reason, "status": entry.status, "attempts": entry.attempts,
            "first_seen": _utc(entry.first_seen), "last_seen": _utc(entry.last_seen)}


@review_group.command("list")
@click.option("--all", "show_all", is_flag=True, help="Resolved entries too.")
@format_option
@click.pass_context
def review_list(ctx: click.Context, show_all: bool, fmt: str) -> None:
    """The open review entries (--all: resolved ones too), oldest first."""
    entries = _state(ctx).reviews(None if show_all else "open")
    if fmt == "json":
        _echo_json([_review_data(e) for e in entries])
        return
    if not entries:
        click.echo("Nothing needs review.")
        return
    click.echo(text_table(("ID", "Procedure", "Kind", "Reason", "Status", "Attempts", "Last seen"), [
        (e.id, e.procedure, e.kind, e.reason, e.status, e.attempts,
         time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.last_seen))) for e in entries]))


@review_group.command("show")
@click.argument("review_id", type=int)
@format_option
@click.pass_context
def review_show(ctx: click.Context, review_id: int, fmt: str) -> None:
    """Everything about one entry: reason, detail, patients, pushed content, audit trail."""
    state = _state(ctx)
    entry = state.review(review_id)
    if entry is None:
        click.echo(f"no such review entry: {review_id} (charge-adapter review list --all shows them)", err=True)
        ctx.exit(ExitCode.REVIEW)
        return
    if fmt == "json":
        _echo_json({**_review_data(entry), "detail": entry.detail,
                    "pushed": [f"{r.get('resourceType')}/{r.get('id')}" for r in entry.resources],
                    "audit": [{"version": r.version, "codes": list(r.codes), "table_version": r.table_version,
                               "written": list(r.written)} for r in state.audit_for(entry.procedure)]})
        return
    pushed = ", ".join(f"{r.get('resourceType')}/{r.get('id')}" for r in entry.resources) or "-"
    for name, value in (("id", entry.id), ("procedure", entry.procedure),
                        ("patient", ", ".join(entry.patients) or "-"), ("kind", entry.kind),
                        ("reason", entry.reason), ("status", entry.status), ("attempts", entry.attempts),
                        ("detail", entry.detail), ("element", help_for(entry.reason).element),
                        ("fix", help_for(entry.reason).fix), ("pushed", pushed)):
        click.echo(f"{name + ':':11}{value}")
    for record in state.audit_for(entry.procedure):
        click.echo(f"audit:     version {record.version} -> {', '.join(record.codes) or '-'} "
                   f"(tables {record.table_version}) -> {', '.join(record.written) or 'nothing written'}")
    for action in state.review_actions(entry.id):
        note = f": {action.note}" if action.note else ""
        click.echo(f"action:    {action.action} by {action.actor} at "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(action.at))}{note}")


@review_group.command("replay")
@click.argument("review_id", type=int, required=False)
@click.option("--all", "replay_all", is_flag=True, help="Every open entry.")
@click.pass_context
def review_replay(ctx: click.Context, review_id: int | None, replay_all: bool) -> None:
    """Re-run an entry (or --all) after the data or the tables were fixed; safe to repeat."""
    if (review_id is None) == (not replay_all):
        raise click.UsageError("give one review ID or --all")
    state = _state(ctx)  # the id is checked before anything needs the FHIR server
    if review_id is not None:
        entry = state.review(review_id)
        if entry is None:
            click.echo(f"no such review entry: {review_id} (charge-adapter review list shows the open ones)", err=True)
            ctx.exit(ExitCode.REVIEW)
        if entry.status != "open":
            click.echo(f"review entry {review_id} is {entry.status}, not open: nothing to replay", err=True)
            ctx.exit(ExitCode.OK)
    service = Service(_settings(ctx), _tables(ctx), state=state)
    result = service.replay(None if replay_all else [review_id])  # type: ignore[list-item]
    click.echo(result.text())
    left = service.state.reviews("open")
    click.echo(f"{len(left)} review entries still open")
    if result.to_retry:
        click.echo(f"{len(result.to_retry)} session(s) could not be written now; they are queued and retried by "
                   "run/serve", err=True)
    ctx.exit(ExitCode.REVIEW if left else ExitCode.OK)


@review_group.command("dismiss")
@click.argument("review_id", type=int)
@click.option("--note", required=True, help="Why nobody will fix it (kept in the audit, shown on the worklist).")
@click.pass_context
def review_dismiss(ctx: click.Context, review_id: int, note: str) -> None:
    """Close an open entry that nobody will fix (its Task is cancelled on the next run/serve turn)."""
    if not note.strip():
        raise click.UsageError("--note must say why")
    if not _state(ctx).dismiss_review(review_id, f"cli:{getpass.getuser()}", note.strip()):
        click.echo(f"review entry {review_id} is not open", err=True)
        ctx.exit(ExitCode.REVIEW)
    click.echo(f"review entry {review_id} dismissed")


@cli.command("subscribe")
@click.option("--timeout", default=90.0, show_default=True, help="Seconds to wait for the server to activate it.")
@click.pass_context
def subscribe_cmd(ctx: click.Context, timeout: float) -> None:
    """Create or update the server's rest-hook Subscription for FNA Procedures pointing at `serve`."""
    service = _service(ctx)
    token = secret(service.settings, "serve.token_env", "receiver bearer token")
    sub = service.subscribe(token, timeout)
    click.echo(f"Subscription/{sub['id']} is active -> {sub['channel']['endpoint']}")


@cli.group("conformance")
def conformance_group() -> None:
    """The project's FHIR package (CPT-modifier extension, identifier systems) under urls.canonical_base."""


@conformance_group.command("export")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write into.")
@click.option("--tgz", is_flag=True, help="Write NAME-VERSION.tgz (package/ inside) instead of a folder.")
@click.pass_context
def conformance_export(ctx: click.Context, out: str, tgz: bool) -> None:
    """Write the FHIR NPM package (R4 4.0.1), e.g. for a validator's -ig."""
    from adapter import conformance

    tables = _tables(ctx)
    click.echo(str(conformance.export(Path(out), tables.settings.canonical_base, tgz=tgz)))


@conformance_group.command("install")
@server_options
@click.pass_context
def conformance_install(ctx: click.Context, server: str | None, auth_file: str | None, ca_bundle: str | None,
                        client_cert: str | None) -> None:
    """Create or update the package's resources on a FHIR server; unchanged ones are not written again."""
    from adapter import conformance

    tables = _tables(ctx)
    client = _server_client(ctx, server, auth_file, ca_bundle, client_cert)
    client.check_server()
    result = conformance.install(client, tables.settings.canonical_base)
    for label in result.written:
        click.echo(f"written:   {label}")
    for label in result.unchanged:
        click.echo(f"unchanged: {label}")
    click.echo(f"{len(result.written)} written, {len(result.unchanged)} unchanged")


@cli.group("mue")
def mue_group() -> None:
    """Medically Unlikely Edits: config/mue.yaml from the CMS practitioner MUE table."""


@mue_group.command("import")
@click.argument("csv_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--quarter", required=True, help="The quarter the CMS file is for, e.g. 2026Q2: its rows are valid "
                                               "from the quarter's first to its last day.")
@click.option("--code", "codes", multiple=True, help="Import this code (repeatable). Default: the FNA family's "
                                                     "codes (config/cpt-fna.yaml).")
@click.option("--all-codes", is_flag=True, help="Import every code of the file.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False),
              help="The mue.yaml to update (default: the one of the tables folder).")
@click.pass_context
def mue_import(ctx: click.Context, csv_file: str, quarter: str, codes: tuple[str, ...], all_codes: bool,
               out_file: str | None) -> None:
    """Read the CMS practitioner MUE CSV (code, MUE value, adjudication indicator, rationale) into mue.yaml."""
    from adapter.config import DEFAULT_CONFIG_DIR
    from adapter.mue_import import import_file

    tables = _tables(ctx)
    wanted: set[str] | None = None if all_codes else set(codes) or {
        code for rows in tables.family.values() for _, fam in rows.rows for code in (fam.primary, fam.add_on)}
    folder = ctx.obj.get("tables_dir") or (_settings(ctx).tables if ctx.obj.get("config_file") else None)
    target = Path(out_file) if out_file else Path(folder or DEFAULT_CONFIG_DIR) / "mue.yaml"
    result = import_file(Path(csv_file), target, quarter, wanted)
    click.echo(f"{len(result.imported)} code(s) imported for {quarter.upper()} ({result.start} to {result.end}) "
               f"into {target}: {', '.join(result.imported) or 'none'}")
    if result.trimmed:
        click.echo(f"earlier rows ended before the quarter or replaced: {', '.join(sorted(set(result.trimmed)))}")
    if result.missing:
        click.echo(f"not in the CMS file (their rows unchanged): {', '.join(result.missing)}", err=True)


def main() -> None:
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: every thread's stack to stderr, for a hung process
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    cli(prog_name="charge-adapter")
