"""``_summary`` and ``_elements``: which top-level elements a response keeps.

Driven by a table generated from the R4 StructureDefinitions
(``scripts/gen_summary_table.py``): the elements marked isSummary, and the
mandatory ones that every subset keeps. Subsetting applies to top-level
elements; a subsetted resource is tagged SUBSETTED as R4 requires.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from importlib import resources
from typing import Any

_ALWAYS = ("resourceType", "id", "meta")
_SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED",
              "display": "subsetted"}


@cache
def _table() -> dict[str, dict[str, frozenset[str]]]:
    raw = resources.files("fhirvault.domain.r4").joinpath("summary_elements.json.gz").read_bytes()
    data = json.loads(gzip.decompress(raw))
    return {t: {k: frozenset(v) for k, v in d.items()} for t, d in data.items()}


def _mark_subsetted(out: dict[str, Any]) -> dict[str, Any]:
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), _SUBSETTED]
    out["meta"] = meta
    return out


def summary(resource: dict[str, Any], mode: str) -> dict[str, Any]:
    """Apply _summary=true|text|data (false: unchanged)."""
    if mode == "false":
        return resource
    rtype = str(resource.get("resourceType"))
    entry = _table().get(rtype, {})
    if mode == "true":
        keep = entry.get("summary", frozenset()) | entry.get("mandatory", frozenset())
        out = {k: v for k, v in resource.items() if k in keep or k in _ALWAYS or k.lstrip("_") in keep}
    elif mode == "text":
        keep = frozenset({"text"}) | entry.get("mandatory", frozenset())
        out = {k: v for k, v in resource.items() if k in keep or k in _ALWAYS}
    else:  # data
        out = {k: v for k, v in resource.items() if k != "text"}
    return _mark_subsetted(out)


def elements(resource: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Apply _elements=a,b,c (mandatory elements are always kept)."""
    rtype = str(resource.get("resourceType"))
    keep = set(names) | _table().get(rtype, {}).get("mandatory", frozenset())
    return _mark_subsetted({k: v for k, v in resource.items() if k in keep or k in _ALWAYS or k.lstrip("_") in keep})
