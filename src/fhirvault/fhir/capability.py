"""The CapabilityStatement: exactly what this server supports, no more."""

from __future__ import annotations

from typing import Any

from fhirvault import __version__
from fhirvault.domain.search.params import search_params
from fhirvault.domain.subscription import REST_HOOK

INSTANCE_INTERACTIONS = ["read", "vread", "update", "patch", "delete", "history-instance"]
TYPE_INTERACTIONS = ["create", "search-type", "history-type"]
SEARCH_DOC = (
    "Search runs on blind indexes (keyed HMAC tags, no plaintext in the database); every candidate is decrypted "
    "and verified. Modifiers: :missing (all), :exact (string), :not and :of-type (token), :identifier and "
    ":[type] (reference), :above/:below (uri). Refused: :contains and :text (would need n-gram indexes that "
    "leak too much), :in/:not-in and token :above/:below (value set membership is not searched over the blind "
    "indexes). Chaining and _has are "
    "supported. Limits: 10,000 resources scanned when no criterion can use the index, 20,000 candidates "
    "verified per request, _sort on at most 1,000 matches, 1,000 included resources."
)


def _search_params(rtype: str) -> list[dict[str, Any]]:
    out = []
    for code, param in sorted(search_params(rtype).items()):
        entry: dict[str, Any] = {"name": code, "type": param.type}
        if param.url:
            entry["definition"] = param.url
        out.append(entry)
    return out


def _includes(rtype: str) -> list[str]:
    return sorted(f"{rtype}:{code}" for code, p in search_params(rtype).items() if p.type == "reference")


# AuditEvent is served from the audit trail (services/audit_query.py), read-only.
AUDIT_SEARCH_PARAMS = ("action", "agent", "date", "entity", "outcome", "patient", "subtype")
AUDIT_DOC = (
    "Served from the server's tamper-evident audit trail (IHE BALP AuditEvents); the server alone writes it. "
    "Search: repeated parameters AND, comma-separated values OR; _count, _sort=date|-date (default -date) "
    "and an opaque _cursor for paging. Reading the trail is itself audited."
)
ACCESS_HISTORY = {
    "name": "access-history",
    "definition": "urn:fhirvault:OperationDefinition/Patient-access-history",
    "documentation": "GET Patient/[id]/$access-history: a searchset of the accesses to this patient's record "
                     "(who by role and organisation, what, when, why). Parameters: date, action, outcome, "
                     "_count, _sort, _cursor.",
}

SUMMARY = {
    "name": "summary",
    "definition": "http://hl7.org/fhir/uv/ips/OperationDefinition/summary",
    "documentation": "GET Patient/[id]/$summary or Patient/$summary?identifier=system|value: an International "
                     "Patient Summary document Bundle built from the stored record (problems, allergies, medications "
                     "always; immunizations, results, vital signs, procedures, devices, past illness, plan of care, "
                     "social history when recorded). Authorised and audited like $everything (docs/ips.md).",
}

BREAK_GLASS = {
    "name": "break-glass",
    "definition": "urn:fhirvault:OperationDefinition/Patient-break-glass",
    "documentation": "POST Patient/[id]/$break-glass with Parameters reason (string, at least 10 characters) and "
                     "purposeOfUse (ETREAT): emergency access of a practitioner or nurse without a care "
                     "relationship, for a limited time; every access is recorded as ETREAT, the security "
                     "officer is alerted and reviews the case (docs/access-control.md).",
}

_LIFECYCLE_DOC = ("Parameters reason (string, 10 to 2000 characters); only for tokens with the "
                  "fhirvault/lifecycle.write scope (backend service, security officer or platform admin); audited "
                  "(docs/data-lifecycle.md).")
LIFECYCLE = [
    {"name": "erase", "definition": "urn:fhirvault:OperationDefinition/Patient-erase",
     "documentation": "POST Patient/[id]/$erase: GDPR art. 17 erasure by crypto-shredding of the patient's data key "
                      "(every version, every backup). Refused (409, naming the rule and its end date) under a "
                      "retention rule or a legal hold; overrideRetention (boolean) lifts the retention rule. "
                      + _LIFECYCLE_DOC},
    {"name": "restrict", "definition": "urn:fhirvault:OperationDefinition/Patient-restrict",
     "documentation": "POST Patient/[id]/$restrict: GDPR art. 18 restriction of processing (stored, not read or "
                      "searched by ordinary clients). " + _LIFECYCLE_DOC},
    {"name": "unrestrict", "definition": "urn:fhirvault:OperationDefinition/Patient-unrestrict",
     "documentation": "POST Patient/[id]/$unrestrict: lifts the restriction. " + _LIFECYCLE_DOC},
    {"name": "legal-hold", "definition": "urn:fhirvault:OperationDefinition/Patient-legal-hold",
     "documentation": "POST Patient/[id]/$legal-hold with active (boolean): a legal hold blocks erasure and purge. "
                      + _LIFECYCLE_DOC},
]


def _rev_includes(rtype: str, resource_types: list[str]) -> dict[str, Any]:
    """searchRevInclude, without AuditEvent (not in the resource store) and omitted when empty."""
    found = sorted({i for t in resource_types if t != "AuditEvent" for i in _includes(t)
                    if rtype in search_params(t)[i.split(":")[1]].targets})
    return {"searchRevInclude": found} if found else {}


def _audit_event_resource() -> dict[str, Any]:
    params = search_params("AuditEvent")
    return {
        "type": "AuditEvent",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchParam": [{"name": code, "type": params[code].type, "definition": params[code].url}
                        for code in AUDIT_SEARCH_PARAMS],
        "documentation": AUDIT_DOC,
    }


RESOURCE_OPERATIONS = [
    {"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
     "documentation": "POST [type]/$validate and [type]/[id]/$validate: mode create, update or delete; against "
                      "the base R4 definitions only (a profile other than the base one is refused)."},
    {"name": "meta", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-meta",
     "documentation": "[type]/[id]/$meta and [type]/[id]/_history/[vid]/$meta (not at type or system level)."},
    {"name": "meta-add", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-meta-add",
     "documentation": "Adds profiles, tags and security labels; creates a new version (stored versions are never "
                      "rewritten)."},
    {"name": "meta-delete", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-meta-delete",
     "documentation": "Removes profiles, tags and security labels; creates a new version."},
]

TERMINOLOGY_DOC = ("GET or POST Parameters, at type level (url=...) or on one resource ([type]/[id]/...), over the R4 "
                    "code systems and value sets and the packages loaded with 'fhirvault terminology load'. Code "
                    "systems not held (SNOMED CT, LOINC, UCUM...) are refused with an OperationOutcome unless the "
                    "value set lists their codes (docs/terminology.md).")
TERMINOLOGY_OPERATIONS = {
    "ValueSet": [
        {"name": "expand", "definition": "http://hl7.org/fhir/OperationDefinition/ValueSet-expand",
         "documentation": "url, valueSet, valueSetVersion, filter (text), offset, count (at most 1000), activeOnly. "
                          "Filters: concept is-a, descendent-of, is-not-a, generalizes; '=' and 'in' on properties. "
                          + TERMINOLOGY_DOC},
        {"name": "validate-code", "definition": "http://hl7.org/fhir/OperationDefinition/ValueSet-validate-code",
         "documentation": "url or valueSet, with code+system(+display), coding or codeableConcept; a wrong display "
                          "gives result=false. " + TERMINOLOGY_DOC},
    ],
    "CodeSystem": [
        {"name": "lookup", "definition": "http://hl7.org/fhir/OperationDefinition/CodeSystem-lookup",
         "documentation": "system+code or coding, version, property. " + TERMINOLOGY_DOC},
        {"name": "validate-code", "definition": "http://hl7.org/fhir/OperationDefinition/CodeSystem-validate-code",
         "documentation": "url, code (or coding, codeableConcept), display, version. " + TERMINOLOGY_DOC},
    ],
}

# The channel types this server delivers (one extension per type; R4 has no element for it).
SUBSCRIPTION_CHANNEL_EXT = "https://fhirvault.org/fhir/StructureDefinition/subscription-channel-type"
SMART_OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
SECURITY_DOC = (
    "OAuth 2.0 (SMART App Launch 2.x and SMART Backend Services), the same endpoints as "
    "/.well-known/smart-configuration. Grants: client_credentials (client_secret_basic, client_secret_post, "
    "private_key_jwt), authorization_code with PKCE S256 only (standalone launch, launch/patient, openid "
    "fhirUser) and refresh_token (rotated, reuse detected). Revocation (RFC 7009) and introspection "
    "(RFC 7662). Scopes: SMART v1 and v2, patient/, user/ and system/, enforced per interaction."
)


def _subscription_channels() -> dict[str, Any]:
    """The channel types served (services/subscriptions.py): rest-hook, and nothing else."""
    return {
        "extension": [{"url": SUBSCRIPTION_CHANNEL_EXT, "valueCode": REST_HOOK}],
        "documentation": "Subscription channel types: rest-hook only (POST to channel.endpoint with channel.header). "
                         "payload absent: a notification without a body; application/fhir+json: the resource. "
                         "Backport IG extensions read: backport-heartbeat-period, backport-payload-content "
                         "(empty, full-resource). The server sets status (requested, active, error, off).",
    }


def oauth_uris(token_url: str) -> dict[str, str]:
    """The OAuth endpoints, all beside the token endpoint (one place for both discovery documents)."""
    base = token_url.removesuffix("/token")
    return {"authorize": base + "/authorize", "token": token_url, "revoke": base + "/revoke",
            "introspect": base + "/introspect"}


def _security(token_url: str) -> dict[str, Any]:
    services = [("OAuth", "OAuth"), ("SMART-on-FHIR", "SMART-on-FHIR")]
    return {
        "cors": False,
        "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                 "code": code, "display": display}]} for code, display in services],
        "extension": [{"url": SMART_OAUTH_URIS,
                       "extension": [{"url": name, "valueUri": uri} for name, uri in oauth_uris(token_url).items()]}],
        "description": SECURITY_DOC,
    }


# FHIR Bulk Data Access v2 (fhir/bulk.py): asynchronous NDJSON export at three levels.
BULK_DATA = "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"
SYSTEM_EXPORT = {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}
PATIENT_EXPORT = {"name": "export",
                  "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"}
GROUP_EXPORT = {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"}
# NDJSON import (fhir/bulk_import_api.py, docs/bulk-import.md): the Bulk Data import proposal has no
# published OperationDefinition, so the canonical is this server's own.
SYSTEM_IMPORT = {"name": "import", "definition": "urn:fhirvault:OperationDefinition/import",
                 "documentation": "NDJSON bulk import (application/fhir+ndjson upload, or a Parameters manifest of "
                                  "files in the server's import directory); system write scopes only."}


def capability_statement(resource_types: list[str], *, base_url: str, token_url: str,
                         published_ms_instant: str, subscriptions: bool = True) -> dict[str, Any]:
    """``subscriptions``: whether Subscriptions may be created ([subscriptions] enabled); when not,
    no channel is advertised and the Subscription entry says so."""
    resources = [
        {
            "type": rtype,
            "interaction": [{"code": c} for c in INSTANCE_INTERACTIONS + TYPE_INTERACTIONS],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalRead": "full-support",
            "conditionalUpdate": True,
            "conditionalDelete": "single",
            "searchInclude": ["*", *_includes(rtype)],
            **_rev_includes(rtype, resource_types),
            "searchParam": _search_params(rtype),
            "operation": [*RESOURCE_OPERATIONS, *(
                [{"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"},
                 SUMMARY, ACCESS_HISTORY, BREAK_GLASS, PATIENT_EXPORT, *LIFECYCLE] if rtype == "Patient" else
                [GROUP_EXPORT] if rtype == "Group" else []),
                *TERMINOLOGY_OPERATIONS.get(rtype, [])],
        }
        if rtype != "AuditEvent" else _audit_event_resource()
        for rtype in resource_types
    ]
    for resource in resources:
        if resource["type"] == "Subscription":
            resource.update(_subscription_channels() if subscriptions else {
                "documentation": "Subscriptions are disabled on this server: creating or changing one is refused "
                                 "and no notification is sent."})
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": published_ms_instant,
        "publisher": "fhirvault",
        "kind": "instance",
        "software": {"name": "fhirvault", "version": __version__},
        "implementation": {"description": "fhirvault encrypted FHIR R4 server", "url": base_url},
        "instantiates": [BULK_DATA],
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json", "application/fhir+xml", "xml"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [
            {
                "mode": "server",
                "security": _security(token_url),
                "resource": resources,
                "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
                "operation": [SYSTEM_EXPORT, SYSTEM_IMPORT],
                "documentation": SEARCH_DOC,
            }
        ],
    }
