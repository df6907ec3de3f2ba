"""The authorization matrix: role x relationship x resource type x interaction, through the HTTP API.

The expected outcome of every cell is written down in ``MATRIX`` below (the policy of
docs/access-control.md, as data). Each row is one principal (a role, and the relationship
its user has with the target patient); each column a resource type; each cell the
interactions that must succeed, as letters:

    r read    s search (Type?_id=…, the resource must be in the results)    c create
    u update  d delete    h instance history    e Patient/$everything (Patient column only)

Every interaction not listed must be refused (403/404/405, or absent from search results).
AuditEvent is only ever read (r) or searched (s); writing it (c) is always refused.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import Container, build
from fhirvault.web.app import create_app
from tests.conftest import get_token
from tests.integration.authz_support import (
    FHIR_JSON,
    bearer,
    break_glass,
    care_team,
    condition,
    consent,
    encounter,
    labelled,
    medication_request,
    mint,
    new_id,
    observation,
    patient,
    put,
)

TYPES = ("Patient", "Observation", "Condition", "MedicationRequest", "CareTeam", "AuditEvent")
CLINICAL = "rscudh"  # a clinician with a relationship: everything on the compartment (nurses: no delete)
NURSING = "rscuh"

# role, relationship, then the allowed interactions per type in TYPES order.
MATRIX: list[tuple[str, str, str, str, str, str, str, str]] = [
    # role            relationship   Patient     Observation Condition  MedRequest CareTeam   AuditEvent
    ("practitioner", "none",        "c",        "",         "",        "",        "",        ""),
    ("practitioner", "careteam",    "rscudhe",  CLINICAL,   CLINICAL,  CLINICAL,  CLINICAL,  ""),
    ("practitioner", "gp",          "rscudhe",  CLINICAL,   CLINICAL,  CLINICAL,  CLINICAL,  ""),
    ("practitioner", "encounter",   "rscudhe",  CLINICAL,   CLINICAL,  CLINICAL,  CLINICAL,  ""),
    ("practitioner", "optout",      "c",        "",         "",        "",        "",        ""),
    ("practitioner", "restricted",  "",         "",         CLINICAL,  CLINICAL,  CLINICAL,  ""),
    ("practitioner", "cleared",     "rscudhe",  CLINICAL,   CLINICAL,  CLINICAL,  CLINICAL,  ""),
    ("practitioner", "breakglass",  "rscudhe",  CLINICAL,   CLINICAL,  CLINICAL,  CLINICAL,  ""),
    ("nurse",        "none",        "c",        "",         "",        "",        "",        ""),
    ("nurse",        "careteam",    "rscuhe",   NURSING,    NURSING,   NURSING,   NURSING,   ""),
    ("nurse",        "gp",          "rscuhe",   NURSING,    NURSING,   NURSING,   NURSING,   ""),
    ("nurse",        "encounter",   "rscuhe",   NURSING,    NURSING,   NURSING,   NURSING,   ""),
    ("nurse",        "optout",      "c",        "",         "",        "",        "",        ""),
    ("nurse",        "restricted",  "",         "",         NURSING,   NURSING,   NURSING,   ""),
    ("nurse",        "breakglass",  "rscuhe",   NURSING,    NURSING,   NURSING,   NURSING,   ""),
    # administrative staff: demographics of any patient, never clinical content; consent and labels apply
    ("admin_staff",  "none",        "rscuhe",   "",         "",        "",        "",        ""),
    ("admin_staff",  "careteam",    "rscuhe",   "",         "",        "",        "",        ""),
    ("admin_staff",  "optout",      "c",        "",         "",        "",        "",        ""),
    ("admin_staff",  "restricted",  "",         "",         "",        "",        "",        ""),
    ("admin_staff",  "breakglass",  "rscuhe",   "",         "",        "",        "",        ""),
    # patients: their own compartment, read-only (patient/*.rs); nothing of anyone else
    ("patient",      "own",         "rshe",     "rsh",      "rsh",     "rsh",     "rsh",     ""),
    ("patient",      "other",       "",         "",         "",        "",        "",        ""),
    # the audit roles read the trail and nothing else; platform admins read neither
    ("auditor",      "careteam",    "",         "",         "",        "",        "",        "rs"),
    ("security_officer", "careteam", "",        "",         "",        "",        "",        "rs"),
    ("platform_admin", "careteam",  "",         "",         "",        "",        "",        ""),
]

RELATIONSHIPS = ("none", "careteam", "gp", "encounter", "optout", "restricted", "cleared", "breakglass")


def member(rel: str) -> str:
    return f"Practitioner/dr-{rel}"


def build_scenario(client: TestClient, admin: dict[str, str], rel: str, pid: str) -> dict[str, str]:
    """A patient with one resource of each type, related to ``member(rel)`` the way ``rel`` says."""
    ids = {"Patient": pid, "Observation": f"{pid}-obs", "Condition": f"{pid}-cond",
           "MedicationRequest": f"{pid}-med", "CareTeam": f"{pid}-team"}
    restricted = rel in ("restricted", "cleared")
    pat = patient(pid)
    if rel == "gp":
        pat["generalPractitioner"] = [{"reference": member(rel)}]
    put(client, admin, labelled(pat, "R") if restricted else pat)
    obs = observation(pid, ids["Observation"])
    put(client, admin, labelled(obs, "R") if restricted else obs)
    put(client, admin, condition(pid, ids["Condition"]))
    put(client, admin, medication_request(pid, ids["MedicationRequest"]))
    in_team = rel in ("careteam", "optout", "restricted", "cleared")
    put(client, admin, care_team(pid, ids["CareTeam"], member(rel) if in_team else "Practitioner/someone-else"))
    if rel == "encounter":
        put(client, admin, encounter(pid, f"{pid}-enc", member(rel)))
    if rel == "optout":
        put(client, admin, consent(pid, f"{pid}-consent", {"type": "deny"}))
    return ids


@dataclass
class World:
    client: TestClient
    container: Container
    admin: dict[str, str]
    targets: dict[str, dict[str, str]]  # relationship -> type -> id
    audit_id: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base: Path = tmp_path_factory.mktemp("matrix")
    settings = load_settings({"data_dir": base / "data"}, environ={})
    import json

    creds = json.loads(initialise(settings).read_text())
    container = build(settings)
    with TestClient(create_app(container), base_url="http://testserver") as client:
        admin = bearer(get_token(client, creds))
        targets = {rel: build_scenario(client, admin, rel, f"pat-{rel}") for rel in RELATIONSHIPS}
        r = client.get("/fhir/AuditEvent?_count=1", headers=admin)
        assert r.status_code == 200, r.text
        yield World(client, container, admin, targets, r.json()["entry"][0]["resource"]["id"])


def principal_token(w: World, role: str, rel: str) -> tuple[str, str]:
    """(token, the relationship whose scenario is the target)."""
    user = f"u-{role}-{rel}"
    if role == "patient":
        own = w.targets["careteam"]["Patient"]
        me = own if rel == "own" else w.targets["gp"]["Patient"]
        return mint(w.container, role=role, user=user, fhir_user=f"Patient/{me}", patient=me,
                    scope="patient/*.rs"), "careteam"
    if role in ("practitioner", "nurse", "admin_staff"):
        fhir_user = member(rel) if role != "admin_staff" else "Practitioner/clerk"
        token = mint(w.container, role=role, user=user, fhir_user=fhir_user,
                     clearance=("R",) if rel == "cleared" else ())
        return token, rel
    return mint(w.container, role=role, user=user, scope="user/*.rs"), rel


def strip(resource: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(resource)
    meta = {k: v for k, v in (body.pop("meta", None) or {}).items() if k == "security"}
    if meta:
        body["meta"] = meta
    return body


def found_in(bundle: dict[str, Any], rtype: str, rid: str) -> bool:
    return any(e.get("resource", {}).get("resourceType") == rtype and e["resource"].get("id") == rid
               for e in bundle.get("entry", []))


def outcomes(w: World, role: str, rel: str, rtype: str) -> str:
    """The letters of the interactions that succeeded for this principal on this type."""
    token, target_rel = principal_token(w, role, rel)
    h = bearer(token)
    c = w.client
    ok = ""
    if rtype == "AuditEvent":
        if c.get(f"/fhir/AuditEvent/{w.audit_id}", headers=h).status_code == 200:
            ok += "r"
        if c.get("/fhir/AuditEvent?_count=1", headers=h).status_code == 200:
            ok += "s"
        if c.post("/fhir/AuditEvent", headers={**h, **FHIR_JSON},
                  json={"resourceType": "AuditEvent"}).status_code < 300:
            ok += "c"
        return ok
    rid = w.targets[target_rel][rtype]
    current = c.get(f"/fhir/{rtype}/{rid}", headers=w.admin).json()
    r = c.get(f"/fhir/{rtype}/{rid}", headers=h)
    if r.status_code == 200:
        assert r.json()["id"] == rid
        ok += "r"
    else:
        assert r.status_code in (403, 404), r.text
        assert r.json()["resourceType"] == "OperationOutcome"
    r = c.get(f"/fhir/{rtype}?_id={rid}", headers=h)
    if r.status_code == 200 and found_in(r.json(), rtype, rid):
        ok += "s"
    body = strip(current)
    body.pop("id")
    if c.post(f"/fhir/{rtype}", headers={**h, **FHIR_JSON}, json=body).status_code == 201:
        ok += "c"
    if c.put(f"/fhir/{rtype}/{rid}", headers={**h, **FHIR_JSON}, json=strip(current)).status_code == 200:
        ok += "u"
    # delete a fresh twin, so that the other cells keep their target
    if rtype == "Patient":
        twin_pid = new_id(f"pat-{target_rel}")
        build_scenario(c, w.admin, target_rel, twin_pid)
        if target_rel == "breakglass" and role in ("practitioner", "nurse"):
            assert break_glass(c, token, twin_pid).status_code == 201
        twin = twin_pid
    else:
        twin = new_id(rtype.lower())
        put(c, w.admin, {**strip(current), "id": twin})
    if c.delete(f"/fhir/{rtype}/{twin}", headers=h).status_code == 204:
        ok += "d"
    r = c.get(f"/fhir/{rtype}/{rid}/_history", headers=h)
    if r.status_code == 200 and found_in(r.json(), rtype, rid):
        ok += "h"
    if rtype == "Patient":
        r = c.get(f"/fhir/Patient/{rid}/$everything", headers=h)
        if r.status_code == 200 and found_in(r.json(), "Patient", rid):
            ok += "e"
    return ok


@pytest.mark.parametrize(("role", "rel", *TYPES), MATRIX, ids=[f"{m[0]}-{m[1]}" for m in MATRIX])
def test_matrix_row(world: World, role: str, rel: str, Patient: str, Observation: str,
                    Condition: str, MedicationRequest: str, CareTeam: str, AuditEvent: str) -> None:
    expected = dict(zip(TYPES, (Patient, Observation, Condition, MedicationRequest, CareTeam, AuditEvent),
                        strict=True))
    if rel == "breakglass" and role in ("practitioner", "nurse", "admin_staff"):
        token, _ = principal_token(world, role, rel)
        status = break_glass(world.client, token, world.targets["breakglass"]["Patient"]).status_code
        assert status == (201 if role != "admin_staff" else 403)
    got = {t: outcomes(world, role, rel, t) for t in TYPES}
    wrong = {t: f"expected {expected[t]!r}, got {got[t]!r}" for t in TYPES if set(got[t]) != set(expected[t])}
    assert not wrong, wrong


def test_matrix_is_complete() -> None:
    """Every relationship of the issue appears for practitioners, and every role has a row."""
    rows = {(m[0], m[1]) for m in MATRIX}
    assert {rel for role, rel in rows if role == "practitioner"} == set(RELATIONSHIPS)
    assert {m[0] for m in MATRIX} == {"practitioner", "nurse", "admin_staff", "patient", "auditor",
                                      "security_officer", "platform_admin"}
