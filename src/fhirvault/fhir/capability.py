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
    "leak too much), :in/:not-in and token :above/:below (no terminology service). Chaining and _has are "
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

BREAK_GLASS = {
    "name": "break-glass",
    "definition": "urn:fhirvault:OperationDefinition/Patient-break-glass",
    "documentation": "POST Patient/[id]/$break-glass with Parameters reason (string, at least 10 characters) and "
                     "purposeOfUse (ETREAT): emergency access of a practitioner or nurse without a care "
                     "relationship, for a limited time; every access is recorded as ETREAT, the security "
                     "officer is alerted and reviews the case (docs/access-control.md).",
}


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


def capability_statement(resource_types: list[str], *, base_url: str, token_url: str,
                         published_ms_instant: str) -> dict[str, Any]:
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
                 ACCESS_HISTORY, BREAK_GLASS] if rtype == "Patient" else [])],
        }
        if rtype != "AuditEvent" else _audit_event_resource()
        for rtype in resource_types
    ]
    for resource in resources:
        if resource["type"] == "Subscription":
            resource.update(_subscription_channels())
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": published_ms_instant,
        "publisher": "fhirvault",
        "kind": "instance",
        "software": {"name": "fhirvault", "version": __version__},
        "implementation": {"description": "fhirvault encrypted FHIR R4 server", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json", "application/fhir+xml", "xml"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [
            {
                "mode": "server",
                "security": _security(token_url),
                "resource": resources,
                "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
                "documentation": SEARCH_DOC,
            }
        ],
    }
