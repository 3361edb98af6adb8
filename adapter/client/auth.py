"""Authentication for :class:`adapter.client.FhirClient`, as ``requests`` auth objects.

Kept apart from the client so the transport never sees how a credential is obtained.

* :class:`NoAuth` -- open test servers.
* :class:`BearerTokenAuth` -- a static token issued elsewhere.
* :class:`BasicAuth` -- user name and password.
* :class:`SmartBackendAuth` -- SMART Backend Services: a ``client_credentials`` grant authenticated
  by a ``private_key_jwt`` assertion (RS384 or ES384), token cached until shortly before expiry.

Secrets come from environment variables or files (:func:`secret_from`). They are never logged, never
put in exception messages, and every ``repr`` masks them.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from requests.auth import AuthBase

from adapter.client.errors import AuthError, safe_url

__all__ = [
    "AUTH_KEYS",
    "CLIENT_ASSERTION_TYPE",
    "BasicAuth",
    "BearerTokenAuth",
    "FhirAuth",
    "NoAuth",
    "SmartBackendAuth",
    "auth_from_settings",
    "secret_from",
]

log = logging.getLogger("adapter.client")

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_MASK = "***"


def secret_from(env: str | None = None, file: str | os.PathLike[str] | None = None, *, what: str = "secret") -> str:
    """Read a secret from environment variable ``env``, else from ``file`` (final line break dropped).

    Raises :class:`AuthError` naming the variable or file -- never the value -- when neither yields one.
    """
    if env is not None:
        value = os.environ.get(env, "")
        if value:
            return value
        if file is None:
            raise AuthError(f"{what}: environment variable {env} is not set or empty")
    if file is None:
        raise AuthError(f"{what}: no environment variable or file configured")
    path = Path(file)
    try:
        value = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise AuthError(f"{what}: cannot read file {path}: {exc.strerror or type(exc).__name__}") from None
    if not value:
        raise AuthError(f"{what}: file {path} is empty")
    return value


class FhirAuth(AuthBase):
    """Base of the client's auth objects: hooks the client calls besides ``__call__``."""

    def bind(self, base_url: str, session: requests.Session, timeout: Any) -> None:
        """Called by the client it is given to; lets token-based auth reuse its session and TLS settings."""

    def handle_401(self, response: requests.Response) -> bool:
        """React to a 401; True if a retry with fresh credentials may succeed."""
        return False

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        return request


class NoAuth(FhirAuth):
    """Sends no credentials."""

    def __repr__(self) -> str:
        return "NoAuth()"


class BearerTokenAuth(FhirAuth):
    """A static bearer token, e.g. issued by an API gateway."""

    def __init__(self, token: str) -> None:
        if not token:
            raise AuthError("bearer token is empty")
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return f"BearerTokenAuth(token={_MASK})"


class BasicAuth(FhirAuth):
    """HTTP Basic authentication."""

    def __init__(self, username: str, password: str) -> None:
        if ":" in username:
            raise AuthError("basic auth username must not contain ':'")
        self.username = username
        # RFC 7617: user-pass encoded as UTF-8; computed once, kept private.
        self._header = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._header
        return request

    def __repr__(self) -> str:
        return f"BasicAuth(username={self.username!r}, password={_MASK})"


_ALGORITHMS: dict[str, tuple[type, str]] = {
    "RS384": (rsa.RSAPrivateKey, "an RSA"),
    "ES384": (ec.EllipticCurvePrivateKey, "a P-384 EC"),
}


def _load_private_key(pem: bytes, alg: str, password: bytes | None) -> Any:
    """Parse and check the key up front so a bad key fails at start-up, not at the first request."""
    try:
        key = serialization.load_pem_private_key(pem, password=password)
    except (ValueError, TypeError) as exc:
        # The library's message never quotes key material, but keep ours generic anyway.
        raise AuthError(f"SMART private key cannot be loaded ({type(exc).__name__}); expected PEM") from None
    expected_type, label = _ALGORITHMS[alg]
    if not isinstance(key, expected_type):
        raise AuthError(f"SMART alg {alg} needs {label} private key")
    if alg == "ES384" and not isinstance(key.curve, ec.SECP384R1):  # type: ignore[union-attr]
        raise AuthError(f"SMART alg ES384 needs a P-384 key, got {key.curve.name}")  # type: ignore[union-attr]
    return key


class SmartBackendAuth(FhirAuth):
    """SMART Backend Services (client_credentials + private_key_jwt) with a cached access token.

    The token endpoint is ``token_url`` when given, else ``token_endpoint`` from
    ``{base}/.well-known/smart-configuration`` (base from the client this auth is bound to). The
    token is reused until ``refresh_margin`` seconds before its ``expires_in``; a 401 from the FHIR
    server drops it so the client can retry once with a new one. Safe to share between threads.
    """

    DEFAULT_LIFETIME = 300.0  # assumed when the token response omits expires_in
    ASSERTION_LIFETIME = 300  # SMART: exp no more than five minutes ahead

    def __init__(
        self,
        client_id: str,
        private_key: bytes | str,
        *,
        alg: str = "RS384",
        kid: str | None = None,
        scope: str = "system/*.rs",
        token_url: str | None = None,
        base_url: str | None = None,
        key_password: bytes | str | None = None,
        refresh_margin: float = 60.0,
        session: requests.Session | None = None,
        timeout: Any = (5.0, 30.0),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if alg not in _ALGORITHMS:
            raise AuthError(f"SMART alg must be one of {', '.join(_ALGORITHMS)}, got {alg!r}")
        if not client_id:
            raise AuthError("SMART client_id is empty")
        pem = private_key.encode() if isinstance(private_key, str) else private_key
        password = key_password.encode() if isinstance(key_password, str) else key_password
        self._key = _load_private_key(pem, alg, password)
        self.client_id, self.alg, self.kid, self.scope = client_id, alg, kid, scope
        self.token_url = token_url
        self.base_url = base_url.rstrip("/") if base_url else None
        self.refresh_margin = refresh_margin
        self.timeout = timeout
        self.token_request_count = 0
        self._session = session
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0

    def __repr__(self) -> str:
        return (
            f"SmartBackendAuth(client_id={self.client_id!r}, alg={self.alg!r}, kid={self.kid!r}, "
            f"scope={self.scope!r}, token_url={self.token_url!r}, private_key={_MASK}, token={_MASK})"
        )

    def bind(self, base_url: str, session: requests.Session, timeout: Any) -> None:
        """Use the client's session (pool, TLS settings) and base URL for discovery and token calls."""
        self._session = session
        self.timeout = timeout
        if self.base_url is None:
            self.base_url = base_url.rstrip("/")

    # -- requests hooks -----------------------------------------------------------------------------

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.access_token()}"
        return request

    def handle_401(self, response: requests.Response) -> bool:
        sent = response.request.headers.get("Authorization", "") if response.request is not None else ""
        with self._lock:
            # Another thread may already have replaced the token this request carried.
            if self._token is not None and sent == f"Bearer {self._token}":
                self._token, self._expires_at = None, 0.0
        return True

    # -- token management ---------------------------------------------------------------------------

    def access_token(self) -> str:
        """The cached token, or a new one when absent or about to expire."""
        with self._lock:
            if self._token is None or self._clock() >= self._expires_at - self.refresh_margin:
                self._token, self._expires_at = self._fetch_token()
            return self._token

    def client_assertion(self, token_url: str) -> str:
        """A signed JWT identifying this client to ``token_url`` (the ``aud``)."""
        now = int(self._clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "exp": now + self.ASSERTION_LIFETIME,
            "jti": uuid.uuid4().hex,
        }
        headers: dict[str, str] = {"typ": "JWT"}
        if self.kid:
            headers["kid"] = self.kid
        return jwt.encode(claims, self._key, algorithm=self.alg, headers=headers)

    def _http_call(self, method: str, url: str, **kw: Any) -> requests.Response:
        if self._session is None:
            self._session = requests.Session()
            self._session.trust_env = False  # no CA bundle, proxy or .netrc from the environment
        session = self._session
        # verify/cert passed explicitly: requests lets REQUESTS_CA_BUNDLE override session.verify.
        return session.request(
            method,
            url,
            headers={"Accept": "application/json"},
            timeout=self.timeout,
            allow_redirects=False,
            verify=session.verify,
            cert=session.cert,
            **kw,
        )

    def _discover_token_url(self) -> str:
        if self.token_url:
            return self.token_url
        if not self.base_url:
            raise AuthError("SMART token endpoint unknown: give token_url or bind the auth to a FhirClient")
        url = f"{self.base_url}/.well-known/smart-configuration"
        try:
            response = self._http_call("GET", url)
        except requests.RequestException as exc:
            raise AuthError(f"SMART discovery at {safe_url(url)} failed: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise AuthError(f"SMART discovery at {safe_url(url)} answered HTTP {response.status_code}")
        try:
            endpoint = response.json().get("token_endpoint")
        except (ValueError, AttributeError):
            endpoint = None
        if not isinstance(endpoint, str) or not endpoint:
            raise AuthError(f"SMART discovery at {safe_url(url)} gave no token_endpoint")
        self.token_url = endpoint
        return endpoint

    def _fetch_token(self) -> tuple[str, float]:
        token_url = self._discover_token_url()
        started = self._clock()
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.client_assertion(token_url),
        }
        self.token_request_count += 1
        try:
            response = self._http_call("POST", token_url, data=form)
        except requests.RequestException as exc:
            raise AuthError(f"SMART token request to {safe_url(token_url)} failed: {type(exc).__name__}") from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if response.status_code != 200:
            # RFC 6749 error fields describe the problem without echoing credentials.
            error = body.get("error") or "no error code"
            description = body.get("error_description")
            detail = f"{error}: {description}" if description else str(error)
            raise AuthError(
                f"SMART token endpoint {safe_url(token_url)} answered HTTP {response.status_code}: {detail}"
            )
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise AuthError(f"SMART token endpoint {safe_url(token_url)} returned no access_token")
        try:
            lifetime = float(body.get("expires_in", self.DEFAULT_LIFETIME))
        except (TypeError, ValueError):
            lifetime = self.DEFAULT_LIFETIME
        log.debug("obtained SMART access token from %s (expires in %.0fs)", safe_url(token_url), lifetime)
        return token, started + lifetime


# -- settings -------------------------------------------------------------------------------------

AUTH_KEYS: dict[str, set[str]] = {
    "none": set(),
    "bearer": {"token_env", "token_file"},
    "basic": {"username", "username_env", "password_env", "password_file"},
    "smart": {
        "client_id",
        "private_key_file",
        "private_key_env",
        "key_password_env",
        "key_password_file",
        "alg",
        "kid",
        "scope",
        "token_url",
        "refresh_margin",
    },
}


def auth_from_settings(settings: Mapping[str, Any] | None) -> FhirAuth:
    """Build an auth object from a settings mapping, e.g. ``{"type": "bearer", "token_env": "FHIR_TOKEN"}``.

    Inline secrets (``token``, ``password``, ``private_key``) are refused on purpose: settings files
    get committed and printed, so secrets must come from ``*_env`` variables or ``*_file`` paths.
    """
    if not settings:
        return NoAuth()
    kind = str(settings.get("type", "none")).lower()
    if kind not in AUTH_KEYS:
        raise AuthError(f"auth type must be one of {', '.join(AUTH_KEYS)}, got {kind!r}")
    unknown = sorted(set(settings) - AUTH_KEYS[kind] - {"type"})
    if unknown:
        hint = (
            " (inline secrets are not accepted; use *_env or *_file)"
            if {"token", "password", "private_key", "key_password"} & set(unknown)
            else ""
        )
        raise AuthError(f"auth type {kind}: unknown setting(s) {', '.join(unknown)}{hint}")

    if kind == "none":
        return NoAuth()
    if kind == "bearer":
        return BearerTokenAuth(secret_from(settings.get("token_env"), settings.get("token_file"), what="bearer token"))
    if kind == "basic":
        username = settings.get("username")
        if not username and settings.get("username_env"):
            username = secret_from(settings["username_env"], what="basic auth username")
        if not username:
            raise AuthError("auth type basic: username or username_env is required")
        password = secret_from(settings.get("password_env"), settings.get("password_file"), what="basic auth password")
        return BasicAuth(str(username), password)

    client_id = settings.get("client_id")
    if not client_id:
        raise AuthError("auth type smart: client_id is required")
    key = secret_from(settings.get("private_key_env"), settings.get("private_key_file"), what="SMART private key")
    key_password = None
    if settings.get("key_password_env") or settings.get("key_password_file"):
        key_password = secret_from(
            settings.get("key_password_env"), settings.get("key_password_file"), what="SMART key password"
        )
    optional: dict[str, Any] = {k: settings[k] for k in ("alg", "kid", "scope", "token_url") if settings.get(k)}
    if settings.get("refresh_margin") is not None:
        optional["refresh_margin"] = float(settings["refresh_margin"])
    return SmartBackendAuth(str(client_id), key, key_password=key_password, **optional)
