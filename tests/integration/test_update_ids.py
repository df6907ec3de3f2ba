"""R4 update: the body's id must be the URL's (http.html#update: 400 otherwise), on every write path."""

from __future__ import annotations

from typing import Any

from tests.conftest import PATIENT, App

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _patient(app: App, pid: str, family: str) -> None:
    r = app.client.put(f"/fhir/Patient/{pid}", json=dict(PATIENT, id=pid, name=[{"family": family}]),
                       headers={**app.auth, **FHIR_JSON})
    assert r.status_code in (200, 201), r.text


def _family(app: App, pid: str) -> Any:
    return app.client.get(f"/fhir/Patient/{pid}", headers=app.auth).json()["name"][0]["family"]


def test_put_with_another_id_in_the_body_is_400_everywhere(app: App) -> None:
    _patient(app, "abc", "Keep")
    _patient(app, "xyz", "Other")
    h = {**app.auth, **FHIR_JSON}
    wrong = dict(PATIENT, id="xyz", name=[{"family": "Changed"}])
    r = app.client.put("/fhir/Patient/abc", json=wrong, headers=h)
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["id"]
    entry = {"resource": wrong, "request": {"method": "PUT", "url": "Patient/abc"}}
    r = app.client.post("/fhir", json={"resourceType": "Bundle", "type": "batch", "entry": [entry]}, headers=h)
    assert r.status_code == 200 and r.json()["entry"][0]["response"]["status"] == "400"
    r = app.client.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [entry]}, headers=h)
    assert r.status_code == 400
    # conditional update: the condition finds abc, the body names xyz
    r = app.client.put("/fhir/Patient?family=Keep", json=wrong, headers=h)
    assert r.status_code == 400
    cond = {"resource": wrong, "request": {"method": "PUT", "url": "Patient?family=Keep"}}
    r = app.client.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [cond]}, headers=h)
    assert r.status_code == 400, r.text  # was 200: the transaction overwrote abc with the body meant for xyz
    assert (_family(app, "abc"), _family(app, "xyz")) == ("Keep", "Other")
