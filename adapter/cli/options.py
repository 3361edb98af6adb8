"""Options several commands share (how to reach the FHIR server, --since, --format text|json) and what they
build."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import yaml

from adapter.cli.group import settings_of
from adapter.client import FhirClient
from adapter.errors import ConfigError
from adapter.service import make_client
from adapter.settings import ServerSettings, SettingError


def options_client(server: str, auth_file: str | None, ca_bundle: str | None, client_cert: str | None) -> FhirClient:
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
    try:
        settings = ServerSettings(url=server, auth=auth, ca_bundle=ca_bundle or "", client_cert=client_cert or "")
    except SettingError as exc:  # named as the option (or the auth file's key) the value came from
        option = {"url": f"--server {server!r}", "ca_bundle": "--ca-bundle", "client_cert": "--client-cert"}
        if exc.key.startswith("auth.") and auth_file:
            raise ConfigError(auth_file, exc.key[len("auth."):], exc.reason) from None
        hint = " such as http://127.0.0.1:8089/fhir" if exc.key == "url" else ""
        raise ConfigError(option.get(exc.key, exc.key), "", exc.reason + hint) from None
    return make_client(settings, auth_file or "--server", auth_key="" if auth_file else "server.auth")


def server_client(ctx: click.Context, server: str | None, auth_file: str | None, ca_bundle: str | None,
                   client_cert: str | None) -> FhirClient:
    """The client of --server and its options when given, else of the config file's `server:`."""
    if server:
        return options_client(server, auth_file, ca_bundle, client_cert)
    settings = settings_of(ctx)
    return make_client(settings.server, settings.source)


FHIR_DATETIME = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2}))?)?)?$")


def fhir_datetime(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A --since value, checked before any server is asked (a bad one is a usage error, exit 3)."""
    if value is not None and not FHIR_DATETIME.match(value):
        raise click.BadParameter(f"{value!r} is not a FHIR dateTime such as 2026-03-01 or 2026-03-01T00:00:00Z",
                                 param=param)
    return value


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


def format_option(func: Any) -> Any:
    """--format text|json: for people, or for an engine's scripts (one JSON document on stdout)."""
    return click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
                        help="text for people; json: one JSON document on stdout, for scripts.")(func)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
