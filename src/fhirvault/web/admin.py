"""Security-officer endpoints: the break-the-glass review queue.

``GET /admin/break-glass?status=open`` lists grants (open, closed or all);
``POST /admin/break-glass/{id}/review`` closes one with ``{"decision":
"justified"|"unjustified", "note": "..."}``. Both need a bearer token of a user
with the security_officer role; the repository checks it and audits every list
and review. Errors are OperationOutcomes like the FHIR API's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fhirvault.domain import errors
from fhirvault.services.auth import AuthService, Principal, TokenError
from fhirvault.services.repository import Repository, RequestContext
from fhirvault.web.context import client_ip, request_id_of, set_client_id

if TYPE_CHECKING:
    from fhirvault.container import Container

_MAX_BODY = 16_384


def _json(status: int, body: Any) -> Response:
    return Response(orjson.dumps(body), status, {"Content-Type": "application/json", "Cache-Control": "no-store"})


def _error(exc: errors.OperationOutcomeError) -> Response:
    headers = {"Content-Type": "application/fhir+json", "Cache-Control": "no-store", **(exc.headers or {})}
    return Response(orjson.dumps(exc.outcome()), exc.status, headers)


async def json_body(request: Request) -> dict[str, Any]:
    """A small JSON object body (16 KiB at most), or a 4xx OperationOutcome."""
    raw = await request.body()
    if len(raw) > _MAX_BODY:
        raise errors.too_large("The body is too large.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise errors.bad_request("The body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise errors.bad_request("The body must be a JSON object.")
    return body


async def bearer_context(auth: AuthService, repo: Repository, request: Request) -> RequestContext:
    """The caller of an admin endpoint from its bearer token; 401 (audited) without a valid one."""
    ctx = RequestContext(None, request_id_of(request.scope), client_ip(request.scope))
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    principal: Principal | None = None
    if scheme.lower() == "bearer" and token.strip():
        try:
            principal = auth.verify(token.strip())
        except TokenError as exc:
            await repo.audit_event(ctx, "authenticate", 401, str(exc), category="security")
    if principal is None:
        raise errors.OperationOutcomeError(401, [errors.Issue("error", "login", "A valid bearer token is needed.")],
                                           {"WWW-Authenticate": 'Bearer realm="fhirvault"'})
    set_client_id(principal.client_id)
    return RequestContext(principal, ctx.request_id, ctx.source_ip)


class AdminEndpoints:
    def __init__(self, container: Container) -> None:
        self._auth = container.auth
        self._repo = container.repository

    async def _context(self, request: Request) -> RequestContext:
        return await bearer_context(self._auth, self._repo, request)

    async def queue(self, request: Request) -> Response:
        try:
            ctx = await self._context(request)
            status = request.query_params.get("status")
            grants = await self._repo.break_glass_queue(ctx, None if status in (None, "", "all") else status)
        except errors.OperationOutcomeError as exc:
            return _error(exc)
        return _json(200, {"total": len(grants), "grants": [g.to_json() for g in grants]})

    async def review(self, request: Request) -> Response:
        try:
            ctx = await self._context(request)
            body = await json_body(request)
            grant = await self._repo.review_break_glass(ctx, str(request.path_params["grant_id"]),
                                                        body.get("decision"), body.get("note"))
        except errors.OperationOutcomeError as exc:
            return _error(exc)
        return _json(200, grant.to_json())


def routes(container: Container) -> list[Route]:
    admin = AdminEndpoints(container)
    return [
        Route("/admin/break-glass", admin.queue, methods=["GET"]),
        Route("/admin/break-glass/{grant_id}/review", admin.review, methods=["POST"]),
    ]


__all__ = ["routes"]
