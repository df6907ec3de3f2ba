"""Terminology over CodeSystem and ValueSet resources: $lookup, $expand, $validate-code (pure).

Works on FHIR resources as published (the vendored R4 ones and those of loaded packages).
Expansion supports compose.include/exclude of whole code systems, concept lists, other value
sets, and the filters ``is-a``, ``descendent-of``, ``is-not-a``, ``generalizes``, ``=`` and ``in``
(on ``concept``, the implicit hierarchy properties ``parent``/``child`` and declared concept
properties). Everything else is refused with a clear error, never answered with a wrong
(empty) expansion: a code system this server does not hold (SNOMED CT, LOINC, ...) unless
the value set lists its codes, ``regex`` and ``exists`` filters, and ``content`` not-present or
fragment systems used as a whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CodeSystemIndex", "Entry", "Terminology", "TerminologyError"]

MAX_EXPANSION = 100_000  # codes computed for one expansion before it is refused as too costly
MAX_NESTING = 16  # value sets including value sets
_INACTIVE_STATUS = frozenset({"retired", "deprecated", "inactive"})


class TerminologyError(Exception):
    """A request the terminology cannot answer; ``code`` is a FHIR IssueType, ``status`` HTTP."""

    def __init__(self, message: str, *, code: str = "not-supported", status: int = 422) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


@dataclass(slots=True)
class Concept:
    code: str
    display: str | None
    definition: str | None
    designation: list[dict[str, Any]]
    properties: list[tuple[str, Any]]  # (property code, value) in source order
    parents: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)

    def values(self, prop: str) -> list[str]:
        if prop == "parent":
            return list(self.parents)
        if prop == "child":
            return list(self.children)
        return [_as_text(v) for p, v in self.properties if p == prop]

    @property
    def abstract(self) -> bool:
        return any(p == "notSelectable" and v is True for p, v in self.properties)

    @property
    def inactive(self) -> bool:
        return any((p == "status" and _as_text(v) in _INACTIVE_STATUS) or (p == "inactive" and v is True)
                   for p, v in self.properties)


def _as_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("code", ""))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _property_value(prop: dict[str, Any]) -> Any:
    for key, value in prop.items():
        if key.startswith("value"):
            return value
    return None


class CodeSystemIndex:
    """The concepts of one CodeSystem resource, indexed by code, with the hierarchy resolved."""

    def __init__(self, resource: dict[str, Any]) -> None:
        self.resource = resource
        self.url: str = resource.get("url", "")
        self.version: str | None = resource.get("version")
        self.name: str = resource.get("title") or resource.get("name") or self.url
        self.content: str = resource.get("content", "complete")
        self.case_sensitive: bool = resource.get("caseSensitive", True) is not False
        self.concepts: dict[str, Concept] = {}
        self._fold: dict[str, str] = {}
        self._walk(resource.get("concept") or [], None)
        for concept in self.concepts.values():  # flat systems declare their hierarchy as properties
            for prop, value in concept.properties:
                parent = _as_text(value)
                if prop in ("parent", "subsumedBy") and parent in self.concepts and parent not in concept.parents:
                    concept.parents.append(parent)
                    self.concepts[parent].children.append(concept.code)
        if not self.case_sensitive:
            self._fold = {code.lower(): code for code in self.concepts}

    def _walk(self, items: list[Any], parent: str | None) -> None:
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("code"), str):
                continue
            code = item["code"]
            concept = self.concepts.get(code)
            if concept is None:
                props = [(p["code"], _property_value(p)) for p in item.get("property") or []
                         if isinstance(p, dict) and isinstance(p.get("code"), str)]
                concept = Concept(code, item.get("display"), item.get("definition"),
                                  list(item.get("designation") or []), props)
                self.concepts[code] = concept
            if parent is not None and parent not in concept.parents:
                concept.parents.append(parent)
                self.concepts[parent].children.append(code)
            self._walk(item.get("concept") or [], code)

    def find(self, code: str) -> Concept | None:
        found = self.concepts.get(code)
        if found is None and not self.case_sensitive:
            canonical = self._fold.get(code.lower())
            found = self.concepts.get(canonical) if canonical else None
        return found

    def descendants(self, code: str) -> list[str]:
        out: list[str] = []
        seen = {code}
        stack = list(reversed(self.concepts[code].children)) if code in self.concepts else []
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            out.append(current)
            stack.extend(reversed(self.concepts[current].children))
        return out

    def ancestors(self, code: str) -> list[str]:
        out: list[str] = []
        stack = list(self.concepts[code].parents) if code in self.concepts else []
        while stack:
            current = stack.pop()
            if current not in out and current != code:
                out.append(current)
                stack.extend(self.concepts[current].parents)
        return out


@dataclass(frozen=True, slots=True)
class Entry:
    """One code of an expansion."""

    system: str
    code: str
    display: str | None
    version: str | None = None
    abstract: bool = False
    inactive: bool = False

    def to_fhir(self) -> dict[str, Any]:
        out: dict[str, Any] = {"system": self.system}
        if self.version:
            out["version"] = self.version
        if self.abstract:
            out["abstract"] = True
        if self.inactive:
            out["inactive"] = True
        out["code"] = self.code
        if self.display:
            out["display"] = self.display
        return out


class Terminology:
    """CodeSystems and ValueSets by canonical URL (and id); later resources replace earlier ones."""

    def __init__(self, resources: Iterable[dict[str, Any]]) -> None:
        self._code_systems: dict[str, dict[str, Any]] = {}
        self._value_sets: dict[str, dict[str, Any]] = {}
        self._ids: dict[tuple[str, str], str] = {}
        self._indexes: dict[str, CodeSystemIndex] = {}
        for r in resources:
            kind, url = r.get("resourceType"), r.get("url")
            if not isinstance(url, str):
                continue
            if kind == "CodeSystem" and r.get("content") != "supplement":
                self._code_systems[url] = r
            elif kind == "ValueSet":
                self._value_sets[url] = r
            else:
                continue
            if isinstance(r.get("id"), str):
                self._ids[(kind, r["id"])] = url

    def counts(self) -> tuple[int, int]:
        return len(self._code_systems), len(self._value_sets)

    def url_of(self, kind: str, rid: str) -> str | None:
        return self._ids.get((kind, rid))

    def code_system(self, url: str, version: str | None = None) -> CodeSystemIndex:
        """The index of a held code system; TerminologyError when it is not held."""
        resource = self._code_systems.get(url)
        if resource is None:
            raise TerminologyError(f"The code system {_short(url)} is not available on this server (neither "
                                   "bundled with R4 nor loaded from a package).", code="not-found", status=404)
        if version is not None and resource.get("version") not in (None, version):
            raise TerminologyError(f"Version {_short(version)} of the code system {_short(url)} is not available "
                                   f"(this server holds {resource.get('version')}).", code="not-found", status=404)
        index = self._indexes.get(url)
        if index is None:
            index = self._indexes[url] = CodeSystemIndex(resource)
        return index

    def value_set(self, url: str, version: str | None = None) -> dict[str, Any]:
        url, _, pipe_version = url.partition("|")
        version = version or pipe_version or None
        resource = self._value_sets.get(url)
        if resource is None:
            raise TerminologyError(f"The value set {_short(url)} is not available on this server.",
                                   code="not-found", status=404)
        if version is not None and resource.get("version") not in (None, version):
            raise TerminologyError(f"Version {_short(version)} of the value set {_short(url)} is not available.",
                                   code="not-found", status=404)
        return resource

    # -- $lookup -------------------------------------------------------------------------
    def lookup(self, system: str, code: str, version: str | None = None,
               properties: list[str] | None = None) -> dict[str, Any]:
        cs = self.code_system(system, version)
        concept = cs.find(code)
        if concept is None:
            raise TerminologyError(f"The code {_short(code)} is not in the code system {_short(system)}.",
                                   code="not-found", status=404)
        params: list[dict[str, Any]] = [{"name": "name", "valueString": cs.name}]
        if cs.version:
            params.append({"name": "version", "valueString": cs.version})
        if concept.display:
            params.append({"name": "display", "valueString": concept.display})
        if concept.abstract:
            params.append({"name": "abstract", "valueBoolean": True})
        wanted = set(properties) if properties else None
        if wanted is None or "designation" in wanted:
            for d in concept.designation:
                parts = [{"name": k, f"value{'Coding' if k == 'use' else 'Code' if k == 'language' else 'String'}": v}
                         for k, v in d.items() if k in ("language", "use", "value")]
                params.append({"name": "designation", "part": parts})
        rows: list[tuple[str, str, Any]] = []
        if concept.definition:
            rows.append(("definition", "valueString", concept.definition))
        rows += [("parent", "valueCode", p) for p in concept.parents]
        rows += [("child", "valueCode", c) for c in concept.children]
        for prop, value in concept.properties:
            rows.append((prop, _value_key(value), value))
        for prop, key, value in rows:
            if wanted is None or prop in wanted:
                params.append({"name": "property", "part": [{"name": "code", "valueCode": prop},
                                                            {"name": "value", key: value}]})
        return {"resourceType": "Parameters", "parameter": params}

    # -- $expand -------------------------------------------------------------------------
    def expand_all(self, value_set: dict[str, Any], *, active_only: bool = False) -> list[Entry]:
        """Every code of ``value_set`` (compose, or a given expansion), in definition order."""
        return _Expander(self, active_only).value_set(value_set, 0)

    def expand(self, value_set: dict[str, Any], *, text: str | None = None, offset: int = 0,
               count: int | None = None, active_only: bool = False,
               echo: list[dict[str, Any]] | None = None, timestamp: str, identifier: str) -> dict[str, Any]:
        entries = self.expand_all(value_set, active_only=active_only)
        if text:
            needle = text.casefold()
            entries = [e for e in entries if needle in e.code.casefold() or needle in (e.display or "").casefold()]
        page = entries[offset:] if count is None else entries[offset:offset + count]
        expansion: dict[str, Any] = {"identifier": identifier, "timestamp": timestamp, "total": len(entries),
                                     "offset": offset}
        if echo:
            expansion["parameter"] = echo
        if page:
            expansion["contains"] = [e.to_fhir() for e in page]
        out: dict[str, Any] = {k: value_set[k] for k in ("resourceType", "id", "url", "version", "name", "title", "status")
               if k in value_set}
        out.setdefault("resourceType", "ValueSet")
        out.setdefault("status", "active")
        out["expansion"] = expansion
        return out

    # -- $validate-code ------------------------------------------------------------------
    def validate_in_value_set(self, value_set: dict[str, Any], codings: list[dict[str, Any]]) -> dict[str, Any]:
        """$validate-code against a value set: valid when one of ``codings`` is in it (and its display fits)."""
        entries = self.expand_all(value_set)
        members = {(e.system, e.code): e for e in entries}
        folded = {(e.system, e.code.lower()): e for e in entries if not self._case_sensitive(e.system)}
        messages: list[str] = []
        for coding in codings:
            system, code = coding.get("system"), coding.get("code")
            if not isinstance(code, str):
                continue
            candidates = [e for (s, c), e in members.items() if c == code and (system is None or s == system)]
            if not candidates and system is not None:
                hit = folded.get((system, code.lower()))
                candidates = [hit] if hit else []
            if not candidates:
                where = f"{_short(system)}#" if system else ""
                messages.append(f"The code {where}{_short(code)} is not in the value set {_short(value_set.get('url', ''))}.")
                continue
            found = candidates[0]
            return self._display_result(found.system, found.display, coding.get("display"), found.code)
        return _result(False, " ".join(messages) or "No code was given.")

    def validate_in_code_system(self, system: str, version: str | None,
                                codings: list[dict[str, Any]]) -> dict[str, Any]:
        cs = self.code_system(system, version)
        for coding in codings:
            if coding.get("system") not in (None, system) or not isinstance(coding.get("code"), str):
                continue
            concept = cs.find(coding["code"])
            if concept is not None:
                return self._display_result(system, concept.display, coding.get("display"), concept.code)
        return _result(False, f"The code is not in the code system {_short(system)}.")

    def _case_sensitive(self, system: str) -> bool:
        try:
            return self.code_system(system).case_sensitive
        except TerminologyError:
            return True

    @staticmethod
    def _display_result(system: str, expected: str | None, given: Any, code: str) -> dict[str, Any]:
        if isinstance(given, str) and expected and given.strip().casefold() != expected.strip().casefold():
            out = _result(False, f"The display given for {_short(system)}#{_short(code)} is not the one of the "
                                 f"code system (expected \"{expected}\").")
        else:
            out = _result(True, None)
        if expected:
            out["parameter"].append({"name": "display", "valueString": expected})
        out["parameter"].append({"name": "code", "valueCode": code})
        out["parameter"].append({"name": "system", "valueUri": system})
        return out


def _result(ok: bool, message: str | None) -> dict[str, Any]:
    params: list[dict[str, Any]] = [{"name": "result", "valueBoolean": ok}]
    if message:
        params.append({"name": "message", "valueString": message})
    return {"resourceType": "Parameters", "parameter": params}


def _value_key(value: Any) -> str:
    if isinstance(value, bool):
        return "valueBoolean"
    if isinstance(value, int):
        return "valueInteger"
    if isinstance(value, float):
        return "valueDecimal"
    if isinstance(value, dict):
        return "valueCoding"
    return "valueCode"


def _short(value: Any) -> str:
    text = str(value or "")
    return text if len(text) <= 200 else text[:200] + "…"


class _Expander:
    def __init__(self, terms: Terminology, active_only: bool) -> None:
        self._t = terms
        self._active_only = active_only
        self._size = 0

    def value_set(self, vs: dict[str, Any], depth: int) -> list[Entry]:
        if depth > MAX_NESTING:
            raise TerminologyError("Value sets include each other too deeply (or in a cycle).")
        compose = vs.get("compose")
        if not isinstance(compose, dict):
            given = (vs.get("expansion") or {}).get("contains")
            if isinstance(given, list):  # an expansion published with the value set
                return [Entry(c["system"], c["code"], c.get("display")) for c in _flatten(given)]
            raise TerminologyError(f"The value set {_short(vs.get('url'))} has no compose to expand.")
        if compose.get("inactive") is False:
            self._active_only = True
        out: dict[tuple[str, str], Entry] = {}
        for inc in compose.get("include") or []:
            for e in self._rule(inc, depth):
                out.setdefault((e.system, e.code), e)
        for exc in compose.get("exclude") or []:
            for e in self._rule(exc, depth):
                out.pop((e.system, e.code), None)
        entries = list(out.values())
        if self._active_only:
            entries = [e for e in entries if not e.inactive]
        return entries

    def _rule(self, rule: dict[str, Any], depth: int) -> list[Entry]:
        system = rule.get("system")
        sets: list[set[tuple[str, str]]] = []
        by_key: dict[tuple[str, str], Entry] = {}
        for url in rule.get("valueSet") or []:
            included = self.value_set(self._t.value_set(url), depth + 1)
            sets.append({(e.system, e.code) for e in included})
            for e in included:
                by_key.setdefault((e.system, e.code), e)
        if system is None:
            if not sets:
                return []
            keep = set.intersection(*sets)
            return [e for k, e in by_key.items() if k in keep]
        entries = list(self._from_system(system, rule))
        if sets:
            keep = set.intersection(*sets)
            entries = [e for e in entries if (e.system, e.code) in keep]
        return entries

    def _from_system(self, system: str, rule: dict[str, Any]) -> Iterator[Entry]:
        listed = [c for c in rule.get("concept") or [] if isinstance(c, dict) and isinstance(c.get("code"), str)]
        filters = [f for f in rule.get("filter") or [] if isinstance(f, dict)]
        try:
            cs: CodeSystemIndex | None = self._t.code_system(system, rule.get("version"))
        except TerminologyError:
            if listed and not filters:  # the value set names its codes: no need for the code system
                cs = None
            else:
                raise TerminologyError(f"Cannot expand: the code system {_short(system)} is not available on this "
                                       "server (neither bundled with R4 nor loaded from a package); only value sets "
                                       "that list its codes can be expanded.") from None
        if cs is None:
            for c in listed:
                yield self._count(Entry(system, c["code"], c.get("display"), rule.get("version")))
            return
        if listed:
            for c in listed:
                concept = cs.find(c["code"])
                if concept is not None:
                    yield self._entry(cs, concept, c.get("display"))
            return
        if cs.content not in ("complete", "example") and not filters:
            raise TerminologyError(f"Cannot expand the whole code system {_short(system)}: its content is "
                                   f"'{cs.content}' here.")
        codes: list[str] | None = None
        for f in filters:
            matched = self._filter(cs, f)
            codes = matched if codes is None else [c for c in codes if c in set(matched)]
        for code in codes if codes is not None else list(cs.concepts):
            yield self._entry(cs, cs.concepts[code], None)

    def _filter(self, cs: CodeSystemIndex, f: dict[str, Any]) -> list[str]:
        prop, op, value = f.get("property"), f.get("op"), f.get("value")
        if not isinstance(prop, str) or not isinstance(op, str) or not isinstance(value, str):
            raise TerminologyError("A compose filter needs property, op and value.", code="invalid")
        if prop == "concept" and op in ("is-a", "descendent-of", "is-not-a", "generalizes"):
            root = cs.find(value)
            if root is None:
                return [] if op != "is-not-a" else list(cs.concepts)
            below = cs.descendants(root.code)
            if op == "is-a":
                return [root.code, *below]
            if op == "descendent-of":
                return below
            if op == "generalizes":
                return [root.code, *cs.ancestors(root.code)]
            excluded = {root.code, *below}
            return [c for c in cs.concepts if c not in excluded]
        if op in ("=", "in"):
            wanted = {value} if op == "=" else {v.strip() for v in value.split(",")}
            if prop == "concept":
                return [c for c in cs.concepts if c in wanted]
            return [c.code for c in cs.concepts.values() if wanted.intersection(c.values(prop))]
        raise TerminologyError(f"The filter '{_short(prop)} {_short(op)}' is not supported by this server "
                               "(supported: concept is-a, descendent-of, is-not-a, generalizes; '=' and 'in' on "
                               "properties).")

    def _entry(self, cs: CodeSystemIndex, concept: Concept, display: str | None) -> Entry:
        return self._count(Entry(cs.url, concept.code, display or concept.display, cs.version,
                                 concept.abstract, concept.inactive))

    def _count(self, entry: Entry) -> Entry:
        self._size += 1
        if self._size > MAX_EXPANSION:
            raise TerminologyError(f"The expansion has more than {MAX_EXPANSION} codes.", code="too-costly")
        return entry


def _flatten(contains: list[Any]) -> Iterator[dict[str, Any]]:
    for c in contains:
        if isinstance(c, dict):
            if isinstance(c.get("code"), str) and isinstance(c.get("system"), str):
                yield c
            yield from _flatten(c.get("contains") or [])
