#!/usr/bin/env python3
"""The cost of the bundled terminology: data file size, first $expand (cold) and memory.

    .venv/bin/python bench/terminology_first_expand.py
"""

from __future__ import annotations

import resource
import time
from importlib import resources as files


def main() -> None:
    size = files.files("fhirvault.domain.r4").joinpath("valuesets.json.gz").read_bytes()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    from fhirvault.domain.terminology import Terminology
    from fhirvault.services.terminology import base_resources

    terms = Terminology(base_resources())
    gender = terms.value_set("http://hl7.org/fhir/ValueSet/administrative-gender")
    terms.expand(gender, timestamp="t", identifier="i")
    t1 = time.perf_counter()
    terms.expand(terms.value_set("http://hl7.org/fhir/ValueSet/condition-clinical"), timestamp="t", identifier="i")
    t2 = time.perf_counter()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"valuesets.json.gz: {len(size)} bytes; first $expand (load + index + expand): {(t1 - t0) * 1000:.0f} ms; "
          f"next $expand: {(t2 - t1) * 1000:.1f} ms; max RSS +{(rss1 - rss0) / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
