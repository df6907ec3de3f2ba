"""A disabled SMART app: its user's access and refresh tokens are dead (refused, and inactive when
introspected), and it cannot get new ones; enabled again, a fresh login works."""

from __future__ import annotations

from tests.conftest import PATIENT, App
from tests.integration.identity_helpers import exchange, login, make_app, make_user


def test_disabling_an_app_kills_its_users_tokens(app: App) -> None:
    r = app.client.post("/fhir/Patient", json=PATIENT, headers={**app.auth, "Content-Type": "application/fhir+json"})
    pid = r.json()["id"]
    person = make_user(app.container, "pat-disabled-app", "patient", fhir_user=f"Patient/{pid}")
    client_id, _ = make_app(app.container)
    code, verifier, _ = login(app.client, client_id, person)
    tokens = exchange(app.client, client_id, code, verifier).json()
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert app.client.get(f"/fhir/Patient/{pid}", headers=bearer).status_code == 200
    creds = (app.creds["client_id"], app.creds["client_secret"])

    def introspect(token: str) -> dict[str, object]:
        return dict(app.client.post("/oauth2/introspect", data={"token": token}, auth=creds).json())

    assert introspect(tokens["refresh_token"])["active"] is True

    app.container.auth.set_client_disabled(client_id, True)
    assert app.client.get(f"/fhir/Patient/{pid}", headers=bearer).status_code == 401
    assert introspect(tokens["access_token"]) == {"active": False}
    assert introspect(tokens["refresh_token"]) == {"active": False}
    r = app.client.post("/oauth2/token", data={"grant_type": "refresh_token", "client_id": client_id,
                                               "refresh_token": tokens["refresh_token"]})
    assert (r.status_code, r.json()["error"]) == (401, "invalid_client")

    app.container.auth.set_client_disabled(client_id, False)
    app.client.cookies.clear()
    code, verifier, _ = login(app.client, client_id, person)
    fresh = exchange(app.client, client_id, code, verifier).json()
    assert app.client.get(f"/fhir/Patient/{pid}",
                          headers={"Authorization": f"Bearer {fresh['access_token']}"}).status_code == 200
    assert app.client.get(f"/fhir/Patient/{pid}", headers=bearer).status_code == 401  # the old one stays dead
