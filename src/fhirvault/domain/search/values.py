"""Typed search values of a resource, and the plaintext blind-index terms derived from them.

Extraction walks the precompiled paths of `params.SearchParam` and turns each leaf into a
typed item according to its FHIR data type:

    string     str: string/markdown; HumanName family, each given, prefix, suffix, text;
               Address each line, city, district, state, postalCode, country, text
    token      TokenItem(system, code): Coding; CodeableConcept (each coding); Identifier
               (system, value, plus its type codings for :of-type); ContactPoint (value, no
               system); code (with the implicit system of its required binding, when that
               binding has a single code system); boolean ("true"/"false"); id, uri, string
    reference  RefItem: Reference (relative ``Type/id`` with ``/_history/n`` stripped;
               absolute URL kept, and parsed into Type/id when it ends with Type/id;
               identifier; local ``#id`` kept for :missing, with no index term); canonical
               (url, version) and uri (url)
    date       (lo_ms, hi_ms): [lo, hi) in UTC milliseconds by the value's precision
               (``2020-03`` is the whole month; no time zone means UTC); Period start..end
               (a missing end is open to +inf, a missing start to -inf); Timing: the outer
               limits of its events and repeat.boundsPeriod. (Invalid data stays consistent:
               a Period ending before it starts, a Range with low > high are taken as the
               span of both ends.)
    number     NumItem(lo, hi, lo_open, hi_open): decimal/integer as a point (the JSON number
               is kept as parsed: int, float or Decimal); Range as [low, high]
    quantity   QtyItem: Quantity/SimpleQuantity/Age/Duration/Count/Distance (comparator
               `<`, `<=`, `>`, `>=` makes the value a half-line), Money (currency as code,
               system urn:iso:std:iso:4217), Range ([low, high], units of low or high)
    uri        str: uri, url, canonical, oid, uuid

Term scheme (bytes; the services layer HMACs each term per tenant, type and parameter).
Every term costs one random b-tree insert at ingest, so the scheme keeps only the families
that common searches need; whatever a term cannot decide is verified by `match.matches`
(there are no presence terms: ``:missing`` always scans and verifies):

    string  n = normalise(s): NFKD, combining marks dropped, casefold, every run of
            non-alphanumerics -> one space, stripped.
            b"s|" + n[:k] for each k in STRING_PREFIX_LENGTHS = (2, 3, 4, 6, 9) with
            k <= len(n) (k counts characters; the term holds their UTF-8), and
            b"x|" + s (as sent, for :exact). A query of normalised length m >= 2 looks up
            the prefix of the longest indexed length k <= m (`string_query_length`); m < 2
            scans. The services layer pads each value's prefix terms with random dummy tags
            up to STRING_PREFIX_TERMS (5), so the number of tags does not leak the length.
    token   b"tc|" + code (any system); b"ts|" + system + b"|" + code when a system is
            known, explicit or implicit (the single code system of the element's required
            binding); b"tS|" + system. ``|code`` (no system) looks up tc| and verification
            drops the codes that have an explicit system.
            Identifier, for :of-type: b"to|" + type_system + b"|" + type_code + b"|" + value
    reference  b"r|Type/id", b"ri|id" (relative references and absolute URLs ending with
            Type/id); b"ru|" + url for absolute, canonical and uri values, plus
            b"ru|" + url + b"|" + version for versioned canonicals; Reference.identifier:
            b"rI|" + system + b"|" + value and b"rIv|" + value. (A local ``#id`` reference
            has no term.)
    uri     b"u|" + uri (and b"u|" + url for a versioned canonical ``url|version``).
            ``:above`` looks up u| of every prefix of the query; ``:below`` scans.
    date    lo_day, hi_day: days since 1900-01-01 of lo and of hi - 1 ms, clamped into
            [0, 2^18). When lo_day == hi_day (a date, dateTime or instant within one day,
            the common case): for L in 0..5, b"dP|%d|%d" % (L, day >> 3L) (6 terms);
            otherwise for L in 0..5: b"dL|%d|%d" % (L, lo_day >> 3L) and
            b"dH|%d|%d" % (L, hi_day >> 3L) (12 terms). A point value is both its lo and its
            hi: a query looking up blocks of dL or dH also looks up the same blocks of dP.
    number  `number_key`: order-preserving 24-bit key (float32 bits mapped to an unsigned
            order, top 24 bits) of each end of the value (one for a point);
            for L in 0..5: b"n|%d|%d" % (L, key >> 4L)
    quantity  the value only, with the same level|bucket suffix: b"q|%d|%d"; a query with
            units looks up q| and verification checks the units.
    composite  b"c|" + each token term of the first component (candidates come from the
            first component; the rest is verified)

Queries turn into unions of these terms (`query.Criterion.query_terms`); `range_cover`
gives the aligned dyadic blocks covering a key range.
"""

from __future__ import annotations

import functools
import math
import re
import struct
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final, NamedTuple

from fhirvault.domain import r4
from fhirvault.domain.search.params import Path, SearchParam, Step, search_params

__all__ = [
    "DATE_BRANCH",
    "DATE_LEVELS",
    "DAY_MAX",
    "NEG_INF",
    "NUMBER_BRANCH",
    "NUMBER_KEY_MAX",
    "NUMBER_LEVELS",
    "POS_INF",
    "STRING_PREFIX_LENGTHS",
    "STRING_PREFIX_TERMS",
    "DateItem",
    "Item",
    "NumItem",
    "QtyItem",
    "RefItem",
    "TokenItem",
    "composite_foci",
    "date_day",
    "date_terms",
    "extract",
    "index_terms",
    "items_of",
    "leaves",
    "normalise",
    "number_key",
    "param_terms",
    "parse_date",
    "parse_reference",
    "range_cover",
    "string_query_length",
    "string_terms",
    "to_decimal",
]

# Lengths (in characters of the normalised value) of the indexed string prefixes.
STRING_PREFIX_LENGTHS: Final = (2, 3, 4, 6, 9)
# Prefix tags per string value after padding (services.search_index): one per length.
STRING_PREFIX_TERMS: Final = 5

DAY_MS: Final = 86_400_000
DAYS_1900_TO_1970: Final = 25_567
DATE_LEVELS: Final = 6
DATE_BRANCH: Final = 8
DAY_MAX: Final = 2**18 - 1
NEG_INF: Final = -(2**62)  # ms: open start of a Period
POS_INF: Final = 2**62  # ms: open end of a Period

NUMBER_LEVELS: Final = 6
NUMBER_BRANCH: Final = 16
NUMBER_KEY_MAX: Final = 2**24 - 1

ISO_4217: Final = "urn:iso:std:iso:4217"


# ---------------------------------------------------------------- items


class TokenItem(NamedTuple):
    system: str | None
    code: str | None
    implicit: bool = False  # system comes from the element's binding, not the data
    types: tuple[tuple[str | None, str | None], ...] = ()  # Identifier.type codings


class RefItem(NamedTuple):
    relative: str | None = None  # "Patient/123" (no history)
    type: str | None = None
    id: str | None = None
    base: str | None = None  # absolute URL before "/Type/id"; None for relative references
    url: str | None = None  # absolute URL (no history), canonical or uri (without version)
    version: str | None = None  # canonical version
    ident_system: str | None = None
    ident_value: str | None = None
    local: bool = False  # "#id": a contained resource


Num = int | float | Decimal


class NumItem(NamedTuple):
    """[lo, hi] (ends open when flagged; None is infinite)."""

    lo: Num | None
    hi: Num | None
    lo_open: bool = False
    hi_open: bool = False


class QtyItem(NamedTuple):
    lo: Num | None
    hi: Num | None
    lo_open: bool
    hi_open: bool
    system: str | None
    code: str | None
    unit: str | None


DateItem = tuple[int, int]  # [lo_ms, hi_ms)
Item = str | TokenItem | RefItem | NumItem | QtyItem | DateItem


def to_decimal(value: Num) -> Decimal:
    """The exact decimal a JSON number stands for (floats by their shortest repr)."""
    if isinstance(value, Decimal):
        return value
    if type(value) is float:
        return Decimal(repr(value))
    return Decimal(value)


# ---------------------------------------------------------------- strings


_NON_ALNUM: Final = re.compile(r"[\W_]+")


def normalise(value: str) -> str:
    """Case- and accent-insensitive form used by string search (see module docstring)."""
    if value.isascii():
        folded = value.lower()
    else:
        decomposed = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", value).casefold())
        folded = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _NON_ALNUM.sub(" ", folded).strip()


def string_terms(value: str) -> list[bytes]:
    """Prefix terms of the normalised value (see STRING_PREFIX_LENGTHS), then its x| term."""
    n = normalise(value)
    out: list[bytes] = []
    if len(n) >= STRING_PREFIX_LENGTHS[0]:
        if n.isascii():
            nb = n.encode()
            out = [b"s|" + nb[:k] for k in STRING_PREFIX_LENGTHS if k <= len(nb)]
        else:
            out = [b"s|" + n[:k].encode() for k in STRING_PREFIX_LENGTHS if k <= len(n)]
    out.append(b"x|" + value.encode())
    return out


def string_query_length(length: int) -> int | None:
    """The longest indexed prefix length <= `length` (of a normalised query); None: none.

    Every value that starts with a query of that length has a prefix of this length, equal
    to the query's prefix: the term of the query's prefix selects a superset.
    """
    best = None
    for k in STRING_PREFIX_LENGTHS:
        if k > length:
            break
        best = k
    return best


# ---------------------------------------------------------------- dates

_DATE: Final = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,12}))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?",
    re.ASCII,
)
_MONTH_DAYS: Final = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146_097 + doe - 719_468


def _leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def parse_date(value: str) -> DateItem | None:
    """[lo, hi) in UTC ms of a FHIR date/dateTime/instant (or search date); None if invalid.

    Precision: year, month, day, minute (search only), second, fraction. No time zone: UTC.
    """
    m = _DATE.fullmatch(value)
    if m is None:
        return None
    ys, mos, ds, hs, mis, ss, fs, tz = m.groups()
    year = int(ys)
    if year == 0:
        return None
    if mos is None:
        return (_days_from_civil(year, 1, 1) * DAY_MS, _days_from_civil(year + 1, 1, 1) * DAY_MS)
    month = int(mos)
    if not 1 <= month <= 12:
        return None
    if ds is None:
        start = _days_from_civil(year, month, 1) * DAY_MS
        end = _days_from_civil(year + (month == 12), month % 12 + 1, 1) * DAY_MS
        return (start, end)
    day = int(ds)
    if not 1 <= day <= _MONTH_DAYS[month] or (month == 2 and day == 29 and not _leap(year)):
        return None
    base = _days_from_civil(year, month, day) * DAY_MS
    if hs is None:
        return (base, base + DAY_MS)
    hour, minute = int(hs), int(mis)
    if hour > 23 or minute > 59:
        return None
    base += hour * 3_600_000 + minute * 60_000
    if tz is not None and tz != "Z":
        tz_h, tz_m = int(tz[1:3]), int(tz[4:6])
        if tz_h > 14 or tz_m > 59:
            return None
        offset = (tz_h * 60 + tz_m) * 60_000
        base -= offset if tz[0] == "+" else -offset
    if ss is None:
        return (base, base + 60_000)
    second = int(ss)
    if second > 60:
        return None
    if second == 60:  # a leap second: the last second of the minute, widened
        return (base + 59_000, base + 60_000)
    base += second * 1000
    if fs is None:
        return (base, base + 1000)
    digits, scale = int(fs), 10 ** len(fs)
    return (base + digits * 1000 // scale, base + -(-(digits + 1) * 1000 // scale))


def date_day(ms: int) -> int:
    """Days since 1900-01-01 of an instant, clamped into [0, 2^18)."""
    day = ms // DAY_MS + DAYS_1900_TO_1970
    return 0 if day < 0 else DAY_MAX if day > DAY_MAX else day


@functools.lru_cache(maxsize=65_536)
def _day_terms(family: bytes, day: int) -> tuple[bytes, ...]:
    return tuple(family + b"|%d|%d" % (level, day >> (3 * level)) for level in range(DATE_LEVELS))


def date_terms(lo: int, hi: int) -> list[bytes]:
    """dP terms of a value within one day, else dL terms of its lo day + dH of its hi day."""
    lo_day, hi_day = date_day(lo), date_day(hi - 1)
    if lo_day == hi_day:
        return list(_day_terms(b"dP", lo_day))
    return [*_day_terms(b"dL", lo_day), *_day_terms(b"dH", hi_day)]


# ---------------------------------------------------------------- numbers

_F32: Final = struct.Struct(">f")
_U32: Final = struct.Struct(">I")


def number_key(value: float | Decimal | int) -> int:
    """Order-preserving 24-bit key: x <= y implies number_key(x) <= number_key(y)."""
    x = float(value) + 0.0  # -0.0 -> 0.0
    try:
        packed = _F32.pack(x)
    except OverflowError:  # beyond float32: the infinities keep the order
        packed = _F32.pack(math.inf if x > 0 else -math.inf)
    bits: int = _U32.unpack(packed)[0]
    bits = (bits ^ 0xFFFFFFFF) if bits & 0x80000000 else (bits | 0x80000000)
    return bits >> 8


NEG_KEY: Final = number_key(-math.inf)
POS_KEY: Final = number_key(math.inf)


@functools.lru_cache(maxsize=65_536)
def _key_suffixes(key: int) -> tuple[bytes, ...]:
    return tuple(b"|%d|%d" % (level, key >> (4 * level)) for level in range(NUMBER_LEVELS))


def _range_keys(lo: Num | None, hi: Num | None) -> list[int]:
    lo_key = NEG_KEY if lo is None else number_key(lo)
    hi_key = POS_KEY if hi is None else number_key(hi)
    return [lo_key] if lo_key == hi_key else [lo_key, hi_key]


def range_cover(lo: int, hi: int, levels: int, branch: int) -> list[tuple[int, int]]:
    """Minimal list of aligned blocks (level, bucket) covering the inclusive key range [lo, hi].

    A block (L, b) holds the keys k with k // branch**L == b; L < levels.
    """
    out: list[tuple[int, int]] = []
    if lo > hi:
        return out
    sizes = [branch**level for level in range(levels)]
    pos = lo
    while pos <= hi:
        level = 0
        while (
            level + 1 < levels and pos % sizes[level + 1] == 0 and pos + sizes[level + 1] - 1 <= hi
        ):
            level += 1
        out.append((level, pos // sizes[level]))
        pos += sizes[level]
    return out


# ---------------------------------------------------------------- uris


def _uri_terms(uri: str) -> list[bytes]:
    out = [b"u|" + uri.encode()]
    url, sep, _version = uri.partition("|")
    if sep:
        out.append(b"u|" + url.encode())
    return out


# ---------------------------------------------------------------- references

_ID: Final = r"[A-Za-z0-9\-.]{1,64}"
_RELATIVE: Final = re.compile(rf"([A-Z][A-Za-z]+)/({_ID})(?:/_history/{_ID})?", re.ASCII)
_ABSOLUTE_TAIL: Final = re.compile(rf"(.+)/([A-Z][A-Za-z]+)/({_ID})(?:/_history/{_ID})?", re.ASCII)
_HISTORY: Final = re.compile(rf"/_history/{_ID}$", re.ASCII)


def parse_reference(value: str) -> RefItem | None:
    """RefItem of a Reference.reference string; None when it cannot be interpreted."""
    if not value:
        return None
    if value[0] == "#":
        return RefItem(local=True, id=value[1:] or None)
    m = _RELATIVE.fullmatch(value)
    if m is not None:
        if not r4.is_resource_type(m.group(1)):
            return None
        return RefItem(relative=f"{m.group(1)}/{m.group(2)}", type=m.group(1), id=m.group(2))
    if "://" in value or value.startswith(("urn:", "http:", "https:")):
        m = _ABSOLUTE_TAIL.fullmatch(value)
        if m is not None and r4.is_resource_type(m.group(2)):
            return RefItem(
                relative=f"{m.group(2)}/{m.group(3)}",
                type=m.group(2),
                id=m.group(3),
                base=m.group(1),
                url=f"{m.group(1)}/{m.group(2)}/{m.group(3)}",
            )
        return RefItem(url=_HISTORY.sub("", value))
    return None


# References repeat (every resource of a patient points to it): parsed once each.
_parse_reference: Final = functools.lru_cache(maxsize=4096)(parse_reference)


def _reference_items(leaf: Any, path: Path, resource: Mapping[str, Any]) -> list[RefItem]:
    if type(leaf) is not dict:
        return []
    ref = leaf.get("reference")
    item = _parse_reference(ref) if type(ref) is str else None
    ident = leaf.get("identifier")
    ident_system = ident_value = None
    if type(ident) is dict:
        s, v = ident.get("system"), ident.get("value")
        ident_system = s if type(s) is str else None
        ident_value = v if type(v) is str else None
    if item is None:
        if ident_value is None and ident_system is None:
            return []
        declared = leaf.get("type")  # "Patient", or a StructureDefinition URL
        kind = declared.rsplit("/", 1)[-1] if type(declared) is str and declared else None
        item = RefItem(type=kind)
    if ident_value is not None or ident_system is not None:
        item = item._replace(ident_system=ident_system, ident_value=ident_value)
    if path.targets is not None:  # where(resolve() is Type)
        if item.local:
            kind = _contained_type(resource, item.id)
        elif item.relative is None and item.url is None and item.type is None:
            return [item]  # an untyped identifier-only reference: resolve() cannot tell, kept
        else:
            kind = item.type
        if kind not in path.targets:
            return []
    return [item]


def _contained_type(resource: Mapping[str, Any], local_id: str | None) -> str | None:
    contained = resource.get("contained")
    if type(contained) is not list:
        return None
    for res in contained:
        if type(res) is dict and res.get("id") == local_id:
            rt = res.get("resourceType")
            return rt if type(rt) is str else None
    return None


@functools.lru_cache(maxsize=4096)
def _reference_string(value: str) -> tuple[RefItem | None, tuple[bytes, ...]]:
    """The item and terms of a Reference with only a (non-local) reference string."""
    item = parse_reference(value)
    return item, tuple(_reference_terms(item)) if item is not None else ()


def _reference_terms(item: RefItem) -> list[bytes]:
    out: list[bytes] = []
    if item.relative is not None and item.id is not None:
        out.append(b"r|" + item.relative.encode())
        out.append(b"ri|" + item.id.encode())
    if item.url is not None:
        url = item.url.encode()
        out.append(b"ru|" + url)
        if item.version is not None:
            out.append(b"ru|" + url + b"|" + item.version.encode())
    if item.ident_value is not None:
        value = item.ident_value.encode()
        if item.ident_system is not None:
            out.append(b"rI|" + item.ident_system.encode() + b"|" + value)
        out.append(b"rIv|" + value)
    return out


# ---------------------------------------------------------------- path walking


def leaves(node: Any, steps: tuple[Step, ...]) -> list[Any]:
    """The values reached from `node` by `steps` (arrays flattened)."""
    items = [node]
    for step in steps:
        key = step.key
        nxt: list[Any] = []
        for it in items:
            if type(it) is dict:
                value = it.get(key)
                if value is None:
                    continue
                if type(value) is list:
                    nxt.extend(value)
                else:
                    nxt.append(value)
        if step.filters:
            nxt = [
                x
                for x in nxt
                if type(x) is dict and all(x.get(f) == lit for f, lit in step.filters)
            ]
        if step.index is not None:
            nxt = nxt[step.index : step.index + 1]
        if not nxt:
            return nxt
        items = nxt
    return items


def _simple_leaves(node: Any, steps: tuple[Step, ...]) -> list[Any]:
    """`leaves` for paths without filters or indexes, with a fast first step."""
    if type(node) is not dict:
        return []
    value = node.get(steps[0].key)
    if value is None:
        return []
    items = value if type(value) is list else [value]
    for step in steps[1:]:
        key = step.key
        nxt: list[Any] = []
        for it in items:
            if type(it) is dict:
                v = it.get(key)
                if v is None:
                    continue
                if type(v) is list:
                    nxt.extend(v)
                else:
                    nxt.append(v)
        if not nxt:
            return nxt
        items = nxt
    return items


def _path_leaves(path: Path, node: Any, resource: Mapping[str, Any]) -> list[Any]:
    start = resource if path.rooted else node
    if path.truthy is not None:
        found = [v for steps in path.truthy for v in leaves(start, steps)]
        return [any(v is not False for v in found)]
    if not path.steps:
        return [start]
    if path.simple:
        return _simple_leaves(start, path.steps)
    return leaves(start, path.steps)


# ---------------------------------------------------------------- leaves -> items


def _strs(*values: Any) -> list[str]:
    out: list[str] = []
    for v in values:
        if type(v) is str:
            if v:
                out.append(v)
        elif type(v) is list:
            out.extend(x for x in v if type(x) is str and x)
    return out


def _string_items(leaf: Any, value_type: str) -> list[str]:
    if type(leaf) is str:
        return [leaf] if leaf else []
    if type(leaf) is not dict:
        return []
    if value_type == "HumanName":
        g = leaf.get
        return _strs(g("family"), g("given"), g("prefix"), g("suffix"), g("text"))
    if value_type == "Address":
        g = leaf.get
        return _strs(
            g("line"),
            g("city"),
            g("district"),
            g("state"),
            g("postalCode"),
            g("country"),
            g("text"),
        )
    return []


def _opt_str(value: Any) -> str | None:
    return value if type(value) is str and value else None


def _coding_item(coding: Any) -> TokenItem | None:
    if type(coding) is not dict:
        return None
    system, code = _opt_str(coding.get("system")), _opt_str(coding.get("code"))
    if system is None and code is None:
        return None
    return TokenItem(system, code)


def _token_items(leaf: Any, path: Path) -> list[TokenItem]:
    value_type = path.value_type
    if value_type == "CodeableConcept":
        if type(leaf) is not dict:
            return []
        codings = leaf.get("coding")
        if type(codings) is not list:
            return []
        return [t for c in codings if (t := _coding_item(c)) is not None]
    if value_type == "Coding":
        item = _coding_item(leaf)
        return [item] if item is not None else []
    if value_type == "Identifier":
        if type(leaf) is not dict:
            return []
        system, value = _opt_str(leaf.get("system")), _opt_str(leaf.get("value"))
        types: tuple[tuple[str | None, str | None], ...] = ()
        id_type = leaf.get("type")
        if type(id_type) is dict and type(id_type.get("coding")) is list:
            types = tuple(
                (t.system, t.code) for c in id_type["coding"] if (t := _coding_item(c)) is not None
            )
        if system is None and value is None:
            return []
        return [TokenItem(system, value, False, types)]
    if value_type == "ContactPoint":
        if type(leaf) is not dict:
            return []
        value = _opt_str(leaf.get("value"))
        return [TokenItem(None, value)] if value is not None else []
    if value_type == "boolean":
        if leaf is True:
            return [TokenItem(None, "true")]
        if leaf is False:
            return [TokenItem(None, "false")]
        return []
    if type(leaf) is str and leaf:
        if path.system is not None:
            return [TokenItem(path.system, leaf, True)]
        return [TokenItem(None, leaf)]
    return []


def _token_terms(item: TokenItem) -> list[bytes]:
    out: list[bytes] = []
    system = item.system.encode() if item.system is not None else None
    if item.code is not None:
        code = item.code.encode()
        out.append(b"tc|" + code)
        if system is not None:
            out.append(b"ts|" + system + b"|" + code)
        for type_system, type_code in item.types:
            if type_system is not None and type_code is not None:
                out.append(b"to|" + type_system.encode() + b"|" + type_code.encode() + b"|" + code)
    if system is not None:
        out.append(b"tS|" + system)
    return out


def _date_item(leaf: Any, value_type: str) -> DateItem | None:
    if type(leaf) is str:
        return parse_date(leaf)
    if type(leaf) is not dict:
        return None
    if value_type == "Period":
        return _period(leaf)
    if value_type == "Timing":
        lo, hi = POS_INF, NEG_INF
        events = leaf.get("event")
        if type(events) is list:
            for event in events:
                rng = parse_date(event) if type(event) is str else None
                if rng is not None:
                    lo, hi = min(lo, rng[0]), max(hi, rng[1])
        repeat = leaf.get("repeat")
        if type(repeat) is dict and type(repeat.get("boundsPeriod")) is dict:
            rng = _period(repeat["boundsPeriod"])
            if rng is not None:
                lo, hi = min(lo, rng[0]), max(hi, rng[1])
        return (lo, hi) if lo < hi else None
    return None


def _period(period: Mapping[str, Any]) -> DateItem | None:
    start, end = period.get("start"), period.get("end")
    lo_rng = parse_date(start) if type(start) is str else None
    hi_rng = parse_date(end) if type(end) is str else None
    if lo_rng is None and hi_rng is None:
        return None
    if lo_rng is not None and hi_rng is not None and lo_rng[0] >= hi_rng[1]:
        # end before start (invalid data): the span of both values, so that index and
        # verification still agree
        return (min(lo_rng[0], hi_rng[0]), max(lo_rng[1], hi_rng[1]))
    lo = lo_rng[0] if lo_rng is not None else NEG_INF
    hi = hi_rng[1] if hi_rng is not None else POS_INF
    return (lo, hi)


def _number(value: Any) -> Num | None:
    if type(value) is int or type(value) is float or isinstance(value, Decimal):
        if isinstance(value, float | Decimal) and not math.isfinite(value):
            return None
        return value  # type: ignore[no-any-return]
    return None


def _number_items(leaf: Any, value_type: str) -> list[NumItem]:
    if value_type == "Range":
        if type(leaf) is not dict:
            return []
        lo = _number(leaf["low"].get("value")) if type(leaf.get("low")) is dict else None
        hi = _number(leaf["high"].get("value")) if type(leaf.get("high")) is dict else None
        if lo is None and hi is None:
            return []
        if lo is not None and hi is not None and to_decimal(lo) > to_decimal(hi):
            lo, hi = hi, lo  # low above high (invalid data): keep index and match consistent
        return [NumItem(lo, hi)]
    value = _number(leaf)
    return [NumItem(value, value)] if value is not None else []


def _quantity_items(leaf: Any, value_type: str) -> list[QtyItem]:
    if type(leaf) is not dict:
        return []
    if value_type == "Range":
        low, high = leaf.get("low"), leaf.get("high")
        low = low if type(low) is dict else {}
        high = high if type(high) is dict else {}
        lo, hi = _number(low.get("value")), _number(high.get("value"))
        if lo is None and hi is None:
            return []
        if lo is not None and hi is not None and to_decimal(lo) > to_decimal(hi):
            lo, hi = hi, lo  # low above high (invalid data): keep index and match consistent
        units = low if lo is not None else high
        return [
            QtyItem(
                lo,
                hi,
                False,
                False,
                _opt_str(units.get("system")),
                _opt_str(units.get("code")),
                _opt_str(units.get("unit")),
            )
        ]
    value = _number(leaf.get("value"))
    if value is None:
        return []
    if value_type == "Money":
        currency = _opt_str(leaf.get("currency"))
        return [
            QtyItem(value, value, False, False, ISO_4217 if currency else None, currency, currency)
        ]
    system, code, unit = (
        _opt_str(leaf.get("system")),
        _opt_str(leaf.get("code")),
        _opt_str(leaf.get("unit")),
    )
    comparator = leaf.get("comparator")
    if comparator == "<":
        return [QtyItem(None, value, True, True, system, code, unit)]
    if comparator == "<=":
        return [QtyItem(None, value, True, False, system, code, unit)]
    if comparator == ">":
        return [QtyItem(value, None, True, True, system, code, unit)]
    if comparator == ">=":
        return [QtyItem(value, None, False, True, system, code, unit)]
    return [QtyItem(value, value, False, False, system, code, unit)]


def _canonical_item(leaf: Any, value_type: str) -> list[RefItem]:
    if type(leaf) is not str or not leaf:
        return []
    if value_type == "canonical":
        url, sep, version = leaf.partition("|")
        return [RefItem(url=url, version=version if sep and version else None)]
    return [RefItem(url=leaf)]


def items_of(param_type: str, path: Path, node: Any, resource: Mapping[str, Any]) -> list[Any]:
    """Typed items of one path (see module docstring), walked from `node`."""
    found = _path_leaves(path, node, resource)
    if not found:
        return found
    value_type = path.value_type
    out: list[Any] = []
    if param_type == "string":
        for leaf in found:
            out.extend(_string_items(leaf, value_type))
    elif param_type == "token":
        for leaf in found:
            out.extend(_token_items(leaf, path))
    elif param_type == "reference":
        if value_type == "Reference":
            for leaf in found:
                out.extend(_reference_items(leaf, path, resource))
        else:
            for leaf in found:
                out.extend(_canonical_item(leaf, value_type))
    elif param_type == "date":
        for leaf in found:
            item = _date_item(leaf, value_type)
            if item is not None:
                out.append(item)
    elif param_type == "number":
        for leaf in found:
            out.extend(_number_items(leaf, value_type))
    elif param_type == "quantity":
        for leaf in found:
            out.extend(_quantity_items(leaf, value_type))
    elif param_type == "uri":
        out.extend(leaf for leaf in found if type(leaf) is str and leaf)
    return out


def extract(param: SearchParam, resource: Mapping[str, Any]) -> list[Any]:
    """Every typed item of a non-composite parameter on `resource`."""
    out: list[Any] = []
    for path in param.paths:
        out.extend(items_of(param.type, path, resource, resource))
    return out


def composite_foci(
    param: SearchParam, resource: Mapping[str, Any]
) -> list[tuple[Path, list[list[Any]]]]:
    """For each focus element of a composite: (focus path, items of each component).

    Only foci where every component has at least one item are returned.
    """
    types = tuple(c.type for c in param.components)
    return [(path, per) for path in param.paths for per in _focus_items(path, types, resource)]


def _focus_items(
    path: Path, types: tuple[str, ...], resource: Mapping[str, Any]
) -> Iterable[list[list[Any]]]:
    """The items of each component, for each focus of `path` where every one has some."""
    for node in _path_leaves(path, resource, resource):
        per_component: list[list[Any]] = []
        for comp_type, comp_paths in zip(types, path.components, strict=True):
            items = [item for p in comp_paths for item in items_of(comp_type, p, node, resource)]
            if not items:
                break
            per_component.append(items)
        else:
            yield per_component


# ---------------------------------------------------------------- items -> terms


def _range_terms(family: bytes, items: Iterable[NumItem | QtyItem]) -> list[bytes]:
    """Bucket terms of numbers (family b"n") and quantity values (family b"q")."""
    out: list[bytes] = []
    for item in items:
        for key in _range_keys(item.lo, item.hi):
            out.extend(family + s for s in _key_suffixes(key))
    return out


def _terms(param_type: str, items: list[Any]) -> list[bytes]:
    out: list[bytes] = []
    if param_type == "string":
        for s in items:
            out.extend(string_terms(s))
    elif param_type == "token":
        for t in items:
            out.extend(_token_terms(t))
    elif param_type == "reference":
        for r in items:
            out.extend(_reference_terms(r))
    elif param_type == "date":
        for lo, hi in items:
            out.extend(date_terms(lo, hi))
    elif param_type == "number":
        out = _range_terms(b"n", items)
    elif param_type == "quantity":
        out = _range_terms(b"q", items)
    elif param_type == "uri":
        for u in items:
            out.extend(_uri_terms(u))
    return out


def param_terms(param: SearchParam, resource: Mapping[str, Any]) -> list[bytes] | None:
    """Distinct terms of one parameter on `resource`; None if it has none."""
    if param.type == "composite":
        foci = composite_foci(param, resource)
        out = [b"c|" + t for _path, per in foci for t in _terms("token", per[0])]
    else:
        items = extract(param, resource)
        if not items:
            return None
        out = _terms(param.type, items)
    return list(dict.fromkeys(out)) if out else None


# ---------------------------------------------------------------- index_terms
#
# index_terms runs for every resource written. The parameters of a type share most of their
# paths (Observation: code, combo-code and the code-value composites all read `code`;
# subject and patient read `subject`), so each distinct (search type, path) of a type is a
# numbered slot of the type's plan, evaluated at most once per resource. A parameter's
# terms are the distinct terms of its slots, in order: what param_terms computes, since
# terms are made item by item.


_NO_TERMS: Final[tuple[bool, Sequence[bytes]]] = (False, ())
_LeafTerms = Callable[[Any, list[bytes]], None]
_SlotFn = Callable[[Mapping[str, Any]], tuple[bool, Sequence[bytes]]]


def _coding_terms(coding: Any, out: list[bytes]) -> None:
    """_token_terms(_coding_item(coding)) appended to `out`."""
    if type(coding) is not dict:
        return
    system, code = coding.get("system"), coding.get("code")
    if type(code) is str and code:
        term = code.encode()
        out.append(b"tc|" + term)
        if type(system) is str and system:
            sb = system.encode()
            out.append(b"ts|" + sb + b"|" + term)
            out.append(b"tS|" + sb)
    elif type(system) is str and system:
        out.append(b"tS|" + system.encode())


def _codeable_concept_terms(leaf: Any, out: list[bytes]) -> None:
    if type(leaf) is dict:
        codings = leaf.get("coding")
        if type(codings) is list:
            for coding in codings:
                _coding_terms(coding, out)


def _code_terms(system: str | None) -> _LeafTerms:
    """Terms of a code/id/string/uri token leaf, with the implicit system of its path."""
    if system is None:

        def plain(leaf: Any, out: list[bytes]) -> None:
            if type(leaf) is str and leaf:
                out.append(b"tc|" + leaf.encode())

        return plain
    ts, ts_term = b"ts|" + system.encode() + b"|", b"tS|" + system.encode()

    def implicit(leaf: Any, out: list[bytes]) -> None:
        if type(leaf) is str and leaf:
            code = leaf.encode()
            out.append(b"tc|" + code)
            out.append(ts + code)
            out.append(ts_term)

    return implicit


def _date_string(leaf: Any, out: list[bytes]) -> None:
    # (not cached by value: dates of birth would outlive the write in memory)
    if type(leaf) is str:
        rng = parse_date(leaf)
        if rng is not None:
            out.extend(date_terms(*rng))


def _leaf_terms(param_type: str, path: Path) -> _LeafTerms | None:
    """A function appending the terms of one leaf of `path` (what items_of then _terms make).

    None for references: an item there (a local ``#id``, an identifier without value) can
    have no term, and composites need to know about items.
    """
    value_type = path.value_type
    if param_type == "token":
        if value_type == "CodeableConcept":
            return _codeable_concept_terms
        if value_type == "Coding":
            return _coding_terms
        if value_type not in ("Identifier", "ContactPoint", "boolean"):
            return _code_terms(path.system)

        def token(leaf: Any, out: list[bytes]) -> None:
            for item in _token_items(leaf, path):
                out.extend(_token_terms(item))

        return token
    if param_type == "date":
        if value_type in ("date", "dateTime", "instant"):
            return _date_string

        def date(leaf: Any, out: list[bytes]) -> None:
            item = _date_item(leaf, value_type)
            if item is not None:
                out.extend(date_terms(*item))

        return date
    if param_type == "string":

        def string(leaf: Any, out: list[bytes]) -> None:
            for value in _string_items(leaf, value_type):
                out.extend(string_terms(value))

        return string
    if param_type == "uri":
        return _uri_leaf
    if param_type == "number":
        return lambda leaf, out: out.extend(_range_terms(b"n", _number_items(leaf, value_type)))
    if param_type == "quantity":
        return lambda leaf, out: out.extend(_range_terms(b"q", _quantity_items(leaf, value_type)))
    return None


def _uri_leaf(leaf: Any, out: list[bytes]) -> None:
    if type(leaf) is str and leaf:
        out.extend(_uri_terms(leaf))


def _compile(param_type: str, path: Path) -> _SlotFn:
    """(whether the path has items, its terms) on a resource: items_of then _terms."""
    steps = path.steps
    special = path.simple and bool(steps) and path.truthy is None
    if special and param_type == "reference" and path.value_type == "Reference":

        targets = path.targets

        def reference(resource: Mapping[str, Any]) -> tuple[bool, Sequence[bytes]]:
            has, out = False, list[bytes]()
            for leaf in _simple_leaves(resource, steps):
                ref = leaf.get("reference") if type(leaf) is dict else None
                if type(ref) is str and ref[:1] not in ("", "#") and "identifier" not in leaf:
                    # the common case, by the reference string alone (_reference_items)
                    item, terms = _reference_string(ref)
                    if item is not None and (targets is None or item.type in targets):
                        has = True
                        out.extend(terms)
                    continue
                for item in _reference_items(leaf, path, resource):
                    has = True
                    out.extend(_reference_terms(item))
            return (True, out) if has else _NO_TERMS

        return reference
    leaf_terms = _leaf_terms(param_type, path) if special else None
    if leaf_terms is None:

        def generic(resource: Mapping[str, Any]) -> tuple[bool, Sequence[bytes]]:
            items = items_of(param_type, path, resource, resource)
            return (True, _terms(param_type, items)) if items else _NO_TERMS

        return generic
    # these leaves make terms whenever they make an item: has == bool(terms)
    if len(steps) == 1:
        key = steps[0].key

        def top(resource: Mapping[str, Any]) -> tuple[bool, Sequence[bytes]]:
            value = resource.get(key)
            if value is None:
                return _NO_TERMS
            out: list[bytes] = []
            if type(value) is list:
                for leaf in value:
                    leaf_terms(leaf, out)
            else:
                leaf_terms(value, out)
            return (True, out) if out else _NO_TERMS

        return top

    def nested(resource: Mapping[str, Any]) -> tuple[bool, Sequence[bytes]]:
        out: list[bytes] = []
        for leaf in _simple_leaves(resource, steps):
            leaf_terms(leaf, out)
        return (True, out) if out else _NO_TERMS

    return nested


_Foci = tuple[tuple[tuple[int, ...], ...] | Path, ...]


class _Entry:
    """One parameter of a plan: its slots, or for a composite its focus programs.

    (Hashed by identity: entries are dict keys on every call.)
    """

    __slots__ = ("code", "foci", "slots", "types")

    def __init__(
        self,
        code: str,
        slots: tuple[int, ...],
        foci: _Foci | None = None,
        types: tuple[str, ...] = (),
    ) -> None:
        self.code = code
        self.slots = slots
        # composite: per focus path, either its component slots (the focus is the resource
        # itself: its items are the slots') or the path to walk (the focus is a sub-element)
        self.foci = foci
        self.types = types  # composite: the component types


# of each parameter to evaluate, in order: (code, the slots that can have terms) or for a
# composite (code, (), the foci that can have values, component types)
_Todo = tuple[tuple[str, tuple[int, ...], _Foci | None, tuple[str, ...]], ...]
_SHAPES_PER_TYPE: Final = 512


class _Plan:
    """Per resource type: slots, and which parameters can have values by top-level property.

    Resources of a type come in few shapes (their top-level properties, in order), so what
    to evaluate is worked out once per shape.
    """

    __slots__ = ("always", "dispatch", "first_keys", "shapes", "slots")

    def __init__(self, params: Mapping[str, SearchParam]) -> None:
        ids: dict[tuple[str, Path], int] = {}
        self.slots: list[_SlotFn] = []
        self.first_keys: list[str | None] = []  # of each slot; None: no top-level property
        self.shapes: dict[tuple[str, ...], _Todo] = {}

        def slot(param_type: str, path: Path) -> int:
            key = (param_type, path)
            found = ids.get(key)
            if found is None:
                found = ids[key] = len(self.slots)
                self.slots.append(_compile(param_type, path))
                first = path.steps[0].key if path.steps and path.truthy is None else None
                self.first_keys.append(first)
            return found

        dispatch: dict[str, list[_Entry]] = {}
        always: list[_Entry] = []
        for param in params.values():
            if param.type == "composite":
                types = tuple(c.type for c in param.components)
                foci = tuple(
                    tuple(tuple(slot(t, p) for p in comp) for t, comp in zip(types, path.components, strict=True))
                    if not path.steps and path.truthy is None
                    else path
                    for path in param.paths
                )
                entry = _Entry(param.code, (), foci, types)
            else:
                entry = _Entry(param.code, tuple(slot(param.type, p) for p in param.paths))
            keys = _first_keys(param.paths)
            if keys is None:
                always.append(entry)
                continue
            for key in keys:
                dispatch.setdefault(key, []).append(entry)
        self.dispatch = {k: tuple(v) for k, v in dispatch.items()}
        self.always = tuple(always)

    def todo(self, keys: tuple[str, ...]) -> _Todo:
        """The parameters that can have values on a resource with these properties."""
        found = self.shapes.get(keys)
        if found is not None:
            return found
        todo: dict[_Entry, None] = dict.fromkeys(self.always)
        for key in keys:
            for entry in self.dispatch.get(key, ()):
                todo[entry] = None
        present = set(keys)
        first_keys = self.first_keys

        def live(slots: tuple[int, ...]) -> tuple[int, ...]:
            # a path whose first property is missing has no values
            return tuple(i for i in slots if first_keys[i] is None or first_keys[i] in present)

        out: list[tuple[str, tuple[int, ...], _Foci | None, tuple[str, ...]]] = []
        for entry in todo:
            if entry.foci is None:
                slots = live(entry.slots)
                if slots:
                    out.append((entry.code, slots, None, ()))
                continue
            foci: list[tuple[tuple[int, ...], ...] | Path] = []
            for focus in entry.foci:
                if isinstance(focus, Path):
                    if not focus.steps or focus.steps[0].key in present:
                        foci.append(focus)
                elif all(comps := tuple(live(comp) for comp in focus)):
                    foci.append(comps)  # every component can have items
            if foci:
                out.append((entry.code, (), tuple(foci), entry.types))
        found = tuple(out)
        if len(self.shapes) < _SHAPES_PER_TYPE:  # bounded: properties come from clients
            self.shapes[keys] = found
        return found


def _first_keys(paths: Iterable[Path]) -> set[str] | None:
    """Top-level properties a parameter's values come from; None when undecidable."""
    keys: set[str] = set()
    for path in paths:
        if path.truthy is not None:
            return None  # always has a value (true or false)
        if path.steps:
            keys.add(path.steps[0].key)
        elif path.components:
            sub = _first_keys(p for comp in path.components for p in comp)
            if sub is None:
                return None
            keys.update(sub)
        else:
            return None
    return keys


@functools.cache
def _plan(resource_type: str) -> _Plan:
    return _Plan(search_params(resource_type))


def index_terms(
    resource_type: str, resource: Mapping[str, Any], *, skip: frozenset[str] = frozenset()
) -> dict[str, list[bytes]]:
    """code -> distinct plaintext terms, for every parameter with at least one term.

    Parameters in `skip` are left out (not computed).
    """
    plan = _plan(resource_type)
    slots = plan.slots
    memo: list[tuple[bool, Sequence[bytes]] | None] = [None] * len(slots)
    out: dict[str, list[bytes]] = {}
    for code, slot_ids, foci, types in plan.todo(tuple(resource)):
        if code in skip:
            continue
        if foci is None:
            if len(slot_ids) == 1:  # the common case: one path
                i = slot_ids[0]
                got = memo[i]
                if got is None:
                    got = memo[i] = slots[i](resource)
                if got[1]:
                    out[code] = list(dict.fromkeys(got[1]))
                continue
            terms: list[bytes] = []
            for i in slot_ids:
                got = memo[i]
                if got is None:
                    got = memo[i] = slots[i](resource)
                terms.extend(got[1])
        else:
            terms = []
            for focus in foci:
                if isinstance(focus, Path):
                    for per in _focus_items(focus, types, resource):
                        terms.extend(b"c|" + t for t in _terms("token", per[0]))
                    continue
                first: list[bytes] = []
                for n, comp in enumerate(focus):
                    has = False
                    for i in comp:
                        got = memo[i]
                        if got is None:
                            got = memo[i] = slots[i](resource)
                        has = has or got[0]
                        if n == 0:
                            first.extend(got[1])
                    if not has:
                        break
                else:
                    terms.extend(b"c|" + t for t in first)
        if terms:
            out[code] = list(dict.fromkeys(terms))
    return out
