"""INS (NIR/NIA) on Patient over HTTP: checked on create and update, qualified status rule, search by INS."""

from __future__ import annotations

from typing import Any

import pytest

from fhirvault.domain.ins import NIA_SYSTEM, NIR_SYSTEM, RELIABILITY_URL
from tests.conftest import App

FHIR_JSON = {"Content-Type": "application/fhir+json"}
TYPES = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"
STATUS_CS = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0445"
NIR = "180017505600103"
NIA = "700000000000137"


def patient(value: str, system: str = NIR_SYSTEM, status: str | None = None, verified: bool = False) -> dict[str, Any]:
    p: dict[str, Any] = {
        "resourceType": "Patient", "name": [{"use": "official", "family": "Martin", "given": ["Claire"]}],
        "identifier": [{"use": "official", "type": {"coding": [{"system": TYPES, "code":
                                                                 "INS-NIR" if system == NIR_SYSTEM else "INS-NIA"}]},
                        "system": system, "value": value}],
        "gender": "female", "birthDate": "1980-01-15"}
    if status:
        subs: list[dict[str, Any]] = [{"url": "identityStatus", "valueCoding": {"system": STATUS_CS, "code": status}}]
        if verified:
            subs += [{"url": "dateCollection", "valueDate": "2026-01-05"},
                     {"url": "validationMode", "valueCoding": {"code": "CN"}},
                     {"url": "validationDate", "valueDate": "2026-01-05"}]
        p["extension"] = [{"url": RELIABILITY_URL, "extension": subs}]
    return p


def test_ins_checked_on_write(app: App, caplog: pytest.LogCaptureFixture) -> None:
    c, h = app.client, {**app.auth, **FHIR_JSON}
    r = c.post("/fhir/Patient", json=patient("180017505600104"), headers=h)  # wrong key
    assert r.status_code == 422
    issue = r.json()["issue"][0]
    assert issue["code"] == "value" and issue["expression"] == ["Patient.identifier[0].value"]
    assert "180017505600104" not in r.text  # the number is never echoed
    assert c.post("/fhir/Patient", json=patient("1800175056001"), headers=h).status_code == 422  # no key
    # qualified without INSi retrieval and identity check: refused
    r = c.post("/fhir/Patient", json=patient(NIR, status="QUAL"), headers=h)
    assert r.status_code == 422 and r.json()["issue"][0]["code"] == "business-rule"
    assert "validationMode" in r.json()["issue"][0]["diagnostics"]
    created = c.post("/fhir/Patient", json=patient(NIR, status="VALI"), headers=h)
    assert created.status_code == 201
    pid = created.json()["id"]
    # update: the same rules
    upgrade = {**patient(NIR, status="QUAL"), "id": pid}
    assert c.put(f"/fhir/Patient/{pid}", json=upgrade, headers=h).status_code == 422
    upgrade = {**patient(NIR, status="QUAL", verified=True), "id": pid}
    assert c.put(f"/fhir/Patient/{pid}", json=upgrade, headers=h).status_code == 200
    patch = [{"op": "replace", "path": "/identifier/0/value", "value": "180017505600199"}]
    r = c.patch(f"/fhir/Patient/{pid}", json=patch, headers={**app.auth, "Content-Type": "application/json-patch+json"})
    assert r.status_code == 422
    # $validate says the same
    r = c.post("/fhir/Patient/$validate", json=patient("180017505600104"), headers=h)
    assert r.json()["issue"][0]["code"] == "value"
    # NIA
    assert c.post("/fhir/Patient", json=patient(NIA, NIA_SYSTEM), headers=h).status_code == 201
    assert all(NIR not in rec.getMessage() and "180017505600104" not in rec.getMessage() for rec in caplog.records)


def test_search_by_ins(app: App) -> None:
    c, h = app.client, {**app.auth, **FHIR_JSON}
    pid = c.post("/fhir/Patient", json=patient(NIR), headers=h).json()["id"]
    nia_id = c.post("/fhir/Patient", json=patient(NIA, NIA_SYSTEM), headers=h).json()["id"]
    c.post("/fhir/Patient", json=patient("260058815400233"), headers=h)

    def found(**params: str) -> list[str]:
        r = c.get("/fhir/Patient", params=params, headers=app.auth)
        assert r.status_code == 200, r.text
        return [e["resource"]["id"] for e in r.json().get("entry", []) if e["search"]["mode"] == "match"]

    assert found(identifier=f"{NIR_SYSTEM}|{NIR}") == [pid]
    assert found(identifier=f"{NIA_SYSTEM}|{NIR}") == []  # the system counts
    assert found(identifier=f"{NIA_SYSTEM}|{NIA}") == [nia_id]
    assert found(**{"identifier:of-type": f"{TYPES}|INS-NIR|{NIR}"}) == [pid]
    assert found(**{"identifier:of-type": f"{TYPES}|INS-NIA|{NIR}"}) == []
