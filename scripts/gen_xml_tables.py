#!/usr/bin/env python3
"""Compile the element order of the FHIR R4 (4.0.1) types for the XML format.

Run by developers, never at install, run or test time:

    python scripts/gen_xml_tables.py --source /work/shared/fhir-r4 \
        --out src/fhirvault/domain/r4/xml_order.json.gz

XML is order-sensitive where JSON is not: every element must come in the order of its
definition. definitions.json.gz (scripts/gen_r4_tables.py) keeps types and cardinalities
with sorted keys; this table keeps, for the same type and backbone names, the JSON property
names in definition order (choice elements expanded: valueQuantity, valueString, ...).

Output (gzip-compressed JSON): format, fhirVersion, source,
    order   type or backbone path -> [property, ...] in definition order
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gen_r4_tables import (
    FHIR_VERSION,
    SOURCE,
    Json,
    compile_structure,
    structure_definitions,
    write,
)

FORMAT = 1


def build(source: Path) -> Json:
    type_sds, resource_sds = structure_definitions(source)
    order: dict[str, list[str]] = {}
    for sd in type_sds:
        if sd["kind"] == "complex-type":
            for name, table in compile_structure(sd, owner_is_resource=False, bindings={}).items():
                order[name] = list(table)  # dicts keep the snapshot's element order
    for sd in resource_sds:
        if sd["kind"] == "resource" and not sd.get("abstract"):
            for name, table in compile_structure(sd, owner_is_resource=True, bindings={}).items():
                order[name] = list(table)
    return {"format": FORMAT, "fhirVersion": FHIR_VERSION, "source": SOURCE, "order": order}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--source", type=Path, required=True, help="folder with the R4 definition files")
    parser.add_argument("--out", type=Path, required=True, help="output .json.gz")
    args = parser.parse_args(argv)
    data = build(args.source)
    # write() sorts the keys of objects; the order lists are arrays, so they keep their order.
    size = write(data, args.out)
    print(f"wrote {args.out}: {size} bytes, {len(data['order'])} element orders", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
