"""Batch and transaction Bundles (POST /fhir).

A **transaction** is atomic: every entry's write is prepared (policy,
validation, keys, conditional look-ups) and then all the writes run as one job
in one database transaction, in the R4 order DELETE, POST, PUT/PATCH; GETs are
answered after the commit. ``urn:uuid:`` full URLs of created resources and
conditional references (``Patient?identifier=…``) are resolved first. If any
entry fails, nothing is written and the answer is that entry's error.

A **batch** processes each entry on its own, exactly like the single
request it describes, and reports each outcome in the batch-response.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from fhirvault.domain import errors
from fhirvault.domain.errors import Issue, OperationOutcomeError
from fhirvault.domain.instants import instant
from fhirvault.domain.r4 import is_resource_type
from fhirvault.fhir.messages import FhirRequest, FhirResponse
from fhirvault.ports import WriteTx
from fhirvault.services.repository import Repository, ResourceResult

Dispatch = Callable[[FhirRequest], Awaitable[FhirResponse]]
Resolve = Callable[[FhirRequest, str, list[tuple[str, str]]], Awaitable[list[str]]]

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content", 304: "304 Not Modified"}


@dataclass
class _Entry:
    index: int
    method: str
    url: str
    rtype: str
    rid: str | None
    query: list[tuple[str, str]] | None  # conditional URL (Type?params)
    resource: Any
    full_url: str | None
    if_match: str | None
    if_none_exist: str | None
    result: dict[str, Any] = field(default_factory=dict)


def _status(code: int) -> str:
    return _STATUS_TEXT.get(code, str(code))


def _entry_error(index: int, exc: OperationOutcomeError) -> OperationOutcomeError:
    issues = [Issue(i.severity, i.code, f"Bundle.entry[{index}]: {i.diagnostics}", i.expression) for i in exc.issues]
    return OperationOutcomeError(exc.status, issues, exc.headers)


def _parse_url(index: int, method: str, url: Any) -> tuple[str, str | None, list[tuple[str, str]] | None]:
    if not isinstance(url, str) or not url:
        raise errors.bad_request(f"Bundle.entry[{index}].request.url is required.")
    parts = urlsplit(url)
    path = parts.path.strip("/")
    if parts.scheme or parts.netloc:
        raise errors.bad_request(f"Bundle.entry[{index}].request.url must be relative (Type, Type/id or Type?query).")
    segments = path.split("/") if path else []
    if not segments or not is_resource_type(segments[0]):
        raise errors.bad_request(f"Bundle.entry[{index}].request.url names an unknown resource type.")
    query = parse_qsl(parts.query, keep_blank_values=True) if parts.query else None
    rid = segments[1] if len(segments) >= 2 else None
    if rid is not None and not _ID.match(rid):
        raise errors.bad_request(f"Bundle.entry[{index}].request.url has a malformed resource id.")
    if len(segments) > 2 and method not in ("GET", "HEAD"):
        raise errors.bad_request(f"Bundle.entry[{index}].request.url is not valid for {method}.")
    return segments[0], rid, query


def _entries(bundle: dict[str, Any], max_entries: int) -> list[_Entry]:
    raw = bundle.get("entry") or []
    if not isinstance(raw, list):
        raise errors.bad_request("Bundle.entry must be an array.")
    if len(raw) > max_entries:
        raise errors.too_large(f"The Bundle has {len(raw)} entries; the limit is {max_entries}.")
    out = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict) or not isinstance(e.get("request"), dict):
            raise errors.bad_request(f"Bundle.entry[{i}].request is required.")
        req = e["request"]
        method = req.get("method")
        if method not in _ORDER:
            raise errors.bad_request(f"Bundle.entry[{i}].request.method must be GET, POST, PUT, PATCH or DELETE.")
        rtype, rid, query = _parse_url(i, method, req.get("url"))
        out.append(_Entry(i, method, req["url"], rtype, rid, query, e.get("resource"), e.get("fullUrl"),
                          req.get("ifMatch"), req.get("ifNoneExist")))
    return out


def _rewrite_references(node: Any, mapping: dict[str, str]) -> None:
    """Replace Reference.reference values that name an entry's fullUrl with the resource's real id."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in mapping:
                node[key] = mapping[value]
            else:
                _rewrite_references(value, mapping)
    elif isinstance(node, list):
        for item in node:
            _rewrite_references(item, mapping)


def _conditional_references(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and "?" in value and not value.startswith("urn:"):
                found.add(value)
            else:
                _conditional_references(value, found)
    elif isinstance(node, list):
        for item in node:
            _conditional_references(item, found)


class BundleProcessor:
    def __init__(self, repo: Repository, dispatch: Dispatch, resolve: Resolve, *, max_entries: int) -> None:
        self._repo = repo
        self._dispatch = dispatch
        self._resolve = resolve
        self._max_entries = max_entries

    async def handle(self, req: FhirRequest, bundle: Any) -> FhirResponse:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise errors.bad_request("POST to the base URL takes a Bundle of type batch or transaction.")
        kind = bundle.get("type")
        if kind == "batch":
            return await self._batch(req, _entries(bundle, self._max_entries))
        if kind == "transaction":
            return await self._transaction(req, _entries(bundle, self._max_entries))
        raise errors.bad_request("Bundle.type must be batch or transaction.", "Bundle.type")

    # -- batch --------------------------------------------------------------
    def _sub_request(self, req: FhirRequest, e: _Entry) -> FhirRequest:
        segments = [s for s in urlsplit(e.url).path.strip("/").split("/") if s]
        headers = {k: v for k, v in req.headers.items() if k in ("accept", "prefer", "authorization")}
        headers["content-type"] = "application/json-patch+json" if e.method == "PATCH" else "application/fhir+json"
        if e.if_match:
            headers["if-match"] = e.if_match
        if e.if_none_exist:
            headers["if-none-exist"] = e.if_none_exist
        body = b""
        if e.method == "PATCH" and isinstance(e.resource, dict) and e.resource.get("resourceType") == "Binary":
            body = _binary_patch(e.index, e.resource)
        elif e.resource is not None:
            body = orjson.dumps(e.resource)
        return FhirRequest(e.method, segments, e.query or [], headers, body, req.ctx, req.base_url)

    async def _batch(self, req: FhirRequest, entries: list[_Entry]) -> FhirResponse:
        out: list[dict[str, Any]] = []
        for e in entries:
            try:
                response = await self._dispatch(self._sub_request(req, e))
            except OperationOutcomeError as exc:
                out.append({"response": {"status": str(exc.status), "outcome": exc.outcome()}})
                continue
            out.append(_entry_from_response(response))
        return FhirResponse(200, orjson.dumps({"resourceType": "Bundle", "type": "batch-response", "entry": out}))

    # -- transaction --------------------------------------------------------
    async def _one(self, req: FhirRequest, rtype: str, query: list[tuple[str, str]], what: str) -> str | None:
        ids = await self._resolve(req, rtype, query)
        if len(ids) > 1:
            raise errors.precondition_failed(f"{what} matches more than one {rtype}.")
        return ids[0] if ids else None

    async def _transaction(self, req: FhirRequest, entries: list[_Entry]) -> FhirResponse:
        mapping: dict[str, str] = {}
        skipped: set[int] = set()  # conditional creates that found their resource, deletes of nothing
        # 1. ids: new ones for creates, found ones for conditional writes
        for e in sorted(entries, key=lambda x: _ORDER[x.method]):
            try:
                await self._assign(req, e, mapping, skipped)
            except OperationOutcomeError as exc:
                raise _entry_error(e.index, exc) from None
        # 2. conditional references, then urn:uuid references
        conditional: set[str] = set()
        for e in entries:
            _conditional_references(e.resource, conditional)
        for ref in conditional:
            rtype, _, qs = ref.partition("?")
            if not is_resource_type(rtype):
                raise errors.bad_request("A conditional reference names an unknown resource type.")
            found = await self._one(req, rtype, parse_qsl(qs, keep_blank_values=True), "A conditional reference")
            if found is None:
                raise errors.precondition_failed(f"A conditional reference matches no {rtype}.")
            mapping[ref] = f"{rtype}/{found}"
        for e in entries:
            if mapping:
                _rewrite_references(e.resource, mapping)
        # 3. prepare every write, in R4 order, then run them as one job
        jobs: list[tuple[_Entry, Callable[[WriteTx], Any]]] = []
        for e in sorted(entries, key=lambda x: _ORDER[x.method]):
            if e.index in skipped or e.method in ("GET", "HEAD"):
                continue
            try:
                jobs.append((e, await self._prepare(req, e)))
            except OperationOutcomeError as exc:
                raise _entry_error(e.index, exc) from None

        def run_all(tx: WriteTx) -> list[Any]:
            results = []
            for e, job in jobs:
                try:
                    results.append(job(tx))
                except OperationOutcomeError as exc:
                    raise _entry_error(e.index, exc) from None
            return results

        results = await self._repo.write_jobs("bundle.transaction", run_all) if jobs else []
        minimal = "return=minimal" in (req.header("prefer") or "").replace(" ", "").lower()
        for (e, _), result in zip(jobs, results, strict=True):
            e.result = _write_result(e, result, req.base_url)
            if minimal:
                e.result.pop("resource", None)
        # 4. reads, after the writes
        for e in entries:
            if e.method in ("GET", "HEAD"):
                try:
                    e.result = _entry_from_response(await self._dispatch(self._sub_request(req, e)))
                except OperationOutcomeError as exc:
                    e.result = {"response": {"status": str(exc.status), "outcome": exc.outcome()}}
        body = {"resourceType": "Bundle", "type": "transaction-response", "entry": [e.result for e in entries]}
        return FhirResponse(200, orjson.dumps(body))

    async def _assign(self, req: FhirRequest, e: _Entry, mapping: dict[str, str], skipped: set[int]) -> None:
        if e.method == "POST":
            if e.if_none_exist:
                found = await self._one(req, e.rtype, parse_qsl(e.if_none_exist.lstrip("?"), keep_blank_values=True),
                                        "ifNoneExist")
                if found is not None:
                    skipped.add(e.index)
                    e.rid = found
                    e.result = {"response": {"status": "200 OK", "location": f"{e.rtype}/{found}"}}
                    if e.full_url:
                        mapping[e.full_url] = f"{e.rtype}/{found}"
                    return
            e.rid = str(uuid.uuid4())
        elif e.method in ("PUT", "PATCH", "DELETE") and e.query is not None:
            found = await self._one(req, e.rtype, e.query, f"The conditional {e.method}")
            if found is None:
                if e.method == "DELETE":
                    skipped.add(e.index)
                    e.result = {"response": {"status": "204 No Content"}}
                    return
                if e.method == "PATCH":
                    raise errors.not_found("The conditional PATCH matches no resource.")
                body_id = e.resource.get("id") if isinstance(e.resource, dict) else None
                found = body_id if isinstance(body_id, str) else str(uuid.uuid4())
            elif e.method == "PUT" and isinstance(e.resource, dict) and e.resource.get("id") not in (None, found):
                # As for PUT [type]?… outside a Bundle: the body may not name another resource than the match.
                raise errors.bad_request("The id in the body does not match the resource the condition found.", "id")
            e.rid = found
        elif e.rid is None and e.method != "GET":
            raise errors.bad_request(f"{e.method} needs a resource id or a conditional URL.")
        if e.full_url and e.rid:
            mapping[e.full_url] = f"{e.rtype}/{e.rid}"

    async def _prepare(self, req: FhirRequest, e: _Entry) -> Callable[[WriteTx], Any]:
        ctx = req.ctx
        if_match = _etag(e.if_match)
        assert e.rid is not None
        if e.method == "DELETE":
            return await self._repo.prepare_delete(ctx, e.rtype, e.rid, if_match, missing_ok=True)
        if e.method == "PATCH":
            ops = orjson.loads(_binary_patch(e.index, e.resource)) if isinstance(e.resource, dict) else e.resource
            return await self._repo.prepare_patch(ctx, e.rtype, e.rid, ops, if_match)
        if not isinstance(e.resource, dict):
            raise errors.bad_request(f"{e.method} needs a resource in the entry.")
        if e.method == "POST":
            return await self._repo.prepare_create(ctx, e.rtype, e.resource, rid=e.rid)
        if e.query is not None:
            e.resource["id"] = e.rid
        return await self._repo.prepare_update(ctx, e.rtype, e.rid, e.resource, if_match)


def _etag(value: str | None) -> int | None:
    if value is None:
        return None
    digits = value.strip().removeprefix("W/").strip('"')
    if not digits.isdigit() or len(digits) > 9:
        raise errors.bad_request('ifMatch must be a version ETag like W/"3".')
    return int(digits)


def _binary_patch(index: int, resource: dict[str, Any]) -> bytes:
    """R4 carries a JSON Patch in a transaction as a Binary resource (base64 data)."""
    import base64
    import binascii

    try:
        return base64.b64decode(resource.get("data", ""), validate=True)
    except (binascii.Error, ValueError):
        raise errors.bad_request(f"Bundle.entry[{index}]: the Binary holding the patch is not base64.") from None


def _write_result(e: _Entry, result: Any, base_url: str) -> dict[str, Any]:
    if isinstance(result, ResourceResult):
        status = 201 if result.created else 200
        response = {
            "status": _status(status),
            "location": f"{result.type}/{result.id}/_history/{result.version}",
            "etag": f'W/"{result.version}"',
            "lastModified": instant(result.last_updated_ms),
        }
        return {"fullUrl": f"{base_url}/{result.type}/{result.id}", "resource": orjson.Fragment(result.body),
                "response": response}
    # a delete: the deletion's version, or None when there was nothing to delete
    response = {"status": "204 No Content"}
    if result is not None:
        response["etag"] = f'W/"{result}"'
    return {"response": response}


def _entry_from_response(response: FhirResponse) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    # Entries are dispatched below content negotiation: a body without a Content-Type is FHIR JSON.
    if response.body and response.headers.get("Content-Type", "application/fhir+json").startswith(
            "application/fhir+json"):
        entry["resource"] = orjson.Fragment(response.body)
    status: dict[str, Any] = {"status": _status(response.status)}
    for header, key in (("Location", "location"), ("Content-Location", "location"), ("ETag", "etag")):
        if header in response.headers:
            status[key] = response.headers[header].split("/fhir/", 1)[-1]
    entry["response"] = status
    return entry
