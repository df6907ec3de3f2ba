"""Compliance registers and the live compliance report over HTTP (JSON; the report also as HTML and PDF).

Who may call (deny by default): a user token with the security_officer or platform_admin role, or a
backend client holding ``fhirvault/registers.read`` (reads, the report) / ``fhirvault/registers.write``
(changes). No token: 401; any other token: 403. Every read and change is audited; changes need a
``reason``.

* ``GET /admin/registers/actors``: processors and subcontractors (art. 28) with what they can reach
* ``GET /admin/registers/processing``: the record of processing (art. 30), generated
* ``GET /admin/registers/residency``: every destination with its country, the outbound allow-list
* ``GET|POST /admin/registers/incidents``, ``GET|POST /admin/registers/incidents/{id}``
  (POST ``{"alert": "<alert id>", "reason": "..."}`` opens one from an alert; on an id: ``reason`` plus
  ``status`` notified|closed, ``personalDataBreach``, ``notified``, ``authorityReference``)
* ``GET|POST /admin/registers/requests``, ``GET|POST /admin/registers/requests/{id}``
  (POST ``{"type": "access", "subject": "...", "reason": "...", "received": "2026-05-01T09:00:00Z"}``;
  on an id: ``reason`` plus ``status`` extended|done|refused, ``outcome``)
* ``GET /admin/compliance/report`` (JSON), ``/admin/compliance/report.html`` and ``.pdf`` (``?lang=fr|en``)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fhirvault.domain import errors
from fhirvault.domain.scopes import REGISTERS_READ_SCOPE, REGISTERS_WRITE_SCOPE, operational_scopes
from fhirvault.services.auth import Principal
from fhirvault.services.registers import (
    NotFound,
    RegisterError,
    RegisterService,
    actors_register,
    record_of_processing,
)
from fhirvault.services.repository import RequestContext
from fhirvault.web.admin import _error, _json, bearer_context, json_body

if TYPE_CHECKING:
    from fhirvault.container import Container

OFFICER_ROLES = frozenset({"security_officer", "platform_admin"})


def may(principal: Principal, *, write: bool) -> bool:
    """Security officers and platform admins; or a backend client with the registers scope."""
    if principal.user is not None:
        return principal.role in OFFICER_ROLES
    scopes = operational_scopes(principal.scope)
    return REGISTERS_WRITE_SCOPE in scopes if write else bool({REGISTERS_READ_SCOPE, REGISTERS_WRITE_SCOPE} & set(scopes))


class RegisterEndpoints:
    def __init__(self, container: Container) -> None:
        self._c = container
        self._auth = container.auth
        self._repo = container.repository
        self._svc = RegisterService(container)

    async def _principal(self, request: Request, interaction: str, *, write: bool) -> tuple[Principal, RequestContext]:
        ctx = await bearer_context(self._auth, self._repo, request)
        principal = ctx.principal
        assert principal is not None
        if principal.tenant != self._c.settings.tenant or not may(principal, write=write):
            await self._repo.audit_event(ctx, interaction, 403, "registers are for security officers and DPO clients",
                                         entity="registers", category="security")
            raise errors.forbidden("Access denied: the compliance registers are for the security officer / DPO.")
        return principal, ctx

    @staticmethod
    def _actor(p: Principal) -> str:
        return p.user or f"client:{p.client_id}"

    async def _run(self, request: Request, interaction: str, work: Callable[[Principal], Any], *,
                   write: bool = False, entity: str = "registers",
                   with_body: Callable[[Principal, dict[str, Any]], Any] | None = None) -> Response:
        try:
            principal, ctx = await self._principal(request, interaction, write=write)  # before reading any body
            if with_body is not None:
                body = await json_body(request)
                work = lambda p: with_body(p, body)  # noqa: E731
            try:
                result = await asyncio.to_thread(work, principal)
            except NotFound as exc:
                raise errors.not_found(str(exc)) from None
            except RegisterError as exc:
                raise errors.bad_request(str(exc)) from None
            if not write:  # changes are audited by the service, with their reason, in their transaction
                await self._repo.audit_event(ctx, interaction, 200, "register read", entity=entity,
                                             category="system")
        except errors.OperationOutcomeError as exc:
            return _error(exc)
        if isinstance(result, Response):
            return result
        return _json(201 if write and request.method == "POST" and "id" not in request.path_params else 200, result)

    async def _write(self, request: Request, interaction: str,
                     work: Callable[[Principal, dict[str, Any]], Any]) -> Response:
        return await self._run(request, interaction, lambda _p: None, write=True, with_body=work)

    # -- generated registers --
    async def actors(self, request: Request) -> Response:
        """Processors and subcontractors (GDPR art. 28) with what they can reach."""
        return await self._run(request, "register-actors", lambda _p: {"actors": actors_register(self._c)})

    async def processing(self, request: Request) -> Response:
        """The record of processing (GDPR art. 30), generated from the configuration."""
        return await self._run(request, "register-processing", lambda _p: record_of_processing(self._c))

    async def residency(self, request: Request) -> Response:
        """Every destination of the data with its country; the outbound allow-list."""
        from fhirvault.services.residency import allowed_hosts, destinations

        s = self._c.settings
        return await self._run(request, "register-residency", lambda _p: {
            "country": s.country, "mode": s.mode, "destinations": [d.to_json() for d in destinations(s)],
            "outbound_allowed": [*sorted(allowed_hosts(s)), "(loopback)"]})

    # -- incidents --
    async def incidents(self, request: Request) -> Response:
        """The incident register (72-hour notification clock), newest first."""
        now = self._c.clock.now_ms()
        status = request.query_params.get("status") or None
        return await self._run(request, "register-incidents", lambda _p: {
            "incidents": [i.to_json(now) for i in self._svc.incidents(status)]})

    async def open_incident(self, request: Request) -> Response:
        """Open an incident, from an alert id or by hand (needs a reason)."""
        now = self._c.clock.now_ms()
        return await self._write(request, "register-incident-open", lambda p, b: self._svc.open_incident(
            actor=self._actor(p), reason=b.get("reason"), alert_id=_opt_str(b, "alert"), title=_opt_str(b, "title"),
            detected=b.get("detected")).to_json(now))

    async def incident(self, request: Request) -> Response:
        """One incident."""
        now = self._c.clock.now_ms()
        iid = str(request.path_params["id"])
        return await self._run(request, "register-incident", lambda _p: self._svc.incident(iid).to_json(now),
                               entity=f"register/incident/{iid[:40]}")

    async def update_incident(self, request: Request) -> Response:
        """Add a note to an incident; mark it notified or closed (needs a reason)."""
        now = self._c.clock.now_ms()
        iid = str(request.path_params["id"])

        def work(p: Principal, b: dict[str, Any]) -> Any:
            breach = b.get("personalDataBreach")
            if breach is not None and not isinstance(breach, bool):
                raise RegisterError("personalDataBreach: true or false")
            return self._svc.update_incident(iid, actor=self._actor(p), reason=b.get("reason"),
                                             status=_opt_str(b, "status"), personal_data_breach=breach,
                                             notified=b.get("notified"),
                                             authority_reference=_opt_str(b, "authorityReference")).to_json(now)

        return await self._write(request, "register-incident-update", work)

    # -- data-subject requests --
    async def requests(self, request: Request) -> Response:
        """Data-subject requests (one-month deadline), newest first."""
        now = self._c.clock.now_ms()
        status = request.query_params.get("status") or None
        return await self._run(request, "register-requests", lambda _p: {
            "requests": [r.to_json(now) for r in self._svc.requests(status)]})

    async def open_request(self, request: Request) -> Response:
        """Record a data-subject request received (needs a reason)."""
        now = self._c.clock.now_ms()
        return await self._write(request, "register-request-open", lambda p, b: self._svc.open_request(
            actor=self._actor(p), type=str(b.get("type")), subject=b.get("subject"), reason=b.get("reason"),
            received=b.get("received"), patient=_opt_str(b, "patient")).to_json(now))

    async def request(self, request: Request) -> Response:
        """One data-subject request."""
        now = self._c.clock.now_ms()
        rid = str(request.path_params["id"])
        return await self._run(request, "register-request", lambda _p: self._svc.request(rid).to_json(now),
                               entity=f"register/request/{rid[:40]}")

    async def update_request(self, request: Request) -> Response:
        """Add a note to a request; extend it (once) or close it (needs a reason)."""
        now = self._c.clock.now_ms()
        rid = str(request.path_params["id"])
        return await self._write(request, "register-request-update", lambda p, b: self._svc.update_request(
            rid, actor=self._actor(p), reason=b.get("reason"), status=_opt_str(b, "status"),
            outcome=_opt_str(b, "outcome")).to_json(now))

    # -- the compliance report --
    def report(self, fmt: str) -> Callable[[Request], Awaitable[Response]]:
        from fhirvault.services.compliance_report import (
            build_report,
            render_html,
            render_pdf,
            report_filename,
        )

        async def handler(request: Request) -> Response:
            """The live compliance report (HDS, ISO 27001 Annex A, GDPR art. 32); ?lang=en|fr."""
            lang = request.query_params.get("lang", "en")
            if lang not in ("en", "fr"):
                return _error(errors.bad_request("lang: en or fr", "lang"))

            def work(_p: Principal) -> Response:
                report = build_report(self._c)
                if fmt == "json":
                    return _json(200, report.to_json())
                disposition = {"Content-Disposition": f'inline; filename="{report_filename(report, fmt)}"',
                               "Cache-Control": "no-store"}
                if fmt == "html":
                    return Response(render_html(report, lang), 200, disposition, media_type="text/html; charset=utf-8")
                return Response(render_pdf(report, lang), 200, disposition, media_type="application/pdf")

            return await self._run(request, "compliance-report", work, entity="compliance-report")

        return handler


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RegisterError(f"{key}: expected a string")
    return value


def _by_method(get: Callable[[Request], Awaitable[Response]],
               post: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """One route per path (as /openapi.json describes them): GET lists or reads, POST changes."""

    async def endpoint(request: Request) -> Response:
        return await (post if request.method == "POST" else get)(request)

    endpoint.__doc__ = f"GET: {(get.__doc__ or '').strip()} POST: {(post.__doc__ or '').strip()}"
    return endpoint


def routes(container: Container) -> list[Route]:
    r = RegisterEndpoints(container)
    base = "/admin/registers"
    both = ["GET", "POST"]
    return [
        Route(f"{base}/actors", r.actors, methods=["GET"]),
        Route(f"{base}/processing", r.processing, methods=["GET"]),
        Route(f"{base}/residency", r.residency, methods=["GET"]),
        Route(f"{base}/incidents", _by_method(r.incidents, r.open_incident), methods=both),
        Route(f"{base}/incidents/{{id}}", _by_method(r.incident, r.update_incident), methods=both),
        Route(f"{base}/requests", _by_method(r.requests, r.open_request), methods=both),
        Route(f"{base}/requests/{{id}}", _by_method(r.request, r.update_request), methods=both),
        Route("/admin/compliance/report", r.report("json"), methods=["GET"]),
        Route("/admin/compliance/report.html", r.report("html"), methods=["GET"]),
        Route("/admin/compliance/report.pdf", r.report("pdf"), methods=["GET"]),
    ]


__all__ = ["OFFICER_ROLES", "RegisterEndpoints", "may", "routes"]
