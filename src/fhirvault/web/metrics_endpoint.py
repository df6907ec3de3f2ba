"""GET /metrics: Prometheus exposition, for bearer tokens carrying the metrics scope only.

Prometheus authenticates with its ``oauth2:`` scrape option (client credentials
against /oauth2/token). The metrics scope grants no FHIR access, and FHIR scopes
grant no metrics access: an admin token gets 403 here. Refusals are audited and
counted; successful scrapes are not audited (one every few seconds would swamp it).
"""

from __future__ import annotations

from prometheus_client.exposition import choose_encoder
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fhirvault.domain.scopes import METRICS_SCOPE
from fhirvault.services.auth import AuthService, TokenError
from fhirvault.services.metrics import Metrics
from fhirvault.services.repository import Repository, RequestContext
from fhirvault.web.context import client_ip, request_id_of, set_client_id

_REALM = 'Bearer realm="fhirvault"'


class MetricsEndpoint:
    def __init__(self, metrics: Metrics, auth: AuthService, repo: Repository) -> None:
        self._metrics = metrics
        self._auth = auth
        self._repo = repo

    async def _refuse(self, ctx: RequestContext, status: int, kind: str, detail: str,
                      challenge: str) -> Response:
        self._metrics.auth_failure(kind)
        await self._repo.audit_event(ctx, "metrics", status, detail)
        error = "insufficient_scope" if status == 403 else "invalid_token"
        return JSONResponse({"error": error, "error_description": detail}, status,
                            {"WWW-Authenticate": challenge, "Cache-Control": "no-store"})

    async def scrape(self, request: Request) -> Response:
        ctx = RequestContext(None, request_id_of(request.scope), client_ip(request.scope))
        authorization = request.headers.get("authorization")
        if authorization is None:
            return await self._refuse(ctx, 401, "missing_token", "no access token", _REALM)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return await self._refuse(ctx, 401, "invalid_token", "not a bearer token",
                                      _REALM + ', error="invalid_request"')
        try:
            principal = self._auth.verify(token.strip())
        except TokenError as exc:
            return await self._refuse(ctx, 401, "invalid_token", str(exc), _REALM + ', error="invalid_token"')
        set_client_id(principal.client_id)
        if METRICS_SCOPE not in principal.scope.split():
            return await self._refuse(ctx, 403, "forbidden", f"the token lacks the {METRICS_SCOPE} scope",
                                      _REALM + f', error="insufficient_scope", scope="{METRICS_SCOPE}"')
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        # Collection reads /proc and the store (key ages): off the event loop.
        body = await run_in_threadpool(encoder, self._metrics.registry)
        return Response(body, 200, {"Content-Type": content_type, "Cache-Control": "no-store"})


__all__ = ["MetricsEndpoint"]
