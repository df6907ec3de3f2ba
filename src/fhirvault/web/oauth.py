"""OAuth 2.0 endpoints: the token endpoint and discovery documents."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote_plus

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from fhirvault.services.auth import AuthService, OAuthError
from fhirvault.services.metrics import Metrics
from fhirvault.services.repository import Repository, RequestContext
from fhirvault.web.context import client_ip, request_id_of, set_client_id

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
    except (binascii.Error, UnicodeDecodeError):
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
    def __call__(self, *, source_ip: str | None, client_id: str | None) -> bool: ...


class OAuthEndpoints:
    def __init__(self, auth: AuthService, repo: Repository, public_base_url: str | None,
                 metrics: Metrics | None = None, throttled: Throttle | None = None) -> None:
        self._auth = auth
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
        await self._repo.audit_event(ctx, "token", 200, "token issued", client_id=result[0], category="security")
        return _json(200, result[1])

    async def _token(self, request: Request, ctx: RequestContext,
                     claimed: dict[str, str]) -> tuple[str, dict[str, Any]]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise OAuthError("invalid_request", "the token request must be application/x-www-form-urlencoded")
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
        grant = form.get("grant_type")
        if grant != "client_credentials":
            raise OAuthError("unsupported_grant_type", "only client_credentials is supported")
        token_url = token_url_for(request, self._public)
        basic = _basic(request.headers.get("authorization"))
        claimed_id = basic[0] if basic else form.get("client_id")
        if claimed_id:
            claimed["id"] = claimed_id
        # Refuse a locked account or a throttled source before any password hashing: a flood of
        # guesses then costs microseconds and never queues behind the hash slots others need.
        if self._throttled is not None and self._throttled(source_ip=ctx.source_ip, client_id=claimed_id):
            raise OAuthError("invalid_client", "too many failed attempts; try again later", 429)
        if self._hash_slots is None:  # created lazily, inside the server's event loop
            self._hash_slots = asyncio.Semaphore(_HASH_CONCURRENCY)
        async with self._hash_slots:  # and off the event loop itself
            client, assertion_id = await run_in_threadpool(self._auth.authenticate_client, form, basic, token_url)
        if assertion_id is not None:
            exp = int(assertion_id.rsplit(":", 1)[1])
            if not await self._repo.remember_assertion(assertion_id, exp * 1000):
                raise OAuthError("invalid_client", "client assertion was already used", 401)
        return client.client_id, self._auth.issue(client, form.get("scope"))

    def smart_configuration_for(self, token: str) -> dict[str, Any]:
        return {
            "issuer": self._auth.issuer,
            "token_endpoint": token,
            "jwks_uri": token.rsplit("/", 1)[0] + "/jwks",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": SUPPORTED_ASSERTION_ALGS,
            "scopes_supported": ["system/*.cruds", "system/*.rs", "system/*.read", "system/*.write"],
            "response_types_supported": [],
            "capabilities": ["client-confidential-asymmetric", "client-confidential-symmetric",
                             "permission-v1", "permission-v2"],
        }

    async def smart_configuration(self, request: Request) -> Response:
        return _json(200, self.smart_configuration_for(token_url_for(request, self._public)))

    async def jwks(self, request: Request) -> Response:
        return _json(200, self._auth.jwks)
