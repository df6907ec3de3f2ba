"""The FHIR REST API over HTTP against a real server process."""

from __future__ import annotations

import copy

import httpx

from tests.conftest import PATIENT, Server, observation

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def create(c: httpx.Client, resource: dict[str, object]) -> httpx.Response:
    r = c.post(f"/{resource['resourceType']}", json=resource, headers=FHIR_JSON)
    assert r.status_code == 201, r.text
    return r


def test_create_read_update_delete_cycle(shared_server: Server) -> None:
    with shared_server.client() as c:
        r = create(c, PATIENT)
        body = r.json()
        pid = body["id"]
        assert body["meta"]["versionId"] == "1"
        assert r.headers["etag"] == 'W/"1"'
        assert r.headers["location"].endswith(f"/fhir/Patient/{pid}/_history/1")
        assert "last-modified" in r.headers

        got = c.get(f"/Patient/{pid}")
        assert got.status_code == 200
        assert got.headers["content-type"].startswith("application/fhir+json")
        assert got.json()["name"][0]["family"] == "Martin"

        updated = copy.deepcopy(got.json())
        updated["gender"] = "other"
        r2 = c.put(f"/Patient/{pid}", json=updated, headers={**FHIR_JSON, "If-Match": 'W/"1"'})
        assert r2.status_code == 200, r2.text
        assert r2.json()["meta"]["versionId"] == "2"

        stale = c.put(f"/Patient/{pid}", json=updated, headers={**FHIR_JSON, "If-Match": 'W/"1"'})
        assert stale.status_code == 412
        assert stale.json()["resourceType"] == "OperationOutcome"

        v1 = c.get(f"/Patient/{pid}/_history/1")
        assert v1.status_code == 200 and v1.json()["gender"] == "female"

        d = c.delete(f"/Patient/{pid}")
        assert d.status_code == 204
        gone = c.get(f"/Patient/{pid}")
        assert gone.status_code == 410
        assert gone.json()["issue"][0]["code"] == "deleted"
        # deleting again is harmless; versions stay readable
        assert c.delete(f"/Patient/{pid}").status_code == 204
        assert c.get(f"/Patient/{pid}/_history/2").json()["gender"] == "other"
        assert c.get(f"/Patient/{pid}/_history/3").status_code == 410

        hist = c.get(f"/Patient/{pid}/_history").json()
        assert hist["type"] == "history" and hist["total"] == 3
        assert [e["request"]["method"] for e in hist["entry"]] == ["DELETE", "PUT", "POST"]


def test_update_creates_with_client_id_and_patch(shared_server: Server) -> None:
    with shared_server.client() as c:
        p = dict(PATIENT, id="pat-client-chosen-1")
        r = c.put("/Patient/pat-client-chosen-1", json=p, headers=FHIR_JSON)
        assert r.status_code == 201, r.text
        ops = [{"op": "replace", "path": "/birthDate", "value": "1984-05-13"},
               {"op": "add", "path": "/active", "value": True}]
        pr = c.patch("/Patient/pat-client-chosen-1", json=ops,
                     headers={"Content-Type": "application/json-patch+json", "If-Match": 'W/"1"'})
        assert pr.status_code == 200, pr.text
        assert pr.json()["birthDate"] == "1984-05-13" and pr.json()["active"] is True
        bad = c.patch("/Patient/pat-client-chosen-1", json=[{"op": "add", "path": "/birthDate", "value": "soon"}],
                      headers={"Content-Type": "application/json-patch+json"})
        assert bad.status_code in (400, 422)
        test_fail = c.patch("/Patient/pat-client-chosen-1",
                            json=[{"op": "test", "path": "/gender", "value": "male"}],
                            headers={"Content-Type": "application/json-patch+json"})
        assert test_fail.status_code == 409


def test_prefer_and_conditional_read(shared_server: Server) -> None:
    with shared_server.client() as c:
        minimal = c.post("/Patient", json=PATIENT, headers={**FHIR_JSON, "Prefer": "return=minimal"})
        assert minimal.status_code == 201 and minimal.content == b""
        pid = minimal.headers["location"].split("/")[-3]
        oo = c.post("/Patient", json=PATIENT, headers={**FHIR_JSON, "Prefer": "return=OperationOutcome"})
        assert oo.json()["resourceType"] == "OperationOutcome"
        assert c.get(f"/Patient/{pid}", headers={"If-None-Match": 'W/"1"'}).status_code == 304
        assert c.get(f"/Patient/{pid}", headers={"If-None-Match": 'W/"7"'}).status_code == 200
        lm = c.get(f"/Patient/{pid}").headers["last-modified"]
        assert c.get(f"/Patient/{pid}", headers={"If-Modified-Since": lm}).status_code == 304
        assert c.get(f"/Patient/{pid}", headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}).status_code == 200


def test_history_type_and_system_paging(shared_server: Server) -> None:
    with shared_server.client() as c:
        pid = create(c, PATIENT).json()["id"]
        ids = {create(c, observation(pid)).json()["id"] for _ in range(7)}
        page = c.get("/Observation/_history", params={"_count": 3}).json()
        seen: list[str] = []
        while True:
            seen += [e["resource"]["id"] for e in page["entry"]]
            nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
            if not nxt:
                break
            # a concurrent write must not shift the pages
            create(c, observation(pid))
            page = httpx.get(nxt[0], headers=c.headers).json()
        assert ids <= set(seen)
        assert len(seen) == len(set(seen))
        system = c.get("/_history", params={"_count": 2})
        assert system.status_code == 200 and len(system.json()["entry"]) == 2
        future = c.get("/Observation/_history", params={"_since": "2999-01-01T00:00:00Z"}).json()
        assert future.get("entry", []) == []


def test_every_resource_type_is_accepted(shared_server: Server) -> None:
    with shared_server.client() as c:
        for rtype, extra in [("Organization", {"name": "CHU"}), ("Basic", {"code": {"text": "x"}}),
                             ("Binary", {"contentType": "text/plain", "data": "aGVsbG8="}),
                             ("Location", {"name": "Ward 3"})]:
            r = c.post(f"/{rtype}", json={"resourceType": rtype, **extra}, headers=FHIR_JSON)
            assert r.status_code == 201, (rtype, r.text)


def test_metadata_is_public_and_honest(shared_server: Server) -> None:
    r = httpx.get(shared_server.fhir + "/metadata")
    assert r.status_code == 200
    cs = r.json()
    assert cs["resourceType"] == "CapabilityStatement" and cs["fhirVersion"] == "4.0.1"
    rest = cs["rest"][0]
    patient = next(x for x in rest["resource"] if x["type"] == "Patient")
    codes = {i["code"] for i in patient["interaction"]}
    assert {"read", "vread", "update", "patch", "delete", "create", "history-instance", "search-type"} <= codes
    assert {p["name"] for p in patient["searchParam"]} >= {"family", "birthdate", "identifier", "_id", "_lastUpdated"}
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch", "history-system"}
    assert len(rest["resource"]) > 140
    smart = httpx.get(shared_server.fhir + "/.well-known/smart-configuration").json()
    assert smart["token_endpoint"].endswith("/oauth2/token")
    assert "private_key_jwt" in smart["token_endpoint_auth_methods_supported"]
