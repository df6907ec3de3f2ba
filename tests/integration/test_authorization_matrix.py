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
    # Hundreds of rows from one in-process address: the firewall's rate buckets are off here (they
    # have their own tests); every other check of the firewall still runs.
    config = base / "matrix.toml"
    config.write_text("[firewall]\nenabled = false\n")
    settings = load_settings({"data_dir": base / "data"}, environ={}, config_file=config)
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


# -- care-relationship takeover (issue #11) ----------------------------------------------------------
# Relationships are computed from PractitionerRole.practitioner, Patient.generalPractitioner, CareTeam and
# Encounter participants and EpisodeOfCare.managingOrganization: a user who can write those hands out
# patients. Each row is one attack by dr A (Practitioner/prac-a, organisation org-a, no relationship with
# Patient/pc) or another role, the status it must get, and whether dr A may see pc's data afterwards.

ROLE_B = {"resourceType": "PractitionerRole", "id": "role-b", "active": True,
          "practitioner": {"reference": "Practitioner/prac-b"}, "organization": {"reference": "Organization/org-b"}}
TAKEN = {**ROLE_B, "practitioner": {"reference": "Practitioner/prac-a"}}
PATCH = [{"op": "replace", "path": "/practitioner/reference", "value": "Practitioner/prac-a"}]
JSON_PATCH = {"Content-Type": "application/json-patch+json"}


@dataclass
class Takeover:
    app: Any
    admin: dict[str, str]

    def token(self, role: str, scope: str = "user/*.cruds") -> dict[str, str]:
        fhir_user = {"practitioner": "Practitioner/prac-a", "nurse": "Practitioner/prac-a",
                     "admin_staff": "Practitioner/clerk", "patient": "Patient/pa"}.get(role)
        return bearer(mint(self.app.container, role=role, user=f"u-{role}-a", fhir_user=fhir_user,
                           org="org-a" if role in ("practitioner", "nurse") else None,
                           patient="pa" if role == "patient" else None, scope=scope))

    def dr_sees_pc(self) -> bool:
        h = self.token("practitioner")
        seen = [self.app.client.get(f"/fhir/{url}", headers=h).status_code for url in
                ("Patient/pc", "Observation/pc-obs")]
        assert set(seen) <= {200, 404}, seen
        return seen == [200, 200]


@pytest.fixture
def takeover(app: Any) -> Takeover:
    c, admin = app.client, app.auth
    for rtype, rid in (("Organization", "org-a"), ("Organization", "org-b")):
        put(c, admin, {"resourceType": rtype, "id": rid, "name": rid})
    for rid in ("prac-a", "prac-b"):
        put(c, admin, {"resourceType": "Practitioner", "id": rid, "name": [{"family": rid}]})
    put(c, admin, ROLE_B)
    put(c, admin, patient("pc"))
    put(c, admin, observation("pc", "pc-obs"))
    put(c, admin, care_team("pc", "team-c", "PractitionerRole/role-b"))
    put(c, admin, patient("pa"))  # dr A's own patient
    put(c, admin, care_team("pa", "team-a", "Practitioner/prac-a"))
    t = Takeover(app, admin)
    assert not t.dr_sees_pc()
    return t


def _send(t: Takeover, role: str, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
          **extra: Any) -> Any:
    h = {**t.token(role, **extra), **FHIR_JSON, **(headers or {})}
    return t.app.client.request(method, f"/fhir/{url}", headers=h, json=body)


def _bundle(kind: str, *entries: tuple[str, str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": [
        {"request": {"method": m, "url": u}, **({"resource": r} if r is not None else {})} for m, u, r in entries]}


def _with(resource: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**resource, **fields}


PC = patient("pc")
TEAM_C = care_team("pc", "team-c", "PractitionerRole/role-b")
SELF_IN_TEAM_C = _with(TEAM_C, participant=[{"member": {"reference": "PractitionerRole/role-b"}},
                                            {"member": {"reference": "Practitioner/prac-a"}}])
ENC_PC = {k: v for k, v in encounter("pc", "x", "Practitioner/prac-a").items() if k != "id"}
OBS_PC = {k: v for k, v in observation("pc", "x").items() if k != "id"}
LINKED = {"resourceType": "Patient", "name": [{"family": "Mallory"}],
          "link": [{"other": {"reference": "Patient/pc"}, "type": "seealso"}]}
EPISODE_PC = {"resourceType": "EpisodeOfCare", "status": "active", "patient": {"reference": "Patient/pc"},
              "managingOrganization": {"reference": "Organization/org-a"}}

# name, role, method, url, body, extra headers, status expected (today's code answers in the comment)
ATTACKS: list[tuple[str, str, str, str, Any, dict[str, str], int]] = [
    ("role-put", "practitioner", "PUT", "PractitionerRole/role-b", TAKEN, {}, 403),  # was 200, then pc visible
    ("role-put-nurse", "nurse", "PUT", "PractitionerRole/role-b", TAKEN, {}, 403),  # was 200
    ("role-patch", "practitioner", "PATCH", "PractitionerRole/role-b", PATCH, JSON_PATCH, 403),  # was 200
    ("role-conditional-put", "practitioner", "PUT", "PractitionerRole?_id=role-b", TAKEN, {}, 403),  # was 200
    ("role-transaction", "practitioner", "POST", "", _bundle("transaction", ("PUT", "PractitionerRole/role-b",
                                                                            TAKEN)), {}, 403),  # was 200
    ("role-create", "practitioner", "POST", "PractitionerRole", _with(TAKEN, id="mine"), {}, 403),  # was 201
    ("delete-practitioner", "practitioner", "DELETE", "Practitioner/prac-b", None, {}, 403),  # was 204
    ("delete-role", "practitioner", "DELETE", "PractitionerRole/role-b", None, {}, 403),  # was 204
    ("delete-organization", "practitioner", "DELETE", "Organization/org-b", None, {}, 403),  # was 204
    ("conditional-delete-role", "practitioner", "DELETE", "PractitionerRole?_id=role-b", None, {}, 403),  # was 204
    ("patient-link-into-pc", "practitioner", "POST", "Patient", LINKED, {}, 404),  # was 201, in pc's $everything
    ("observation-into-pc", "practitioner", "POST", "Observation", OBS_PC, {}, 404),  # was 403
    ("careteam-self-add", "practitioner", "PUT", "CareTeam/team-c", SELF_IN_TEAM_C, {}, 404),  # was 404
    ("encounter-for-pc", "practitioner", "POST", "Encounter", ENC_PC, {}, 404),  # was 403
    ("gp-self-on-pc", "practitioner", "PUT", "Patient/pc",
     _with(PC, generalPractitioner=[{"reference": "Practitioner/prac-a"}]), {}, 404),  # was 404
    ("episode-own-org", "practitioner", "POST", "EpisodeOfCare", EPISODE_PC, {}, 404),  # was 403
    ("transaction-observation-into-pc", "practitioner", "POST", "",
     _bundle("transaction", ("POST", "Observation", OBS_PC)), {}, 404),  # was 403
]


@pytest.mark.parametrize(("name", "role", "method", "url", "body", "headers", "status"), ATTACKS,
                         ids=[a[0] for a in ATTACKS])
def test_takeover_attack_row(takeover: Takeover, name: str, role: str, method: str, url: str, body: Any,
                             headers: dict[str, str], status: int) -> None:
    t = takeover
    r = _send(t, role, method, url, copy.deepcopy(body), headers)
    assert r.status_code == status, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    assert not t.dr_sees_pc()  # five seconds later, or at once: still nothing of pc
    c, admin = t.app.client, t.admin
    assert c.get("/fhir/PractitionerRole/role-b", headers=admin).json()["practitioner"] == ROLE_B["practitioner"]
    for kept in ("Practitioner/prac-b", "Organization/org-b"):
        assert c.get(f"/fhir/{kept}", headers=admin).status_code == 200
    everything = c.get("/fhir/Patient/pc/$everything", headers=admin).json()
    assert {e["resource"]["resourceType"] + "/" + e["resource"]["id"] for e in everything["entry"]} == {
        "Patient/pc", "Observation/pc-obs", "CareTeam/team-c"}
    if status == 403:  # every refused directory write is a detection event
        assert t.app.container.alerts.list(rule="relationship_write_refused")


def test_break_the_glass_does_not_become_a_relationship(takeover: Takeover) -> None:
    """Emergency access lets dr A see pc; it must not let them write themselves into pc's care."""
    t = takeover
    assert break_glass(t.app.client, t.token("practitioner")["Authorization"].split()[1], "pc").status_code == 201
    assert t.dr_sees_pc()
    for method, url, body in (("PUT", "CareTeam/team-c", SELF_IN_TEAM_C),
                              ("PUT", "Patient/pc", _with(PC, generalPractitioner=[
                                  {"reference": "Practitioner/prac-a"}])),
                              ("POST", "Encounter", ENC_PC)):
        r = _send(t, "practitioner", method, url, copy.deepcopy(body))
        assert r.status_code == 403, (url, r.text)  # was 200/201: a permanent relationship after the emergency
    add_me = [{"op": "add", "path": "/participant/-", "value": {"member": {"reference": "Practitioner/prac-a"}}}]
    r = _send(t, "practitioner", "PATCH", "CareTeam/team-c", add_me, JSON_PATCH)
    assert r.status_code == 403, r.text
    tx = _bundle("transaction", ("PUT", "CareTeam/team-c", SELF_IN_TEAM_C))
    assert _send(t, "practitioner", "POST", "", tx).status_code == 403
    assert t.app.client.get("/fhir/CareTeam/team-c", headers=t.admin).json()["participant"] == TEAM_C["participant"]
    rel = t.app.container.repository.relationships
    assert "pc" not in rel.patients_of("Practitioner/prac-a", "org-a")
    alerts = t.app.container.alerts.list(rule="care_self_assignment")
    assert alerts and all(a.severity == "high" for a in alerts)


def test_relationship_writes_that_rely_on_an_existing_relationship_still_work(takeover: Takeover) -> None:
    """dr A's own patient pa: adding a colleague, opening an Encounter, registering a patient are allowed,
    and each relationship change is a detection event (naming oneself is an alert)."""
    t = takeover
    colleague = care_team("pa", "team-a", "Practitioner/prac-a")
    colleague["participant"].append({"member": {"reference": "Practitioner/prac-b"}})
    assert _send(t, "practitioner", "PUT", "CareTeam/team-a", colleague).status_code == 200
    enc = {k: v for k, v in encounter("pa", "x", "Practitioner/prac-a").items() if k != "id"}
    assert _send(t, "practitioner", "POST", "Encounter", enc).status_code == 201
    registered = _send(t, "practitioner", "POST", "Patient",
                       _with(patient("new"), generalPractitioner=[{"reference": "Practitioner/prac-a"}]))
    assert registered.status_code == 201
    assert t.app.client.get(f"/fhir/Patient/{registered.json()['id']}",
                            headers=t.token("practitioner")).status_code == 200
    assert t.app.container.alerts.list(rule="relationship_change")
    assert [a.labels.get("user") for a in t.app.container.alerts.list(rule="care_self_assignment")] == ["u-practitioner-a"]
    assert not t.dr_sees_pc()


@pytest.mark.parametrize("role", ["admin_staff", "platform_admin", "system"])
def test_directory_administrators_still_write_the_directory(takeover: Takeover, role: str) -> None:
    """The directory's administrators (and backend services with system/ scopes) reassign a role; the
    relationship change is a detection event."""
    t = takeover
    h = t.admin if role == "system" else t.token(role)
    r = t.app.client.put("/fhir/PractitionerRole/role-b", headers={**h, **FHIR_JSON}, json=TAKEN)
    assert r.status_code == 200, r.text
    assert t.dr_sees_pc()  # an administrator's decision, not dr A's
    assert t.app.container.alerts.list(rule="relationship_change")


DIRECTORY = ("Practitioner", "PractitionerRole", "Organization", "Location", "HealthcareService")
# role -> the writes (c create, u update, d delete) it may make on every directory type, and whether it reads
DIRECTORY_WRITES = {"practitioner": "r", "nurse": "r", "admin_staff": "rcu", "platform_admin": "rcud",
                    "patient": "r", "auditor": "", "security_officer": ""}


def test_directory_matrix(takeover: Takeover) -> None:
    t = takeover
    c = t.app.client
    got: dict[tuple[str, str], str] = {}
    for role, expected in DIRECTORY_WRITES.items():
        scope = "patient/*.cruds" if role == "patient" else "user/*.cruds"
        for rtype in DIRECTORY:
            rid = new_id(rtype.lower())
            body = {"resourceType": rtype, "id": rid}
            put(c, t.admin, body)
            ok = ""
            h = {**t.token(role, scope), **FHIR_JSON}
            if c.get(f"/fhir/{rtype}/{rid}", headers=h).status_code == 200:
                ok += "r"
            if c.post(f"/fhir/{rtype}", headers=h, json={"resourceType": rtype}).status_code == 201:
                ok += "c"
            if c.put(f"/fhir/{rtype}/{rid}", headers=h, json=body).status_code == 200:
                ok += "u"
            if c.delete(f"/fhir/{rtype}/{rid}", headers=h).status_code == 204:
                ok += "d"
            got[(role, rtype)] = ok
    wrong = {k: v for k, v in got.items() if v != DIRECTORY_WRITES[k[0]]}
    assert not wrong, wrong
