"""$lookup, $expand and $validate-code over HTTP (GET and POST, JSON and XML), and loaded packages."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from fhirvault.cli.main import main
from tests.conftest import App, get_token

FHIR_JSON = {"Content-Type": "application/fhir+json"}
NATIONAL_CS = "https://example.fr/CodeSystem/professions"
NATIONAL_VS = "https://example.fr/ValueSet/soignants"


def package(version: str = "1.0.0", extra: list[dict[str, Any]] | None = None) -> bytes:
    """A small npm-style FHIR package: a code system, a value set over it, and noise that is skipped."""
    files: dict[str, Any] = {
        "package/package.json": {"name": "example.fr.terminology", "version": version},
        "package/CodeSystem-professions.json": {
            "resourceType": "CodeSystem", "id": "professions", "url": NATIONAL_CS, "version": version,
            "name": "Professions", "status": "active", "content": "complete",
            "concept": [{"code": "10", "display": "Médecin", "concept": [{"code": "10-GE", "display": "Généraliste"}]},
                        {"code": "60", "display": "Infirmier"}, {"code": "91", "display": "Secrétaire"}]},
        "package/ValueSet-soignants.json": {
            "resourceType": "ValueSet", "id": "soignants", "url": NATIONAL_VS, "status": "active",
            "compose": {"include": [{"system": NATIONAL_CS}], "exclude": [{"system": NATIONAL_CS,
                                                                            "concept": [{"code": "91"}]}]}},
        "package/StructureDefinition-x.json": {"resourceType": "StructureDefinition", "url": "https://example.fr/x"},
        "package/other/ValueSet-hidden.json": {"resourceType": "ValueSet", "url": "https://example.fr/hidden"},
    }
    for i, r in enumerate(extra or []):
        files[f"package/extra-{i}.json"] = r
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, doc in files.items():
            raw = json.dumps(doc).encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def params(body: dict[str, Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for p in body["parameter"]:
        out.setdefault(p["name"], []).append(next((v for k, v in p.items() if k.startswith("value")), p.get("part")))
    return out


def test_expand_lookup_validate_over_http(app: App) -> None:
    c, auth = app.client, app.auth
    r = c.get("/fhir/ValueSet/$expand", params={"url": "http://hl7.org/fhir/ValueSet/administrative-gender"},
              headers=auth)
    assert r.status_code == 200, r.text
    exp = r.json()["expansion"]
    assert exp["total"] == 4 and [x["code"] for x in exp["contains"]] == ["male", "female", "other", "unknown"]
    assert exp["identifier"].startswith("urn:uuid:") and "timestamp" in exp
    # instance level, text filter and paging
    r = c.get("/fhir/ValueSet/administrative-gender/$expand", params={"filter": "MAL", "count": "1", "offset": "1"},
              headers=auth)
    exp = r.json()["expansion"]
    assert exp["total"] == 2 and [x["code"] for x in exp["contains"]] == ["female"]
    # POST Parameters, a value set given inline
    inline = {"resourceType": "ValueSet", "status": "active", "compose": {"include": [{
        "system": "http://hl7.org/fhir/administrative-gender", "concept": [{"code": "other"}]}]}}
    r = c.post("/fhir/ValueSet/$expand", json={"resourceType": "Parameters", "parameter": [
        {"name": "valueSet", "resource": inline}]}, headers={**auth, **FHIR_JSON})
    assert [x["code"] for x in r.json()["expansion"]["contains"]] == ["other"]
    # external code systems: a clear refusal, not an empty expansion
    r = c.get("/fhir/ValueSet/$expand", params={"url": "http://hl7.org/fhir/ValueSet/observation-codes"}, headers=auth)
    assert r.status_code == 422 and r.json()["resourceType"] == "OperationOutcome"
    assert "loinc.org is not available" in r.json()["issue"][0]["diagnostics"]
    r = c.get("/fhir/ValueSet/$expand", params={"url": "http://example.org/none"}, headers=auth)
    assert r.status_code == 404
    # $lookup
    r = c.get("/fhir/CodeSystem/$lookup", params={"system": "http://hl7.org/fhir/administrative-gender",
                                                   "code": "female"}, headers=auth)
    assert r.status_code == 200 and params(r.json())["display"] == ["Female"]
    r = c.post("/fhir/CodeSystem/$lookup", json={"resourceType": "Parameters", "parameter": [
        {"name": "coding", "valueCoding": {"system": "http://hl7.org/fhir/administrative-gender", "code": "nope"}}]},
        headers={**auth, **FHIR_JSON})
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"
    # $validate-code on value sets and code systems
    vs = "http://hl7.org/fhir/ValueSet/administrative-gender"
    ok = c.get("/fhir/ValueSet/$validate-code", params={"url": vs, "system": "http://hl7.org/fhir/administrative-gender",
                                                       "code": "male"}, headers=auth)
    assert params(ok.json())["result"] == [True] and params(ok.json())["display"] == ["Male"]
    bad = c.post("/fhir/ValueSet/$validate-code", json={"resourceType": "Parameters", "parameter": [
        {"name": "url", "valueUri": vs},
        {"name": "codeableConcept", "valueCodeableConcept": {"coding": [
            {"system": "http://hl7.org/fhir/administrative-gender", "code": "m"}]}}]}, headers={**auth, **FHIR_JSON})
    assert params(bad.json())["result"] == [False] and "not in the value set" in params(bad.json())["message"][0]
    r = c.get("/fhir/CodeSystem/$validate-code", params={"url": "http://hl7.org/fhir/administrative-gender",
                                                         "code": "unknown"}, headers=auth)
    assert params(r.json())["result"] == [True]
    # instance level on code systems (by id)
    r = c.get("/fhir/CodeSystem/administrative-gender/$lookup", params={"code": "male"}, headers=auth)
    assert params(r.json())["display"] == ["Male"]
    r = c.get("/fhir/CodeSystem/administrative-gender/$validate-code", params={"code": "mâle"}, headers=auth)
    assert params(r.json())["result"] == [False]
    assert c.get("/fhir/CodeSystem/no-such-id/$lookup", params={"code": "x"}, headers=auth).status_code == 404
    # hierarchy: is-a filter in a bundled value set (condition-clinical includes inactive and its children)
    r = c.post("/fhir/ValueSet/$expand", json={"resourceType": "Parameters", "parameter": [{"name": "valueSet",
        "resource": {"resourceType": "ValueSet", "status": "active", "compose": {"include": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
            "filter": [{"property": "concept", "op": "is-a", "value": "inactive"}]}]}}}]},
        headers={**auth, **FHIR_JSON})
    assert [x["code"] for x in r.json()["expansion"]["contains"]] == ["inactive", "remission", "resolved"]
    # malformed input: 400 with an OperationOutcome
    r = c.get("/fhir/ValueSet/$expand", params={"url": vs, "count": "-1"}, headers=auth)
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    assert c.get("/fhir/ValueSet/$expand", params={"url": vs}).status_code == 401
    broken = {"resourceType": "ValueSet", "status": "active", "compose": {"include": [{"system": 42}]}}
    r = c.post("/fhir/ValueSet/$expand", json={"resourceType": "Parameters", "parameter": [
        {"name": "valueSet", "resource": broken}]}, headers={**auth, **FHIR_JSON})
    assert r.status_code == 422 and r.json()["issue"][0]["expression"] == ["ValueSet.compose.include[0].system"]
    r = c.post("/fhir/ValueSet/$validate-code", json={"resourceType": "Parameters", "parameter": [
        {"name": "url", "valueUri": vs}, {"name": "coding", "valueCoding": {"system": 7, "code": "x"}}]},
        headers={**auth, **FHIR_JSON})
    assert r.status_code == 200 and params(r.json())["result"] == [False]


def test_value_sets_stored_through_the_api(app: App) -> None:
    c, auth = app.client, app.auth
    mine = {"resourceType": "ValueSet", "url": "https://example.org/vs/genders-short", "status": "active",
            "compose": {"include": [{"system": "http://hl7.org/fhir/administrative-gender",
                                     "filter": [{"property": "concept", "op": "in", "value": "male,female"}]}]}}
    vid = c.post("/fhir/ValueSet", json=mine, headers={**auth, **FHIR_JSON}).json()["id"]
    r = c.get(f"/fhir/ValueSet/{vid}/$expand", headers=auth)
    assert r.status_code == 200, r.text
    assert [x["code"] for x in r.json()["expansion"]["contains"]] == ["male", "female"]
    r = c.get(f"/fhir/ValueSet/{vid}/$validate-code", params={"system": "http://hl7.org/fhir/administrative-gender",
                                                              "code": "other"}, headers=auth)
    assert params(r.json())["result"] == [False]
    assert c.get("/fhir/ValueSet/not-stored/$expand", headers=auth).status_code == 404
    # read with the caller's rights: a token without ValueSet access gets nothing
    token = get_token(c, app.creds, "system/Patient.r")
    assert c.get(f"/fhir/ValueSet/{vid}/$expand", headers={"Authorization": f"Bearer {token}"}).status_code == 403


def test_xml(app: App) -> None:
    r = app.client.get("/fhir/ValueSet/administrative-gender/$expand", params={"_format": "xml"}, headers=app.auth)
    assert r.status_code == 200 and "<ValueSet xmlns" in r.text and '<code value="female"/>' in r.text
    body = ("<Parameters xmlns='http://hl7.org/fhir'><parameter><name value='system'/>"
            "<valueUri value='http://hl7.org/fhir/administrative-gender'/></parameter><parameter>"
            "<name value='code'/><valueCode value='other'/></parameter></Parameters>")
    r = app.client.post("/fhir/CodeSystem/$lookup", content=body,
                        headers={**app.auth, "Content-Type": "application/fhir+xml", "Accept": "application/fhir+xml"})
    assert r.status_code == 200, r.text
    assert "<Parameters" in r.text and '<valueString value="Other"/>' in r.text


def test_loaded_package_is_used(app: App, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c, auth = app.client, app.auth
    r = c.get("/fhir/ValueSet/$expand", params={"url": NATIONAL_VS}, headers=auth)
    assert r.status_code == 404
    pkg = tmp_path / "example.fr.terminology-1.0.0.tgz"
    pkg.write_bytes(package())
    data_dir = ["--data-dir", str(app.settings.data_dir)]
    if app.settings.database_url is not None:  # TEST_DB_ENGINE=postgresql: the CLI needs the same database
        config = tmp_path / "fhirvault.toml"
        config.write_text(f'database_url = "{app.settings.database_url}"\n')
        data_dir += ["--config", str(config)]
    assert main(["terminology", "load", str(pkg), *data_dir]) == 0
    r = c.get("/fhir/ValueSet/$expand", params={"url": NATIONAL_VS}, headers=auth)  # the running server sees it
    assert r.status_code == 200, r.text
    assert [x["code"] for x in r.json()["expansion"]["contains"]] == ["10", "10-GE", "60"]
    r = c.get("/fhir/CodeSystem/$lookup", params={"system": NATIONAL_CS, "code": "10-GE"}, headers=auth)
    assert params(r.json())["display"] == ["Généraliste"]
    r = c.get("/fhir/ValueSet/$expand", params={"url": "https://example.fr/hidden"}, headers=auth)
    assert r.status_code == 404  # only package/*.json is read
    # a new version replaces the old one
    pkg.write_bytes(package("2.0.0", [{"resourceType": "ValueSet", "url": NATIONAL_VS, "status": "active",
                                       "compose": {"include": [{"system": NATIONAL_CS, "concept": [{"code": "60"}]}]}}]))
    assert main(["terminology", "load", str(pkg), *data_dir]) == 0
    r = c.get("/fhir/ValueSet/$expand", params={"url": NATIONAL_VS}, headers=auth)
    assert [x["code"] for x in r.json()["expansion"]["contains"]] == ["60"]
    capsys.readouterr()
    assert main(["terminology", "list", *data_dir]) == 0
    listed = capsys.readouterr().out
    assert "example.fr.terminology@2.0.0" in listed and "1.0.0" not in listed
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not a package")
    assert main(["terminology", "load", str(bad), *data_dir]) == 2
    # the load is in the audit trail
    records = [app.container.audit.decrypt(seq, ts, blob)
               for seq, ts, blob in app.container.store.audit_entries("default", limit=100_000)]
    assert any(r["interaction"] == "config-change" and r["detail"] == "terminology package "
               "example.fr.terminology@2.0.0 loaded" for r in records)


def test_capability_statement_lists_the_operations(app: App) -> None:
    cap = app.client.get("/fhir/metadata").json()
    by_type = {r["type"]: {o["name"] for o in r.get("operation", [])} for r in cap["rest"][0]["resource"]}
    assert {"expand", "validate-code"} <= by_type["ValueSet"]
    assert {"lookup", "validate-code"} <= by_type["CodeSystem"]
    assert "expand" not in by_type["CodeSystem"] and "lookup" not in by_type["Observation"]
