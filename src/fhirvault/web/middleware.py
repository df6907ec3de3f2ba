"""Outermost middleware: request id, access log, and the last line of defence for errors."""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time

from fhirvault.domain import errors
from fhirvault.domain.errors import OperationOutcomeError
from fhirvault.logs import request_id_var
from fhirvault.ports import StoreUnavailable
from fhirvault.services.metrics import Metrics
from fhirvault.web.asgi import ASGIApp, Message, Receive, Scope, Send, send_outcome
from fhirvault.web.context import REQUEST_ID_KEY, new_client_holder

access_log = logging.getLogger("fhirvault.access")
error_log = logging.getLogger("fhirvault.error")
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9\-_.]{8,64}$")
# Request ids: a random per-process prefix and a counter: unique, unguessable
# across restarts, and without a getrandom() system call per request.
_ID_PREFIX = secrets.token_hex(6)
_id_counter = itertools.count(1)


def unavailable(exc: StoreUnavailable) -> OperationOutcomeError:
    """503 + Retry-After for a database that is restarting or failing over (logged once, no traceback)."""
    error_log.warning("request failed: database unavailable", extra={"outcome_unknown": exc.outcome_unknown})
    return errors.service_unavailable(str(exc), retry_after=exc.retry_after)


def _route_kind(path: str) -> str:
    """A low-cardinality description of the path for logs (no ids, no query)."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "/"
    if parts[0] != "fhir":
        return "/" + "/".join(parts[:2])
    rest = parts[1:]
    if not rest:
        return "/fhir"
    shape = [rest[0]]
    for p in rest[1:]:
        shape.append(p if p.startswith(("_", "$")) else "{id}" if len(shape) == 1 else "{vid}")
    return "/fhir/" + "/".join(shape)


_NON_FHIR = {"oauth2/token": "token", "metrics": "metrics", "livez": "health", "readyz": "health",
             "oauth2/jwks": "discovery", ".well-known/smart-configuration": "discovery",
             ".well-known/openid-configuration": "discovery", "oauth2/authorize": "login", "logout": "login",
             "oauth2/revoke": "token", "oauth2/introspect": "token"}
_TYPE_LEVEL = {"GET": "search", "HEAD": "search", "POST": "create", "PUT": "update", "PATCH": "patch",
               "DELETE": "delete"}
_INSTANCE_LEVEL = {"GET": "read", "HEAD": "read", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def _interaction(method: str, path: str) -> str:
    """The FHIR interaction a request is for, from a fixed set (a metrics label: never ids)."""
    if not path.startswith("/fhir/") and path != "/fhir":
        return _NON_FHIR.get(path.strip("/"), "other")
    parts = [p for p in path[5:].split("/") if p]
    n = len(parts)
    if n == 0:
        return "transaction" if method == "POST" else "search" if method in ("GET", "HEAD") else "other"
    last = parts[-1]
    if last[0] == "$":
        return "operation"
    if n == 1:
        if last == "metadata":
            return "capabilities"
        if last == "_history":
            return "history"
        if last == "_search":
            return "search" if method in ("GET", "POST") else "other"
        return _TYPE_LEVEL.get(method, "other")
    if last == "_history":
        return "history" if n <= 3 and method in ("GET", "HEAD") else "other"
    if n == 2:
        if parts[0] == ".well-known":
            return "discovery"
        if last == "_search":
            return "search" if method in ("GET", "POST") else "other"
        return _INSTANCE_LEVEL.get(method, "other")
    if n == 4 and parts[2] == "_history" and method in ("GET", "HEAD"):
        return "vread"
    return "other"


_interactions: dict[tuple[str, str], str] = {}


def _interaction_of(method: str, route: str) -> str:
    """``_interaction`` memoised on the route shape (ids already replaced), bounded in size."""
    key = (method, route)
    found = _interactions.get(key)
    if found is None:
        found = _interaction(method, route)
        if len(_interactions) < 2048:  # the first segment is client-chosen: do not grow without bound
            _interactions[key] = found
    return found


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, hsts: bool, metrics: Metrics | None = None) -> None:
        self.app = app
        self.hsts = hsts
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = supplied.decode() if supplied is not None and _REQUEST_ID.match(supplied) else f"{_ID_PREFIX}{next(_id_counter):010x}"
        scope[REQUEST_ID_KEY] = rid
        token = request_id_var.set(rid)
        holder = new_client_holder()
        started = time.perf_counter()
        status = 500
        sent = False

        async def wrapped_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                sent = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                if self.hsts:
                    headers.append((b"strict-transport-security", b"max-age=63072000"))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, wrapped_send)
        except StoreUnavailable as exc:  # any route (token, login, admin): 503, not 500
            if not sent:
                await send_outcome(wrapped_send, unavailable(exc))
        except Exception:
            error_log.exception("unhandled error")
            if not sent:
                await send_outcome(wrapped_send, errors.internal_error())
        finally:
            elapsed = time.perf_counter() - started
            method: str = scope["method"]
            route = _route_kind(scope["path"])
            if self.metrics is not None:
                self.metrics.observe_request(_interaction_of(method, route), method, status, elapsed)
            access_log.info(
                "request",
                extra={
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "client_id": holder.get("client_id"),
                },
            )
            request_id_var.reset(token)
