"""Authorization server for people: login sessions, authorization codes with PKCE, refresh tokens.

* Authorization codes: 60 s, single use, bound to the client, the redirect URI and a PKCE S256
  challenge. Presenting a used code again revokes every token issued from it (its family).
* Refresh tokens rotate: each use returns a new one; presenting a rotated one again revokes the
  whole family. A refresh may narrow the scope, never widen it. Online tokens (``online_access``)
  die with their login session; ``offline_access`` ones after ``refresh_token_days``; all die at
  logout.
* Login sessions: a random cookie whose SHA-256 is the session id (the tokens' ``sid``); they end
  after ``session_idle_minutes`` without use, ``session_max_hours`` after login, or at logout.
* Only hashes of codes, refresh tokens and session cookies are stored.

Methods block (store writes, Argon2): web handlers call them from a worker thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from fhirvault.domain.scopes import ResourceScope, ScopeError, narrow, parse_scope, parse_scopes
from fhirvault.ports import (
    AppRow,
    AuthCodeRow,
    ClientRow,
    Clock,
    LoginSessionRow,
    RefreshTokenRow,
    ResourceStore,
    UserRow,
    WriteTx,
)
from fhirvault.services.auth import APP_SCOPES, AuthService, OAuthError
from fhirvault.services.identity_types import PATIENT

CODE_TTL_MS = 60_000
_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
_CHALLENGE = re.compile(r"^[A-Za-z0-9\-_]{43}$")  # base64url(SHA-256), unpadded
_PATIENT_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_MAX_PARAM = 2048


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def session_id_for(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


class AuthorizeError(Exception):
    """An authorization request is refused. ``redirect``: may the error go back to the client's
    redirect URI (only once client and URI are known to match), or must it be shown here."""

    def __init__(self, error: str, description: str, *, redirect: bool) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.redirect = redirect


@dataclass(frozen=True, slots=True)
class AuthorizeRequest:
    client_id: str
    client_name: str
    redirect_uri: str
    scope: str  # as requested
    state: str | None
    code_challenge: str
    nonce: str | None


@dataclass(frozen=True, slots=True)
class Session:
    row: LoginSessionRow
    user: UserRow


@dataclass(frozen=True, slots=True)
class TokenResult:
    response: dict[str, Any]
    user_id: str
    client_id: str


class GrantFailure(Exception):
    """Token request refused; ``event`` names a security event to audit besides (code-replay…)."""

    def __init__(self, error: OAuthError, event: str | None = None, user_id: str | None = None,
                 revoked: int = 0) -> None:
        super().__init__(error.description)
        self.error = error
        self.event = event
        self.user_id = user_id
        self.revoked = revoked


class OAuthServer:
    def __init__(self, auth: AuthService, store: ResourceStore, clock: Clock, *, session_idle_minutes: int,
                 session_max_hours: int, refresh_token_days: int) -> None:
        self._auth = auth
        self._store = store
        self._clock = clock
        self._idle_ms = session_idle_minutes * 60_000
        self._max_ms = session_max_hours * 3_600_000
        self._refresh_ms = refresh_token_days * 86_400_000

    # -- authorization request ---------------------------------------------------------
    def client_and_redirect(self, params: dict[str, str]) -> tuple[ClientRow, AppRow, str]:
        """Client and exact redirect URI, or AuthorizeError(redirect=False): never redirect to an
        unverified URI."""
        client_id = params.get("client_id", "")
        client = self._store.client(client_id) if 0 < len(client_id) <= 128 else None
        app = self._store.app(client_id) if client is not None else None
        if client is None or app is None or client.disabled:
            raise AuthorizeError("invalid_client", "Unknown client.", redirect=False)
        redirect_uri = params.get("redirect_uri")
        if redirect_uri is None and len(app.redirect_uris) == 1:
            redirect_uri = app.redirect_uris[0]
        if redirect_uri is None or redirect_uri not in app.redirect_uris:
            raise AuthorizeError("invalid_request", "The redirect URI is not registered for this client.",
                                 redirect=False)
        return client, app, redirect_uri

    def validate(self, params: dict[str, str]) -> AuthorizeRequest:
        client, _app, redirect_uri = self.client_and_redirect(params)
        if any(len(v) > _MAX_PARAM for v in params.values()):
            raise AuthorizeError("invalid_request", "a parameter is too long", redirect=True)
        if params.get("response_type") != "code":
            raise AuthorizeError("unsupported_response_type", "only response_type=code is supported", redirect=True)
        method = params.get("code_challenge_method")
        challenge = params.get("code_challenge", "")
        if not challenge:
            raise AuthorizeError("invalid_request", "PKCE is required (code_challenge, method S256)", redirect=True)
        if method != "S256":
            raise AuthorizeError("invalid_request", "code_challenge_method must be S256 (plain is refused)",
                                 redirect=True)
        if not _CHALLENGE.match(challenge):
            raise AuthorizeError("invalid_request", "malformed code_challenge", redirect=True)
        scope = params.get("scope", "")
        if not scope.strip():
            raise AuthorizeError("invalid_scope", "scope is required", redirect=True)
        try:
            parse_scopes(scope)
        except ScopeError as exc:
            raise AuthorizeError("invalid_scope", str(exc), redirect=True) from None
        return AuthorizeRequest(client.client_id, client.name, redirect_uri, scope, params.get("state"),
                                challenge, params.get("nonce"))

    def grant_scope(self, requested: str, client_id: str, user: UserRow) -> str:
        """What this user may grant this client: the request narrowed to the client's registration
        and to the user's role (patients: patient/ only; professionals: user/ and patient/)."""
        client = self._store.client(client_id)
        if client is None:
            raise AuthorizeError("invalid_client", "Unknown client.", redirect=False)
        contexts = {"patient"} if user.role == PATIENT else {"user", "patient"}
        wanted = [s for s in parse_scopes(requested, strict=False) if s.context in contexts]
        granted = narrow(wanted, parse_scopes(client.scopes, strict=False))
        registered = set(client.scopes.split())
        extras = [s for s in dict.fromkeys(requested.split())
                  if s in APP_SCOPES and s in registered]
        if not granted:
            raise AuthorizeError("invalid_scope", "none of the requested scopes can be granted", redirect=True)
        return " ".join([*(str(s) for s in granted), *extras])

    @staticmethod
    def needs_patient_choice(scope: str, user: UserRow) -> bool:
        return "launch/patient" in scope.split() and user.role != PATIENT

    @staticmethod
    def patient_context(scope: str, user: UserRow, chosen: str | None) -> str | None:
        """The ``patient`` launch context: a patient's own record; for a professional the chosen one."""
        if user.role == PATIENT:
            if user.fhir_user and user.fhir_user.startswith("Patient/"):
                return user.fhir_user.split("/", 1)[1]
            return None
        if "launch/patient" not in scope.split():
            return None
        return chosen

    @staticmethod
    def valid_patient_id(text: str) -> str | None:
        value = text.strip().removeprefix("Patient/")
        return value if _PATIENT_ID.match(value) else None

    def issue_code(self, req: AuthorizeRequest, session: Session, scope: str, patient: str | None) -> str:
        code = secrets.token_urlsafe(32)
        now = self._clock.now_ms()
        row = AuthCodeRow(
            code_hash=digest(code), family_id=secrets.token_hex(12), client_id=req.client_id,
            user_id=session.user.user_id, session_id=session.row.session_id, redirect_uri=req.redirect_uri,
            scope=scope, code_challenge=req.code_challenge, nonce=req.nonce, patient=patient,
            auth_time_ms=session.row.created_ms, expires_ms=now + CODE_TTL_MS,
        )
        self._store.write_sync("oauth.code", lambda tx: tx.insert_code(row))
        return code

    # -- login sessions ------------------------------------------------------------------
    def start_session(self, user: UserRow, amr: list[str]) -> tuple[str, Session]:
        cookie = secrets.token_urlsafe(32)
        now = self._clock.now_ms()
        row = LoginSessionRow(session_id_for(cookie), user.user_id, now, now, " ".join(amr))
        self._store.write_sync("sessions.start", lambda tx: tx.insert_login_session(row))
        return cookie, Session(row, user)

    def _alive(self, row: LoginSessionRow | None, now: int, *, idle: bool = True) -> bool:
        return (row is not None and row.ended_ms == 0 and now < row.created_ms + self._max_ms
                and (not idle or now < row.last_seen_ms + self._idle_ms))

    def session(self, cookie: str | None) -> Session | None:
        """The live session behind a cookie (touched: it counts as activity), else None."""
        if not cookie or len(cookie) > 128:
            return None
        now = self._clock.now_ms()
        row = self._store.login_session(session_id_for(cookie))
        if row is None or not self._alive(row, now):
            return None
        user = self._store.user(row.user_id)
        if user is None or user.disabled:
            return None
        self._store.write_sync("sessions.touch", lambda tx: tx.touch_login_session(row.session_id, now))
        return Session(row, user)

    def end_session(self, session_id: str) -> str | None:
        """End a session and revoke its tokens (refused by this process at once); returns its user."""
        now = self._clock.now_ms()
        row = self._store.login_session(session_id)
        if row is None:
            return None

        def end(tx: WriteTx) -> None:
            tx.end_login_session(session_id, now)
            tx.revoke_tokens(now, session_id=session_id)

        self._store.write_sync("sessions.end", end)
        self._auth.poll_revocations()
        return row.user_id

    # -- token endpoint grants ------------------------------------------------------------
    def exchange_code(self, form: dict[str, str], client: ClientRow, issuer: str) -> TokenResult:
        code = form.get("code", "")
        verifier = form.get("code_verifier", "")
        now = self._clock.now_ms()
        if not code or len(code) > 256:
            raise GrantFailure(OAuthError("invalid_request", "code is required"))
        row = self._store.write_sync("oauth.code.use", lambda tx: tx.consume_code(digest(code), now))
        bad = OAuthError("invalid_grant", "the authorization code is invalid, expired or already used")
        if row is None:
            raise GrantFailure(bad)
        if row.used:  # replay: whoever holds it, every token it produced is now suspect
            n = self._revoke_family(row.family_id)
            raise GrantFailure(bad, "code-replay", row.user_id, n)
        if row.expires_ms < now or row.client_id != client.client_id:
            raise GrantFailure(bad, None, row.user_id)
        if form.get("redirect_uri") != row.redirect_uri:
            raise GrantFailure(OAuthError("invalid_grant", "redirect_uri does not match the authorization request"),
                               None, row.user_id)
        if not _VERIFIER.match(verifier) or not hmac.compare_digest(s256(verifier), row.code_challenge):
            raise GrantFailure(OAuthError("invalid_grant", "PKCE verification failed"), None, row.user_id)
        session = self._store.login_session(row.session_id)
        user = self._store.user(row.user_id)
        if not self._alive(session, now, idle=False) or user is None or user.disabled:
            raise GrantFailure(OAuthError("invalid_grant", "the login session has ended"), None, row.user_id)
        assert session is not None
        refresh_expiry = self._refresh_expiry(row.scope, session, now)
        response = self._issue(client, user, row.scope, row.patient, row.family_id, row.session_id, refresh_expiry,
                               row.auth_time_ms)
        if "openid" in row.scope.split():
            response["id_token"] = self._auth.id_token(
                issuer=issuer, client_id=client.client_id, user=user, nonce=row.nonce,
                auth_time_ms=row.auth_time_ms, amr=session.amr.split(), session_id=row.session_id,
                fhir_user="fhirUser" in row.scope.split())
        return TokenResult(response, user.user_id, client.client_id)

    def refresh(self, form: dict[str, str], client: ClientRow) -> TokenResult:
        token = form.get("refresh_token", "")
        now = self._clock.now_ms()
        bad = OAuthError("invalid_grant", "the refresh token is invalid, expired or revoked")
        if not token or len(token) > 256:
            raise GrantFailure(OAuthError("invalid_request", "refresh_token is required"))
        peek = self._store.refresh_token(digest(token))
        if peek is not None and form.get("scope") and peek.client_id == client.client_id \
                and not peek.used and not peek.revoked:
            # A refused scope must not use the token up; a token already used is a reuse whatever
            # scope it asks for (below: the family is revoked), so the scope is not looked at first.
            self._subset(form["scope"], peek.scope)
        row = self._store.write_sync("oauth.refresh.use", lambda tx: tx.consume_refresh(digest(token)))
        if row is None:
            raise GrantFailure(bad)
        if row.client_id != client.client_id:
            raise GrantFailure(bad, None, row.user_id)
        if row.used and not row.revoked:  # a rotated token presented again: someone copied it
            n = self._revoke_family(row.family_id)
            raise GrantFailure(bad, "refresh-reuse", row.user_id, n)
        if row.revoked or row.used or row.expires_ms < now:
            raise GrantFailure(bad, None, row.user_id)
        session = self._store.login_session(row.session_id)
        user = self._store.user(row.user_id)
        online = "offline_access" not in row.scope.split()
        if user is None or user.disabled or session is None or session.ended_ms or (
                online and not self._alive(session, now, idle=False)):
            raise GrantFailure(OAuthError("invalid_grant", "the login session has ended"), None, row.user_id)
        scope = row.scope
        if form.get("scope"):
            scope = self._subset(form["scope"], row.scope)
        if online:
            self._store.write_sync("sessions.touch", lambda tx: tx.touch_login_session(row.session_id, now))
        response = self._issue(client, user, scope, row.patient, row.family_id, row.session_id, row.expires_ms,
                               row.auth_time_ms, keep_scope=row.scope)
        return TokenResult(response, user.user_id, client.client_id)

    @staticmethod
    def _subset(requested: str, original: str) -> str:
        """``requested`` if it asks for nothing beyond ``original``; else invalid_scope."""
        orig_items = original.split()
        try:
            orig_scopes = parse_scopes(original, strict=False)
            for item in requested.split():
                parsed: ResourceScope | None = parse_scope(item)
                if parsed is None:
                    if item not in orig_items:
                        raise ScopeError(item)
                    continue
                covered = narrow([parsed], orig_scopes)
                if len(covered) != 1 or covered[0] != parsed:
                    raise ScopeError(item)
        except ScopeError:
            raise GrantFailure(OAuthError("invalid_scope", "a refresh cannot widen the original scope")) from None
        return " ".join(dict.fromkeys(requested.split()))

    def _refresh_expiry(self, scope: str, session: LoginSessionRow, now: int) -> int | None:
        items = scope.split()
        if "offline_access" in items:
            return now + self._refresh_ms
        if "online_access" in items:
            return session.created_ms + self._max_ms
        return None

    def _issue(self, client: ClientRow, user: UserRow, scope: str, patient: str | None, family: str,
               session_id: str, refresh_expiry: int | None, auth_time_ms: int, *,
               keep_scope: str | None = None) -> dict[str, Any]:
        now = self._clock.now_ms()
        token, jti, exp = self._auth.issue_user_token(client.client_id, scope, user, patient=patient,
                                                      session_id=session_id)
        refresh = secrets.token_urlsafe(32) if refresh_expiry is not None else None

        def save(tx: WriteTx) -> None:
            tx.record_issued(jti, family, session_id, exp * 1000)
            if refresh is not None and refresh_expiry is not None:
                tx.insert_refresh(RefreshTokenRow(
                    digest(refresh), family, client.client_id, user.user_id, session_id,
                    keep_scope or scope, patient, auth_time_ms, refresh_expiry, now))

        self._store.write_sync("oauth.issue", save)
        out: dict[str, Any] = {"access_token": token, "token_type": "Bearer", "expires_in": exp - now // 1000,
                               "scope": scope}
        if patient:
            out["patient"] = patient
        if refresh is not None:
            out["refresh_token"] = refresh
        return out

    def _revoke_family(self, family_id: str) -> int:
        now = self._clock.now_ms()
        n = self._store.write_sync("oauth.revoke", lambda tx: tx.revoke_tokens(now, family_id=family_id))
        self._auth.poll_revocations()  # this process refuses them now, not at the next poll
        return n

    # -- revocation and introspection (RFC 7009, RFC 7662) ----------------------------------
    def revoke(self, token: str, client: ClientRow) -> str | None:
        """Revoke a refresh token (and its family's access tokens) or an access token of this client.
        Returns the user id concerned, if any. Unknown tokens are ignored (RFC 7009 §2.2)."""
        if not token or len(token) > 4096:
            return None
        now = self._clock.now_ms()
        row = self._store.refresh_token(digest(token)) if len(token) <= 256 else None
        if row is not None:
            if row.client_id != client.client_id:
                return None
            self._revoke_family(row.family_id)
            return row.user_id
        claims = self._auth.own_token_claims(token)
        if claims is None or claims.get("client_id", claims.get("sub")) != client.client_id:
            return None
        jti, exp = str(claims["jti"]), int(claims.get("exp", 0))
        self._store.write_sync("oauth.revoke", lambda tx: tx.revoke_jti(jti, exp * 1000, now))
        self._auth.note_revoked(jti, exp)
        return str(claims["sub"]) if "role" in claims else None

    def introspect(self, token: str) -> dict[str, Any]:
        inactive: dict[str, Any] = {"active": False}
        if not token or len(token) > 4096:
            return inactive
        now = self._clock.now_ms()
        row = self._store.refresh_token(digest(token)) if len(token) <= 256 else None
        if row is not None:
            if row.used or row.revoked or row.expires_ms < now:
                return inactive
            session = self._store.login_session(row.session_id)
            if session is None or session.ended_ms:
                return inactive
            client = self._store.client(row.client_id)
            if client is None or client.disabled:  # a disabled app's refresh tokens cannot be used
                return inactive
            return {"active": True, "token_type": "refresh_token", "scope": row.scope, "client_id": row.client_id,
                    "sub": row.user_id, "exp": row.expires_ms // 1000}
        try:
            p = self._auth.verify(token)
        except Exception:
            return inactive
        out: dict[str, Any] = {"active": True, "token_type": "Bearer", "scope": p.scope, "client_id": p.client_id,
                               "sub": p.user or p.client_id, "exp": p.expires_at, "iss": self._auth.issuer,
                               "aud": self._auth.audience, "jti": p.token_id}
        for key, value in (("role", p.role), ("fhirUser", p.fhir_user), ("patient", p.patient), ("sid", p.session_id)):
            if value is not None:
                out[key] = value
        return out

    def authenticate(self, form: dict[str, str], basic: tuple[str, str] | None,
                     token_url: str) -> tuple[ClientRow, str | None]:
        """Client authentication for the code and refresh grants: a public app names itself
        (``client_id`` only; PKCE and rotation protect it), a confidential one authenticates."""
        client_id = form.get("client_id", "")
        has_credentials = basic is not None or "client_secret" in form or "client_assertion" in form
        if not has_credentials and client_id:
            app = self._store.app(client_id) if len(client_id) <= 128 else None
            client = self._store.client(client_id) if app is not None else None
            if app is None or not app.public or client is None or client.disabled:
                raise OAuthError("invalid_client", "client authentication failed", 401)
            return client, None
        return self._auth.authenticate_client(form, basic, token_url)
