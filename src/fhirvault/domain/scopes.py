"""SMART on FHIR scopes (v2 syntax, v1 accepted) and the interaction → permission map.

A scope is ``context/Type.perms``: context ``system``, ``user`` or ``patient``;
Type a resource type or ``*``; perms a subset of ``cruds`` in that order
(v2), or ``read``/``write``/``*`` (v1, mapped to ``rs``/``cud``/``cruds``).
Scopes with a query part (``patient/Observation.rs?category=…``) are SMART v2
granular scopes: the query is kept as (name, value) pairs and the policy
(``domain/policy.py``) grants through such a scope only the resources that match
it, using the search matcher.

Operational scopes (``fhirvault/…``) grant access to server operations, never to
FHIR data: their context cannot be ``system``/``user``/``patient``, so they can
never collide with, or be widened into, a SMART resource scope.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

PERMISSIONS = "cruds"
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_SCOPE = re.compile(r"^(system|user|patient)/(\*|[A-Z][A-Za-z]{1,63})\.([a-z*]+)(\?.*)?$")
METRICS_SCOPE = "fhirvault/metrics.read"  # scrape /metrics; no FHIR access
# Compliance registers and report (/admin/registers, /admin/compliance): read, and record changes.
REGISTERS_READ_SCOPE = "fhirvault/registers.read"
REGISTERS_WRITE_SCOPE = "fhirvault/registers.write"
OPERATIONAL_SCOPES = frozenset({METRICS_SCOPE, REGISTERS_READ_SCOPE, REGISTERS_WRITE_SCOPE})


class ScopeError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ResourceScope:
    context: str
    resource_type: str  # '*' for all
    permissions: frozenset[str]
    query: tuple[tuple[str, str], ...] = ()  # granular scope: the resource must match these criteria

    def __str__(self) -> str:
        perms = "".join(p for p in PERMISSIONS if p in self.permissions)
        text = f"{self.context}/{self.resource_type}.{perms}"
        return f"{text}?{urlencode(self.query)}" if self.query else text


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
    pairs: tuple[tuple[str, str], ...] = ()
    if query:
        if rtype == "*":
            raise ScopeError("a granular scope (with a query) must name one resource type")
        try:
            pairs = tuple(parse_qsl(query[1:], keep_blank_values=False, strict_parsing=True))
        except ValueError:
            raise ScopeError("malformed scope query") from None
        if not pairs or len(pairs) > 8 or any(not k or k.startswith("_") for k, _ in pairs):
            raise ScopeError("a scope query needs 1-8 plain search parameters")
    if perms in _V1:
        letters = _V1[perms]
    else:
        # v2: letters from "cruds", each at most once, in that order.
        if not re.fullmatch("c?r?u?d?s?", perms) or not perms:
            raise ScopeError("scope permissions must be a subset of 'cruds', in that order")
        letters = perms
    return ResourceScope(context, rtype, frozenset(letters), pairs)


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

    def for_contexts(self, contexts: frozenset[str], resource_type: str,
                     permission: str) -> tuple[ResourceScope, ...]:
        """The scopes of these contexts (user, patient…) granting ``permission`` on ``resource_type``."""
        return tuple(s for s in self.scopes if s.context in contexts and permission in s.permissions
                     and s.resource_type in ("*", resource_type))


def narrow(requested: list[ResourceScope], allowed: list[ResourceScope]) -> list[ResourceScope]:
    """The part of ``requested`` that ``allowed`` covers (never more than either).

    A wildcard request is narrowed to the specific types the client may use.
    """
    grants: dict[tuple[str, str, tuple[tuple[str, str], ...]], set[str]] = {}
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
            # A query only narrows: keep the allowed one's, else the requested one's.
            if a.query and req.query and a.query != req.query:
                continue
            query = a.query or req.query
            perms = a.permissions & req.permissions
            if perms:
                grants.setdefault((req.context, rtype, query), set()).update(perms)
    return [ResourceScope(c, t, frozenset(p), q) for (c, t, q), p in grants.items()]
