"""The `charge-adapter` group: its global options, the one place where an adapter exception becomes its
message and exit code, and what every command takes from the context (settings, tables, state, service)."""

from __future__ import annotations

import importlib
import sys
import typing
from typing import TYPE_CHECKING, Any

import click

from adapter import __version__, logs, redact
from adapter.config import CodeTables, load_tables
from adapter.errors import AdapterError, ExitCode, StateSchemaError, exit_code_for

if TYPE_CHECKING:  # imported where used: `dry-run` and `explain` never load the service, the state or settings
    from adapter.service import Service
    from adapter.settings import AppSettings
    from adapter.state import StateBackend

COMMAND_MODULES = {
    "dry-run": "offline", "explain": "offline",
    "sync": "server", "reconcile": "server", "backfill": "server",
    "run": "unattended", "serve": "unattended", "worklist": "unattended", "subscribe": "unattended",
    "status": "status", "review": "review", "conformance": "tables", "mue": "tables",
}
"""The module under adapter/cli/ that defines each command: a command's module (and what it imports) is loaded
only when that command runs or help lists it (tests/test_cli.py checks this map against the commands)."""


class AdapterGroup(click.Group):
    """Runs a command; an adapter exception becomes one line on stderr and its exit code, never a traceback.

    A bad argument or option (click's usage errors) exits 3 like a bad config value: click's own default, 2,
    means "the environment failed" here. An exception nobody expected (a bug) is one line too, and its
    traceback is shown at -vv."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMAND_MODULES) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            importlib.import_module(f"adapter.cli.{COMMAND_MODULES[cmd_name]}")
        return super().get_command(ctx, cmd_name)

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


def settings_of(ctx: click.Context) -> AppSettings:
    if "settings" not in ctx.obj:
        from adapter.settings import load_settings

        ctx.obj["settings"] = load_settings(ctx.obj.get("config_file"))
        logs.use_format(ctx.obj["settings"].logging.format)
    return ctx.obj["settings"]


def tables_of(ctx: click.Context) -> CodeTables:
    folder = ctx.obj.get("tables_dir") or (settings_of(ctx).tables if ctx.obj.get("config_file") else None)
    return load_tables(folder or None)


def state_of(ctx: click.Context) -> StateBackend:
    """The state alone, for commands that need no FHIR server (status, review list/show)."""
    from adapter.state import open_state

    settings = settings_of(ctx)
    state = open_state(settings.state.location, busy_timeout=settings.state.busy_timeout_seconds,
                       lease_seconds=settings.worker.lease_seconds)
    _redact_patients(ctx, settings, state)
    return state


def service_of(ctx: click.Context) -> Service:
    from adapter.service import Service

    service = Service(settings_of(ctx), tables_of(ctx))
    _redact_patients(ctx, service.settings, service.state)
    return service


def _redact_patients(ctx: click.Context, settings: AppSettings, state: StateBackend) -> None:
    """Patient references in log lines: shown at -vv, hashed when the config asks, omitted otherwise."""
    if ctx.obj.get("verbose", 0) < 2 and settings.logging.patient_references == "hashed":
        redact.configure("hashed", state.installation_id())


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
