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
