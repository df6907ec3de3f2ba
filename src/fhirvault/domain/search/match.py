"""Exact verification of a search criterion against one decrypted resource (FHIR R4).

The blind index only narrows the candidates; `matches` decides what the client sees. A
resource matches a criterion when one of its values (see `values`) matches one of the
criterion's OR'ed values, except for ``:not`` (no value matches any of them) and
``:missing``.

Semantics:

string     normalise(value) starts with normalise(query) (case-, accent- and
           punctuation-insensitive; see values.normalise), on each string of the element
           (each part of a HumanName or Address separately); ``:exact``: equal, as sent.
token      ``code``: any system; ``system|code``; ``|code``: no system in the data (a code
           whose only system is its binding's counts as having none); ``system|``: any code
           of the system. Case-sensitive. ``:of-type`` ``system|code|value`` on Identifiers;
           ``:not``: no value matches.
reference  ``Type/id`` and ``[id]`` match relative references, and absolute ones whose base
           is the server's base (`Criterion.base_url`); an absolute URL matches the same URL
           (history stripped on both sides); canonical ``url`` matches any version,
           ``url|version`` that version; ``:[Type]``; ``:identifier`` matches
           Reference.identifier (``system|value``, ``|value``: no system, ``value``).
           Type-restricted parameters (``where(resolve() is Patient)``, e.g. Observation
           ``patient``) keep references of that type, local ``#id`` references to a
           contained resource of that type (presence only: they are not searchable), and
           identifier-only references unless their Reference.type names another type.
date       R4 §3.1.1.4.2 range semantics with the precision of both sides; search range
           [slo, shi), value range [lo, hi) (a Period's missing end is +inf):
             eq  slo <= lo and hi <= shi      ne  not eq
             gt  hi > shi                     lt  lo < slo
             ge  gt or eq                     le  lt or eq
             sa  lo >= shi                    eb  hi <= slo
             ap  the value overlaps [slo - d, shi + d), d = 10 % of |now - slo|
number,    the search value v has an implicit precision range [v - h, v + h), h half a unit of
quantity   its last significant digit (``100`` -> [99.5, 100.5), ``100.00`` ->
           [99.995, 100.005), ``1e2`` -> [50, 150)). A resource value is a point (its exact
           decimal value) or an interval (Range, or a Quantity with a comparator):
             eq  the value lies within [v - h, v + h)     ne  not eq
             gt  some part > v      ge  some part >= v    (R4: "greater than exactly 100")
             lt  some part < v      le  some part <= v
             sa  it lies at or above v + h                eb  it lies below v - h
             ap  it overlaps [v - h - d, v + h + d), d = 10 % of |v|
           Quantity units: ``v|system|code`` needs that system and code; ``v||code`` matches
           the code or the unit; no unit conversion.
uri        equal (a versioned canonical ``url|version`` also equals ``url``); ``:below``:
           equal or a descendant by path (``http://a/fhir`` is below ``http://a``, not below
           ``http://a/fh``); ``:above``: equal or an ancestor by path.
composite  one focus element (e.g. one Observation.component) matches every component.
:missing   true: the parameter has no value; false: it has one.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from fhirvault.domain.search.query import (
    CompositeValue,
    Criterion,
    DateValue,
    MissingValue,
    NumberValue,
    OfTypeValue,
    QuantityValue,
    ReferenceValue,
    SearchValue,
    StringValue,
    TokenValue,
    UriValue,
)
from fhirvault.domain.search.values import (
    NumItem,
    QtyItem,
    RefItem,
    TokenItem,
    composite_foci,
    extract,
    normalise,
    to_decimal,
)

__all__ = ["matches", "value_matches"]


def matches(criterion: Criterion, resource_type: str, resource: Mapping[str, Any]) -> bool:
    """Whether `resource` (of `resource_type`) satisfies `criterion` exactly."""
    param = criterion.param
    if param.resource_type != resource_type:
        raise ValueError("criterion and resource are of different resource types")
    modifier = criterion.modifier
    if param.type == "composite":
        foci = composite_foci(param, resource)
        if modifier == "missing":
            return any(
                isinstance(v, MissingValue) and v.missing == (not foci) for v in criterion.values
            )
        return any(
            all(
                value_matches(comp.type, comp_value, items, criterion)
                for comp, comp_value, items in zip(
                    param.components, value.components, per_component, strict=True
                )
            )
            for value in criterion.values
            if isinstance(value, CompositeValue)
            for _path, per_component in foci
        )
    items = extract(param, resource)
    if modifier == "missing":
        return any(
            isinstance(v, MissingValue) and v.missing == (not items) for v in criterion.values
        )
    found = any(value_matches(param.type, v, items, criterion) for v in criterion.values)
    return not found if modifier == "not" else found


def value_matches(param_type: str, value: SearchValue, items: list[Any], crit: Criterion) -> bool:
    """Whether one of `items` (typed values of one element) matches one search value."""
    if not items:
        return False
    if isinstance(value, StringValue):
        if crit.modifier == "exact":
            return any(item == value.text for item in items)
        prefix = value.normalised
        return any(normalise(item).startswith(prefix) for item in items)
    if isinstance(value, TokenValue):
        return any(_token(value, item) for item in items)
    if isinstance(value, OfTypeValue):
        wanted = (value.type_system, value.type_code)
        return any(item.code == value.value and wanted in item.types for item in items)
    if isinstance(value, ReferenceValue):
        return any(_reference(value, item, crit.base_url) for item in items)
    if isinstance(value, DateValue):
        return any(_date(value, lo, hi) for lo, hi in items)
    if isinstance(value, NumberValue):
        return any(_number(value, item) for item in items)
    if isinstance(value, QuantityValue):
        return any(_units(value, item) and _number(value.number, item) for item in items)
    if isinstance(value, UriValue):
        return any(_uri(value.uri, item, crit.modifier) for item in items)
    return False


def _token(value: TokenValue, item: TokenItem) -> bool:
    if value.code is None:
        return item.system == value.system
    if item.code != value.code:
        return False
    if value.system is None:
        return True
    if value.system == "":
        return item.system is None or item.implicit
    return item.system == value.system


def _reference(value: ReferenceValue, item: RefItem, base_url: str | None) -> bool:
    kind = value.kind
    if kind == "identifier":
        if item.ident_value != value.ident_value:
            return False
        if value.ident_system is None:
            return True
        if value.ident_system == "":
            return item.ident_system is None
        return item.ident_system == value.ident_system
    if kind == "url":
        if item.url != value.url:
            return False
        return value.version is None or item.version == value.version
    if item.relative is None or item.local:
        return False
    if item.base is not None and (base_url is None or item.base != base_url.rstrip("/")):
        return False  # an absolute reference to another server
    if kind == "relative":
        return item.type == value.type and item.id == value.id
    return item.id == value.id  # kind == "id"


def _date(value: DateValue, lo: int, hi: int) -> bool:
    p, slo, shi = value.prefix, value.lo, value.hi
    if p == "eq":
        return slo <= lo and hi <= shi
    if p == "ne":
        return not (slo <= lo and hi <= shi)
    if p == "gt":
        return hi > shi
    if p == "lt":
        return lo < slo
    if p == "ge":
        return hi > shi or (slo <= lo and hi <= shi)
    if p == "le":
        return lo < slo or (slo <= lo and hi <= shi)
    if p == "sa":
        return lo >= shi
    if p == "eb":
        return hi <= slo
    if p == "ap":
        return lo < value.ap_hi and hi > value.ap_lo
    return False


def _number(value: NumberValue, item: NumItem | QtyItem) -> bool:
    lo: Decimal | None = None if item.lo is None else to_decimal(item.lo)
    hi: Decimal | None = None if item.hi is None else to_decimal(item.hi)
    p = value.prefix
    if p in ("eq", "ne"):
        inside = (
            lo is not None
            and hi is not None
            and lo >= value.lo
            and (hi <= value.hi if item.hi_open else hi < value.hi)
        )
        return inside if p == "eq" else not inside
    v = value.value
    if p == "gt":
        return hi is None or hi > v
    if p == "ge":
        return hi is None or (hi > v if item.hi_open else hi >= v)
    if p == "lt":
        return lo is None or lo < v
    if p == "le":
        return lo is None or (lo < v if item.lo_open else lo <= v)
    if p == "sa":
        return lo is not None and lo >= value.hi
    if p == "eb":
        return hi is not None and (hi <= value.lo if item.hi_open else hi < value.lo)
    if p == "ap":
        below_end = lo is None or lo < value.ap_hi
        above_start = hi is None or (hi > value.ap_lo if item.hi_open else hi >= value.ap_lo)
        return below_end and above_start
    return False


def _units(value: QuantityValue, item: QtyItem) -> bool:
    if value.system is not None and value.code is not None:
        return item.system == value.system and item.code == value.code
    if value.code is not None:
        return item.code == value.code or item.unit == value.code
    if value.system is not None:
        return item.system == value.system
    return True


def _uri(query: str, item: str, modifier: str | None) -> bool:
    url = item.partition("|")[0]
    if modifier == "below":
        if url == query:
            return True
        return url.startswith(query) and (query.endswith("/") or url[len(query)] == "/")
    if modifier == "above":
        if url == query:
            return True
        return bool(url) and query.startswith(url) and (url.endswith("/") or query[len(url)] == "/")
    return item == query or url == query
