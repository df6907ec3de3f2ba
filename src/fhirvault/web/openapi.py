"""An OpenAPI 3 description of the HTTP API, generated from what the server serves.

Two sources, nothing hand-listed here:

* the FHIR part from the server's own CapabilityStatement (the interactions,
  search parameters and operations it declares per resource type), each
  interaction mapped to the URL and method the FHIR REST specification gives it
  (and the router dispatches: tests/integration/test_openapi.py probes both ways);
* everything outside /fhir from the Starlette routes themselves (path, methods,
  path parameters, the endpoint's docstring).

It is public, like /metadata: it says nothing that the public CapabilityStatement
and the SMART/OIDC discovery documents do not, and API tooling needs it before
it has a token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from fhirvault import __version__
from fhirvault.domain.search.query import RESULT_PARAMS
from fhirvault.web.asgi import Scope

FHIR_JSON = "application/fhir+json"
_OUTCOME = {"$ref": "#/components/schemas/OperationOutcome"}
_ERROR = {"description": "An error, as a FHIR OperationOutcome", "content": {FHIR_JSON: {"schema": _OUTCOME}}}
_ERRORS = {"default": {"$ref": "#/components/responses/Error"}}
_RESOURCE = {"description": "A FHIR resource (or Bundle)", "content": {FHIR_JSON: {"schema": {"type": "object"}}}}
_ID_PARAM = {"name": "id", "in": "path", "required": True,
       "schema": {"type": "string", "pattern": "^[A-Za-z0-9\\-.]{1,64}$"}}
_VID_PARAM = {"name": "vid", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9]{1,9}$"}}
_IF_MATCH_PARAM = {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}
_PAGING_PARAMS = {n: {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                  for n in ("_count", "_since", "_page_after", "_page_before", "_snapshot")}
_SHARED_PARAMS = {"id": _ID_PARAM, "vid": _VID_PARAM, "If-Match": _IF_MATCH_PARAM, **_PAGING_PARAMS}
_ID, _VID, _IF_MATCH = ({"$ref": f"#/components/parameters/{n}"} for n in ("id", "vid", "If-Match"))
_PAGING = [{"$ref": f"#/components/parameters/{n}"} for n in _PAGING_PARAMS]
# Conditional update/delete and POST _search take the same parameters as the GET search (listed there once).
_FREE_FORM = {"type": "object", "additionalProperties": {"type": "string"}}
_CRITERIA = {"name": "criteria", "in": "query", "required": True, "style": "form", "explode": True,
             "schema": {**_FREE_FORM, "minProperties": 1}, "description": "search parameters, as for the search"}
_PUBLIC: list[dict[str, list[str]]] = []  # an empty security requirement list: no token needed
# Method of the FHIR operations this server declares (the CapabilityStatement does not carry it).
_OPERATION_METHODS = {"everything": "get", "access-history": "get", "break-glass": "post", "validate": "post",
                      "meta": "get", "meta-add": "post", "meta-delete": "post"}


_PREFER_ASYNC = {"name": "Prefer", "in": "header", "required": True, "schema": {"type": "string",
                                                                            "enum": ["respond-async"]}}
_ACCEPTED = {"202": {"description": "accepted (Content-Location: the status URL)"}, **_ERRORS}


def _ok(description: str, ctype: str = FHIR_JSON) -> dict[str, Any]:
    if ctype == FHIR_JSON:
        return {"200": {"$ref": "#/components/responses/Resource"}, **_ERRORS}
    return {"200": {"description": description, "content": {ctype: {"schema": {"type": "object"}}}}, **_ERRORS}


def _resource_body(rtype: str) -> dict[str, Any]:
    schema = {"type": "object", "required": ["resourceType"],
              "properties": {"resourceType": {"type": "string", "enum": [rtype]}}}
    return {"required": True, "content": {FHIR_JSON: {"schema": schema}}}


def _search_params(resource: dict[str, Any]) -> list[dict[str, Any]]:
    names = sorted({p["name"] for p in resource.get("searchParam", [])} | RESULT_PARAMS)
    return [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}} for n in names]


def _type_paths(resource: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
    """The paths of one CapabilityStatement.rest.resource entry."""
    rtype = resource["type"]
    codes = {i["code"] for i in resource.get("interaction", [])}
    base, inst = f"{prefix}/{rtype}", f"{prefix}/{rtype}/{{id}}"
    paths: dict[str, dict[str, Any]] = {}

    def op(path: str, method: str, interaction: str, **spec: Any) -> None:
        spec.setdefault("responses", _ok(interaction))
        paths.setdefault(path, {})[method] = {"operationId": f"{interaction}-{rtype}-{method}", "tags": [rtype],
                                             "summary": f"{interaction} {rtype}", **spec}

    search = _search_params(resource)
    if "search-type" in codes:
        op(base, "get", "search-type", parameters=search)
        op(f"{base}/_search", "post", "search-type", requestBody={"content": {
            "application/x-www-form-urlencoded": {"schema": _FREE_FORM}}})
    if "create" in codes:
        op(base, "post", "create", requestBody=_resource_body(rtype),
           parameters=[{"name": "If-None-Exist", "in": "header", "required": False, "schema": {"type": "string"}}],
           responses={"201": {"description": "created"}, "200": {"description": "exists (conditional)"},
                      **_ERRORS})
    if resource.get("conditionalUpdate"):
        op(base, "put", "conditional-update", parameters=[_CRITERIA], requestBody=_resource_body(rtype))
    if resource.get("conditionalDelete") in ("single", "multiple"):
        op(base, "delete", "conditional-delete", parameters=[_CRITERIA])
    if "history-type" in codes:
        op(f"{base}/_history", "get", "history-type", parameters=_PAGING)
    if "read" in codes:
        op(inst, "get", "read", parameters=[_ID])
    if "update" in codes:
        op(inst, "put", "update", parameters=[_ID, _IF_MATCH], requestBody=_resource_body(rtype),
           responses={"201": {"description": "created"}, **_ok("updated")})
    if "patch" in codes:
        patch = {"type": "array", "items": {"type": "object", "required": ["op", "path"]}}
        op(inst, "patch", "patch", parameters=[_ID, _IF_MATCH],
           requestBody={"required": True, "content": {"application/json-patch+json": {"schema": patch}}})
    if "delete" in codes:
        op(inst, "delete", "delete", parameters=[_ID, _IF_MATCH],
           responses={"204": {"description": "deleted"}, **_ok("deleted")})
    if "history-instance" in codes:
        op(f"{inst}/_history", "get", "history-instance", parameters=[_ID, *_PAGING])
    if "vread" in codes:
        op(f"{inst}/_history/{{vid}}", "get", "vread", parameters=[_ID, _VID])
    for operation in resource.get("operation", []):
        name = operation["name"]
        if name == "export":  # Bulk Data: Patient/$export (type level), Group/{id}/$export
            path, params = (base, []) if rtype == "Patient" else (inst, [_ID])
            for verb in ("get", "post"):
                op(f"{path}/$export", verb, "$export", parameters=[*params, _PREFER_ASYNC],
                   description=operation["definition"], responses=_ACCEPTED)
            continue
        method = _OPERATION_METHODS.get(name)
        if method is None:
            raise ValueError(f"no HTTP method known for the ${name} operation")
        extra: dict[str, Any] = {"description": operation.get("documentation", operation["definition"])}
        if method == "post":
            extra["requestBody"] = _resource_body("Parameters")
        op(f"{inst}/${name}", method, f"${name}", parameters=[_ID], **extra)
        if name == "validate":  # also at type level (mode=create)
            op(f"{base}/$validate", "post", "$validate-type", **extra)
        if name == "meta":  # also POST, and on one version
            op(f"{inst}/$meta", "post", "$meta", parameters=[_ID], description=extra["description"])
            op(f"{inst}/_history/{{vid}}/$meta", "get", "$meta-version", parameters=[_ID, _VID],
               description=extra["description"])
    return paths


def _fhir_paths(capability: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
    rest = capability["rest"][0]
    system = {i["code"] for i in rest.get("interaction", [])}
    paths: dict[str, dict[str, Any]] = {
        f"{prefix}/metadata": {"get": {"operationId": "capabilities", "summary": "CapabilityStatement",
                                       "security": _PUBLIC, "responses": _ok("the CapabilityStatement")}},
        f"{prefix}/.well-known/smart-configuration": {
            "get": {"operationId": "smart-configuration-fhir", "summary": "SMART configuration",
                    "security": _PUBLIC, "responses": _ok("SMART configuration", "application/json")}},
    }
    if system & {"transaction", "batch"}:
        bundle = _resource_body("Bundle")
        paths[prefix] = {"post": {"operationId": "transaction-batch", "summary": "transaction or batch Bundle",
                                  "requestBody": bundle, "responses": _ok("the response Bundle")}}
    if "history-system" in system:
        paths[f"{prefix}/_history"] = {"get": {"operationId": "history-system", "summary": "history of everything",
                                               "parameters": _PAGING, "responses": _ok("a history Bundle")}}
    if any(o["name"] == "export" for o in rest.get("operation", [])):
        paths.update(_bulk_paths(prefix))
    for resource in rest["resource"]:
        for path, methods in _type_paths(resource, prefix).items():
            paths.setdefault(path, {}).update(methods)
    return paths


def _bulk_paths(prefix: str) -> dict[str, dict[str, Any]]:
    """Bulk Data (fhir/bulk.py): system $export, the status URL, the output files."""
    job = {"name": "job", "in": "path", "required": True, "schema": {"type": "string"}}
    file = {"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}
    status = f"{prefix}/$bulk-status/{{job}}"
    kick_off = {"summary": "Bulk Data system-level export (Prefer: respond-async)", "parameters": [_PREFER_ASYNC],
                "responses": _ACCEPTED}
    return {
        f"{prefix}/$export": {"get": {"operationId": "export-system-get", **kick_off},
                              "post": {"operationId": "export-system-post", **kick_off}},
        status: {
            "get": {"operationId": "export-status", "summary": "export progress (202) or its manifest (200)",
                    "parameters": [job], "responses": _ok("the completion manifest", "application/json")},
            "delete": {"operationId": "export-cancel", "summary": "cancel an export and delete its files",
                       "parameters": [job], "responses": _ACCEPTED}},
        f"{prefix}/$bulk-output/{{job}}/{{file}}": {"get": {
            "operationId": "export-output", "summary": "one NDJSON output file (a signed link from the manifest)",
            "parameters": [job, file], "responses": _ok("NDJSON", "application/fhir+ndjson")}},
    }


def _route_paths(routes: Sequence[BaseRoute]) -> dict[str, dict[str, Any]]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route) or route.methods is None:
            continue
        doc = (route.endpoint.__doc__ or route.name or route.path).strip().splitlines()[0]
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in route.param_convertors]
        for method in sorted(route.methods - {"HEAD"}):
            paths.setdefault(route.path, {})[method.lower()] = {
                "operationId": f"{method.lower()}{route.path.replace('/', '-')}", "summary": doc,
                "parameters": params, "responses": {"default": {"description": "see the summary"}}}
    return paths


def openapi_document(capability: dict[str, Any], routes: Sequence[BaseRoute], *, fhir_prefix: str,
                     server_url: str) -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "fhirvault", "version": __version__,
                 "description": "HL7 FHIR R4 REST API (see /fhir/metadata), OAuth2/SMART and operations endpoints. "
                                "Bearer tokens come from /oauth2/token; the OAuth2, login, discovery and "
                                "health endpoints authenticate (or not) as their standards say, "
                                "whatever the default security requirement below."},
        "servers": [{"url": server_url}],
        "paths": {**_route_paths(routes), **_fhir_paths(capability, fhir_prefix)},
        "components": {
            "responses": {"Error": _ERROR, "Resource": _RESOURCE},
            "parameters": _SHARED_PARAMS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {"OperationOutcome": {"type": "object", "required": ["resourceType", "issue"],
                                             "properties": {"resourceType": {"type": "string"},
                                                            "issue": {"type": "array"}}}},
        },
        "security": [{"bearer": []}],
    }


def openapi_route(path: str, routes: Callable[[], Sequence[BaseRoute]], fhir_prefix: str,
                  capability: Callable[[str], bytes], fhir_base_url: Callable[[Scope, dict[str, str]], str]) -> Route:
    """``GET path``: the document for the FHIR base URL the FHIR endpoint would use for this request (the
    configured public URL, else a validated Host), built once per URL, bounded, like the CapabilityStatement."""
    cache: dict[str, bytes] = {}

    async def openapi(request: Request) -> Response:
        """The OpenAPI 3 description of this server's HTTP API."""
        base = fhir_base_url(request.scope, dict(request.headers))
        server_url = base[: -len(fhir_prefix)]
        body = cache.get(server_url)
        if body is None:
            doc = orjson.loads(capability(base))
            body = orjson.dumps(openapi_document(doc, routes(), fhir_prefix=fhir_prefix, server_url=server_url))
            if len(cache) < 16:
                cache[server_url] = body
        return Response(body, media_type="application/json")

    return Route(path, openapi, methods=["GET"])
