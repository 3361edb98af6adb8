"""`charge-adapter`: the command line. Results go to stdout, diagnostics to stderr, meaning in the exit code.

Exit codes: 0 every FNA Procedure was coded or is non-billable by rule; 1 something needs review (or, online,
a session's write was rejected); 2 an input could not be read at all (the rest is still processed and
reported) or the FHIR server could not be used; 3 configuration error.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
import yaml

from adapter import __version__
from adapter.building.resources import transaction_bundle
from adapter.client import FhirClient
from adapter.client.auth import auth_from_settings
from adapter.config import CodeTables, load_tables
from adapter.errors import AdapterError, ConfigError
from adapter.pipeline import EXIT_REVIEW, RunReport, process_paths
from adapter.report import charges_table, diagnostics, explain, summary
from adapter.sync import Syncer

EXIT_CONFIG = 3
EXIT_UNREACHABLE = 2


def _tables(ctx: click.Context) -> CodeTables:
    try:
        return load_tables(ctx.obj.get("config_dir"))
    except ConfigError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        ctx.exit(EXIT_CONFIG)
        raise  # unreachable: ctx.exit raises


def _emit_diagnostics(report: RunReport, quiet: bool) -> None:
    for line in diagnostics(report):
        if not quiet or not line.startswith(("no charge:", "skipped:")):
            click.echo(line, err=True)
    click.echo(summary(report), err=True)


def output_bundle(report: RunReport) -> dict[str, Any]:
    return transaction_bundle([r for s in report.built.sessions for r in s.resources()])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="charge-adapter")
@click.option("--config", "config_dir", type=click.Path(file_okay=False), envvar="CHARGE_ADAPTER_CONFIG",
              help="Folder of code tables and settings (default: the bundled config/).")
@click.pass_context
def cli(ctx: click.Context, config_dir: str | None) -> None:
    """Turn FHIR Procedures for FNA biopsies into CPT-coded ChargeItems and Claims."""
    ctx.ensure_object(dict)
    ctx.obj["config_dir"] = config_dir


@cli.command("dry-run")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["json", "table"]), default="json", show_default=True,
              help="json: one FHIR transaction Bundle; table: the charges for humans.")
@click.option("--compact", is_flag=True, help="JSON on one line (much faster for large runs).")
@click.option("--quiet", is_flag=True, help="Leave no-charge and skipped Procedures out of the diagnostics.")
@click.pass_context
def dry_run(ctx: click.Context, paths: tuple[str, ...], fmt: str, compact: bool, quiet: bool) -> None:
    """Code FHIR JSON/NDJSON files or folders and print what would be written, writing nothing."""
    tables = _tables(ctx)
    report = process_paths(paths, tables)
    if fmt == "json":
        sys.stdout.write(json.dumps(output_bundle(report), indent=None if compact else 2, ensure_ascii=False) + "\n")
    else:
        click.echo(charges_table(report))
    _emit_diagnostics(report, quiet)
    ctx.exit(report.exit_code)


@cli.command("explain")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--procedure", help="Only the session of this Procedure id.")
@click.pass_context
def explain_cmd(ctx: click.Context, paths: tuple[str, ...], procedure: str | None) -> None:
    """Per session: the lesions and where each came from, the modality and its evidence, each line's rule."""
    tables = _tables(ctx)
    report = process_paths(paths, tables)
    click.echo(explain(report, tables, procedure), nl=False)
    for err in report.read.unreadable:
        click.echo(f"error: cannot read {err}", err=True)
    ctx.exit(report.exit_code)


def _client(server: str, auth_file: str | None, ca_bundle: str | None, client_cert: str | None) -> FhirClient:
    settings: dict[str, Any] | None = None
    if auth_file:
        with open(auth_file, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)
        if not isinstance(loaded, dict):
            raise ConfigError(auth_file, "", "must be a mapping such as {type: bearer, token_env: FHIR_TOKEN}")
        settings = loaded
    return FhirClient(server, auth=auth_from_settings(settings), verify=ca_bundle or True, cert=client_cert)


def server_options(func: Any) -> Any:
    """--server, --auth-file, --ca-bundle, --client-cert: how to reach the FHIR server."""
    func = click.option("--client-cert", type=click.Path(exists=True, dir_okay=False),
                        help="TLS client certificate (PEM with key).")(func)
    func = click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False),
                        help="CA bundle for TLS verification (verification is always on).")(func)
    func = click.option("--auth-file", type=click.Path(exists=True, dir_okay=False), envvar="CHARGE_ADAPTER_AUTH",
                        help="YAML auth settings, e.g. {type: bearer, token_env: FHIR_TOKEN}; secrets come from "
                             "environment variables or files named there.")(func)
    return click.option("--server", required=True, envvar="FHIR_SERVER_URL",
                        help="FHIR R4 base URL, e.g. http://127.0.0.1:8089/fhir")(func)


@cli.command("sync")
@server_options
@click.option("--since", help="Only Procedures changed at or after this FHIR dateTime (default: all).")
@click.option("--dry-run", is_flag=True, help="Code and plan, but write nothing.")
@click.pass_context
def sync_cmd(ctx: click.Context, server: str, auth_file: str | None, ca_bundle: str | None,
             client_cert: str | None, since: str | None, dry_run: bool) -> None:
    """One pass: code the FNA Procedures on the server and write their charges back, idempotently."""
    tables = _tables(ctx)
    try:
        client = _client(server, auth_file, ca_bundle, client_cert)
        syncer = Syncer(client, tables, dry_run=dry_run)
        client.check_server()
        total = syncer.source.count_changed(since) if sys.stderr.isatty() else None
        with click.progressbar(length=total or 0, label="Procedures", file=sys.stderr,
                               hidden=not total) as bar:
            summary = syncer.sync(since, progress=bar.update)
    except (AdapterError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(EXIT_UNREACHABLE)
    for review in summary.reviews:
        click.echo(f"review: {review.procedure}: {review.reason}: {review.detail}", err=True)
    for failure in summary.failures:
        click.echo(f"failed: session {failure.session} ({', '.join(failure.procedures)}): {failure.reason}",
                   err=True)
    prefix = "dry run, nothing written: " if dry_run else ""
    click.echo(prefix + summary.text())
    ctx.exit(EXIT_REVIEW if summary.reviews or summary.failures else 0)


def main() -> None:
    cli(prog_name="charge-adapter")
