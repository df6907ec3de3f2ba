"""FHIR Bulk Data Access (v2) over HTTP: $export kick-off, status polling, cancel, output files.

Transport-free like fhir/router.py, which hands these URLs here first:
  GET|POST  [base]/$export, [base]/Patient/$export, [base]/Group/[id]/$export   (Prefer: respond-async)
  GET       [base]/$bulk-status/[job]   202 + X-Progress while running, 200 + manifest when done
  DELETE    [base]/$bulk-status/[job]   cancel: the job and its files are deleted (then 404)
  GET       [base]/$bulk-output/[job]/[file]?expires=…&sig=…   one NDJSON file (signed link + token)
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson

from fhirvault.domain import errors
from fhirvault.domain.instants import http_date, parse_fhir_datetime
from fhirvault.domain.r4 import is_resource_type
from fhirvault.domain.search.query import parse_search
from fhirvault.fhir.messages import FhirRequest, FhirResponse
from fhirvault.fhir.negotiation import require_json_body
from fhirvault.services.bulk_export import BulkExportService, ExportRequest
from fhirvault.services.bulk_jobs import COMPLETED, FAILED

NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
# Bulk Data v2 kick-off parameters this server does not implement: 400, or a warning when lenient.
_UNSUPPORTED = frozenset({"_elements", "includeAssociatedData", "_typeElements", "organizeOutputBy", "_until",
                          "allowPartialManifests"})
_IGNORED = frozenset({"_format", "_pretty"})  # response formatting: meaningless for an async kick-off
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
RETRY_AFTER_SECONDS = 2


def _prefer(req: FhirRequest) -> tuple[bool, bool]:
    """(respond-async asked, handling=lenient asked)."""
    items = [i.strip().lower().replace(" ", "") for i in (req.header("prefer") or "").replace(";", ",").split(",")]
    return "respond-async" in items, "handling=lenient" in items


def _parameters(req: FhirRequest) -> list[tuple[str, str]]:
    """Kick-off parameters: the query (GET), or a Parameters resource (POST, JSON or XML)."""
    if req.method == "GET":
        return list(req.query)
    if not req.body:
        return [(k, v) for k, v in req.query if k in _IGNORED]
    require_json_body(req.header("content-type"))
    try:
        body = orjson.loads(req.body)
    except orjson.JSONDecodeError:
        raise errors.bad_request("The request body is not valid JSON.", code="structure") from None
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise errors.bad_request("A POST $export takes a Parameters resource.", code="structure")
    params = body.get("parameter") or []
    if not isinstance(params, list):
        raise errors.bad_request("Parameters.parameter must be a list.", code="structure")
    out: list[tuple[str, str]] = []
    for param in params:
        if not isinstance(param, dict) or not isinstance(param.get("name"), str):
            raise errors.bad_request("Each parameter needs a name.", code="structure")
        value: Any = None
        for key, item in param.items():
            if key.startswith("value"):
                value = item.get("reference") if key == "valueReference" and isinstance(item, dict) else item
        if not isinstance(value, str):
            raise errors.bad_request(f"Parameter {param['name'][:64]} needs a string, code, instant or reference "
                                     "value.", param["name"][:64])
        out.append((param["name"], value))
    return out


def parse_kick_off(req: FhirRequest, level: str, group: str | None) -> ExportRequest:
    """Validate a kick-off's parameters (Bulk Data v2); unsupported ones are a 400 unless lenient."""
    asynchronous, lenient = _prefer(req)
    if not asynchronous:
        raise errors.bad_request("$export runs asynchronously: send the header 'Prefer: respond-async'.", "Prefer")
    warnings: list[str] = []

    def refuse(message: str, name: str) -> None:
        if not lenient:
            raise errors.bad_request(message + " (send 'Prefer: handling=lenient' to ignore it)", name)
        warnings.append(message + " (ignored)")

    types: list[str] | None = None
    since_ms: int | None = None
    filters: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    patients: list[str] | None = None
    for name, value in _parameters(req):
        if name == "_outputFormat":
            if value not in OUTPUT_FORMATS:
                raise errors.bad_request("_outputFormat must be application/fhir+ndjson (or application/ndjson, "
                                         "ndjson).", "_outputFormat")
        elif name == "_type":
            for rtype in (t.strip() for t in value.split(",") if t.strip()):
                if not is_resource_type(rtype):
                    refuse(f"_type names an unknown resource type: {rtype[:64]}", "_type")
                elif rtype not in (types or []):
                    types = [*(types or []), rtype]
        elif name == "_since":
            since_ms = parse_fhir_datetime(value)
            if since_ms is None:
                raise errors.bad_request("_since must be a FHIR instant (e.g. 2026-01-31T12:00:00Z).", "_since")
        elif name == "_typeFilter":
            for query in (q for q in value.split(",") if q):
                filters.append(_type_filter(query))
        elif name == "patient" and level != "system":
            ref = value.strip()
            if not ref.startswith("Patient/") or not _ID.match(ref[len("Patient/"):]):
                raise errors.bad_request("patient must be a reference like Patient/123.", "patient")
            patients = [*(patients or []), ref[len("Patient/"):]]
        elif name in _IGNORED:
            continue
        elif name in _UNSUPPORTED:
            refuse(f"The parameter {name} is not supported by this server", name)
        else:
            refuse(f"Unknown $export parameter: {name[:64]}", name[:64])
    if types is not None:
        missing = sorted({t for t, _ in filters} - set(types))
        if missing:
            raise errors.bad_request(f"_typeFilter names types missing from _type: {', '.join(missing[:10])}",
                                     "_typeFilter")
    return ExportRequest(level, _request_url(req), tuple(types) if types is not None else None, since_ms,
                         tuple(filters), group, tuple(patients) if patients is not None else None, tuple(warnings))


def _type_filter(query: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """One ``Type?params`` search query of _typeFilter, checked with the search parser (strict)."""
    rtype, sep, params = query.partition("?")
    if not sep or not is_resource_type(rtype):
        raise errors.bad_request("_typeFilter must be Type?search-parameters, e.g. "
                                 "Observation?category=laboratory.", "_typeFilter")
    pairs = tuple(parse_qsl(params, keep_blank_values=True))
    if not pairs:
        raise errors.bad_request("A _typeFilter query needs at least one search parameter.", "_typeFilter")
    parsed = parse_search(rtype, list(pairs), strict=True)  # a SearchError is a 400
    if parsed.includes or parsed.revincludes or parsed.sort or parsed.summary or parsed.elements:
        raise errors.bad_request("_typeFilter takes search criteria only (no _include, _sort, _summary, "
                                 "_elements).", "_typeFilter")
    return rtype, pairs


def _request_url(req: FhirRequest) -> str:
    path = "/".join(req.segments)
    query = urlencode(req.query)
    return f"{req.base_url}/{path}" + (f"?{query}" if query else "")


class BulkRoutes:
    def __init__(self, service: BulkExportService) -> None:
        self._s = service

    async def route(self, req: FhirRequest) -> FhirResponse | None:
        """The response if ``req`` is a Bulk Data URL, else None (the router carries on)."""
        seg = req.segments
        if seg == ["$export"]:
            return await self._kick_off(req, "system", None, "$export")
        if seg == ["Patient", "$export"]:
            return await self._kick_off(req, "patient", None, "Patient/$export")
        if len(seg) == 3 and seg[0] == "Group" and seg[2] == "$export":
            if not _ID.match(seg[1]):
                raise errors.bad_request("Malformed resource id (1-64 of A-Z a-z 0-9 - .).")
            return await self._kick_off(req, "group", seg[1], f"Group/{seg[1]}/$export")
        if len(seg) == 2 and seg[0] == "$bulk-status":
            return await self._status(req, seg[1])
        if len(seg) == 3 and seg[0] == "$bulk-output":
            if req.method not in ("GET",):
                raise errors.method_not_allowed(f"{req.method} is not allowed here; allowed: GET.")
            data = await self._s.download(req.ctx, seg[1], seg[2], req.param("expires"), req.param("sig"))
            return FhirResponse(200, data, {"Content-Type": NDJSON, "Cache-Control": "no-store"})
        return None

    async def _kick_off(self, req: FhirRequest, level: str, group: str | None, entity: str) -> FhirResponse:
        if req.method not in ("GET", "POST"):
            raise errors.method_not_allowed(f"{req.method} is not allowed here; allowed: GET, POST.")
        request = parse_kick_off(req, level, group)
        job = await self._s.kick_off(req.ctx, request, entity)
        return FhirResponse(202, b"", {"Content-Location": f"{req.base_url}/$bulk-status/{job.job_id}"})

    async def _status(self, req: FhirRequest, job_id: str) -> FhirResponse:
        if req.method == "DELETE":
            await self._s.cancel(req.ctx, job_id)
            return FhirResponse(202, b"")
        if req.method not in ("GET", "HEAD"):
            raise errors.method_not_allowed(f"{req.method} is not allowed here; allowed: GET, DELETE.")
        job = await self._s.owned(req.ctx, job_id, "export-status")
        if job.status == COMPLETED:
            body = orjson.dumps(self._s.manifest(job, req.base_url))
            return FhirResponse(200, body, {"Content-Type": "application/json", "Cache-Control": "no-store",
                                            "Expires": http_date(self._s.expires_ms(job))})
        if job.status == FAILED:
            outcome = errors.operation_outcome([errors.Issue("error", "exception",
                                                             f"The export failed: {job.failure or 'error'}.")])
            return FhirResponse(500, orjson.dumps(outcome))
        return FhirResponse(202, b"", {"X-Progress": job.progress[:100], "Retry-After": str(RETRY_AFTER_SECONDS)})
