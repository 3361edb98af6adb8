"""The FHIR client of the service's settings: every problem with them is a ConfigError naming the key."""

from __future__ import annotations

import os
from collections.abc import Callable

from adapter.client import FhirClient, RetryPolicy
from adapter.client.auth import auth_from_settings
from adapter.client.errors import AuthError
from adapter.errors import ConfigError
from adapter.settings import ServerSettings


def make_client(server: ServerSettings, source: str = "(defaults)", *, auth_key: str = "server.auth",
                on_reachability: Callable[[bool, str], None] | None = None) -> FhirClient:
    """The FHIR client for `server`; every problem is a ConfigError naming `source` and the key."""
    if not server.url:
        raise ConfigError(source, "server.url", "no FHIR server configured: set server.url in the config file, "
                                                "CHARGE_ADAPTER__SERVER__URL, or --server")
    auth = dict(server.auth or {})
    for key, name in auth.items():
        if key.endswith("_env") and isinstance(name, str):
            partner = key[:-4] + "_file"
            if not os.environ.get(name) and not auth.get(partner):
                raise ConfigError(source, f"{auth_key}.{key}" if auth_key else key,
                                  f"environment variable {name} is not set or empty")
    try:
        credentials = auth_from_settings(auth or None)
    except AuthError as exc:
        raise ConfigError(source, auth_key or "auth", str(exc)) from None
    retry = RetryPolicy(attempts=1) if server.retry_seconds == 0 else RetryPolicy(max_total=server.retry_seconds)
    try:
        return FhirClient(server.url, auth=credentials, timeout=(server.connect_timeout, server.read_timeout),
                          verify=server.ca_bundle or True, cert=server.client_cert or None, retry=retry,
                          trust_env=server.trust_env, on_reachability=on_reachability)
    except ValueError as exc:
        raise ConfigError(source, "server.url", str(exc)) from None
    except ConfigError as exc:  # a CA bundle or certificate file that vanished since the settings were read
        key = "server.ca_bundle" if exc.entry == "verify" else "server.client_cert"
        raise ConfigError(source, key, exc.reason) from None

