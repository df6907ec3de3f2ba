"""Which patient compartment a resource belongs to (R4 patient CompartmentDefinition).

The answer picks the data key a resource version is encrypted with. A resource
that references several patients is filed under the first one found, in the
CompartmentDefinition's parameter order (e.g. ``subject`` before ``performer``).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any

from fhirvault.domain.r4 import patient_compartment_paths


def _values(node: Any, parts: list[str]) -> Iterator[Any]:
    if not parts:
        yield node
        return
    if isinstance(node, list):
        for item in node:
            yield from _values(item, parts)
        return
    if isinstance(node, dict):
        child = node.get(parts[0])
        if child is not None:
            yield from _values(child, parts[1:])


def patient_id_from_reference(reference: str) -> str | None:
    """The id in ``Patient/123``, ``Patient/123/_history/2`` or ``https://host/fhir/Patient/123``."""
    parts = reference.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return parts[-1]
    return None


@cache
def _paths(resource_type: str) -> tuple[list[str], ...]:
    return tuple(list(p) for p in patient_compartment_paths(resource_type))


def patient_of(resource_type: str, resource: dict[str, Any]) -> str | None:
    if resource_type == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) else None
    for path in _paths(resource_type):
        for value in _values(resource, path):
            ref = value.get("reference") if isinstance(value, dict) else None
            if isinstance(ref, str):
                pid = patient_id_from_reference(ref)
                if pid is not None:
                    return pid
    return None
