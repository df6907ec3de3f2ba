"""The operator console at /console: server-rendered pages for the security officer, the operator
and the data protection officer (docs/console.md).

Every page goes through ``_guard``: no session → the sign-in page; a role not allowed for the
section → 403 (audited); a POST without the session's CSRF token → 403. Deny by default: a
section not listed in ``SECTIONS`` is open to nobody. Every administrative action needs a reason,
and is written to the audit trail with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import orjson
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from fhirvault.domain import errors
from fhirvault.domain.scopes import Grants, ScopeError
from fhirvault.ports import UserRow
from fhirvault.services.access_reviews import (
    CLIENT,
    DECISIONS,
    REVOKE,
    USER,
    AccessReviews,
    ReviewError,
    last_uses,
)
from fhirvault.services.alerts import STATES
from fhirvault.services.auth import OAuthError, Principal
from fhirvault.services.health import database_probe
from fhirvault.services.identity_types import (
    AUDITOR,
    DPO,
    OPERATOR,
    PATIENT,
    PLATFORM_ADMIN,
    ROLES,
    SECURITY_OFFICER,
)
from fhirvault.services.metric_samples import HOUR_MS, Sample, Sampler, SampleStore, read_sample
from fhirvault.services.oauth_server import OAuthServer
from fhirvault.services.repository import RequestContext
from fhirvault.services.users import LoginError, UserError, UserService, mfa_required
from fhirvault.web.console import charts
from fhirvault.web.console.i18n import LANG_COOKIE, LANGUAGES, Translate, negotiate, translator
from fhirvault.web.console.session import (
    KEY_NAME,
    PATH,
    PENDING_COOKIE,
    PENDING_S,
    PRE_COOKIE,
    SESSION_COOKIE,
    Signer,
    new_pre_token,
    same,
)
from fhirvault.web.context import client_ip, request_id_of
from fhirvault.web.oauth import Throttle, read_form

if TYPE_CHECKING:
    from fhirvault.container import Container
    from fhirvault.services.detection import DetectionEngine

log = logging.getLogger("fhirvault.console")

SECURITY = frozenset({SECURITY_OFFICER})
OPERATIONS = frozenset({OPERATOR, PLATFORM_ADMIN})
PRIVACY = frozenset({DPO, AUDITOR})
# section -> (roles allowed, URL, catalogue key); the navigation shows a role its sections, in order.
SECTIONS: dict[str, tuple[frozenset[str], str, str]] = {
    "alerts": (SECURITY, "/console/alerts", "nav.alerts"),
    "break_glass": (SECURITY, "/console/break-glass", "nav.break_glass"),
    "reviews": (SECURITY, "/console/reviews", "nav.reviews"),
    "history": (SECURITY, "/console/access-history", "nav.history"),
    "health": (OPERATIONS, "/console/health", "nav.health"),
    "charts": (OPERATIONS, "/console/charts", "nav.charts"),
    "people": (OPERATIONS, "/console/people", "nav.people"),
    "backups": (OPERATIONS, "/console/backups", "nav.backups"),
    "dpo": (PRIVACY, "/console/dpo", "nav.dpo"),
}
CONSOLE_ROLES = SECURITY | OPERATIONS | PRIVACY
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
MIN_REASON, MAX_REASON = 3, 500
CHART_HOURS = (1, 6, 24, 168)
_PATIENT_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ID = re.compile(r"^[A-Za-z0-9\-_.]{1,64}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_CREATABLE_ROLES = tuple(r for r in ROLES if r != PATIENT)  # a patient account needs its Patient reference


def _when(ms: int | float | None) -> str:
    if not ms:
        return "—"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


class Viewer:
    """The signed-in person looking at a page."""

    def __init__(self, user: UserRow, session_id: str, csrf: str, lang: str, ctx: RequestContext) -> None:
        self.user = user
        self.session_id = session_id
        self.csrf = csrf
        self.lang = lang
        self.t: Translate = translator(lang)
        self.ctx = ctx

    def nav(self) -> list[tuple[str, str, str]]:
        return [(name, url, key) for name, (roles, url, key) in SECTIONS.items() if self.user.role in roles]


Handler = Callable[[Request, "Viewer", dict[str, str]], Awaitable[Response]]


class Console:
    def __init__(self, container: Container, server: OAuthServer, users: UserService,
                 detection: DetectionEngine | None, throttled: Throttle | None) -> None:
        s = container.settings
        self._c = container
        self._server = server
        self._users = users
        self._detection = detection
        self._throttled = throttled
        self._repo = container.repository
        self._tenant = s.tenant
        self._secure = s.tls_cert is not None or (s.public_base_url or "").startswith("https://")
        self._signer = Signer(container.secrets.get(KEY_NAME))
        self.reviews = AccessReviews(container.store, container.clock, tenant=s.tenant)
        self.samples = SampleStore(container.store)
        leadership = container.leadership
        self.sampler = Sampler(container.metrics, self.samples, container.clock,
                               leads=lambda: leadership is None or leadership.lead("metric-samples"))
        self._env = Environment(loader=PackageLoader("fhirvault.web.console", "templates"),
                                autoescape=select_autoescape(["html"]), undefined=StrictUndefined)
        self._env.filters["when"] = _when
        self._css = resources.files("fhirvault.web.console").joinpath("static/console.css").read_bytes()
        self._jobs_lock = threading.Lock()

    # -- responses -------------------------------------------------------------------------------
    def _render(self, name: str, viewer: Viewer | None, lang: str, status: int = 200, **values: Any) -> Response:
        t = viewer.t if viewer is not None else translator(lang)
        body = self._env.get_template(name).render(t=t, lang=lang, viewer=viewer, path=values.pop("path", PATH),
                                                   **values)
        return Response(body, status, HEADERS, media_type="text/html")

    def _error(self, viewer: Viewer, key: str, status: int = 400, detail: str | None = None) -> Response:
        return self._render("message.html", viewer, viewer.lang, status, title=viewer.t("error.title"),
                            message=viewer.t(key), detail=detail)

    def _cookie(self, response: Response, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, path=PATH, httponly=True, samesite="strict",
                            secure=self._secure)

    @staticmethod
    def _lang(request: Request) -> str:
        return negotiate(request.cookies.get(LANG_COOKIE), request.headers.get("accept-language"))

    def _ctx(self, request: Request, principal: Principal | None = None) -> RequestContext:
        return RequestContext(principal, request_id_of(request.scope), client_ip(request.scope))

    def _principal(self, user: UserRow, session_id: str) -> Principal:
        return Principal(client_id="console", tenant=self._tenant, scope="", grants=Grants(()),
                         expires_at=int(time.time()) + 900, token_id="console-" + session_id[:16], user=user.user_id,
                         role=user.role, fhir_user=user.fhir_user, organization=user.organization,
                         session_id=session_id, issued_at=int(time.time()))

    async def _viewer(self, request: Request) -> Viewer | None:
        cookie = request.cookies.get(SESSION_COOKIE)
        session = await run_in_threadpool(self._server.session, cookie) if cookie else None
        if session is None:
            return None
        sid = session.row.session_id
        ctx = self._ctx(request, self._principal(session.user, sid))
        return Viewer(session.user, sid, self._signer.csrf_for(sid), self._lang(request), ctx)

    # -- the guard every page goes through ---------------------------------------------------------
    def _guard(self, section: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        roles = SECTIONS[section][0]

        async def endpoint(request: Request) -> Response:
            viewer = await self._viewer(request)
            if viewer is None:
                if request.method == "GET":
                    return RedirectResponse("/console/login?" + urlencode({"next": request.url.path}), 303,
                                            {"Cache-Control": "no-store"})
                return self._render("message.html", None, self._lang(request), 401,
                                    title=translator(self._lang(request))("login.expired"), message="", detail=None)
            if viewer.user.role not in roles:
                await self._repo.audit_event(viewer.ctx, "console", 403, f"role {viewer.user.role} may not open"
                                             f" {section}", entity=f"console/{section}", category="security")
                return self._render("message.html", viewer, viewer.lang, 403, title=viewer.t("forbidden.title"),
                                    message=viewer.t("forbidden.text"), detail=None, path=request.url.path)
            form: dict[str, str] = {}
            if request.method == "POST":
                try:
                    form = await read_form(request)
                except OAuthError:
                    return self._error(viewer, "csrf.failed", 400)
                if not self._signer.csrf_ok(viewer.session_id, form.get("csrf")):
                    await self._repo.audit_event(viewer.ctx, "console", 403, "form without a valid CSRF token",
                                                 entity=f"console/{section}", category="security")
                    return self._error(viewer, "csrf.failed", 403)
            try:
                return await handler(request, viewer, form)
            except errors.OperationOutcomeError as exc:
                issue = exc.issues[0].diagnostics if exc.issues else None
                return self._error(viewer, "error.title", exc.status if exc.status < 500 else 400, issue)

        endpoint.__doc__ = (f"Operator console, {section} ({handler.__name__.strip('_')}): a console session of a "
                            f"{' or '.join(sorted(roles))}; forms need the session's CSRF token")
        return endpoint

    @staticmethod
    def _reason(form: dict[str, str]) -> str | None:
        reason = " ".join(form.get("reason", "").split())
        return reason if MIN_REASON <= len(reason) <= MAX_REASON else None

    async def _audit(self, viewer: Viewer, action: str, detail: str, reason: str, entity: str) -> None:
        await self._repo.audit_event(viewer.ctx, f"console.{action}", 200, f"{detail}; reason: {reason}",
                                     entity=entity, category="security")

    @staticmethod
    def _done(url: str) -> Response:
        return RedirectResponse(url + ("&" if "?" in url else "?") + "done=1", 303, {"Cache-Control": "no-store"})

    # -- sign-in -----------------------------------------------------------------------------------
    def _login_page(self, request: Request, message: str | None = None, status: int = 200,
                    totp: bool = False, pre: str | None = None) -> Response:
        lang = self._lang(request)
        token = pre or request.cookies.get(PRE_COOKIE) or new_pre_token()
        nxt = request.query_params.get("next", "")
        response = self._render("totp.html" if totp else "login.html", None, lang, status, csrf=token,
                                message=translator(lang)(message) if message else None,
                                next=nxt if nxt.startswith("/console/") else "")
        self._cookie(response, PRE_COOKIE, token, PENDING_S * 2)
        return response

    async def sign_in(self, request: Request) -> Response:
        """The console's sign-in form (GET) and its password step (POST)."""
        return await (self.login(request) if request.method == "POST" else self.login_page(request))

    async def login_page(self, request: Request) -> Response:
        if await self._viewer(request) is not None:
            return RedirectResponse("/console", 303, {"Cache-Control": "no-store"})
        return self._login_page(request, pre=new_pre_token())

    async def login(self, request: Request) -> Response:
        try:
            form = await read_form(request)
        except OAuthError:
            return self._login_page(request, "login.expired", 400)
        if not same(form.get("csrf"), request.cookies.get(PRE_COOKIE)):
            return self._login_page(request, "login.expired", 403, pre=new_pre_token())
        ctx = self._ctx(request)
        username = form.get("username", "")
        account = self._users.account_key(username)
        if self._throttled is not None and self._throttled(source_ip=ctx.source_ip, client_id=None, user=account):
            await self._repo.audit_event(ctx, "login", 429, "console: throttled", category="security", user=account)
            return self._login_page(request, "login.failed", 429)
        try:
            user = await run_in_threadpool(self._users.check_password, username, form.get("password", "")[:1025])
        except LoginError as exc:
            await self._repo.audit_event(ctx, "login", 401, f"console login failed: {exc.reason}",
                                         category="security", user=account)
            return self._login_page(request, "login.failed", 401)
        if user.role not in CONSOLE_ROLES:
            await self._repo.audit_event(ctx, "login", 403, "console login refused: no console role",
                                         category="security", user=user.user_id, role=user.role)
            return self._login_page(request, "login.no_console", 403)
        if not mfa_required(user) or user.totp is None:  # every console role needs a second factor
            await self._repo.audit_event(ctx, "login", 401, "console login failed: no second factor enrolled",
                                         category="security", user=user.user_id)
            return self._login_page(request, "login.no_totp", 401)
        response = self._login_page(request, totp=True)
        self._cookie(response, PENDING_COOKIE, self._signer.pending(user.user_id), PENDING_S)
        return response

    async def login_totp(self, request: Request) -> Response:
        try:
            form = await read_form(request)
        except OAuthError:
            return self._login_page(request, "login.expired", 400)
        user_id = self._signer.pending_user(request.cookies.get(PENDING_COOKIE))
        if not same(form.get("csrf"), request.cookies.get(PRE_COOKIE)) or user_id is None:
            return self._login_page(request, "login.expired", 403, pre=new_pre_token())
        ctx = self._ctx(request)
        if self._throttled is not None and self._throttled(source_ip=ctx.source_ip, client_id=None, user=user_id):
            await self._repo.audit_event(ctx, "mfa", 429, "console: throttled", category="security", user=user_id)
            return self._login_page(request, "totp.failed", 429, totp=True)
        try:
            await run_in_threadpool(self._users.check_totp, user_id, form.get("code", "")[:16])
        except LoginError as exc:
            await self._repo.audit_event(ctx, "mfa", 401, f"console second factor failed: {exc.reason}",
                                         category="security", user=user_id)
            return self._login_page(request, "totp.failed", 401, totp=True)
        user = self._users.get(user_id)
        if user is None or user.disabled or user.role not in CONSOLE_ROLES:
            return self._login_page(request, "login.failed", 401)
        await run_in_threadpool(self._users.login_succeeded, user_id)
        cookie, _session = await run_in_threadpool(self._server.start_session, user, ["pwd", "otp", "mfa"])
        await self._repo.audit_event(ctx, "login", 200, "console login (pwd otp mfa)", category="security",
                                     user=user.user_id, role=user.role)
        nxt = form.get("next", "")
        target = nxt if nxt.startswith("/console/") and "//" not in nxt else "/console"
        response = RedirectResponse(target, 303, {"Cache-Control": "no-store"})
        self._cookie(response, SESSION_COOKIE, cookie, None)
        response.delete_cookie(PENDING_COOKIE, path=PATH)
        response.delete_cookie(PRE_COOKIE, path=PATH)
        return response

    async def logout(self, request: Request) -> Response:
        viewer = await self._viewer(request)
        lang = self._lang(request)
        if viewer is not None:
            try:
                form = await read_form(request)
            except OAuthError:
                form = {}
            if not self._signer.csrf_ok(viewer.session_id, form.get("csrf")):
                return self._error(viewer, "csrf.failed", 403)
            await run_in_threadpool(self._server.end_session, viewer.session_id)
            await self._repo.audit_event(viewer.ctx, "logout", 200, "console session ended", category="security",
                                         user=viewer.user.user_id)
        response = self._render("message.html", None, lang, 200, title=translator(lang)("logged_out"), message="",
                                detail=None, link="/console/login")
        response.delete_cookie(SESSION_COOKIE, path=PATH)
        return response

    async def home(self, request: Request) -> Response:
        viewer = await self._viewer(request)
        if viewer is None:
            return RedirectResponse("/console/login", 303, {"Cache-Control": "no-store"})
        nav = viewer.nav()
        if not nav:
            return self._render("message.html", viewer, viewer.lang, 403, title=viewer.t("forbidden.title"),
                                message=viewer.t("forbidden.text"), detail=None)
        return RedirectResponse(nav[0][1], 303, {"Cache-Control": "no-store"})

    async def language(self, request: Request) -> Response:
        code = request.path_params["code"]
        nxt = request.query_params.get("next", "/console")
        target = nxt if nxt.startswith("/console") and "//" not in nxt and "\\" not in nxt else "/console"
        response = RedirectResponse(target, 303, {"Cache-Control": "no-store"})
        if code in LANGUAGES:
            response.set_cookie(LANG_COOKIE, code, max_age=365 * 86400, path=PATH, samesite="strict",
                                secure=self._secure)
        return response

    async def stylesheet(self, request: Request) -> Response:
        return Response(self._css, 200, {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
                        media_type="text/css")

    # -- security officer: alerts ---------------------------------------------------------------------
    async def alerts(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        state = request.query_params.get("state", "open")
        state = state if state in STATES else "open"
        service = self._c.alerts
        found = await asyncio.to_thread(service.list, state=state, limit=200) if service is not None else []
        return self._render("alerts.html", viewer, viewer.lang, alerts=found, state=state, states=STATES,
                            done="done" in request.query_params, path=request.url.path)

    async def alert_action(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        op, alert_id = request.path_params["op"], request.path_params["alert_id"]
        reason = self._reason(form)
        if reason is None:
            return self._error(viewer, "reason.required")
        service = self._c.alerts
        if service is None or op not in ("acknowledge", "close", "incident") or not _ID.match(alert_id):
            return self._error(viewer, "notfound", 404)
        if op == "incident":  # into the incident register (services/registers.py audits it with the reason)
            from fhirvault.services.registers import RegisterError, RegisterService

            try:
                await asyncio.to_thread(RegisterService(self._c).open_incident, actor=viewer.user.user_id,
                                        reason=reason, alert_id=alert_id)
            except RegisterError as exc:
                return self._error(viewer, "error.title", 409, str(exc))
            return self._done(f"/console/alerts?state={request.query_params.get('state', 'open')}")
        act = service.acknowledge if op == "acknowledge" else service.close_alert
        updated = await asyncio.to_thread(act, alert_id, viewer.user.user_id, reason)
        if updated is None:
            return self._error(viewer, "notfound", 404)
        await self._audit(viewer, f"alert-{op}", f"alert {alert_id} ({updated.rule}) {updated.state}", reason,
                          f"alert/{alert_id}")
        return self._done("/console/alerts")

    # -- security officer: break-the-glass -------------------------------------------------------------
    async def break_glass(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        pending = await self._repo.break_glass_queue(viewer.ctx, "open")
        closed = (await self._repo.break_glass_queue(viewer.ctx, "closed"))[:50]
        return self._render("break_glass.html", viewer, viewer.lang, pending=pending, closed=closed,
                            done="done" in request.query_params, path=request.url.path)

    async def break_glass_review(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        reason = self._reason(form)
        if reason is None:
            return self._error(viewer, "reason.required")
        await self._repo.review_break_glass(viewer.ctx, request.path_params["grant_id"], form.get("decision"), reason)
        return self._done("/console/break-glass")

    # -- security officer: access reviews -------------------------------------------------------------
    async def reviews_any(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        if request.method == "POST":
            return await self.review_start(request, viewer, form)
        return await self.reviews_page(request, viewer, form)

    async def reviews_page(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        campaigns = await asyncio.to_thread(self.reviews.campaigns)
        now = self._c.clock.now_ms()
        default_due = datetime.fromtimestamp(now / 1000 + 30 * 86400, UTC).strftime("%Y-%m-%d")
        return self._render("reviews.html", viewer, viewer.lang, campaigns=campaigns, now=now,
                            default_due=default_due, done="done" in request.query_params, path=request.url.path)

    async def review_start(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        reason = self._reason(form)
        if reason is None:
            return self._error(viewer, "reason.required")
        due = form.get("due", "")
        if not _DATE.match(due):
            return self._error(viewer, "error.title", 400, "due: YYYY-MM-DD")
        try:
            due_ms = int(datetime.strptime(due, "%Y-%m-%d").replace(tzinfo=UTC).timestamp() * 1000) + 86_399_999
        except ValueError:
            return self._error(viewer, "error.title", 400, "due: YYYY-MM-DD")
        c = self._c
        used = await asyncio.to_thread(last_uses, c.store, c.audit, self._tenant)
        try:
            campaign = await asyncio.to_thread(self.reviews.open_campaign, form.get("name", ""), due_ms,
                                               viewer.user.user_id, used)
        except ReviewError as exc:
            return self._error(viewer, "error.title", 400, str(exc))
        await self._audit(viewer, "access-review-start", f"campaign {campaign.campaign_id} '{campaign.name}' due {due}"
                          f" ({len(campaign.items)} accounts and clients)", reason,
                          f"access-review/{campaign.campaign_id}")
        return RedirectResponse(f"/console/reviews/{campaign.campaign_id}", 303, {"Cache-Control": "no-store"})

    async def review_page(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        campaign = await asyncio.to_thread(self.reviews.get, request.path_params["campaign_id"])
        if campaign is None:
            return self._error(viewer, "notfound", 404)
        return self._render("review.html", viewer, viewer.lang, campaign=campaign, now=self._c.clock.now_ms(),
                            done="done" in request.query_params, path=request.url.path)

    async def review_decide(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        reason = self._reason(form)
        if reason is None:
            return self._error(viewer, "reason.required")
        campaign_id = request.path_params["campaign_id"]
        kind, subject, decision = form.get("kind", ""), form.get("subject", ""), form.get("decision", "")
        if kind not in (USER, CLIENT) or decision not in DECISIONS or not _ID.match(subject):
            return self._error(viewer, "error.title", 400, "kind, subject and decision (keep or revoke) are required")
        if decision == REVOKE and kind == USER and subject == viewer.user.user_id:
            return self._error(viewer, "error.title", 400, "you cannot revoke your own account")
        try:
            _campaign, item = await asyncio.to_thread(self.reviews.decide, campaign_id, kind, subject, decision,
                                                      reason, viewer.user.user_id)
        except ReviewError as exc:
            return self._error(viewer, "error.title", 409, str(exc))
        if decision == REVOKE:
            await asyncio.to_thread(self._revoke, kind, subject)
        await self._audit(viewer, "access-review-decision", f"campaign {campaign_id}: {kind} {subject} ({item.label})"
                          f" {decision}", reason, f"{kind}/{subject}")
        return self._done(f"/console/reviews/{campaign_id}")

    def _revoke(self, kind: str, subject: str) -> None:
        if kind == USER:
            user = self._c.store.user(subject)
            if user is not None and not user.disabled:
                self._users.set_disabled(user.username, True)
        else:
            with contextlib.suppress(KeyError):
                self._c.auth.set_client_disabled(subject, True)

    # -- security officer: a patient's access history -------------------------------------------------
    async def history(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        pid = request.query_params.get("patient", "").strip()
        entries: list[dict[str, Any]] = []
        if pid:
            if not _PATIENT_ID.match(pid):
                return self._error(viewer, "error.title", 400, "Patient id: letters, digits, - and . (64 at most)")
            _query, page = await self._c.audit_reader.access_history(viewer.ctx, pid, [], count=100)
            entries = [record for _seq, record in page.entries]
        return self._render("history.html", viewer, viewer.lang, patient=pid, entries=entries, path=request.url.path)

    # -- operator: health and charts ------------------------------------------------------------------
    async def health(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        c = self._c
        try:
            await c.store.write("health.ready", database_probe)
            database = "ok"
        except Exception:
            database = "failed"
        try:
            keys = "ok" if c.keys.kek_version >= 1 else "failed"
        except ValueError:
            keys = "failed"
        verified = c.health.audit_verified
        audit = "ok" if verified is True else "pending" if verified is None else "failed"
        sample = read_sample(c.metrics, c.clock.now_ms())
        open_alerts = sum(c.alerts.open_counts().values()) if c.alerts is not None else 0
        checkpoint = c.metrics.audit_checkpoint_at
        rows = [
            ("health.database", database, None), ("health.keys", keys, None),
            ("health.audit", audit, c.health.audit_failure),
            ("health.backup", None, _age(sample.values.get("backup_age_s"))),
            ("health.replication", None, _seconds(sample.values.get("replication_lag_s"))),
            ("health.checkpoint", None, _when(checkpoint * 1000) if checkpoint else None),
            ("health.alerts", None, str(open_alerts)),
        ]
        return self._render("health.html", viewer, viewer.lang, rows=rows, path=request.url.path)

    async def charts_page(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        try:
            hours = int(request.query_params.get("hours", "24"))
        except ValueError:
            hours = 24
        hours = hours if hours in CHART_HOURS else 24
        c = self._c
        now = c.clock.now_ms()
        since = now - hours * HOUR_MS
        samples: list[Sample] = await asyncio.to_thread(self.samples.since, since, now)
        samples.append(read_sample(c.metrics, now))  # the live point, not stored
        t = viewer.t
        described = t("charts.range", low="{low}", high="{high}", n="{n}")
        series = [
            ("requests", "charts.requests", charts.rates(samples, "requests")),
            ("refusals", "charts.refusals", charts.rates(samples, "refusals")),
            ("latency", "charts.latency", charts.mean_latency_ms(samples)),
            ("alerts", "charts.alerts", charts.gauge(samples, "alerts_open")),
            ("backup-age", "charts.backup_age", charts.gauge(samples, "backup_age_s")),
            ("replication-lag", "charts.replication_lag", charts.gauge(samples, "replication_lag_s")),
            ("audit", "charts.audit", charts.gauge(samples, "audit_verified")),
        ]
        drills = [d for d in await asyncio.to_thread(self._drill_reports) if d["started_ms"] >= since]
        series += [
            ("drill-rpo", "charts.drill_rpo", [(d["started_ms"], d["rpo_seconds"]) for d in drills if d["ok"]]),
            ("drill-rto", "charts.drill_rto", [(d["started_ms"], d["rto_seconds"]) for d in drills if d["ok"]]),
        ]
        svgs = [charts.line_chart(f"chart-{cid}", t(key), points, since, now, no_data=t("charts.no_data"),
                                  described=described) for cid, key, points in series]
        return self._render("charts.html", viewer, viewer.lang, charts=svgs, hours=hours, choices=CHART_HOURS,
                            path=request.url.path)

    def _drill_reports(self) -> list[dict[str, Any]]:
        """The drill reports the server (or `dr drill --report-dir`) wrote in data_dir/dr-drills, oldest first."""
        folder = self._c.settings.data_dir / "dr-drills"
        reports: list[dict[str, Any]] = []
        for path in sorted(folder.glob("dr-drill-*.json"))[-100:] if folder.is_dir() else []:
            try:
                doc = orjson.loads(path.read_bytes())
                started = datetime.strptime(path.stem[len("dr-drill-"):], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
                reports.append({"name": path.name, "started_ms": int(started.timestamp() * 1000),
                                "ok": bool(doc.get("ok")), "rpo_seconds": float(doc.get("rpo_seconds") or 0),
                                "rto_seconds": float(doc.get("rto_seconds") or 0), "backup_id": doc.get("backup_id"),
                                "problems": [str(p) for p in doc.get("problems") or []][:3]})
            except (OSError, ValueError, TypeError):
                continue
        return reports

    # -- operator: users and clients -----------------------------------------------------------------
    async def people(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        store = self._c.store
        users = sorted(await asyncio.to_thread(store.users, self._tenant), key=lambda u: u.username)
        clients = sorted(await asyncio.to_thread(store.clients, self._tenant), key=lambda c: c.name)
        return self._render("people.html", viewer, viewer.lang, users=users, clients=clients, roles=_CREATABLE_ROLES,
                            done="done" in request.query_params, path=request.url.path)

    async def user_create(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        reason = self._reason(form)
        if reason is None:
            return self._error(viewer, "reason.required")
        role = form.get("role", "")
        if role not in _CREATABLE_ROLES:
            return self._error(viewer, "error.title", 400, "unknown role")
        password = secrets.token_urlsafe(18)
        try:
            created = await asyncio.to_thread(self._users.create, form.get("username", ""), role, password)
        except UserError as exc:
            return self._error(viewer, "error.title", 400, str(exc))
        user = created.user
        await self._audit(viewer, "user-create", f"user {user.user_id} ({user.username}) created with role {role}",
                          reason, f"user/{user.user_id}")
        shown = [("secret.password", password)] + ([("secret.totp", created.totp_uri)] if created.totp_uri else [])
        return self._render("secret.html", viewer, viewer.lang, subject=user.username, shown=shown,
                            back="/console/people")

    async def user_action(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        reason = self._reason(form)
        if reason is None:
            return self._error(viewer, "reason.required")
        op, user_id = request.path_params["op"], request.path_params["user_id"]
        user = await asyncio.to_thread(self._c.store.user, user_id) if _ID.match(user_id) else None
        if user is None or user.tenant != self._tenant or op not in ("disable", "enable"):
            return self._error(viewer, "notfound", 404)
        if user.user_id == viewer.user.user_id:
            return self._error(viewer, "error.title", 400, "you cannot change your own account here")
        ended = await asyncio.to_thread(self._users.set_disabled, user.username, op == "disable")
        await self._audit(viewer, f"user-{op}", f"user {user.user_id} ({user.username}) {op}d"
                          + (f", {ended} sessions ended" if ended else ""), reason, f"user/{user.user_id}")
        return self._done("/console/people")

    async def client_create(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        reason = self._reason(form)
        if reason is None:
            return self._error(viewer, "reason.required")
        name = " ".join(form.get("name", "").split())
        if not 1 <= len(name) <= 120:
            return self._error(viewer, "error.title", 400, "name: 1 to 120 characters")
        try:
            new = await asyncio.to_thread(self._c.auth.register_client, name, form.get("scope", "").strip())
        except ScopeError as exc:
            return self._error(viewer, "error.title", 400, str(exc))
        await self._audit(viewer, "client-create", f"client {new.client_id} ({name}) registered with {new.scope}",
                          reason, f"client/{new.client_id}")
        shown = [("secret.client_id", new.client_id), ("secret.client_secret", new.client_secret or "")]
        return self._render("secret.html", viewer, viewer.lang, subject=name, shown=shown, back="/console/people")

    async def client_action(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        reason = self._reason(form)
        if reason is None:
            return self._error(viewer, "reason.required")
        op, client_id = request.path_params["op"], request.path_params["client_id"]
        client = await asyncio.to_thread(self._c.store.client, client_id) if _ID.match(client_id) else None
        if client is None or client.tenant != self._tenant or op not in ("disable", "enable", "rotate"):
            return self._error(viewer, "notfound", 404)
        auth = self._c.auth
        if op == "rotate":
            try:
                secret = await asyncio.to_thread(auth.rotate_client_secret, client_id)
            except ValueError as exc:
                return self._error(viewer, "error.title", 400, str(exc))
            await asyncio.to_thread(self._follow_admin_file, client_id, secret)
            await self._audit(viewer, "client-rotate-secret", f"client {client_id}: secret rotated", reason,
                              f"client/{client_id}")
            return self._render("secret.html", viewer, viewer.lang, subject=client.name,
                                shown=[("secret.client_id", client_id), ("secret.client_secret", secret)],
                                back="/console/people")
        await asyncio.to_thread(auth.set_client_disabled, client_id, op == "disable")
        await self._audit(viewer, f"client-{op}", f"client {client_id} ({client.name}) {op}d", reason,
                          f"client/{client_id}")
        return self._done("/console/people")

    def _follow_admin_file(self, client_id: str, secret: str) -> None:
        """Like `fhirvault client rotate-secret`: the data directory's admin-client.json follows a rotation of the
        admin client's secret (else it would hold a dead secret)."""
        from fhirvault.adapters.keyfile import write_private_file
        from fhirvault.bootstrap import ADMIN_CLIENT_FILE

        path = self._c.settings.data_dir / ADMIN_CLIENT_FILE
        try:
            current = orjson.loads(path.read_bytes())
        except (OSError, ValueError):
            return
        if isinstance(current, dict) and current.get("client_id") == client_id:
            current["client_secret"] = secret
            write_private_file(path, orjson.dumps(current, option=orjson.OPT_INDENT_2) + b"\n")

    # -- operator: backups and drills -----------------------------------------------------------------
    async def backups(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        settings = self._c.settings.backup
        listed: list[dict[str, Any]] = []
        problem = None
        if settings is not None:
            try:
                listed = await asyncio.to_thread(self._list_backups)
            except Exception as exc:  # an unreachable target is shown, not a 500
                problem = f"{type(exc).__name__}: {str(exc)[:200]}"
        drills = list(reversed(await asyncio.to_thread(self._drill_reports)))[:30]
        return self._render("backups.html", viewer, viewer.lang, configured=settings is not None, backups=listed,
                            drills=drills, problem=problem, done=request.query_params.get("done"),
                            path=request.url.path)

    def _list_backups(self) -> list[dict[str, Any]]:
        from fhirvault.backup.engine import list_backups
        from fhirvault.backup.targets import open_target

        settings = self._c.settings.backup
        assert settings is not None
        listing = list_backups(open_target("", settings))
        return [{"id": m.backup_id, "created": m.created_ms} for m in reversed(listing.manifests[-50:])]

    def _scheduler(self) -> Any:
        from fhirvault.backup.scheduler import BackupScheduler

        settings = self._c.settings.backup
        assert settings is not None and self._detection is not None
        return BackupScheduler(self._c, self._detection, settings)

    async def backup_run(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        reason = self._reason(form)
        if reason is None:
            return self._error(viewer, "reason.required")
        if self._c.settings.backup is None or self._detection is None:
            return self._error(viewer, "backups.none", 409)
        op = request.path_params["op"]
        if op not in ("backup", "drill"):
            return self._error(viewer, "notfound", 404)
        await self._audit(viewer, f"{op}-run", f"{op} started from the console", reason, op)
        scheduler = self._scheduler()
        if op == "backup":
            if not self._jobs_lock.acquire(blocking=False):
                return self._error(viewer, "error.title", 409, "a backup or drill started here is still running")
            try:
                ok = await asyncio.to_thread(scheduler.run_once)
            finally:
                self._jobs_lock.release()
            return RedirectResponse(f"/console/backups?done={'ok' if ok else 'failed'}", 303,
                                    {"Cache-Control": "no-store"})
        if not self._jobs_lock.acquire(blocking=False):
            return self._error(viewer, "error.title", 409, "a backup or drill started here is still running")

        def drill() -> None:
            try:
                scheduler.drill_once()
            finally:
                self._jobs_lock.release()

        threading.Thread(target=drill, name="fhirvault-console-drill", daemon=True).start()
        return RedirectResponse("/console/backups?done=started", 303, {"Cache-Control": "no-store"})

    # -- DPO / auditor ----------------------------------------------------------------------------------
    async def dpo(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        """The compliance report (controls, status, evidence), the record of processing, the actors register and
        the incident and data-subject request registers (services/compliance_report.py, services/registers.py)."""
        from fhirvault.services.compliance_report import build_report
        from fhirvault.services.registers import (
            RegisterService,
            actors_register,
            record_of_processing,
        )

        c = self._c

        def gather() -> dict[str, Any]:
            registers = RegisterService(c)
            now = c.clock.now_ms()
            return {"report": build_report(c), "processing": record_of_processing(c), "actors": actors_register(c),
                    "incidents": [i.to_json(now) for i in registers.incidents()],
                    "requests": [r.to_json(now) for r in registers.requests()]}

        found = await asyncio.to_thread(gather)
        await self._repo.audit_event(viewer.ctx, "console.registers-read", 200, f"compliance report and registers"
                                     f" read ({len(found['incidents'])} incidents, {len(found['requests'])}"
                                     " data-subject requests)", entity="registers", category="security")
        return self._render("dpo.html", viewer, viewer.lang, path=request.url.path, **found)

    async def dpo_report(self, request: Request, viewer: Viewer, form: dict[str, str]) -> Response:
        """The compliance report as a file: ``fmt`` pdf or html, in the console's language."""
        from fhirvault.services.compliance_report import (
            build_report,
            render_html,
            render_pdf,
            report_filename,
        )

        fmt = request.path_params["fmt"]
        if fmt not in ("pdf", "html"):
            return self._error(viewer, "notfound", 404)
        report = await asyncio.to_thread(build_report, self._c)
        body: bytes = await asyncio.to_thread(render_pdf, report, viewer.lang) if fmt == "pdf" else \
            render_html(report, viewer.lang).encode()
        await self._repo.audit_event(viewer.ctx, "console.compliance-report", 200, f"compliance report ({fmt},"
                                     f" {viewer.lang}) downloaded", entity="compliance-report", category="security")
        headers = {**HEADERS, "Content-Disposition": f'attachment; filename="{report_filename(report, fmt)}"'}
        return Response(body, 200, headers, media_type="application/pdf" if fmt == "pdf" else "text/html")

    # -- wiring -----------------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        g = self._guard
        return [
            Route("/console", self.home, methods=["GET"]),
            Route("/console/login", self.sign_in, methods=["GET", "POST"]),
            Route("/console/login/totp", self.login_totp, methods=["POST"]),
            Route("/console/logout", self.logout, methods=["POST"]),
            Route("/console/lang/{code}", self.language, methods=["GET"]),
            Route("/console/static/console.css", self.stylesheet, methods=["GET"]),
            Route("/console/alerts", g("alerts", self.alerts), methods=["GET"]),
            Route("/console/alerts/{alert_id}/{op}", g("alerts", self.alert_action), methods=["POST"]),
            Route("/console/break-glass", g("break_glass", self.break_glass), methods=["GET"]),
            Route("/console/break-glass/{grant_id}/review", g("break_glass", self.break_glass_review),
                  methods=["POST"]),
            Route("/console/reviews", g("reviews", self.reviews_any), methods=["GET", "POST"]),
            Route("/console/reviews/{campaign_id}", g("reviews", self.review_page), methods=["GET"]),
            Route("/console/reviews/{campaign_id}/decide", g("reviews", self.review_decide), methods=["POST"]),
            Route("/console/access-history", g("history", self.history), methods=["GET"]),
            Route("/console/health", g("health", self.health), methods=["GET"]),
            Route("/console/charts", g("charts", self.charts_page), methods=["GET"]),
            Route("/console/people", g("people", self.people), methods=["GET"]),
            Route("/console/users", g("people", self.user_create), methods=["POST"]),
            Route("/console/users/{user_id}/{op}", g("people", self.user_action), methods=["POST"]),
            Route("/console/clients", g("people", self.client_create), methods=["POST"]),
            Route("/console/clients/{client_id}/{op}", g("people", self.client_action), methods=["POST"]),
            Route("/console/backups", g("backups", self.backups), methods=["GET"]),
            Route("/console/backups/{op}", g("backups", self.backup_run), methods=["POST"]),
            Route("/console/dpo", g("dpo", self.dpo), methods=["GET"]),
            Route("/console/dpo/report.{fmt}", g("dpo", self.dpo_report), methods=["GET"]),
        ]




def _age(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return _seconds(seconds)


def _seconds(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

