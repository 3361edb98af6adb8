"""How the long-running commands live and stop: the HTTP listener, the loops, SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import click

from adapter.errors import ListenError
from adapter.runner import Loop, Runner
from adapter.service import Service
from adapter.settings import AppSettings
from adapter.sources.receive import ServerLimits, WaitressServer, bound_addresses, serve_app, stop_server
from adapter.worklist.tasks import mirror_of, task_loop_turn


def stop_on_signals(stop: Callable[[], None]) -> threading.Event:
    """SIGTERM/SIGINT: finish the session being written, then stop cleanly; returns an event set once stopping.

    The handler only records the signal: calling into threading from a handler can deadlock when a second
    signal interrupts the first handler inside a lock (two SIGTERMs in a row do that). A watcher thread acts.
    It waits on an event, not with time.sleep: on a host whose wall clock is faked (libfaketime, the skewed-clock
    tests) time.sleep fails with EINVAL, the watcher died and SIGTERM was never acted on.
    """
    received: list[int] = []
    stopping, tick = threading.Event(), threading.Event()  # `tick` is never set: only its timed wait is used

    def handler(signum: int, _frame: Any) -> None:
        received.append(signum)

    def watch() -> None:
        while not received:
            tick.wait(0.1)
        click.echo(f"{signal.Signals(received[0]).name}: stopping after the current work", err=True)
        stop()
        stopping.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    threading.Thread(target=watch, name="signals", daemon=True).start()
    return stopping


def serve_until_stopped(service: Service, loops: list[Loop], server: WaitressServer, path: str,
                         stop: threading.Event) -> None:
    """Start the loops and the HTTP server, wait for SIGTERM/SIGINT, stop both; the same for run and serve.
    `stop` is what the loops' work asks between sessions."""
    runner = Runner(loops, health=service.health, metrics=service.metrics)

    def stop_all() -> None:
        stop.set()
        runner.stop()

    stopping = stop_on_signals(stop_all)
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


def limits_of(settings: AppSettings) -> ServerLimits:
    conf = settings.serve
    return ServerLimits(threads=conf.threads, connection_limit=conf.connection_limit,
                        header_timeout=conf.header_timeout_seconds, body_timeout=conf.body_timeout_seconds,
                        idle_timeout=conf.idle_timeout_seconds, max_body_bytes=conf.max_body_bytes)


def listen(app: Any, settings: AppSettings, metrics: Any) -> WaitressServer:
    conf = settings.serve
    try:
        return serve_app(app, conf.host, conf.port, limits=limits_of(settings), metrics=metrics)
    except ListenError as exc:
        raise ListenError(f"{exc} (serve.host, serve.port in {settings.source})") from None


def worker_loop(service: Service, stop: threading.Event, wake: threading.Event) -> Loop:
    return Loop("worker", lambda: 0.0 if service.work_once(stop) else 1.0, wake,
                service.settings.worker.retry_max_seconds)


def monitor_loop(service: Service) -> Loop:
    service.health.watch_heartbeats()
    return Loop("monitor", service.monitor, max_backoff=service.monitor_every)


def task_loops(service: Service, stop: threading.Event) -> list[Loop]:
    """Review items as FHIR Tasks, and coders' actions on them (adapter/worklist/tasks.py)."""
    mirror, every = mirror_of(service), service.settings.worklist.task_poll_seconds
    return [Loop("tasks", task_loop_turn(mirror, every), stop, max(every, 60.0))] if mirror and every else []
