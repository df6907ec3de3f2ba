"""SMART on FHIR scopes (v2 syntax, v1 accepted) and the interaction → permission map.

A scope is ``context/Type.perms``: context ``system``, ``user`` or ``patient``;
Type a resource type or ``*``; perms a subset of ``cruds`` in that order
(v2), or ``read``/``write``/``*`` (v1, mapped to ``rs``/``cud``/``cruds``).
Scopes with a query part (``?category=…``) are granular scopes that this
release does not grant yet: they are parsed and reported as unsupported.

Operational scopes (``fhirvault/…``) grant access to server operations, never to
FHIR data: their context cannot be ``system``/``user``/``patient``, so they can
never collide with, or be widened into, a SMART resource scope.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PERMISSIONS = "cruds"
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_SCOPE = re.compile(r"^(system|user|patient)/(\*|[A-Z][A-Za-z]{1,63})\.([a-z*]+)(\?.*)?$")
METRICS_SCOPE = "fhirvault/metrics.read"  # scrape /metrics; no FHIR access
OPERATIONAL_SCOPES = frozenset({METRICS_SCOPE})


class ScopeError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ResourceScope:
    context: str
    resource_type: str  # '*' for all
    permissions: frozenset[str]

    def __str__(self) -> str:
        perms = "".join(p for p in PERMISSIONS if p in self.permissions)
        return f"{self.context}/{self.resource_type}.{perms}"


def parse_scope(text: str) -> ResourceScope | None:
    """Parse one resource scope; None for non-resource scopes (openid, launch…)."""
    m = _SCOPE.match(text)
    if m is None:
        if text in OPERATIONAL_SCOPES:
            return None
        if "/" in text and "." in text:
            raise ScopeError("malformed resource scope")
        return None
    context, rtype, perms, query = m.groups()
    if query:
        raise ScopeError("granular scopes with a query are not supported yet")
    if perms in _V1:
        letters = _V1[perms]
    else:
        # v2: letters from "cruds", each at most once, in that order.
        if not re.fullmatch("c?r?u?d?s?", perms) or not perms:
            raise ScopeError("scope permissions must be a subset of 'cruds', in that order")
        letters = perms
    return ResourceScope(context, rtype, frozenset(letters))


def parse_scopes(text: str, *, strict: bool = True) -> list[ResourceScope]:
    """Parse a space-separated scope string. ``strict=False`` drops what it cannot parse."""
    out: list[ResourceScope] = []
    for item in text.split():
        try:
            scope = parse_scope(item)
        except ScopeError:
            if strict:
                raise
            continue
        if scope is not None:
            out.append(scope)
    return out


def operational_scopes(text: str) -> list[str]:
    """The known operational scopes in a space-separated scope string, once each, in order."""
    return list(dict.fromkeys(item for item in text.split() if item in OPERATIONAL_SCOPES))


@dataclass(frozen=True, slots=True)
class Grants:
    """What a token allows: the union of its system-level resource scopes."""

    scopes: tuple[ResourceScope, ...]

    def allows(self, resource_type: str, permission: str) -> bool:
        for s in self.scopes:
            if s.context == "system" and permission in s.permissions and s.resource_type in ("*", resource_type):
                return True
        return False

    def types_with(self, permission: str, all_types: frozenset[str]) -> frozenset[str] | None:
        """Resource types readable with ``permission``; None means every type."""
        types: set[str] = set()
        for s in self.scopes:
            if s.context == "system" and permission in s.permissions:
                if s.resource_type == "*":
                    return None
                types.add(s.resource_type)
        return frozenset(types & all_types)


def narrow(requested: list[ResourceScope], allowed: list[ResourceScope]) -> list[ResourceScope]:
    """The part of ``requested`` that ``allowed`` covers (never more than either).

    A wildcard request is narrowed to the specific types the client may use.
    """
    grants: dict[tuple[str, str], set[str]] = {}
    for req in requested:
        for a in allowed:
            if a.context != req.context:
                continue
            if a.resource_type in ("*", req.resource_type):
                rtype = req.resource_type
            elif req.resource_type == "*":
                rtype = a.resource_type
            else:
                continue
            perms = a.permissions & req.permissions
            if perms:
                grants.setdefault((req.context, rtype), set()).update(perms)
    return [ResourceScope(c, t, frozenset(p)) for (c, t), p in grants.items()]
