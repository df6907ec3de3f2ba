"""Break-the-glass: request, time-limited access recorded as ETREAT, alert, review queue, access history."""

from __future__ import annotations

import time
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from fhirvault.services.audit import AuditRecord
from fhirvault.web.admin import routes
from tests.conftest import App
from tests.integration.authz_support import bearer, break_glass, mint, observation, patient, put


@pytest.fixture
def env(app: App) -> dict[str, Any]:
    put(app.client, app.auth, patient("px"))
    put(app.client, app.auth, observation("px", "obs-x"))
    seen: list[AuditRecord] = []
    app.container.audit.observers.append(seen.append)
    dr = bearer(mint(app.container, role="practitioner", user="u-er", fhir_user="Practitioner/er"))
    so = bearer(mint(app.container, role="security_officer", user="u-so", scope="user/*.rs"))
    admin_client = TestClient(Starlette(routes=routes(app.container)), base_url="http://testserver")
    return {"app": app, "c": app.client, "dr": dr, "so": so, "seen": seen, "admin": admin_client}


def test_emergency_access_is_granted_recorded_alerted_and_reviewed(env: dict[str, Any]) -> None:
    c, dr, seen, app = env["c"], env["dr"], env["seen"], env["app"]
    assert c.get("/fhir/Observation/obs-x", headers=dr).status_code == 404
    r = break_glass(c, dr["Authorization"][7:], "px")
    assert r.status_code == 201, r.text
    params = {p["name"]: p for p in r.json()["parameter"]}
    grant_id = params["grant"]["valueString"]
    assert params["purposeOfUse"]["valueCode"] == "ETREAT"
    start = [s for s in seen if s.interaction == "break-the-glass"]
    assert start and start[-1].purpose_of_use == "ETREAT" and start[-1].patient == "Patient/px"
    # every access under the grant is recorded as ETREAT
    assert c.get("/fhir/Observation/obs-x", headers=dr).status_code == 200
    assert seen[-1].interaction == "read" and seen[-1].purpose_of_use == "ETREAT"
    assert c.get("/fhir/Observation?subject=Patient/px", headers=dr).json()["total"] == 1
    assert seen[-1].interaction == "search" and seen[-1].purpose_of_use == "ETREAT"
    # the security officer is alerted at once (rule break_the_glass)
    detection = app.container.detection
    assert detection is not None and app.container.alerts is not None
    app.container.alerts.flush()
    assert any(a.rule == "break_the_glass" for a in app.container.alerts.list())
    # the patient's access history shows it
    me = bearer(mint(app.container, role="patient", user="u-px", fhir_user="Patient/px", patient="px",
                     scope="patient/*.rs"))
    history = c.get("/fhir/Patient/px/$access-history", headers=me)
    assert history.status_code == 200, history.text
    assert "ETREAT" in history.text
    # and another patient's history is not theirs to read
    assert c.get("/fhir/Patient/py/$access-history", headers=me).status_code == 403
    # review queue: security officers only
    admin = env["admin"]
    assert admin.get("/admin/break-glass?status=open", headers=dr).status_code == 403
    assert admin.get("/admin/break-glass?status=open").status_code == 401
    queue = admin.get("/admin/break-glass?status=open", headers=env["so"])
    assert queue.status_code == 200
    [case] = queue.json()["grants"]
    assert case["id"] == grant_id and case["patient"] == "Patient/px" and case["user"] == "u-er"
    assert case["reason"].startswith("unconscious")
    bad = admin.post(f"/admin/break-glass/{grant_id}/review", headers=env["so"], json={"decision": "maybe",
                                                                                       "note": "x"})
    assert bad.status_code == 400
    done = admin.post(f"/admin/break-glass/{grant_id}/review", headers=env["so"],
                      json={"decision": "justified", "note": "cardiac arrest, confirmed by the ER log"})
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "closed" and done.json()["reviewer"] == "u-so"
    assert seen[-1].interaction == "break-the-glass-review" and seen[-1].detail == "decision: justified"
    again = admin.post(f"/admin/break-glass/{grant_id}/review", headers=env["so"],
                       json={"decision": "unjustified", "note": "x"})
    assert again.status_code == 409
    assert admin.get("/admin/break-glass?status=open", headers=env["so"]).json()["grants"] == []
    closed = admin.get("/admin/break-glass?status=closed", headers=env["so"]).json()["grants"]
    assert [g["decision"] for g in closed] == ["justified"]


@pytest.mark.parametrize(("reason", "purpose", "status"), [
    ("too short", "ETREAT", 400), ("a long enough reason here", "TREAT", 400), (None, "ETREAT", 400)])
def test_request_is_validated(env: dict[str, Any], reason: str | None, purpose: str, status: int) -> None:
    params: list[dict[str, str]] = [{"name": "purposeOfUse", "valueCode": purpose}]
    if reason is not None:
        params.append({"name": "reason", "valueString": reason})
    r = env["c"].post("/fhir/Patient/px/$break-glass", headers={**env["dr"], "Content-Type": "application/fhir+json"},
                      json={"resourceType": "Parameters", "parameter": params})
    assert r.status_code == status
    assert env["c"].get("/fhir/Observation/obs-x", headers=env["dr"]).status_code == 404


def test_only_clinicians_may_break_the_glass(env: dict[str, Any]) -> None:
    app = env["app"]
    for role in ("admin_staff", "patient", "auditor", "platform_admin"):
        token = mint(app.container, role=role, user=f"u-{role}", fhir_user="Practitioner/x")
        assert break_glass(env["c"], token, "px").status_code == 403
    assert break_glass(env["c"], env["app"].token, "px").status_code == 403  # a backend service
    assert break_glass(env["c"], env["dr"]["Authorization"][7:], "nobody").status_code == 404


def test_grant_expires(env: dict[str, Any]) -> None:
    env["app"].container.repository.break_glass.hours = 1.5 / 3600  # 1.5 s
    assert break_glass(env["c"], env["dr"]["Authorization"][7:], "px").status_code == 201
    assert env["c"].get("/fhir/Observation/obs-x", headers=env["dr"]).status_code == 200
    time.sleep(1.7)
    assert env["c"].get("/fhir/Observation/obs-x", headers=env["dr"]).status_code == 404
