"""FHIR R4 REST semantics over the repository, independent of any web framework.

FhirRequest in, FhirResponse out: URL dispatch, content negotiation (XML is
converted to and from JSON at the edge, in ``handle``), JSON parsing, ETag /
If-Match / If-None-Match / If-Modified-Since, Prefer, and history Bundles with
paging. Errors are ``OperationOutcomeError``s.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson

from fhirvault.domain import errors
from fhirvault.domain.instants import http_date, instant, parse_fhir_datetime, parse_http_date
from fhirvault.domain.ips import IPS_BUNDLE_PROFILE
from fhirvault.domain.r4 import is_resource_type
from fhirvault.domain.search.query import ParsedSearch, safe_name
from fhirvault.domain.summary import elements, summary
from fhirvault.fhir.auditevent import to_audit_event, to_patient_view
from fhirvault.fhir.bulk import BulkRoutes
from fhirvault.fhir.bulk_import_api import ImportApi
from fhirvault.fhir.bundles import BundleProcessor
from fhirvault.fhir.lifecycle import OPERATIONS as LIFECYCLE_OPERATIONS
from fhirvault.fhir.lifecycle import lifecycle_operation
from fhirvault.fhir.messages import FhirRequest, FhirResponse
from fhirvault.fhir.negotiation import (
    FHIR_JSON,
    is_xml,
    negotiate,
    require_json_body,
    require_patch_body,
)
from fhirvault.fhir.operations import Operations
from fhirvault.fhir.xml import NotRepresentable, json_to_xml, xml_to_json
from fhirvault.services.audit_query import AuditPage, AuditQuery, AuditReader
from fhirvault.services.ips import patient_summary
from fhirvault.services.repository import HistoryPage, Repository, ResourceResult
from fhirvault.services.search import SearchOutcome
from fhirvault.services.terminology import TerminologyService

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
                 documents: Callable[[str], tuple[bytes, bytes]], *, default_count: int, max_count: int,
                 max_bundle_entries: int = 10_000, audit_reader: AuditReader, bulk: BulkRoutes | None = None,
                 terminology: TerminologyService | None = None,
                 bulk_import: ImportApi | None = None) -> None:
        """``documents(base_url)`` gives the CapabilityStatement and SMART configuration for that URL."""
        self._repo = repo
        self._trail = audit_reader
        self._bulk = bulk  # Bulk Data $export and its status/output URLs (fhir/bulk.py)
        self._types = resource_types
        self._documents = documents
        self._conditional_lock = asyncio.Lock()
        self._ops = Operations(repo)
        self._terminology = terminology
        self._bundles = BundleProcessor(repo, self._dispatch, self._resolve, max_entries=max_bundle_entries)
        self._default_count = default_count
        self._max_count = max_count
        self._import = bulk_import

    async def handle(self, req: FhirRequest) -> FhirResponse:
        if req.segments[:1] == ["$bulk-output"]:
            # NDJSON files (clients ask for application/fhir+ndjson): no JSON/XML negotiation
            accept = None if _NDJSON in (req.header("accept") or "") else req.header("accept")
            fmt, media = negotiate(accept, None)
        else:
            fmt, media = negotiate(req.header("accept"), req.param("_format"))
        if req.method in ("POST", "PUT") and is_xml(req.header("content-type")):
            # XML in: converted once here; everything below (bundle entries too) works in JSON.
            headers = {**req.headers, "content-type": FHIR_JSON}
            req = replace(req, body=xml_to_json(req.body), headers=headers)
        response = await self._dispatch(req)
        if response.body and "Content-Type" not in response.headers:
            if fmt == "xml":
                response.body = _as_xml(response.body)
            response.headers["Content-Type"] = f"{media}; charset=utf-8"
        return response

    async def _dispatch(self, req: FhirRequest) -> FhirResponse:
        seg, method = req.segments, req.method
        n = len(seg)
        if self._bulk is not None and seg and (seg[-1] == "$export" or seg[0].startswith("$bulk-")) \
                and (bulk := await self._bulk.route(req)) is not None:
            return bulk
        if n == 1 and seg[0] == "metadata":
            self._allow(method, "GET")
            return FhirResponse(200, self._documents(req.base_url)[0])
        if n == 2 and seg == [".well-known", "smart-configuration"]:
            self._allow(method, "GET")
            return FhirResponse(200, self._documents(req.base_url)[1], {"Content-Type": "application/json"})
        if n == 0:
            if method == "POST":
                require_json_body(req.header("content-type"))
                bundle = _parse_body(req.body)
                await self._refuse_audit_writes(req, bundle)
                return await self._bundles.handle(req, bundle)
            raise errors.not_implemented("System-level search is not supported; search one resource type.")
        if n == 1 and seg[0] == "_history":
            self._allow(method, "GET")
            return await self._history(req, None, None)
        if self._import is not None and seg[0] in ("$import", "$import-status"):
            return await self._import.handle(req)
        rtype = seg[0]
        if not is_resource_type(rtype):
            raise errors.not_found("Unknown resource type.")
        if rtype == "AuditEvent":  # served from the audit trail, never from the resource store
            return await self._audit_event(req)
        if n == 1:
            if method == "POST":
                return await self._create(req, rtype)
            if method in ("GET", "HEAD"):
                return await self._search(req, rtype, list(req.query))
            if method == "PUT" and req.query:
                return await self._conditional_update(req, rtype)
            if method == "DELETE" and req.query:
                return await self._conditional_delete(req, rtype)
            raise errors.method_not_allowed(f"{method} is not allowed on a resource type.")
        if rtype in ("CodeSystem", "ValueSet") and n in (2, 3) and seg[-1] in TERMINOLOGY_OPERATIONS:
            return await self._terminology_operation(req, rtype, seg[1] if n == 3 else None, seg[-1])
        if n == 2 and seg[1] == "_history":
            self._allow(method, "GET")
            return await self._history(req, rtype, None)
        if n == 2 and seg[1] == "_search":
            self._allow(method, "POST")
            return await self._search(req, rtype, [*req.query, *_form_params(req)])
        if n == 2 and seg[1] in _OPERATIONS:
            return await self._operation(req, rtype, None, seg[1])
        if rtype == "Patient" and seg[-1] == "$summary" and n in (2, 3):
            self._allow(method, "GET")
            return await self._summary(req, seg[1] if n == 3 else None)
        rid = seg[1]
        _check_id(rid)
        if n == 3 and seg[2] in _OPERATIONS:
            return await self._operation(req, rtype, rid, seg[2])
        if n == 5 and seg[2] == "_history" and seg[4] == "$meta" and _VERSION.match(seg[3]):
            self._allow(method, "GET")
            return await self._ops.meta(req, rtype, rid, int(seg[3]))
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
        if n == 3 and seg[2] == "$everything" and rtype == "Patient":
            self._allow(method, "GET")
            return await self._everything(req, rid)
        if n == 3 and seg[2] == "$break-glass" and rtype == "Patient":
            self._allow(method, "POST")
            return await self._break_glass(req, rid)
        if n == 3 and seg[2] in LIFECYCLE_OPERATIONS and rtype == "Patient":
            self._allow(method, "POST")
            require_json_body(req.header("content-type"))
            out = await lifecycle_operation(self._repo, req.ctx, rid, seg[2], _parse_body(req.body))
            return FhirResponse(200, out)
        if n == 3 and seg[2] == "$access-history" and rtype == "Patient":
            self._allow(method, "GET")
            return await self._access_history(req, rid)
        if seg[2] != "_history" or n > 4:
            raise errors.not_found("Unknown URL.")
        self._allow(method, "GET")
        if n == 3:
            return await self._history(req, rtype, rid)
        if not _VERSION.match(seg[3]):
            raise errors.bad_request("Malformed version id.")
        result = await self._repo.vread(req.ctx, rtype, rid, int(seg[3]))
        return self._resource_response(req, result, 200)

    async def _operation(self, req: FhirRequest, rtype: str, rid: str | None, name: str) -> FhirResponse:
        """$meta (GET or POST), $validate, $meta-add, $meta-delete (POST, JSON or XML Parameters)."""
        if name == "$meta" and req.method != "POST":
            self._allow(req.method, "GET")
        elif name != "$meta":
            self._allow(req.method, "POST")
        body: Any = None
        if req.body and name != "$meta":
            require_json_body(req.header("content-type"))
            body = _parse_body(req.body)
        if name == "$validate":
            return await self._ops.validate(req, rtype, rid, body or {"resourceType": "Parameters"})
        if rid is None:
            raise errors.not_implemented(f"{name} is served on one resource only ([type]/[id]/{name}).")
        if name == "$meta":
            return await self._ops.meta(req, rtype, rid, None)
        return await self._ops.meta_change(req, rtype, rid, body, add=name == "$meta-add")

    async def _terminology_operation(self, req: FhirRequest, rtype: str, rid: str | None, name: str) -> FhirResponse:
        """$lookup, $expand, $validate-code (GET, or POST Parameters): published reference data, no PHI, so
        any authenticated caller may use them and they are not audited (docs/terminology.md)."""
        if self._terminology is None:
            raise errors.not_implemented("Terminology operations are not enabled on this server.")
        if req.method not in ("GET", "POST"):
            raise errors.method_not_allowed(f"{name} takes GET or POST.")
        if rid is not None:
            _check_id(rid)
        body: Any = None
        if req.method == "POST" and req.body:
            require_json_body(req.header("content-type"))
            body = _parse_body(req.body)
        service = self._terminology
        stored = None
        if rtype == "ValueSet" and rid is not None and not await asyncio.to_thread(service.holds, rtype, rid):
            # a ValueSet stored through this API (read with the caller's rights, audited like any read)
            stored = orjson.loads((await self._repo.read(req.ctx, rtype, rid)).body)
        out = await asyncio.to_thread(service.run, rtype, rid, name, list(req.query), body, stored)
        return FhirResponse(200, orjson.dumps(out))

    async def _resolve(self, req: FhirRequest, rtype: str, query: list[tuple[str, str]]) -> list[str]:
        return await self._repo.find_ids(req.ctx, rtype, query)

    # -- search ----------------------------------------------------------------
    async def _search(self, req: FhirRequest, rtype: str, params: list[tuple[str, str]]) -> FhirResponse:
        paging = {k: v for k, v in params if k in _PAGING}
        criteria = [(k, v) for k, v in params if k not in _PAGING]
        strict = _prefer_handling(req.header("prefer")) == "strict"
        parsed = await self._repo.parse(req.ctx, rtype, criteria, strict=strict, base_url=req.base_url)
        count = self._default_count if parsed.count is None else min(parsed.count, self._max_count)
        after = _cursor(paging, "_page_after")
        before = _cursor(paging, "_page_before")
        snapshot = _cursor(paging, "_snapshot")
        offset = _cursor(paging, "_offset") or 0
        outcome = await self._repo.search(req.ctx, parsed, count=count, after=after, before=before,
                                          snapshot=snapshot, offset=offset, query_text=urlencode(criteria))
        return FhirResponse(200, _searchset(req, rtype, parsed, outcome, count, criteria))

    async def _everything(self, req: FhirRequest, pid: str) -> FhirResponse:
        params = dict(req.query)
        types = None
        if "_type" in params:
            types = frozenset(t for t in params["_type"].split(",") if t)
            if not all(is_resource_type(t) for t in types):
                raise errors.bad_request("_type names an unknown resource type.", "_type")
        since_ms = None
        if "_since" in params:
            since_ms = parse_fhir_datetime(params["_since"])
            if since_ms is None:
                raise errors.bad_request("_since must be a FHIR instant (e.g. 2026-01-31T12:00:00Z).", "_since")
        count = self._default_count
        if "_count" in params:
            if not params["_count"].isdigit() or len(params["_count"]) > 6:
                raise errors.bad_request("_count must be a non-negative integer.", "_count")
            count = min(int(params["_count"]), self._max_count)
        offset = _cursor(params, "_offset") or 0
        outcome = await self._repo.everything(req.ctx, pid, types=types, since_ms=since_ms, count=count,
                                              offset=offset, snapshot=_cursor(params, "_snapshot"))
        keep = [(k, v) for k, v in req.query if k in ("_type", "_since")]
        return FhirResponse(200, _searchset(req, f"Patient/{pid}/$everything", ParsedSearch("Patient"),
                                            outcome, count, keep))

    async def _summary(self, req: FhirRequest, pid: str | None) -> FhirResponse:
        """Patient/[id]/$summary or Patient/$summary?identifier=system|value: the IPS document Bundle."""
        identifier = None
        for name, value in req.query:
            if name == "identifier":
                if identifier is not None:
                    raise errors.bad_request("identifier is given more than once.", "identifier")
                identifier = value
            elif name not in ("_format", "_pretty", "profile"):
                raise errors.bad_request(f"Unsupported $summary parameter: {safe_name(name)}", safe_name(name))
        profile = req.param("profile")
        if profile not in (None, IPS_BUNDLE_PROFILE):
            raise errors.bad_request("Only the IPS Bundle profile is supported.", "profile", code="not-supported")
        if pid is None:
            if identifier is None:
                raise errors.bad_request("Patient/$summary needs identifier=system|value (or use Patient/[id]/$summary).",
                                         "identifier")
            ids = await self._repo.find_ids(req.ctx, "Patient", [("identifier", identifier)])
            if len(ids) > 1:
                raise errors.precondition_failed("The identifier matches more than one patient.")
            if not ids:
                raise errors.not_found("No patient has this identifier.")
            pid = ids[0]
        else:
            _check_id(pid)
        bundle = await patient_summary(self._repo, req.ctx, pid, base_url=req.base_url,
                                       now_ms=int(time.time() * 1000))
        return FhirResponse(200, orjson.dumps(bundle))

    async def _break_glass(self, req: FhirRequest, pid: str) -> FhirResponse:
        """Patient/{id}/$break-glass: Parameters(reason, purposeOfUse=ETREAT) -> a time-limited grant."""
        require_json_body(req.header("content-type"))
        body = _parse_body(req.body)
        if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
            raise errors.bad_request("$break-glass takes a Parameters resource.", code="structure")
        values: dict[str, Any] = {}
        for param in body.get("parameter") or ():
            if isinstance(param, dict) and param.get("name") in ("reason", "purposeOfUse"):
                value = param.get("valueString")
                if value is None and isinstance(param.get("valueCode"), str):
                    value = param["valueCode"]
                if value is None and isinstance(param.get("valueCoding"), dict):
                    value = param["valueCoding"].get("code")
                values[param["name"]] = value
        grant = await self._repo.start_break_glass(req.ctx, pid, values.get("reason"), values.get("purposeOfUse"))
        out = {"resourceType": "Parameters", "parameter": [
            {"name": "grant", "valueString": grant.grant_id},
            {"name": "patient", "valueReference": {"reference": f"Patient/{pid}"}},
            {"name": "purposeOfUse", "valueCode": grant.purpose_of_use},
            {"name": "expires", "valueInstant": instant(grant.expires_ms)},
        ]}
        return FhirResponse(201, orjson.dumps(out))

    # -- the audit trail ----------------------------------------------------------
    async def _audit_event(self, req: FhirRequest) -> FhirResponse:
        """AuditEvent: search and read only; the server alone writes the trail."""
        seg, method = req.segments, req.method
        reading = method in ("GET", "HEAD")
        if len(seg) == 1 and reading:
            return await self._audit_search(req, list(req.query))
        if seg[1:] == ["_search"] and method == "POST":
            return await self._audit_search(req, [*req.query, *_form_params(req)])
        if len(seg) == 2 and reading and seg[1] not in ("_search", "_history"):
            _check_id(seg[1])
            seq, record = await self._trail.read(req.ctx, seg[1])
            body = to_audit_event(seq, record, server_id=self._trail.server_id, base_url=req.base_url)
            return FhirResponse(200, orjson.dumps(body), {"ETag": 'W/"1"'})
        if not reading:
            interaction = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, "operation")
            target = f"AuditEvent/{seg[1]}" if len(seg) > 1 and _ID.match(seg[1]) else "AuditEvent"
            await self._trail.refuse_write(req.ctx, interaction, target)
        raise errors.method_not_allowed("AuditEvent supports read and search only.")

    async def _audit_search(self, req: FhirRequest, params: list[tuple[str, str]]) -> FhirResponse:
        query, page = await self._trail.search(req.ctx, params, count=self._page_size(params),
                                               base_url=req.base_url)
        events = [to_audit_event(seq, r, server_id=self._trail.server_id, base_url=req.base_url)
                  for seq, r in page.entries]
        return FhirResponse(200, _audit_bundle(req, "AuditEvent", query, page, events))

    async def _access_history(self, req: FhirRequest, pid: str) -> FhirResponse:
        params = list(req.query)
        query, page = await self._trail.access_history(req.ctx, pid, params, count=self._page_size(params))
        trail = self._trail
        events = [to_patient_view(seq, r, f"Patient/{pid}", server_id=trail.server_id, show_names=trail.show_names)
                  for seq, r in page.entries]
        return FhirResponse(200, _audit_bundle(req, f"Patient/{pid}/$access-history", query, page, events))

    def _page_size(self, params: list[tuple[str, str]]) -> int:
        """The page size cap; the query's own _count (validated by the parser) may lower it."""
        return self._default_count if all(k != "_count" for k, _ in params) else self._max_count

    async def _refuse_audit_writes(self, req: FhirRequest, bundle: Any) -> None:
        """Transaction entries are written through the repository, not routed: refuse AuditEvent writes here."""
        entries = bundle.get("entry") if isinstance(bundle, dict) and bundle.get("type") == "transaction" else None
        if not isinstance(entries, list):
            return
        for entry in entries:
            request = entry.get("request") if isinstance(entry, dict) else None
            if not isinstance(request, dict) or str(request.get("method", "GET")).upper() in ("GET", "HEAD"):
                continue
            url = str(request.get("url", "")).split("?")[0].strip("/")
            if url.split("/")[0] == "AuditEvent" or url.startswith(req.base_url.rstrip("/") + "/AuditEvent"):
                await self._trail.refuse_write(req.ctx, "transaction", "AuditEvent")

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
            current = await self._repo.readable_current(req.ctx, rtype, rid)
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
        body = _parse_body(req.body)
        if not isinstance(body, dict):
            raise errors.bad_request("The body must be a JSON object (a FHIR resource).", code="structure")
        condition = req.header("if-none-exist")
        if condition is not None:
            ids = await self._repo.find_ids(req.ctx, rtype, parse_qsl(condition.lstrip("?"), keep_blank_values=True))
            if len(ids) > 1:
                raise errors.precondition_failed("If-None-Exist matches more than one resource.")
            if ids:  # R4: the resource exists, answer 200 with it and create nothing
                return self._resource_response(req, await self._repo.read(req.ctx, rtype, ids[0]), 200)
            # Checked and created under one lock: two identical conditional creates never both create
            # (in the database too, when other processes share it: see Repository.create_unless).
            async with self._conditional_lock:
                params = parse_qsl(condition.lstrip("?"), keep_blank_values=True)
                ids = await self._repo.find_ids(req.ctx, rtype, params)
                if not ids:
                    created = await self._repo.create_unless(req.ctx, rtype, body, params)
                    if not isinstance(created, list):
                        return self._resource_response(req, created, 201)
                    ids = created
                if len(ids) > 1:
                    raise errors.precondition_failed("If-None-Exist matches more than one resource.")
                return self._resource_response(req, await self._repo.read(req.ctx, rtype, ids[0]), 200)
        result = await self._repo.create(req.ctx, rtype, body)
        return self._resource_response(req, result, 201)

    async def _conditional_update(self, req: FhirRequest, rtype: str) -> FhirResponse:
        require_json_body(req.header("content-type"))
        body = _parse_body(req.body)
        if not isinstance(body, dict):
            raise errors.bad_request("The body must be a JSON object (a FHIR resource).", code="structure")
        if_match = _parse_etag(req.header("if-match"), "If-Match")
        async with self._conditional_lock:
            ids = await self._repo.find_ids(req.ctx, rtype, list(req.query))
            if not ids and body.get("id") is None:
                # No match: create, unless another process creates a match meanwhile (then update it).
                created = await self._repo.create_unless(req.ctx, rtype, dict(body), list(req.query))
                if not isinstance(created, list):
                    return self._resource_response(req, created, 201)
                ids = created
            if len(ids) > 1:
                raise errors.precondition_failed("The conditional update matches more than one resource.")
            if ids:
                if body.get("id") not in (None, ids[0]):
                    raise errors.bad_request("The id in the body does not match the resource the condition found.")
                body["id"] = ids[0]
                result = await self._repo.update(req.ctx, rtype, ids[0], body, if_match)
            else:
                body_id = body.get("id")
                if body_id is None:
                    result = await self._repo.create(req.ctx, rtype, body)
                else:
                    _check_id(str(body_id))
                    result = await self._repo.update(req.ctx, rtype, str(body_id), body, if_match)
        return self._resource_response(req, result, 201 if result.created else 200)

    async def _conditional_delete(self, req: FhirRequest, rtype: str) -> FhirResponse:
        # Search and delete as one step (see Repository.delete_matching): the deleted version is the one matched.
        await self._repo.delete_matching(req.ctx, rtype, list(req.query))
        return FhirResponse(204, b"", {})

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


def _as_xml(body: bytes) -> bytes:
    try:
        return json_to_xml(body)
    except NotRepresentable:
        raise errors.not_acceptable("This content has no FHIR XML form; ask for JSON (_format=json).") from None


_NDJSON = "ndjson"  # application/fhir+ndjson, application/ndjson
_OPERATIONS = frozenset({"$validate", "$meta", "$meta-add", "$meta-delete"})
TERMINOLOGY_OPERATIONS = frozenset({"$lookup", "$expand", "$validate-code"})
_PAGING = ("_page_after", "_page_before", "_snapshot", "_offset")


def _cursor(paging: dict[str, str], name: str) -> int | None:
    raw = paging.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise errors.bad_request("Malformed paging cursor.", name)
    return int(raw)


def _form_params(req: FhirRequest) -> list[tuple[str, str]]:
    ctype = (req.header("content-type") or "").split(";")[0].strip().lower()
    if not req.body:
        return []
    if ctype != "application/x-www-form-urlencoded":
        raise errors.unsupported_media_type("POST _search takes application/x-www-form-urlencoded parameters.")
    try:
        return parse_qsl(req.body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise errors.bad_request("The search form is not valid UTF-8.") from None


def _prefer_handling(prefer: str | None) -> str:
    if prefer:
        for item in prefer.replace(";", ",").split(","):
            key, _, value = item.strip().partition("=")
            if key.strip().lower() == "handling" and value.strip().strip('"').lower() in ("strict", "lenient"):
                return value.strip().strip('"').lower()
    return "lenient"


def _searchset(req: FhirRequest, rtype: str, parsed: ParsedSearch, out: SearchOutcome, count: int,
               criteria: list[tuple[str, str]]) -> bytes:
    base_link = f"{req.base_url}/{rtype}"

    def link(extra: list[tuple[str, str]]) -> str:
        keep = [(k, v) for k, v in criteria if k != "_count"]
        return f"{base_link}?{urlencode([*keep, ('_count', str(count)), *extra])}"

    snap = [("_snapshot", str(out.snapshot))]
    links = [{"relation": "self", "url": link([])}]
    if out.next_after is not None:
        links.append({"relation": "next", "url": link([("_page_after", str(out.next_after)), *snap])})
    if out.prev_before is not None:
        links.append({"relation": "previous", "url": link([("_page_before", str(out.prev_before)), *snap])})
    if out.next_offset is not None:
        links.append({"relation": "next", "url": link([("_offset", str(out.next_offset)), *snap])})
    if out.prev_offset is not None:
        links.append({"relation": "previous", "url": link([("_offset", str(out.prev_offset)), *snap])})
    entries: list[dict[str, Any]] = []
    for mode, items in (("match", out.matches), ("include", out.includes)):
        for m in items:
            v = m.version
            resource: Any = orjson.Fragment(m.body)
            if parsed.summary in ("true", "text", "data"):
                resource = summary(m.resource, parsed.summary)
            elif parsed.elements and mode == "match":
                resource = elements(m.resource, list(parsed.elements))
            entries.append({"fullUrl": f"{req.base_url}/{v.type}/{v.id}", "resource": resource,
                            "search": {"mode": mode}})
    warnings = list(out.warnings)
    for name in parsed.unknown:
        warnings.append(errors.Issue("warning", "not-supported", f"Unknown search parameter ignored: {safe_name(name)}"))
    if warnings:
        entries.append({"resource": errors.operation_outcome(warnings), "search": {"mode": "outcome"}})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if out.total is not None:
        bundle["total"] = out.total
    bundle["link"] = links
    if parsed.summary != "count":
        bundle["entry"] = entries
    return orjson.dumps(bundle)


def _audit_bundle(req: FhirRequest, path: str, query: AuditQuery, page: AuditPage,
                  events: list[dict[str, Any]]) -> bytes:
    base_link = f"{req.base_url}/{path}"
    keep = [*query.criteria, ("_sort", "-date" if query.descending else "date")]
    if query.count is not None:
        keep.append(("_count", str(query.count)))
    links = [{"relation": "self", "url": f"{base_link}?{urlencode(keep)}"}]
    if page.next_cursor is not None:
        links.append({"relation": "next", "url": f"{base_link}?{urlencode([*keep, ('_cursor', page.next_cursor)])}"})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if page.total is not None:
        bundle["total"] = page.total
    bundle["link"] = links
    bundle["entry"] = [{"fullUrl": f"{req.base_url}/AuditEvent/{e['id']}", "resource": e, "search": {"mode": "match"}}
                       for e in events]
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
