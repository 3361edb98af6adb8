"""`charge-adapter`: the command line. Results go to stdout, diagnostics to stderr, meaning in the exit code.

Exit codes: 0 every FNA Procedure was coded or is non-billable by rule; 1 something needs review;
2 an input could not be read at all (the rest is still processed and reported); 3 configuration error.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from adapter import __version__
from adapter.building.resources import transaction_bundle
from adapter.config import CodeTables, load_tables
from adapter.errors import ConfigError
from adapter.pipeline import RunReport, process_paths
from adapter.report import charges_table, diagnostics, explain, summary

EXIT_CONFIG = 3


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


def main() -> None:
    cli(prog_name="charge-adapter")
