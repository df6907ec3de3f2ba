"""End to end: a SMART app launch where the professional signs in at a real external OpenID provider.

The provider is a real `oidc-provider-mock` process; fhirvault is configured for it through its config
file (`[[identity_providers]]`, secret in a file), and auto-provisions the practitioner from the mapped
claims. The resulting user token reads a patient only through a care relationship recorded in FHIR.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from starlette.testclient import TestClient

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.web.app import create_app
from tests.conftest import PATIENT, get_token
from tests.integration.identity_helpers import authorize_params, exchange, make_app, pkce
from tests.integration.test_federation import mock_issuer  # noqa: F401 - the real provider fixture

BASE = "http://testserver"


@pytest.fixture
def federated_app(tmp_path: Path, mock_issuer: str) -> Iterator[tuple[TestClient, object, dict[str, str]]]:  # noqa: F811
    data = tmp_path / "data"
    secret = tmp_path / "idp-secret"
    secret.write_text("s3cret\n")
    config = tmp_path / "fhirvault.toml"
    config.write_text(f"""
public_base_url = "{BASE}"

[[identity_providers]]
name = "mock"
display_name = "Hospital IdP"
issuer = "{mock_issuer}"
client_id = "fhirvault"
client_secret_file = "{secret}"
role_claim = "roles"
role_map = {{ doctor = "practitioner" }}
fhir_user_claim = "fhirUser"
auto_provision = true
""")
    settings = load_settings({"data_dir": data}, environ={}, config_file=config)
    creds = json.loads(initialise(settings).read_text())
    container = build(settings)
    with TestClient(create_app(container), base_url=BASE) as client:
        yield client, container, creds


def test_smart_launch_with_external_login_then_care_relationship_access(federated_app: tuple) -> None:
    client, container, creds = federated_app
    admin = {"Authorization": f"Bearer {get_token(client, creds)}"}
    pid = client.post("/fhir/Patient", json=PATIENT, headers=admin).json()["id"]
    other = client.post("/fhir/Patient", json={**PATIENT, "name": [{"family": "Autre"}]}, headers=admin).json()["id"]
    client.post("/fhir/CareTeam", headers=admin, json={
        "resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{pid}"},
        "participant": [{"member": {"reference": "Practitioner/p-1"}}]}).raise_for_status()

    app_id, _ = make_app(container)
    verifier, challenge = pkce()
    params = authorize_params(app_id, challenge, scope="openid fhirUser user/*.rs", aud=f"{BASE}/fhir")
    page = client.get("/oauth2/authorize", params=params)
    assert page.status_code == 200 and 'href="/login/oidc/mock"' in page.text and "Hospital IdP" in page.text
    start = client.get("/login/oidc/mock", follow_redirects=False)
    assert start.status_code == 303
    # The browser at the provider: its login form, answered as "alice" (a doctor who used a second factor).
    idp_url = start.headers["location"]
    with httpx.Client(follow_redirects=False) as browser:
        assert browser.get(idp_url).status_code == 200
        back = browser.post(idp_url, data={"sub": "alice"})
    assert back.status_code == 302
    callback = urlsplit(back.headers["location"])
    assert f"{callback.scheme}://{callback.netloc}{callback.path}" == f"{BASE}/login/oidc/mock/callback"
    r = client.get(f"{callback.path}?{callback.query}", follow_redirects=False)
    assert r.status_code == 303, r.text[:300]
    code = parse_qs(urlsplit(r.headers["location"]).query)["code"][0]
    tokens = exchange(client, app_id, code, verifier).json()
    assert "id_token" in tokens
    principal = container.auth.verify(tokens["access_token"])
    assert principal.role == "practitioner" and principal.fhir_user == "Practitioner/p-1"

    doctor = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert client.get(f"/fhir/Patient/{pid}", headers=doctor).status_code == 200  # through the CareTeam
    assert client.get(f"/fhir/Patient/{other}", headers=doctor).status_code == 404  # no relationship
    found = client.get("/fhir/Patient", headers=doctor).json()
    assert [e["resource"]["id"] for e in found.get("entry", [])] == [pid]


def test_a_provider_identity_without_a_mapped_role_is_refused(federated_app: tuple) -> None:
    client, container, _ = federated_app
    app_id, _ = make_app(container)
    _, challenge = pkce()
    client.get("/oauth2/authorize", params=authorize_params(app_id, challenge, scope="openid user/*.rs",
                                                              aud=f"{BASE}/fhir"))
    start = client.get("/login/oidc/mock", follow_redirects=False)
    with httpx.Client(follow_redirects=False) as browser:
        back = browser.post(start.headers["location"], data={"sub": "bob"})  # role "visitor": not mapped
    callback = urlsplit(back.headers["location"])
    r = client.get(f"{callback.path}?{callback.query}", follow_redirects=False)
    assert r.status_code == 401 and "location" not in r.headers
