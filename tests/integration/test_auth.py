"""OAuth2 client credentials, SMART scopes and token checks."""

from __future__ import annotations

import base64
import time
import uuid

import orjson
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from tests.conftest import PATIENT, App, get_token, observation

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def test_missing_token_is_401_with_challenge(app: App) -> None:
    r = app.client.get("/fhir/Patient/x")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["resourceType"] == "OperationOutcome"
    assert app.client.get("/fhir/_history").status_code == 401
    assert app.client.post("/fhir/Patient", json=PATIENT, headers=FHIR_JSON).status_code == 401


def _tamper(token: str) -> str:
    header, payload, sig = token.split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["scope"] = "system/*.cruds system/AuditEvent.cruds"
    forged = base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=").decode()
    return f"{header}.{forged}.{sig}"


def _alg_none(token: str) -> str:
    _, payload, _ = token.split(".")
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"at+jwt"}').rstrip(b"=").decode()
    return f"{header}.{payload}."


@pytest.mark.parametrize("forge", [_tamper, _alg_none, lambda t: t[:-4] + "AAAA", lambda t: "not-a-jwt"])
def test_forged_tokens_are_401(app: App, forge: object) -> None:
    bad = forge(app.token)  # type: ignore[operator]
    r = app.client.get("/fhir/Patient/x", headers={"Authorization": f"Bearer {bad}"})
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_token_signed_by_another_key_is_401(app: App) -> None:
    other = ECKey.generate_key("P-256")
    now = int(time.time())
    claims = {"iss": app.container.auth.issuer, "aud": app.container.auth.audience, "sub": "x", "tenant": "default",
              "scope": "system/*.cruds", "iat": now, "nbf": now, "exp": now + 60, "jti": "j"}
    token = jwt.encode({"alg": "ES256", "kid": app.container.auth.kid, "typ": "at+jwt"}, claims, other)
    assert app.client.get("/fhir/Patient/x", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_wrong_secret_and_unknown_client(app: App) -> None:
    r = app.client.post("/oauth2/token", data={"grant_type": "client_credentials"},
                        auth=(app.creds["client_id"], "wrong"))
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r2 = app.client.post("/oauth2/token", data={"grant_type": "client_credentials"}, auth=("fv-nobody", "wrong"))
    assert r2.status_code == 401 and r2.json() == r.json()  # no user enumeration
    r3 = app.client.post("/oauth2/token", data={"grant_type": "password"}, auth=(app.creds["client_id"], "x"))
    assert r3.status_code == 400 and r3.json()["error"] == "unsupported_grant_type"
    r4 = app.client.post("/oauth2/token", json={"grant_type": "client_credentials"})
    assert r4.status_code == 400


def test_client_secret_post(app: App) -> None:
    r = app.client.post("/oauth2/token", data={"grant_type": "client_credentials", **app.creds})
    assert r.status_code == 200
    assert r.json()["token_type"] == "Bearer" and r.headers["cache-control"] == "no-store"


def test_scopes_are_enforced_per_interaction(app: App) -> None:
    reader = app.container.auth.register_client("reader", "system/Patient.rs")
    creds = {"client_id": reader.client_id, "client_secret": str(reader.client_secret)}
    token = get_token(app.client, creds)
    h = {"Authorization": f"Bearer {token}"}
    pid = app.client.post("/fhir/Patient", json=PATIENT, headers={**app.auth, **FHIR_JSON}).json()["id"]
    assert app.client.get(f"/fhir/Patient/{pid}", headers=h).status_code == 200
    assert app.client.get("/fhir/Patient/_history", headers=h).status_code == 200
    denied = app.client.post("/fhir/Patient", json=PATIENT, headers={**h, **FHIR_JSON})
    assert denied.status_code == 403 and denied.json()["issue"][0]["code"] == "forbidden"
    assert app.client.delete(f"/fhir/Patient/{pid}", headers=h).status_code == 403
    assert app.client.post("/fhir/Observation", json=observation(pid), headers={**h, **FHIR_JSON}).status_code == 403
    # system history only shows types the token may search
    hist = app.client.get("/fhir/_history", headers=h).json()
    assert {e["resource"]["resourceType"] for e in hist["entry"] if "resource" in e} <= {"Patient"}
    # asking for more than allowed yields at most what is allowed
    narrowed = app.client.post("/oauth2/token", data={"grant_type": "client_credentials", "scope": "system/*.cruds"},
                               auth=(creds["client_id"], creds["client_secret"]))
    assert narrowed.json()["scope"] == "system/Patient.rs"
    refused = app.client.post("/oauth2/token", data={"grant_type": "client_credentials", "scope": "system/Observation.c"},
                              auth=(creds["client_id"], creds["client_secret"]))
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope"


def _assertion(key: RSAKey, client_id: str, aud: str, *, jti: str | None = None, exp_in: int = 60) -> str:
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": aud, "exp": now + exp_in, "iat": now,
              "jti": jti or str(uuid.uuid4())}
    return jwt.encode({"alg": "RS384", "kid": "k1"}, claims, key, algorithms=["RS384"])


def test_private_key_jwt_backend_services(app: App) -> None:
    key = RSAKey.generate_key(2048)
    public = key.as_dict(private=False)
    public.update(kid="k1", alg="RS384")
    client = app.container.auth.register_client("backend", "system/Observation.rs", jwks={"keys": [public]},
                                                with_secret=False)
    aud = "http://testserver/oauth2/token"
    form = {"grant_type": "client_credentials", "scope": "system/Observation.rs",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}
    assertion = _assertion(key, client.client_id, aud, jti="once")
    ok = app.client.post("/oauth2/token", data={**form, "client_assertion": assertion})
    assert ok.status_code == 200, ok.text
    replay = app.client.post("/oauth2/token", data={**form, "client_assertion": assertion})
    assert replay.status_code == 401
    wrong_aud = app.client.post("/oauth2/token", data={**form, "client_assertion": _assertion(key, client.client_id, "https://evil/token")})
    assert wrong_aud.status_code == 401
    too_long = app.client.post("/oauth2/token", data={**form, "client_assertion": _assertion(key, client.client_id, aud, exp_in=3600)})
    assert too_long.status_code == 401
    stranger = RSAKey.generate_key(2048)
    forged = app.client.post("/oauth2/token", data={**form, "client_assertion": _assertion(stranger, client.client_id, aud)})
    assert forged.status_code == 401
