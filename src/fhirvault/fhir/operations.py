"""$validate, $meta, $meta-add and $meta-delete (FHIR R4 Resource operations).

Everything goes through the repository, so the usual rules hold: scopes, care relationships,
consent and labels, validation and the audit trail. $meta-add and $meta-delete are JSON
Patches of the current version under If-Match: they create a new version (this server never
rewrites a stored version), and a concurrent write makes them start again from the new one.
"""

from __future__ import annotations

from typing import Any

import orjson

from fhirvault.domain import errors
from fhirvault.fhir.messages import FhirRequest, FhirResponse
from fhirvault.services.repository import Repository, ResourceResult

BASE_PROFILE = "http://hl7.org/fhir/StructureDefinition/"
MODES = ("create", "update", "delete")
_META_LISTS = ("profile", "tag", "security")
_RETRIES = 3


def _parameters(body: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise errors.bad_request(f"{what} takes a Parameters resource.", code="structure")
    params = body.get("parameter") or []
    if not isinstance(params, list) or not all(isinstance(p, dict) for p in params):
        raise errors.bad_request("Parameters.parameter must be a list of objects.", code="structure")
    return params


def _param_value(param: dict[str, Any]) -> Any:
    for key, value in param.items():
        if key.startswith("value"):
            return value
    return None


def _meta_response(meta: dict[str, Any], status: int = 200) -> FhirResponse:
    return FhirResponse(status, orjson.dumps({"resourceType": "Parameters",
                                              "parameter": [{"name": "return", "valueMeta": meta}]}))


def _meta_of(result: ResourceResult) -> dict[str, Any]:
    meta = orjson.loads(result.body).get("meta")
    return meta if isinstance(meta, dict) else {}


def _matches(name: str, a: Any, b: Any) -> bool:
    if name == "profile":
        return bool(a == b)
    return isinstance(a, dict) and isinstance(b, dict) and a.get("system") == b.get("system") \
        and a.get("code") == b.get("code")


def merge_meta(current: dict[str, Any], change: dict[str, Any], *, add: bool) -> dict[str, Any]:
    """The meta after $meta-add (add=True) or $meta-delete of ``change``'s profiles, tags and labels.

    Profiles match by value, tags and security labels by system and code (R4 rules).
    """
    out = {k: v for k, v in current.items() if k not in ("versionId", "lastUpdated")}
    for name in _META_LISTS:
        items = list(out.get(name) or [])
        for item in change.get(name) or []:
            if add and not any(_matches(name, x, item) for x in items):
                items.append(item)
            elif not add:
                items = [x for x in items if not _matches(name, x, item)]
        if items:
            out[name] = items
        else:
            out.pop(name, None)
    return out


class Operations:
    def __init__(self, repo: Repository) -> None:
        self._repo = repo

    # -- $meta ------------------------------------------------------------------
    async def meta(self, req: FhirRequest, rtype: str, rid: str, version: int | None) -> FhirResponse:
        if version is None:
            result = await self._repo.read(req.ctx, rtype, rid)
        else:
            result = await self._repo.vread(req.ctx, rtype, rid, version)
        return _meta_response(_meta_of(result))

    async def meta_change(self, req: FhirRequest, rtype: str, rid: str, body: Any, *, add: bool) -> FhirResponse:
        name = "$meta-add" if add else "$meta-delete"
        metas = [p for p in _parameters(body, name) if p.get("name") == "meta"]
        if len(metas) != 1 or not isinstance(metas[0].get("valueMeta"), dict):
            raise errors.bad_request(f"{name} takes exactly one parameter 'meta' (valueMeta).", "meta")
        change = metas[0]["valueMeta"]
        for key in change:
            if key not in _META_LISTS:
                raise errors.bad_request(f"{name} changes profile, tag and security only.", f"meta.{key}"[:64])
        for _ in range(_RETRIES):
            current = await self._repo.read(req.ctx, rtype, rid)
            new_meta = merge_meta(_meta_of(current), change, add=add)
            if {k: v for k, v in _meta_of(current).items() if k in _META_LISTS} == new_meta:
                return _meta_response(_meta_of(current))  # nothing to change: no new version
            try:
                result = await self._repo.patch(req.ctx, rtype, rid, [{"op": "add", "path": "/meta", "value": new_meta}],
                                                current.version)
            except errors.OperationOutcomeError as exc:
                if exc.status == 412:  # written meanwhile: apply the change to the new version
                    continue
                raise
            return _meta_response(_meta_of(result))
        raise errors.conflict("The resource kept changing; retry.")

    # -- $validate ----------------------------------------------------------------
    async def validate(self, req: FhirRequest, rtype: str, rid: str | None, body: Any) -> FhirResponse:
        resource, mode, profile = self._validate_input(req, rtype, body)
        if mode is None:
            mode = "update" if rid is not None else "create"
        if mode not in MODES:
            raise errors.bad_request("mode must be create, update or delete (profile mode is not supported).", "mode")
        if profile is not None and profile != BASE_PROFILE + rtype:
            raise errors.bad_request("Only the base R4 definition can be validated against; profiles are not "
                                     "supported.", "profile", code="not-supported")
        if mode != "create" and rid is None:
            raise errors.bad_request(f"mode={mode} validates against an existing resource: use "
                                     f"{rtype}/[id]/$validate.", "mode")
        permission = {"create": "c", "update": "u", "delete": "d"}[mode]
        await self._repo.authorize(req.ctx, rtype, permission, "validate", f"{rtype}/{rid}" if rid else None)
        issues: list[errors.Issue] = []
        if mode == "delete":
            await self._repo.read(req.ctx, rtype, rid or "")  # exists, and the caller may see it (else 404/410)
        else:
            if resource is None:
                raise errors.bad_request(f"mode={mode} needs a resource to validate.", "resource")
            if mode == "update" and resource.get("id") != rid:
                issues.append(errors.Issue("error", "invalid", "The id in the resource must match the id in the URL.",
                                           ("id",)))
            issues.extend(self._repo.validation_issues(rtype, resource))
        if not issues:
            issues = [errors.Issue("information", "informational", f"Validation passed (mode={mode}).")]
        return FhirResponse(200, orjson.dumps(errors.operation_outcome(issues)))

    @staticmethod
    def _validate_input(req: FhirRequest, rtype: str, body: Any) -> tuple[dict[str, Any] | None, str | None,
                                                                          str | None]:
        mode, profile = req.param("mode"), req.param("profile")
        if not isinstance(body, dict):
            raise errors.bad_request("$validate takes a resource or a Parameters resource.", code="structure")
        if body.get("resourceType") != "Parameters" or (rtype == "Parameters" and not any(
                isinstance(p, dict) and p.get("name") == "resource" for p in body.get("parameter") or [])):
            return body, mode, profile
        resource = None
        for param in _parameters(body, "$validate"):
            if param.get("name") == "resource":
                resource = param.get("resource")
            elif param.get("name") == "mode":
                mode = _param_value(param)
            elif param.get("name") == "profile":
                profile = _param_value(param)
        if resource is not None and not isinstance(resource, dict):
            raise errors.bad_request("The 'resource' parameter must hold a resource.", "resource")
        return resource, mode, profile
