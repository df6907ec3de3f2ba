"""Per-request context shared by the middleware and the endpoints."""

from __future__ import annotations

import contextvars

from fhirvault.web.asgi import Scope

REQUEST_ID_KEY = "fhirvault.request_id"
# The firewall's verification of the request's bearer token: (token, Principal or the TokenError), so
# the endpoint does not verify it (and sync the caches of other processes) a second time.
VERIFIED_KEY = "fhirvault.verified"
_client_id: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("client_holder", default=None)


def request_id_of(scope: Scope) -> str:
    return str(scope.get(REQUEST_ID_KEY, "-"))


def client_ip(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def new_client_holder() -> dict[str, str]:
    holder: dict[str, str] = {}
    _client_id.set(holder)
    return holder


def set_client_id(client_id: str) -> None:
    holder = _client_id.get()
    if holder is not None:
        holder["client_id"] = client_id
