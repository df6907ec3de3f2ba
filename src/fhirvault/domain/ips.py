"""International Patient Summary (IPS): a FHIR document Bundle built from a patient's stored record.

Pure: the caller gives the Patient and the resources of its compartment (already authorised);
this module sorts them into the IPS sections, writes each section's narrative and the Composition,
and assembles the document Bundle. Sections follow the IPS IG (hl7.fhir.uv.ips): the three
required ones always, the optional ones when the record has data for them. A required section
without entries carries an ``emptyReason`` (list-empty-reason) and a narrative saying so: this
server only knows what was stored, so it says "unavailable" (or "withheld" when the caller's
token may not read that resource type), never "no known allergies".
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["LOINC", "SECTIONS", "Section", "build_document", "references", "section_of"]

LOINC = "http://loinc.org"
IPS_TYPE = "60591-5"
EMPTY_REASON = "http://terminology.hl7.org/CodeSystem/list-empty-reason"
IPS_BUNDLE_PROFILE = "http://hl7.org/fhir/uv/ips/StructureDefinition/Bundle-uv-ips"
Json = dict[str, Any]


def _category(resource: Json, code: str) -> bool:
    return any(c.get("code") == code for cc in resource.get("category") or [] if isinstance(cc, dict)
               for c in cc.get("coding") or [] if isinstance(c, dict))


def _status(resource: Json, element: str) -> str | None:
    value = resource.get(element)
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for c in value.get("coding") or []:
            if isinstance(c, dict) and isinstance(c.get("code"), str):
                return str(c["code"])
    return None


def _current_problem(r: Json) -> bool:
    return _status(r, "clinicalStatus") not in ("inactive", "resolved", "remission")


@dataclass(frozen=True)
class Section:
    key: str
    code: str  # LOINC
    title: str
    required: bool
    types: tuple[str, ...]
    accepts: Callable[[Json], bool] = lambda r: True


SECTIONS: tuple[Section, ...] = (
    Section("problems", "11450-4", "Problem List", True, ("Condition",), _current_problem),
    Section("allergies", "48765-2", "Allergies and Intolerances", True, ("AllergyIntolerance",)),
    Section("medications", "10160-0", "Medication Summary", True, ("MedicationStatement", "MedicationRequest")),
    Section("immunizations", "11369-6", "Immunizations", False, ("Immunization",)),
    Section("results", "30954-2", "Results", False, ("Observation", "DiagnosticReport"),
            lambda r: r["resourceType"] == "DiagnosticReport" or _category(r, "laboratory") or _category(r, "imaging")),
    Section("vital-signs", "8716-3", "Vital Signs", False, ("Observation",), lambda r: _category(r, "vital-signs")),
    Section("procedures", "47519-4", "History of Procedures", False, ("Procedure",)),
    Section("devices", "46264-8", "Medical Devices", False, ("DeviceUseStatement",)),
    Section("past-illness", "11348-0", "History of Past Illness", False, ("Condition",),
            lambda r: not _current_problem(r)),
    Section("plan-of-care", "18776-5", "Plan of Care", False, ("CarePlan",),
            lambda r: r.get("status") in ("active", "on-hold", "draft")),
    Section("social-history", "29762-2", "Social History", False, ("Observation",),
            lambda r: _category(r, "social-history")),
)
SECTION_TYPES = frozenset(t for s in SECTIONS for t in s.types)


def section_of(resource: Json) -> Section | None:
    """The first section that takes ``resource`` (entered-in-error records go nowhere)."""
    if resource.get("status") == "entered-in-error" or _status(resource, "verificationStatus") == "entered-in-error":
        return None
    for s in SECTIONS:
        if resource.get("resourceType") in s.types and s.accepts(resource):
            return s
    return None


def references(value: Any) -> list[str]:
    """Every Reference.reference inside ``value`` (not in contained resources or narrative; not local '#')."""
    out: list[str] = []
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and not ref.startswith("#"):
            out.append(ref)
        for k, v in value.items():
            if k not in ("contained", "text"):
                out.extend(references(v))
    elif isinstance(value, list):
        for v in value:
            out.extend(references(v))
    return out


def _label(r: Json, known: dict[str, Json] | None = None) -> str:
    """A short human label for the narrative: the code's text or display (a referenced Medication's for
    a medicationReference), else the resource type."""
    for key in ("code", "medicationCodeableConcept", "vaccineCode", "type"):
        value = r.get(key)
        if isinstance(value, dict):
            if isinstance(value.get("text"), str):
                return str(value["text"])
            for c in value.get("coding") or []:
                if isinstance(c, dict) and isinstance(c.get("display"), str):
                    return str(c["display"])
    med = r.get("medicationReference") or {}
    if isinstance(med.get("display"), str):
        return str(med["display"])
    if known and isinstance(med.get("reference"), str) and med["reference"] in known:
        return _label(known[med["reference"]])
    return str(r.get("resourceType", "entry"))


def _narrative(items: list[str]) -> Json:
    body = "".join(f"<li>{html.escape(i, quote=False)}</li>" for i in items)
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><ul>{body}</ul></div>'}


def _empty_text(title: str, reason: str) -> Json:
    said = ("this information is withheld from the requester" if reason == "withheld"
            else "no information is recorded on this server")
    text = html.escape(f"{title}: {said}.", quote=False)
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{text}</p></div>'}


def build_document(patient: Json, resources: list[Json], *, base_url: str, timestamp: str, document_id: str,
                   composition_id: str, author_id: str, withheld_types: frozenset[str] = frozenset(),
                   extra: list[Json] | None = None) -> Json:
    """The IPS document Bundle. ``resources`` are the patient's (each with resourceType and id);
    ``extra`` are resources they reference that belong in the document but in no section
    (e.g. Medication). ``document_id``, ``composition_id`` and ``author_id`` are UUIDs (Bundle, Composition, author Device)."""
    pid = patient["id"]
    grouped: dict[str, list[Json]] = {s.key: [] for s in SECTIONS}
    for r in resources:
        s = section_of(r)
        if s is not None:
            grouped[s.key].append(r)
    author_url = f"urn:uuid:{author_id}"
    known = {f"{r['resourceType']}/{r['id']}": r for r in extra or []}
    sections: list[Json] = []
    for s in SECTIONS:
        entries = grouped[s.key]
        if not entries and not s.required:
            continue
        section: Json = {"title": s.title, "code": {"coding": [{"system": LOINC, "code": s.code}]}}
        if entries:
            section["text"] = _narrative([_label(r, known) for r in entries])
            # absolute: the Composition's fullUrl is a urn:uuid, against which relative references do not resolve
            section["entry"] = [{"reference": f"{base_url}/{r['resourceType']}/{r['id']}"} for r in entries]
        else:
            reason = "withheld" if withheld_types & set(s.types) else "unavailable"
            section["text"] = _empty_text(s.title, reason)
            display = "Information Withheld" if reason == "withheld" else "Unavailable"
            section["emptyReason"] = {"coding": [{"system": EMPTY_REASON, "code": reason, "display": display}]}
        sections.append(section)
    composition: Json = {
        "resourceType": "Composition",
        "id": composition_id,
        "status": "final",
        "type": {"coding": [{"system": LOINC, "code": IPS_TYPE, "display": "Patient summary Document"}]},
        "subject": {"reference": f"{base_url}/Patient/{pid}"},
        "date": timestamp,
        "author": [{"reference": author_url}],
        "title": "International Patient Summary",
        "section": sections,
    }
    author = {"resourceType": "Device", "id": author_id,
              "deviceName": [{"name": "fhirvault", "type": "manufacturer-name"}]}

    def entry(r: Json) -> Json:
        return {"fullUrl": f"{base_url}/{r['resourceType']}/{r['id']}", "resource": r}

    in_sections = [r for s in SECTIONS for r in grouped[s.key]]
    return {
        "resourceType": "Bundle",
        "id": document_id,
        "meta": {"profile": [IPS_BUNDLE_PROFILE]},
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{document_id}"},
        "type": "document",
        "timestamp": timestamp,
        "entry": [
            {"fullUrl": f"urn:uuid:{composition_id}", "resource": composition},
            entry(patient),
            {"fullUrl": author_url, "resource": author},
            *(entry(r) for r in in_sections),
            *(entry(r) for r in extra or []),
        ],
    }
