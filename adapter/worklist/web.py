"""The worklist page: open review items with filters, an item's explanation, and the actions replay and
dismiss-with-note. Server-rendered HTML (Jinja2), no JavaScript.

Served by `serve` under /worklist, or alone by the `worklist` command. Every page needs a login: HTTP basic
against `worklist.users_env` (`name:password` pairs), or, without it, a login form taking a name (for the
audit) and the receiver's token. Actions are POSTs carrying the session's CSRF token; each is audited with the
login that did it (state `review_action`). Patients appear by reference unless `worklist.show_patient_names`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape

from adapter.errors import FhirError
from adapter.extraction.procedures import RULE_OF_REASON
from adapter.pipeline import process
from adapter.redact import FreeText
from adapter.report import explain
from adapter.sources.files import SourcedResource
from adapter.state.base import ReviewAction, ReviewEntry, StateBackend
from adapter.worklist.reasons import help_for

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PREFIX = "/worklist"
COOKIE = "worklist_session"
SESSION_SECONDS = 8 * 3600
MAX_FORM_BYTES = 64 * 1024
MAX_NOTE = 2000

_templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                         trim_blocks=True, lstrip_blocks=True)


def age_text(days: float) -> str:
    """An item's age as a coder reads it: minutes, hours, then days."""
    minutes = days * 1440
    if minutes < 60:
        return f"{max(1, round(minutes))} min"
    if minutes < 1440:
        return f"{minutes / 60:.0f} h"
    return f"{days:.1f} d"


_templates.filters["age"] = age_text


@dataclass(frozen=True)
class ProcedureFacts:
    """What the list filters on, read from the server: the rendering provider and the date of service."""

    provider: str = ""
    date: str = ""
    patient_name: str = ""
    versions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    entry: ReviewEntry
    facts: ProcedureFacts
    age_days: float


def parse_users(text: str) -> dict[str, str]:
    """`name:password` pairs, one per line or `;`-separated."""
    users = {}
    for part in text.replace(";", "\n").splitlines():
        name, sep, password = part.strip().partition(":")
        if sep and name and password:
            users[name] = password
    return users


class Worklist:
    """The WSGI application. `replay(ids)` recodes entries (Service.replay); `read(type, id)` and
    `history(type, id)` read the FHIR server (for filters, names and versions; failures leave them empty)."""

    def __init__(self, state: StateBackend, replay: Callable[[list[int]], Any], *, token: str = "",
                 users: dict[str, str] | None = None, show_patient_names: bool = False,
                 read: Callable[[str, str], dict[str, Any]] | None = None,
                 history: Callable[[str, str], list[dict[str, Any]]] | None = None,
                 explain: Callable[[ReviewEntry], str] | None = None) -> None:
        if not token and not users:
            raise ValueError("the worklist needs a login: the receiver's token or worklist.users_env")
        self.state, self.replay, self.token, self.users = state, replay, token, users or {}
        self.show_patient_names, self.read, self.history = show_patient_names, read, history
        self.explain = explain
        self._key = secrets.token_bytes(32)
        self._facts: dict[str, tuple[float, ProcedureFacts]] = {}

    # -- sessions, logins and CSRF ------------------------------------------------------------------------------

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def _session_cookie(self, login: str) -> str:
        value = f"{quote(login, safe='')}|{int(time.time()) + SESSION_SECONDS}|{secrets.token_hex(8)}"
        return f"{value}|{self._sign(value)}"

    def _login_of(self, environ: dict[str, Any]) -> tuple[str | None, str]:
        """(login, session value) of the request; None when it has no valid session or credentials."""
        header = str(environ.get("HTTP_AUTHORIZATION", ""))
        if self.users and header.startswith("Basic "):
            try:
                name, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return None, ""
            expected = self.users.get(name)
            if expected is not None and hmac.compare_digest(expected.encode(), password.encode()):
                return name, f"basic:{name}"
            return None, ""
        cookie = SimpleCookie(str(environ.get("HTTP_COOKIE", "")))
        morsel = cookie.get(COOKIE)
        if morsel is None or self.users:
            return None, ""
        value, _, signature = morsel.value.rpartition("|")
        parts = value.split("|")
        if len(parts) != 3 or not hmac.compare_digest(self._sign(value), signature):
            return None, ""
        if not parts[1].isdigit() or int(parts[1]) < time.time():
            return None, ""
        return unquote(parts[0]), value

    def csrf_token(self, session: str) -> str:
        return self._sign(f"csrf|{session}")

    # -- WSGI ---------------------------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = str(environ.get("PATH_INFO", "")) or "/"
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        if path.startswith(PREFIX):
            path = path[len(PREFIX):] or "/"
        try:
            status, headers, body = self._route(method, path, environ)
        except Exception:  # a page never shows a stack trace; the log has it
            log.exception("worklist page %s %s failed", method, path)
            status, headers, body = "500 Internal Server Error", [], self._page("error.html", message=(
                "The page failed; the adapter's log says why."))
        headers = [("Cache-Control", "no-store"), ("X-Frame-Options", "DENY"),
                   ("Content-Security-Policy", "default-src 'self'; form-action 'self'; frame-ancestors 'none'"),
                   ("X-Content-Type-Options", "nosniff"), *headers]
        if not any(k == "Content-Type" for k, _ in headers):
            headers.append(("Content-Type", "text/html; charset=utf-8"))
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]

    def _route(self, method: str, path: str, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        if path == "/static/worklist.css":
            return "200 OK", [("Content-Type", "text/css; charset=utf-8")], \
                (HERE / "static" / "worklist.css").read_bytes()
        if path == "/login" and not self.users:
            return self._login(method, environ)
        login, session = self._login_of(environ)
        if login is None:
            if self.users:
                return "401 Unauthorized", [("WWW-Authenticate", 'Basic realm="worklist", charset="UTF-8"')], \
                    self._page("error.html", message="Log in to see the worklist.")
            if method == "GET":
                return "303 See Other", [("Location", f"{PREFIX}/login")], b""
            return "401 Unauthorized", [], self._page("error.html", message="Log in to see the worklist.")
        csrf = self.csrf_token(session)
        if method == "POST":
            form = self._form(environ)
            if form is None or not hmac.compare_digest(form.get("csrf", ""), csrf):
                return "403 Forbidden", [], self._page("error.html", message=(
                    "This action did not come from the worklist's own form (CSRF token missing or wrong)."))
            return self._act(path, form, login)
        if method != "GET":
            return "405 Method Not Allowed", [("Allow", "GET, POST")], b""
        query = {k: v[-1] for k, v in parse_qs(str(environ.get("QUERY_STRING", ""))).items()}
        if path in ("/", ""):
            return "200 OK", [], self._list(query, login, csrf)
        if path.startswith("/item/") and path[6:].isdigit():
            return self._item(int(path[6:]), login, csrf, query.get("message", ""))
        return "404 Not Found", [], self._page("error.html", message="No such page.")

    # -- pages ----------------------------------------------------------------------------------------------------

    def _page(self, template: str, **values: Any) -> bytes:
        return _templates.get_template(template).render(prefix=PREFIX, **values).encode("utf-8")

    def _login(self, method: str, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        if method == "GET":
            return "200 OK", [], self._page("login.html", error="")
        form = self._form(environ) or {}
        name, token = form.get("name", "").strip(), form.get("token", "")
        if not name or len(name) > 80 or not hmac.compare_digest(token.encode(), self.token.encode()):
            log.warning("worklist: a login was refused")
            return "401 Unauthorized", [], self._page("login.html", error="Name or token not accepted.")
        cookie = f"{COOKIE}={self._session_cookie(name)}; Path={PREFIX}; HttpOnly; SameSite=Strict; " \
                 f"Max-Age={SESSION_SECONDS}"
        return "303 See Other", [("Location", f"{PREFIX}/"), ("Set-Cookie", cookie)], b""

    def _form(self, environ: dict[str, Any]) -> dict[str, str] | None:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return None
        if length > MAX_FORM_BYTES:
            return None
        raw = environ["wsgi.input"].read(length) if length else b""
        try:
            return {k: v[-1] for k, v in parse_qs(raw.decode("utf-8")).items()}
        except UnicodeDecodeError:
            return None

    def facts(self, entry: ReviewEntry) -> ProcedureFacts:
        """The Procedure's provider and date (cached a minute); empty when the server cannot say."""
        if self.read is None or not entry.procedure.startswith("Procedure/"):
            return ProcedureFacts()
        cached = self._facts.get(entry.procedure)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        try:
            proc = self.read("Procedure", entry.procedure.split("/", 1)[1])
        except FhirError:
            proc = {}
        performers = [(p.get("actor") or {}).get("reference", "") for p in proc.get("performer") or []
                      if isinstance(p, dict)]
        when = proc.get("performedDateTime") or (proc.get("performedPeriod") or {}).get("start") or ""
        name = ""
        if self.show_patient_names and entry.patient and self.read is not None:
            try:
                patient = self.read("Patient", entry.patient.split("/", 1)[1])
                first = (patient.get("name") or [{}])[0]
                name = first.get("text") or " ".join([*first.get("given", []), first.get("family", "")]).strip()
            except FhirError:
                name = ""
        facts = ProcedureFacts(", ".join(p for p in performers if p), str(when)[:10], name)
        self._facts[entry.procedure] = (time.monotonic() + 60, facts)
        return facts

    def rows(self, query: dict[str, str]) -> list[Row]:
        """Open entries matching the filters, oldest first."""
        now = time.time()
        out = []
        for entry in self.state.reviews("open"):
            if query.get("reason") and entry.reason != query["reason"]:
                continue
            age = (now - entry.first_seen) / 86400
            try:
                if query.get("min_age_days") and age < float(query["min_age_days"]):
                    continue
            except ValueError:
                pass
            facts = self.facts(entry)
            if query.get("provider") and query["provider"] not in facts.provider:
                continue
            if query.get("date_from") and (not facts.date or facts.date < query["date_from"]):
                continue
            if query.get("date_to") and (not facts.date or facts.date > query["date_to"]):
                continue
            out.append(Row(entry, facts, age))
        return sorted(out, key=lambda r: (r.entry.first_seen, r.entry.id))

    def _list(self, query: dict[str, str], login: str, csrf: str) -> bytes:
        reasons = sorted({e.reason for e in self.state.reviews("open")})
        return self._page("list.html", rows=self.rows(query), query=query, reasons=reasons, login=login, csrf=csrf,
                          help_for=help_for, show_names=self.show_patient_names, message=query.get("message", ""))

    def _item(self, review_id: int, login: str, csrf: str, message: str) -> tuple[str, list[tuple[str, str]], bytes]:
        entry = self.state.review(review_id)
        if entry is None:
            return "404 Not Found", [], self._page("error.html", message=f"No review item {review_id}.")
        versions: list[str] = []
        if self.history is not None and entry.procedure.startswith("Procedure/"):
            try:
                for res in self.history("Procedure", entry.procedure.split("/", 1)[1]):
                    meta = res.get("meta") or {}
                    versions.append(f"version {meta.get('versionId', '?')} at {meta.get('lastUpdated', '?')}")
            except FhirError:
                versions = []
        explanation = ""
        if self.explain is not None:
            try:
                explanation = self.explain(entry)
            except FhirError:
                explanation = "(the FHIR server could not be read now: reload the page to try again)"
        return "200 OK", [], self._page(
            "item.html", entry=entry, explanation=explanation, help=help_for(entry.reason),
            rule=RULE_OF_REASON.get(entry.reason, ""),
            facts=self.facts(entry), audit=self.state.audit_for(entry.procedure),
            actions=self.state.review_actions(entry.id), versions=versions, login=login, csrf=csrf,
            show_names=self.show_patient_names, message=message)

    # -- actions ----------------------------------------------------------------------------------------------------

    def _act(self, path: str, form: dict[str, str], login: str) -> tuple[str, list[tuple[str, str]], bytes]:
        parts = path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "item" or not parts[1].isdigit() or parts[2] not in ("replay", "dismiss"):
            return "404 Not Found", [], self._page("error.html", message="No such action.")
        review_id, action = int(parts[1]), parts[2]
        entry = self.state.review(review_id)
        if entry is None or entry.status != "open":
            return self._back(review_id, "This item is no longer open.")
        actor = f"web:{login}"
        if action == "dismiss":
            note = form.get("note", "").strip()[:MAX_NOTE]
            if not note:
                return self._back(review_id, "A dismissal needs a note saying why.")
            self.state.dismiss_review(review_id, actor, note)
            log.info("worklist: review entry %d dismissed by a web login", review_id)
            return _to_list(f"Item {review_id} dismissed.")
        self.state.record_review_action(ReviewAction(review_id, time.time(), actor, "replay"))
        self.replay([review_id])
        after = self.state.review(review_id)
        if after is not None and after.status != "open":
            return _to_list(f"Item {review_id} replayed: coded.")
        return self._back(review_id, "Replayed: the item still needs review (see the detail).")

    def _back(self, review_id: int, message: str) -> tuple[str, list[tuple[str, str]], bytes]:
        return "303 See Other", [("Location", f"{PREFIX}/item/{review_id}?{urlencode({'message': message})}")], b""


def _to_list(message: str) -> tuple[str, list[tuple[str, str]], bytes]:
    return "303 See Other", [("Location", f"{PREFIX}/?{urlencode({'message': message})}")], b""


def mounted(worklist: Worklist, other: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """One WSGI app: /worklist... to the worklist, everything else to `other` (the receiver)."""
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = str(environ.get("PATH_INFO", ""))
        if path == PREFIX or path.startswith(PREFIX + "/"):
            return worklist(environ, start_response)
        return other(environ, start_response)
    return app


def worklist_of(service: Any, token: str, env: dict[str, str]) -> Worklist:
    """The page for a `Service`: its state, its replay, its FHIR client for provider, date and versions."""
    conf = service.settings.worklist
    users = parse_users(env.get(conf.users_env, "")) if conf.users_env else {}

    def history(kind: str, rid: str) -> list[dict[str, Any]]:
        answer = service.client.request("GET", f"{kind}/{rid}/_history", params={"_count": "50"})
        page = answer.json() if answer.ok else {}
        return [e["resource"] for e in page.get("entry") or [] if isinstance(e.get("resource"), dict)]

    def explanation(entry: ReviewEntry) -> str:
        """`explain` of the entry's Procedure, re-coded (nothing written) from the server's data and the
        pushed resources; free text of the input masked as in the CLI's messages."""
        if not entry.patients and not entry.resources:
            return ""
        ctx = service.syncer.source.context(list(entry.patients))
        pushed = [SourcedResource(r, f"pushed {r.get('resourceType')}/{r.get('id')}") for r in entry.resources]
        report = process([*ctx.resources, *pushed], service.tables, server_base=service.client.base_url)
        text = explain(report, service.tables, entry.procedure if entry.procedure.startswith("Procedure/") else None)
        return FreeText.of(r.resource for r in [*ctx.resources, *pushed]).mask(text)

    return Worklist(service.state, service.replay, token=token, users=users,
                    show_patient_names=conf.show_patient_names, read=service.client.read, history=history,
                    explain=explanation)
