#!/usr/bin/env python3
"""Compile the FHIR R4 (4.0.1) SearchParameters into fhirvault's vendored search table.

Run by developers, never at install, run or test time:

    python scripts/gen_search_tables.py --source /work/shared/fhir-r4 \
        --out src/fhirvault/domain/r4/search_params.json.gz

Source: search-parameters.json (and, for element types and bindings, the StructureDefinitions
and ValueSets, read through scripts/gen_r4_tables.py) of the npm package
hl7.fhir.r4.examples@4.0.1, published by HL7 under CC0.

Every FHIRPath expression is compiled here into a small extraction program, so the server
never interprets FHIRPath: it only walks precompiled element paths. The subset understood:

    Type.a.b                          dotted element path from the resource root
    (Type.a as T)  Type.a.as(T)       choice narrowing: value as Quantity -> valueQuantity
    Type.a.ofType(T)                  same
    (Type.a as T).b                   path continuing after the narrowing
    Type.a.where(resolve() is T)      reference target filter
    Type.a.where(f='literal')         equality filter on a primitive child
    Type.a.extension('url').value     extension step (extension.where(url='url'))
    Type.a[0]                         first item
    %resource.a.b                     (composite components) path from the resource root
    Type.a.exists() and Type.a != false   the boolean computed by Patient-deceased

Output layout (gzip-compressed JSON, sorted keys, compact):

    format, fhirVersion, source
    params   url -> {"code", "type", "targets"?: [types], "components"?: [component urls]}
    types    resource type (or "Resource" for the parameters of every type)
             -> search parameter code -> [url, program, targets?]
             (targets: a reference parameter's targets narrowed to the types this resource
             type's elements may refer to, when narrower than the parameter's own list)
    skipped  [[url, reason], ...] parameters (or parts of expressions) left out

A program is a list of alternatives (the union of the FHIRPath expression); an alternative:

    {"path": [step, ...], "type": leaf FHIR type,
     "targets"?: [types]       only references that resolve to one of these types,
     "system"?: url            implicit code system of a `code` leaf (its required binding),
     "root"?: true             path starts at the resource root (%resource),
     "truthy"?: [[step...]...] the leaf is the boolean "one of these paths has a value
                               that is not false" (path is empty, type boolean),
     "components"?: [[alternative, ...], ...]  composite parameters: per component, the
                               alternatives relative to this focus element}

and a step is an element name ("telecom") or [name, filters, index] with filters a list
of [child, literal] equalities (or null) and index an integer (or null).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

FORMAT = 1
FHIR_VERSION = "4.0.1"
SOURCE = "hl7.fhir.r4.examples@4.0.1 (HL7, CC0-1.0): search-parameters.json"

Json = dict[str, Any]

# Leaf FHIR types each search parameter type can index.
COMPATIBLE: dict[str, frozenset[str]] = {
    "string": frozenset({"string", "markdown", "HumanName", "Address"}),
    "token": frozenset(
        {
            "Coding",
            "CodeableConcept",
            "Identifier",
            "ContactPoint",
            "code",
            "boolean",
            "id",
            "uri",
            "url",
            "canonical",
            "oid",
            "uuid",
            "string",
        }
    ),
    "reference": frozenset({"Reference", "canonical", "uri", "url"}),
    "date": frozenset({"date", "dateTime", "instant", "Period", "Timing"}),
    "number": frozenset({"decimal", "integer", "positiveInt", "unsignedInt", "Range"}),
    "quantity": frozenset(
        {
            "Quantity",
            "SimpleQuantity",
            "Age",
            "Duration",
            "Count",
            "Distance",
            "Money",
            "MoneyQuantity",
            "Range",
        }
    ),
    "uri": frozenset({"uri", "url", "canonical", "oid", "uuid"}),
}
SUPPORTED_TYPES = frozenset(COMPATIBLE) | {"composite"}
PROFILE_PREFIX = "http://hl7.org/fhir/StructureDefinition/"
INFER_ORDER = ("token", "reference", "date", "quantity", "number", "string", "uri")


class CannotCompile(Exception):
    """The expression uses FHIRPath beyond the supported subset."""


def load_gen_r4(script_dir: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_r4_tables", script_dir / "gen_r4_tables.py")
    if spec is None or spec.loader is None:
        raise SystemExit("cannot load gen_r4_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- FHIRPath subset parser


def split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside parentheses, brackets and quotes."""
    parts: list[str] = []
    depth = 0
    quote = False
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            current.append(ch)
            if ch == "\\" and i + 1 < len(text):
                current.append(text[i + 1])
                i += 1
            elif ch == "'":
                quote = False
        elif ch == "'":
            quote = True
            current.append(ch)
        elif ch in "([":
            depth += 1
            current.append(ch)
        elif ch in ")]":
            depth -= 1
            current.append(ch)
        elif depth == 0 and text.startswith(sep, i):
            parts.append("".join(current))
            current = []
            i += len(sep)
            continue
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def matching_paren(text: str, start: int) -> int:
    depth = 0
    quote = False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if ch == "'":
                quote = False
        elif ch == "'":
            quote = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
    raise CannotCompile("unbalanced parentheses")


AS_INFIX = re.compile(r"^(.*\S)\s+as\s+([A-Za-z]+)$", re.S)
SEGMENT = re.compile(r"^(%?[A-Za-z][A-Za-z0-9]*)(\((.*)\))?((\[\d+\])*)$", re.S)
RESOLVE_IS = re.compile(r"^resolve\(\)\s+is\s+([A-Za-z]+)$")
FIELD_EQ = re.compile(r"^([a-z][A-Za-z0-9]*)\s*=\s*'([^'\\]*)'$")
QUOTED = re.compile(r"^'([^'\\]*)'$")
TRUTHY = re.compile(r"^(\S+)\.exists\(\)\s+and\s+(\S+)\s*!=\s*false$")


def normalise(expr: str) -> str:
    """Rewrite `(X as T)rest` into `X.as(T)rest` (recursively), strip outer parentheses."""
    expr = expr.strip()
    while expr.startswith("("):
        end = matching_paren(expr, 0)
        inner = expr[1:end].strip()
        rest = expr[end + 1 :].strip()
        if m := AS_INFIX.match(inner):
            expr = normalise(m.group(1)) + f".as({m.group(2)})" + rest
        else:
            expr = normalise(inner) + rest
        if rest and not rest.startswith((".", "[")):
            raise CannotCompile(f"unsupported operator after parentheses: {rest!r}")
    if m := AS_INFIX.match(expr):
        expr = normalise(m.group(1)) + f".as({m.group(2)})"
    return expr


def segments(expr: str) -> list[tuple[str, str | None, list[int]]]:
    """(name, call arguments or None, indexes) of each dotted segment."""
    out: list[tuple[str, str | None, list[int]]] = []
    for raw in split_top(expr, "."):
        seg = raw.strip()
        m = SEGMENT.match(seg)
        if m is None:
            raise CannotCompile(f"unsupported segment {seg!r}")
        indexes = [int(x) for x in re.findall(r"\[(\d+)\]", m.group(4) or "")]
        out.append((m.group(1), m.group(3) if m.group(2) else None, indexes))
    return out


# ---------------------------------------------------------------- path compiler


class Alt:
    """One alternative being compiled: where we are and how we got there."""

    def __init__(self, table: str, steps: list[Any], leaf: str, choice: str | None = None) -> None:
        self.table = table  # type (or backbone path) of the current node
        self.steps = steps
        self.leaf = leaf  # FHIR type of the current node
        self.choice = choice  # choice group of the last step, when it was a [x] element
        self.targets: list[str] | None = None
        self.root = False
        self.truthy: list[list[Any]] | None = None
        self.binding: str | None = None  # value set id of the last element
        self.element: str | None = None  # definition path of the last element ("X.value[x]")

    def copy(self) -> Alt:
        other = Alt(self.table, list(self.steps), self.leaf, self.choice)
        other.targets = self.targets
        other.root = self.root
        other.binding = self.binding
        other.element = self.element
        return other


class Compiler:
    def __init__(
        self,
        tables: dict[str, dict[str, list[Any]]],
        value_sets: Json,
        element_targets: dict[str, list[str]] | None = None,
    ) -> None:
        self.tables = tables
        self.value_sets = value_sets
        # definition path -> target types of its Reference/canonical types ("Resource": any)
        self.element_targets = element_targets or {}

    def targets_of(self, alts: list[Alt]) -> set[str] | None:
        """Types the alternatives' references may point to; None when unrestricted."""
        out: set[str] = set()
        for alt in alts:
            if alt.targets:
                out.update(alt.targets)
                continue
            found = self.element_targets.get(alt.element or "")
            if not found or "Resource" in found:
                return None
            out.update(found)
        return out

    # The element entry of the compiled definition table: [type, flags, valueSetId?, group?]
    def child(self, alt: Alt, name: str) -> list[Alt]:
        table = self.tables.get(alt.table)
        if table is None:
            raise CannotCompile(f"{alt.table} has no elements (step {name!r})")
        if name in table:
            entry = table[name]
            nxt = alt.copy()
            nxt.steps.append(name)
            nxt.table = entry[0]
            nxt.leaf = entry[0]
            nxt.choice = None
            nxt.binding = entry[2] if len(entry) > 2 else None
            nxt.element = f"{alt.table}.{name}"
            return [nxt]
        group = [(prop, e) for prop, e in sorted(table.items()) if len(e) > 3 and e[3] == name]
        if not group:
            raise CannotCompile(f"{alt.table} has no element {name!r}")
        out = []
        for prop, entry in group:
            nxt = alt.copy()
            nxt.steps.append(prop)
            nxt.table = entry[0]
            nxt.leaf = entry[0]
            nxt.choice = name
            nxt.binding = entry[2] if len(entry) > 2 else None
            nxt.element = f"{alt.table}.{name}[x]"
            out.append(nxt)
        return out

    @staticmethod
    def narrow(alts: list[Alt], type_name: str) -> list[Alt]:
        wanted = type_name[0].upper() + type_name[1:]
        out = []
        for alt in alts:
            if alt.choice is not None:
                last = alt.steps[-1]
                name = last if isinstance(last, str) else last[0]
                if name == alt.choice + wanted:
                    out.append(alt)
            elif alt.leaf.lower() == type_name.lower():
                out.append(alt)
        return out

    @staticmethod
    def add_filter(alt: Alt, field: str, literal: str) -> None:
        last = alt.steps[-1]
        if isinstance(last, str):
            last = [last, None, None]
        filters = list(last[1] or [])
        filters.append([field, literal])
        alt.steps[-1] = [last[0], filters, last[2]]

    def compile(self, expr: str, context: str, resource_type: str) -> list[Alt]:
        """Alternatives of one union member, relative to `context` (a type or backbone)."""
        expr = expr.strip()
        if m := TRUTHY.match(expr):
            if m.group(1) != m.group(2):
                raise CannotCompile("exists() and != false on different paths")
            inner = self.compile(m.group(1), context, resource_type)
            alt = Alt(context, [], "boolean")
            alt.truthy = [a.steps for a in inner]
            return [alt]
        segs = segments(normalise(expr))
        alts = [Alt(context, [], context)]
        first, args, _indexes = segs[0]
        if first == "%resource":
            alts[0].table = alts[0].leaf = resource_type
            alts[0].root = True
            segs = segs[1:]
        elif first == resource_type or (first in ("Resource", "DomainResource") and not args):
            segs = segs[1:]
        elif first[0].isupper():
            raise CannotCompile(f"expression is rooted at {first}, not {resource_type}")
        for name, call, indexes in segs:
            if call is None:
                nxt: list[Alt] = []
                for alt in alts:
                    nxt.extend(self.child(alt, name))
                alts = nxt
            elif name in ("as", "ofType"):
                if not re.fullmatch(r"[A-Za-z]+", call.strip()):
                    raise CannotCompile(f"unsupported type in {name}()")
                alts = self.narrow(alts, call.strip())
            elif name == "where":
                if m := RESOLVE_IS.match(call.strip()):
                    for alt in alts:
                        if alt.leaf != "Reference":
                            raise CannotCompile("resolve() on a non-Reference")
                        alt.targets = [m.group(1)]
                elif m := FIELD_EQ.match(call.strip()):
                    for alt in alts:
                        table = self.tables.get(alt.table, {})
                        if m.group(1) not in table or not alt.steps:
                            raise CannotCompile(f"where() on unknown element {m.group(1)!r}")
                        self.add_filter(alt, m.group(1), m.group(2))
                else:
                    raise CannotCompile("unsupported where() criterion")
            elif name == "extension":
                m = QUOTED.match(call.strip())
                if m is None:
                    raise CannotCompile("extension() without a literal url")
                nxt = []
                for alt in alts:
                    for ext in self.child(alt, "extension"):
                        self.add_filter(ext, "url", m.group(1))
                        nxt.append(ext)
                alts = nxt
            else:
                raise CannotCompile(f"unsupported function {name}()")
            for index in indexes:
                for alt in alts:
                    last = alt.steps[-1]
                    if isinstance(last, str):
                        last = [last, None, None]
                    if last[2] is not None:
                        raise CannotCompile("two indexes on one step")
                    alt.steps[-1] = [last[0], last[1], index]
        return alts

    def implicit_system(self, alt: Alt) -> str | None:
        if alt.leaf != "code" or not alt.binding:
            return None
        systems = self.value_sets.get(alt.binding)
        if systems and len(systems) == 1:
            return str(next(iter(systems)))
        return None

    def program(self, alts: list[Alt]) -> list[Json]:
        out = []
        for alt in alts:
            entry: Json = {"path": alt.steps, "type": alt.leaf}
            if alt.targets:
                entry["targets"] = alt.targets
            if alt.root:
                entry["root"] = True
            if alt.truthy is not None:
                entry["truthy"] = alt.truthy
            if system := self.implicit_system(alt):
                entry["system"] = system
            out.append(entry)
        return out


# ---------------------------------------------------------------- assembly


def load_bundle(path: Path) -> list[Json]:
    with path.open(encoding="utf-8") as fh:
        bundle = json.load(fh)
    return [entry["resource"] for entry in bundle.get("entry", [])]


def bases_of(param: Json, resource_types: list[str]) -> list[str]:
    out = []
    for base in param["base"]:
        if base in ("Resource", "DomainResource"):
            out.append("Resource" if base == "Resource" else base)
        elif base in resource_types:
            out.append(base)
    return out


def alternatives_for(expression: str, base: str) -> list[str]:
    """The union members of `expression` that apply to `base`."""
    out = []
    for part in split_top(expression, "|"):
        stripped = part.strip()
        head = re.match(r"^\(*\s*(%?[A-Za-z]+)", stripped)
        root = head.group(1) if head else ""
        if root[0:1].isupper() and root != base and root not in ("Resource", "DomainResource"):
            continue  # shared parameters list the expressions of every base
        out.append(stripped)
    return out


def compatible(alt: Alt, param_type: str) -> bool:
    return alt.leaf in COMPATIBLE[param_type]


def element_targets(sds: list[Json]) -> dict[str, list[str]]:
    """Definition path -> target types of its Reference and canonical types."""
    out: dict[str, list[str]] = {}
    for sd in sds:
        if sd.get("derivation") == "constraint":
            continue
        for element in sd["snapshot"]["element"]:
            targets: set[str] = set()
            for type_ in element.get("type", []):
                if type_["code"] in ("Reference", "canonical"):
                    profiles = type_.get("targetProfile") or [PROFILE_PREFIX + "Resource"]
                    targets.update(p.rsplit("/", 1)[1] for p in profiles)
            if targets:
                out[element["path"]] = sorted(targets)
    return out


class Build:
    def __init__(self, source: Path, gen_r4: ModuleType) -> None:
        defs = gen_r4.build(source)
        self.resource_types: list[str] = defs["resourceTypes"]
        type_sds, resource_sds = gen_r4.structure_definitions(source)
        self.compiler = Compiler(
            defs["tables"], defs["valueSets"], element_targets(type_sds + resource_sds)
        )
        self.params = load_bundle(source / "search-parameters.json")
        self.by_url = {p["url"]: p for p in self.params}
        self.skipped: list[list[str]] = []

    def skip(self, url: str, reason: str) -> None:
        self.skipped.append([url, reason])

    def simple_program(
        self,
        param: Json,
        expression: str,
        context: str,
        rtype: str,
        where: str,
        quiet: bool = False,
    ) -> list[Json]:
        return self.compiler.program(
            self.simple_alts(param, expression, context, rtype, where, quiet)
        )

    def simple_alts(
        self,
        param: Json,
        expression: str,
        context: str,
        rtype: str,
        where: str,
        quiet: bool = False,
    ) -> list[Alt]:
        alts: list[Alt] = []
        for member in alternatives_for(expression, rtype):
            try:
                compiled = self.compiler.compile(member, context, rtype)
            except CannotCompile as exc:
                if not quiet:
                    self.skip(param["url"], f"{rtype}{where}: {member}: {exc}")
                continue
            for alt in compiled:
                if alt.truthy is None and not compatible(alt, param["type"]):
                    if quiet:
                        continue
                    self.skip(
                        param["url"],
                        f"{rtype}{where}: {member}: {alt.leaf} cannot be searched as "
                        f"{param['type']}",
                    )
                    continue
                alts.append(alt)
        return alts

    def type_targets(self, param: Json, alts: list[Alt]) -> list[str] | None:
        """The parameter's targets narrowed to what this type's elements allow, when that
        differs from the parameter's list (shared parameters list every base's targets)."""
        declared = set(param.get("target", []))
        allowed = self.compiler.targets_of(alts)
        if allowed is None:
            return None
        narrowed = declared & allowed if declared else allowed
        return sorted(narrowed) if narrowed != declared else None

    def component_program(
        self, param: Json, comp: Json, definition: Json, focus: Alt, rtype: str
    ) -> tuple[str, list[Json]]:
        """(search type, program) of one composite component on one focus element.

        R4 has one composite whose component definitions are swapped
        (DocumentReference-relationship: `code` is declared with the reference parameter,
        `target` with the token one); when the declared type cannot search the element,
        the type is inferred from the element when exactly one search type fits it.
        """
        label = f" ({param['code']})"
        program = self.simple_program(
            definition, comp["expression"], focus.table, rtype, label, quiet=True
        )
        if program:
            return definition["type"], program
        try:
            alts = self.compiler.compile(comp["expression"], focus.table, rtype)
        except CannotCompile:
            alts = []
        fits = [t for t in INFER_ORDER if alts and all(alt.leaf in COMPATIBLE[t] for alt in alts)]
        if not fits:
            return definition["type"], []
        self.skip(
            param["url"],
            f"{rtype}: component {comp['expression']!r} declared as {definition['type']}, "
            f"searched as {fits[0]} (the element's type)",
        )
        return fits[0], self.compiler.program(alts)

    def composite_program(self, param: Json, rtype: str) -> tuple[list[str], list[Json]] | None:
        comps = param.get("component", [])
        defs = [self.by_url.get(c["definition"]) for c in comps]
        if not comps or any(d is None or d["type"] not in COMPATIBLE for d in defs):
            self.skip(param["url"], f"{rtype}: component definitions unusable")
            return None
        program: list[Json] = []
        types: list[str] = [str(d["type"]) for d in defs if d is not None]
        for member in alternatives_for(param["expression"], rtype):
            try:
                foci = self.compiler.compile(member, rtype, rtype)
            except CannotCompile as exc:
                self.skip(param["url"], f"{rtype}: focus {member}: {exc}")
                continue
            for focus in foci:
                entry = self.compiler.program([focus])[0]
                components = []
                for i, (comp, definition) in enumerate(zip(comps, defs, strict=True)):
                    assert definition is not None
                    comp_type, sub = self.component_program(param, comp, definition, focus, rtype)
                    if not sub:
                        break
                    types[i] = comp_type
                    components.append(sub)
                else:
                    entry["components"] = components
                    program.append(entry)
                    continue
                self.skip(param["url"], f"{rtype}: a component has no usable path on {focus.table}")
        if types[0] != "token":
            self.skip(param["url"], f"{rtype}: the first component is not a token")
            return None
        return types, program

    def run(self) -> Json:
        params: Json = {}
        types: dict[str, Json] = {}
        component_types: dict[str, list[str]] = {}
        for param in sorted(self.params, key=lambda p: p["url"]):
            url = param["url"]
            if param["type"] not in SUPPORTED_TYPES:
                self.skip(url, f"type {param['type']} is not supported")
                continue
            if param.get("xpathUsage") == "phonetic":
                self.skip(url, "phonetic matching is not supported")
                continue
            if not param.get("expression"):
                self.skip(url, "no FHIRPath expression")
                continue
            usable = False
            for base in bases_of(param, self.resource_types):
                if base == "DomainResource":
                    self.skip(url, "DomainResource base")
                    continue
                narrowed: list[str] | None = None
                if param["type"] == "composite":
                    result = self.composite_program(param, base)
                    program = result[1] if result else []
                    if result:
                        component_types[url] = result[0]
                else:
                    # Resource is abstract and has no table: compile its paths on a concrete type.
                    concrete = "Basic" if base == "Resource" else base
                    alts = self.simple_alts(param, param["expression"], concrete, concrete, "")
                    program = self.compiler.program(alts)
                    if alts and param["type"] == "reference":
                        narrowed = self.type_targets(param, alts)
                if not program:
                    self.skip(url, f"{base}: no usable path")
                    continue
                row: list[Any] = [url, program]
                if narrowed is not None:
                    row.append(narrowed)
                types.setdefault(base, {})[param["code"]] = row
                usable = True
            if usable:
                entry: Json = {"code": param["code"], "type": param["type"]}
                if param.get("target"):
                    entry["targets"] = sorted(param["target"])
                if param["type"] == "composite":
                    entry["components"] = [
                        [c["definition"], t]
                        for c, t in zip(param["component"], component_types[url], strict=True)
                    ]
                params[url] = entry
        return {
            "format": FORMAT,
            "fhirVersion": FHIR_VERSION,
            "source": SOURCE,
            "params": params,
            "types": types,
            "skipped": sorted(self.skipped),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--source", type=Path, required=True, help="folder with the R4 files")
    parser.add_argument("--out", type=Path, required=True, help="output .json.gz")
    args = parser.parse_args(argv)
    gen_r4 = load_gen_r4(Path(__file__).resolve().parent)
    data = Build(args.source, gen_r4).run()
    size = gen_r4.write(data, args.out)  # one deterministic gzip writer for every vendored table
    n_entries = sum(len(v) for v in data["types"].values())
    print(
        f"wrote {args.out}: {size} bytes, {len(data['params'])} parameters, "
        f"{n_entries} (type, code) entries, {len(data['skipped'])} skip notes",
        file=sys.stderr,
    )
    for url, reason in data["skipped"]:
        print(f"skipped: {url}: {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
