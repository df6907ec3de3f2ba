"""Patient/$summary: an IPS document Bundle from realistic stored records (carebundle), JSON and XML."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import carebundle
import httpx
import pytest

from fhirvault.domain.ips_check import check_ips
from fhirvault.fhir.xml import xml_to_json
from tests.conftest import PATIENT, App, Server, get_token

FHIR_JSON = {"Content-Type": "application/fhir+json"}
LOINC = "http://loinc.org"


def load_cohort(post: Any, count: int, seed: int) -> dict[str, dict[str, Any]]:
    """carebundle transaction bundles through POST /fhir; server-side patient id -> the bundle sent."""
    out: dict[str, dict[str, Any]] = {}
    for b in carebundle.generate_cohort(count=count, seed=seed):
        raw = carebundle.to_json(b)
        bundle = json.loads(raw if isinstance(raw, str) else raw.decode())
        r = post(bundle)
        assert r.status_code == 200, r.text[:500]
        pid = next(e["response"]["location"].split("/")[1] for e in r.json()["entry"]
                   if e["response"]["location"].startswith("Patient/"))
        out[pid] = bundle
    return out


def errors_of(bundle: dict[str, Any]) -> list[str]:
    return [f"{i.rule}: {i.message}" for i in check_ips(bundle) if i.severity == "error"]


def sections(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    comp = doc["entry"][0]["resource"]
    return {s["code"]["coding"][0]["code"]: s for s in comp["section"]}


def test_summary_of_stored_records(app: App) -> None:
    c, auth = app.client, app.auth
    cohort = load_cohort(lambda b: c.post("/fhir", json=b, headers={**auth, **FHIR_JSON}), 3, seed=5)
    for pid, sent in cohort.items():
        r = c.get(f"/fhir/Patient/{pid}/$summary", headers=auth)
        assert r.status_code == 200, r.text[:500]
        doc = r.json()
        assert [f"{i.rule}: {i.message}" for i in check_ips(doc)] == []  # warnings too: all references resolve
        assert doc["type"] == "document" and doc["identifier"]["value"].startswith("urn:uuid:")
        comp = doc["entry"][0]["resource"]
        assert comp["type"]["coding"][0]["code"] == "60591-5"
        assert comp["subject"]["reference"] == f"http://testserver/fhir/Patient/{pid}"
        by_code = sections(doc)
        expected = Counter(e["resource"]["resourceType"] for e in sent["entry"])
        # every condition, allergy and prescription of the record is in its section
        problems = len(by_code["11450-4"].get("entry", [])) + len(by_code.get("11348-0", {}).get("entry", []))
        assert problems == expected["Condition"]
        assert len(by_code["48765-2"].get("entry", [])) == expected["AllergyIntolerance"]
        assert len(by_code["10160-0"].get("entry", [])) == expected["MedicationRequest"]
        results = by_code.get("30954-2", {}).get("entry", [])
        assert expected["DiagnosticReport"] == 0 or results
        # the entries are the stored resources, with fullUrls on this server
        urls = {e["fullUrl"] for e in doc["entry"]}
        for ref in by_code["10160-0"].get("entry", []):
            assert ref["reference"] in urls
        assert all(e["fullUrl"].startswith(("http://testserver/fhir/", "urn:uuid:")) for e in doc["entry"])


def test_empty_record_and_errors(app: App) -> None:
    c, auth = app.client, app.auth
    pid = c.post("/fhir/Patient", json=PATIENT, headers={**auth, **FHIR_JSON}).json()["id"]
    doc = c.get(f"/fhir/Patient/{pid}/$summary", headers=auth).json()
    assert errors_of(doc) == []
    by_code = sections(doc)
    assert set(by_code) == {"11450-4", "48765-2", "10160-0"}  # no optional section without data
    for s in by_code.values():
        assert "entry" not in s and s["emptyReason"]["coding"][0]["code"] == "unavailable"
        assert "no information is recorded" in s["text"]["div"]
    # entered-in-error records stay out
    bad = {"resourceType": "AllergyIntolerance", "patient": {"reference": f"Patient/{pid}"},
           "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                              "allergyintolerance-verification", "code": "entered-in-error"}]}}
    assert c.post("/fhir/AllergyIntolerance", json=bad, headers={**auth, **FHIR_JSON}).status_code == 201
    assert "entry" not in sections(c.get(f"/fhir/Patient/{pid}/$summary", headers=auth).json())["48765-2"]
    assert c.get("/fhir/Patient/nope/$summary", headers=auth).status_code == 404
    assert c.post(f"/fhir/Patient/{pid}/$summary", headers=auth).status_code == 405
    assert c.get(f"/fhir/Patient/{pid}/$summary", params={"foo": "1"}, headers=auth).status_code == 400
    # by identifier, at type level
    ident = PATIENT["identifier"][0]  # type: ignore[index]
    r = c.get("/fhir/Patient/$summary", params={"identifier": f"{ident['system']}|{ident['value']}"}, headers=auth)
    assert r.status_code == 200 and sections(r.json())["11450-4"]["emptyReason"]
    # audited as $summary
    records = [app.container.audit.decrypt(seq, ts, blob)
               for seq, ts, blob in app.container.store.audit_entries("default", limit=100_000)]
    assert any(r.get("entity") == f"Patient/{pid}/$summary" and r["interaction"] == "operation" for r in records)


def test_summary_respects_scopes(app: App) -> None:
    c, auth = app.client, app.auth
    cohort = load_cohort(lambda b: c.post("/fhir", json=b, headers={**auth, **FHIR_JSON}), 1, seed=9)
    pid = next(iter(cohort))
    token = get_token(c, app.creds, "system/Patient.r system/Condition.r")
    doc = c.get(f"/fhir/Patient/{pid}/$summary", headers={"Authorization": f"Bearer {token}"}).json()
    assert errors_of(doc) == []
    by_code = sections(doc)
    assert by_code["48765-2"]["emptyReason"]["coding"][0]["code"] == "withheld"
    assert {e["resource"]["resourceType"] for e in doc["entry"]} <= {"Composition", "Patient", "Device", "Condition"}
    token = get_token(c, app.creds, "system/Observation.r")
    assert c.get(f"/fhir/Patient/{pid}/$summary", headers={"Authorization": f"Bearer {token}"}).status_code == 403


@pytest.mark.server
def test_summary_in_xml_from_a_real_server(server: Server) -> None:
    with server.client() as c:
        cohort = load_cohort(lambda b: c.post("", json=b, headers=FHIR_JSON), 1, seed=21)
        pid = next(iter(cohort))
        r = c.get(f"/Patient/{pid}/$summary", headers={"Accept": "application/fhir+xml"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+xml")
        doc = json.loads(xml_to_json(r.content))
        assert doc["resourceType"] == "Bundle" and errors_of(doc) == []
        as_json = c.get(f"/Patient/{pid}/$summary").json()
        assert {k: len(v.get("entry", [])) for k, v in sections(doc).items()} == \
            {k: len(v.get("entry", [])) for k, v in sections(as_json).items()}
        assert sum(len(v.get("entry", [])) for v in sections(doc).values()) >= len(cohort[pid]["entry"]) // 2
        cap = httpx.get(server.fhir + "/metadata").json()
        patient = next(x for x in cap["rest"][0]["resource"] if x["type"] == "Patient")
        assert "summary" in {o["name"] for o in patient["operation"]}


def test_checker_finds_broken_documents(app: App) -> None:
    c, auth = app.client, app.auth
    pid = c.post("/fhir/Patient", json=PATIENT, headers={**auth, **FHIR_JSON}).json()["id"]
    doc = c.get(f"/fhir/Patient/{pid}/$summary", headers=auth).json()
    broken = json.loads(json.dumps(doc))
    broken["type"] = "collection"
    comp = broken["entry"][0]["resource"]
    comp["section"] = comp["section"][1:]  # no problems section
    comp["section"][0]["entry"] = [{"reference": "Condition/missing"}]
    del broken["entry"][1]  # the patient
    found = errors_of(broken)
    assert any("document" in e for e in found)
    assert any("11450-4" in e for e in found)
    assert any("subject must resolve" in e for e in found)
    assert any("does not resolve" in e for e in found)
    assert any("cmp-2" in e for e in found)


def test_optional_sections_and_referenced_resources(app: App) -> None:
    c, h = app.client, {**app.auth, **FHIR_JSON}
    pid = c.post("/fhir/Patient", json=PATIENT, headers=h).json()["id"]
    subject = {"reference": f"Patient/{pid}"}
    med = c.post("/fhir/Medication", json={"resourceType": "Medication", "code": {"text": "Paracétamol 1 g"}},
                 headers=h).json()["id"]
    vital = {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}
    for body in (
        {"resourceType": "MedicationStatement", "status": "active", "subject": subject,
         "medicationReference": {"reference": f"Medication/{med}"}},
        {"resourceType": "Immunization", "status": "completed", "patient": subject, "occurrenceDateTime": "2025-10-01",
         "vaccineCode": {"text": "Grippe <saison 2025>"}},
        {"resourceType": "Observation", "status": "final", "subject": subject, "category": [{"coding": [vital]}],
         "code": {"coding": [{"system": LOINC, "code": "8867-4", "display": "Heart rate"}]},
         "valueQuantity": {"value": 72, "unit": "/min"}},
        {"resourceType": "Procedure", "status": "completed", "subject": subject, "code": {"text": "Appendicectomie"}},
        {"resourceType": "Condition", "subject": subject, "code": {"text": "Rougeole"}, "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "resolved"}]}},
    ):
        assert c.post(f"/fhir/{body['resourceType']}", json=body, headers=h).status_code == 201
    doc = c.get(f"/fhir/Patient/{pid}/$summary", headers=app.auth).json()
    assert check_ips(doc) == []  # no error, and every reference resolves inside the document
    by_code = sections(doc)
    assert {k: len(v.get("entry", [])) for k, v in by_code.items()} == {
        "11450-4": 0, "48765-2": 0, "10160-0": 1, "11369-6": 1, "8716-3": 1, "47519-4": 1, "11348-0": 1}
    assert "Grippe &lt;saison 2025&gt;" in by_code["11369-6"]["text"]["div"]  # narrative escaped
    assert "Paracétamol 1 g" in by_code["10160-0"]["text"]["div"]  # from the referenced Medication
    assert f"http://testserver/fhir/Medication/{med}" in {e["fullUrl"] for e in doc["entry"]}
    # the document is valid R4 (the server's own structural validator)
    from fhirvault.domain.validation import Validator

    assert Validator.default().validate(doc) == []
