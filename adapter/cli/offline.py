"""The offline commands, which read files and write nothing: dry-run and explain (and the streaming path's
output, which backfill shares)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from adapter import jsonout
from adapter.building.resources import transaction_bundle
from adapter.cli.group import cli, tables_of
from adapter.config import CodeTables
from adapter.errors import ExitCode
from adapter.pipeline import RunReport, process_paths
from adapter.report import charges_table, diagnostics, explain, summary
from adapter.streaming.run import STREAM_THRESHOLD_BYTES, input_bytes, stream_paths


def emit_diagnostics(report: RunReport, quiet: bool) -> None:
    for line in diagnostics(report):
        if not quiet or not line.startswith(("no charge:", "skipped:", "info:")):
            click.echo(line, err=True)
    click.echo(summary(report), err=True)


def output_bundle(report: RunReport) -> dict[str, Any]:
    return transaction_bundle([r for s in report.built.sessions for r in s.resources()])


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
    tables = tables_of(ctx)
    if now is not None and now.tzinfo is None:  # the literal Z form parses without a zone: it is UTC
        now = now.replace(tzinfo=UTC)
    if stream and fmt in ("hl7v2", "x12"):
        raise click.UsageError(f"--format {fmt} is coded in memory only; leave out --stream")
    if stream is None:
        stream = fmt not in ("hl7v2", "x12") and input_bytes(paths) > STREAM_THRESHOLD_BYTES
    if stream:
        ctx.exit(stream_out(paths, tables, now, fmt, compact, quiet, workdir, None))
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
    emit_diagnostics(report, quiet)
    ctx.exit(exit_code)


def stream_out(paths: tuple[str, ...], tables: CodeTables, now: datetime | None, fmt: str, compact: bool,
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
    tables = tables_of(ctx)
    report = process_paths(paths, tables)
    for err in report.read.unreadable:
        click.echo(f"error: cannot read {err}", err=True)
    wanted = procedure if not procedure or procedure.startswith("Procedure/") else f"Procedure/{procedure}"
    if wanted and wanted not in {f.ref for f in report.facts}:
        click.echo(f"no such Procedure: {wanted} is not in the input ({', '.join(paths)})", err=True)
        ctx.exit(max(report.exit_code, ExitCode.REVIEW))
    click.echo(explain(report, tables, procedure), nl=False)
    ctx.exit(report.exit_code)
