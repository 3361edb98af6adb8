"""The service's one configuration file (YAML), with environment overrides, validated to the value at start.

Any key can be overridden by `CHARGE_ADAPTER__<SECTION>__<KEY>` (e.g. `CHARGE_ADAPTER__SERVER__URL`).
Every setting declares its type and range next to its default (`setting(...)`); each section checks its own
cross-field rules in `__post_init__`. Errors name the file (or variable) and the key. Secrets are never
values here: only the names of the environment variables or files that hold them.

Built on pydantic-settings: the sections are pydantic dataclasses (validated when built, frozen, and still
dataclasses, so `dataclasses.replace` and attribute access work as before); a `BaseSettings` model gathers the
YAML file and the environment (its env source maps `CHARGE_ADAPTER__SECTION__KEY`, nested sections too, and
merges it over the file) and validates the whole. Our own wording is kept: values are coerced with the rules
of `setting(...)` before pydantic checks the types, and pydantic's errors are translated into `ConfigError`s
naming the file (or variable) and the key, which the CLI turns into exit 3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import typing
from contextvars import ContextVar
from dataclasses import MISSING, field, fields
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from adapter.errors import ConfigError

ENV_PREFIX = "CHARGE_ADAPTER__"
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SettingError(ValueError):
    """A value a section refuses; `key` is relative to the section (the loader adds file and section)."""

    def __init__(self, key: str, reason: str) -> None:
        self.key, self.reason = key, reason
        super().__init__(f"{key}: {reason}")


def dataclass(cls: type | None = None, /, *, frozen: bool = True) -> Any:
    """A settings section: a frozen pydantic dataclass that refuses unknown keys; building one with a bad value
    raises `SettingError` (key relative to the section), as sections always did."""

    def wrap(section: type) -> type:
        built: Any = pydantic_dataclass(frozen=frozen, config=ConfigDict(extra="forbid"))(section)
        validating_init = built.__init__

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                validating_init(self, *args, **kwargs)
            except ValidationError as exc:
                raise setting_error(exc, built) from None

        built.__init__ = __init__
        return typing.cast(type, built)

    return wrap if cls is None else wrap(cls)


def setting_error(exc: ValidationError, cls: type) -> SettingError:
    """The first of pydantic's errors in our words, with the key relative to `cls` (dotted for nested sections)."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, SettingError):  # ours: a range or type rule, or a section's cross-field check
        return SettingError(".".join([*loc, cause.key]) if loc else cause.key, cause.reason)
    key = ".".join(loc)
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return SettingError(key, f"unknown key (known: {', '.join(sorted(_known_keys(cls, loc[:-1])))})")
    if error["type"] in ("dataclass_type", "dataclass_args_type", "model_type", "dict_type"):
        return SettingError(key, "must be a mapping")
    return SettingError(key, error["msg"][0].lower() + error["msg"][1:])


def _known_keys(cls: type, path: list[str]) -> list[str]:
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    return [f.name for f in fields(cls)]


def setting(default: Any, *, low: float | None = None, high: float | None = None, above: float | None = None,
            choices: tuple[str, ...] | None = None, off: float | None = None) -> Any:
    """A dataclass field with its valid range: `low`/`high` inclusive, `above` exclusive, `off` one more value
    allowed outside the range (0 meaning "never"), `choices` for strings."""
    rule = {"low": low, "high": high, "above": above, "choices": choices, "off": off}
    return field(default=default, metadata=rule)


def _range_text(rule: dict[str, Any]) -> str:
    parts = []
    if rule.get("above") is not None:
        parts.append(f"above {rule['above']:g}")
    if rule.get("low") is not None:
        parts.append(f"at least {rule['low']:g}")
    if rule.get("high") is not None:
        parts.append(f"at most {rule['high']:g}")
    text = " and ".join(parts)
    if rule.get("off") is not None:
        text = f"{rule['off']:g} (off) or {text}"
    return text


def _check_range(number: float, rule: dict[str, Any], kind: str, key: str) -> None:
    if rule.get("off") is not None and number == rule["off"]:
        return
    low, high, above = rule.get("low"), rule.get("high"), rule.get("above")
    if (low is not None and number < low) or (high is not None and number > high) or \
            (above is not None and number <= above):
        raise SettingError(key, f"must be a {kind} {_range_text(rule)} (got {number:g})")


def _coerce(value: Any, kind: Any, rule: dict[str, Any], key: str) -> Any:
    """`value` as `kind`, or SettingError; strings (environment variables) are read as YAML scalars first."""
    if (kind is bool or kind in (int, float)) and isinstance(value, str):
        with contextlib.suppress(yaml.YAMLError):
            value = yaml.safe_load(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise SettingError(key, "must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SettingError(key, f"must be a whole number {_range_text(rule)}")
        if not math.isfinite(value) or value != int(value):
            raise SettingError(key, f"must be a whole number {_range_text(rule)} (got {value:g})")
        _check_range(int(value), rule, "whole number", key)
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SettingError(key, f"must be a number {_range_text(rule)}")
        if not math.isfinite(value):
            raise SettingError(key, f"must be a finite number {_range_text(rule)} (got {value})")
        _check_range(float(value), rule, "number", key)
        return float(value)
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise SettingError(key, "must be a string")
        text = str(value)
        if rule.get("choices") and text not in rule["choices"]:
            raise SettingError(key, f"must be one of {', '.join(rule['choices'])} (got {text[:40]!r})")
        return text
    if typing.get_origin(kind) is dict or kind is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise SettingError(key, "must be a mapping")
        return value
    raise TypeError(f"setting {key}: no rule for values of type {kind!r}")


def _check_file(path: str, key: str, what: str) -> None:
    if path and not Path(path).expanduser().is_file():
        raise SettingError(key, f"{what} not found: {path}")


def _check_env_name(name: str, key: str) -> None:
    if name and not _ENV_NAME.match(name):
        raise SettingError(key, "must be the name of an environment variable (letters, digits, _)")


@dataclass(frozen=True)
class ServerSettings:
    url: str = ""
    auth: dict[str, Any] = field(default_factory=dict)
    ca_bundle: str = ""
    client_cert: str = ""
    connect_timeout: float = setting(5.0, above=0, high=600)
    read_timeout: float = setting(60.0, above=0, high=3600)
    retry_seconds: float = setting(30.0, low=0, high=3600)
    """How long one request is retried (503, 429, timeouts) before the work goes back to the queue."""
    trust_env: bool = False
    """Take CA bundles, proxies and .netrc credentials from the environment (REQUESTS_CA_BUNDLE, HTTPS_PROXY...)."""

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise SettingError("url", "must be an http(s) URL")
        _check_file(self.ca_bundle, "ca_bundle", "CA bundle")
        _check_file(self.client_cert, "client_cert", "TLS client certificate")
        check_auth(self.auth)


def check_auth(auth: dict[str, Any]) -> None:
    """What can be checked without reading a secret: the type, the keys, the value types, the files."""
    from adapter.client.auth import AUTH_KEYS  # the client owns what each auth type accepts

    if not auth:
        return
    kind = auth.get("type", "none")
    if not isinstance(kind, str) or kind.lower() not in AUTH_KEYS:
        raise SettingError("auth.type", f"must be one of {', '.join(AUTH_KEYS)}")
    allowed = AUTH_KEYS[kind.lower()]
    for key, value in auth.items():
        if key == "type":
            continue
        if key not in allowed:
            hint = " (secrets are never inline: use *_env or *_file)" if key in (
                "token", "password", "private_key", "key_password") else ""
            raise SettingError(f"auth.{key}", f"unknown for auth type {kind} (known: {', '.join(sorted(allowed))})"
                                              f"{hint}")
        if key == "refresh_margin":
            _coerce(value, float, {"low": 0, "high": 3600}, f"auth.{key}")
        elif not isinstance(value, str) or not value:
            raise SettingError(f"auth.{key}", "must be a non-empty string")
        if key.endswith("_env"):
            _check_env_name(value, f"auth.{key}")
        if key.endswith("_file"):
            _check_file(value, f"auth.{key}", "file")


@dataclass(frozen=True)
class PollSettings:
    interval_seconds: float = setting(30.0, low=0.1, high=86400)
    overlap_seconds: float = setting(300.0, low=0, high=86400)
    """How far each poll reaches back before the cursor: commits become visible out of order."""
    page_size: int = setting(500, low=1, high=1000)
    """Procedures per page; the cursor advances after each page."""
    reconcile_every_seconds: float = setting(86400.0, low=1, high=365 * 86400, off=0)
    """`run` and `serve` reconcile at start and then this often (0: never): re-code what this state is
    responsible for, compare with the server, repair what is missing or due (docs/operations.md)."""


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = setting(8090, low=1, high=65535)
    base_path: str = "/notify"
    public_url: str = ""
    """The endpoint the FHIR server calls (default http://host:port/base_path)."""
    token_env: str = "CHARGE_ADAPTER_RECEIVER_TOKEN"
    hmac_secret_env: str = ""
    max_body_bytes: int = setting(5 * 1024 * 1024, low=1024, high=1024 ** 3)
    threads: int = setting(4, low=1, high=256)
    safety_poll_seconds: float = setting(300.0, low=1, high=86400, off=0)
    """`serve` also polls this often (0: never), because push alone loses events."""
    subscription_id: str = "charge-adapter-fna"
    connection_limit: int = setting(500, low=10, high=100000)
    """Open connections at most; beyond it new ones wait in the listen backlog."""
    header_timeout_seconds: float = setting(10.0, above=0, high=3600)
    """A request's headers must arrive within this time of its first byte."""
    body_timeout_seconds: float = setting(30.0, above=0, high=3600)
    """...and its body within this time of the end of the headers; else the connection is closed."""
    idle_timeout_seconds: float = setting(60.0, above=0, high=3600)
    """An idle keep-alive connection is closed after this."""
    request_timeout_seconds: float = setting(5.0, above=0, high=600)
    """The longest a notification waits for the state before it is answered 503 (the sender retries)."""

    def __post_init__(self) -> None:
        if not self.base_path.startswith("/"):
            raise SettingError("base_path", "must start with /")
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise SettingError("public_url", "must be an http(s) URL")
        if not self.token_env:
            raise SettingError("token_env", "must name the environment variable holding the receiver's token")
        _check_env_name(self.token_env, "token_env")
        _check_env_name(self.hmac_secret_env, "hmac_secret_env")
        if not _FHIR_ID.match(self.subscription_id):
            raise SettingError("subscription_id", "must be a valid FHIR id (A-Z, a-z, 0-9, '-', '.'; 1-64)")

    @property
    def endpoint(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}{self.base_path}"


@dataclass(frozen=True)
class WorkerSettings:
    max_attempts: int = setting(5, low=1, high=1000)
    """Unexpected errors (bugs) an item may meet before it goes to review; a FHIR outage is retried forever."""
    batch: int = setting(50, low=1, high=1000)
    retry_initial_seconds: float = setting(2.0, low=0.1, high=3600)
    retry_max_seconds: float = setting(60.0, low=1, high=86400)
    """Failed work waits initial, 2x, 4x ... at most this long (with jitter) before it runs again."""
    lease_seconds: float = setting(300.0, low=10, high=86400)
    """Work taken by a worker that dies comes back after this long."""

    def __post_init__(self) -> None:
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise SettingError("retry_max_seconds", "must be at least worker.retry_initial_seconds")


@dataclass(frozen=True)
class StateSettings:
    location: str = "charge-adapter.sqlite"
    """A file path (SQLite, the default; relative to the working directory), `sqlite:///path`, or
    `postgresql://user@host:port/database` (PostgreSQL, for several replicas; never with a password in it)."""
    busy_timeout_seconds: float = setting(5.0, above=0, high=600)
    """How long a write waits for another connection's transaction (SQLite) or a lock (PostgreSQL) before it
    counts as a failure."""
    statement_timeout_seconds: float = setting(30.0, above=0, high=3600)
    """PostgreSQL: the longest one state call may take. The server ends a slower statement, and a call still
    waiting a second later (a stopped or hung server) has its connection dropped on our side and fails."""
    done_retention_days: float = setting(7.0, low=0, high=36500)
    """Finished queue items are deleted after this long."""
    audit_retention_days: float = setting(2190.0, low=1, high=36500)
    """Audit rows (which codes were written when) are deleted after this long (default six years)."""
    schema: str = ""
    """PostgreSQL: the schema that holds the adapter's tables (created when missing), so that several
    installations can share one database; the same as `?schema=` in the URL."""
    password_env: str = ""
    """PostgreSQL: the environment variable holding the role's password (without it libpq reads PGPASSWORD or
    PGPASSFILE / ~/.pgpass); the same as `?password_env=` in the URL."""

    def __post_init__(self) -> None:
        from adapter.state import MEMORY, sqlite_path
        from adapter.state.pgurl import SECRET_PARAMETERS, is_postgres_url, parse, with_options

        if not self.location.strip():
            raise SettingError("location", "must be a file path (or sqlite:///path, or postgresql://...)")
        if is_postgres_url(self.location):
            _check_env_name(self.password_env, "password_env")
            try:
                location = with_options(self.location, schema=self.schema, password_env=self.password_env)
                target = parse(location)
            except ValueError as exc:
                key = "schema" if self.schema and "schema" in str(exc) else "location"
                shape = " (postgresql://user@host:port/database)" if key == "location" else ""
                raise SettingError(key, f"{exc}{shape}") from None
            if target.password is not None or SECRET_PARAMETERS & set(target.params):
                raise SettingError("location", "must not contain a password (a config file or an environment "
                                               "listing would show it): name the variable that holds it in "
                                               "state.password_env, or use PGPASSWORD or PGPASSFILE (~/.pgpass)")
            object.__setattr__(self, "location", location)  # the options travel with the URL to open_state
            return
        if self.schema or self.password_env:
            raise SettingError("schema" if self.schema else "password_env", "only for a postgresql:// location")
        if self.location not in MEMORY and sqlite_path(self.location) is None:
            scheme = self.location.split(":", 1)[0]
            raise SettingError("location", f"{scheme}: state is not supported by this adapter version "
                                           "(use an SQLite file path or a postgresql:// URL)")


@dataclass(frozen=True)
class HealthSettings:
    server_unreachable_seconds: float = setting(120.0, low=1, high=86400)
    """/healthz answers 503 once the FHIR server has failed every request for this long."""
    max_queue_age_seconds: float = setting(900.0, low=1, high=30 * 86400)
    """...or once the oldest queued item has waited this long."""
    stuck_loop_seconds: float = setting(600.0, low=10, high=86400)
    """...or once a loop has not finished a turn for this long (saying what it waits on)."""
    deadline_seconds: float = setting(10.0, low=1, high=3600)
    """...or once the state has not answered a heartbeat for this long ("state not answering for N s"), or a
    loop has waited this long on one state call; heartbeats run at least every third of it, each with this
    much time (client-side) to answer."""
    max_clock_skew_seconds: float = setting(5.0, above=0, high=86400)
    """/healthz names (in `warnings`) a local clock further than this from the state's (the database's)."""
    hl7v2_unreachable_seconds: float = setting(60.0, low=1, high=86400)
    """...and answers 503 once the HL7 v2 receiver has failed every send (no connection, no ACK) for this long."""


@dataclass(frozen=True)
class LoggingSettings:
    patient_references: str = setting("omit", choices=("omit", "hashed"))
    """omit: log lines name no patient (except at debug level); hashed: a keyed hash per patient."""
    format: str = setting("text", choices=("text", "json"))
    """text: one line per record for people; json: one JSON object per line (time, level, logger, thread,
    message), for an engine that ships logs. The same, redacted, messages either way."""


@dataclass(frozen=True)
class Hl7v2SinkSettings:
    """Where DFT^P03 charge messages go; what they say comes from config/hl7v2.yaml (the tables)."""

    enabled: bool = False
    transport: str = setting("mllp", choices=("mllp", "file"))
    host: str = ""
    port: int = setting(0, low=1, high=65535, off=0)
    connect_timeout_seconds: float = setting(5.0, above=0, high=600)
    ack_timeout_seconds: float = setting(30.0, above=0, high=3600)
    """No ACK within this long: the message backs off and is sent again later with the same control id (an ACK
    that arrives late on the old connection still counts); meanwhile the other patients' messages go on."""
    attempts: int = setting(8, low=1, high=100)
    """Sends of one message without an ACK before it waits in review as `hl7v2-unacknowledged` (replay sends
    it again); each resend after `resend_initial_seconds`, doubling (with jitter) up to `resend_max_seconds`.
    A receiver that cannot be reached at all costs no attempt: nothing was sent."""
    resend_initial_seconds: float = setting(30.0, above=0, high=86400)
    resend_max_seconds: float = setting(600.0, above=0, high=86400)
    tls: bool = False
    ca_bundle: str = ""
    client_cert: str = ""
    server_name: str = ""
    """The name the receiver's certificate must carry (default: host)."""
    folder: str = ""
    """transport file: where each message is written as one file, for an engine to pick up."""

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if self.transport == "mllp":
            if not self.host.strip():
                raise SettingError("host", "the MLLP receiver's host name or address is needed (transport mllp)")
            if not self.port:
                raise SettingError("port", "the MLLP receiver's port is needed (transport mllp)")
        elif not self.folder.strip():
            raise SettingError("folder", "the folder the engine picks messages up from is needed (transport file)")
        if self.resend_max_seconds < self.resend_initial_seconds:
            raise SettingError("resend_max_seconds", "must be at least sinks.hl7v2.resend_initial_seconds")
        if (self.ca_bundle or self.client_cert or self.server_name) and not self.tls:
            key = "ca_bundle" if self.ca_bundle else "client_cert" if self.client_cert else "server_name"
            raise SettingError(key, "only used with tls: true")
        _check_file(self.ca_bundle, "ca_bundle", "CA bundle")
        _check_file(self.client_cert, "client_cert", "TLS client certificate")


@dataclass(frozen=True)
class X12SinkSettings:
    """Where X12 837P interchanges go (adapter/x12/sink.py); what they say comes from config/x12.yaml."""

    enabled: bool = False
    folder: str = ""
    """One file per batch (`837P-<ISA13>.x12`), for a clearinghouse's pickup."""

    def __post_init__(self) -> None:
        if self.enabled and not self.folder.strip():
            raise SettingError("folder", "the folder the clearinghouse picks interchanges up from is needed")


@dataclass(frozen=True)
class SinksSettings:
    """Where charges go: the FHIR server (ChargeItems and Claims), a billing system (HL7 v2), or both."""

    fhir: bool = True
    hl7v2: Hl7v2SinkSettings = field(default_factory=Hl7v2SinkSettings)
    x12: X12SinkSettings = field(default_factory=X12SinkSettings)

    def __post_init__(self) -> None:
        if not self.fhir and not self.hl7v2.enabled and not self.x12.enabled:
            raise SettingError("fhir", "no sink left: keep fhir: true or set hl7v2.enabled: true")


@dataclass(frozen=True)
class WorklistSettings:
    """The coder's worklist: review items as FHIR Tasks, and the web page (docs/operations.md, worklist)."""

    tasks: bool = True
    """Mirror every review item as a Task on the FHIR server, and act on coders' changes to those Tasks."""
    task_poll_seconds: float = setting(30.0, low=1, high=86400, off=0)
    """`run` and `serve` mirror and read the Tasks this often (0: never; `run --once` does it once)."""
    page: bool = True
    """`serve` serves the worklist page under /worklist (the `worklist` command serves it alone)."""
    host: str = "127.0.0.1"
    port: int = setting(8092, low=1, high=65535)
    """Where the `worklist` command listens (`serve` uses serve.host and serve.port)."""
    users_env: str = ""
    """An environment variable holding `name:password` pairs (one per line, or `;`-separated) for HTTP basic
    logins; without it the login is the receiver's token (serve.token_env) and a name for the audit."""
    show_patient_names: bool = False
    """Show patients' names on the page (otherwise only their references)."""

    def __post_init__(self) -> None:
        _check_env_name(self.users_env, "users_env")


@dataclass(frozen=True)
class AppSettings:
    source: str = "(defaults)"
    tables: str = ""
    state: StateSettings = field(default_factory=StateSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    poll: PollSettings = field(default_factory=PollSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    sinks: SinksSettings = field(default_factory=SinksSettings)
    worklist: WorklistSettings = field(default_factory=WorklistSettings)

    @property
    def state_path(self) -> str:
        """The state's location (the key's name before the `state:` section existed)."""
        return self.state.location


SECTIONS: dict[str, type] = {"state": StateSettings, "server": ServerSettings, "poll": PollSettings,
                             "serve": ServeSettings, "worker": WorkerSettings, "health": HealthSettings,
                             "logging": LoggingSettings, "sinks": SinksSettings, "worklist": WorklistSettings}
TOP_LEVEL = ("tables", "state_path")
"""Keys outside the sections (`state_path`: the state's location before the `state:` section existed)."""
SHORTHAND = {"state": "location"}
"""A section that may be given as one string: `state: /var/lib/charge-adapter/state.sqlite`."""


def _checked(cls: type, data: Any, prefix: str) -> dict[str, Any]:
    """`data` for section `cls`, each value coerced by its `setting(...)` rule (environment strings read as YAML
    scalars), before pydantic validates types and runs `__post_init__`; errors carry the full key."""
    if isinstance(data, str | int) and not isinstance(data, bool) and prefix.rstrip(".") in SHORTHAND:
        data = {SHORTHAND[prefix.rstrip(".")]: str(data)}
    if not isinstance(data, dict):
        raise SettingError(prefix.rstrip("."), "must be a mapping")
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise SettingError(f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(known))})")
        if value is None and (known[key].default is not MISSING or known[key].default_factory is not MISSING):
            continue  # an empty YAML value keeps the default
        if dataclasses.is_dataclass(hints[key]):  # a nested section, e.g. sinks.hl7v2
            values[key] = _checked(hints[key], value, f"{prefix}{key}.")
        else:
            values[key] = _coerce(value, hints[key], dict(known[key].metadata), f"{prefix}{key}")
    return values


_SOURCES: ContextVar[tuple[dict[str, Any], dict[str, str]]] = ContextVar("settings_sources")
"""What `load_settings` is reading: (the YAML file's values, the environment)."""


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over the environment `load_settings` was given."""

    def _load_env_vars(self) -> typing.Mapping[str, str | None]:
        return parse_env_vars(_SOURCES.get()[1], self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


class _File(PydanticBaseSettingsSource):
    """The YAML file's values (read by `_read_yaml`, whose errors name the file)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _SOURCES.get()[0].get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return _SOURCES.get()[0]


class _Loader(BaseSettings):
    """Environment over file over defaults, validated: the fields are AppSettings' (see `_loader`)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", enable_decoding=False,
                                      case_sensitive=False, extra="forbid", frozen=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: Any, env_settings: Any,
                                   dotenv_settings: Any, file_secret_settings: Any) -> tuple[Any, ...]:
        return init_settings, _Environment(settings_cls), _File(settings_cls)

    @model_validator(mode="before")
    @classmethod
    def _coerce_values(cls, data: Any) -> Any:
        values = dict(data)
        if "tables" in values:
            values["tables"] = _coerce(values["tables"], str, {}, "tables")
        for name, section in SECTIONS.items():
            if name in values:
                values[name] = _checked(section, values[name], f"{name}.")
        return values


def _loader() -> type[BaseSettings]:
    """A BaseSettings model with AppSettings' fields (but `source`), so a section added there is loaded too."""
    hints = typing.get_type_hints(AppSettings)
    return create_model("_AppSettingsLoader", __base__=_Loader, **{  # type: ignore[call-overload]
        f.name: (hints[f.name], Field(default_factory=f.default_factory) if f.default_factory is not MISSING
                 else f.default) for f in fields(AppSettings) if f.name != "source"})


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    where = str(path)
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(where, "", "file not found") from None
    except IsADirectoryError:
        raise ConfigError(where, "", "is a folder, not a config file") from None
    except OSError as exc:
        raise ConfigError(where, "", f"cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(where, "", "is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(where, "", f"not valid YAML ({exc})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(where, "", "must be a mapping at the top level")
    return dict(loaded or {})


def _environment(env: dict[str, str], where: str) -> tuple[dict[str, str], dict[str, str]]:
    """The CHARGE_ADAPTER__* variables (shorthands spelled out: `__STATE` and `__STATE_PATH` are
    `__STATE__LOCATION`), and which variable set which `section.key`; an unknown one is an error naming it."""
    ours: dict[str, str] = {}
    origins: dict[str, str] = {}
    for name, value in sorted(env.items()):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if parts in (["state"], ["state_path"]):
            parts = ["state", "location"]
        elif not ((len(parts) == 1 and parts[0] in TOP_LEVEL) or (len(parts) >= 2 and parts[0] in SECTIONS)):
            raise ConfigError(name, "", "unknown setting (use CHARGE_ADAPTER__SECTION__KEY, e.g. "
                                        "CHARGE_ADAPTER__SERVER__URL)")
        origins[".".join(parts)] = name
        ours[ENV_PREFIX + "__".join(parts).upper()] = value
    return ours, origins


def load_settings(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> AppSettings:
    """Read the YAML file (optional), apply environment overrides, validate everything."""
    where = str(path) if path else "(no config file)"
    raw = _read_yaml(path) if path else {}
    variables, origins = _environment(dict(os.environ if env is None else env), where)
    for key in raw:
        if key not in SECTIONS and key not in TOP_LEVEL:
            raise ConfigError(where, str(key), f"unknown key (known: {', '.join([*TOP_LEVEL, *SECTIONS])})")
    if "state_path" in raw:  # the key before the state section existed
        state = raw.get("state")
        if isinstance(state, str) or (isinstance(state, dict) and "location" in state):
            raise ConfigError(where, "state_path", "give either state_path or state.location, not both")
        raw["state"] = {**(state if isinstance(state, dict) else {}), "location": raw.pop("state_path")}
    for name, short in SHORTHAND.items():  # `state: /path` is `state: {location: /path}`, merged with the variables
        if isinstance(raw.get(name), str | int) and not isinstance(raw.get(name), bool):
            raw[name] = {short: str(raw[name])}

    def source(key: str) -> str:
        variable = origins.get(".".join(key.split(".")[:2])) or origins.get(key.split(".")[0])
        return f"{variable} (environment, over {where})" if variable else where

    token = _SOURCES.set((raw, variables))
    try:
        loaded = _loader()()
    except ValidationError as exc:
        error = setting_error(exc, AppSettings)
        raise ConfigError(source(error.key), error.key, error.reason) from None
    finally:
        _SOURCES.reset(token)
    return AppSettings(source=where, **{f.name: getattr(loaded, f.name) for f in fields(AppSettings)
                                        if f.name != "source"})


def secret(settings: AppSettings, key: str, what: str) -> str:
    """The secret held by the environment variable that setting `key` (e.g. `serve.token_env`) names.

    The error names the config file, the key and the variable, never a value.
    """
    section, name = key.split(".", 1)
    env_name = getattr(getattr(settings, section), name)
    value = os.environ.get(env_name, "") if env_name else ""
    if not value:
        raise ConfigError(settings.source, key, f"environment variable {env_name or '(unset)'} for the {what} is "
                                                "not set or empty")
    return value
