#!/usr/bin/env python3
"""Compile the FHIR R4 (4.0.1) definitions into fhirvault's vendored validation table.

Run by developers, never at install, run or test time:

    python scripts/gen_r4_tables.py --source /work/shared/fhir-r4 \
        --out src/fhirvault/domain/r4/definitions.json.gz

Source: the official definition files of the npm package hl7.fhir.r4.examples@4.0.1,
published by HL7 under CC0. Output layout (gzip-compressed JSON, sorted keys):

    format, fhirVersion, source
    resourceTypes      sorted names of the concrete resource types
    primitives         type -> {"json": "string"|"boolean"|"integer"|"decimal", "regex": str|null}
    tables             type or backbone path -> {property: [type, flags, valueSetId?, choiceGroup?]}
                       flags: bit 0 = array (max "*"), bit 1 = required (min >= 1);
                       choice elements (value[x]) are expanded to valueString, valueQuantity, ...
                       and carry the group name ("value"); "Resource" means any resource.
    valueSets          id -> {system: [codes]} for required bindings that expand fully
    patientCompartment resource type -> [[search param code, [element paths]], ...]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

FORMAT = 1
FHIR_VERSION = "4.0.1"
SOURCE = "hl7.fhir.r4.examples@4.0.1 (HL7, CC0-1.0)"

EXT_FHIR_TYPE = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
EXT_REGEX = "http://hl7.org/fhir/StructureDefinition/regex"
FHIRPATH_PREFIX = "http://hl7.org/fhirpath/System."
PROFILE_PREFIX = "http://hl7.org/fhir/StructureDefinition/"

FLAG_ARRAY = 1
FLAG_REQUIRED = 2

# JSON representation of the primitives that are not JSON strings.
JSON_KINDS = {
    "boolean": "boolean",
    "integer": "integer",
    "positiveInt": "integer",
    "unsignedInt": "integer",
    "decimal": "decimal",
}

Json = dict[str, Any]


def load_bundle(path: Path) -> list[Json]:
    with path.open(encoding="utf-8") as fh:
        bundle = json.load(fh)
    return [entry["resource"] for entry in bundle.get("entry", [])]


def structure_definitions(source: Path) -> tuple[list[Json], list[Json]]:
    """Return (datatype SDs, resource SDs)."""
    types = [
        r
        for r in load_bundle(source / "Bundle-types.json")
        if r["resourceType"] == "StructureDefinition"
    ]
    resources = [
        r
        for r in load_bundle(source / "Bundle-resources.json")
        if r["resourceType"] == "StructureDefinition"
    ]
    return types, resources


# ---------------------------------------------------------------- primitives


def primitive_table(sd: Json) -> Json:
    regex = None
    for element in sd["snapshot"]["element"]:
        if element["path"] != sd["type"] + ".value":
            continue
        for type_ in element.get("type", []):
            for ext in type_.get("extension", []):
                if ext["url"] == EXT_REGEX:
                    regex = ext["valueString"]
    return {"json": JSON_KINDS.get(sd["type"], "string"), "regex": regex}


# ---------------------------------------------------------------- element tables


def element_type(element: Json, owner_is_resource: bool, root: str) -> list[tuple[str, str]]:
    """(type code, table type) of one element; several for a choice element.

    They differ for profiled types: valueQuantity may be checked as SimpleQuantity.
    """
    if element["path"] == root + ".id" and owner_is_resource:
        # Resource.id is declared as System.String but is an `id` (see Resource definition).
        return [("id", "id")]
    names = []
    for type_ in element.get("type", []):
        code = type_["code"]
        if code.startswith(FHIRPATH_PREFIX):
            fhir_type = next(
                (e["valueUrl"] for e in type_.get("extension", []) if e["url"] == EXT_FHIR_TYPE),
                "string",
            )
            names.append((fhir_type, fhir_type))
            continue
        profiles = type_.get("profile", [])
        if code == "Quantity" and profiles == [PROFILE_PREFIX + "SimpleQuantity"]:
            names.append((code, "SimpleQuantity"))
        else:
            names.append((code, code))
    return names


def binding_url(element: Json) -> str | None:
    binding = element.get("binding")
    if not binding or binding.get("strength") != "required" or "valueSet" not in binding:
        return None
    return str(binding["valueSet"]).split("|", 1)[0]


def compile_structure(
    sd: Json, owner_is_resource: bool, bindings: dict[str, set[str]]
) -> dict[str, Json]:
    """Element tables of one StructureDefinition: its root plus one per backbone path.

    `bindings` collects ValueSet url -> element paths, for later expansion.
    """
    root = sd["type"] if sd.get("derivation") != "constraint" else sd["id"]
    elements = sd["snapshot"]["element"]
    parents = {e["path"].rsplit(".", 1)[0] for e in elements if "." in e["path"]}
    tables: dict[str, Json] = {root: {}}
    for element in elements:
        path: str = element["path"]
        if "." not in path:
            continue
        if sd.get("derivation") == "constraint":
            # Profiles like SimpleQuantity keep the base type's paths (Quantity.value).
            path = root + path[path.index(".") :]
        parent, name = path.rsplit(".", 1)
        if element.get("max") == "0":
            continue  # prohibited by this definition: leave it out, so it is unknown
        flags = (FLAG_ARRAY if element["max"] != "1" else 0) | (
            FLAG_REQUIRED if element["min"] >= 1 else 0
        )
        if "contentReference" in element:
            target = element["contentReference"].split("#", 1)[1]
            types = [(target, target)]
        else:
            types = element_type(element, owner_is_resource, root)
            if (
                types in ([("BackboneElement",) * 2], [("Element",) * 2])
                and element["path"] in parents
            ):
                types = [(path, path)]
                tables[path] = {}
        vs_url = binding_url(element)
        if vs_url:
            bindings.setdefault(vs_url, set()).add(path)
        table = tables.setdefault(parent, {})
        if name.endswith("[x]"):
            group = name[:-3]
            for code, type_name in types:
                prop = group + code[0].upper() + code[1:]
                table[prop] = [type_name, flags, vs_url, group]
        else:
            if len(types) != 1:
                raise SystemExit(f"{path}: {len(types)} types on a non-choice element")
            table[name] = [types[0][1], flags, vs_url]
    return tables


# ---------------------------------------------------------------- value sets


class NotExpandable(Exception):
    """The ValueSet cannot be expanded from the core definitions alone."""


def concept_codes(concepts: list[Json]) -> list[tuple[str, str | None]]:
    """(code, parent code) for every concept, nested ones included."""
    out: list[tuple[str, str | None]] = []

    def walk(items: list[Json], parent: str | None) -> None:
        for concept in items:
            out.append((concept["code"], parent))
            walk(concept.get("concept", []), concept["code"])

    walk(concepts, None)
    return out


def filtered_codes(code_system: Json, filters: list[Json]) -> set[str]:
    pairs = concept_codes(code_system.get("concept", []))
    children: dict[str, list[str]] = {}
    for code, parent in pairs:
        if parent is not None:
            children.setdefault(parent, []).append(code)

    def descendants(code: str) -> set[str]:
        found: set[str] = set()
        stack = list(children.get(code, []))
        while stack:
            child = stack.pop()
            if child not in found:
                found.add(child)
                stack.extend(children.get(child, []))
        return found

    result = {code for code, _ in pairs}
    for flt in filters:
        if flt.get("property") != "concept":
            raise NotExpandable(f"filter on property {flt.get('property')}")
        if flt["op"] == "is-a":
            selected = descendants(flt["value"]) | {flt["value"]}
        elif flt["op"] == "descendent-of":
            selected = descendants(flt["value"])
        elif flt["op"] == "is-not-a":
            selected = result - descendants(flt["value"]) - {flt["value"]}
        else:
            raise NotExpandable(f"filter op {flt['op']}")
        result &= selected
    return result


class Expander:
    def __init__(self, value_sets: dict[str, Json], code_systems: dict[str, Json]) -> None:
        self.value_sets = value_sets
        self.code_systems = code_systems

    def expand(self, url: str, seen: frozenset[str] = frozenset()) -> dict[str, set[str]]:
        if url in seen:
            raise NotExpandable(f"cycle through {url}")
        vs = self.value_sets.get(url)
        if vs is None:
            raise NotExpandable(f"unknown ValueSet {url}")
        compose = vs.get("compose")
        if not compose or not compose.get("include"):
            raise NotExpandable(f"{url} has no compose")
        result: dict[str, set[str]] = {}
        for include in compose["include"]:
            for system, codes in self._part(include, seen | {url}).items():
                result.setdefault(system, set()).update(codes)
        for exclude in compose.get("exclude", []):
            for system, codes in self._part(exclude, seen | {url}).items():
                result.get(system, set()).difference_update(codes)
        return {system: codes for system, codes in result.items() if codes}

    def _part(self, part: Json, seen: frozenset[str]) -> dict[str, set[str]]:
        imported = [self.expand(u.split("|", 1)[0], seen) for u in part.get("valueSet", [])]
        system = part.get("system")
        if system is None:
            if not imported:
                raise NotExpandable("include without system or valueSet")
            return intersect(imported)
        if "concept" in part:
            codes = {c["code"] for c in part["concept"]}
        else:
            code_system = self.code_systems.get(system)
            if code_system is None or code_system.get("content") != "complete":
                raise NotExpandable(f"code system {system} is not defined completely here")
            codes = filtered_codes(code_system, part.get("filter", []))
        own = {system: codes}
        return intersect([own, *imported]) if imported else own


def intersect(parts: list[dict[str, set[str]]]) -> dict[str, set[str]]:
    result = {system: set(codes) for system, codes in parts[0].items()}
    for other in parts[1:]:
        result = {s: codes & other[s] for s, codes in result.items() if s in other}
    return result


def value_set_id(url: str, value_sets: dict[str, Json]) -> str:
    return str(value_sets[url]["id"])


def compile_value_sets(
    source: Path, bindings: dict[str, set[str]]
) -> tuple[dict[str, dict[str, list[str]]], dict[str, str | None]]:
    """Expand the required ValueSets; return (id -> {system: codes}, url -> id or None)."""
    resources = load_bundle(source / "Bundle-valuesets.json")
    value_sets = {r["url"]: r for r in resources if r["resourceType"] == "ValueSet"}
    code_systems = {r["url"]: r for r in resources if r["resourceType"] == "CodeSystem"}
    expander = Expander(value_sets, code_systems)
    expanded: dict[str, dict[str, list[str]]] = {}
    ids: dict[str, str | None] = {}
    for url in sorted(bindings):
        try:
            systems = expander.expand(url)
        except NotExpandable as exc:
            print(f"not checked: {url}: {exc}", file=sys.stderr)
            ids[url] = None
            continue
        vs_id = value_set_id(url, value_sets)
        expanded[vs_id] = {system: sorted(codes) for system, codes in systems.items()}
        ids[url] = vs_id
    return expanded, ids


# ---------------------------------------------------------------- patient compartment

WHERE_RESOLVE = re.compile(r"\.where\(resolve\(\) is (\w+)\)$")
AS_SUFFIX = re.compile(r"\.as\((\w+)\)$")
AS_INFIX = re.compile(r"^\((.+) as (\w+)\)$")
PLAIN_PATH = re.compile(r"^[A-Za-z]+(\.[A-Za-z]+)*$")


def expression_paths(expression: str, resource_type: str) -> list[str]:
    """Element paths (relative to resource_type) of a FHIRPath search expression."""
    paths: list[str] = []
    for raw in expression.split("|"):
        part = raw.strip()
        if m := AS_INFIX.match(part):
            part = m.group(1).strip()
        if m := AS_SUFFIX.search(part):
            part = part[: m.start()]
        if m := WHERE_RESOLVE.search(part):
            if m.group(1) != "Patient":
                continue  # this branch only ever points at another resource type
            part = part[: m.start()]
        head, _, rest = part.partition(".")
        if head != resource_type:
            continue  # shared parameters list the expressions of every base
        if not PLAIN_PATH.match(rest):
            raise SystemExit(f"cannot parse search expression part {raw!r}")
        if rest not in paths:
            paths.append(rest)
    return paths


def compile_patient_compartment(source: Path) -> dict[str, list[list[Any]]]:
    with (source / "compartments" / "CompartmentDefinition-patient.json").open(
        encoding="utf-8"
    ) as fh:
        compartment = json.load(fh)
    expressions: dict[tuple[str, str], str] = {}
    for param in load_bundle(source / "search-parameters.json"):
        for base in param.get("base", []):
            if "expression" in param:
                expressions[(base, param["code"])] = param["expression"]
    out: dict[str, list[list[Any]]] = {}
    for entry in compartment["resource"]:
        rows: list[list[Any]] = []
        for code in entry.get("param", []):
            if code == "{def}":
                continue
            expression = expressions.get((entry["code"], code))
            if expression is None:
                raise SystemExit(f"no search parameter {entry['code']}.{code}")
            rows.append([code, expression_paths(expression, entry["code"])])
        if rows:
            out[entry["code"]] = rows
    return out


# ---------------------------------------------------------------- assembly


def check_type_references(tables: dict[str, Json], primitives: dict[str, Json]) -> None:
    for table_name, table in tables.items():
        for prop, entry in table.items():
            type_name = entry[0]
            if type_name not in tables and type_name not in primitives and type_name != "Resource":
                raise SystemExit(f"{table_name}.{prop}: unknown type {type_name}")


def build(source: Path) -> Json:
    type_sds, resource_sds = structure_definitions(source)
    primitives = {
        sd["type"]: primitive_table(sd) for sd in type_sds if sd["kind"] == "primitive-type"
    }
    bindings: dict[str, set[str]] = {}
    tables: dict[str, Json] = {}
    for sd in type_sds:
        if sd["kind"] == "complex-type":
            tables.update(compile_structure(sd, owner_is_resource=False, bindings=bindings))
    resource_types = sorted(
        sd["type"] for sd in resource_sds if sd["kind"] == "resource" and not sd.get("abstract")
    )
    for sd in resource_sds:
        if sd["kind"] == "resource" and not sd.get("abstract"):
            tables.update(compile_structure(sd, owner_is_resource=True, bindings=bindings))
    check_type_references(tables, primitives)

    value_sets, vs_ids = compile_value_sets(source, bindings)
    for table in tables.values():
        for entry in table.values():
            entry[2] = vs_ids.get(entry[2]) if entry[2] else None
            while entry and entry[-1] is None:
                entry.pop()  # trailing nulls carry nothing; keeps the file small

    return {
        "format": FORMAT,
        "fhirVersion": FHIR_VERSION,
        "source": SOURCE,
        "resourceTypes": resource_types,
        "primitives": primitives,
        "tables": tables,
        "valueSets": value_sets,
        "patientCompartment": compile_patient_compartment(source),
    }


def write(data: Json, out: Path) -> int:
    raw = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    buffer = io.BytesIO()
    # mtime=0 and no file name in the header: identical input gives identical bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--source", type=Path, required=True, help="folder with the R4 definition files"
    )
    parser.add_argument("--out", type=Path, required=True, help="output .json.gz")
    args = parser.parse_args(argv)
    data = build(args.source)
    size = write(data, args.out)
    print(
        f"wrote {args.out}: {size} bytes, {len(data['resourceTypes'])} resource types, "
        f"{len(data['tables'])} element tables, {len(data['valueSets'])} value sets",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
