"""Parsing of R4 search requests into criteria, and the blind-index terms of each criterion.

`parse_search(resource_type, params, strict=...)` takes the decoded (name, value) pairs of a
search and returns a `ParsedSearch`:

* search parameters become AND'ed criteria (one per occurrence); a value is an OR of its
  comma-separated parts; ``\\,`` ``\\$`` ``\\|`` ``\\\\`` escape the separators;
* `Criterion` (one parameter of the searched type), `ChainCriterion` (``subject:Patient.name``,
  ``subject.name`` when only one target type has the parameter, several levels) and
  `HasCriterion` (``_has:Observation:patient:code``, nestable). The caller resolves chains
  and _has by running the inner criterion on the other type, then turns the ids found into
  a `reference_criterion`;
* result parameters: _count, _sort, _summary, _elements, _total, _include, _revinclude
  (``:iterate``); _format and _pretty are ignored;
* unknown parameters are collected in `ParsedSearch.unknown` (strict=False; the caller adds
  warnings) or refused (strict=True).

Errors are `SearchError` (HTTP 400 OperationOutcome). Messages name the parameter and why,
never the submitted value. Refused on purpose: ``:contains`` and ``:text`` (they would need
n-gram indexes that leak too much about the data), ``:in``/``:not-in``/``:above``/``:below``
on tokens (no terminology service).

`Criterion.query_terms()` gives the plaintext terms (see `values`, which documents the term
scheme) whose union of matching resources is a superset of the resources that match; None
when no index narrows the criterion, and the caller must scan. Candidates are then verified
by `match.matches`. Terms by search value:

    string     ``:exact``: x|text. Otherwise m = len(normalised query): m >= 2: s| + the
               query's prefix of the longest indexed length <= m (`values.string_query_length`:
               7 -> 6, 20 -> 9); m < 2: None
    token      ``code``: tc|code; ``system|code``: ts|system|code; ``|code``: tc|code (the
               codes with a system are verified away); ``system|``: tS|system;
               ``:of-type``: to|type_system|type_code|value; ``:not``: None
    reference  r|Type/id, ri|id, ru|url[|version], rI|system|value, rIv|value
    uri        u|uri; ``:above``: u| of every prefix of the query ending before or at a "/";
               ``:below``: None
    number     n| blocks covering `number_key_range`; ``ne``: None
    quantity   q| blocks covering `number_key_range` (units are verified); ``ne``: None
    composite  c| + the token terms of the first component (if it is a token)
    :missing   None (true and false)

Date prefixes map to key ranges over the day-bucket families (lo day "dL", hi-1 ms day "dH";
search value [slo, shi), resource value [lo, hi)):

    eq  slo <= lo, hi <= shi               dL in [day(slo), day(shi - 1)]
    gt  hi > shi                           dH in [day(shi), max]
    ge  hi > shi or (eq)                   dH in [day(slo), max]
    lt  lo < slo                           dL in [0, day(slo - 1)]
    le  lo < slo or (eq)                   dL in [0, day(shi - 1)]
    sa  lo >= shi                          dL in [day(shi), max]
    eb  hi <= slo                          dH in [0, day(slo - 1)]
    ap  lo < B and hi > A                  dL in [day(A), day(B - 1)]  +  dH in [day(A), max]
        ([A, B) is the search range widened by 10 % of its distance to now)
    ne                                     None

A value within one day is indexed under the point family "dP" only (its day is both its lo
and its hi day), so each dL or dH block looked up is also looked up in dP. For ``ap`` the
dP blocks of the dL range suffice: a point day d has day(A) <= d <= day(B - 1).

Numbers and quantities use the same idea with `number_key` on the value's ends (see match.py
for the exact semantics).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation, localcontext
from typing import Final, Literal

from fhirvault.domain import r4
from fhirvault.domain.errors import Issue, OperationOutcomeError
from fhirvault.domain.search.params import SearchParam, search_params
from fhirvault.domain.search.values import (
    DATE_BRANCH,
    DATE_LEVELS,
    DAY_MAX,
    NUMBER_BRANCH,
    NUMBER_KEY_MAX,
    NUMBER_LEVELS,
    date_day,
    normalise,
    number_key,
    parse_date,
    range_cover,
    string_query_length,
)

__all__ = [
    "ChainCriterion",
    "CompositeValue",
    "Criterion",
    "DateValue",
    "HasCriterion",
    "Include",
    "MissingValue",
    "NumberValue",
    "OfTypeValue",
    "ParsedSearch",
    "QuantityValue",
    "ReferenceValue",
    "SearchError",
    "SearchValue",
    "SortKey",
    "StringValue",
    "TokenValue",
    "UriValue",
    "date_query_terms",
    "id_criterion",
    "number_key_range",
    "parse_search",
    "reference_criterion",
    "safe_name",
    "split_escaped",
    "unescape",
]

PREFIXES: Final = frozenset({"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"})
SUMMARY_VALUES: Final = frozenset({"true", "false", "text", "data", "count"})
TOTAL_VALUES: Final = frozenset({"none", "estimate", "accurate"})
IGNORED: Final = frozenset({"_format", "_pretty"})
RESULT_PARAMS: Final = frozenset(
    {"_count", "_sort", "_summary", "_elements", "_total", "_include", "_revinclude"}
)
NGRAM_REASON: Final = "it would need n-gram indexes that leak too much about the data"
TERMINOLOGY_REASON: Final = "terminology service not available"
# Chains deeper than this are refused (each level is a search of its own).
MAX_CHAIN_DEPTH: Final = 4
# Request size caps (docs/search.md): every criterion becomes one AND-ed clause of the store's query and
# every comma-separated value one OR-ed term, so thousands of them would exceed the database's expression
# limits (SQLite refuses more than 1,000 levels) long before they make a sensible search.
MAX_PARAMETERS: Final = 100  # search and result parameters of one request (_format, _pretty not counted)
MAX_VALUES: Final = 100  # comma-separated values of one parameter
MAX_TOTAL_VALUES: Final = 1_000  # values over all parameters of one request

_SAFE_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_\-.:]{0,99}", re.ASCII)
_ID: Final = re.compile(r"[A-Za-z0-9\-.]{1,64}", re.ASCII)
_RELATIVE: Final = re.compile(
    r"([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?", re.ASCII
)
_HISTORY: Final = re.compile(r"/_history/[A-Za-z0-9\-.]{1,64}$", re.ASCII)
_NUMBER: Final = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_ELEMENT: Final = re.compile(r"[A-Za-z][A-Za-z0-9]*", re.ASCII)


class SearchError(OperationOutcomeError):
    """A search request that cannot be run: HTTP 400 with an OperationOutcome."""

    def __init__(self, message: str, parameter: str | None = None, code: str = "invalid") -> None:
        expression = (parameter,) if parameter else ()
        super().__init__(400, [Issue("error", code, message, expression)], {})


def safe_name(name: str) -> str:
    """A parameter name fit for a message (names are client input too)."""
    return name if _SAFE_NAME.fullmatch(name) else "(unprintable parameter name)"


# ---------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class StringValue:
    text: str  # as sent (for :exact)
    normalised: str


@dataclass(frozen=True, slots=True)
class TokenValue:
    """system None: any system; system "": no system (``|code``); code None: ``system|``."""

    system: str | None
    code: str | None


@dataclass(frozen=True, slots=True)
class OfTypeValue:
    type_system: str
    type_code: str
    value: str


@dataclass(frozen=True, slots=True)
class ReferenceValue:
    kind: Literal["relative", "id", "url", "identifier"]
    type: str | None = None
    id: str | None = None
    url: str | None = None
    version: str | None = None
    ident_system: str | None = None  # "" = explicitly no system (``|value``)
    ident_value: str | None = None


@dataclass(frozen=True, slots=True)
class DateValue:
    """[lo, hi) of the search value by its precision; [ap_lo, ap_hi) the widened `ap` range."""

    prefix: str
    lo: int
    hi: int
    ap_lo: int
    ap_hi: int


@dataclass(frozen=True, slots=True)
class NumberValue:
    """value, its implicit precision range [lo, hi), and the `ap` range [ap_lo, ap_hi)."""

    prefix: str
    value: Decimal
    lo: Decimal
    hi: Decimal
    ap_lo: Decimal
    ap_hi: Decimal


@dataclass(frozen=True, slots=True)
class QuantityValue:
    number: NumberValue
    system: str | None
    code: str | None


@dataclass(frozen=True, slots=True)
class UriValue:
    uri: str


@dataclass(frozen=True, slots=True)
class MissingValue:
    missing: bool


@dataclass(frozen=True, slots=True)
class CompositeValue:
    components: tuple[SearchValue, ...]


SearchValue = (
    StringValue
    | TokenValue
    | OfTypeValue
    | ReferenceValue
    | DateValue
    | NumberValue
    | QuantityValue
    | UriValue
    | MissingValue
    | CompositeValue
)


# ---------------------------------------------------------------- criteria


@dataclass(frozen=True, slots=True)
class Criterion:
    """One occurrence of a search parameter of the searched type: its values are OR'ed.

    modifier: None, "missing", "exact", "not", "of-type", "identifier", "above", "below"
    or "type" (with `target_type`, for ``:[Type]``).
    """

    name: str
    param: SearchParam
    modifier: str | None
    values: tuple[SearchValue, ...]
    target_type: str | None = None
    base_url: str | None = None  # the server's base: absolute references to it are local

    @property
    def code(self) -> str:
        """The parameter's code: index terms are keyed by it (see values.index_terms)."""
        return self.param.code

    def query_terms(self) -> list[bytes] | None:
        """Terms whose union selects a superset of the matches; None: scan instead."""
        if self.modifier in ("missing", "not"):
            return None
        out: list[bytes] = []
        for value in self.values:
            terms = _value_terms(self, value)
            if terms is None:
                return None
            out.extend(terms)
        return list(dict.fromkeys(out))


@dataclass(frozen=True, slots=True)
class ChainCriterion:
    """``param[:target_type].inner``: resources whose `param` points to a `target_type`
    resource matching `inner` (evaluated on target_type)."""

    name: str
    param: SearchParam
    target_type: str
    inner: Criterion | ChainCriterion
    base_url: str | None = None  # pass on to reference_criterion

    @property
    def code(self) -> str:
        return self.param.code


@dataclass(frozen=True, slots=True)
class HasCriterion:
    """``_has:source_type:param:inner``: resources referred to, through `param` (a reference
    parameter of source_type), by a source_type resource matching `inner`."""

    name: str
    source_type: str
    param: SearchParam
    inner: Criterion | ChainCriterion | HasCriterion

    @property
    def code(self) -> str:
        """The reference parameter's code (on source_type)."""
        return self.param.code


AnyCriterion = Criterion | ChainCriterion | HasCriterion


@dataclass(frozen=True, slots=True)
class SortKey:
    param: SearchParam
    descending: bool


@dataclass(frozen=True, slots=True)
class Include:
    """``_include``/``_revinclude`` ``source_type:param[:target_type]``; param None is ``*``."""

    source_type: str | None
    param: SearchParam | None
    target_type: str | None
    iterate: bool


@dataclass(frozen=True, slots=True)
class ParsedSearch:
    resource_type: str
    criteria: tuple[AnyCriterion, ...] = ()
    count: int | None = None
    sort: tuple[SortKey, ...] = ()
    summary: str | None = None
    elements: tuple[str, ...] = ()
    total: str | None = None
    includes: tuple[Include, ...] = ()
    revincludes: tuple[Include, ...] = ()
    # Names of parameters that were ignored (strict=False). Client input: sanitise before
    # echoing them (see `safe_name`).
    unknown: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------- escaping


def split_escaped(text: str, sep: str) -> list[str]:
    """Split on `sep` where it is not escaped by a backslash; escapes are kept."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n:
            current.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


_ESCAPE: Final = re.compile(r"\\([,$|\\])")


def unescape(text: str) -> str:
    return _ESCAPE.sub(r"\1", text) if "\\" in text else text


# ---------------------------------------------------------------- value parsers


class _Ctx:
    """What value parsing needs besides the text."""

    __slots__ = ("base_url", "name", "now_ms")

    def __init__(self, name: str, now_ms: int, base_url: str | None) -> None:
        self.name = name
        self.now_ms = now_ms
        self.base_url = base_url

    def error(self, why: str) -> SearchError:
        return SearchError(f"Search parameter '{self.name}': {why}.", self.name)


def _prefix(text: str, ctx: _Ctx) -> tuple[str, str]:
    if len(text) >= 2 and text[0].isalpha():
        prefix = text[:2]
        if prefix not in PREFIXES:
            raise ctx.error("unknown comparison prefix (use eq, ne, gt, lt, ge, le, sa, eb or ap)")
        return prefix, text[2:]
    return "eq", text


def _parse_date(text: str, ctx: _Ctx) -> DateValue:
    prefix, rest = _prefix(text, ctx)
    rng = parse_date(rest)
    if rng is None:
        raise ctx.error("invalid date (expected YYYY, YYYY-MM, YYYY-MM-DD or a dateTime)")
    lo, hi = rng
    widen = abs(ctx.now_ms - lo) // 10
    return DateValue(prefix, lo, hi, lo - widen, hi + widen)


def _parse_number(text: str, ctx: _Ctx, prefix_allowed: bool = True) -> NumberValue:
    prefix, rest = _prefix(text, ctx) if prefix_allowed else ("eq", text)
    if not _NUMBER.fullmatch(rest):
        raise ctx.error("invalid number")
    try:
        value = Decimal(rest)
        exponent = value.as_tuple().exponent
        if not isinstance(exponent, int) or abs(exponent) > 1000 or value.adjusted() > 1000:
            raise ctx.error("number out of range")
        with localcontext() as dc:
            dc.prec = 200
            half = Decimal(5).scaleb(exponent - 1)
            lo, hi = value - half, value + half
            widen = abs(value) / 10
            ap_lo, ap_hi = lo - widen, hi + widen
    except InvalidOperation as exc:
        raise ctx.error("invalid number") from exc
    return NumberValue(prefix, value, lo, hi, ap_lo, ap_hi)


def _parse_quantity(text: str, ctx: _Ctx) -> QuantityValue:
    parts = split_escaped(text, "|")
    if len(parts) == 1:
        return QuantityValue(_parse_number(unescape(parts[0]), ctx), None, None)
    if len(parts) != 3:
        raise ctx.error("invalid quantity (expected number, number|system|code or number||code)")
    number = _parse_number(unescape(parts[0]), ctx)
    system, code = unescape(parts[1]) or None, unescape(parts[2]) or None
    return QuantityValue(number, system, code)


def _parse_token(text: str, ctx: _Ctx) -> TokenValue:
    parts = split_escaped(text, "|")
    if len(parts) == 1:
        code = unescape(parts[0])
        return TokenValue(None, code)
    if len(parts) > 2:
        raise ctx.error("invalid token (expected code, system|code, |code or system|)")
    system, code = unescape(parts[0]), unescape(parts[1])
    if not system and not code:
        raise ctx.error("empty token")
    if not code:
        return TokenValue(system, None)
    return TokenValue(system, code)


def _parse_of_type(text: str, ctx: _Ctx) -> OfTypeValue:
    parts = [unescape(p) for p in split_escaped(text, "|")]
    if len(parts) != 3 or not all(parts):
        raise ctx.error("the :of-type modifier needs system|code|value")
    return OfTypeValue(parts[0], parts[1], parts[2])


def _is_absolute(value: str) -> bool:
    return "://" in value or value.startswith("urn:")


def _parse_reference(text: str, ctx: _Ctx, target_type: str | None) -> ReferenceValue:
    parts = split_escaped(text, "|")
    if len(parts) > 2:
        raise ctx.error("invalid reference")
    value = unescape(parts[0])
    version = unescape(parts[1]) if len(parts) == 2 else None
    if value.startswith("#"):
        raise ctx.error("references to contained resources cannot be searched")
    if _is_absolute(value):
        base = ctx.base_url.rstrip("/") if ctx.base_url else None
        stripped = _HISTORY.sub("", value)
        if base and version is None and stripped.startswith(base + "/"):
            local = _RELATIVE.fullmatch(stripped[len(base) + 1 :])
            if local is not None and r4.is_resource_type(local.group(1)):
                return _relative(local.group(1), local.group(2), target_type, ctx)
        return ReferenceValue("url", url=stripped, version=version or None)
    if version is not None:
        raise ctx.error("a version is only allowed after a canonical URL")
    m = _RELATIVE.fullmatch(value)
    if m is not None:
        if not r4.is_resource_type(m.group(1)):
            raise ctx.error("unknown resource type in reference")
        return _relative(m.group(1), m.group(2), target_type, ctx)
    if _ID.fullmatch(value):
        if target_type is not None:
            return ReferenceValue("relative", type=target_type, id=value)
        return ReferenceValue("id", id=value)
    raise ctx.error("invalid reference (expected [type]/[id], [id] or an absolute URL)")


def _relative(rtype: str, rid: str, target_type: str | None, ctx: _Ctx) -> ReferenceValue:
    if target_type is not None and target_type != rtype:
        raise ctx.error("the reference's type differs from the type modifier")
    return ReferenceValue("relative", type=rtype, id=rid)


def _parse_identifier(text: str, ctx: _Ctx) -> ReferenceValue:
    parts = split_escaped(text, "|")
    if len(parts) == 1:
        return ReferenceValue("identifier", ident_value=unescape(parts[0]))
    if len(parts) != 2:
        raise ctx.error("invalid identifier (expected value, system|value or |value)")
    system, value = unescape(parts[0]), unescape(parts[1])
    if not value:
        raise ctx.error("the :identifier modifier needs a value")
    return ReferenceValue("identifier", ident_system=system, ident_value=value)


def _parse_component(comp_type: str, text: str, ctx: _Ctx) -> SearchValue:
    if not text:
        raise ctx.error("empty composite component")
    if comp_type == "token":
        return _parse_token(text, ctx)
    if comp_type == "date":
        return _parse_date(unescape(text), ctx)
    if comp_type == "number":
        return _parse_number(unescape(text), ctx)
    if comp_type == "quantity":
        return _parse_quantity(text, ctx)
    if comp_type == "string":
        raw = unescape(text)
        return StringValue(raw, normalise(raw))
    if comp_type == "uri":
        return UriValue(unescape(text))
    if comp_type == "reference":
        return _parse_reference(text, ctx, None)
    raise ctx.error("unsupported composite component")


# ---------------------------------------------------------------- modifiers

_TOKEN_TERMINOLOGY: Final = frozenset({"in", "not-in", "above", "below"})
_ALLOWED: Final[dict[str, frozenset[str]]] = {
    "string": frozenset({"missing", "exact"}),
    "token": frozenset({"missing", "not", "of-type"}),
    "reference": frozenset({"missing", "identifier"}),
    "uri": frozenset({"missing", "above", "below"}),
    "date": frozenset({"missing"}),
    "number": frozenset({"missing"}),
    "quantity": frozenset({"missing"}),
    "composite": frozenset({"missing"}),
}


def _check_modifier(param: SearchParam, modifier: str, ctx: _Ctx) -> str:
    """The normalised modifier ("type" for :[Type]); raises when it is refused."""
    if modifier in ("contains", "text"):
        raise SearchError(
            f"Search parameter '{ctx.name}': the :{modifier} modifier is not supported: "
            f"{NGRAM_REASON}.",
            ctx.name,
            "not-supported",
        )
    if param.type == "token" and modifier in _TOKEN_TERMINOLOGY:
        raise SearchError(
            f"Search parameter '{ctx.name}': the :{modifier} modifier is not supported: "
            f"{TERMINOLOGY_REASON}.",
            ctx.name,
            "not-supported",
        )
    if param.type == "reference" and r4.is_resource_type(modifier):
        if param.targets and modifier not in param.targets:
            raise ctx.error("the type modifier is not a target type of this parameter")
        return "type"
    if param.type == "reference" and modifier in ("above", "below"):
        raise SearchError(
            f"Search parameter '{ctx.name}': the :{modifier} modifier is not supported on "
            "references.",
            ctx.name,
            "not-supported",
        )
    if modifier not in _ALLOWED.get(param.type, frozenset()):
        raise SearchError(
            f"Search parameter '{ctx.name}': unknown or unsupported modifier for a "
            f"{param.type} parameter.",
            ctx.name,
            "not-supported",
        )
    if modifier == "of-type" and not any(p.value_type == "Identifier" for p in param.paths):
        raise ctx.error("the :of-type modifier applies to identifiers only")
    return modifier


def _parse_values(
    param: SearchParam, modifier: str | None, target_type: str | None, raw: str, ctx: _Ctx
) -> tuple[SearchValue, ...]:
    if raw == "":
        raise ctx.error("empty value")
    out: list[SearchValue] = []
    parts = split_escaped(raw, ",")
    if len(parts) > MAX_VALUES:
        raise SearchError(f"Search parameter '{ctx.name}': at most {MAX_VALUES} comma-separated values.",
                          ctx.name, "too-costly")
    for part in parts:
        if part == "":
            raise ctx.error("empty value in a comma-separated list")
        out.append(_parse_value(param, modifier, target_type, part, ctx))
    return tuple(out)


def _parse_value(
    param: SearchParam, modifier: str | None, target_type: str | None, part: str, ctx: _Ctx
) -> SearchValue:
    if modifier == "missing":
        text = unescape(part)
        if text not in ("true", "false"):
            raise ctx.error("the :missing modifier takes true or false")
        return MissingValue(text == "true")
    kind = param.type
    if kind == "string":
        text = unescape(part)
        return StringValue(text, normalise(text))
    if kind == "token":
        if modifier == "of-type":
            return _parse_of_type(part, ctx)
        return _parse_token(part, ctx)
    if kind == "reference":
        if modifier == "identifier":
            return _parse_identifier(part, ctx)
        return _parse_reference(part, ctx, target_type)
    if kind == "date":
        return _parse_date(unescape(part), ctx)
    if kind == "number":
        return _parse_number(unescape(part), ctx)
    if kind == "quantity":
        return _parse_quantity(part, ctx)
    if kind == "uri":
        return UriValue(unescape(part))
    if kind == "composite":
        pieces = split_escaped(part, "$")
        if len(pieces) != len(param.components):
            raise ctx.error(
                f"a composite value needs {len(param.components)} components separated by $"
            )
        return CompositeValue(
            tuple(
                _parse_component(c.type, piece, ctx)
                for c, piece in zip(param.components, pieces, strict=True)
            )
        )
    raise ctx.error("unsupported parameter type")


# ---------------------------------------------------------------- query terms


def _date_cover(family: bytes, lo_day: int, hi_day: int, points: bool = True) -> list[bytes]:
    """Blocks of `family` covering [lo_day, hi_day], and the same blocks of dP if `points`."""
    blocks = range_cover(lo_day, hi_day, DATE_LEVELS, DATE_BRANCH)
    out = [family + b"|%d|%d" % block for block in blocks]
    if points:
        out.extend(b"dP|%d|%d" % block for block in blocks)
    return out


def date_query_terms(value: DateValue) -> list[bytes] | None:
    p, slo, shi = value.prefix, value.lo, value.hi
    if p == "eq":
        return _date_cover(b"dL", date_day(slo), date_day(shi - 1))
    if p == "gt":
        return _date_cover(b"dH", date_day(shi), DAY_MAX)
    if p == "ge":
        return _date_cover(b"dH", date_day(slo), DAY_MAX)
    if p == "lt":
        return _date_cover(b"dL", 0, date_day(slo - 1))
    if p == "le":
        return _date_cover(b"dL", 0, date_day(shi - 1))
    if p == "sa":
        return _date_cover(b"dL", date_day(shi), DAY_MAX)
    if p == "eb":
        return _date_cover(b"dH", 0, date_day(slo - 1))
    if p == "ap":
        a, b = value.ap_lo, value.ap_hi
        return [
            *_date_cover(b"dL", date_day(a), date_day(b - 1)),
            *_date_cover(b"dH", date_day(a), DAY_MAX, points=False),
        ]
    return None  # ne


def number_key_range(value: NumberValue, ranged: bool) -> tuple[int, int] | None:
    """Inclusive key range that every matching value's indexed key falls in (None: scan).

    `ranged`: values may be ranges or half-lines (Range, Quantity with a comparator).
    """
    p = value.prefix
    if p == "eq":
        return number_key(value.lo), number_key(value.hi)
    if p in ("gt", "ge"):
        return number_key(value.value), NUMBER_KEY_MAX
    if p in ("lt", "le"):
        return 0, number_key(value.value)
    if p == "sa":
        return number_key(value.hi), NUMBER_KEY_MAX
    if p == "eb":
        return 0, number_key(value.lo)
    if p == "ap":
        if ranged:
            return number_key(value.ap_lo), NUMBER_KEY_MAX
        return number_key(value.ap_lo), number_key(value.ap_hi)
    return None  # ne


def _number_cover(prefix: bytes, rng: tuple[int, int]) -> list[bytes]:
    return [
        prefix + b"|%d|%d" % block
        for block in range_cover(rng[0], rng[1], NUMBER_LEVELS, NUMBER_BRANCH)
    ]


def _token_query_terms(value: TokenValue) -> list[bytes]:
    if value.code is None:
        return [b"tS|" + (value.system or "").encode()]
    code = value.code.encode()
    if not value.system:  # any system, or none (``|code``: verified)
        return [b"tc|" + code]
    return [b"ts|" + value.system.encode() + b"|" + code]


def _uri_query_terms(value: UriValue, modifier: str | None) -> list[bytes] | None:
    uri = value.uri
    if modifier == "below":
        return None
    out = [b"u|" + uri.encode()]
    if modifier == "above":
        i = uri.find("/")
        while i != -1:
            if i > 0:
                out.append(b"u|" + uri[:i].encode())
            out.append(b"u|" + uri[: i + 1].encode())
            i = uri.find("/", i + 1)
    return out


def _reference_query_terms(value: ReferenceValue) -> list[bytes] | None:
    if value.kind == "relative":
        return [b"r|" + f"{value.type}/{value.id}".encode()]
    if value.kind == "id":
        return [b"ri|" + (value.id or "").encode()]
    if value.kind == "url":
        url = (value.url or "").encode()
        if value.version is not None:
            return [b"ru|" + url + b"|" + value.version.encode()]
        return [b"ru|" + url]
    if value.ident_value is None:
        return None
    if value.ident_system:
        return [b"rI|" + value.ident_system.encode() + b"|" + value.ident_value.encode()]
    return [b"rIv|" + value.ident_value.encode()]


def _value_terms(crit: Criterion, value: SearchValue) -> list[bytes] | None:
    ranged = crit.param.type == "quantity" or crit.param.has_ranges
    if isinstance(value, StringValue):
        if crit.modifier == "exact":
            return [b"x|" + value.text.encode()]
        length = string_query_length(len(value.normalised))
        if length is None:
            return None  # too short for an indexed prefix: scan
        return [b"s|" + value.normalised[:length].encode()]
    if isinstance(value, TokenValue):
        return _token_query_terms(value)
    if isinstance(value, OfTypeValue):
        return [
            b"to|"
            + value.type_system.encode()
            + b"|"
            + value.type_code.encode()
            + b"|"
            + value.value.encode()
        ]
    if isinstance(value, ReferenceValue):
        return _reference_query_terms(value)
    if isinstance(value, DateValue):
        return date_query_terms(value)
    if isinstance(value, NumberValue):
        rng = number_key_range(value, ranged)
        return None if rng is None else _number_cover(b"n", rng)
    if isinstance(value, QuantityValue):
        rng = number_key_range(value.number, ranged)  # units are verified
        return None if rng is None else _number_cover(b"q", rng)
    if isinstance(value, UriValue):
        return _uri_query_terms(value, crit.modifier)
    if isinstance(value, CompositeValue):
        first = value.components[0]
        if not isinstance(first, TokenValue):
            return None
        return [b"c|" + t for t in _token_query_terms(first)]
    return None


# ---------------------------------------------------------------- keys


class _Unknown(Exception):
    """An unknown parameter: collected or refused, depending on strict."""


def _criterion(
    resource_type: str, key: str, raw: str, ctx_now: int, base_url: str | None, depth: int
) -> AnyCriterion:
    if depth > MAX_CHAIN_DEPTH:
        raise SearchError(
            f"Search parameter chains and _has are limited to {MAX_CHAIN_DEPTH} levels.",
            None,
            "too-costly",
        )
    if key.startswith("_has:"):
        return _has(resource_type, key, raw, ctx_now, base_url, depth)
    head, dot, rest = key.partition(".")
    code, colon, modifier = head.partition(":")
    param = search_params(resource_type).get(code)
    if param is None:
        raise _Unknown(key)
    ctx = _Ctx(code, ctx_now, base_url)
    if dot:
        return _chain(resource_type, param, modifier if colon else None, rest, raw, ctx, depth)
    if colon and not modifier:
        raise ctx.error("empty modifier")
    mod = _check_modifier(param, modifier, ctx) if colon else None
    target_type = modifier if mod == "type" else None
    values = _parse_values(param, mod, target_type, raw, ctx)
    return Criterion(
        key if _SAFE_NAME.fullmatch(key) else code, param, mod, values, target_type, base_url
    )


def _chain(
    resource_type: str,
    param: SearchParam,
    type_modifier: str | None,
    rest: str,
    raw: str,
    ctx: _Ctx,
    depth: int,
) -> ChainCriterion:
    if param.type != "reference":
        raise ctx.error("only reference parameters can be chained")
    if rest.startswith("_has:"):
        raise ctx.error("_has cannot be used inside a chain")
    inner_code = rest.partition(".")[0].partition(":")[0]
    if type_modifier is not None:
        if not r4.is_resource_type(type_modifier):
            raise ctx.error("a chained parameter's modifier must be a resource type")
        if param.targets and type_modifier not in param.targets:
            raise ctx.error("the type modifier is not a target type of this parameter")
        target = type_modifier
    else:
        candidates = sorted(
            t for t in (param.targets or r4.resource_types()) if inner_code in search_params(t)
        )
        if not candidates:
            raise _Unknown(f"{param.code}.{rest}")
        if len(candidates) > 1:
            raise ctx.error(
                "the chain is ambiguous: several target types have the chained parameter; "
                f"name one, e.g. {param.code}:{candidates[0]}.{inner_code}"
            )
        target = candidates[0]
    if inner_code not in search_params(target):
        raise _Unknown(f"{param.code}:{target}.{rest}")
    inner = _criterion(target, rest, raw, ctx.now_ms, ctx.base_url, depth + 1)
    assert not isinstance(inner, HasCriterion)  # rest does not start with _has:
    return ChainCriterion(param.code, param, target, inner, ctx.base_url)


def _has(
    resource_type: str, key: str, raw: str, now_ms: int, base_url: str | None, depth: int
) -> HasCriterion:
    parts = key.split(":", 3)
    if len(parts) != 4 or not all(parts[1:]):
        raise SearchError(
            "_has needs the form _has:[type]:[reference parameter]:[parameter]", "_has"
        )
    _, source_type, ref_code, rest = parts
    if not r4.is_resource_type(source_type):
        raise SearchError("_has: unknown resource type.", "_has")
    ref = search_params(source_type).get(ref_code)
    if ref is None:
        raise _Unknown(key)  # unknown like any other parameter: ignored (lenient) or refused (strict)
    if ref.type != "reference":
        raise SearchError(f"_has: {source_type} has no reference parameter of that name.", "_has")
    if ref.targets and resource_type not in ref.targets:
        raise SearchError(
            f"_has: that {source_type} parameter cannot refer to a {resource_type}.", "_has"
        )
    inner = _criterion(source_type, rest, raw, now_ms, base_url, depth + 1)
    return HasCriterion(f"_has:{source_type}:{ref_code}", source_type, ref, inner)


# ---------------------------------------------------------------- result parameters


def _parse_count(raw: str) -> int:
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise SearchError("_count must be a non-negative integer.", "_count")
    return int(raw)


def _parse_sort(resource_type: str, raw: str) -> tuple[SortKey, ...]:
    keys: list[SortKey] = []
    params = search_params(resource_type)
    for part in raw.split(","):
        descending = part.startswith("-")
        code = part[1:] if descending else part
        if not code:
            raise SearchError("_sort: empty sort key.", "_sort")
        param = params.get(code)
        if param is None:
            raise SearchError(
                f"_sort: not a search parameter of {resource_type}"
                + (f" ('{code}')." if _SAFE_NAME.fullmatch(code) else "."),
                "_sort",
            )
        keys.append(SortKey(param, descending))
    return tuple(keys)


def _parse_elements(raw: str) -> tuple[str, ...]:
    names = [n.strip() for n in raw.split(",")]
    if not all(_ELEMENT.fullmatch(n) for n in names):
        raise SearchError("_elements must be a comma-separated list of element names.", "_elements")
    return tuple(names)


def _parse_include(resource_type: str, name: str, raw: str, reverse: bool) -> Include:
    base, _, modifier = name.partition(":")
    if modifier not in ("", "iterate", "recurse"):
        raise SearchError(f"{base}: unknown modifier (only :iterate).", base)
    iterate = modifier != ""
    if raw == "*":
        return Include(None, None, None, iterate)
    parts = raw.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise SearchError(
            f"{base} must be [type]:[parameter] or [type]:[parameter]:[target type].", base
        )
    source, code = parts[0], parts[1]
    if not r4.is_resource_type(source):
        raise SearchError(f"{base}: unknown resource type.", base)
    target = parts[2] if len(parts) == 3 else None
    if code == "*":
        return Include(source, None, target, iterate)
    param = search_params(source).get(code)
    if param is None or param.type != "reference":
        raise SearchError(f"{base}: {source} has no reference parameter of that name.", base)
    if target is not None:
        if not r4.is_resource_type(target):
            raise SearchError(f"{base}: unknown target type.", base)
        if param.targets and target not in param.targets:
            raise SearchError(f"{base}: not a target type of that parameter.", base)
    return Include(source, param, target, iterate)


# ---------------------------------------------------------------- entry points


def _check_size(params: Sequence[tuple[str, str]]) -> None:
    """The request-size caps, checked before any parameter is parsed (a cheap count)."""
    counted = [raw for name, raw in params if name.partition(":")[0] not in IGNORED]
    if len(counted) > MAX_PARAMETERS:
        raise SearchError(f"A search takes at most {MAX_PARAMETERS} parameters; narrow it.", None, "too-costly")
    if sum(raw.count(",") + 1 for raw in counted) > MAX_TOTAL_VALUES:
        raise SearchError(f"A search takes at most {MAX_TOTAL_VALUES} values over all its parameters.", None,
                          "too-costly")


def parse_search(
    resource_type: str,
    params: Sequence[tuple[str, str]],
    *,
    strict: bool,
    base_url: str | None = None,
    now_ms: int | None = None,
) -> ParsedSearch:
    """Parse the (name, value) pairs of a search on `resource_type`.

    strict: unknown parameters raise SearchError (``Prefer: handling=strict``); otherwise they
    are returned in `ParsedSearch.unknown`. base_url: the server's base URL, so that absolute
    references to this server count as local. now_ms: "now" for the `ap` prefix on dates.
    """
    if not r4.is_resource_type(resource_type):
        raise SearchError("Unknown resource type.", None, "not-supported")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    criteria: list[AnyCriterion] = []
    unknown: list[str] = []
    count: int | None = None
    sort: tuple[SortKey, ...] = ()
    summary: str | None = None
    total: str | None = None
    elements: list[str] = []
    includes: list[Include] = []
    revincludes: list[Include] = []
    seen_single: set[str] = set()
    _check_size(params)
    for name, raw in params:
        base = name.partition(":")[0]
        if base in IGNORED:
            continue
        if base in RESULT_PARAMS:
            if base in ("_count", "_sort", "_summary", "_total"):
                if name != base:
                    raise SearchError(f"{base} takes no modifier.", base)
                if base in seen_single:
                    raise SearchError(f"{base} is given more than once.", base)
                seen_single.add(base)
            if base == "_count":
                count = _parse_count(raw)
            elif base == "_sort":
                sort = _parse_sort(resource_type, raw)
            elif base == "_summary":
                if raw not in SUMMARY_VALUES:
                    raise SearchError("_summary must be true, false, text, data or count.", base)
                summary = raw
            elif base == "_total":
                if raw not in TOTAL_VALUES:
                    raise SearchError("_total must be none, estimate or accurate.", base)
                total = raw
            elif base == "_elements":
                if name != base:
                    raise SearchError("_elements takes no modifier.", base)
                elements.extend(e for e in _parse_elements(raw) if e not in elements)
            elif base == "_include":
                includes.append(_parse_include(resource_type, name, raw, reverse=False))
            else:
                revincludes.append(_parse_include(resource_type, name, raw, reverse=True))
            continue
        try:
            criteria.append(_criterion(resource_type, name, raw, now, base_url, 0))
        except _Unknown:
            if strict:
                raise SearchError(
                    f"Unknown or unsupported search parameter '{safe_name(name)}' "
                    f"for {resource_type}.",
                    safe_name(name),
                    "not-supported",
                ) from None
            unknown.append(name)
    return ParsedSearch(
        resource_type=resource_type,
        criteria=tuple(criteria),
        count=count,
        sort=sort,
        summary=summary,
        elements=tuple(elements),
        total=total,
        includes=tuple(includes),
        revincludes=tuple(revincludes),
        unknown=tuple(unknown),
    )


def reference_criterion(
    code: str, param: SearchParam, refs: Iterable[str], *, base_url: str | None = None
) -> Criterion:
    """An OR of relative references ("Type/id") on a reference parameter (resolved chains).

    base_url: the server's base (`ChainCriterion.base_url`), so that absolute references to
    this server match too. With no refs, the criterion matches nothing; query_terms() is [].
    """
    if param.type != "reference":
        raise ValueError("reference_criterion needs a reference parameter")
    values: list[SearchValue] = []
    for ref in refs:
        m = _RELATIVE.fullmatch(ref)
        if m is None or not r4.is_resource_type(m.group(1)):
            raise ValueError("reference_criterion takes [type]/[id] references")
        values.append(ReferenceValue("relative", type=m.group(1), id=m.group(2)))
    return Criterion(code, param, None, tuple(values), None, base_url)


def id_criterion(resource_type: str, ids: Iterable[str]) -> Criterion:
    """An OR of logical ids (``_id``), e.g. the resources a resolved `HasCriterion` found.

    (The ids a source resource refers to through `HasCriterion.param` are the `id` of the
    `values.extract(param, source)` items whose `type` is the searched type and whose
    `base` is None or the server's base.) With no ids, query_terms() is [].
    """
    param = search_params(resource_type).get("_id")
    if param is None:
        raise ValueError("unknown resource type")
    return Criterion("_id", param, None, tuple(TokenValue(None, i) for i in ids))
