"""GET /openapi.json: generated from what the server serves, checked against the live routing both ways."""

from __future__ import annotations

import re
from typing import Any

import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from fhirvault.domain.r4 import resource_types
from tests.conftest import App

METHODS = ("get", "post", "put", "patch", "delete")
FHIR_JSON = {"Content-Type": "application/fhir+json"}


@pytest.fixture
def doc(app: App) -> dict[str, Any]:
    r = app.client.get("/openapi.json")  # no token: public, like /metadata
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return dict(r.json())


def _starlette_routes(app: App) -> list[Route]:
    """The routes of the running app, found by walking it (not from the OpenAPI module)."""
    inner = app.client.app.app  # type: ignore[attr-defined]  # RequestContextMiddleware -> [Firewall ->] _Dispatcher
    while not hasattr(inner, "_other"):  # through the middleware that wraps the dispatcher
        inner = inner.app
    return [r for r in inner._other.routes if isinstance(r, Route)]


def test_document_is_valid_openapi_3(doc: dict[str, Any]) -> None:
    validate(doc)
    assert doc["openapi"].startswith("3.")
    assert doc["servers"] == [{"url": "http://testserver"}]


def test_every_starlette_route_is_described(app: App, doc: dict[str, Any]) -> None:
    routes = _starlette_routes(app)
    assert len(routes) >= 15
    for route in routes:
        assert route.methods is not None
        assert route.path in doc["paths"], route.path
        assert set(doc["paths"][route.path]) == {m.lower() for m in route.methods - {"HEAD"}}, route.path
    assert "/openapi.json" in doc["paths"] and "/oauth2/token" in doc["paths"]


def test_every_resource_type_has_its_interactions(doc: dict[str, Any]) -> None:
    paths = doc["paths"]
    for rtype in resource_types():
        if rtype == "AuditEvent":  # the audit trail: read and search only
            assert set(paths["/fhir/AuditEvent"]) == {"get"}
            assert set(paths["/fhir/AuditEvent/{id}"]) == {"get"}
            assert set(paths["/fhir/AuditEvent/_search"]) == {"post"}
            assert "/fhir/AuditEvent/_history" not in paths
            continue
        assert set(paths[f"/fhir/{rtype}"]) == {"get", "post", "put", "delete"}, rtype
        assert set(paths[f"/fhir/{rtype}/{{id}}"]) == {"get", "put", "patch", "delete"}, rtype
        for suffix in ("/_history", "/_search", "/{id}/_history", "/{id}/_history/{vid}"):
            assert f"/fhir/{rtype}{suffix}" in paths, (rtype, suffix)
    names = {p["name"] for p in paths["/fhir/Patient"]["get"]["parameters"]}
    assert {"family", "birthdate", "identifier", "_count", "_include"} <= names
    assert paths["/fhir/Patient/{id}/$everything"].keys() == {"get"}
    assert paths["/fhir/Patient/{id}/$break-glass"].keys() == {"post"}
    assert paths["/fhir/metadata"]["get"]["security"] == []


def _concrete(path: str) -> str:
    return path.replace("{id}", "oa1").replace("{vid}", "1")


def _pattern(template: str) -> str:
    return "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in re.split(r"(\{\w+\})", template))


def _unrouted(status: int, body: dict[str, Any]) -> bool:
    """The router's own 'no such URL / method' answers (not a resource that does not exist)."""
    if status in (405, 501):
        return True
    text = str(body.get("issue", [{}])[0].get("diagnostics", ""))
    if status == 400 and "Malformed resource id" in text:  # checked before the method: e.g. POST Patient/$x
        return True
    return status == 404 and ("Unknown URL" in text or "Unknown resource type" in text)


@pytest.mark.parametrize("rtype", ["Patient", "Observation", "AuditEvent"])
def test_every_described_fhir_operation_is_routed(app: App, doc: dict[str, Any], rtype: str) -> None:
    checked = 0
    for path, ops in doc["paths"].items():
        if not (path.startswith(f"/fhir/{rtype}/") or path == f"/fhir/{rtype}"):
            continue
        for method in ops:
            params = {"_id": "oa1"} if path == f"/fhir/{rtype}" and method in ("put", "delete") else None
            r = app.client.request(method.upper(), _concrete(path), params=params, content=b"{}",
                                   headers={**app.auth, **FHIR_JSON})
            assert not _unrouted(r.status_code, r.json() if r.content else {}), (method, path, r.text)
            checked += 1
    assert checked >= 2


# Shapes a client might try, by template; anything the router serves must be described.
PROBES = ["/fhir", "/fhir/_history", "/fhir/metadata", "/fhir/_search", "/fhir/{type}", "/fhir/{type}/_search",
          "/fhir/{type}/_history", "/fhir/{type}/{id}", "/fhir/{type}/{id}/_history",
          "/fhir/{type}/{id}/_history/{vid}", "/fhir/{type}/{id}/_history/{vid}/x", "/fhir/{type}/{id}/$everything",
          "/fhir/{type}/{id}/$break-glass", "/fhir/{type}/{id}/$access-history", "/fhir/{type}/{id}/$validate",
          "/fhir/{type}/$validate", "/fhir/{type}/{id}/x", "/fhir/.well-known/smart-configuration"]


@pytest.mark.parametrize("rtype", ["Patient", "AuditEvent"])
def test_the_router_serves_nothing_undescribed(app: App, doc: dict[str, Any], rtype: str) -> None:
    for template in PROBES:
        described = template.replace("{type}", rtype)
        for method in METHODS:
            r = app.client.request(method.upper(), _concrete(described), params={"_id": "oa1"}, content=b"{}",
                                   headers={**app.auth, **FHIR_JSON})
            body = r.json() if r.content and r.headers.get("content-type", "").find("json") >= 0 else {}
            if not _unrouted(r.status_code, body):
                served = _concrete(described)
                assert any(method in ops and re.fullmatch(_pattern(path), served) for path, ops in doc["paths"].items()), \
                    (method, served, r.status_code, r.text[:200])


def test_operation_ids_are_unique(doc: dict[str, Any]) -> None:
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[A-Za-z0-9$._\-{}]+", i) for i in ids)
