"""The service's one configuration file (YAML), with environment overrides, validated to the value at start.

Any key can be overridden by `CHARGE_ADAPTER__<SECTION>__<KEY>` (e.g. `CHARGE_ADAPTER__SERVER__URL`).
Every setting declares its type and range next to its default (`setting(...)`); each section checks its own
cross-field rules in `__post_init__`. Errors name the file (or variable) and the key. Secrets are never
values here: only the names of the environment variables or files that hold them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from adapter.errors import ConfigError

ENV_PREFIX = "CHARGE_ADAPTER__"
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SettingError(ValueError):
    """A value a section refuses; `key` is relative to the section (the loader adds file and section)."""

    def __init__(self, key: str, reason: str) -> None:
        self.key, self.reason = key, reason
        super().__init__(f"{key}: {reason}")


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
    """...or once a loop has not finished a turn for this long."""


@dataclass(frozen=True)
class LoggingSettings:
    patient_references: str = setting("omit", choices=("omit", "hashed"))
    """omit: log lines name no patient (except at debug level); hashed: a keyed hash per patient."""


@dataclass(frozen=True)
class Hl7v2SinkSettings:
    """Where DFT^P03 charge messages go; what they say comes from config/hl7v2.yaml (the tables)."""

    enabled: bool = False
    transport: str = setting("mllp", choices=("mllp", "file"))
    host: str = ""
    port: int = setting(0, low=1, high=65535, off=0)
    connect_timeout_seconds: float = setting(5.0, above=0, high=600)
    ack_timeout_seconds: float = setting(30.0, above=0, high=3600)
    """No ACK within this long: the same message again (same control id), up to `attempts` times per pass."""
    attempts: int = setting(3, low=1, high=100)
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

    @property
    def state_path(self) -> str:
        """The state's location (the key's name before the `state:` section existed)."""
        return self.state.location


SECTIONS: dict[str, type] = {"state": StateSettings, "server": ServerSettings, "poll": PollSettings,
                             "serve": ServeSettings, "worker": WorkerSettings, "health": HealthSettings,
                             "logging": LoggingSettings, "sinks": SinksSettings}
TOP_LEVEL = ("tables", "state_path")
SHORTHAND = {"state": "location"}
"""A section that may be given as one string: `state: /var/lib/charge-adapter/state.sqlite`."""


def _build(cls: type, data: dict[str, Any], where: str, prefix: str, origins: dict[str, str]) -> Any:
    """A section from its raw values; `origins` names the environment variable a key came from."""
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)

    def source(key: str) -> str:
        variable = origins.get(f"{prefix}{key.split('.')[0]}")
        return f"{variable} (environment, over {where})" if variable else where

    for key in data:
        if key not in known:
            raise ConfigError(source(key), f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(known))})")
    values = {}
    try:
        for key, value in data.items():
            rule = dict(known[key].metadata)
            if value is None and known[key].default is not MISSING:
                continue  # an empty YAML value keeps the default
            if dataclasses.is_dataclass(hints[key]):  # a nested section, e.g. sinks.hl7v2
                if not isinstance(value, dict):
                    raise ConfigError(source(key), f"{prefix}{key}", "must be a mapping")
                values[key] = _build(hints[key], value, where, f"{prefix}{key}.", origins)
                continue
            values[key] = _coerce(value, hints[key], rule, key)
        return cls(**values)
    except SettingError as exc:
        raise ConfigError(source(exc.key), f"{prefix}{exc.key}", exc.reason) from None


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


def _apply_environment(raw: dict[str, Any], env: dict[str, str], where: str) -> dict[str, str]:
    """Apply CHARGE_ADAPTER__* variables; returns which variable set which `section.key`."""
    origins: dict[str, str] = {}
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        origins[".".join(parts)] = name
        if parts == ["state"]:
            origins["state.location"] = name
        if len(parts) == 1 and (parts[0] in TOP_LEVEL or parts[0] in SHORTHAND):
            raw[parts[0]] = value
        elif len(parts) >= 2 and parts[0] in SECTIONS:
            section = raw.setdefault(parts[0], {})
            if isinstance(section, str) and parts[0] in SHORTHAND:
                section = raw[parts[0]] = {SHORTHAND[parts[0]]: section}
            for depth, part in enumerate(parts[1:-1], start=1):  # nested sections: SINKS__HL7V2__HOST
                if not isinstance(section, dict):
                    raise ConfigError(where, ".".join(parts[:depth]), "must be a mapping")
                section = section.setdefault(part, {})
            if not isinstance(section, dict):
                raise ConfigError(where, ".".join(parts[:-1]), "must be a mapping")
            section[parts[-1]] = value
        else:
            raise ConfigError(name, "", "unknown setting (use CHARGE_ADAPTER__SECTION__KEY, e.g. "
                                        "CHARGE_ADAPTER__SERVER__URL)")
    return origins


def load_settings(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> AppSettings:
    """Read the YAML file (optional), apply environment overrides, validate everything."""
    env = dict(os.environ if env is None else env)
    where = str(path) if path else "(no config file)"
    raw = _read_yaml(path) if path else {}
    origins = _apply_environment(raw, env, where)
    if "state_path" in origins:
        origins["state.location"] = origins["state_path"]
    for key in raw:
        if key not in SECTIONS and key not in TOP_LEVEL:
            raise ConfigError(where, str(key), f"unknown key (known: {', '.join([*TOP_LEVEL, *SECTIONS])})")
    if "state_path" in raw:  # the key before the state section existed
        state = raw.get("state")
        if isinstance(state, str) or (isinstance(state, dict) and "location" in state):
            raise ConfigError(where, "state_path", "give either state_path or state.location, not both")
        raw["state"] = {**(state if isinstance(state, dict) else {}), "location": raw.pop("state_path")}
    values: dict[str, Any] = {"source": where}
    if "tables" in raw:
        try:
            values["tables"] = _coerce(raw["tables"], str, {}, "tables")
        except SettingError as exc:
            raise ConfigError(where, exc.key, exc.reason) from None
    for name, cls in SECTIONS.items():
        section = raw.get(name)
        if isinstance(section, str | int) and not isinstance(section, bool) and name in SHORTHAND:
            section = {SHORTHAND[name]: str(section)}
        if section is not None and not isinstance(section, dict):
            raise ConfigError(where, name, "must be a mapping")
        values[name] = _build(cls, section or {}, where, f"{name}.", origins)
    return AppSettings(**values)


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
