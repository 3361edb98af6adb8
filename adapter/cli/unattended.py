"""The unattended commands: run (poll), serve (receive), worklist (the page alone), subscribe."""

from __future__ import annotations

import os
import sys
import threading

import click

from adapter import redact
from adapter.cli.group import cli, service_of
from adapter.cli.lifecycle import (
    limits_of,
    listen,
    monitor_loop,
    serve_until_stopped,
    stop_on_signals,
    task_loops,
    worker_loop,
)
from adapter.errors import ExitCode, FhirError, ListenError
from adapter.runner import Loop
from adapter.service import Service
from adapter.settings import secret
from adapter.sources.receive import ReceiverSettings, bound_addresses, make_app, serve_app, stop_server
from adapter.worklist.tasks import mirror_of
from adapter.worklist.web import mounted, worklist_of


@cli.command("run")
@click.option("--once", is_flag=True, help="One poll over the backlog (and the retries due), then exit.")
@click.pass_context
def run_cmd(ctx: click.Context, once: bool) -> None:
    """Poll the FHIR server for changed FNA Procedures from the durable cursor, code and write them, forever.

    Serves /healthz and /metrics on serve.host:serve.port while it runs (not with --once).
    """
    service = service_of(ctx)
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

    server = listen(make_app(service.state, None, service.metrics, health=service.health), service.settings,
                     service.metrics)
    backoff = max(interval, service.settings.worker.retry_max_seconds)
    loops = [Loop("poll", poll, stop, backoff), worker_loop(service, stop, wake), monitor_loop(service),
             *task_loops(service, stop)]
    serve_until_stopped(service, loops, server, "", stop)
    status = service.status()
    ctx.exit(ExitCode.REVIEW if status.reviews_open else ExitCode.OK)


def _run_once(ctx: click.Context, service: Service) -> None:
    """One poll, then whatever queued work is due now; exit 2 if work is left waiting for a retry."""
    stop = threading.Event()
    stop_on_signals(stop.set)
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
    service = service_of(ctx)
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
    server = listen(app, settings, service.metrics)
    loops = [worker_loop(service, stop, wake), monitor_loop(service), *task_loops(service, stop)]
    if conf.safety_poll_seconds > 0:  # push alone loses events (a sender gives up retrying)
        loops.append(Loop("safety-poll", lambda: (service.reconcile_if_due(stop), service.poll_once(stop),
                                                  conf.safety_poll_seconds)[2], stop,
                          max(conf.safety_poll_seconds, settings.worker.retry_max_seconds)))
    serve_until_stopped(service, loops, server, receiver.base_path, stop)


@cli.command("worklist")
@click.pass_context
def worklist_cmd(ctx: click.Context) -> None:
    """Serve the worklist page alone on worklist.host:worklist.port (for sites that do not run `serve`)."""
    service = service_of(ctx)
    conf = service.settings.worklist
    token = "" if conf.users_env else secret(service.settings, "serve.token_env", "receiver bearer token")
    app = worklist_of(service, token, dict(os.environ))
    try:
        server = serve_app(app, conf.host, conf.port, limits=limits_of(service.settings), metrics=service.metrics)
    except ListenError as exc:
        raise ListenError(f"{exc} (worklist.host, worklist.port in {service.settings.source})") from None
    stopping = stop_on_signals(lambda: None)
    threading.Thread(target=server.run, name="http", daemon=True).start()
    host, port = bound_addresses(server)[0]
    click.echo(f"worklist on http://{host}:{port}/worklist/", err=True)
    while not stopping.wait(1.0):
        pass
    stop_server(server)
    click.echo("stopped", err=True)


@cli.command("subscribe")
@click.option("--timeout", default=90.0, show_default=True, help="Seconds to wait for the server to activate it.")
@click.pass_context
def subscribe_cmd(ctx: click.Context, timeout: float) -> None:
    """Create or update the server's rest-hook Subscription for FNA Procedures pointing at `serve`."""
    service = service_of(ctx)
    token = secret(service.settings, "serve.token_env", "receiver bearer token")
    sub = service.subscribe(token, timeout)
    click.echo(f"Subscription/{sub['id']} is active -> {sub['channel']['endpoint']}")
