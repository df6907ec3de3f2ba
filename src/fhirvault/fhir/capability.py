"""The CapabilityStatement: exactly what this server supports, no more."""

from __future__ import annotations

from typing import Any

from fhirvault import __version__

INSTANCE_INTERACTIONS = ["read", "vread", "update", "patch", "delete", "history-instance"]
TYPE_INTERACTIONS = ["create", "history-type"]


def capability_statement(resource_types: list[str], *, base_url: str, token_url: str,
                         published_ms_instant: str) -> dict[str, Any]:
    resources = [
        {
            "type": rtype,
            "interaction": [{"code": c} for c in INSTANCE_INTERACTIONS + TYPE_INTERACTIONS],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": False,
            "conditionalRead": "full-support",
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
        }
        for rtype in resource_types
    ]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": published_ms_instant,
        "publisher": "fhirvault",
        "kind": "instance",
        "software": {"name": "fhirvault", "version": __version__},
        "implementation": {"description": "fhirvault encrypted FHIR R4 server", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "cors": False,
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ]
                        }
                    ],
                    "extension": [
                        {
                            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                            "extension": [{"url": "token", "valueUri": token_url}],
                        }
                    ],
                    "description": "OAuth 2.0 client credentials (SMART Backend Services); SMART v2 system scopes.",
                },
                "resource": resources,
                "interaction": [{"code": "history-system"}],
            }
        ],
    }
