"""A small synchronous FHIR R4 REST client built for HAPI FHIR and the adapter's needs.

One :class:`requests.Session` per client (pooled connections, shared TLS settings), JSON in and out,
typed errors (:mod:`adapter.client.errors`), retries only where repeating is harmless
(:mod:`adapter.client.retry`), credentials from :mod:`adapter.client.auth`.

Logging goes to the ``adapter.client`` logger: method, path and status at DEBUG, retries at
INFO (patient ids in paths as `adapter.redact` allows). Query strings, bodies (PHI) and credentials are
never logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase

from adapter.client.auth import FhirAuth, NoAuth
from adapter.client.errors import (
    FhirError,
    FhirTransportError,
    UnsafeLinkError,
    UnsupportedServerError,
    http_error,
    safe_url,
)
from adapter.client.retry import IDEMPOTENT_METHODS, RetryPolicy, is_idempotent_transaction
from adapter.errors import ConfigError
from adapter.redact import scrub
from adapter.waits import waiting_on

__all__ = ["FHIR_JSON", "FhirClient", "SearchParams"]

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

log = logging.getLogger("adapter.client")

FHIR_JSON = "application/fhir+json"
_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

# Search parameters: a mapping (list values repeat the parameter) or (name, value) pairs.
SearchParams = Mapping[str, Any] | Sequence[tuple[str, Any]]
Timeout = float | tuple[float, float]


def _check_type(resource_type: str) -> str:
    if not isinstance(resource_type, str) or not _TYPE_RE.match(resource_type):
        raise ValueError(f"not a FHIR resource type: {resource_type!r}")
    return resource_type


def _check_id(resource_id: str, what: str = "id") -> str:
    # Validated so that an id can never smuggle '/', '?' or '..' into the request path.
    if not isinstance(resource_id, str) or not _ID_RE.match(resource_id) or resource_id in {".", ".."}:
        raise ValueError(f"not a FHIR {what}: {resource_id!r}")
    return resource_id


def _etag(version: str | int) -> str:
    """If-Match value for a versionId; an already-formed ETag passes through."""
    text = str(version)
    return text if text.startswith(('W/"', '"')) else f'W/"{text}"'


def _query(query: str | SearchParams) -> str:
    if isinstance(query, str):
        return query.lstrip("?")
    return urlencode(query, doseq=True)


def _describe_transport(exc: BaseException) -> str:
    """A short reason for a transport failure without the URL (requests' text includes the query)."""
    if isinstance(exc, requests.exceptions.SSLError):
        kind = "TLS error"
    elif isinstance(exc, requests.exceptions.ConnectTimeout):
        kind = "connect timeout"
    elif isinstance(exc, requests.Timeout):
        kind = "read timeout"
    elif isinstance(exc, requests.exceptions.ChunkedEncodingError):
        kind = "connection broken while reading the response"
    else:
        kind = "connection failed"
    seen: set[int] = set()
    pending: list[Any] = [exc]
    while pending:  # look for the OS-level reason, e.g. "Connection refused"
        item = pending.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.strerror:
            return f"{kind}: {item.strerror}"
        pending.extend([item.__cause__, item.__context__, getattr(item, "reason", None), *item.args])
    return kind


class FhirClient:
    """Talks to one FHIR R4 server at ``base_url`` (e.g. ``http://127.0.0.1:8080/fhir``).

    ``timeout`` is (connect, read) seconds; ``verify`` is True, False or a CA bundle path; ``cert`` a
    client certificate path or (cert, key) pair. ``request_count`` counts HTTP requests sent to the
    FHIR server, retries included (token requests are counted by the auth object). Thread-safe for
    concurrent requests.

    ``trust_env`` (off by default) lets ``requests`` take CA bundles (``REQUESTS_CA_BUNDLE``,
    ``CURL_CA_BUNDLE``), proxies (``HTTPS_PROXY``...) and ``.netrc`` credentials from the environment:
    off, a variable nobody reviewed cannot make the client trust another server or send the bearer
    token through a proxy. ``on_reachability`` is called after every attempt with ``(True, reason)``
    when the server gave a usable answer and ``(False, reason)`` when it did not (no connection,
    timeout, 5xx, 429, credentials refused): health checks build on it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: AuthBase | None = None,
        timeout: Timeout = (5.0, 60.0),
        pool_size: int = 10,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        retry: RetryPolicy | None = None,
        user_agent: str = "fhir-charge-adapter/0.1",
        trust_env: bool = False,
        on_reachability: Callable[[bool, str], None] | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"FHIR base URL must be http(s)://host/...: {safe_url(base_url)!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("FHIR base URL must not carry a query, fragment or credentials")
        for path in [verify] if isinstance(verify, str) else []:
            if not os.path.exists(path):
                raise ConfigError(path, "verify", "CA bundle for TLS verification not found")
        for path in [cert] if isinstance(cert, str) else list(cert or ()):
            if not os.path.isfile(path):
                raise ConfigError(path, "cert", "TLS client certificate/key file not found")

        self.base_url = base_url.rstrip("/")
        self._origin = self._origin_of(self.base_url)
        self._base_path = urlsplit(self.base_url).path.rstrip("/")
        self.auth: AuthBase = auth or NoAuth()
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.request_count = 0
        self._count_lock = threading.Lock()
        self._capabilities: dict[str, Any] | None = None

        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers.update({"Accept": FHIR_JSON, "User-Agent": user_agent})
        session.verify = verify
        session.cert = cert
        session.trust_env = trust_env
        self.session = session
        self.on_reachability = on_reachability
        self.on_write: Callable[[str, float], None] | None = None
        """Called after each write (POST, PUT, PATCH, DELETE: a transaction, an update) with its method and
        seconds, retries included, whether it succeeded or not (the write-latency histogram)."""
        # Auth is passed per request, not as session.auth, so token calls through this session stay bare.
        if isinstance(self.auth, FhirAuth):
            self.auth.bind(self.base_url, session, timeout)

    def __repr__(self) -> str:
        return f"FhirClient({self.base_url!r}, auth={self.auth!r})"

    def close(self) -> None:
        """Release pooled connections."""
        self.session.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- server ---------------------------------------------------------------------------------------

    def capabilities(self, *, refresh: bool = False) -> dict[str, Any]:
        """The server's CapabilityStatement (GET /metadata), fetched once and cached."""
        if self._capabilities is None or refresh:
            self._capabilities = self._call("GET", "metadata")
        return self._capabilities

    def check_server(self, supported: Sequence[str] = ("4.0.0", "4.0.1")) -> dict[str, Any]:
        """Fail early, with a clear message, if the server does not speak a supported FHIR version."""
        statement = self.capabilities()
        if statement.get("resourceType") != "CapabilityStatement":
            raise UnsupportedServerError(
                f"FHIR server at {safe_url(self.base_url)}: /metadata did not return a CapabilityStatement"
            )
        version = statement.get("fhirVersion")
        if version not in supported:
            raise UnsupportedServerError(
                f"FHIR server at {safe_url(self.base_url)} reports fhirVersion {version or '(none)'}; "
                f"this adapter supports {', '.join(supported)} (FHIR R4)"
            )
        return statement

    # -- read -----------------------------------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """GET Type/id."""
        return self._call("GET", f"{_check_type(resource_type)}/{_check_id(resource_id)}")

    def vread(self, resource_type: str, resource_id: str, version_id: str | int) -> dict[str, Any]:
        """GET Type/id/_history/vid."""
        vid = _check_id(str(version_id), "versionId")
        return self._call("GET", f"{_check_type(resource_type)}/{_check_id(resource_id)}/_history/{vid}")

    def search(
        self, resource_type: str, params: SearchParams | None = None, *, via_post: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Yield each searchset Bundle page, following ``next`` links verbatim.

        A next link is followed only if it stays on the configured server (scheme, host, port and
        base path), else :class:`UnsafeLinkError`. ``via_post`` searches with POST Type/_search so
        long or sensitive parameters stay out of URLs and access logs.
        """
        _check_type(resource_type)
        if via_post:
            page = self._call(
                "POST",
                f"{resource_type}/_search",
                data=urlencode(params or {}, doseq=True).encode("ascii"),
                content_type="application/x-www-form-urlencoded",
                idempotent=True,
            )
        else:
            page = self._call("GET", resource_type, params=params)
        yield from self._pages(page, f"search {resource_type}")

    def history(self, resource_type: str, params: SearchParams | None = None) -> Iterator[dict[str, Any]]:
        """Yield each page of ``GET Type/_history`` (e.g. ``{"_since": ...}``): the only place deletes show."""
        page = self._call("GET", f"{_check_type(resource_type)}/_history", params=params)
        yield from self._pages(page, f"history {resource_type}")

    def _pages(self, page: dict[str, Any], what: str) -> Iterator[dict[str, Any]]:
        """Follow ``next`` links verbatim, refusing off-server links and loops."""
        seen: set[str] = set()
        while True:
            if page.get("resourceType") != "Bundle":
                raise FhirError(f"{what}: server returned {page.get('resourceType')!r}, not a Bundle")
            yield page
            next_url = self._next_link(page)
            if next_url is None:
                return
            if next_url in seen:
                raise FhirError(f"{what}: server repeated a next link; stopping to avoid a loop")
            seen.add(next_url)
            page = self._call("GET", next_url)

    def search_all(
        self, resource_type: str, params: SearchParams | None = None, *, via_post: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Yield every entry resource of every page (matches and _include'd resources alike)."""
        for resource, _mode in self.search_all_with_mode(resource_type, params, via_post=via_post):
            yield resource

    def search_all_with_mode(
        self, resource_type: str, params: SearchParams | None = None, *, via_post: bool = False
    ) -> Iterator[tuple[dict[str, Any], str | None]]:
        """Yield (resource, search.mode) pairs; mode is "match", "include", "outcome" or None."""
        for page in self.search(resource_type, params, via_post=via_post):
            for entry in page.get("entry") or []:
                resource = entry.get("resource")
                if isinstance(resource, dict):
                    yield resource, (entry.get("search") or {}).get("mode")

    # -- write ----------------------------------------------------------------------------------------

    def create(self, resource: Mapping[str, Any], *, if_none_exist: str | SearchParams | None = None) -> dict[str, Any]:
        """POST Type; with ``if_none_exist`` a conditional create, which is safe to retry."""
        resource_type = _check_type(str(resource.get("resourceType")))
        headers = {"Prefer": "return=representation"}
        if if_none_exist is not None:
            headers["If-None-Exist"] = _query(if_none_exist)
        return self._call(
            "POST", resource_type, json_body=resource, headers=headers, idempotent=if_none_exist is not None
        )

    def update(self, resource: Mapping[str, Any], *, if_match: str | int | None = None) -> dict[str, Any]:
        """PUT Type/id; ``if_match`` (a versionId or ETag) makes a stale write fail with FhirConflict."""
        resource_type = _check_type(str(resource.get("resourceType")))
        resource_id = _check_id(resource.get("id"))  # type: ignore[arg-type]
        headers = {"Prefer": "return=representation"}
        if if_match is not None:
            headers["If-Match"] = _etag(if_match)
        return self._call("PUT", f"{resource_type}/{resource_id}", json_body=resource, headers=headers)

    def conditional_update(
        self, resource_type: str, query: str | SearchParams, resource: Mapping[str, Any]
    ) -> dict[str, Any]:
        """PUT Type?query: creates on no match, updates on one, FhirConflict (412) on several."""
        _check_type(resource_type)
        if resource.get("resourceType") != resource_type:
            raise ValueError(f"resource is a {resource.get('resourceType')!r}, not a {resource_type}")
        return self._call(
            "PUT",
            f"{resource_type}?{_query(query)}",
            json_body=resource,
            headers={"Prefer": "return=representation"},
        )

    def delete(self, resource_type: str, resource_id: str, *, if_match: str | int | None = None) -> dict[str, Any]:
        """DELETE Type/id; returns the server's OperationOutcome, or {} when the body is empty."""
        headers = {"If-Match": _etag(if_match)} if if_match is not None else {}
        return self._call("DELETE", f"{_check_type(resource_type)}/{_check_id(resource_id)}", headers=headers)

    def transaction(self, bundle: Mapping[str, Any], *, idempotent: bool | None = None) -> dict[str, Any]:
        """POST a transaction/batch Bundle to the base; returns the response Bundle.

        Retried only if ``is_idempotent_transaction(bundle)`` (or ``idempotent=True`` is forced).
        """
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("transaction", "batch"):
            raise ValueError("transaction() needs a Bundle of type transaction or batch")
        safe = is_idempotent_transaction(bundle) if idempotent is None else idempotent
        return self._call("POST", "", json_body=bundle, headers={"Prefer": "return=representation"}, idempotent=safe)

    # -- operations -----------------------------------------------------------------------------------

    def validate(self, resource: Mapping[str, Any], *, profile: str | None = None) -> dict[str, Any]:
        """POST Type/$validate and return the OperationOutcome, whether or not it holds errors.

        HAPI reports validation failures as 412/422 (or 400) carrying the outcome; those are
        returned, not raised, so the caller can inspect severities. Other failures raise.
        """
        resource_type = _check_type(str(resource.get("resourceType")))
        params = {"profile": profile} if profile else None
        response = self._send("POST", f"{resource_type}/$validate", params=params, json_body=resource, idempotent=True)
        if response.status_code in (400, 412, 422):
            body = self._json_or_none(response)
            if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
                return body
        return self._result(response)

    def operation(
        self,
        path: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        method: str = "POST",
        params: SearchParams | None = None,
        idempotent: bool | None = None,
    ) -> dict[str, Any]:
        """Invoke an operation such as ``"$meta"`` or ``"Patient/1/$everything"`` relative to the base.

        ``parameters`` is the Parameters resource body (POST); ``params`` go in the query (GET).
        POST is retried only with ``idempotent=True``.
        """
        method = method.upper()
        if "$" not in path or "?" in path or "://" in path or ".." in path.split("/"):
            raise ValueError(f"not an operation path relative to the base: {path!r}")
        return self._call(method, path.lstrip("/"), params=params, json_body=parameters, idempotent=idempotent)

    # -- raw requests (Bulk Data) ---------------------------------------------------------------------

    def check_link(self, url: str) -> str:
        """``url`` made absolute against the base; :class:`UnsafeLinkError` unless it stays on the configured
        server (scheme, host, port and base path), like a paging link."""
        absolute = urljoin(self.base_url + "/", url)
        self._check_link(absolute)
        return absolute

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        params: SearchParams | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
    ) -> requests.Response:
        """One request with the client's retries, credentials and TLS settings, answered as it came (any status):
        for protocols that speak in status codes and headers, such as a Bulk Data kick-off and its status URL.
        An absolute URL must stay on the configured server."""
        if path_or_url.startswith(("http://", "https://")):
            self._check_link(path_or_url)
        return self._send(method.upper(), path_or_url, params=params, headers=headers, idempotent=idempotent)

    def download(self, url: str, destination: str | os.PathLike[str], *, accept: str = "application/fhir+ndjson"
                 ) -> int:
        """GET ``url`` (which must stay on the configured server) into ``destination``, streamed to disk in
        pieces so a file of any size costs no memory; a transfer cut off is retried from the start like any
        GET. Returns the bytes written; a non-2xx answer raises its typed error."""
        url = self.check_link(url)
        target = os.fspath(destination)
        partial = target + ".part"
        attempts = 0
        while True:
            attempts += 1
            response = self._send("GET", url, headers={"Accept": accept}, stream=True)
            try:
                if not 200 <= response.status_code < 300:
                    response.content  # noqa: B018 -- read the (small) error body for its OperationOutcome
                    self._result(response)
                written = 0
                with open(partial, "wb") as out:
                    for chunk in response.iter_content(1 << 20):
                        out.write(chunk)
                        written += len(chunk)
                os.replace(partial, target)
                return written
            except requests.RequestException as exc:
                if attempts >= self.retry.attempts:
                    raise FhirTransportError("GET", url, _describe_transport(exc), attempts, original=exc) from None
                log.info("download of %s cut off (%s); starting again", scrub(urlsplit(url).path),
                         _describe_transport(exc))
                self.retry.sleep(min(self.retry.backoff_max, self.retry.backoff_initial * 2 ** attempts))
            finally:
                response.close()

    # -- plumbing -------------------------------------------------------------------------------------

    @staticmethod
    def _origin_of(url: str) -> tuple[str, str, int]:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        return scheme, (parts.hostname or "").lower(), port

    def _next_link(self, bundle: Mapping[str, Any]) -> str | None:
        for link in bundle.get("link") or []:
            if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
                url = urljoin(self.base_url + "/", str(link["url"]))
                self._check_link(url)
                return url
        return None

    def _check_link(self, url: str) -> None:
        """Refuse links that would send our credentials (or our traffic) to another server."""
        try:
            origin = self._origin_of(url)
            path = urlsplit(url).path
        except ValueError:
            raise UnsafeLinkError(f"paging link is not a valid URL: {safe_url(url)}") from None
        in_base = path == self._base_path or path.startswith(self._base_path + "/") or not self._base_path
        if origin != self._origin or not in_base:
            raise UnsafeLinkError(
                f"paging link {safe_url(url)} leaves the configured server {safe_url(self.base_url)}; not followed"
            )

    def _url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return f"{self.base_url}/{path_or_url}" if path_or_url else self.base_url

    def _may_refresh(self, response: requests.Response) -> bool:
        return isinstance(self.auth, FhirAuth) and self.auth.handle_401(response)

    def _count(self) -> None:
        with self._count_lock:
            self.request_count += 1

    def _send(
        self,
        method: str,
        path_or_url: str,
        *,
        params: SearchParams | None = None,
        json_body: Mapping[str, Any] | None = None,
        data: bytes | None = None,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        stream: bool = False,
    ) -> requests.Response:
        """Send one logical request (with retries and one credential refresh) and return the response
        (`stream`: with its body still to be read)."""
        url = self._url(path_or_url)
        path = urlsplit(url).path or "/"
        all_headers = dict(headers or {})
        if json_body is not None:
            data = json.dumps(json_body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            content_type = f"{FHIR_JSON}; charset=utf-8"
        if content_type:
            all_headers["Content-Type"] = content_type
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        attempts = 0
        refreshed = False

        def send_once() -> requests.Response:
            nonlocal attempts, refreshed
            while True:
                attempts += 1
                self._count()
                started = time.monotonic()
                try:
                    response = self._request_once(method, url, params, data, all_headers, stream)
                except requests.RequestException as exc:
                    self._report(False, _describe_transport(exc))  # at once: health need not wait for retries
                    raise
                self._report(response.status_code < 500 and response.status_code not in (401, 403, 429),
                             f"HTTP {response.status_code}")
                log.debug("%s %s -> %d (%.3fs)", method, scrub(path), response.status_code, time.monotonic() - started)
                if response.status_code == 401 and not refreshed and self._may_refresh(response):
                    refreshed = True
                    log.debug("%s %s: 401, retrying once with fresh credentials", method, scrub(path))
                    response.close()
                    continue
                return response

        begun = time.monotonic()
        try:
            return self.retry.call(send_once, idempotent=idempotent, describe=f"{method} {scrub(path)}")
        except requests.RequestException as exc:
            raise FhirTransportError(method, url, _describe_transport(exc), attempts, original=exc) from None
        finally:
            if self.on_write is not None and method in WRITE_METHODS and not path.endswith("/_search"):
                self.on_write(method, time.monotonic() - begun)

    def _request_once(self, method: str, url: str, params: SearchParams | None, data: bytes | None,
                      headers: Mapping[str, str], stream: bool = False) -> requests.Response:
        with waiting_on(f"the FHIR server ({method} {urlsplit(url).netloc})"):
            return self._send_request(method, url, params, data, headers, stream)

    def _send_request(self, method: str, url: str, params: SearchParams | None, data: bytes | None,
                      headers: Mapping[str, str], stream: bool) -> requests.Response:
        return self.session.request(
            method,
            url,
            params=params,
            data=data,
            headers=headers,
            auth=self.auth,
            timeout=self.timeout,
            allow_redirects=False,
            stream=stream,
            # Passed per request as well: with trust_env on, requests lets REQUESTS_CA_BUNDLE
            # override a session-level verify.
            verify=self.session.verify,
            cert=self.session.cert,
        )

    def _report(self, reachable: bool, reason: str) -> None:
        if self.on_reachability is not None:
            try:
                self.on_reachability(reachable, reason)
            except Exception:  # an observer must never break a request
                log.warning("reachability observer failed", exc_info=True)

    @staticmethod
    def _json_or_none(response: requests.Response) -> Any:
        if not response.content:
            return None
        try:
            return json.loads(response.content)
        except ValueError:
            return None

    def _result(self, response: requests.Response) -> dict[str, Any]:
        """The parsed body of a 2xx response; a typed error for anything else."""
        method = (response.request.method if response.request is not None else None) or "?"
        url = response.url or ""
        if not 200 <= response.status_code < 300:
            body = self._json_or_none(response)
            outcome = body if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" else None
            raise http_error(response.status_code, url, method, outcome, fallback_text=response.reason or "")
        if not response.content:
            return {}
        body = self._json_or_none(response)
        if not isinstance(body, dict):
            raise FhirError(f"{method} {urlsplit(url).path}: HTTP {response.status_code} body is not a JSON object")
        return body

    def _call(self, method: str, path_or_url: str, **kw: Any) -> dict[str, Any]:
        return self._result(self._send(method, path_or_url, **kw))
