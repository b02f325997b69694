"""The review console's web app: server-rendered pages (Starlette and Jinja2), a few forms, and
one stream of server-sent events that keeps the changes list live.

Who may do what:

- every page needs a signed-in person: a console account (``ratchet console user add``) with its
  password, or, when the console is started with ``--identity-header`` and ``--trusted-proxy``, the
  identity a trusted proxy (single sign-on) puts in that header, honoured only on requests from
  those addresses;
- a viewer reads; a decision or a rollback needs a reviewer, a live session (an HttpOnly,
  SameSite=Strict cookie with an expiry) and the session's CSRF token in the form. Anything less
  is refused before the console talks to NATS at all.

Pages carry a Content-Security-Policy that allows only the console's own script and stylesheet:
no inline script or style, so even text that escaped escaping could not run or restyle anything.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ratchet.cli.client import ClientError
from ratchet.console import views
from ratchet.console.accounts import AccountError, Accounts, Role, check_name, same_token
from ratchet.console.backend import Backend
from ratchet.contracts import REASON_CHARS
from ratchet.store import AuditRecord, FailureRecord
from ratchet.untrusted import for_terminal

log = logging.getLogger("ratchet.console")
HERE = Path(__file__).parent
SESSION_COOKIE = "ratchet_console_session"
LOGIN_COOKIE = "ratchet_console_login"  # the login form's own CSRF token (double submit)
MAX_FORM_BYTES = 16 * 1024
MAX_FORM_FIELDS = 16
LOGIN_FAILURES = 5  # per name, within LOGIN_WINDOW_S; then that name waits out the window
LOGIN_WINDOW_S = 300.0
LOGIN_NAMES_KEPT = 10_000  # the throttle forgets the names that failed longest ago beyond it
LOGIN_CHECKS = 2  # password checks (bcrypt, ~0.25 s of CPU each) at once; the others queue
LOGIN_WAIT_S = 5.0  # how long a sign-in queues for a check before it is told to try again
WRONG_LOGIN = "Wrong name or password."
AUDIT_RECORDS_SHOWN = 500
HEARTBEAT_S = 15.0
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]
NOTICES = {  # what a redirect after an action says (?done=...): fixed words, never the wire's
    "approved": "Approved: the gatekeeper now applies the change and checks it.",
    "rejected": "Rejected: the change will not be applied.",
    "rollback": "Rollback proposed: the gate measures it, then it waits for a reviewer.",
}


@dataclass
class ConsoleConfig:
    """How the console admits people (``ratchet console``'s options)."""

    session_lifetime: timedelta = timedelta(hours=8)
    identity_header: str | None = None
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(
        default_factory=list
    )
    proxy_role: Role | None = "viewer"  # for a proxied identity without an account; None: refused
    secure_cookies: bool = False  # set behind a TLS proxy (requests reach the console as http)


@dataclass
class Visitor:
    """A signed-in person: their account name, role, and session."""

    name: str
    role: Role
    csrf: str
    via: str  # "password" or "proxy"

    @property
    def reviewer(self) -> bool:
        return self.role == "reviewer"


class LoginThrottle:
    """At most ``LOGIN_FAILURES`` wrong passwords per name per window.

    Bounded by construction: it keeps only console names (at most 32 characters; a sign-in
    with any other name is refused before it gets here), at most ``LOGIN_FAILURES`` times for
    each, and at most ``LOGIN_NAMES_KEPT`` names (the longest-ago failures are forgotten)."""

    def __init__(self) -> None:
        self.failures: OrderedDict[str, list[float]] = OrderedDict()

    def blocked(self, name: str) -> bool:
        if name not in self.failures:
            return False
        now = time.monotonic()
        recent = [t for t in self.failures[name] if now - t < LOGIN_WINDOW_S]
        self.failures[name] = recent
        return len(recent) >= LOGIN_FAILURES

    def failed(self, name: str) -> None:
        check_name(name)  # AccountError: no account has it, so there is nothing to throttle
        times = self.failures.setdefault(name, [])
        times.append(time.monotonic())
        del times[:-LOGIN_FAILURES]  # more tell no more: blocked() needs the last few only
        self.failures.move_to_end(name)
        while len(self.failures) > LOGIN_NAMES_KEPT:
            self.failures.popitem(last=False)

    def succeeded(self, name: str) -> None:
        self.failures.pop(name, None)


class SecurityHeaders:
    """Adds the security headers to every response (plain ASGI, so the event stream flows)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def templates() -> Environment:
    """Jinja2 with autoescaping on for every template: the wire's text is always data."""
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["shown"] = lambda text: for_terminal(str(text))
    env.filters["block"] = lambda text: for_terminal(str(text), multiline=True)
    env.filters["when"] = _when
    env.filters["percent"] = lambda share: f"{share:+.1%}"
    env.filters["segment"] = lambda text: quote(str(text), safe="")  # one path segment
    env.filters["as_json"] = lambda value: json.dumps(value, ensure_ascii=False)
    return env


def _when(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if at else ""


Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def build_console(
    backend: Backend, accounts: Accounts, config: ConsoleConfig | None = None
) -> Starlette:
    """The console app; it starts and stops ``backend`` (its NATS connection) with itself."""
    config = config or ConsoleConfig()
    env = templates()
    throttle = LoginThrottle()
    checks = asyncio.Semaphore(LOGIN_CHECKS)  # a flood of sign-ins queues, it does not fan out

    # --- rendering -------------------------------------------------------------------------------

    def page(
        request: Request, template: str, status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        visitor: Visitor | None = request.scope.get("visitor")
        html = env.get_template(template).render(
            visitor=visitor, path=request.url.path, max_reason=REASON_CHARS, **context
        )
        response = HTMLResponse(html, status_code=status_code)
        response.headers["cache-control"] = "no-store"
        return response

    # --- who is asking ---------------------------------------------------------------------------

    def from_trusted_proxy(request: Request) -> bool:
        if not (config.identity_header and config.trusted_proxies and request.client):
            return False
        try:
            peer = ipaddress.ip_address(request.client.host)
        except ValueError:
            return False
        return any(peer in network for network in config.trusted_proxies)

    def session_cookie(response: Response, token: str) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=int(config.session_lifetime.total_seconds()),
            httponly=True,
            samesite="strict",
            secure=config.secure_cookies,
            path="/",
        )

    async def visitor_of(request: Request) -> tuple[Visitor | None, str | None]:
        """Who sent ``request``, and a session token to set when one was just opened (a
        proxied identity's first request)."""
        token = request.cookies.get(SESSION_COOKIE)
        found = await asyncio.to_thread(accounts.session, token) if token else None
        if from_trusted_proxy(request) and (claimed := _header(request, config)):
            name = check_name(claimed)  # AccountError: refused by the caller
            if found and found[0].name == name:
                session, role = found
                return Visitor(name, role, session.csrf, "proxy"), None
            account = await asyncio.to_thread(accounts.get, name)
            if account is None and config.proxy_role is None:
                raise HTTPException(403, f"{name!r} has no console account")
            new, session = await asyncio.to_thread(
                accounts.proxy_session,
                name,
                config.session_lifetime,
                proxy_role=None if account else config.proxy_role,
            )
            given = account.role if account else config.proxy_role
            assert given is not None
            return Visitor(name, given, session.csrf, "proxy"), new
        if found:
            session, role = found
            return Visitor(session.name, role, session.csrf, "password"), None
        return None, None

    async def still_signed_in(request: Request) -> bool:
        """Whether ``request``'s visitor is still signed in: their cookie's session lasts, or
        the trusted proxy still names them (a proxied page may have no cookie of its own)."""
        try:
            visitor, _ = await visitor_of(request)
        except (AccountError, HTTPException):
            return False
        return visitor is not None

    def signed_in(*, reviewer: bool = False) -> Callable[[Handler], Handler]:
        """The handler runs for a signed-in visitor; a page sends anyone else to the login, a
        form is refused (401) without touching anything. ``reviewer``: a viewer is refused
        (403), and so is a form without the session's CSRF token."""

        def wrap(handler: Handler) -> Handler:
            async def guarded(request: Request) -> Response:
                try:
                    visitor, new_token = await visitor_of(request)
                except AccountError as exc:
                    raise HTTPException(403, str(exc)) from exc
                if visitor is None:
                    if request.method == "GET":
                        target = quote(request.url.path, safe="/")
                        return RedirectResponse(f"/login?next={target}", status_code=303)
                    raise HTTPException(401, "sign in first")
                request.scope["visitor"] = visitor
                if request.method == "POST":
                    form = await form_of(request)
                    if not same_token(form.get("csrf"), visitor.csrf):
                        raise HTTPException(403, "the form's CSRF token is missing or stale")
                    if reviewer and not visitor.reviewer:
                        raise HTTPException(403, "only a reviewer may do this; you may read")
                    request.scope["form"] = form
                response = await handler(request)
                if new_token:
                    session_cookie(response, new_token)
                return response

            return guarded

        return wrap

    # --- signing in and out ------------------------------------------------------------------

    async def login_page(request: Request) -> Response:
        nonce = secrets.token_urlsafe(24)
        response = page(
            request,
            "login.html",
            nonce=nonce,
            next=_local(request.query_params.get("next")),
            error=None,
            name="",
            proxy=bool(config.identity_header),
        )
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=3600,
            httponly=True,
            samesite="strict",
            secure=config.secure_cookies,
            path="/login",
        )
        return response

    async def login(request: Request) -> Response:
        form = await form_of(request)
        name, password = form.get("name", "").strip(), form.get("password", "")
        target = _local(form.get("next"))

        def again(error: str, status_code: int) -> Response:
            nonce = request.cookies.get(LOGIN_COOKIE) or ""
            return page(
                request,
                "login.html",
                status_code=status_code,
                nonce=nonce,
                next=target,
                error=error,
                name=name,
                proxy=bool(config.identity_header),
            )

        if not same_token(form.get("nonce"), request.cookies.get(LOGIN_COOKIE) or "-"):
            return again("The sign-in form expired: try again.", 403)
        try:
            check_name(name)
        except AccountError:
            return again(WRONG_LOGIN, 401)  # no account has it: no bcrypt, nothing remembered
        try:
            async with asyncio.timeout(LOGIN_WAIT_S):
                await checks.acquire()
        except TimeoutError:
            return again("Many sign-ins at once: try again in a moment.", 503)
        if throttle.blocked(name):  # asked in turn, so queued guesses at one name count too
            checks.release()
            return again("Too many wrong passwords for this name: wait a few minutes.", 429)
        check = asyncio.ensure_future(asyncio.to_thread(accounts.authenticate, name, password))
        check.add_done_callback(lambda _: checks.release())  # when bcrypt ends, not before
        account = await asyncio.shield(check)  # an abandoned request still holds its turn
        if account is None:
            throttle.failed(name)
            return again(WRONG_LOGIN, 401)
        throttle.succeeded(name)
        token, _ = await asyncio.to_thread(
            accounts.open_session, account.name, config.session_lifetime
        )
        response = RedirectResponse(target, status_code=303)
        session_cookie(response, token)
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        log.info("%s signed in (%s)", account.name, account.role)
        return response

    @signed_in()
    async def logout(request: Request) -> Response:
        if token := request.cookies.get(SESSION_COOKIE):
            await asyncio.to_thread(accounts.close_session, token)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # --- the changes ---------------------------------------------------------------------------

    @signed_in()
    async def changes_page(request: Request) -> Response:
        task = request.query_params.get("task") or None
        state = request.query_params.get("state") or None
        every = await backend.changes()
        shown = [c for c in every if task in (None, c.task) and state in (None, c.status)]
        context: dict[str, Any] = {
            "changes": shown,
            "task": task,
            "state": state,
            "total": len(every),
        }
        if request.query_params.get("fragment") == "rows":
            return page(request, "_changes_rows.html", **context)
        tasks = sorted({c.task for c in every} | set(await backend.tasks()))
        return page(request, "changes.html", tasks=tasks, states=views.states_of(every), **context)

    async def change_context(change_id: str, *, whole: bool = True) -> dict[str, Any]:
        """What a change's page shows; ``whole`` False: only its live part (the steps after the
        decision and the trail), which asks the failure store nothing."""
        try:
            trail = await backend.trail(change_id)
        except ClientError as exc:
            if str(exc).startswith("no change"):
                raise HTTPException(404, f"no change {change_id!r}") from exc
            raise
        view = views.change_view(trail)
        if whole:
            view.evidence = await evidence_of(change_id, view.task, trail)
            view.groups = views.groups(trail, await targeted_failures(view.task, trail))
        return {"change": view, "live_canary": await live_canary(view)}

    async def evidence_of(
        change_id: str, task: str, trail: list[AuditRecord]
    ) -> views.Evidence | None:
        """The gate's evidence, with what both prompts answered on the cases it shows."""
        measurement = views.measurement_of(trail)
        if measurement is None:
            return None
        evidence = views.evidence(measurement, backend.suites.get(task))
        found = None
        try:
            found = await backend.gate_runs(
                change_id, [case.id for case in evidence.cases], evidence.repeats_shown
            )
        except ClientError as exc:
            log.warning("gate runs of %s: %s", change_id, exc)
        return views.with_runs(evidence, found)

    async def targeted_failures(task: str, trail: list[AuditRecord]) -> list[FailureRecord]:
        received = next((r for r in trail if r.kind == "received"), None)
        if received and (wanted := views.targeted_runs(trail)):
            try:
                return await backend.failures(task, wanted, received.at)
            except ClientError as exc:
                log.warning("failures for %s: %s", received.change_id, exc)
        return []

    async def live_canary(view: views.ChangeView) -> dict[str, Any] | None:
        """A running canary's counts so far: the gatekeeper's summary of the change holds them
        (its ledger, not the trail); shown field by field, like the canary's records."""
        if not view.canary or view.canary[-1].kind != "canary":
            return None
        summary = next(
            (c for c in await backend.changes(view.task) if c.change_id == view.change_id), None
        )
        stats = getattr(summary, "canary", None)
        return stats.model_dump(mode="json") if stats is not None else None

    @signed_in()
    async def change_page(request: Request) -> Response:
        change_id = request.path_params["change_id"]
        if request.query_params.get("fragment") == "live":
            live = await change_context(change_id, whole=False)
            return page(request, "_change_live.html", **live)
        context = await change_context(change_id)
        notice = NOTICES.get(request.query_params.get("done", ""))
        return page(request, "change.html", notice=notice, error=None, reason="", **context)

    @signed_in(reviewer=True)
    async def decide(request: Request) -> Response:
        change_id = request.path_params["change_id"]
        form: dict[str, str] = request.scope["form"]
        visitor: Visitor = request.scope["visitor"]
        verdict, reason = form.get("decision"), form.get("reason", "").strip()
        evidence = form.get("evidence", "")
        error = None
        if verdict not in ("approve", "reject"):
            error = "Choose Approve or Reject."
        elif not reason:
            error = "Say why: the reason goes into the audit trail with your name."
        elif len(reason) > REASON_CHARS:
            error = f"A reason has at most {REASON_CHARS} characters."
        elif not re.fullmatch(r"[0-9a-f]{64}", evidence):
            error = "The form names no evidence: reload the page."
        else:
            try:
                await backend.decide(
                    change_id,
                    approve=verdict == "approve",
                    reason=reason,
                    evidence=evidence,
                    reviewer=visitor.name,
                )
            except ClientError as exc:
                error = str(exc)
            else:
                log.info("%s %sd %s", visitor.name, verdict, change_id)
                done = "approved" if verdict == "approve" else "rejected"
                return RedirectResponse(f"/changes/{quote(change_id)}?done={done}", 303)
        context = await change_context(change_id)
        return page(request, "change.html", 409, notice=None, error=error, reason=reason, **context)

    # --- prompts -------------------------------------------------------------------------------

    @signed_in()
    async def prompts_page(request: Request) -> Response:
        return page(request, "tasks.html", tasks=await backend.tasks())

    @signed_in()
    async def history_page(request: Request) -> Response:
        task = request.path_params["task"]
        try:
            history = await backend.history(task)
        except ClientError as exc:
            raise HTTPException(404, str(exc)) from exc
        changes = {c.change_id: c for c in await backend.changes(task)}
        return page(
            request,
            "history.html",
            task=task,
            history=list(reversed(history)),
            changes=changes,
            error=None,
        )

    @signed_in(reviewer=True)
    async def rollback(request: Request) -> Response:
        task = request.path_params["task"]
        form: dict[str, str] = request.scope["form"]
        visitor: Visitor = request.scope["visitor"]
        try:
            version = int(form.get("version", ""))
            change = await backend.rollback(task, version, visitor.name)
        except ValueError:
            raise HTTPException(400, "which version? (a number)") from None
        except ClientError as exc:
            raise HTTPException(409, str(exc)) from exc
        log.info(
            "%s proposed rolling %s back to v%d: %s", visitor.name, task, version, change.change_id
        )
        return RedirectResponse(f"/changes/{quote(change.change_id)}?done=rollback", 303)

    # --- the audit trail -----------------------------------------------------------------------

    @signed_in()
    async def audit_page(request: Request) -> Response:
        check = await backend.audit()
        only = request.query_params.get("change") or None
        records = [r for r in check.records if only in (None, r.change_id)]
        shown = list(reversed(records))[:AUDIT_RECORDS_SHOWN]
        return page(
            request, "audit.html", check=check, records=shown, matching=len(records), change=only
        )

    # --- live updates --------------------------------------------------------------------------

    @signed_in()
    async def events(request: Request) -> Response:
        """The change events, as server-sent events, while the visitor is signed in."""
        if backend.relay.full:
            raise HTTPException(503, "too many pages follow the changes: reload later")

        async def stream() -> AsyncIterator[str]:
            yield "retry: 3000\n\n"
            async with backend.relay.listen() as queue:
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                    except TimeoutError:
                        if not await still_signed_in(request):
                            return  # signed out or expired: the page stops following
                        yield ": still here\n\n"
                        continue
                    if event is None:
                        return
                    yield f"event: change\ndata: {event}\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def home(request: Request) -> Response:
        return RedirectResponse("/changes", status_code=303)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    # --- errors --------------------------------------------------------------------------------

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return page(
            request, "error.html", exc.status_code, status=exc.status_code, message=exc.detail
        )

    async def services_error(request: Request, exc: Exception) -> Response:
        """A service did not answer, or NATS refused: one line, and a 502."""
        return page(request, "error.html", 502, status=502, message=str(exc))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        """Connect to NATS unless whoever runs the app already did (``ratchet console`` does,
        to fail with one line before serving); disconnect only what was connected here."""
        own = not backend.connected
        if own:
            await backend.start()
        try:
            yield
        finally:
            if own:
                await backend.stop()

    routes = [
        Route("/", home),
        Route("/healthz", healthz),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/changes", changes_page),
        Route("/changes/{change_id}", change_page),
        Route("/changes/{change_id}/decision", decide, methods=["POST"]),
        Route("/prompts", prompts_page),
        Route("/prompts/{task}", history_page),
        Route("/prompts/{task}/rollback", rollback, methods=["POST"]),
        Route("/audit", audit_page),
        Route("/events", events),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, ClientError: services_error},
    )
    app.add_middleware(SecurityHeaders)
    return app


def _header(request: Request, config: ConsoleConfig) -> str | None:
    assert config.identity_header
    value = request.headers.get(config.identity_header)
    return value.strip() if value and value.strip() else None


def _local(target: str | None) -> str:
    """Where to go after signing in: a path on this console only (never ``//elsewhere``)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/changes"


async def form_of(request: Request) -> dict[str, str]:
    """A url-encoded form, read up to ``MAX_FORM_BYTES`` and ``MAX_FORM_FIELDS``: the console's
    forms are a few short fields, and anything larger is refused unread."""
    cached: dict[str, str] | None = request.scope.get("form")
    if cached is not None:
        return cached
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise HTTPException(415, "send the form as application/x-www-form-urlencoded")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, f"a form may have at most {MAX_FORM_BYTES} bytes")
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPException(400, "the form could not be read") from exc
    form = dict(pairs)
    request.scope["form"] = form
    return form
