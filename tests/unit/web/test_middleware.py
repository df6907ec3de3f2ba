from __future__ import annotations

import logging

from fhirvault.logs import JsonFormatter, safe_traceback
from fhirvault.web.middleware import _route_kind


def test_route_kind_hides_ids() -> None:
    assert _route_kind("/fhir/Patient/8a1f/_history/3") == "/fhir/Patient/{id}/_history/{vid}"
    assert _route_kind("/fhir/Patient") == "/fhir/Patient"
    assert _route_kind("/oauth2/token") == "/oauth2/token"
    assert _route_kind("/") == "/"


def test_exception_logs_carry_no_message() -> None:
    try:
        raise ValueError("Claire Martin born 1984-05-12")
    except ValueError as exc:
        report = safe_traceback(exc)
        record = logging.LogRecord("x", logging.ERROR, "f", 1, "failed", (), (type(exc), exc, exc.__traceback__))
    assert report["type"] == "builtins.ValueError"
    line = JsonFormatter().format(record)
    assert "Claire" not in line and "builtins.ValueError" in line


def test_route_kind_keeps_operations_and_search() -> None:
    assert _route_kind("/fhir/Patient/8a1f/$everything") == "/fhir/Patient/{id}/$everything"
    assert _route_kind("/fhir/Observation/_search") == "/fhir/Observation/_search"


def test_a_lost_database_on_any_route_is_a_503_with_retry_after_not_a_500() -> None:
    from starlette.testclient import TestClient

    from fhirvault.ports import StoreUnavailable
    from fhirvault.web.asgi import Receive, Scope, Send
    from fhirvault.web.middleware import RequestContextMiddleware

    async def token_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        raise StoreUnavailable("database unavailable", retry_after=2)

    r = TestClient(RequestContextMiddleware(token_endpoint, hsts=False)).post("/oauth2/token")
    assert r.status_code == 503 and r.headers["Retry-After"] == "2"
    assert r.json()["resourceType"] == "OperationOutcome" and r.json()["issue"][0]["code"] == "transient"
