"""Forged or altered user access tokens are refused (401) by the FHIR API.

(Client-credentials forgeries — alg none, bad signature, tampered scope — are in test_auth.py.)"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from tests.conftest import App
from tests.integration.identity_helpers import exchange, login, make_app, make_user


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    h, p, s = token.split(".")
    return (orjson.loads(base64.urlsafe_b64decode(h + "==")), orjson.loads(base64.urlsafe_b64decode(p + "==")), s)


@pytest.fixture
def user_token(app: App) -> str:
    person = make_user(app.container, "pat", "patient", fhir_user="Patient/p1")
    client_id, _ = make_app(app.container)
    code, verifier, _ = login(app.client, client_id, person)
    r = exchange(app.client, client_id, code, verifier)
    assert r.status_code == 200
    return str(r.json()["access_token"])


def _hs256_with_public_key(app: App, token: str) -> str:
    header, claims, _ = _parts(token)
    public_pem = ECKey.import_key(app.container.auth.jwks["keys"][0]).as_pem(private=False)
    head = _b64(orjson.dumps({**header, "alg": "HS256"}))
    body = _b64(orjson.dumps(claims))
    sig = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _resign(app: App, token: str, change: Callable[[dict[str, Any]], None], *, kid: str | None = None) -> str:
    """Re-sign with a key of our own (as an attacker would), optionally claiming an unknown kid."""
    header, claims, _ = _parts(token)
    change(claims)
    key = ECKey.generate_key("P-256")
    return jwt.encode({**header, "kid": kid or header["kid"]}, claims, key)


def _tamper(token: str, change: Callable[[dict[str, Any]], None]) -> str:
    header, claims, sig = _parts(token)
    change(claims)
    return f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(claims))}.{sig}"


_NONE_HEADER = _b64(b'{"alg":"none","typ":"at+jwt"}')
FORGERIES: dict[str, Callable[[App, str], str]] = {
    "alg none": lambda app, t: _NONE_HEADER + "." + t.split(".")[1] + ".",
    "hs256 with the public key": _hs256_with_public_key,
    "unknown kid": lambda app, t: _resign(app, t, lambda c: None, kid="unknown-kid"),
    "tampered patient": lambda app, t: _tamper(t, lambda c: c.update(patient="someone-else")),
    "tampered role": lambda app, t: _tamper(t, lambda c: c.update(role="practitioner", scope="user/*.cruds")),
    "expired": lambda app, t: _resign(app, t, lambda c: c.update(exp=int(time.time()) - 600)),
    "not yet valid": lambda app, t: _tamper(t, lambda c: c.update(nbf=int(time.time()) + 3600)),
    "wrong issuer": lambda app, t: _tamper(t, lambda c: c.update(iss="https://evil.example")),
    "wrong audience": lambda app, t: _tamper(t, lambda c: c.update(aud="https://other/fhir")),
    "other tenant": lambda app, t: _tamper(t, lambda c: c.update(tenant="other")),
    "id token as access token": lambda app, t: t,  # replaced in the test
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_user_token_is_401(app: App, user_token: str, name: str) -> None:
    token = FORGERIES[name](app, user_token)
    if name == "id token as access token":
        person = make_user(app.container, "pat2", "patient", fhir_user="Patient/p2")
        client_id, _ = make_app(app.container)
        code, verifier, _ = login(app.client, client_id, person)
        token = exchange(app.client, client_id, code, verifier).json()["id_token"]
    r = app.client.get("/fhir/Patient/p1", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401, name
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_genuine_user_token_is_not_401(app: App, user_token: str) -> None:
    r = app.client.get("/fhir/Patient/p1", headers={"Authorization": f"Bearer {user_token}"})
    assert r.status_code != 401
