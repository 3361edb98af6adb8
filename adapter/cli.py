"""`charge-adapter`: the command line. Results go to stdout, diagnostics to stderr, meaning in the exit code.

Exit codes: 0 every FNA Procedure was coded or is non-billable by rule; 1 something needs review (or, online,
a session's write was rejected); 2 an input could not be read at all (the rest is still processed and
reported) or the FHIR server could not be used; 3 configuration error.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import yaml

from adapter import __version__
from adapter.building.resources import transaction_bundle
from adapter.client import FhirClient
from adapter.config import CodeTables, load_tables
from adapter.errors import AdapterError, ConfigError
from adapter.pipeline import EXIT_REVIEW, RunReport, process_paths
from adapter.report import charges_table, diagnostics, explain, summary, text_table
from adapter.service import Service, make_client
from adapter.settings import AppSettings, ServerSettings, load_settings, secret
from adapter.sources.receive import ReceiverSettings, bound_addresses, make_app, serve_app, stop_server
from adapter.sync import Syncer

EXIT_CONFIG = 3
EXIT_UNREACHABLE = 2


def _settings(ctx: click.Context) -> AppSettings:
    if "settings" not in ctx.obj:
        try:
            ctx.obj["settings"] = load_settings(ctx.obj.get("config_file"))
        except ConfigError as exc:
            click.echo(f"configuration error: {exc}", err=True)
            ctx.exit(EXIT_CONFIG)
    return ctx.obj["settings"]


def _tables(ctx: click.Context) -> CodeTables:
    try:
        folder = ctx.obj.get("tables_dir") or (_settings(ctx).tables if ctx.obj.get("config_file") else None)
        return load_tables(folder or None)
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
@click.option("--tables", "tables_dir", type=click.Path(file_okay=False), envvar="CHARGE_ADAPTER_TABLES",
              help="Folder of code tables and coding settings (default: the bundled config/).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), envvar="CHARGE_ADAPTER_CONFIG",
              help="The service's YAML config (server, state, poll, serve); keys can be overridden by "
                   "CHARGE_ADAPTER__SECTION__KEY variables.")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug) to stderr.")
@click.pass_context
def cli(ctx: click.Context, tables_dir: str | None, config_file: str | None, verbose: int) -> None:
    """Turn FHIR Procedures for FNA biopsies into CPT-coded ChargeItems and Claims."""
    ctx.ensure_object(dict)
    ctx.obj["tables_dir"] = tables_dir
    ctx.obj["config_file"] = config_file
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command("dry-run")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["json", "table"]), default="json", show_default=True,
              help="json: one FHIR transaction Bundle; table: the charges for humans.")
@click.option("--compact", is_flag=True, help="JSON on one line (much faster for large runs).")
@click.option("--quiet", is_flag=True, help="Leave no-charge and skipped Procedures out of the diagnostics.")
@click.option("--now", "now", type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%SZ"]),
              help="Time of writing stamped on the output (Claim.created, ChargeItem.enteredDate), e.g. "
                   "2026-03-31T12:00:00Z; default: the clock. Give it for reproducible output.")
@click.pass_context
def dry_run(ctx: click.Context, paths: tuple[str, ...], fmt: str, compact: bool, quiet: bool,
            now: datetime | None) -> None:
    """Code FHIR JSON/NDJSON files or folders and print what would be written, writing nothing."""
    tables = _tables(ctx)
    if now is not None and now.tzinfo is None:  # the literal Z form parses without a zone: it is UTC
        now = now.replace(tzinfo=UTC)
    report = process_paths(paths, tables, now)
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
    return make_client(ServerSettings(url=server, auth=auth, ca_bundle=ca_bundle or "",
                                      client_cert=client_cert or ""))


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
@click.option("--since", help="Only Procedures changed at or after this FHIR dateTime (default: all).")
@click.option("--dry-run", is_flag=True, help="Code and plan, but write nothing.")
@click.pass_context
def sync_cmd(ctx: click.Context, server: str, auth_file: str | None, ca_bundle: str | None,
             client_cert: str | None, since: str | None, dry_run: bool) -> None:
    """One pass: code the FNA Procedures on the server and write their charges back, idempotently."""
    tables = _tables(ctx)
    try:
        if server:
            client = _client(server, auth_file, ca_bundle, client_cert)
        else:
            client = make_client(_settings(ctx).server)
        syncer = Syncer(client, tables, dry_run=dry_run)
        client.check_server()
        total = syncer.source.count_changed(since) if sys.stderr.isatty() else None
        with click.progressbar(length=total or 0, label="Procedures", file=sys.stderr,
                               hidden=not total) as bar:
            summary = syncer.sync(since, progress=bar.update)
    except (AdapterError, OSError, ValueError) as exc:
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


def _service(ctx: click.Context) -> Service:
    settings, tables = _settings(ctx), _tables(ctx)
    try:
        return Service(settings, tables)
    except (AdapterError, OSError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(EXIT_UNREACHABLE)
        raise  # unreachable


def _lock(ctx: click.Context, service: Service) -> None:
    try:
        service.store.lock_instance()
    except AdapterError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(EXIT_UNREACHABLE)


def _stop_on_signals(stop: threading.Event, also: Callable[[], None] | None = None) -> None:
    """SIGTERM/SIGINT: finish the session being written, then stop cleanly."""

    def handler(signum: int, _frame: Any) -> None:
        click.echo(f"{signal.Signals(signum).name}: stopping after the current work", err=True)
        stop.set()
        if also:
            also()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@cli.command("run")
@click.option("--once", is_flag=True, help="One poll over the backlog, then exit.")
@click.pass_context
def run_cmd(ctx: click.Context, once: bool) -> None:
    """Poll the FHIR server for changed FNA Procedures from the durable cursor, code and write them, forever."""
    service = _service(ctx)
    _lock(ctx, service)
    stop = threading.Event()
    _stop_on_signals(stop)
    interval = service.settings.poll.interval_seconds
    while not stop.is_set():
        try:
            service.client.check_server()
            total = service.count_backlog() if sys.stderr.isatty() else None
            with click.progressbar(length=total or 0, label="Procedures", file=sys.stderr, hidden=not total) as bar:
                summary = service.poll_once(stop, progress=bar.update)
            click.echo(summary.text(), err=True)
        except AdapterError as exc:
            click.echo(f"poll failed, retrying in {interval:.0f} s: {exc}", err=True)
            if once:
                ctx.exit(EXIT_UNREACHABLE)
        except Exception:  # unattended: a bug in one poll must not end the service; the next poll retries
            logging.getLogger("adapter.service").exception("poll failed unexpectedly; retrying in %.0f s", interval)
            if once:
                ctx.exit(EXIT_UNREACHABLE)
        if once:
            break
        stop.wait(interval)
    status = service.status()
    ctx.exit(EXIT_REVIEW if status.reviews_open else 0)


@cli.command("serve")
@click.pass_context
def serve_cmd(ctx: click.Context) -> None:
    """Receive Subscription notifications and engine pushes, queue them durably, and code them."""
    service = _service(ctx)
    _lock(ctx, service)
    conf = service.settings.serve
    try:
        token = secret(conf.token_env, "receiver bearer token")
        hmac_secret = secret(conf.hmac_secret_env, "receiver HMAC secret").encode() if conf.hmac_secret_env else None
        receiver = ReceiverSettings(token=token, hmac_secret=hmac_secret, base_path=conf.base_path,
                                    max_body_bytes=conf.max_body_bytes)
    except (ConfigError, ValueError) as exc:
        click.echo(f"configuration error: {exc}", err=True)
        ctx.exit(EXIT_CONFIG)
        return
    stop, wake = threading.Event(), threading.Event()
    server = serve_app(make_app(service.store, receiver, service.metrics, on_enqueued=wake.set),
                       conf.host, conf.port, conf.threads, max_body_bytes=conf.max_body_bytes)
    _stop_on_signals(stop, also=wake.set)
    workers = [threading.Thread(target=service.drain, args=(stop, wake), name="worker", daemon=True)]
    if conf.safety_poll_seconds > 0:
        workers.append(threading.Thread(target=_safety_poll, args=(service, stop, conf.safety_poll_seconds),
                                        name="safety-poll", daemon=True))
    listener = threading.Thread(target=server.run, name="http", daemon=True)
    for thread in [*workers, listener]:
        thread.start()
    host, port = bound_addresses(server)[0]
    click.echo(f"listening on http://{host}:{port}{receiver.base_path} (health /healthz, metrics /metrics)",
               err=True)
    stop.wait()
    stop_server(server)
    for thread in workers:
        thread.join(60)
    click.echo("stopped", err=True)


def _safety_poll(service: Service, stop: threading.Event, every: float) -> None:
    """Push alone loses events (a sender gives up retrying): poll as a safety net."""
    while not stop.wait(every):
        try:
            service.poll_once(stop)
        except Exception as exc:  # the next round tries again; the receiver keeps working meanwhile
            logging.getLogger("adapter.service").warning("safety-net poll failed: %s", exc)


@cli.command("status")
@click.pass_context
def status_cmd(ctx: click.Context) -> None:
    """Cursor, lag, queue and review counts from the state file."""
    service = _service(ctx)
    st = service.status()
    lag = f"{st.lag_seconds:.0f} s" if st.lag_seconds is not None else "-"
    click.echo(f"state:     {service.store.path}")
    click.echo(f"cursor:    {st.cursor or '(none: the next poll reads everything)'}  lag {lag}")
    click.echo("queue:     " + (", ".join(f"{k} {v}" for k, v in sorted(st.queue.items())) or "empty"))
    click.echo(f"review:    {st.reviews_open} open")
    click.echo(f"processed: {st.processed} Procedure versions")


@cli.group("review")
def review_group() -> None:
    """What needs an analyst: list, show, replay."""


@review_group.command("list")
@click.option("--all", "show_all", is_flag=True, help="Resolved entries too.")
@click.pass_context
def review_list(ctx: click.Context, show_all: bool) -> None:
    service = _service(ctx)
    entries = service.store.reviews(None if show_all else "open")
    if not entries:
        click.echo("Nothing needs review.")
        return
    click.echo(text_table(("ID", "Procedure", "Kind", "Reason", "Status", "Attempts", "Last seen"), [
        (e.id, e.procedure, e.kind, e.reason, e.status, e.attempts,
         time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.last_seen))) for e in entries]))


@review_group.command("show")
@click.argument("review_id", type=int)
@click.pass_context
def review_show(ctx: click.Context, review_id: int) -> None:
    service = _service(ctx)
    entry = service.store.review(review_id)
    if entry is None:
        click.echo(f"no review entry {review_id}", err=True)
        ctx.exit(EXIT_REVIEW)
        return
    for name, value in (("id", entry.id), ("procedure", entry.procedure), ("patient", entry.patient or "-"),
                        ("kind", entry.kind), ("reason", entry.reason), ("status", entry.status),
                        ("attempts", entry.attempts), ("detail", entry.detail)):
        click.echo(f"{name + ':':11}{value}")
    for record in service.store.audit_for(entry.procedure):
        click.echo(f"audit:     version {record['version']} -> {', '.join(record['codes']) or '-'} "
                   f"(tables {record['table_version']}) -> {', '.join(record['written']) or 'nothing written'}")


@review_group.command("replay")
@click.argument("review_id", type=int, required=False)
@click.option("--all", "replay_all", is_flag=True, help="Every open entry.")
@click.pass_context
def review_replay(ctx: click.Context, review_id: int | None, replay_all: bool) -> None:
    """Re-run an entry (or --all) after the data or the tables were fixed; safe to repeat."""
    if (review_id is None) == (not replay_all):
        raise click.UsageError("give one review ID or --all")
    service = _service(ctx)
    summary = service.replay(None if replay_all else [review_id])  # type: ignore[list-item]
    click.echo(summary.text())
    left = service.store.reviews("open")
    click.echo(f"{len(left)} review entries still open")
    ctx.exit(EXIT_REVIEW if left else 0)


@cli.command("subscribe")
@click.option("--timeout", default=90.0, show_default=True, help="Seconds to wait for the server to activate it.")
@click.pass_context
def subscribe_cmd(ctx: click.Context, timeout: float) -> None:
    """Create or update the server's rest-hook Subscription for FNA Procedures pointing at `serve`."""
    service = _service(ctx)
    try:
        token = secret(service.settings.serve.token_env, "receiver bearer token")
        sub = service.subscribe(token, timeout)
    except AdapterError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(EXIT_UNREACHABLE)
        return
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
    try:
        client = _client(server, auth_file, ca_bundle, client_cert) if server else make_client(_settings(ctx).server)
        client.check_server()
        result = conformance.install(client, tables.settings.canonical_base)
    except (AdapterError, OSError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(EXIT_UNREACHABLE)
        return
    for label in result.written:
        click.echo(f"written:   {label}")
    for label in result.unchanged:
        click.echo(f"unchanged: {label}")
    click.echo(f"{len(result.written)} written, {len(result.unchanged)} unchanged")


def main() -> None:
    cli(prog_name="charge-adapter")
