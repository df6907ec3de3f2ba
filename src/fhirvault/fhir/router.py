"""FHIR R4 REST semantics over the repository, independent of any web framework.

FhirRequest in, FhirResponse out: URL dispatch, content negotiation, JSON
parsing, ETag / If-Match / If-None-Match / If-Modified-Since, Prefer, and
history Bundles with paging. Errors are ``OperationOutcomeError``s.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import orjson

from fhirvault.domain import errors
from fhirvault.domain.instants import http_date, instant, parse_fhir_datetime, parse_http_date
from fhirvault.domain.r4 import is_resource_type
from fhirvault.fhir.messages import FhirRequest, FhirResponse
from fhirvault.fhir.negotiation import require_json_body, require_patch_body, response_type
from fhirvault.services.repository import HistoryPage, Repository, ResourceResult

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_VERSION = re.compile(r"^[0-9]{1,9}$")
_ETAG = re.compile(r'^\s*(?:W/)?"([0-9]{1,9})"\s*$')


def is_public(method: str, segments: list[str]) -> bool:
    """Routes that need no token: the CapabilityStatement and SMART discovery."""
    if method not in ("GET", "HEAD"):
        return False
    return segments == ["metadata"] or segments == [".well-known", "smart-configuration"]


def _parse_etag(value: str | None, header: str) -> int | None:
    if value is None:
        return None
    m = _ETAG.match(value)
    if m is None:
        raise errors.bad_request(f'{header} must be a version ETag like W/"3".', header)
    return int(m.group(1))


def _check_id(rid: str) -> None:
    if not _ID.match(rid):
        raise errors.bad_request("Malformed resource id (1-64 of A-Z a-z 0-9 - .).")


def _parse_body(body: bytes) -> Any:
    if not body:
        raise errors.bad_request("The request body is empty.")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise errors.bad_request("The request body is not valid JSON.", code="structure") from None


def _resource_headers(r: ResourceResult, location_base: str) -> dict[str, str]:
    return {
        "ETag": f'W/"{r.version}"',
        "Last-Modified": http_date(r.last_updated_ms),
        "Location" if r.created else "Content-Location": f"{location_base}/{r.type}/{r.id}/_history/{r.version}",
    }


class FhirRouter:
    def __init__(self, repo: Repository, resource_types: frozenset[str],
                 documents: Callable[[str], tuple[bytes, bytes]], *, default_count: int, max_count: int) -> None:
        """``documents(base_url)`` gives the CapabilityStatement and SMART configuration for that URL."""
        self._repo = repo
        self._types = resource_types
        self._documents = documents
        self._default_count = default_count
        self._max_count = max_count

    async def handle(self, req: FhirRequest) -> FhirResponse:
        media = response_type(req.header("accept"), req.param("_format"))
        response = await self._dispatch(req)
        if response.body:
            response.headers.setdefault("Content-Type", f"{media}; charset=utf-8")
        return response

    async def _dispatch(self, req: FhirRequest) -> FhirResponse:
        seg, method = req.segments, req.method
        n = len(seg)
        if n == 1 and seg[0] == "metadata":
            self._allow(method, "GET")
            return FhirResponse(200, self._documents(req.base_url)[0])
        if n == 2 and seg == [".well-known", "smart-configuration"]:
            self._allow(method, "GET")
            return FhirResponse(200, self._documents(req.base_url)[1], {"Content-Type": "application/json"})
        if n == 0:
            raise errors.not_implemented("Batch/transaction bundles and system search are not supported yet.")
        if n == 1 and seg[0] == "_history":
            self._allow(method, "GET")
            return await self._history(req, None, None)
        rtype = seg[0]
        if not is_resource_type(rtype):
            raise errors.not_found("Unknown resource type.")
        if n == 1:
            if method == "POST":
                return await self._create(req, rtype)
            if method == "GET":
                raise errors.not_implemented("Search is not supported yet.")
            raise errors.method_not_allowed(f"{method} is not allowed on a resource type.")
        if n == 2 and seg[1] == "_history":
            self._allow(method, "GET")
            return await self._history(req, rtype, None)
        if n == 2 and seg[1] == "_search":
            raise errors.not_implemented("Search is not supported yet.")
        rid = seg[1]
        _check_id(rid)
        if n == 2:
            if method in ("GET", "HEAD"):
                return await self._read(req, rtype, rid)
            if method == "PUT":
                return await self._update(req, rtype, rid)
            if method == "PATCH":
                return await self._patch(req, rtype, rid)
            if method == "DELETE":
                return await self._delete(req, rtype, rid)
            raise errors.method_not_allowed(f"{method} is not allowed on a resource.")
        if seg[2] != "_history" or n > 4:
            raise errors.not_found("Unknown URL.")
        self._allow(method, "GET")
        if n == 3:
            return await self._history(req, rtype, rid)
        if not _VERSION.match(seg[3]):
            raise errors.bad_request("Malformed version id.")
        result = await self._repo.vread(req.ctx, rtype, rid, int(seg[3]))
        return self._resource_response(req, result, 200)

    @staticmethod
    def _allow(method: str, allowed: str) -> None:
        if method != allowed and not (allowed == "GET" and method == "HEAD"):
            raise errors.method_not_allowed(f"Only {allowed} is allowed here.")

    # -- responses -------------------------------------------------------------
    def _resource_response(self, req: FhirRequest, r: ResourceResult, status: int) -> FhirResponse:
        headers = _resource_headers(r, req.base_url)
        prefer = _prefer_return(req.header("prefer"))
        if req.method in ("GET", "HEAD") or prefer == "representation":
            return FhirResponse(status, r.body, headers)
        if prefer == "minimal":
            return FhirResponse(status, b"", headers)
        outcome = errors.operation_outcome([errors.Issue("information", "informational", "Operation succeeded.")])
        return FhirResponse(status, orjson.dumps(outcome), headers)

    # -- interactions ----------------------------------------------------------
    async def _read(self, req: FhirRequest, rtype: str, rid: str) -> FhirResponse:
        inm = req.header("if-none-match")
        ims = req.header("if-modified-since")
        if inm is not None or ims is not None:
            await self._repo.authorize(req.ctx, rtype, "r", "read", f"{rtype}/{rid}")
            current = self._repo.current_version(rtype, rid)
            if current is not None and not current.deleted:
                not_modified = False
                if inm is not None:
                    not_modified = inm.strip() == "*" or _parse_etag(inm, "If-None-Match") == current.version
                elif ims is not None:
                    since = parse_http_date(ims)
                    not_modified = since is not None and current.last_updated_ms // 1000 <= since // 1000
                if not_modified:
                    return FhirResponse(304, b"", {"ETag": f'W/"{current.version}"',
                                                   "Last-Modified": http_date(current.last_updated_ms)})
        result = await self._repo.read(req.ctx, rtype, rid)
        return self._resource_response(req, result, 200)

    async def _create(self, req: FhirRequest, rtype: str) -> FhirResponse:
        require_json_body(req.header("content-type"))
        if req.header("if-none-exist") is not None:
            raise errors.not_implemented("Conditional create (If-None-Exist) is not supported yet.")
        body = _parse_body(req.body)
        if not isinstance(body, dict):
            raise errors.bad_request("The body must be a JSON object (a FHIR resource).", code="structure")
        result = await self._repo.create(req.ctx, rtype, body)
        return self._resource_response(req, result, 201)

    async def _update(self, req: FhirRequest, rtype: str, rid: str) -> FhirResponse:
        require_json_body(req.header("content-type"))
        if_match = _parse_etag(req.header("if-match"), "If-Match")
        body = _parse_body(req.body)
        if not isinstance(body, dict):
            raise errors.bad_request("The body must be a JSON object (a FHIR resource).", code="structure")
        result = await self._repo.update(req.ctx, rtype, rid, body, if_match)
        return self._resource_response(req, result, 201 if result.created else 200)

    async def _patch(self, req: FhirRequest, rtype: str, rid: str) -> FhirResponse:
        require_patch_body(req.header("content-type"))
        if_match = _parse_etag(req.header("if-match"), "If-Match")
        result = await self._repo.patch(req.ctx, rtype, rid, _parse_body(req.body), if_match)
        return self._resource_response(req, result, 200)

    async def _delete(self, req: FhirRequest, rtype: str, rid: str) -> FhirResponse:
        if_match = _parse_etag(req.header("if-match"), "If-Match")
        version = await self._repo.delete(req.ctx, rtype, rid, if_match)
        headers = {"ETag": f'W/"{version}"'} if version is not None else {}
        return FhirResponse(204, b"", headers)

    async def _history(self, req: FhirRequest, rtype: str | None, rid: str | None) -> FhirResponse:
        since_ms = None
        if (since := req.param("_since")) is not None:
            since_ms = parse_fhir_datetime(since)
            if since_ms is None:
                raise errors.bad_request("_since must be a FHIR instant (e.g. 2026-01-31T12:00:00Z).", "_since")
        count = self._default_count
        if (raw := req.param("_count")) is not None:
            if not raw.isdigit() or len(raw) > 6:
                raise errors.bad_request("_count must be a non-negative integer.", "_count")
            count = min(int(raw), self._max_count)
        before = None
        if (cursor := req.param("_page_before")) is not None:
            if not cursor.isdigit() or len(cursor) > 18:
                raise errors.bad_request("Malformed paging cursor.", "_page_before")
            before = int(cursor)
        for name, _ in req.query:
            if name not in ("_since", "_count", "_page_before", "_format", "_pretty"):
                raise errors.bad_request(f"Unsupported history parameter: {name[:64]}", name[:64])
        page = await self._repo.history(req.ctx, rtype, rid, since_ms=since_ms, before_seq=before,
                                        count=count, all_types=self._types)
        return FhirResponse(200, self._history_bundle(req, rtype, rid, page, since, count, before))

    def _history_bundle(self, req: FhirRequest, rtype: str | None, rid: str | None, page: HistoryPage,
                        since: str | None, count: int, before: int | None) -> bytes:
        path = "/".join(p for p in (rtype, rid) if p) + "/_history"
        base_link = f"{req.base_url}/{path.lstrip('/')}"

        def link(cursor: int | None) -> str:
            params: list[tuple[str, str]] = []
            if since is not None:
                params.append(("_since", since))
            params.append(("_count", str(count)))
            if cursor is not None:
                params.append(("_page_before", str(cursor)))
            return f"{base_link}?{urlencode(params)}"

        links = [{"relation": "self", "url": link(before)}]
        if page.next_before_seq is not None:
            links.append({"relation": "next", "url": link(page.next_before_seq)})
        entries: list[dict[str, Any]] = []
        for e in page.entries:
            v = e.version
            full = f"{req.base_url}/{v.type}/{v.id}"
            entry: dict[str, Any] = {"fullUrl": full}
            if e.body is not None:
                entry["resource"] = orjson.Fragment(e.body)
                method = "POST" if v.version == 1 else "PUT"
                status = "201 Created" if v.version == 1 else "200 OK"
            else:
                method, status = "DELETE", "204 No Content"
            entry["request"] = {"method": method, "url": f"{v.type}/{v.id}" if method != "POST" else v.type}
            entry["response"] = {"status": status, "etag": f'W/"{v.version}"', "lastModified": instant(v.last_updated_ms)}
            entries.append(entry)
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history"}
        if page.total is not None:
            bundle["total"] = page.total
        bundle["link"] = links
        bundle["entry"] = entries
        return orjson.dumps(bundle)


def _prefer_return(prefer: str | None) -> str:
    if prefer:
        for part in prefer.split(";"):
            for item in part.split(","):
                key, _, value = item.strip().partition("=")
                if key.strip().lower() == "return":
                    value = value.strip().strip('"').lower()
                    if value in ("minimal", "representation", "operationoutcome"):
                        return "outcome" if value == "operationoutcome" else value
    return "representation"
