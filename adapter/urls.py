"""Base URLs of FHIR servers, compared the one way FHIR references need: the rule shared by the code tables
(`config/input.yaml local_bases`, checked when loaded) and the resource index (which references are local).

A module of its own below both, so neither imports the other for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_base(url: str) -> str | None:
    """A server base URL as compared: scheme and host in lower case, default port and trailing slash dropped;
    None when `url` is not an absolute http(s)-like URL with a host."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname.lower()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if port is not None and DEFAULT_PORTS.get(scheme) != port:
        host += f":{port}"
    return f"{scheme}://{host}{parts.path.rstrip('/')}"


def normalize_bases(urls: Iterable[str]) -> frozenset[str]:
    """`normalize_base` of each URL (those that are not base URLs are left out)."""
    return frozenset(b for b in (normalize_base(u) for u in urls) if b)
