"""Patient/[id]/$erase, $restrict, $unrestrict, $legal-hold: the GDPR lifecycle operations.

POST with a Parameters body: ``reason`` (string, required), ``overrideRetention`` ($erase, boolean:
the DPO erases before a retention period ends where the law allows it), ``active`` ($legal-hold,
boolean). Only tokens carrying the ``fhirvault/lifecycle.write`` scope, held by a backend service or by
a security officer / platform admin user, may call them; every call, allowed or refused, is audited.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from fhirvault.domain import errors
from fhirvault.domain.instants import instant
from fhirvault.domain.policy import PLATFORM_ADMIN, SECURITY_OFFICER
from fhirvault.domain.scopes import LIFECYCLE_SCOPE
from fhirvault.services.erasure import (
    HOLD,
    RESTRICTED,
    ErasureRefused,
    ErasureResult,
    Lifecycle,
    check_reason,
)
from fhirvault.services.repository import Repository, RequestContext

OPERATIONS = ("$erase", "$restrict", "$unrestrict", "$legal-hold")
_ROLES = frozenset({SECURITY_OFFICER, PLATFORM_ADMIN})


def _values(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise errors.bad_request("This operation takes a Parameters resource.", code="structure")
    out: dict[str, Any] = {}
    for p in body.get("parameter") or ():
        if isinstance(p, dict) and isinstance(p.get("name"), str):
            out[p["name"]] = p.get("valueString", p.get("valueBoolean"))
    return out


def _flag(values: dict[str, Any], name: str, default: bool | None) -> bool:
    value = values.get(name, default)
    if not isinstance(value, bool):
        raise errors.bad_request(f"'{name}' must be a valueBoolean.", name)
    return value


async def lifecycle_operation(repo: Repository, ctx: RequestContext, pid: str, name: str, body: Any) -> bytes:
    """Run one operation; returns the Parameters response (JSON)."""
    entity = f"Patient/{pid}"
    interaction = "gdpr-" + name.lstrip("$")
    p = ctx.principal
    lc: Lifecycle | None = repo.lifecycle
    allowed = (p is not None and p.tenant == repo.tenant and LIFECYCLE_SCOPE in p.scope.split()
               and (p.role is None or p.role in _ROLES))
    if not allowed or lc is None:
        await repo.audit_event(ctx, interaction, 403, f"{name} needs the {LIFECYCLE_SCOPE} scope", entity=entity,
                               patient=entity, category="security")
        raise errors.forbidden(f"Access denied: {name} is for the data protection officer's tools"
                               f" (scope {LIFECYCLE_SCOPE}).")
    values = _values(body)
    reason = check_reason(values.get("reason"))
    by = p.user or p.client_id if p is not None else "?"

    def record(status: int, detail: str) -> Any:
        base = repo._record(ctx, interaction, status, entity=entity, patient=entity, detail=detail)
        return dataclasses.replace(base, category="security")

    if name == "$erase":
        override = _flag(values, "overrideRetention", False)
        try:
            result = await lc.erase(pid, lambda r: record(200, _erase_detail(r, reason, override)),
                                    override_retention=override)
        except ErasureRefused as exc:
            await repo.audit_event(ctx, interaction, 409, str(exc.issues[0].diagnostics), entity=entity,
                                   patient=entity, category="security")
            raise
        out = [{"name": "patient", "valueReference": {"reference": entity}},
               {"name": "erased", "valueBoolean": result.key_id is not None},
               {"name": "resources", "valueInteger": result.resources},
               {"name": "versions", "valueInteger": result.versions},
               {"name": "erasedAt", "valueInstant": instant(result.erased_ms)}]
    else:
        flag, on = {"$restrict": (RESTRICTED, True), "$unrestrict": (RESTRICTED, False),
                    "$legal-hold": (HOLD, True)}[name]
        if name == "$legal-hold":
            on = _flag(values, "active", None)
        what = "restriction" if flag == RESTRICTED else "legal hold"
        state = await lc.set_flag(pid, flag, on, reason, str(by),
                                  record(200, f"{what} {'on' if on else 'off'}: {reason}"))
        out = [{"name": "patient", "valueReference": {"reference": entity}},
               {"name": "restricted", "valueBoolean": state.restricted},
               {"name": "legalHold", "valueBoolean": state.legal_hold}]
    return orjson.dumps({"resourceType": "Parameters", "parameter": out})


def _erase_detail(r: ErasureResult, reason: str, override: bool) -> str:
    forced = " (retention overridden)" if override else ""
    return f"erased{forced}: key {r.key_id}, {r.resources} resources, {r.versions} versions; reason: {reason}"
