"""A structural check of an International Patient Summary document Bundle.

The IPS IG's profiles are not vendored, so this checks the IPS constraints that can be checked
without them (each issue names the rule):

- bundle: Bundle.type = document; identifier (system and value) and timestamp present; every
  entry has a fullUrl, unique in the Bundle, and a resource (Bundle-uv-ips, bdl-9, bdl-10, bdl-7)
- first entry: a Composition (bdl-11), status present, type = LOINC 60591-5, title, date, author
  (1..*), subject resolving inside the Bundle to a Patient (Composition-uv-ips)
- sections: the required ones (problems 11450-4, allergies 48765-2, medications 10160-0) present
  exactly once; every section has a title, a LOINC code and a narrative (text.div); entries or an
  emptyReason, never both (cmp-2) and never neither (IPS: a section with no entry says why);
  every entry reference resolves inside the Bundle to a resource of a type the section allows
  (section slices of Composition-uv-ips), and that resource is about the document's patient
- references: every reference of every resource that is not resolvable inside the Bundle is
  reported as a warning (documents should be self-contained; a stored Encounter or Practitioner
  not copied into the document is the usual cause)

Not checked: the IPS profiles of each entry (Condition-uv-ips and the others: required codes,
must-support elements, value set bindings to SNOMED CT/LOINC), terminology bindings and FHIRPath
invariants beyond the above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhirvault.domain.ips import IPS_TYPE, LOINC, SECTIONS, references

__all__ = ["IpsIssue", "check_ips"]

Json = dict[str, Any]
_ALLOWED = {s.code: set(s.types) for s in SECTIONS}
_REQUIRED = [s.code for s in SECTIONS if s.required]


@dataclass(frozen=True)
class IpsIssue:
    severity: str  # error | warning
    rule: str
    message: str


class _Resolver:
    def __init__(self, entries: list[Json]) -> None:
        self.by_url: dict[str, Json] = {}
        for e in entries:
            if isinstance(e.get("fullUrl"), str) and isinstance(e.get("resource"), dict):
                self.by_url[e["fullUrl"]] = e["resource"]

    def resolve(self, ref: str, from_url: str) -> Json | None:
        if ref in self.by_url:
            return self.by_url[ref]
        if "://" not in ref and not ref.startswith("urn:"):
            # a relative reference resolves against the base of the referring entry's fullUrl (FHIR 3.3.1)
            parts = from_url.rsplit("/", 2)
            if len(parts) == 3 and "://" in parts[0]:
                return self.by_url.get(f"{parts[0]}/{ref.split('/_history/')[0]}")
        return None


def check_ips(bundle: Any) -> list[IpsIssue]:
    issues: list[IpsIssue] = []

    def err(rule: str, message: str) -> None:
        issues.append(IpsIssue("error", rule, message))

    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        return [IpsIssue("error", "Bundle", "not a Bundle")]
    if bundle.get("type") != "document":
        err("Bundle-uv-ips", "Bundle.type must be 'document'")
    ident = bundle.get("identifier")
    if not isinstance(ident, dict) or not ident.get("system") or not ident.get("value"):
        err("bdl-9", "a document Bundle needs an identifier with system and value")
    if not bundle.get("timestamp"):
        err("bdl-10", "a document Bundle needs a timestamp")
    entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)]
    urls = [e.get("fullUrl") for e in entries]
    if any(not isinstance(u, str) for u in urls) or any(not isinstance(e.get("resource"), dict) for e in entries):
        err("bdl-7", "every entry needs a fullUrl and a resource")
    if len(set(urls)) != len(urls):
        err("bdl-7", "fullUrls must be unique in the Bundle")
    if not entries or (entries[0].get("resource") or {}).get("resourceType") != "Composition":
        err("bdl-11", "the first entry must be a Composition")
        return issues
    resolver = _Resolver(entries)
    comp, comp_url = entries[0]["resource"], str(entries[0].get("fullUrl"))
    if not comp.get("status"):
        err("Composition-uv-ips", "Composition.status is required")
    if not any(c.get("system") == LOINC and c.get("code") == IPS_TYPE
               for c in (comp.get("type") or {}).get("coding") or [] if isinstance(c, dict)):
        err("Composition-uv-ips", "Composition.type must be LOINC 60591-5 (Patient summary Document)")
    for name in ("title", "date"):
        if not comp.get(name):
            err("Composition-uv-ips", f"Composition.{name} is required")
    authors = comp.get("author") or []
    if not authors:
        err("Composition-uv-ips", "Composition.author is required")
    for a in authors:
        if resolver.resolve(str((a or {}).get("reference")), comp_url) is None:
            err("Composition-uv-ips", "Composition.author does not resolve inside the Bundle")
    subject_ref = (comp.get("subject") or {}).get("reference")
    patient = resolver.resolve(str(subject_ref), comp_url) if subject_ref else None
    if patient is None or patient.get("resourceType") != "Patient":
        err("Composition-uv-ips", "Composition.subject must resolve inside the Bundle to a Patient")
    url_of = {id(e["resource"]): str(e.get("fullUrl")) for e in entries if isinstance(e.get("resource"), dict)}
    codes = []
    for i, section in enumerate(comp.get("section") or []):
        where = f"section[{i}]"
        code = next((c.get("code") for c in (section.get("code") or {}).get("coding") or []
                     if isinstance(c, dict) and c.get("system") == LOINC), None)
        codes.append(code)
        if not section.get("title") or code is None:
            err("Composition-uv-ips", f"{where} needs a title and a LOINC code")
        if not (section.get("text") or {}).get("div"):
            err("Composition-uv-ips", f"{where} needs a narrative (text.div)")
        refs = section.get("entry") or []
        if refs and section.get("emptyReason"):
            err("cmp-2", f"{where} has entries and an emptyReason")
        if not refs and not section.get("emptyReason"):
            err("Composition-uv-ips", f"{where} has no entry and no emptyReason")
        for ref in refs:
            target = resolver.resolve(str((ref or {}).get("reference")), comp_url)
            if target is None:
                err("Composition-uv-ips", f"{where}.entry does not resolve inside the Bundle")
                continue
            if code in _ALLOWED and target.get("resourceType") not in _ALLOWED[code]:
                err("Composition-uv-ips", f"{where} (LOINC {code}) may not hold a {target.get('resourceType')}")
            about = (target.get("subject") or target.get("patient") or {}).get("reference")
            if patient is not None and (not isinstance(about, str)
                                        or resolver.resolve(about, url_of.get(id(target), "")) is not patient):
                err("Composition-uv-ips", f"{where}.entry is not about the document's patient")
    for code in _REQUIRED:
        if codes.count(code) != 1:
            err("Composition-uv-ips", f"the required section LOINC {code} must be present exactly once")
    for e in entries:
        for ref in references(e.get("resource")):
            if resolver.resolve(ref, str(e.get("fullUrl"))) is None:
                issues.append(IpsIssue("warning", "document", f"{e.get('fullUrl')}: reference {ref} does not "
                                                              "resolve inside the Bundle"))
    return issues
