"""Which patient compartment a resource belongs to (R4 patient CompartmentDefinition).

The answer picks the data key a resource version is encrypted with. A resource
that references several patients is filed under the first one found, in the
CompartmentDefinition's parameter order (e.g. ``subject`` before ``performer``).
The compartment's parameters are search parameters, so their values are read
with the search layer's compiled extractors (one path walker, one reference
parser for the whole domain).
"""

from __future__ import annotations

from typing import Any

from fhirvault.domain.r4 import patient_compartment_params
from fhirvault.domain.search.params import search_params
from fhirvault.domain.search.values import RefItem, extract, parse_reference


def patient_id_from_reference(reference: str) -> str | None:
    """The id in ``Patient/123``, ``Patient/123/_history/2`` or ``https://host/fhir/Patient/123``."""
    item = parse_reference(reference)
    return item.id if item is not None and item.type == "Patient" else None


def patient_of(resource_type: str, resource: dict[str, Any]) -> str | None:
    if resource_type == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) else None
    params = search_params(resource_type)
    for code, _paths in patient_compartment_params(resource_type):
        param = params.get(code)
        if param is None:
            continue
        for item in extract(param, resource):
            if isinstance(item, RefItem) and item.type == "Patient" and item.id:
                return item.id
    return None


def patients_referenced(resource_type: str, resource: dict[str, Any]) -> set[str]:
    """Every patient whose compartment the resource belongs to: not only the one it is filed under
    (``Observation.performer``, ``Patient.link`` also put it in another patient's compartment)."""
    out: set[str] = set()
    params = search_params(resource_type)
    for code, _paths in patient_compartment_params(resource_type):
        param = params.get(code)
        if param is None:
            continue
        for item in extract(param, resource):
            if isinstance(item, RefItem) and item.type == "Patient" and item.id:
                out.add(item.id)
    return out
