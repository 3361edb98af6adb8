"""The commands that work on a FHIR server in one go: sync, reconcile, backfill."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import click

from adapter import redact
from adapter.cli.group import cli, settings_of, tables_of
from adapter.cli.offline import stream_out
from adapter.cli.options import fhir_datetime, server_client, server_options
from adapter.errors import ConfigError, ExitCode
from adapter.pipeline import RunReport
from adapter.reconciliation import drift_table, reconcile
from adapter.settings import AppSettings
from adapter.sources.bulk import EXPORT_TYPES, BulkExport, ExportRequest
from adapter.sync import Syncer, SyncSummary

log = logging.getLogger("adapter.cli")


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
    tables = tables_of(ctx)
    if not server:
        _sync_sinks(settings_of(ctx), dry_run)
    client = server_client(ctx, server, auth_file, ca_bundle, client_cert)
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
    tables = tables_of(ctx)
    client = server_client(ctx, server, auth_file, ca_bundle, client_cert)
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
    tables = tables_of(ctx)
    if now is not None and now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    client = None
    if write or not paths:  # the server to export from or write to: --server, else the config file's server.url
        if not server and not ctx.obj.get("config_file"):
            raise click.UsageError("give NDJSON files or folders (a Bulk Data export), or --server URL to export "
                                   "from" if not write else "--write needs --server: the FHIR server to write to")
        client = server_client(ctx, server, auth_file, ca_bundle, client_cert)
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
        code = stream_out(paths, tables, now, fmt, compact, quiet, workdir, out_file,
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
