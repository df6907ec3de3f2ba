"""HTTP ↔ FhirRequest for everything under /fhir: body limit, authentication, errors."""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl

from fhirvault.domain import errors
from fhirvault.domain.errors import OperationOutcomeError
from fhirvault.fhir.messages import FhirRequest
from fhirvault.fhir.negotiation import error_format
from fhirvault.fhir.router import FhirRouter, is_public
from fhirvault.ports import StoreUnavailable
from fhirvault.services.auth import AuthService, Principal, TokenError
from fhirvault.services.metrics import Metrics
from fhirvault.services.repository import IntegrityError, Repository, RequestContext
from fhirvault.web.asgi import (
    BodyTooLarge,
    Receive,
    Scope,
    Send,
    header_map,
    read_body,
    send_outcome,
    send_response,
)
from fhirvault.web.context import VERIFIED_KEY, client_ip, request_id_of, set_client_id
from fhirvault.web.middleware import unavailable

log = logging.getLogger("fhirvault.fhir")
_HOST = re.compile(r"^[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?$")
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"}


def repeatable(request: FhirRequest, exc: StoreUnavailable) -> bool:
    """Whether the server may run ``request`` again by itself after the database came back.

    Reads and searches (a repeat may record its access twice in the audit log, never lose it);
    a conditional create (a repeat finds what the first attempt created, if it did); an update
    with If-Match when the first attempt is known not to have committed (a repeat after an
    unknown outcome would answer 412 for the client's own write). Anything else: 503, and the
    client decides (see docs/postgresql.md, "Failover and reconnection")."""
    method, segments = request.method, request.segments
    if method in ("GET", "HEAD") or (method == "POST" and segments[-1:] == ["_search"]):
        return True
    if method == "POST" and len(segments) == 1 and request.header("if-none-exist") is not None:
        return True
    return (method == "PUT" and len(segments) == 2 and request.header("if-match") is not None
            and not exc.outcome_unknown)


class FhirEndpoint:
    def __init__(self, router: FhirRouter, auth: AuthService, repo: Repository, *, prefix: str,
                 max_body: int, public_base_url: str | None, metrics: Metrics | None = None) -> None:
        self._router = router
        self._auth = auth
        self._repo = repo
        self._prefix = prefix
        self._max_body = max_body
        self._public_base = public_base_url
        self._metrics = metrics

    def base_url(self, scope: Scope, headers: dict[str, str]) -> str:
        if self._public_base:
            return self._public_base + self._prefix
        host = headers.get("host", "")
        if not _HOST.match(host):
            server = scope.get("server") or ("localhost", 80)
            host = f"{server[0]}:{server[1]}"
        return f"{scope.get('scheme', 'http')}://{host}{self._prefix}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        head = method == "HEAD"
        try:
            await self._handle(scope, receive, send, method)
        except OperationOutcomeError as exc:
            if exc.status == 403 and self._metrics is not None:
                self._metrics.auth_failure("forbidden")
            await send_outcome(send, exc, head, xml=_wants_xml(scope))
        except BodyTooLarge:
            await send_outcome(send, errors.too_large(f"The request body exceeds {self._max_body} bytes."), head,
                               xml=_wants_xml(scope))
        except IntegrityError:
            log.error("stored data failed its integrity check")
            await send_outcome(send, errors.internal_error(), head, xml=_wants_xml(scope))
        except StoreUnavailable as exc:  # restart or failover: the store reconnects, the client retries
            await send_outcome(send, unavailable(exc), head, xml=_wants_xml(scope))

    async def _handle(self, scope: Scope, receive: Receive, send: Send, method: str) -> None:
        path = scope["path"][len(self._prefix):]
        segments = [s for s in path.split("/") if s] if path not in ("", "/") else []
        headers = header_map(scope)
        if method not in _METHODS:
            raise errors.method_not_allowed("Method not allowed.")
        ctx = RequestContext(None, request_id_of(scope), client_ip(scope))
        if not is_public(method, segments):
            ctx = await self._authenticate(ctx, headers, scope.get(VERIFIED_KEY))
        body = await read_body(scope, receive, self._max_body) if method in ("POST", "PUT", "PATCH") else b""
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        request = FhirRequest(method, segments, query, headers, body, ctx, self.base_url(scope, headers))
        try:
            response = await self._router.handle(request)
        except StoreUnavailable as exc:
            if not repeatable(request, exc):
                raise
            # The store has reconnected meanwhile (or waits up to a few seconds for it): once more.
            log.warning("database unavailable: request repeated once", extra={"method": method})
            response = await self._router.handle(request)
        await send_response(send, response.status, response.body, response.headers, method == "HEAD")

    async def _authenticate(self, ctx: RequestContext, headers: dict[str, str],
                            verified: tuple[str, Principal | TokenError] | None = None) -> RequestContext:
        authorization = headers.get("authorization")
        if authorization is None:
            self._auth_failed("missing_token")
            await self._repo.audit_event(ctx, "authenticate", 401, "no access token")
            exc = errors.unauthorized("Authentication required: send an OAuth 2.0 bearer token.")
            exc.headers = {"WWW-Authenticate": 'Bearer realm="fhirvault"'}
            raise exc
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self._auth_failed("invalid_token")
            await self._repo.audit_event(ctx, "authenticate", 401, "not a bearer token")
            raise errors.unauthorized("The Authorization header must carry a Bearer token.", "invalid_request")
        token = token.strip()
        try:
            if verified is not None and verified[0] == token:  # the firewall's verification of this request
                if isinstance(verified[1], TokenError):
                    raise TokenError(str(verified[1]))
                principal = verified[1]
            else:
                principal = self._auth.verify(token)
        except TokenError as exc:
            self._auth_failed("invalid_token")
            await self._repo.audit_event(ctx, "authenticate", 401, str(exc))
            raise errors.unauthorized(f"Invalid access token: {exc}.") from None
        set_client_id(principal.client_id)
        return RequestContext(principal, ctx.request_id, ctx.source_ip)

    def _auth_failed(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.auth_failure(kind)


def _wants_xml(scope: Scope) -> bool:
    """Errors answer in XML when the client asked for XML (_format, else Accept)."""
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    format_param = next((v for k, v in query if k == "_format"), None)
    return error_format(header_map(scope).get("accept"), format_param) == "xml"
