"""Helpers for the login / SMART launch tests: create users and apps, drive the login pages."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import httpx
import pyotp
from starlette.testclient import TestClient

from fhirvault.container import Container
from fhirvault.services.users import TOTP_KEY_NAME, UserService

REDIRECT = "http://127.0.0.1:9999/callback"
APP_SCOPE = "openid fhirUser launch/patient offline_access online_access patient/*.cruds user/*.cruds"
PASSWORD = "correct horse battery staple"


def users_of(container: Container) -> UserService:
    return UserService(container.store, container.clock, container.secrets.get(TOTP_KEY_NAME),
                       tenant=container.settings.tenant)


@dataclass
class Person:
    user_id: str
    username: str
    totp: pyotp.TOTP | None


def make_user(container: Container, username: str, role: str, fhir_user: str | None = None,
              org: str | None = None) -> Person:
    created = users_of(container).create(username, role, PASSWORD, fhir_user=fhir_user, organization=org)
    totp = pyotp.parse_uri(created.totp_uri) if created.totp_uri else None
    assert totp is None or isinstance(totp, pyotp.TOTP)
    return Person(created.user.user_id, created.user.username, totp)


def make_app(container: Container, *, public: bool = True, scope: str = APP_SCOPE) -> tuple[str, str | None]:
    app = container.auth.register_app("Test app", scope, [REDIRECT], public=public)
    return app.client_id, app.client_secret


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def fresh_code(totp: pyotp.TOTP, used: set[str]) -> str:
    """A valid code not used before (the server refuses a replayed step): now, else the next step."""
    for offset in (0, 30, -30):
        code = totp.at(time.time() + offset)
        if code not in used:
            used.add(code)
            return code
    raise AssertionError("no unused TOTP step")


def form_fields(page: str) -> dict[str, str]:
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', page))


Client = httpx.Client | TestClient


def authorize_params(client_id: str, challenge: str, scope: str = APP_SCOPE, **extra: str) -> dict[str, str]:
    return {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "scope": scope,
            "state": "st-" + secrets.token_hex(4), "code_challenge": challenge, "code_challenge_method": "S256",
            "nonce": "n-" + secrets.token_hex(4), **extra}


def login(client: Client, client_id: str, person: Person, *, scope: str = APP_SCOPE, patient: str | None = None,
          used_codes: set[str] | None = None, password: str = PASSWORD) -> tuple[str, str, dict[str, str]]:
    """Run the authorization request and the login pages; returns (code, verifier, params)."""
    verifier, challenge = pkce()
    params = authorize_params(client_id, challenge, scope, aud=str(client.base_url).rstrip("/") + "/fhir")
    r = client.get("/oauth2/authorize", params=params, follow_redirects=False)
    if r.status_code == 200 and form_fields(r.text).get("step") == "login":
        fields = form_fields(r.text)
        r = client.post("/oauth2/authorize", data={**fields, "username": person.username, "password": password},
                        follow_redirects=False)
        if r.status_code == 200 and 'value="totp"' in r.text:
            assert person.totp is not None
            fields = form_fields(r.text)
            r = client.post("/oauth2/authorize",
                            data={**fields, "code": fresh_code(person.totp, used_codes if used_codes is not None
                                                               else set())},
                            follow_redirects=False)
    if r.status_code == 200 and 'value="patient"' in r.text:
        assert patient is not None, "a patient choice was asked"
        r = client.post("/oauth2/authorize", data={**form_fields(r.text), "patient": patient},
                        follow_redirects=False)
    assert r.status_code == 303, (r.status_code, r.text[:500])
    location = r.headers["location"]
    assert location.startswith(REDIRECT)
    query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    assert query.get("state") == params["state"], query
    assert "code" in query, query
    return query["code"], verifier, params


def exchange(client: Client, client_id: str, code: str, verifier: str,
             secret: str | None = None) -> httpx.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier}
    if secret is None:
        data["client_id"] = client_id
        return client.post("/oauth2/token", data=data)
    return client.post("/oauth2/token", data=data, auth=(client_id, secret))
