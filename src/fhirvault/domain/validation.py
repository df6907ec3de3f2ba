"""Structural validation of FHIR R4 JSON resources against the compiled R4 table.

What is checked: resourceType, element names, JSON kinds, cardinality, choice types,
primitive formats (the official regexes) and ranges, empty values and nulls, Resource.id,
Reference.reference syntax, required bindings that the table could expand, contained
resources (dom-2, dom-4, dom-5), extensions (url, ext-1) and primitive extensions (`_foo`).

Issue codes (FHIR IssueType):
  structure     unknown element, wrong JSON kind, array/single mismatch, null, empty
                object or array, several choice alternatives, nesting too deep
  required      a mandatory element (or resourceType) is missing
  value         a primitive value has the wrong format or range
  code-invalid  a code is not in the required value set
  invalid       unknown resource type, broken invariant, too many issues

Messages give the path and what was expected, never the offending value: values are
patient data and messages may end up in logs.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from fhirvault.domain import xhtml
from fhirvault.domain.ins import ins_issues
from fhirvault.domain.r4 import FLAG_ARRAY, FLAG_REQUIRED, R4Tables, load_tables

__all__ = ["ValidationIssue", "Validator"]

MAX_ISSUES: Final = 100
MAX_DEPTH: Final = 64  # nested objects; real resources stay far below this
MAX_STRING: Final = 1024 * 1024  # "FHIR strings SHALL NOT exceed 1MB in size"
_MEMO_SIZE: Final = 4096  # valid objects remembered per memoised table
_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1

# Element kinds.
_PRIMITIVE: Final = 0
_COMPLEX: Final = 1
_RESOURCE: Final = 2
_PRIMITIVE_EXT: Final = 3  # `_foo`: id/extension of the primitive `foo`
_RESOURCE_TYPE: Final = 4  # `resourceType` on a resource root, checked separately

# Fast paths of _Run.object(), for elements with no required binding on a complex type:
# a single primitive (with or without required codes), a single complex value (or `_foo`),
# an array of primitives, an array of complex values, and resourceType (checked before).
_FAST_NONE: Final = 0
_FAST_PRIMITIVE: Final = 1
_FAST_COMPLEX: Final = 2
_FAST_PRIMITIVE_ARRAY: Final = 3
_FAST_CODE: Final = 4
_FAST_COMPLEX_ARRAY: Final = 5
_FAST_SKIP: Final = 6

# Post-checks that need more than the element table.
_HOOK_NONE: Final = 0
_HOOK_REFERENCE: Final = 1
_HOOK_EXTENSION: Final = 2

_STRING_TYPES: Final = frozenset({"string", "markdown", "code", "id"})
_DATE_TYPES: Final = frozenset({"date", "dateTime", "instant"})
_DAYS_IN_MONTH: Final = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

_ID = r"[A-Za-z0-9\-\.]{1,64}"
_REF_RELATIVE = re.compile(rf"([A-Za-z]+)/{_ID}(?:/_history/{_ID})?", re.ASCII)
_REF_LOCAL = re.compile(rf"#(?:{_ID})?", re.ASCII)
_REF_HTTP = re.compile(r"https?://\S+", re.ASCII)
_REF_UUID = re.compile(
    r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII
)
_REF_OID = re.compile(r"urn:oid:[0-2](?:\.(?:0|[1-9][0-9]*))+", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}", re.ASCII)

# (issue code, message) of a failed primitive check.
Problem = tuple[str, str]
Check = Callable[[Any], Problem | None]


@dataclass(frozen=True, slots=True)
class ValidationIssue:
    path: str  # FHIRPath-like location, e.g. "Patient.name[0].family"
    code: str  # FHIR IssueType code
    message: str  # what was expected; never contains the value


class _TooManyIssues(Exception):
    pass


class _Table:
    """Compiled element table of one type or backbone element."""

    __slots__ = ("elements", "hook", "memo", "name", "required", "required_choices", "value_keys")

    def __init__(self, name: str) -> None:
        self.name = name
        self.elements: dict[str, _Element] = {}
        self.required: tuple[tuple[str, str], ...] = ()  # (foo, _foo)
        self.required_choices: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (group, keys)
        self.hook = _HOOK_NONE
        self.value_keys: frozenset[str] = frozenset()  # Extension: value[x] and _value[x]
        # Objects found valid, as their (key, value) items, when all values are strings:
        # Codings repeat a few codes many times over (see _Run.object()).
        self.memo: set[tuple[tuple[str, str], ...]] | None = None


def _no_check(value: Any) -> Problem | None:
    return None


_NO_TABLE: Final = _Table("")


class _Element:
    """One JSON property of a compiled table."""

    __slots__ = (
        "array",
        "base",
        "check",
        "codes",
        "fast",
        "group",
        "kind",
        "name",
        "required",
        "systems",
        "table",
        "type_name",
        "value_set",
    )

    def __init__(self, name: str, type_name: str, kind: int, array: bool) -> None:
        self.name = name
        self.type_name = type_name
        self.kind = kind
        self.array = array
        self.required = False
        self.base = name  # property this one belongs to (`foo` for `_foo`)
        self.group: str | None = None  # choice group ("value" for valueString)
        self.check: Check = _no_check  # primitives only
        self.table: _Table = _NO_TABLE  # complex types and `_foo` only
        self.value_set: str | None = None
        self.codes: frozenset[str] | None = None  # required codes of a `code`
        self.systems: dict[str, frozenset[str]] | None = None  # same, per system (Coding)
        self.fast = _FAST_NONE

    def finish(self) -> None:
        """Pick the fast path of object() this element may take (its choice group, if any,
        is checked before)."""
        kind = self.kind
        if not self.array:
            if kind == _PRIMITIVE:
                self.fast = _FAST_PRIMITIVE if self.codes is None else _FAST_CODE
            elif kind in (_COMPLEX, _PRIMITIVE_EXT) and self.systems is None:
                self.fast = _FAST_COMPLEX
            elif kind == _RESOURCE_TYPE:
                self.fast = _FAST_SKIP
        elif self.group is None:
            if kind == _PRIMITIVE and self.codes is None:
                self.fast = _FAST_PRIMITIVE_ARRAY
            elif kind == _COMPLEX and self.systems is None:
                self.fast = _FAST_COMPLEX_ARRAY


# ---------------------------------------------------------------- primitive checks


def _valid_calendar_date(value: str) -> bool:
    """The regexes allow 2023-02-31; FHIR says dates SHALL be valid dates."""
    if len(value) < 10:
        return True
    year, month, day = int(value[0:4]), int(value[5:7]), int(value[8:10])
    if day <= 28 or day <= _DAYS_IN_MONTH[month] - (month == 2):
        return True
    return month == 2 and day == 29 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _uri_shortcut(value: str) -> bool:
    # isprintable() excludes \t\n\r\f\v, so with no space this implies \S* (ASCII).
    return value.isprintable() and " " not in value


def _code_shortcut(value: str) -> bool:
    # Printable: the only possible whitespace is " "; single inner spaces match the regex.
    return value.isprintable() and value[0] != " " and value[-1] != " " and "  " not in value


# Cheap predicates that imply a match of the type's regex; the regex decides otherwise.
# Regex calls are a large part of the cost for these very common types.
_SHORTCUTS: Final[dict[str, Callable[[str], bool]]] = {
    "uri": _uri_shortcut,
    "url": _uri_shortcut,
    "canonical": _uri_shortcut,
    "code": _code_shortcut,
}


def _string_check(type_name: str, regex: str | None) -> Check:
    # re.ASCII: the FHIR regexes follow XML Schema, where \s is ASCII whitespace only;
    # with Unicode \s a no-break space in a name would be rejected.
    fullmatch = re.compile(regex, re.ASCII).fullmatch if regex else None
    shortcut = _SHORTCUTS.get(type_name)
    wrong_kind = ("structure", f"expected a JSON string ({type_name})")
    empty = ("value", f"empty string is not a valid {type_name}")
    bad = ("value", f"not a valid {type_name}")
    too_long = ("value", f"{type_name} exceeds 1 MB")
    limit = MAX_STRING if type_name in _STRING_TYPES else None
    dates = type_name in _DATE_TYPES

    def check(value: Any) -> Problem | None:
        if type(value) is not str:
            return wrong_kind
        if not value:
            return empty
        if limit is not None and len(value) > limit:
            return too_long
        if shortcut is not None and shortcut(value):
            return None
        if fullmatch is not None and fullmatch(value) is None:
            return bad
        if dates and not _valid_calendar_date(value):
            return bad
        return None

    # The shortcut inlined in front of the checks above, for the most common types: a value
    # it accepts passes them all (non-empty string within the limit), anything else goes on.
    if type_name == "code":

        def code_check(value: Any) -> Problem | None:
            if (
                type(value) is str
                and value
                and len(value) <= MAX_STRING
                and value.isprintable()
                and value[0] != " "
                and value[-1] != " "
                and "  " not in value
            ):
                return None
            return check(value)

        return code_check
    if shortcut is _uri_shortcut and limit is None:

        def uri_check(value: Any) -> Problem | None:
            if type(value) is str and value and value.isprintable() and " " not in value:
                return None
            return check(value)

        return uri_check
    return check


def _text_check(type_name: str) -> Check:
    """string and markdown: the spec's rule, stricter than their regex.

    "Strings SHALL NOT contain Unicode character points below 32, except for u0009
    (horizontal tab), u0010 (carriage return) and u0013 (line feed)."
    """
    wrong_kind = ("structure", f"expected a JSON string ({type_name})")
    empty = ("value", f"empty string is not a valid {type_name}")
    bad = ("value", f"{type_name} must not contain control characters")
    too_long = ("value", f"{type_name} exceeds 1 MB")

    def check(value: Any) -> Problem | None:
        if type(value) is not str:
            return wrong_kind
        if len(value) > MAX_STRING:
            return too_long
        if value.isprintable():  # fast C check, true for most text
            return None if value else empty
        return bad if _CONTROL.search(value) is not None else None

    return check


def _base64_check(value: Any) -> Problem | None:
    # The official regex backtracks badly on multi-MB attachments: check linearly instead.
    if type(value) is not str:
        return ("structure", "expected a JSON string (base64Binary)")
    if not value:
        return ("value", "empty string is not a valid base64Binary")
    compact = "".join(value.split())
    if len(compact) % 4 or _BASE64.fullmatch(compact) is None:
        return ("value", "not a valid base64Binary")
    return None


def _xhtml_check(value: Any) -> Problem | None:
    if type(value) is not str:
        return ("structure", "expected a JSON string (xhtml)")
    if not value.lstrip().startswith("<div"):
        return ("value", "narrative must be an XHTML <div> element")
    message = xhtml.text_problem(value)  # R4 txt-1/txt-2: basic formatting only, never script
    return ("value", f"narrative: {message}") if message else None


def _boolean_check(value: Any) -> Problem | None:
    return None if type(value) is bool else ("structure", "expected a JSON boolean")


def _decimal_check(value: Any) -> Problem | None:
    kind = type(value)
    if kind is int or (kind is float and math.isfinite(value)):
        return None
    if kind is float:
        return ("value", "decimal must be finite")
    return ("structure", "expected a JSON number (decimal)")


def _integer_check(type_name: str, low: int) -> Check:
    wrong_kind = ("structure", f"expected a JSON integer ({type_name})")
    out_of_range = ("value", f"{type_name} must be between {low} and {_INT32_MAX}")

    def check(value: Any) -> Problem | None:
        if type(value) is not int:  # also rejects bool, a subclass of int
            return wrong_kind
        if value < low or value > _INT32_MAX:
            return out_of_range
        return None

    return check


def _primitive_check(type_name: str, json_kind: str, regex: str | None) -> Check:
    if json_kind == "boolean":
        return _boolean_check
    if json_kind == "decimal":
        return _decimal_check
    if json_kind == "integer":
        low = {"positiveInt": 1, "unsignedInt": 0}.get(type_name, _INT32_MIN)
        return _integer_check(type_name, low)
    if type_name == "base64Binary":
        return _base64_check
    if type_name == "xhtml":
        return _xhtml_check
    if type_name in ("string", "markdown"):
        return _text_check(type_name)
    return _string_check(type_name, regex)


# ---------------------------------------------------------------- compilation


class _Compiler:
    """Turns the JSON table into linked _Table/_Element objects, once."""

    def __init__(self, data: R4Tables) -> None:
        self.data = data
        self.checks = {
            name: _primitive_check(name, p["json"], p["regex"])
            for name, p in data["primitives"].items()
        }
        self.value_sets = {
            vs_id: {system: frozenset(codes) for system, codes in systems.items()}
            for vs_id, systems in data["valueSets"].items()
        }
        self.tables = {name: _Table(name) for name in data["tables"]}

    def compile(self) -> dict[str, _Table]:
        for name, raw in self.data["tables"].items():
            self._fill(self.tables[name], raw)
        for name in self.data["resourceTypes"]:
            rtype = _Element("resourceType", "string", _RESOURCE_TYPE, False)
            rtype.finish()
            self.tables[name].elements["resourceType"] = rtype
        self.tables["Reference"].hook = _HOOK_REFERENCE
        self.tables["Coding"].memo = set()
        extension = self.tables["Extension"]
        extension.hook = _HOOK_EXTENSION
        extension.value_keys = frozenset(
            name for name, element in extension.elements.items() if element.group == "value"
        )
        return self.tables

    def _fill(self, table: _Table, raw: dict[str, list[Any]]) -> None:
        required: list[tuple[str, str]] = []
        choices: dict[str, list[str]] = {}
        required_groups: set[str] = set()
        for name, entry in raw.items():
            element = self._element(name, entry)
            table.elements[name] = element
            if element.kind == _PRIMITIVE:
                table.elements["_" + name] = self._primitive_ext(element)
            if element.group is not None:
                choices.setdefault(element.group, []).append(name)
                if element.required:
                    required_groups.add(element.group)
            elif element.required:
                required.append((name, "_" + name))
        table.required = tuple(required)
        table.required_choices = tuple(
            (group, tuple(k for n in choices[group] for k in (n, "_" + n)))
            for group in sorted(required_groups)
        )

    def _element(self, name: str, entry: list[Any]) -> _Element:
        type_name: str = entry[0]
        flags: int = entry[1]
        if type_name == "Resource":
            kind = _RESOURCE
        elif type_name in self.checks:
            kind = _PRIMITIVE
        else:
            kind = _COMPLEX
        element = _Element(name, type_name, kind, bool(flags & FLAG_ARRAY))
        element.required = bool(flags & FLAG_REQUIRED)
        if kind == _PRIMITIVE:
            element.check = self.checks[type_name]
        elif kind == _COMPLEX:
            element.table = self.tables[type_name]
        if len(entry) > 2 and entry[2]:
            element.value_set = entry[2]
            systems = self.value_sets[entry[2]]
            if kind == _PRIMITIVE:
                element.codes = frozenset(c for codes in systems.values() for c in codes)
            else:
                element.systems = systems
        if len(entry) > 3:
            element.group = entry[3]
        element.finish()
        return element

    def _primitive_ext(self, primitive: _Element) -> _Element:
        ext = _Element("_" + primitive.name, "Element", _PRIMITIVE_EXT, primitive.array)
        ext.base = primitive.name
        ext.group = primitive.group
        ext.table = self.tables["Element"]
        ext.finish()
        return ext


# ---------------------------------------------------------------- validation


def _safe_key(key: str) -> str:
    """Property names go into paths: keep hostile ones short and printable."""
    if len(key) <= 64 and key.isprintable():
        return key
    return repr(key[:64])


class Validator:
    """Validates R4 JSON resources; build once and share (immutable, thread-safe)."""

    def __init__(
        self, tables: R4Tables, *, max_issues: int = MAX_ISSUES, max_depth: int = MAX_DEPTH
    ) -> None:
        if max_issues < 2 or max_depth < 1:
            raise ValueError("max_issues must be >= 2 and max_depth >= 1")
        self._tables = _Compiler(tables).compile()
        self._resource_tables = {name: self._tables[name] for name in tables["resourceTypes"]}
        self._max_issues = max_issues
        self._max_depth = max_depth

    @classmethod
    def default(cls) -> Validator:
        """The shared validator over the vendored R4 table (built on first use)."""
        global _default
        if _default is None:
            with _default_lock:
                if _default is None:
                    _default = cls(load_tables())
        return _default

    def validate(
        self, resource: dict[str, Any], *, allow_unknown_elements: bool = False
    ) -> list[ValidationIssue]:
        """Issues found in `resource`; empty when it is valid.

        At most max_issues are returned; when the limit is hit the last one says so.
        """
        run = _Run(self._resource_tables, self._max_issues, self._max_depth, allow_unknown_elements)
        try:
            run.resource(resource, "", 0, contained=False)
            if not run.issues and resource.get("resourceType") == "Patient":
                for path, code, message in ins_issues(resource):  # French INS rules (domain/ins.py)
                    run.add(path, code, message)
        except _TooManyIssues:
            del run.issues[self._max_issues - 1 :]
            message = f"too many issues; validation stopped after {self._max_issues - 1}"
            run.issues.append(ValidationIssue(run.root or "Resource", "invalid", message))
        return run.issues


_default: Validator | None = None
_default_lock = threading.Lock()


class _Run:
    """State of one validate() call."""

    __slots__ = ("allow_unknown", "issues", "max_depth", "max_issues", "resource_tables", "root")

    def __init__(
        self,
        resource_tables: dict[str, _Table],
        max_issues: int,
        max_depth: int,
        allow_unknown: bool,
    ) -> None:
        self.resource_tables = resource_tables
        self.max_issues = max_issues
        self.max_depth = max_depth
        self.allow_unknown = allow_unknown
        self.issues: list[ValidationIssue] = []
        self.root = ""

    def add(self, path: str, code: str, message: str) -> None:
        self.issues.append(ValidationIssue(path, code, message))
        if len(self.issues) >= self.max_issues:
            raise _TooManyIssues

    # -- resources

    def resource(self, value: Any, path: str, depth: int, *, contained: bool) -> None:
        prefix = path + "." if path else ""
        if type(value) is not dict:
            self.add(path or "Resource", "structure", "expected a JSON object (resource)")
            return
        rtype = value.get("resourceType")
        if rtype is None:
            self.add(prefix + "resourceType", "required", "resourceType is missing")
            return
        table = self.resource_tables.get(rtype) if type(rtype) is str else None
        if table is None:
            self.add(prefix + "resourceType", "invalid", "unknown resource type")
            return
        path = path or rtype
        if not self.root:
            self.root = path
        if contained:
            value = self.contained_rules(value, path)
        self.object(value, table, path, depth)

    def contained_rules(self, value: dict[str, Any], path: str) -> dict[str, Any]:
        if "contained" in value:  # dom-2
            self.add(
                path + ".contained", "invalid", "a contained resource must not contain resources"
            )
            value = {k: v for k, v in value.items() if k != "contained"}
        meta = value.get("meta")
        if type(meta) is dict:
            for key in ("versionId", "lastUpdated", "security"):  # dom-4, dom-5
                if key in meta:
                    self.add(
                        f"{path}.meta.{key}",
                        "invalid",
                        f"a contained resource must not have meta.{key}",
                    )
        return value

    # -- objects

    def object(self, obj: dict[str, Any], table: _Table, path: str, depth: int) -> None:
        if depth > self.max_depth:
            self.add(path, "structure", f"nested deeper than {self.max_depth} levels")
            return
        # A string-only object already found valid in this table is valid again: its
        # verdict depends on nothing else (depth is checked above, bindings by the caller).
        memo = table.memo
        memo_key = None
        issues = 0
        if memo is not None:
            for item in obj.values():
                if type(item) is not str:
                    break
            else:
                memo_key = tuple(obj.items())
                if memo_key in memo:
                    return
                issues = len(self.issues)
        elements = table.elements
        groups: dict[str, str] | None = None
        for key, value in obj.items():
            element = elements.get(key)
            if element is None:
                if not self.allow_unknown:
                    self.add(
                        f"{path}.{_safe_key(key)}", "structure", f"unknown element in {table.name}"
                    )
                continue
            group = element.group
            if group is not None:  # only one alternative of a choice
                if groups is None:
                    groups = {group: element.base}
                elif groups.setdefault(group, element.base) != element.base:
                    message = f"only one {group}[x] alternative is allowed"
                    self.add(f"{path}.{group}[x]", "structure", message)
            # Fast paths for the common shapes; anything unusual falls through.
            fast = element.fast
            if fast == _FAST_PRIMITIVE:
                problem = element.check(value)
                if problem is not None:
                    self.primitive_problem(problem, value, f"{path}.{key}")
                continue
            if fast == _FAST_CODE:
                problem = element.check(value)
                if problem is not None:
                    self.primitive_problem(problem, value, f"{path}.{key}")
                elif value not in element.codes:  # type: ignore[operator]
                    self.add(f"{path}.{key}", "code-invalid", _not_in(element.value_set))
                continue
            if (
                fast == _FAST_COMPLEX
                and type(value) is dict
                and (len(value) > 1 or (value and "id" not in value))  # ele-1, as _has_content
            ):
                self.object(value, element.table, f"{path}.{key}", depth + 1)
                continue
            if fast == _FAST_COMPLEX_ARRAY and type(value) is list and value:
                self.complex_items(element, value, path, depth)
                continue
            if fast == _FAST_PRIMITIVE_ARRAY and type(value) is list and value:
                check = element.check
                for item in value:
                    if check(item) is not None:
                        break
                else:
                    continue
                self.primitive_array(obj, element, value, path)  # reports what broke
                continue
            if fast == _FAST_SKIP and type(value) is str:
                continue
            self.element(obj, element, value, path, depth)
        if table.required:
            for name, ext_name in table.required:
                if name not in obj and ext_name not in obj:
                    self.add(f"{path}.{name}", "required", "missing required element")
        if table.required_choices:
            for group, keys in table.required_choices:
                if not any(k in obj for k in keys):
                    self.add(f"{path}.{group}[x]", "required", "missing required element")
        hook = table.hook
        if hook == _HOOK_REFERENCE:  # inlined from hook(): one per Reference
            reference = obj.get("reference")
            if type(reference) is str and reference:
                self.reference(reference, path + ".reference")
        elif hook:
            self.hook(table, obj, path)
        # Not with allow_unknown: an object valid only thanks to it is not valid.
        if (
            memo is not None
            and memo_key is not None
            and len(self.issues) == issues
            and not self.allow_unknown
        ):
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            memo.add(memo_key)

    def element(
        self, obj: dict[str, Any], element: _Element, value: Any, path: str, depth: int
    ) -> None:
        """The general case of one property of `obj` (object() inlines the common ones)."""
        key = element.name
        if element.array:
            self.array(obj, element, value, path, depth)
        elif element.kind == _PRIMITIVE:
            problem = element.check(value)
            if problem is not None:
                self.primitive_problem(problem, value, f"{path}.{key}")
            elif element.codes is not None and value not in element.codes:
                self.add(f"{path}.{key}", "code-invalid", _not_in(element.value_set))
        elif value is None:
            self.add(f"{path}.{key}", "structure", "null is not allowed here")
        elif type(value) is list:
            self.add(f"{path}.{key}", "structure", "expected a single value, not an array")
        else:
            self.value(element, value, path, key, depth)

    def primitive_problem(self, problem: Problem, value: Any, path: str) -> None:
        if value is None:
            self.add(path, "structure", "null is not allowed here")
        elif type(value) is list:
            self.add(path, "structure", "expected a single value, not an array")
        else:
            self.add(path, problem[0], problem[1])

    def array(
        self, obj: dict[str, Any], element: _Element, value: Any, path: str, depth: int
    ) -> None:
        key = element.name
        if type(value) is not list:
            message = "null is not allowed here" if value is None else "expected an array"
            self.add(f"{path}.{key}", "structure", message)
        elif not value:
            self.add(f"{path}.{key}", "structure", "empty array is not allowed")
        elif element.kind == _PRIMITIVE:
            self.primitive_array(obj, element, value, path)
        elif element.kind == _PRIMITIVE_EXT:
            self.primitive_ext_array(obj, element, value, path, depth)
        elif element.fast == _FAST_COMPLEX_ARRAY:
            self.complex_items(element, value, path, depth)
        else:
            for index, item in enumerate(value):
                self.item(element, item, path, index, depth)

    def complex_items(self, element: _Element, value: list[Any], path: str, depth: int) -> None:
        """A non-empty array of a complex type with no required binding."""
        table = element.table
        for index, item in enumerate(value):
            if type(item) is dict and _has_content(item):
                self.object(item, table, f"{path}.{element.name}[{index}]", depth + 1)
            else:
                self.item(element, item, path, index, depth)

    def item(self, element: _Element, item: Any, path: str, index: int, depth: int) -> None:
        """One item of an array of a complex type or resources."""
        if item is None:
            self.add(f"{path}.{element.name}[{index}]", "structure", "null is not allowed here")
        elif type(item) is list:
            self.add(f"{path}.{element.name}[{index}]", "structure", "nested arrays are not allowed")
        else:
            self.value(element, item, path, f"{element.name}[{index}]", depth)

    def primitive_array(
        self, obj: dict[str, Any], element: _Element, value: list[Any], path: str
    ) -> None:
        check = element.check
        codes = element.codes
        for index, item in enumerate(value):
            problem = check(item)
            if problem is not None:
                # A null item is fine when `_foo` carries an id/extension for it.
                if item is not None or not _has_ext_at(obj, "_" + element.name, index):
                    self.primitive_problem(problem, item, f"{path}.{element.name}[{index}]")
            elif codes is not None and item not in codes:
                self.add(
                    f"{path}.{element.name}[{index}]", "code-invalid", _not_in(element.value_set)
                )

    def primitive_ext_array(
        self, obj: dict[str, Any], element: _Element, value: list[Any], path: str, depth: int
    ) -> None:
        values = obj.get(element.base)
        if type(values) is list and len(values) != len(value):
            self.add(
                f"{path}.{element.name}", "structure", f"must have as many items as {element.base}"
            )
        for index, item in enumerate(value):
            if type(item) is list:
                self.add(
                    f"{path}.{element.name}[{index}]", "structure", "nested arrays are not allowed"
                )
            elif item is not None:  # null: this item of the primitive array has no id/extension
                self.value(element, item, path, f"{element.name}[{index}]", depth)

    def value(self, element: _Element, value: Any, path: str, key: str, depth: int) -> None:
        """One non-null, non-array, non-primitive value; `key` may carry an index ("item[1]")."""
        kind = element.kind
        if kind == _RESOURCE_TYPE:
            return  # checked by resource()
        child = f"{path}.{key}"
        if type(value) is not dict:
            self.add(child, "structure", f"expected a JSON object ({element.type_name})")
        elif kind == _RESOURCE:
            self.resource(value, child, depth + 1, contained=element.name == "contained")
        elif not value or (len(value) == 1 and "id" in value):
            self.add(child, "structure", "element must have a value or children")  # ele-1
        else:
            self.object(value, element.table, child, depth + 1)
            if element.systems is not None:
                self.binding(element, value, child)

    # -- checks beyond the element table

    def hook(self, table: _Table, obj: dict[str, Any], path: str) -> None:
        """Post-checks other than Reference's (inlined in object())."""
        if table.hook == _HOOK_EXTENSION:
            has_value = not table.value_keys.isdisjoint(obj)
            if has_value == ("extension" in obj):  # ext-1
                self.add(
                    path, "invalid", "extension must have either extensions or value[x], not both"
                )

    def reference(self, reference: str, path: str) -> None:
        if reference.startswith("#"):
            ok = _REF_LOCAL.fullmatch(reference) is not None
        elif reference.startswith("urn:uuid:"):
            ok = _REF_UUID.fullmatch(reference) is not None
        elif reference.startswith("urn:oid:"):
            ok = _REF_OID.fullmatch(reference) is not None
        elif reference.startswith(("http://", "https://")):
            ok = _REF_HTTP.fullmatch(reference) is not None
        else:
            match = _REF_RELATIVE.fullmatch(reference)
            if match is not None and match.group(1) not in self.resource_tables:
                self.add(path, "value", "reference points to an unknown resource type")
                return
            ok = match is not None
        if not ok:
            self.add(
                path,
                "value",
                "expected 'Type/id', 'Type/id/_history/vid', an absolute http(s) URL, "
                "'#id', urn:uuid: or urn:oid:",
            )

    def binding(self, element: _Element, value: dict[str, Any], path: str) -> None:
        """Required binding on Coding / CodeableConcept: only codings of a bound system."""
        if element.type_name == "Coding":
            self.coding(element, value, path)
            return
        codings = value.get("coding")
        if type(codings) is list:
            for index, coding in enumerate(codings):
                if type(coding) is dict:
                    self.coding(element, coding, f"{path}.coding[{index}]")

    def coding(self, element: _Element, coding: dict[str, Any], path: str) -> None:
        systems = element.systems
        assert systems is not None
        system = coding.get("system")
        codes = systems.get(system) if type(system) is str else None
        code = coding.get("code")
        if codes is not None and type(code) is str and code not in codes:
            self.add(path + ".code", "code-invalid", _not_in(element.value_set))


def _has_content(value: dict[str, Any]) -> bool:
    """ele-1 on a JSON object: some property other than id (value() reports it otherwise)."""
    return len(value) > 1 or (bool(value) and "id" not in value)


def _has_ext_at(obj: dict[str, Any], ext_key: str, index: int) -> bool:
    """A null in a primitive array is allowed when `_foo` carries that item."""
    ext = obj.get(ext_key)
    return type(ext) is list and index < len(ext) and ext[index] is not None


def _not_in(value_set: str | None) -> str:
    return f"code is not in the required value set '{value_set}'"
