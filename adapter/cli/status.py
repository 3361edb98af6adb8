"""`status`: cursor, lag, queue, review counts, the HL7 v2 path and the replicas, from the state."""

from __future__ import annotations

import time

import click

from adapter.cli.group import cli, settings_of, state_of
from adapter.cli.options import echo_json, format_option, utc
from adapter.service import parse_instant
from adapter.settings import AppSettings
from adapter.state import ReplicaInfo, StateBackend


@cli.command("status")
@format_option
@click.pass_context
def status_cmd(ctx: click.Context, fmt: str) -> None:
    """Cursor, lag, queue and review counts from the state."""
    state = state_of(ctx)
    stats, counts, queue = state.stats(), state.counts(), state.queue_counts()
    now = getattr(state, "now", time.time)()  # the state's clock (the database's), not this host's
    if fmt == "json":
        echo_json({"state": state.location, "cursor": stats.cursor,
                    "lag_seconds": round(now - parse_instant(stats.cursor).timestamp(), 3) if stats.cursor else None,
                    "queue": dict(sorted(queue.items())), "retry_backlog": stats.retry_backlog,
                    "reviews_open": counts["review_open"], "processed": counts["processed"],
                    "replicas": [{"instance": r.instance, "alive": now - r.last_seen <= REPLICA_ALIVE_SECONDS,
                                  "last_heartbeat": utc(r.last_seen), "started": utc(r.started),
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
    if settings_of(ctx).sinks.hl7v2.enabled:
        _echo_hl7v2(settings_of(ctx), state)
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
