"""PostgreSQL state URLs: parsed here, without the driver, so the settings can check them at start.

`postgresql://user@host:port/database?schema=name&sslmode=require` (or `postgres://`). Query parameters are
libpq's connection keywords, plus two of the adapter's own: `schema` (the tables live in that schema, created
when missing, so several installations or test runs can share one database) and `password_env` (the name of
the environment variable holding the password; libpq's own PGPASSWORD and PGPASSFILE work too).

`location` is the URL as given minus every secret (the password in the user part, `password=` and
`sslpassword=` parameters): what messages, logs and `status` show.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

SCHEMES = ("postgresql", "postgres")
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})
OWN_PARAMETERS = frozenset({"schema", "password_env"})
LIBPQ_PARAMETERS = frozenset({
    "host", "hostaddr", "port", "dbname", "user", "password", "passfile", "channel_binding", "connect_timeout",
    "client_encoding", "options", "application_name", "fallback_application_name", "keepalives",
    "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout", "gssencmode", "sslmode",
    "requiressl", "sslcompression", "sslcert", "sslkey", "sslpassword", "sslcertmode", "sslrootcert", "sslcrl",
    "sslcrldir", "sslsni", "requirepeer", "ssl_min_protocol_version", "ssl_max_protocol_version", "krbsrvname",
    "gsslib", "gssdelegation", "service", "target_session_attrs", "load_balance_hosts",
})
"""libpq's connection keywords that make sense for the state (`replication` does not: it is refused)."""
SCHEMA_NAME = re.compile(r"^(?!pg_)[a-z_][a-z0-9_]{0,62}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class PgTarget:
    """What a URL asks for: libpq keywords, and the adapter's own options taken out of them."""

    params: dict[str, str]
    """libpq keywords (host, port, dbname, user, sslmode ...), without the password."""
    location: str
    password: str | None = field(default=None, repr=False)
    schema: str | None = None
    password_env: str | None = None

    @property
    def user(self) -> str:
        return self.params.get("user", "(the OS user)")

    @property
    def database(self) -> str:
        return self.params.get("dbname", self.params.get("user", "(the user's name)"))

    @property
    def server(self) -> str:
        """host:port for messages (libpq's defaults when the URL gives none)."""
        return f"{self.params.get('host', 'localhost')}:{self.params.get('port', '5432')}"


def is_postgres_url(location: str) -> bool:
    return location.split("://", 1)[0].lower() in SCHEMES and "://" in location


def parse(url: str) -> PgTarget:
    """The URL's parts; ValueError says what is wrong (never quoting the password)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ValueError("must start with postgresql:// (or postgres://)")
    if "#" in rest:
        raise ValueError("has a #fragment, which is no part of a PostgreSQL URL")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostspec = netloc.rpartition("@")
    if not at:
        userinfo, hostspec = "", netloc
    user, _, password = userinfo.partition(":")
    params: dict[str, str] = {}
    if user:
        params["user"] = unquote(user)
    hosts, ports = _hosts(hostspec)
    if any(hosts):
        params["host"] = ",".join(hosts)
    if any(ports):
        params["port"] = ",".join(ports)
    if "/" in path:
        raise ValueError("the database name must be one path part (postgresql://user@host:port/database)")
    if path:
        params["dbname"] = unquote(path)
    own: dict[str, str] = {}
    kept: list[str] = []
    seen: set[str] = set()
    for pair in filter(None, query.split("&")):
        key, eq, value = pair.partition("=")
        key, value = unquote(key), unquote(value.replace("+", " "))
        if not eq:
            raise ValueError(f"query parameter {key!r} has no value (write {key}=...)")
        if key in seen:
            raise ValueError(f"query parameter {key!r} is given twice")
        seen.add(key)
        if key in OWN_PARAMETERS:
            own[key] = value
        elif key in LIBPQ_PARAMETERS:
            if key == "password":
                password = value
            else:
                params[key] = value
        else:
            raise ValueError(f"unknown query parameter {key!r} (the adapter's: schema, password_env; or one of "
                             "libpq's connection keywords, e.g. sslmode, connect_timeout, application_name)")
        if key not in SECRET_PARAMETERS:
            kept.append(pair)
    schema = own.get("schema") or None
    if schema is not None and not SCHEMA_NAME.match(schema):
        raise ValueError(f"schema {schema[:70]!r} must be a lower-case name of letters, digits and _ (at most 63, "
                         "not starting with pg_)")
    password_env = own.get("password_env") or None
    if password_env is not None and not ENV_NAME.match(password_env):
        raise ValueError("password_env must be the name of an environment variable (letters, digits, _)")
    location = f"{scheme}://{user + '@' if user else ''}{hostspec}{'/' + path if path else ''}"
    if kept:
        location += "?" + "&".join(kept)
    return PgTarget(params, location, unquote(password) if password else None, schema, password_env)


def _hosts(hostspec: str) -> tuple[list[str], list[str]]:
    """`host[:port]`, `[ipv6]:port`, comma-separated (libpq tries them in order)."""
    hosts: list[str] = []
    ports: list[str] = []
    for part in hostspec.split(",") if hostspec else []:
        if part.startswith("["):
            end = part.find("]")
            if end < 0:
                raise ValueError("an IPv6 address in the host part lacks its closing ]")
            host, after = part[1:end], part[end + 1:]
            if after and not after.startswith(":"):
                raise ValueError("write an IPv6 host as [address]:port")
            port = after[1:]
        else:
            host, _, port = part.partition(":")
        if port and (not port.isdigit() or not 0 < int(port) < 65536):
            raise ValueError(f"port {port[:12]!r} must be a number from 1 to 65535")
        hosts.append(unquote(host))
        ports.append(port)
    return hosts, ports


def with_options(url: str, *, schema: str = "", password_env: str = "") -> str:
    """`url` with the adapter's options added as query parameters (what `state.schema` and `state.password_env`
    in the config mean); ValueError when the URL already gives a different value."""
    target = parse(url)
    extra = []
    for key, value, given in (("schema", schema, target.schema), ("password_env", password_env,
                                                                   target.password_env)):
        if not value:
            continue
        if given is not None and given != value:
            raise ValueError(f"the URL's {key}={given} differs from state.{key} ({value}): give it once")
        if given is None:
            extra.append(f"{key}={value}")
    if not extra:
        return url
    return url + ("&" if "?" in url else "?") + "&".join(extra)


def safe_location(url: str) -> str:
    """`url` for a message even when it does not parse: without anything between :// and @ (it may hold a
    password) and without its query."""
    try:
        return parse(url).location
    except ValueError:
        pass
    scheme, sep, rest = url.partition("://")
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    if "@" in netloc:
        rest = rest[netloc.rindex("@") + 1:]
    return f"{scheme}{sep}{rest.split('?', 1)[0].split('#', 1)[0]}"
