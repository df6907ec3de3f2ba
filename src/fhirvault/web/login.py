"""The browser side of the authorization server: /oauth2/authorize, the login pages, federated login
(/login/oidc/{name}), /logout.

Server-rendered HTML, no JavaScript, a strict CSP, ``Cache-Control: no-store``. A login in progress
is a *flow*, kept in memory (10 minutes) and bound to the browser by the ``fv_flow`` cookie; every
form carries the flow's CSRF token. Errors about the client or its redirect URI are shown here and
never redirected; later errors go back to the (verified) redirect URI with ``state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit, urlunsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from fhirvault.container import Container
from fhirvault.services.auth import AuthService, OAuthError, TokenError
from fhirvault.services.identity_types import ROLES, FederatedLogin, FederationError
from fhirvault.services.oauth_server import (
    AuthorizeError,
    AuthorizeRequest,
    OAuthServer,
    Session,
    session_id_for,
)
from fhirvault.services.repository import Repository, RequestContext
from fhirvault.services.users import (
    LOGIN_FAILED,
    MAX_PASSWORD,
    TOTP_KEY_NAME,
    LoginError,
    UserService,
    mfa_required,
)
from fhirvault.web.context import client_ip, request_id_of
from fhirvault.web.oauth import OAuthEndpoints, Throttle, base_url_for, read_form

log = logging.getLogger("fhirvault.login")
FLOW_COOKIE = "fv_flow"
SESSION_COOKIE = "fv_session"
_FLOW_TTL_S = 600
_MAX_FLOWS = 10_000
_HASH_CONCURRENCY = 2
_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    # No script, no style, no framing. No form-action: browsers apply it to the redirect to the app.
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass
class _Flow:
    id: str
    csrf: str
    req: AuthorizeRequest
    created: float
    stage: str = "login"  # login | totp | patient
    user_id: str | None = None
    amr: list[str] = field(default_factory=list)
    session: Session | None = None
    new_cookie: str | None = None  # session cookie to set with the final redirect
    federated: dict[str, str] | None = None
    provider: str | None = None


def _page(title: str, body: str, status: int = 200) -> Response:
    doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
           f'<meta name="viewport" content="width=device-width"></head><body><main><h1>{html.escape(title)}</h1>'
           f"{body}</main></body></html>")
    return Response(doc, status, _HEADERS, media_type="text/html")


def _hidden(flow: _Flow, step: str) -> str:
    return (f'<input type="hidden" name="flow" value="{html.escape(flow.id)}">'
            f'<input type="hidden" name="csrf" value="{html.escape(flow.csrf)}">'
            f'<input type="hidden" name="step" value="{step}">')


def with_params(uri: str, params: dict[str, str | None]) -> str:
    parts = urlsplit(uri)
    extra = urlencode({k: v for k, v in params.items() if v is not None})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


class LoginEndpoints:
    def __init__(self, server: OAuthServer, users: UserService, auth: AuthService, repo: Repository, *,
                 public_base_url: str | None, throttled: Throttle | None = None,
                 providers: Sequence[FederatedLogin] = (), auto_provision: bool = False,
                 secure_cookies: bool = False) -> None:
        self._server = server
        self._users = users
        self._auth = auth
        self._repo = repo
        self._public = public_base_url
        self._throttled = throttled
        self._providers = {p.name: p for p in providers}
        self._auto_provision = auto_provision
        self._secure = secure_cookies
        self._flows: OrderedDict[str, _Flow] = OrderedDict()
        self._hash_slots: asyncio.Semaphore | None = None

    # -- helpers -----------------------------------------------------------------------------
    def _ctx(self, request: Request) -> RequestContext:
        return RequestContext(None, request_id_of(request.scope), client_ip(request.scope))

    def _cookie(self, response: Response, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="lax",
                            secure=self._secure)

    def _new_flow(self, req: AuthorizeRequest) -> _Flow:
        now = time.monotonic()
        while self._flows:
            oldest = next(iter(self._flows.values()))
            if now - oldest.created < _FLOW_TTL_S and len(self._flows) < _MAX_FLOWS:
                break
            self._flows.popitem(last=False)
        flow = _Flow(secrets.token_urlsafe(24), secrets.token_urlsafe(24), req, now)
        self._flows[flow.id] = flow
        return flow

    def _flow_of(self, request: Request, form: dict[str, str] | None) -> _Flow | None:
        cookie = request.cookies.get(FLOW_COOKIE, "")
        flow = self._flows.get(cookie)
        if flow is None or time.monotonic() - flow.created > _FLOW_TTL_S:
            return None
        # A form post must name the same flow and carry its CSRF token.
        if form is not None and (form.get("flow") != flow.id
                                 or not hmac.compare_digest(form.get("csrf", "").encode(), flow.csrf.encode())):
            return None
        return flow

    @staticmethod
    def _error_page(message: str, status: int = 400) -> Response:
        return _page("Sign-in error", f"<p>{html.escape(message)}</p>", status)

    @staticmethod
    def _redirect_error(req: AuthorizeRequest, error: str, description: str) -> Response:
        target = with_params(req.redirect_uri, {"error": error, "error_description": description,
                                                "state": req.state})
        return RedirectResponse(target, 303, headers={"Cache-Control": "no-store"})

    def _login_form(self, flow: _Flow, message: str | None = None, status: int = 200) -> Response:
        note = f'<p role="alert">{html.escape(message)}</p>' if message else ""
        links = "".join(
            f'<p><a href="/login/oidc/{html.escape(name)}">Sign in with {html.escape(p.display_name)}</a></p>'
            for name, p in self._providers.items())
        body = (f"<p>{html.escape(flow.req.client_name)} asks to access your health data.</p>{note}"
                f'<form method="post" action="/oauth2/authorize">{_hidden(flow, "login")}'
                '<p><label>Username <input name="username" autocomplete="username" required></label></p>'
                '<p><label>Password <input name="password" type="password" autocomplete="current-password"'
                ' required></label></p><p><button type="submit">Sign in</button></p></form>' + links)
        response = _page("Sign in", body, status)
        self._cookie(response, FLOW_COOKIE, flow.id, _FLOW_TTL_S)
        return response

    def _totp_form(self, flow: _Flow, message: str | None = None, status: int = 200) -> Response:
        note = f'<p role="alert">{html.escape(message)}</p>' if message else ""
        body = (f"{note}<form method=\"post\" action=\"/oauth2/authorize\">{_hidden(flow, 'totp')}"
                '<p><label>Code from your authenticator app <input name="code" inputmode="numeric"'
                ' autocomplete="one-time-code" pattern="[0-9]{6}" required></label></p>'
                '<p><button type="submit">Verify</button></p></form>')
        return _page("Second factor", body, status)

    def _patient_form(self, flow: _Flow, message: str | None = None, status: int = 200) -> Response:
        note = f'<p role="alert">{html.escape(message)}</p>' if message else ""
        body = (f"<p>{html.escape(flow.req.client_name)} asks for one patient's record.</p>{note}"
                f'<form method="post" action="/oauth2/authorize">{_hidden(flow, "patient")}'
                '<p><label>Patient id <input name="patient" required></label></p>'
                '<p><button type="submit">Continue</button></p></form>')
        return _page("Choose a patient", body, status)

    # -- /oauth2/authorize -------------------------------------------------------------------
    async def authorize(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                form = await read_form(request)
            except OAuthError as exc:
                return self._error_page(exc.description)
            if "flow" in form:
                return await self._step(request, form)
            params = form
        else:
            items = request.query_params.multi_items()
            params = dict(items)
            if len(params) != len(items):
                return self._error_page("A parameter was repeated.")
        try:
            req = self._server.validate(params)
        except AuthorizeError as exc:
            if not exc.redirect:
                return self._error_page(exc.description)
            _client, _app, redirect_uri = self._server.client_and_redirect(params)
            target = with_params(redirect_uri, {"error": exc.error, "error_description": exc.description,
                                                "state": params.get("state")})
            return RedirectResponse(target, 303, headers={"Cache-Control": "no-store"})
        aud = params.get("aud")  # SMART: the FHIR base URL the app means to use (tokens are only for us)
        if aud is not None and aud.rstrip("/") != base_url_for(request, self._public) + "/fhir":
            return self._redirect_error(req, "invalid_request", "aud is not this server's FHIR base URL")
        flow = self._new_flow(req)
        session = await run_in_threadpool(self._server.session, request.cookies.get(SESSION_COOKIE))
        if session is not None:  # already signed in: single sign-on
            flow.session, flow.user_id = session, session.user.user_id
            return await self._continue(request, flow)
        return self._login_form(flow)

    async def _step(self, request: Request, form: dict[str, str]) -> Response:
        flow = self._flow_of(request, form)
        if flow is None:
            return self._error_page("This sign-in page has expired. Start again from the application.")
        step = form.get("step")
        if step != flow.stage:
            return self._error_page("Unexpected sign-in step. Start again from the application.")
        if step == "login":
            return await self._password(request, flow, form)
        if step == "totp":
            return await self._totp(request, flow, form.get("code", ""))
        chosen = self._server.valid_patient_id(form.get("patient", ""))
        if chosen is None:
            return self._patient_form(flow, "Enter a Patient id.", 400)
        return await self._continue(request, flow, chosen)

    async def _password(self, request: Request, flow: _Flow, form: dict[str, str]) -> Response:
        ctx = self._ctx(request)
        username = form.get("username", "")
        password = form.get("password", "")
        account = self._users.account_key(username)
        # Refuse a throttled source or locked account before any hashing (a flood then costs nothing).
        if self._throttled is not None and self._throttled(source_ip=ctx.source_ip, client_id=None, user=account):
            await self._repo.audit_event(ctx, "login", 429, "throttled", client_id=flow.req.client_id,
                                         category="security", user=account)
            return self._login_form(flow, LOGIN_FAILED, 429)
        if self._hash_slots is None:
            self._hash_slots = asyncio.Semaphore(_HASH_CONCURRENCY)
        try:
            async with self._hash_slots:
                user = await run_in_threadpool(self._users.check_password, username, password[:MAX_PASSWORD + 1])
        except LoginError as exc:
            await self._repo.audit_event(ctx, "login", 401, f"login failed: {exc.reason}",
                                         client_id=flow.req.client_id, category="security", user=account)
            return self._login_form(flow, str(exc), 401)
        flow.user_id = user.user_id
        flow.amr = ["pwd"]
        if mfa_required(user):
            if user.totp is None:
                await self._repo.audit_event(ctx, "login", 401, "login failed: no second factor enrolled",
                                             client_id=flow.req.client_id, category="security", user=user.user_id)
                return self._login_form(flow, "A second factor is required for your role but none is enrolled."
                                        " Ask an administrator.", 401)
            flow.stage = "totp"
            return self._totp_form(flow)
        return await self._signed_in(request, flow)

    async def _totp(self, request: Request, flow: _Flow, code: str) -> Response:
        ctx = self._ctx(request)
        assert flow.user_id is not None
        if self._throttled is not None and self._throttled(source_ip=ctx.source_ip, client_id=None,
                                                           user=flow.user_id):
            await self._repo.audit_event(ctx, "mfa", 429, "throttled", client_id=flow.req.client_id,
                                         category="security", user=flow.user_id)
            return self._totp_form(flow, "Too many attempts. Try again later.", 429)
        try:
            await run_in_threadpool(self._users.check_totp, flow.user_id, code[:16])
        except LoginError as exc:
            await self._repo.audit_event(ctx, "mfa", 401, f"second factor failed: {exc.reason}",
                                         client_id=flow.req.client_id, category="security", user=flow.user_id)
            return self._totp_form(flow, str(exc), 401)
        flow.amr = [*flow.amr, "otp", "mfa"]
        await self._repo.audit_event(ctx, "mfa", 200, "second factor accepted", client_id=flow.req.client_id,
                                     category="security", user=flow.user_id)
        return await self._signed_in(request, flow)

    async def _signed_in(self, request: Request, flow: _Flow) -> Response:
        assert flow.user_id is not None
        user = self._users.get(flow.user_id)
        if user is None or user.disabled:
            return self._error_page("This account cannot sign in.")
        await run_in_threadpool(self._users.login_succeeded, user.user_id)
        cookie, session = await run_in_threadpool(self._server.start_session, user, flow.amr)
        flow.session, flow.new_cookie = session, cookie
        await self._repo.audit_event(self._ctx(request), "login", 200, "login ({})".format(" ".join(flow.amr)),
                                     client_id=flow.req.client_id, category="security", user=user.user_id,
                                     role=user.role)
        return await self._continue(request, flow)

    async def _continue(self, request: Request, flow: _Flow, chosen: str | None = None) -> Response:
        session = flow.session
        assert session is not None
        try:
            scope = self._server.grant_scope(flow.req.scope, flow.req.client_id, session.user)
        except AuthorizeError as exc:
            self._flows.pop(flow.id, None)
            return self._finish(self._redirect_error(flow.req, exc.error, exc.description), flow)
        if self._server.needs_patient_choice(scope, session.user) and chosen is None:
            flow.stage = "patient"
            response = self._patient_form(flow)
            self._cookie(response, FLOW_COOKIE, flow.id, _FLOW_TTL_S)
            return self._finish(response, flow, keep_flow=True)
        patient = self._server.patient_context(scope, session.user, chosen)
        code = await run_in_threadpool(self._server.issue_code, flow.req, session, scope, patient)
        self._flows.pop(flow.id, None)
        target = with_params(flow.req.redirect_uri, {"code": code, "state": flow.req.state})
        return self._finish(RedirectResponse(target, 303, headers={"Cache-Control": "no-store"}), flow)

    def _finish(self, response: Response, flow: _Flow, keep_flow: bool = False) -> Response:
        if flow.new_cookie is not None:
            self._cookie(response, SESSION_COOKIE, flow.new_cookie, None)
            if not keep_flow:
                flow.new_cookie = None
        if not keep_flow:
            response.delete_cookie(FLOW_COOKIE, path="/")
        return response

    # -- federated login -------------------------------------------------------------------------
    def _callback_uri(self, request: Request, name: str) -> str:
        return f"{base_url_for(request, self._public)}/login/oidc/{name}/callback"

    async def federated_begin(self, request: Request) -> Response:
        provider = self._providers.get(request.path_params["name"])
        flow = self._flow_of(request, None)
        if provider is None or flow is None or flow.stage != "login":
            return self._error_page("This sign-in page has expired. Start again from the application.")
        try:
            url, saved = await provider.begin(self._callback_uri(request, provider.name))
        except FederationError as exc:
            return self._error_page(str(exc), 502)
        flow.federated, flow.provider = dict(saved), provider.name
        return RedirectResponse(url, 303, headers={"Cache-Control": "no-store"})

    async def federated_callback(self, request: Request) -> Response:
        ctx = self._ctx(request)
        provider = self._providers.get(request.path_params["name"])
        flow = self._flow_of(request, None)
        if provider is None or flow is None or flow.federated is None or flow.provider != provider.name:
            return self._error_page("This sign-in page has expired. Start again from the application.")
        saved, flow.federated = flow.federated, None  # one callback per begin
        try:
            identity = await provider.complete(dict(request.query_params), saved,
                                               self._callback_uri(request, provider.name))
        except FederationError as exc:
            await self._repo.audit_event(ctx, "login", 401, f"federated login failed ({provider.name})",
                                         client_id=flow.req.client_id, category="security")
            return self._login_form(flow, str(exc), 401)
        user = await run_in_threadpool(self._users.linked, identity.provider, identity.issuer, identity.subject)
        # A provider's own setting (OidcProvider.settings.auto_provision) wins over the global default.
        provider_settings = getattr(provider, "settings", None)
        auto = bool(getattr(provider_settings, "auto_provision", self._auto_provision))
        if user is None and auto and identity.role in ROLES:
            assert identity.role is not None
            user = await run_in_threadpool(self._users.provision, identity.provider, identity.issuer,
                                           identity.subject, identity.username, identity.role, identity.fhir_user,
                                           identity.organization)
        if user is None or user.disabled:
            await self._repo.audit_event(ctx, "login", 401, f"federated login: no linked account ({provider.name})",
                                         client_id=flow.req.client_id, category="security")
            return self._login_form(flow, "No account here is linked to this identity.", 401)
        flow.user_id = user.user_id
        flow.amr = ["fed", "mfa"] if identity.mfa else ["fed"]
        if mfa_required(user) and not identity.mfa:
            if user.totp is None:
                await self._repo.audit_event(ctx, "login", 401, "login failed: no second factor enrolled",
                                             client_id=flow.req.client_id, category="security", user=user.user_id)
                return self._login_form(flow, "A second factor is required for your role but none is enrolled.",
                                        401)
            flow.stage = "totp"
            return self._totp_form(flow)
        return await self._signed_in(request, flow)

    # -- logout ----------------------------------------------------------------------------------
    async def logout(self, request: Request) -> Response:
        """End the login session (cookie, or the ``sid`` of a bearer token) and revoke its tokens."""
        session_id: str | None = None
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie and len(cookie) <= 128:
            session_id = session_id_for(cookie)
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            with contextlib.suppress(TokenError):
                session_id = self._auth.verify(header[7:].strip()).session_id or session_id
        user = None
        if session_id is not None:
            user = await run_in_threadpool(self._server.end_session, session_id)
        if user is not None:
            await self._repo.audit_event(self._ctx(request), "logout", 200, "session ended, tokens revoked",
                                         category="security", user=user)
        response = _page("Signed out", "<p>You are signed out.</p>")
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response


@dataclass
class IdentityWeb:
    """Wiring of the people-facing authorization server, so app.py only adds routes."""

    server: OAuthServer
    users: UserService
    login: LoginEndpoints

    @classmethod
    def build(cls, container: Container, throttled: Throttle | None,
              providers: Sequence[FederatedLogin] | None = None, auto_provision: bool = False) -> IdentityWeb:
        s = container.settings
        users = UserService(container.store, container.clock, container.secrets.get(TOTP_KEY_NAME), tenant=s.tenant)
        server = OAuthServer(container.auth, container.store, container.clock,
                             session_idle_minutes=s.session_idle_minutes, session_max_hours=s.session_max_hours,
                             refresh_token_days=s.refresh_token_days)
        if providers is None:  # set by the federation module when providers are configured
            providers = tuple(getattr(container, "federated_logins", None) or ())
        secure = s.tls_cert is not None or (s.public_base_url or "").startswith("https://")
        login = LoginEndpoints(server, users, container.auth, container.repository,
                               public_base_url=s.public_base_url, throttled=throttled, providers=providers,
                               auto_provision=auto_provision, secure_cookies=secure)
        return cls(server, users, login)

    def routes(self, oauth: OAuthEndpoints) -> list[Route]:
        return [
            Route("/oauth2/authorize", self.login.authorize, methods=["GET", "POST"]),
            Route("/oauth2/revoke", oauth.revoke, methods=["POST"]),
            Route("/oauth2/introspect", oauth.introspect, methods=["POST"]),
            Route("/.well-known/openid-configuration", oauth.openid_configuration, methods=["GET"]),
            Route("/login/oidc/{name}", self.login.federated_begin, methods=["GET"]),
            Route("/login/oidc/{name}/callback", self.login.federated_callback, methods=["GET"]),
            Route("/logout", self.login.logout, methods=["POST"]),
        ]
