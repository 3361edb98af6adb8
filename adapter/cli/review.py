"""`review`: what needs an analyst (list, show, replay, dismiss)."""

from __future__ import annotations

import getpass
import time
from typing import Any

import click

from adapter.cli.group import cli, settings_of, state_of, tables_of
from adapter.cli.options import echo_json, format_option, utc
from adapter.errors import ExitCode
from adapter.report import text_table
from adapter.service import Service
from adapter.state import ReviewEntry
from adapter.worklist.reasons import help_for


@cli.group("review")
def review_group() -> None:
    """What needs an analyst: list, show, replay."""


def _review_data(entry: ReviewEntry) -> dict[str, Any]:
    return {"id": entry.id, "procedure": entry.procedure, "patients": list(entry.patients), "kind": entry.kind,
            "reason": entry.reason, "status": entry.status, "attempts": entry.attempts,
            "first_seen": utc(entry.first_seen), "last_seen": utc(entry.last_seen)}


@review_group.command("list")
@click.option("--all", "show_all", is_flag=True, help="Resolved entries too.")
@format_option
@click.pass_context
def review_list(ctx: click.Context, show_all: bool, fmt: str) -> None:
    """The open review entries (--all: resolved ones too), oldest first."""
    entries = state_of(ctx).reviews(None if show_all else "open")
    if fmt == "json":
        echo_json([_review_data(e) for e in entries])
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
    state = state_of(ctx)
    entry = state.review(review_id)
    if entry is None:
        click.echo(f"no such review entry: {review_id} (charge-adapter review list --all shows them)", err=True)
        ctx.exit(ExitCode.REVIEW)
        return
    if fmt == "json":
        echo_json({**_review_data(entry), "detail": entry.detail,
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
    state = state_of(ctx)  # the id is checked before anything needs the FHIR server
    if review_id is not None:
        entry = state.review(review_id)
        if entry is None:
            click.echo(f"no such review entry: {review_id} (charge-adapter review list shows the open ones)", err=True)
            ctx.exit(ExitCode.REVIEW)
        if entry.status != "open":
            click.echo(f"review entry {review_id} is {entry.status}, not open: nothing to replay", err=True)
            ctx.exit(ExitCode.OK)
    service = Service(settings_of(ctx), tables_of(ctx), state=state)
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
    if not state_of(ctx).dismiss_review(review_id, f"cli:{getpass.getuser()}", note.strip()):
        click.echo(f"review entry {review_id} is not open", err=True)
        ctx.exit(ExitCode.REVIEW)
    click.echo(f"review entry {review_id} dismissed")
