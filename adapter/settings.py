"""The service's one configuration file (YAML), with environment overrides, validated at start.

Any key can be overridden by `CHARGE_ADAPTER__<SECTION>__<KEY>` (e.g. `CHARGE_ADAPTER__SERVER__URL`).
Errors name the file (or variable) and the key. Secrets are never values here: only the names of the
environment variables or files that hold them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from adapter.errors import ConfigError

ENV_PREFIX = "CHARGE_ADAPTER__"


@dataclass(frozen=True)
class ServerSettings:
    url: str = ""
    auth: dict[str, Any] = field(default_factory=dict)
    ca_bundle: str = ""
    client_cert: str = ""
    connect_timeout: float = 5.0
    read_timeout: float = 60.0


@dataclass(frozen=True)
class PollSettings:
    interval_seconds: float = 30.0
    overlap_seconds: float = 300.0
    """How far each poll reaches back before the cursor: commits become visible out of order."""
    page_size: int = 500
    """Procedures per page; the cursor advances after each page."""


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8090
    base_path: str = "/notify"
    public_url: str = ""
    """The endpoint the FHIR server calls (default http://host:port/base_path)."""
    token_env: str = "CHARGE_ADAPTER_RECEIVER_TOKEN"
    hmac_secret_env: str = ""
    max_body_bytes: int = 5 * 1024 * 1024
    threads: int = 4
    safety_poll_seconds: float = 300.0
    """`serve` also polls this often (0: never), because push alone loses events."""
    subscription_id: str = "charge-adapter-fna"

    @property
    def endpoint(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}{self.base_path}"


@dataclass(frozen=True)
class WorkerSettings:
    max_attempts: int = 5
    batch: int = 50


@dataclass(frozen=True)
class AppSettings:
    source: str = "(defaults)"
    tables: str = ""
    state_path: str = "charge-adapter.sqlite"
    server: ServerSettings = field(default_factory=ServerSettings)
    poll: PollSettings = field(default_factory=PollSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)


SECTIONS: dict[str, type] = {"server": ServerSettings, "poll": PollSettings, "serve": ServeSettings,
                             "worker": WorkerSettings}
TOP_LEVEL = {"tables": str, "state_path": str}


def _coerce(value: Any, kind: Any, where: str, key: str) -> Any:
    if kind in ("dict[str, Any]", dict):
        if not isinstance(value, dict):
            raise ConfigError(where, key, "must be a mapping")
        return value
    target = {"str": str, "float": float, "int": int}.get(kind, kind)
    if target is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(where, key, "must be a string")
        return str(value)
    if target in (int, float):
        try:
            number = target(value)
        except (TypeError, ValueError):
            raise ConfigError(where, key, f"must be a {'whole ' if target is int else ''}number") from None
        if isinstance(value, bool) or number < 0:
            raise ConfigError(where, key, "must be a number of at least 0")
        return number
    return value


def _build(cls: type, data: dict[str, Any], where: str, prefix: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(where, f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(known))})")
    return cls(**{k: _coerce(v, known[k].type, where, f"{prefix}{k}") for k, v in data.items()})


def load_settings(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> AppSettings:
    """Read the YAML file (optional), apply environment overrides, validate everything."""
    env = dict(os.environ if env is None else env)
    raw: dict[str, Any] = {}
    where = "(no config file)"
    if path:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(where, "", "file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(where, "", f"not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(where, "", "must be a mapping at the top level")
        raw = dict(loaded or {})
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if len(parts) == 1 and parts[0] in TOP_LEVEL:
            raw[parts[0]] = value
        elif len(parts) == 2 and parts[0] in SECTIONS:
            section = raw.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ConfigError(where, parts[0], "must be a mapping")
            section[parts[1]] = yaml.safe_load(value) if parts[1] == "auth" else value
        else:
            raise ConfigError(name, "", "unknown setting (use CHARGE_ADAPTER__SECTION__KEY, e.g. "
                                        "CHARGE_ADAPTER__SERVER__URL)")
    for key in raw:
        if key not in SECTIONS and key not in TOP_LEVEL:
            raise ConfigError(where, str(key), f"unknown key (known: {', '.join([*TOP_LEVEL, *SECTIONS])})")
    values: dict[str, Any] = {"source": where}
    for key in TOP_LEVEL:
        if key in raw:
            values[key] = _coerce(raw[key], "str", where, key)
    for name, cls in SECTIONS.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(where, name, "must be a mapping")
        values[name] = _build(cls, section, where, f"{name}.")
    settings = AppSettings(**values)
    serve = settings.serve
    if not serve.base_path.startswith("/"):
        raise ConfigError(where, "serve.base_path", "must start with /")
    if not 0 < serve.port < 65536:
        raise ConfigError(where, "serve.port", "must be between 1 and 65535")
    if settings.server.url and not settings.server.url.startswith(("http://", "https://")):
        raise ConfigError(where, "server.url", "must be an http(s) URL")
    return settings


def secret(env_name: str, what: str) -> str:
    """A secret from the environment; the error names the variable, never a value."""
    value = os.environ.get(env_name, "") if env_name else ""
    if not value:
        raise ConfigError(env_name or "(unset)", "", f"environment variable for the {what} is not set")
    return value
