"""Throughput of the FHIR XML conversion (fhirvault.fhir.xml) on the vendored official R4 examples.

Run: .venv/bin/python bench/xml_convert.py [--seconds 0.5]
Prints, per example, XML -> JSON (parse, check, convert) and JSON -> XML (serialise) rates.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from fhirvault.fhir.xml import json_to_xml, xml_to_json

EXAMPLES = Path(__file__).resolve().parents[1] / "tests" / "data" / "fhir-r4-xml"


def rate(fn: Callable[[], object], seconds: float) -> float:
    fn()  # warm the table caches
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args()
    for path in sorted(EXAMPLES.glob("*.xml")):
        xml = path.read_bytes()
        as_json = xml_to_json(xml)
        to_json = rate(lambda xml=xml: xml_to_json(xml), args.seconds)
        to_xml = rate(lambda as_json=as_json: json_to_xml(as_json), args.seconds)
        print(f"{path.stem:32} {len(xml):7,} B  XML->JSON {to_json:8,.0f}/s  JSON->XML {to_xml:8,.0f}/s")


if __name__ == "__main__":
    main()
