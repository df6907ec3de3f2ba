"""$validate, $meta, $meta-add and $meta-delete through HTTP (JSON and XML)."""

from __future__ import annotations

from typing import Any

from tests.conftest import PATIENT, App, get_token

FHIR_JSON = {"Content-Type": "application/fhir+json"}
TAG = {"system": "http://example.org/tags", "code": "research"}
LABEL = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}
PROFILE = "http://interopsante.org/fhir/StructureDefinition/FrPatient"


def params(meta: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": meta}]}


def returned_meta(r: Any) -> dict[str, Any]:
    body = r.json()
    assert body["resourceType"] == "Parameters" and body["parameter"][0]["name"] == "return", body
    return dict(body["parameter"][0]["valueMeta"])


def create_patient(app: App) -> str:
    r = app.client.post("/fhir/Patient", json=PATIENT, headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 201
    return str(r.json()["id"])


def test_meta_add_and_delete(app: App) -> None:
    pid = create_patient(app)
    meta = returned_meta(app.client.get(f"/fhir/Patient/{pid}/$meta", headers=app.auth))
    assert meta["versionId"] == "1" and "tag" not in meta
    r = app.client.post(f"/fhir/Patient/{pid}/$meta-add", json=params({"tag": [TAG], "profile": [PROFILE]}),
                        headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 200, r.text
    meta = returned_meta(r)
    assert meta["tag"] == [TAG] and meta["profile"] == [PROFILE] and meta["versionId"] == "2"
    # adding again changes nothing (matched by system and code, profiles by value): no new version
    r = app.client.post(f"/fhir/Patient/{pid}/$meta-add", json=params({"tag": [{**TAG, "display": "R"}]}),
                        headers={**app.auth, **FHIR_JSON})
    assert returned_meta(r)["versionId"] == "2"
    # the tag is searchable and the resource itself carries it
    found = app.client.get("/fhir/Patient", params={"_tag": f"{TAG['system']}|{TAG['code']}"}, headers=app.auth).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [pid]
    # $meta of the first version is still the first version's
    assert "tag" not in returned_meta(app.client.get(f"/fhir/Patient/{pid}/_history/1/$meta", headers=app.auth))
    r = app.client.post(f"/fhir/Patient/{pid}/$meta-delete", json=params({"tag": [TAG]}),
                        headers={**app.auth, **FHIR_JSON})
    meta = returned_meta(r)
    assert "tag" not in meta and meta["profile"] == [PROFILE] and meta["versionId"] == "3"
    assert app.client.get(f"/fhir/Patient/{pid}", headers=app.auth).json()["meta"].get("tag") is None


def test_meta_operations_in_xml(app: App) -> None:
    pid = create_patient(app)
    body = (b"<Parameters xmlns='http://hl7.org/fhir'><parameter><name value='meta'/><valueMeta>"
            b"<security><system value='http://terminology.hl7.org/CodeSystem/v3-ActCode'/><code value='PSY'/>"
            b"</security></valueMeta></parameter></Parameters>")
    r = app.client.post(f"/fhir/Patient/{pid}/$meta-add", content=body,
                        headers={**app.auth, "Content-Type": "application/fhir+xml", "Accept": "application/fhir+xml"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+xml")
    assert b"<valueMeta><versionId value=\"2\"/>" in r.content and b"<code value=\"PSY\"/>" in r.content


def test_meta_refusals(app: App) -> None:
    pid = create_patient(app)
    r = app.client.post(f"/fhir/Patient/{pid}/$meta-add", json=params({"versionId": "9"}),
                        headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 400
    r = app.client.post(f"/fhir/Patient/{pid}/$meta-add", json={"resourceType": "Patient"},
                        headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 400
    assert app.client.get("/fhir/Patient/$meta", headers=app.auth).status_code == 501
    assert app.client.get("/fhir/Patient/nope/$meta", headers=app.auth).status_code == 404
    r = app.client.post("/fhir/Patient/nope/$meta-add", json=params({"tag": [TAG]}), headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 404
    # a read-only token may read meta but not change it
    read_only = get_token(app.client, app.creds, scope="system/Patient.rs")
    headers = {"Authorization": f"Bearer {read_only}", **FHIR_JSON}
    assert app.client.get(f"/fhir/Patient/{pid}/$meta", headers=headers).status_code == 200
    r = app.client.post(f"/fhir/Patient/{pid}/$meta-add", json=params({"tag": [TAG]}), headers=headers)
    assert r.status_code == 403
    assert "tag" not in app.client.get(f"/fhir/Patient/{pid}", headers=app.auth).json()["meta"]


def issues(r: Any) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    return list(body["issue"])


def test_validate_modes(app: App) -> None:
    ok = issues(app.client.post("/fhir/Patient/$validate", json=PATIENT, headers={**app.auth, **FHIR_JSON}))
    assert [i["severity"] for i in ok] == ["information"]
    bad = issues(app.client.post("/fhir/Patient/$validate", json={**PATIENT, "gender": "robot", "colour": "x"},
                                 headers={**app.auth, **FHIR_JSON}))
    assert {i["severity"] for i in bad} == {"error"}
    assert {"Patient.gender", "Patient.colour"} <= {e for i in bad for e in i.get("expression", [])}
    # nothing was stored by either
    assert not app.client.get("/fhir/Patient", headers=app.auth).json().get("entry")
    # Parameters form, mode update against an existing resource
    pid = create_patient(app)
    wrapped = {"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": {**PATIENT, "id": pid}}, {"name": "mode", "valueCode": "update"}]}
    ok = issues(app.client.post(f"/fhir/Patient/{pid}/$validate", json=wrapped, headers={**app.auth, **FHIR_JSON}))
    assert ok[0]["severity"] == "information"
    wrong_id = {**wrapped, "parameter": [{"name": "resource", "resource": {**PATIENT, "id": "other"}}]}
    bad = issues(app.client.post(f"/fhir/Patient/{pid}/$validate", json=wrong_id, headers={**app.auth, **FHIR_JSON}))
    assert bad[0]["severity"] == "error"
    # mode delete: no body; the resource must exist
    assert issues(app.client.post(f"/fhir/Patient/{pid}/$validate", params={"mode": "delete"},
                                  headers=app.auth))[0]["severity"] == "information"
    r = app.client.post("/fhir/Patient/nope/$validate", params={"mode": "delete"}, headers=app.auth)
    assert r.status_code == 404
    assert app.client.get(f"/fhir/Patient/{pid}", headers=app.auth).status_code == 200  # not deleted


def test_validate_refusals_and_xml(app: App) -> None:
    r = app.client.post("/fhir/Patient/$validate", params={"profile": PROFILE}, json=PATIENT,
                        headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 400 and r.json()["issue"][0]["code"] == "not-supported"
    r = app.client.post("/fhir/Patient/$validate", params={"profile": "http://hl7.org/fhir/StructureDefinition/Patient"},
                        json=PATIENT, headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 200
    r = app.client.post("/fhir/Patient/$validate", params={"mode": "profile"}, json=PATIENT,
                        headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 400
    r = app.client.post("/fhir/Patient/$validate", params={"mode": "update"}, json=PATIENT,
                        headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 400
    assert app.client.get("/fhir/Patient/$validate", headers=app.auth).status_code == 405
    xml = b"<Patient xmlns='http://hl7.org/fhir'><gender value='robot'/></Patient>"
    r = app.client.post("/fhir/Patient/$validate", content=xml,
                        headers={**app.auth, "Content-Type": "application/fhir+xml", "Accept": "application/fhir+xml"})
    assert r.status_code == 200 and b"<OperationOutcome" in r.content and b"<severity value=\"error\"/>" in r.content
    # a token that may not create may not probe validation either
    read_only = get_token(app.client, app.creds, scope="system/Patient.rs")
    r = app.client.post("/fhir/Patient/$validate", json=PATIENT,
                        headers={"Authorization": f"Bearer {read_only}", **FHIR_JSON})
    assert r.status_code == 403


def test_capability_statement_lists_the_operations(app: App) -> None:
    cap = app.client.get("/fhir/metadata").json()
    resources = {r["type"]: r for r in cap["rest"][0]["resource"]}
    for rtype in ("Patient", "Observation"):
        names = {o["name"] for o in resources[rtype]["operation"]}
        assert {"validate", "meta", "meta-add", "meta-delete"} <= names
    assert "operation" not in resources["AuditEvent"]
    assert {"application/fhir+xml", "xml"} <= set(cap["format"])
