#!/usr/bin/env python3
"""Compile the R4 (4.0.1) CodeSystems and ValueSets into fhirvault's vendored terminology file.

Run by developers, never at install, run or test time:

    python scripts/gen_terminology.py --source /work/shared/fhir-r4 \
        --out src/fhirvault/domain/r4/valuesets.json.gz

Source: Bundle-valuesets.json of the npm package hl7.fhir.r4.examples@4.0.1 (HL7, CC0-1.0).
Output (gzip-compressed JSON): {"format", "fhirVersion", "source", "resources": [...]} where each
resource is a CodeSystem or ValueSet reduced to what the terminology operations use (no
narrative, contacts, extensions or pre-computed expansions). The file is deterministic.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
from pathlib import Path
from typing import Any

FORMAT = 1
FHIR_VERSION = "4.0.1"
SOURCE = "hl7.fhir.r4.examples@4.0.1 Bundle-valuesets.json (HL7, CC0-1.0)"

KEEP = ("resourceType", "id", "url", "version", "name", "title", "status", "content", "caseSensitive",
        "hierarchyMeaning", "valueSet", "supplements", "property", "filter", "compose", "concept")


def _strip(value: Any) -> Any:
    """Drops extensions everywhere (display-language hints, comments, standards status)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in ("extension", "modifierExtension")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def reduce(resource: dict[str, Any]) -> dict[str, Any]:
    return _strip({k: resource[k] for k in KEEP if k in resource})


def build(source: Path) -> dict[str, Any]:
    with (source / "Bundle-valuesets.json").open(encoding="utf-8") as fh:
        bundle = json.load(fh)
    resources = [reduce(e["resource"]) for e in bundle.get("entry", [])
                 if e.get("resource", {}).get("resourceType") in ("CodeSystem", "ValueSet")]
    resources.sort(key=lambda r: (r["resourceType"], r["url"]))
    return {"format": FORMAT, "fhirVersion": FHIR_VERSION, "source": SOURCE, "resources": resources}


def write(data: dict[str, Any], out: Path) -> None:
    raw = json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    out.write_bytes(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="directory holding Bundle-valuesets.json")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    data = build(args.source)
    write(data, args.out)
    kinds = [r["resourceType"] for r in data["resources"]]
    print(f"{args.out}: {kinds.count('CodeSystem')} code systems, {kinds.count('ValueSet')} value sets, "
          f"{args.out.stat().st_size} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
