"""Hostile and malformed requests: each gets the right status and an OperationOutcome."""

from __future__ import annotations

import pytest

from tests.conftest import PATIENT, App

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def outcome(r: object) -> dict[str, object]:
    body = r.json()  # type: ignore[attr-defined]
    assert body["resourceType"] == "OperationOutcome", body
    return body


def test_malformed_json_is_400(app: App) -> None:
    r = app.client.post("/fhir/Patient", content=b'{"resourceType": "Patient",', headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 400
    outcome(r)


@pytest.mark.parametrize("body", [b"[]", b"42", b'"Patient"', b"null"])
def test_non_object_body_is_400(app: App, body: bytes) -> None:
    r = app.client.post("/fhir/Patient", content=body, headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 400
    outcome(r)


def test_type_mismatch_and_id_mismatch(app: App) -> None:
    r = app.client.post("/fhir/Observation", json=PATIENT, headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 400
    r = app.client.put("/fhir/Patient/abc", json=dict(PATIENT, id="xyz"), headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 400
    r = app.client.put("/fhir/Patient/abc", json=PATIENT, headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 400  # no id in the body


def test_validation_failure_names_the_path(app: App) -> None:
    bad = dict(PATIENT, gender="robot", birthDate="12/05/1984", famly="x")
    r = app.client.post("/fhir/Patient", json=bad, headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 422
    paths = {e for i in outcome(r)["issue"] for e in i.get("expression", [])}  # type: ignore[union-attr]
    assert {"Patient.gender", "Patient.birthDate", "Patient.famly"} <= paths
    # the submitted values are not echoed back in diagnostics
    assert "robot" not in r.text and "12/05/1984" not in r.text


def test_unknown_type_is_404_and_bad_id_400(app: App) -> None:
    assert app.client.get("/fhir/Spaceship/1", headers=app.auth).status_code == 404
    assert app.client.get("/fhir/Patient/" + "x" * 65, headers=app.auth).status_code == 400
    assert app.client.get("/fhir/Patient/does-not-exist", headers=app.auth).status_code == 404


def test_media_types(app: App) -> None:
    r = app.client.post("/fhir/Patient", content=b"Patient", headers={**app.auth, "Content-Type": "text/plain"})
    assert r.status_code == 415
    outcome(r)
    r = app.client.get("/fhir/metadata", headers={"Accept": "text/html"})
    assert r.status_code == 406
    r = app.client.get("/fhir/metadata", params={"_format": "turtle"})
    assert r.status_code == 406
    r = app.client.get("/fhir/metadata", headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    r = app.client.patch("/fhir/Patient/x", json=[], headers={**app.auth, "Content-Type": "application/fhir+json"})
    assert r.status_code == 415


def test_oversized_body_is_413(app: App) -> None:
    big = b'{"resourceType":"Patient","name":[{"text":"' + b"a" * (17 * 1024 * 1024) + b'"}]}'
    r = app.client.post("/fhir/Patient", content=big, headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 413
    outcome(r)


def test_bad_etags_and_methods(app: App) -> None:
    pid = app.client.post("/fhir/Patient", json=PATIENT, headers={**app.auth, **FHIR_JSON}).json()["id"]
    r = app.client.put(f"/fhir/Patient/{pid}", json=dict(PATIENT, id=pid),
                       headers={**app.auth, **FHIR_JSON, "If-Match": "garbage"})
    assert r.status_code == 400
    r = app.client.put(f"/fhir/Patient/{pid}", json=dict(PATIENT, id=pid),
                       headers={**app.auth, **FHIR_JSON, "If-Match": 'W/"9"'})
    assert r.status_code == 412
    assert app.client.post(f"/fhir/Patient/{pid}", json=PATIENT, headers={**app.auth, **FHIR_JSON}).status_code == 405
    assert app.client.get(f"/fhir/Patient/{pid}/_history/abc", headers=app.auth).status_code == 400
    assert app.client.get("/fhir/Patient/_history", params={"_since": "yesterday"}, headers=app.auth).status_code == 400
    assert app.client.get("/fhir/Patient/_history", params={"_count": "-1"}, headers=app.auth).status_code == 400


def test_deep_nesting_does_not_crash(app: App) -> None:
    deep = b'{"resourceType":"Patient","extension":' + b'[{"url":"x","extension":' * 3000 + b"[]" + b"}]" * 3000 + b"}"
    r = app.client.post("/fhir/Patient", content=deep, headers={**app.auth, **FHIR_JSON})
    assert r.status_code in (400, 422)
    outcome(r)
    assert app.client.get("/fhir/metadata").status_code == 200


def test_unknown_route_is_404_outcome(app: App) -> None:
    r = app.client.get("/nope")
    assert r.status_code == 404
    outcome(r)


def test_lenient_validation_accepts_unknown_elements_only(tmp_path: object) -> None:
    import json
    from pathlib import Path

    from starlette.testclient import TestClient

    from fhirvault.bootstrap import initialise
    from fhirvault.config import load_settings
    from fhirvault.container import build
    from fhirvault.web.app import create_app
    from tests.conftest import get_token

    settings = load_settings({"data_dir": Path(str(tmp_path)) / "d"}, environ={"FHIRVAULT_VALIDATION": "lenient"})
    creds = json.loads(initialise(settings).read_text())
    with TestClient(create_app(build(settings))) as client:
        auth = {"Authorization": f"Bearer {get_token(client, creds)}", **FHIR_JSON}
        ok = client.post("/fhir/Patient", json=dict(PATIENT, famly="x"), headers=auth)
        assert ok.status_code == 201 and ok.json()["famly"] == "x"
        assert client.post("/fhir/Patient", json=dict(PATIENT, gender="robot"), headers=auth).status_code == 422


def test_wrong_method_on_oauth_route_is_405_outcome(app: App) -> None:
    r = app.client.get("/oauth2/token")
    assert r.status_code == 405
    outcome(r)
