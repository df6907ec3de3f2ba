"""French national health identity (INS, Identité Nationale de Santé) on Patient resources.

The INS number ("matricule INS") is the NIR (OID 1.2.250.1.213.1.4.8) or, for people not yet
registered, the NIA (1.2.250.1.213.1.4.9) — or the ANS test (.10) and demonstration (.11) NIRs —, carried as ``identifier.system = urn:oid:...`` with the
15-character value: 13 characters (digits; the department, characters 6-7, may be 2A or 2B for
Corsica) and a 2-digit key = 97 - (number mod 97), where 2A counts as 19 and 2B as 18.

The identity status follows ANS FR Core: extension ``fr-core-identity-reliability`` with the
sub-extensions ``identityStatus`` (PROV provisional, RECUP retrieved, VALI validated, QUAL
qualified — the four RNIV statuses), ``methodCollection``, ``dateCollection`` (date the INSi
teleservice was queried), ``validationMode`` (identity document checked) and ``validationDate``.
A qualified identity (QUAL) is INSi-retrieved *and* checked against an identity document, so
QUAL is refused unless the patient has a valid INS identifier, a dateCollection, a validationMode
and a validationDate.

Messages give paths, never the number: INS values are patient data.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["NIA_SYSTEM", "NIR_SYSTEM", "RELIABILITY_URL", "ins_issues", "valid_ins"]

NIR_SYSTEM = "urn:oid:1.2.250.1.213.1.4.8"
NIA_SYSTEM = "urn:oid:1.2.250.1.213.1.4.9"
# The ANS test and demonstration numbers (fictitious patients) have the same format and key.
NIR_TEST_SYSTEM = "urn:oid:1.2.250.1.213.1.4.10"
NIR_DEMO_SYSTEM = "urn:oid:1.2.250.1.213.1.4.11"
INS_SYSTEMS = {NIR_SYSTEM: "INS-NIR", NIA_SYSTEM: "INS-NIA", NIR_TEST_SYSTEM: "INS-NIR-TEST",
               NIR_DEMO_SYSTEM: "INS-NIR-DEMO"}
IDENTIFIER_TYPES = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"
RELIABILITY_URL = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability"
STATUS_SYSTEMS = frozenset({"https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0445",
                            "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-identity-status"})
STATUSES = frozenset({"PROV", "RECUP", "VALI", "QUAL"})
QUALIFIED_NEEDS = ("dateCollection", "validationMode", "validationDate")

_FORMAT = re.compile(r"[0-9]{5}(?:[0-9]{2}|2A|2B)[0-9]{6}[0-9]{2}", re.ASCII)

Issue = tuple[str, str, str]  # (path, FHIR issue code, message)


def valid_ins(value: Any) -> bool:
    """True when ``value`` is a 15-character INS (NIR or NIA) whose key matches."""
    if not isinstance(value, str) or not _FORMAT.fullmatch(value):
        return False
    number = value[:13].replace("2A", "19", 1) if value[5:7] == "2A" else value[:13]
    if value[5:7] == "2B":
        number = value[:5] + "18" + value[7:13]
    return 97 - int(number) % 97 == int(value[13:])


def _coding_codes(concept: Any, system: str | frozenset[str]) -> list[str]:
    systems = {system} if isinstance(system, str) else system
    if not isinstance(concept, dict):
        return []
    return [str(c.get("code")) for c in concept.get("coding") or []
            if isinstance(c, dict) and c.get("system") in systems]


def ins_issues(patient: dict[str, Any]) -> list[Issue]:
    """INS problems of a Patient resource (empty when it has none or is fine)."""
    issues: list[Issue] = []
    has_ins = False
    for i, ident in enumerate(patient.get("identifier") or []):
        if not isinstance(ident, dict) or ident.get("system") not in INS_SYSTEMS:
            continue
        path = f"Patient.identifier[{i}]"
        kind = INS_SYSTEMS[ident["system"]].removeprefix("INS-")
        if not valid_ins(ident.get("value")):
            issues.append((f"{path}.value", "value",
                           f"Not a valid INS ({kind}): 13 characters (digits, 2A/2B for Corsica) and a 2-digit key "
                           "equal to 97 - (number mod 97)."))
        else:
            has_ins = True
        types = _coding_codes(ident.get("type"), IDENTIFIER_TYPES)
        if any(t in INS_SYSTEMS.values() and t != INS_SYSTEMS[ident["system"]] for t in types):
            issues.append((f"{path}.type", "invalid", f"The identifier type does not match the {kind} system."))
    reliability = [(i, e) for i, e in enumerate(patient.get("extension") or [])
                   if isinstance(e, dict) and e.get("url") == RELIABILITY_URL]
    if len(reliability) > 1:
        issues.append(("Patient.extension", "invalid", "At most one fr-core-identity-reliability extension."))
    for i, ext in reliability:
        path = f"Patient.extension[{i}]"
        parts: dict[str, Any] = {}
        for sub in ext.get("extension") or []:
            if isinstance(sub, dict) and isinstance(sub.get("url"), str):
                parts[sub["url"]] = next((v for k, v in sub.items() if k.startswith("value")), None)
        coding = parts.get("identityStatus")  # a Coding (FR Core: value[x] only Coding)
        status = _coding_codes({"coding": [coding]}, STATUS_SYSTEMS)
        if "identityStatus" in parts and (len(status) != 1 or status[0] not in STATUSES):
            issues.append((f"{path}.extension", "code-invalid",
                           "identityStatus must be one coding PROV, RECUP, VALI or QUAL (FR Core identity status)."))
        if status == ["QUAL"]:
            missing = [n for n in QUALIFIED_NEEDS if not parts.get(n)]
            if not has_ins:
                missing.insert(0, "a valid INS identifier (NIR or NIA)")
            if missing:
                issues.append((f"{path}.extension", "business-rule",
                               "A qualified identity (QUAL) must have been retrieved from INSi and checked against "
                               "an identity document; missing: " + ", ".join(missing) + "."))
    return issues
