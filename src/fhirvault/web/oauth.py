"""OAuth 2.0 endpoints: token (client credentials, authorization code, refresh), revocation
(RFC 7009), introspection (RFC 7662), JWKS and discovery (SMART, OpenID Connect)."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote_plus

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from fhirvault.services.auth import APP_SCOPES, AuthService, OAuthError, source_allowed
from fhirvault.services.metrics import Metrics
from fhirvault.services.oauth_server import GrantFailure, OAuthServer
from fhirvault.services.repository import Repository, RequestContext
from fhirvault.web.context import client_ip, request_id_of, set_client_id
from fhirvault.web.firewall import CLIENT_CERT_KEY

log = logging.getLogger("fhirvault.oauth")
_MAX_FORM = 64 * 1024
SUPPORTED_ASSERTION_ALGS = ["RS384", "ES384", "RS256", "ES256", "PS384", "PS256"]


def _json(status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    base = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    return Response(orjson.dumps(doc), status, {**base, **(headers or {})}, media_type="application/json")


def _basic(header: str | None) -> tuple[str, str] | None:
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII text (a latin-1 header byte)
        raise OAuthError("invalid_client", "malformed Basic authorization", 401) from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise OAuthError("invalid_client", "malformed Basic authorization", 401)
    # RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
    return unquote_plus(client_id), unquote_plus(secret)


def token_url_for(request: Request, public_base_url: str | None) -> str:
    if public_base_url:
        return public_base_url + "/oauth2/token"
    return str(request.url_for("token"))


# Argon2id costs ~50 ms and 64 MiB per check: bound how many run at once so a flood of
# token requests cannot exhaust memory; the others wait their turn.
_HASH_CONCURRENCY = 2


class Throttle(Protocol):
    def __call__(self, *, source_ip: str | None, client_id: str | None, user: str | None = None) -> bool: ...


async def read_form(request: Request) -> dict[str, str]:
    """An application/x-www-form-urlencoded body (bounded; a repeated parameter is an error)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "the request must be application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM:
            raise OAuthError("invalid_request", "request too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "malformed form body") from None
    form = dict(pairs)
    if len(form) != len(pairs):
        raise OAuthError("invalid_request", "a parameter was repeated")
    return form


def base_url_for(request: Request, public_base_url: str | None) -> str:
    """The server's external base URL (the OpenID issuer of ID tokens)."""
    return public_base_url or str(request.base_url).rstrip("/")


class OAuthEndpoints:
    def __init__(self, auth: AuthService, repo: Repository, public_base_url: str | None,
                 metrics: Metrics | None = None, throttled: Throttle | None = None,
                 server: OAuthServer | None = None) -> None:
        self._auth = auth
        self._server = server
        self._throttled = throttled
        self._metrics = metrics
        self._repo = repo
        self._public = public_base_url
        self._hash_slots: asyncio.Semaphore | None = None

    async def token(self, request: Request) -> Response:
        ctx = RequestContext(None, request_id_of(request.scope), client_ip(request.scope))
        claimed: dict[str, str] = {}
        try:
            result = await self._token(request, ctx, claimed)
        except OAuthError as exc:
            if exc.error in ("invalid_client", "invalid_scope") and self._metrics is not None:
                self._metrics.auth_failure("client_auth" if exc.error == "invalid_client" else "invalid_scope")
            await self._repo.audit_event(ctx, "token", exc.status, exc.error, client_id=claimed.get("id"),
                                         category="security")
            headers = {"WWW-Authenticate": 'Basic realm="fhirvault"'} if exc.status == 401 else None
            if exc.status == 429:
                headers = {"Retry-After": "60"}
            return _json(exc.status, exc.body(), headers)
        set_client_id(result[0])
        await self._repo.audit_event(ctx, "token", 200, "token issued", client_id=result[0], category="security",
                                     user=result[2])
        return _json(200, result[1])

    async def _token(self, request: Request, ctx: RequestContext,
                     claimed: dict[str, str]) -> tuple[str, dict[str, Any], str | None]:
        form = await read_form(request)
        grant = form.get("grant_type")
        if grant in ("authorization_code", "refresh_token") and self._server is not None:
            return await self._user_grant(request, ctx, claimed, form, grant)
        if grant != "client_credentials":
            raise OAuthError("unsupported_grant_type",
                             "supported: client_credentials, authorization_code, refresh_token")
        client = await self._authenticate(request, ctx, claimed, form, self._auth.authenticate_client)
        # A client certificate verified by a trusted TLS-terminating proxy binds the token to it (RFC 8705).
        cnf = request.scope.get(CLIENT_CERT_KEY)
        return client.client_id, self._auth.issue(client, form.get("scope"), cnf_x5t=cnf), None

    async def _authenticate(self, request: Request, ctx: RequestContext, claimed: dict[str, str],
                            form: dict[str, str], check: Callable[..., tuple[Any, str | None]] | None = None) -> Any:
        """Client authentication with ``check`` (default: the user-app check of the authorization server).

        A locked account or a throttled source is refused before any password hashing: a flood of
        guesses then costs microseconds and never queues behind the hash slots others need."""
        if check is None:
            assert self._server is not None
            check = self._server.authenticate
        token_url = token_url_for(request, self._public)
        basic = _basic(request.headers.get("authorization"))
        claimed_id = basic[0] if basic else form.get("client_id")
        if claimed_id:
            claimed["id"] = claimed_id
        if self._throttled is not None and self._throttled(source_ip=ctx.source_ip, client_id=claimed_id):
            raise OAuthError("invalid_client", "too many failed attempts; try again later", 429)
        if self._hash_slots is None:  # created lazily, inside the server's event loop
            self._hash_slots = asyncio.Semaphore(_HASH_CONCURRENCY)
        async with self._hash_slots:  # and off the event loop itself
            client, assertion_id = await run_in_threadpool(check, form, basic, token_url)
        if not source_allowed(client.allowed_sources, ctx.source_ip):
            # Right credentials from the wrong place: a stolen secret, or a misconfigured allow-list.
            raise OAuthError("invalid_client", "client not allowed from this address", 401)
        if assertion_id is not None:
            exp = int(assertion_id.rsplit(":", 1)[1])
            if not await self._repo.remember_assertion(assertion_id, exp * 1000):
                raise OAuthError("invalid_client", "client assertion was already used", 401)
        return client

    async def _user_grant(self, request: Request, ctx: RequestContext, claimed: dict[str, str],
                          form: dict[str, str], grant: str) -> tuple[str, dict[str, Any], str | None]:
        server = self._server
        assert server is not None
        client = await self._authenticate(request, ctx, claimed, form)
        try:
            if grant == "authorization_code":
                result = await run_in_threadpool(server.exchange_code, form, client,
                                                 base_url_for(request, self._public))
            else:
                result = await run_in_threadpool(server.refresh, form, client)
        except GrantFailure as failure:
            if failure.event is not None:
                log.warning("token family revoked", extra={"event": failure.event, "revoked": failure.revoked})
                await self._repo.audit_event(ctx, failure.event, 400, f"{failure.event}: {failure.revoked} tokens"
                                             " revoked", client_id=client.client_id, category="security",
                                             user=failure.user_id)
            raise failure.error from None
        return result.client_id, result.response, result.user_id

    async def revoke(self, request: Request) -> Response:
        """RFC 7009: 200 whether or not the token was known; errors only for client authentication."""
        ctx = RequestContext(None, request_id_of(request.scope), client_ip(request.scope))
        claimed: dict[str, str] = {}
        server = self._server
        if server is None:
            return _json(404, {"error": "invalid_request", "error_description": "not enabled"})
        try:
            form = await read_form(request)
            client = await self._authenticate(request, ctx, claimed, form)
            user = await run_in_threadpool(server.revoke, form.get("token", ""), client)
        except OAuthError as exc:
            await self._repo.audit_event(ctx, "token-revoke", exc.status, exc.error, client_id=claimed.get("id"),
                                         category="security")
            return _json(exc.status, exc.body(), {"WWW-Authenticate": 'Basic realm="fhirvault"'}
                         if exc.status == 401 else None)
        await self._repo.audit_event(ctx, "token-revoke", 200, "revocation request", client_id=client.client_id,
                                     category="security", user=user)
        return Response(b"", 200, {"Cache-Control": "no-store"})

    async def introspect(self, request: Request) -> Response:
        """RFC 7662, for authenticated confidential clients (resource servers)."""
        ctx = RequestContext(None, request_id_of(request.scope), client_ip(request.scope))
        server = self._server
        if server is None:
            return _json(404, {"error": "invalid_request", "error_description": "not enabled"})
        claimed: dict[str, str] = {}
        try:
            form = await read_form(request)
            basic = _basic(request.headers.get("authorization"))
            claimed_id = basic[0] if basic else form.get("client_id")
            if claimed_id:
                claimed["id"] = claimed_id
            if self._throttled is not None and self._throttled(source_ip=ctx.source_ip, client_id=claimed_id):
                raise OAuthError("invalid_client", "too many failed attempts; try again later", 429)
            if self._hash_slots is None:
                self._hash_slots = asyncio.Semaphore(_HASH_CONCURRENCY)
            auth_form = {k: v for k, v in form.items() if k not in ("token", "token_type_hint")}
            async with self._hash_slots:
                row, _ = await run_in_threadpool(self._auth.authenticate_client, auth_form, basic,
                                                 token_url_for(request, self._public))
            if not source_allowed(row.allowed_sources, ctx.source_ip):
                raise OAuthError("invalid_client", "client not allowed from this address", 401)
        except OAuthError as exc:
            await self._repo.audit_event(ctx, "token", exc.status, exc.error, client_id=claimed.get("id"),
                                         category="security")
            return _json(exc.status, exc.body(), {"WWW-Authenticate": 'Basic realm="fhirvault"'}
                         if exc.status == 401 else None)
        return _json(200, await run_in_threadpool(server.introspect, form.get("token", "")))

    def smart_configuration_for(self, token: str) -> dict[str, Any]:
        base = token.removesuffix("/oauth2/token")
        doc: dict[str, Any] = {
            "issuer": self._auth.issuer,
            "token_endpoint": token,
            "jwks_uri": base + "/oauth2/jwks",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": SUPPORTED_ASSERTION_ALGS,
            "scopes_supported": ["system/*.cruds", "system/*.rs", "system/*.read", "system/*.write"],
            "response_types_supported": [],
            "capabilities": ["client-confidential-asymmetric", "client-confidential-symmetric",
                             "permission-v1", "permission-v2"],
        }
        if self._server is None:
            return doc
        doc.update({
            "issuer": base,  # the iss of our ID tokens (access tokens keep the server's own issuer)
            "authorization_endpoint": base + "/oauth2/authorize",
            "revocation_endpoint": base + "/oauth2/revoke",
            "introspection_endpoint": base + "/oauth2/introspect",
            "grant_types_supported": ["authorization_code", "client_credentials", "refresh_token"],
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": [*sorted(APP_SCOPES), "patient/*.rs", "user/*.rs", "user/*.cruds",
                                 "patient/*.cruds", "system/*.cruds", "system/*.rs"],
            "capabilities": ["launch-standalone", "client-public", "client-confidential-symmetric",
                             "client-confidential-asymmetric", "sso-openid-connect", "context-standalone-patient",
                             "permission-v1", "permission-v2", "permission-patient", "permission-user",
                             "permission-offline", "permission-online"],
        })
        return doc

    def openid_configuration_for(self, base: str) -> dict[str, Any]:
        return {
            "issuer": base,
            "authorization_endpoint": base + "/oauth2/authorize",
            "token_endpoint": base + "/oauth2/token",
            "jwks_uri": base + "/oauth2/jwks",
            "revocation_endpoint": base + "/oauth2/revoke",
            "introspection_endpoint": base + "/oauth2/introspect",
            "end_session_endpoint": base + "/logout",
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt",
                                                      "none"],
            "token_endpoint_auth_signing_alg_values_supported": SUPPORTED_ASSERTION_ALGS,
            "scopes_supported": sorted(APP_SCOPES),
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "amr", "sid", "azp",
                                 "fhirUser", "preferred_username"],
        }

    async def openid_configuration(self, request: Request) -> Response:
        return _json(200, self.openid_configuration_for(base_url_for(request, self._public)))

    async def smart_configuration(self, request: Request) -> Response:
        return _json(200, self.smart_configuration_for(token_url_for(request, self._public)))

    async def jwks(self, request: Request) -> Response:
        return _json(200, self._auth.jwks)
