"""SMART App Launch (standalone) end to end: authorize, login, PKCE, code, tokens, refresh, revoke,
logout, and the attacks on each step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pyotp
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.conftest import PATIENT, App, Server, get_token
from tests.integration.identity_helpers import (
    APP_SCOPE,
    PASSWORD,
    REDIRECT,
    Person,
    authorize_params,
    exchange,
    form_fields,
    login,
    make_app,
    make_user,
    pkce,
)


def _patient(app: App) -> str:
    r = app.client.post("/fhir/Patient", content=orjson.dumps(PATIENT), headers={**app.auth, "Content-Type": "application/fhir+json"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _claims(token: str, app: App) -> dict[str, object]:
    return dict(jwt.decode(token, KeySet.import_key_set(app.container.auth.jwks)).claims)  # type: ignore[arg-type]


def test_discovery_documents(app: App) -> None:
    smart = app.client.get("/.well-known/smart-configuration").json()
    assert smart["code_challenge_methods_supported"] == ["S256"]
    for cap in ("launch-standalone", "client-public", "client-confidential-symmetric",
                "client-confidential-asymmetric", "sso-openid-connect", "context-standalone-patient",
                "permission-v2", "permission-patient", "permission-user", "permission-offline"):
        assert cap in smart["capabilities"]
    assert smart["authorization_endpoint"].endswith("/oauth2/authorize")
    assert smart["revocation_endpoint"].endswith("/oauth2/revoke")
    assert smart["introspection_endpoint"].endswith("/oauth2/introspect")
    oidc = app.client.get("/.well-known/openid-configuration").json()
    assert oidc["issuer"] == "http://testserver"
    assert oidc["id_token_signing_alg_values_supported"] == ["ES256"]
    assert oidc["jwks_uri"] == "http://testserver/oauth2/jwks"


def test_patient_standalone_launch_read_refresh_revoke(app: App) -> None:
    pid = _patient(app)
    person = make_user(app.container, "claire", "patient", fhir_user=f"Patient/{pid}")
    client_id, _ = make_app(app.container)
    code, verifier, params = login(app.client, client_id, person)  # no TOTP step for a patient
    r = exchange(app.client, client_id, code, verifier)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["patient"] == pid
    # patients get patient/ scopes only, even though the app may ask for user/ ones
    assert "user/" not in body["scope"] and "patient/*.cruds" in body["scope"]
    claims = _claims(body["access_token"], app)
    assert claims["sub"] == person.user_id and claims["role"] == "patient"
    assert claims["fhirUser"] == f"Patient/{pid}" and claims["patient"] == pid and claims["sid"]
    id_claims = _claims(body["id_token"], app)
    assert id_claims["aud"] == client_id and id_claims["nonce"] == params["nonce"]
    assert id_claims["fhirUser"] == f"Patient/{pid}" and id_claims["amr"] == ["pwd"]
    assert id_claims["iss"] == "http://testserver" and isinstance(id_claims["auth_time"], int)
    principal = app.container.auth.verify(body["access_token"])
    assert (principal.user, principal.role, principal.patient) == (person.user_id, "patient", pid)

    # The FHIR API accepts the token (what it may see is the policy engine's decision, not a 401).
    read = app.client.get(f"/fhir/Patient/{pid}", headers=_bearer(body["access_token"]))
    assert read.status_code != 401, read.text

    # refresh: rotation
    r2 = app.client.post("/oauth2/token", data={"grant_type": "refresh_token", "client_id": client_id,
                                                "refresh_token": body["refresh_token"]})
    assert r2.status_code == 200, r2.text
    second = r2.json()
    assert second["refresh_token"] != body["refresh_token"] and second["patient"] == pid
    # revoke the new access token: refused at once
    assert app.client.get(f"/fhir/Patient/{pid}", headers=_bearer(second["access_token"])).status_code != 401
    t0 = time.perf_counter()
    rv = app.client.post("/oauth2/revoke", data={"token": second["access_token"], "client_id": client_id})
    assert rv.status_code == 200
    after = app.client.get(f"/fhir/Patient/{pid}", headers=_bearer(second["access_token"]))
    print(f"revocation to refusal: {(time.perf_counter() - t0) * 1000:.1f} ms")
    assert after.status_code == 401
    # revoke the refresh token: its whole family goes, the first access token too
    assert app.client.post("/oauth2/revoke", data={"token": second["refresh_token"],
                                                   "client_id": client_id}).status_code == 200
    r3 = app.client.post("/oauth2/token", data={"grant_type": "refresh_token", "client_id": client_id,
                                                "refresh_token": second["refresh_token"]})
    assert r3.status_code == 400 and r3.json()["error"] == "invalid_grant"
    assert app.client.get(f"/fhir/Patient/{pid}", headers=_bearer(body["access_token"])).status_code == 401


def test_practitioner_launch_needs_totp_and_chooses_patient(app: App) -> None:
    pid = _patient(app)
    person = make_user(app.container, "dr.house", "practitioner", fhir_user="Practitioner/p1", org="o1")
    client_id, secret = make_app(app.container, public=False)
    assert secret is not None
    code, verifier, _ = login(app.client, client_id, person, patient=pid)
    r = exchange(app.client, client_id, code, verifier, secret)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["patient"] == pid and "user/*.cruds" in body["scope"]
    claims = _claims(body["access_token"], app)
    assert claims["role"] == "practitioner" and claims["fhirUser"] == "Practitioner/p1" and claims["org"] == "o1"
    id_claims = _claims(body["id_token"], app)
    assert "otp" in id_claims["amr"]  # type: ignore[operator]
    # a confidential app must authenticate: the client id alone is refused
    code2, verifier2, _ = login(app.client, client_id, person, patient=pid)  # SSO: the session is reused
    assert exchange(app.client, client_id, code2, verifier2).status_code == 401


def test_pkce_is_mandatory_and_s256_only(app: App) -> None:
    client_id, _ = make_app(app.container)
    verifier, challenge = pkce()
    for change in ({"code_challenge": ""}, {"code_challenge_method": "plain", "code_challenge": verifier},
                   {"code_challenge_method": ""}):
        params = {k: v for k, v in {**authorize_params(client_id, challenge), **change}.items() if v != ""}
        r = app.client.get("/oauth2/authorize", params=params, follow_redirects=False)
        assert r.status_code == 303, r.text
        q = parse_qs(urlsplit(r.headers["location"]).query)
        assert q["error"] == ["invalid_request"] and q["state"] == [params["state"]]


def test_aud_must_be_this_server(app: App) -> None:
    client_id, _ = make_app(app.container)
    _, challenge = pkce()
    r = app.client.get("/oauth2/authorize", params=authorize_params(client_id, challenge,
                                                                    aud="https://other.example/fhir"),
                       follow_redirects=False)
    assert r.status_code == 303
    assert parse_qs(urlsplit(r.headers["location"]).query)["error"] == ["invalid_request"]
    ok = app.client.get("/oauth2/authorize", params=authorize_params(client_id, challenge,
                                                                     aud="http://testserver/fhir"))
    assert ok.status_code == 200


def test_wrong_or_missing_verifier_is_refused(app: App) -> None:
    person = make_user(app.container, "pat1", "patient", fhir_user="Patient/x1")
    client_id, _ = make_app(app.container)
    code, _verifier, _ = login(app.client, client_id, person)
    other, _ = pkce()
    assert exchange(app.client, client_id, code, other).json()["error"] == "invalid_grant"
    code, _verifier, _ = login(app.client, client_id, person)
    r = app.client.post("/oauth2/token", data={"grant_type": "authorization_code", "code": code,
                                               "redirect_uri": REDIRECT, "client_id": client_id})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


def test_unregistered_redirect_uri_is_an_error_page_never_a_redirect(app: App) -> None:
    client_id, _ = make_app(app.container)
    _, challenge = pkce()
    for uri in ("https://evil.example/cb", REDIRECT + "/extra", REDIRECT + "?x=1", "http://127.0.0.1:9999/Callback"):
        r = app.client.get("/oauth2/authorize", params=authorize_params(client_id, challenge, redirect_uri=uri),
                           follow_redirects=False)
        assert r.status_code == 400 and "location" not in r.headers
        assert "text/html" in r.headers["content-type"]
    r = app.client.get("/oauth2/authorize", params=authorize_params("fv-unknown", challenge), follow_redirects=False)
    assert r.status_code == 400 and "location" not in r.headers


def test_login_page_headers(app: App) -> None:
    client_id, _ = make_app(app.container)
    _, challenge = pkce()
    r = app.client.get("/oauth2/authorize", params=authorize_params(client_id, challenge))
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "<script" not in r.text and 'name="csrf"' in r.text


def test_csrf_token_is_required(app: App) -> None:
    client_id, _ = make_app(app.container)
    person = make_user(app.container, "pat2", "patient", fhir_user="Patient/x2")
    _, challenge = pkce()
    page = app.client.get("/oauth2/authorize", params=authorize_params(client_id, challenge)).text
    fields = form_fields(page)
    r = app.client.post("/oauth2/authorize", data={**fields, "csrf": "forged", "username": person.username,
                                                   "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 400 and "location" not in r.headers


def test_code_replay_is_refused_and_revokes_its_tokens(app: App) -> None:
    pid = _patient(app)
    person = make_user(app.container, "pat3", "patient", fhir_user=f"Patient/{pid}")
    client_id, _ = make_app(app.container)
    code, verifier, _ = login(app.client, client_id, person)
    first = exchange(app.client, client_id, code, verifier)
    assert first.status_code == 200
    tokens = first.json()
    replay = exchange(app.client, client_id, code, verifier)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    assert app.client.get(f"/fhir/Patient/{pid}", headers=_bearer(tokens["access_token"])).status_code == 401
    r = app.client.post("/oauth2/token", data={"grant_type": "refresh_token", "client_id": client_id,
                                               "refresh_token": tokens["refresh_token"]})
    assert r.status_code == 400
    events = _security_events(app, code, tokens["access_token"], tokens["refresh_token"], verifier)
    assert ("code-replay", person.user_id) in events and ("token", person.user_id) in events


def _security_events(app: App, *secrets: str) -> set[tuple[str, str | None]]:
    rows = app.container.store.audit_entries(app.settings.tenant, 0, 10_000)
    docs = [app.container.audit.decrypt(seq, ts, blob) for seq, ts, blob in rows]
    text = orjson.dumps(docs).decode()
    assert not [s for s in secrets if s in text]  # no codes or tokens in the audit trail
    return {(str(d.get("interaction")), d.get("user")) for d in docs}


def test_code_bound_to_client_and_redirect_uri(app: App) -> None:
    person = make_user(app.container, "pat4", "patient", fhir_user="Patient/x4")
    client_a, _ = make_app(app.container)
    client_b, _ = make_app(app.container)
    code, verifier, _ = login(app.client, client_a, person)
    assert exchange(app.client, client_b, code, verifier).json()["error"] == "invalid_grant"
    code, verifier, _ = login(app.client, client_a, person)
    r = app.client.post("/oauth2/token", data={"grant_type": "authorization_code", "code": code,
                                               "redirect_uri": REDIRECT + "x", "code_verifier": verifier,
                                               "client_id": client_a})
    assert r.json()["error"] == "invalid_grant"


def test_refresh_reuse_revokes_the_family(app: App) -> None:
    pid = _patient(app)
    person = make_user(app.container, "pat5", "patient", fhir_user=f"Patient/{pid}")
    client_id, _ = make_app(app.container)
    code, verifier, _ = login(app.client, client_id, person)
    first = exchange(app.client, client_id, code, verifier).json()

    def refresh(token: str, **extra: str) -> dict[str, str]:
        r = app.client.post("/oauth2/token", data={"grant_type": "refresh_token", "client_id": client_id,
                                                   "refresh_token": token, **extra})
        return dict(r.json(), status=r.status_code)

    second = refresh(first["refresh_token"])
    assert second["status"] == 200
    stolen = refresh(first["refresh_token"])  # the old one again: reuse
    assert stolen["status"] == 400 and stolen["error"] == "invalid_grant"
    assert refresh(second["refresh_token"])["status"] == 400  # the legitimate holder's is dead too
    assert ("refresh-reuse", person.user_id) in _security_events(app, first["refresh_token"],
                                                                  second["refresh_token"])
    assert app.client.get(f"/fhir/Patient/{pid}", headers=_bearer(second["access_token"])).status_code == 401


def test_refresh_reuse_with_a_wider_scope_still_revokes_the_family(app: App) -> None:
    """A stolen, already rotated refresh token presented with a wider scope is a reuse first: asking for
    more must not turn the reuse into a harmless invalid_scope that leaves the thief's copy alive."""
    pid = _patient(app)
    person = make_user(app.container, "pat5w", "patient", fhir_user=f"Patient/{pid}")
    client_id, _ = make_app(app.container)
    code, verifier, _ = login(app.client, client_id, person)
    first = exchange(app.client, client_id, code, verifier).json()

    def refresh(token: str, **extra: str) -> dict[str, str]:
        r = app.client.post("/oauth2/token", data={"grant_type": "refresh_token", "client_id": client_id,
                                                   "refresh_token": token, **extra})
        return dict(r.json(), status=r.status_code)

    second = refresh(first["refresh_token"])
    assert second["status"] == 200
    stolen = refresh(first["refresh_token"], scope="user/*.cruds")  # reuse, and asking for more
    assert stolen["status"] == 400 and stolen["error"] == "invalid_grant"
    assert refresh(second["refresh_token"])["status"] == 400  # the whole family is dead
    assert ("refresh-reuse", person.user_id) in _security_events(app, first["refresh_token"],
                                                                  second["refresh_token"])
    assert app.client.get(f"/fhir/Patient/{pid}", headers=_bearer(second["access_token"])).status_code == 401


def test_scope_escalation_on_refresh_is_refused(app: App) -> None:
    person = make_user(app.container, "pat6", "patient", fhir_user="Patient/x6")
    client_id, _ = make_app(app.container)
    code, verifier, _ = login(app.client, client_id, person,
                              scope="openid offline_access patient/Observation.rs")
    tokens = exchange(app.client, client_id, code, verifier).json()
    assert tokens["scope"] == "patient/Observation.rs openid offline_access"
    # (four tries: a fifth failure from one source would trip the brute-force throttle)
    for wider in ("patient/*.rs", "patient/Observation.cruds", "user/Observation.rs",
                  "patient/Observation.rs fhirUser"):
        r = app.client.post("/oauth2/token", data={"grant_type": "refresh_token", "client_id": client_id,
                                                   "refresh_token": tokens["refresh_token"], "scope": wider})
        assert r.status_code == 400 and r.json()["error"] == "invalid_scope", wider
    narrower = app.client.post("/oauth2/token", data={"grant_type": "refresh_token", "client_id": client_id,
                                                      "refresh_token": tokens["refresh_token"],
                                                      "scope": "patient/Observation.r"})
    assert narrower.status_code == 200, narrower.text
    assert narrower.json()["scope"] == "patient/Observation.r"


def test_scope_is_narrowed_to_the_registration(app: App) -> None:
    person = make_user(app.container, "pat7", "patient", fhir_user="Patient/x7")
    client_id, _ = make_app(app.container, scope="openid patient/Observation.rs")
    code, verifier, _ = login(app.client, client_id, person, scope="openid patient/*.cruds offline_access")
    body = exchange(app.client, client_id, code, verifier).json()
    assert body["scope"] == "patient/Observation.rs openid"
    assert "refresh_token" not in body  # offline_access was not registered


def test_introspection_and_logout(app: App) -> None:
    pid = _patient(app)
    person = make_user(app.container, "pat8", "patient", fhir_user=f"Patient/{pid}")
    client_id, _ = make_app(app.container)
    code, verifier, _ = login(app.client, client_id, person)
    tokens = exchange(app.client, client_id, code, verifier).json()
    creds = (app.creds["client_id"], app.creds["client_secret"])
    info = app.client.post("/oauth2/introspect", data={"token": tokens["access_token"]}, auth=creds).json()
    assert info["active"] is True and info["sub"] == person.user_id and info["patient"] == pid
    rinfo = app.client.post("/oauth2/introspect", data={"token": tokens["refresh_token"]}, auth=creds).json()
    assert rinfo["active"] is True and rinfo["token_type"] == "refresh_token"
    # public clients cannot introspect
    r = app.client.post("/oauth2/introspect", data={"token": tokens["access_token"], "client_id": client_id})
    assert r.status_code == 401
    # logout (with the browser's session cookie) revokes the session's tokens at once
    r = app.client.post("/logout")
    assert r.status_code == 200
    assert app.client.get(f"/fhir/Patient/{pid}", headers=_bearer(tokens["access_token"])).status_code == 401
    assert app.client.post("/oauth2/introspect", data={"token": tokens["access_token"]},
                           auth=creds).json() == {"active": False}
    assert app.client.post("/oauth2/introspect", data={"token": tokens["refresh_token"]},
                           auth=creds).json() == {"active": False}
    # and the next authorization asks for a login again
    _, challenge = pkce()
    page = app.client.get("/oauth2/authorize", params=authorize_params(client_id, challenge),
                          follow_redirects=False)
    assert page.status_code == 200 and 'value="login"' in page.text


def test_logout_with_bearer_token(app: App) -> None:
    person = make_user(app.container, "pat9", "patient", fhir_user="Patient/x9")
    client_id, _ = make_app(app.container)
    code, verifier, _ = login(app.client, client_id, person)
    tokens = exchange(app.client, client_id, code, verifier).json()
    app.client.cookies.clear()
    assert app.client.post("/logout", headers=_bearer(tokens["access_token"])).status_code == 200
    with pytest.raises(Exception, match="revoked"):
        app.container.auth.verify(tokens["access_token"])


def test_client_credentials_still_work_and_can_be_revoked(app: App) -> None:
    token = get_token(app.client, app.creds)
    assert app.client.get("/fhir/Patient?_count=1", headers=_bearer(token)).status_code == 200
    creds = (app.creds["client_id"], app.creds["client_secret"])
    assert app.client.post("/oauth2/revoke", data={"token": token}, auth=creds).status_code == 200
    assert app.client.get("/fhir/Patient?_count=1", headers=_bearer(token)).status_code == 401
    # unknown tokens: 200 as well (RFC 7009 §2.2)
    assert app.client.post("/oauth2/revoke", data={"token": "nonsense"}, auth=creds).status_code == 200


def test_app_registration_rules(app: App) -> None:
    from fhirvault.domain.scopes import ScopeError

    auth = app.container.auth
    for scope, uris in (("system/*.cruds", [REDIRECT]), ("patient/*.rs", ["http://evil.example/cb"]),
                        ("patient/*.rs", ["https://a.example/cb#frag"]), ("patient/*.rs", []),
                        ("patient/*.rs launch/encounter", [REDIRECT])):
        with pytest.raises(ScopeError):
            auth.register_app("x", scope, uris, public=True)
    assert APP_SCOPE


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fhirvault.cli.main", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items()
                                                       if not k.startswith("FHIRVAULT_")})


def test_real_server_cli_users_and_practitioner_launch(server: Server) -> None:
    """Over real HTTP against `fhirvault serve`, with users and the app created by the CLI."""
    data = str(server.data_dir)
    made = _cli("user", "create", "--data-dir", data, "--username", "Dr.Real", "--role", "practitioner",
                "--fhir-user", "Practitioner/r1", "--org", "Organization/o9", "--clearance", "R",
                stdin=PASSWORD + "\n")
    assert made.returncode == 0, made.stderr
    uri = next(line for line in made.stdout.splitlines() if line.startswith("otpauth://"))
    assert PASSWORD not in made.stdout + made.stderr
    totp = pyotp.parse_uri(uri)
    assert _cli("user", "create", "--data-dir", data, "--username", "dr.real", "--role", "nurse",
                stdin=PASSWORD + "\n").returncode == 2  # duplicate, case-insensitively
    app_out = _cli("client", "create-app", "--data-dir", data, "--name", "Viewer", "--public",
                   "--scope", APP_SCOPE, "--redirect-uri", REDIRECT)
    assert app_out.returncode == 0, app_out.stderr
    client_id = json.loads(app_out.stdout)["client_id"]
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        pid = http.post("/fhir/Patient", json=PATIENT, headers={"Authorization": f"Bearer {server.token()}",
                                                              "Content-Type": "application/fhir+json"}).json()["id"]
        person = Person(user_id="", username="dr.real", totp=totp)
        code, verifier, _ = login(http, client_id, person, patient=pid)
        tokens = exchange(http, client_id, code, verifier).json()
        claims = _claims_of(tokens["access_token"], http)
        assert claims["role"] == "practitioner" and claims["clearance"] == ["R"] and claims["org"] == "o9"
        assert claims["patient"] == pid
        fhir = http.get(f"/fhir/Patient/{pid}", headers=_bearer(tokens["access_token"]))
        assert fhir.status_code != 401
        refreshed = http.post("/oauth2/token", data={"grant_type": "refresh_token", "client_id": client_id,
                                                     "refresh_token": tokens["refresh_token"]})
        assert refreshed.status_code == 200
        new = refreshed.json()
        assert http.post("/logout").status_code == 200
        for token in (tokens["access_token"], new["access_token"]):
            assert http.get(f"/fhir/Patient/{pid}", headers=_bearer(token)).status_code == 401
        assert http.post("/oauth2/token", data={"grant_type": "refresh_token", "client_id": client_id,
                                                "refresh_token": new["refresh_token"]}).status_code == 400
    log = server.log_path.read_text()
    for secret in (PASSWORD, code, tokens["access_token"], tokens["refresh_token"], new["refresh_token"], uri):
        assert secret not in log
    # admin operations
    assert _cli("user", "disable", "--data-dir", data, "--username", "dr.real").returncode == 0
    assert _cli("user", "unlock", "--data-dir", data, "--username", "dr.real").returncode == 0
    reset = _cli("user", "reset-totp", "--data-dir", data, "--username", "dr.real")
    assert reset.returncode == 0 and reset.stdout.startswith("otpauth://")
    listed = _cli("user", "list", "--data-dir", data)
    row = json.loads(listed.stdout.splitlines()[0])
    assert row["username"] == "dr.real" and row["disabled"] is True and "totp" in row
    assert "$argon2" not in listed.stdout


def _claims_of(token: str, http: httpx.Client) -> dict[str, object]:
    keys = KeySet.import_key_set(http.get("/oauth2/jwks").json())
    return dict(jwt.decode(token, keys).claims)
