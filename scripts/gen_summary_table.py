"""Generate src/fhirvault/domain/r4/summary_elements.json.gz from the official R4 StructureDefinitions.

For every resource type: the top-level JSON properties marked isSummary (choice elements expanded
to their concrete names, e.g. deceasedBoolean/deceasedDateTime), used by _summary=true. Also the
mandatory (min ≥ 1) top-level elements, which _elements and _summary=true always keep.

    python scripts/gen_summary_table.py --source ../shared/fhir-r4 --out src/fhirvault/domain/r4/summary_elements.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path


def _names(element: dict, prefix: str) -> list[str]:
    name = element["path"][len(prefix):]
    if not name.endswith("[x]"):
        return [name]
    base = name[:-3]
    return [base + t["code"][0].upper() + t["code"][1:] for t in element.get("type", [])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    bundle = json.loads((args.source / "Bundle-resources.json").read_text())
    table: dict[str, dict[str, list[str]]] = {}
    for entry in bundle["entry"]:
        sd = entry["resource"]
        if sd.get("resourceType") != "StructureDefinition" or sd.get("kind") != "resource" or sd.get("abstract"):
            continue
        rtype = sd["type"]
        prefix = rtype + "."
        summary: set[str] = set()
        mandatory: set[str] = set()
        for el in sd["snapshot"]["element"]:
            path = el["path"]
            if not path.startswith(prefix) or "." in path[len(prefix):]:
                continue
            names = _names(el, prefix)
            if el.get("isSummary"):
                summary.update(names)
            if el.get("min", 0) >= 1:
                mandatory.update(names)
        table[rtype] = {"summary": sorted(summary), "mandatory": sorted(mandatory)}
    data = json.dumps(table, sort_keys=True, separators=(",", ":")).encode()
    args.out.write_bytes(gzip.compress(data, mtime=0))
    print(f"{len(table)} resource types, {len(data)} bytes of JSON, {args.out.stat().st_size} gzipped")


if __name__ == "__main__":
    main()
