"""Errors raised by :mod:`adapter.client`.

Every error sits under :class:`adapter.errors.FhirError`, so a caller can catch the whole family at
once or pick the case it knows how to handle::

    FhirError                          (adapter.errors)
     +-- FhirTransportError            no usable HTTP answer: connection refused/reset, TLS failure,
     |                                 timeout -- raised after the retry policy gave up
     +-- FhirHttpError                 the server answered with a non-2xx status
     |    +-- FhirBadRequest           400  bad search parameter, unresolvable reference, bad body
     |    +-- FhirUnauthorized         401, 403  missing/expired/insufficient credentials
     |    +-- FhirNotFound             404  unknown id or resource type
     |    +-- FhirConflict             409, 412  version conflict (HAPI answers a stale If-Match with
     |    |                                      409, the spec says 412), or a conditional
     |    |                                      create/update matching more than one resource
     |    +-- FhirGone                 410  deleted resource, or an expired paging link
     |    +-- FhirUnprocessable        422  business-rule or profile validation failure
     |    +-- FhirRateLimited          429  still throttled after the retries
     |    +-- FhirServerError          5xx
     +-- UnsupportedServerError        /metadata reports a FHIR version this adapter does not speak
     +-- UnsafeLinkError               a paging link points away from the configured server
     +-- AuthError                     credentials could not be obtained: token endpoint failure,
                                       unreadable key, secret variable or file missing

Messages name the HTTP status, the method and the URL *path* (never the query string, which can hold
patient identifiers, and never credentials) plus the OperationOutcome's diagnostics/details text.
Other statuses (3xx, 405, 406, 415 ...) raise a plain :class:`FhirHttpError`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from adapter.errors import FhirError

__all__ = [
    "AuthError",
    "FhirBadRequest",
    "FhirConflict",
    "FhirError",
    "FhirGone",
    "FhirHttpError",
    "FhirNotFound",
    "FhirRateLimited",
    "FhirServerError",
    "FhirTransportError",
    "FhirUnauthorized",
    "FhirUnprocessable",
    "UnsafeLinkError",
    "UnsupportedServerError",
    "http_error",
    "outcome_text",
    "safe_url",
]

# Long diagnostics (HAPI sometimes dumps whole validation reports) are cut so log lines stay readable.
_MAX_TEXT = 2000


def safe_url(url: str) -> str:
    """``url`` without user info, query or fragment: the parts that may carry secrets or PHI."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def server_and_path(url: str) -> str:
    """`host:port/path` of ``url`` (the port spelled out, also the scheme's default): which server, and what on it,
    without user info, query or fragment."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme.lower())
    except ValueError:
        return "<unparsable url>"
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{host}:{port}{parts.path or '/'}" if port else f"{host}{parts.path or '/'}"


def outcome_text(outcome: dict[str, Any] | None) -> str:
    """The human-readable text of an OperationOutcome: each issue's diagnostics or details.text."""
    if not isinstance(outcome, dict):
        return ""
    texts: list[str] = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        details = issue.get("details") if isinstance(issue.get("details"), dict) else {}
        text = issue.get("diagnostics") or details.get("text")
        if not text:
            codings = details.get("coding") or []
            text = next((c.get("display") or c.get("code") for c in codings if isinstance(c, dict)), None)
        if text:
            severity = issue.get("severity")
            texts.append(f"{severity}: {text}" if severity and severity != "error" else str(text))
    joined = "; ".join(texts)
    return joined if len(joined) <= _MAX_TEXT else joined[: _MAX_TEXT - 3] + "..."


class FhirTransportError(FhirError):
    """No usable HTTP response (connection, TLS or timeout failure) after all permitted attempts.

    ``original`` keeps the underlying exception for debugging; it is deliberately not chained as
    ``__cause__`` because its text contains the full URL, query string included.
    """

    def __init__(self, method: str, url: str, reason: str, attempts: int = 1, original: BaseException | None = None):
        self.method, self.url, self.reason, self.attempts = method, safe_url(url), reason, attempts
        self.original = original
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{method} {server_and_path(self.url)}: {reason}{tries}")


class FhirHttpError(FhirError):
    """The server answered with a non-2xx status; ``outcome`` is its OperationOutcome, if it sent one."""

    def __init__(
        self,
        status: int,
        url: str,
        method: str,
        outcome_text: str,
        outcome: dict[str, Any] | None = None,
    ) -> None:
        self.status, self.url, self.method = status, safe_url(url), method
        self.outcome_text, self.outcome = outcome_text, outcome
        detail = f": {outcome_text}" if outcome_text else ""
        super().__init__(f"HTTP {status} {method} {server_and_path(self.url)}{detail}")


class FhirBadRequest(FhirHttpError):
    """400: the request itself is wrong (unknown search parameter, missing reference target...)."""


class FhirUnauthorized(FhirHttpError):
    """401 or 403: credentials missing, expired or without the needed scope."""


class FhirNotFound(FhirHttpError):
    """404: unknown resource id or type."""


class FhirConflict(FhirHttpError):
    """409 or 412: version conflict or ambiguous conditional match; re-read and decide."""


class FhirGone(FhirHttpError):
    """410: the resource was deleted, or a paging link expired."""


class FhirUnprocessable(FhirHttpError):
    """422: the server understood the resource but rejects its content."""


class FhirRateLimited(FhirHttpError):
    """429 that outlasted the retry policy."""


class FhirServerError(FhirHttpError):
    """5xx: the server failed; retried first when the request was idempotent."""


class UnsupportedServerError(FhirError):
    """The server's CapabilityStatement announces a FHIR version this adapter does not support."""


class UnsafeLinkError(FhirError):
    """A paging link leaves the configured server; following it could leak credentials."""


class AuthError(FhirError):
    """Credentials could not be obtained. Messages name variables and files, never secret values."""


_BY_STATUS: dict[int, type[FhirHttpError]] = {
    400: FhirBadRequest,
    401: FhirUnauthorized,
    403: FhirUnauthorized,
    404: FhirNotFound,
    409: FhirConflict,
    410: FhirGone,
    412: FhirConflict,
    422: FhirUnprocessable,
    429: FhirRateLimited,
}


def http_error(
    status: int, url: str, method: str, outcome: dict[str, Any] | None, fallback_text: str = ""
) -> FhirHttpError:
    """Build the :class:`FhirHttpError` subclass that matches ``status``."""
    cls = _BY_STATUS.get(status) or (FhirServerError if 500 <= status <= 599 else FhirHttpError)
    return cls(status, url, method, outcome_text(outcome) or fallback_text, outcome)
