"""Shared by the access-control tests: user tokens minted directly, and care scenarios built over HTTP.

Tokens are signed with the server's own key, exactly as the login flow signs them, so the
FHIR API verifies them like any other (only the login itself is skipped).
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterable
from typing import Any

from joserfc import jwt
from starlette.testclient import TestClient

from fhirvault.container import Container

FHIR_JSON = {"Content-Type": "application/fhir+json"}
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"


def mint(container: Container, *, role: str, user: str, fhir_user: str | None = None, scope: str = "user/*.cruds",
         patient: str | None = None, org: str | None = None, clearance: Iterable[str] = (),
         client_id: str = "test-app") -> str:
    auth = container.auth
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": auth.issuer, "aud": auth.audience, "sub": user, "client_id": client_id,
        "tenant": container.settings.tenant, "scope": scope, "iat": now, "nbf": now, "exp": now + 600,
        "jti": secrets.token_urlsafe(12), "role": role, "sid": "s-" + user,
    }
    for name, value in (("fhirUser", fhir_user), ("patient", patient), ("org", org)):
        if value is not None:
            claims[name] = value
    if clearance:
        claims["clearance"] = list(clearance)
    return jwt.encode({"alg": "ES256", "kid": auth.kid, "typ": "at+jwt"}, claims, auth._key,
                      algorithms=["ES256"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def put(client: TestClient, admin: dict[str, str], resource: dict[str, Any]) -> dict[str, Any]:
    r = client.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource,
                   headers={**admin, **FHIR_JSON})
    assert r.status_code in (200, 201), r.text
    return dict(r.json())


def labelled(resource: dict[str, Any], code: str) -> dict[str, Any]:
    return {**resource, "meta": {"security": [{"system": CONFIDENTIALITY, "code": code}]}}


def patient(pid: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "name": [{"family": "Test", "given": [pid]}],
            "gender": "female", "birthDate": "1980-01-01", **extra}


def observation(pid: str, oid: str, category: str = "vital-signs") -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": category}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": f"Patient/{pid}"}, "valueQuantity": {"value": 72, "unit": "/min"}}


def condition(pid: str, cid: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": cid,
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": "active"}]},
            "code": {"text": "asthma"}, "subject": {"reference": f"Patient/{pid}"}}


def medication_request(pid: str, mid: str) -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "id": mid, "status": "active", "intent": "order",
            "medicationCodeableConcept": {"text": "salbutamol"}, "subject": {"reference": f"Patient/{pid}"}}


def care_team(pid: str, tid: str, member: str) -> dict[str, Any]:
    return {"resourceType": "CareTeam", "id": tid, "status": "active", "subject": {"reference": f"Patient/{pid}"},
            "participant": [{"member": {"reference": member}}]}


def encounter(pid: str, eid: str, practitioner: str, status: str = "in-progress",
              end: str | None = None) -> dict[str, Any]:
    enc: dict[str, Any] = {
        "resourceType": "Encounter", "id": eid, "status": status,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{pid}"}, "participant": [{"individual": {"reference": practitioner}}]}
    if end is not None:
        enc["period"] = {"start": end, "end": end}
    return enc


def consent(pid: str, cid: str, provision: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Consent", "id": cid, "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{pid}"},
            "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                       "code": "OPTOUT"}]},
            "provision": provision}


def break_glass(client: TestClient, token: str, pid: str,
                reason: str = "unconscious patient in the emergency room") -> Any:
    return client.post(f"/fhir/Patient/{pid}/$break-glass", headers={**bearer(token), **FHIR_JSON}, json={
        "resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": reason},
                                                     {"name": "purposeOfUse", "valueCode": "ETREAT"}]})


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
