"""The console in process: deny by default, reasons required and audited, escaping, sign-in refusals."""

from __future__ import annotations

import dataclasses
import re

import pytest
from starlette.testclient import TestClient

from fhirvault.web.console.routes import SECTIONS, Console
from fhirvault.web.login import IdentityWeb
from tests.conftest import App
from tests.integration.identity_helpers import PASSWORD, Person, make_user

PUBLIC = {"/console", "/console/login", "/console/login/totp", "/console/logout", "/console/lang/{code}",
          "/console/static/console.css"}


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, html[:500]
    return found.group(1)


def sign_in(client: TestClient, person: Person, *, code: str | None = None) -> int:
    client.cookies.clear()
    page = client.get("/console/login")
    token = _csrf(page.text)
    r = client.post("/console/login", data={"csrf": token, "username": person.username, "password": PASSWORD})
    if r.status_code != 200 or 'name="code"' not in r.text:
        return r.status_code
    assert person.totp is not None
    r = client.post("/console/login/totp", data={"csrf": token, "code": code or person.totp.now()},
                    follow_redirects=False)
    return r.status_code


def _audit_details(app: App) -> list[dict[str, object]]:
    c = app.container
    return [c.audit.decrypt(seq, ts, blob) for seq, ts, blob in c.store.audit_entries("default", limit=100_000)]


@pytest.fixture
def people(app: App) -> dict[str, Person]:
    return {role: make_user(app.container, name, role) for name, role in (
        ("sofia", "security_officer"), ("oscar", "operator"), ("pam", "platform_admin"), ("dora", "dpo"),
        ("audrey", "auditor"), ("dr.x", "practitioner"))}


def test_every_console_route_needs_a_session(app: App) -> None:
    identity = IdentityWeb.build(app.container, None)
    routes = Console(app.container, identity.server, identity.users, None, None).routes()  # what app.py mounts
    guarded = [r for r in routes if r.path not in PUBLIC]
    assert len(guarded) == 19
    for route in guarded:
        path = re.sub(r"\{[a-z_]+\}", "x", route.path)
        for method in route.methods - {"HEAD"}:
            r = app.client.request(method, path, follow_redirects=False)
            if method == "GET":
                assert r.status_code == 303 and r.headers["location"].startswith("/console/login"), path
            else:
                assert r.status_code == 401, (method, path)


def test_each_role_opens_its_sections_only(app: App, people: dict[str, Person]) -> None:
    for role, person in people.items():
        if role == "practitioner":
            continue
        assert sign_in(app.client, person) == 303, role
        for _section, (roles, url, _key) in SECTIONS.items():
            r = app.client.get(url)
            assert r.status_code == (200 if role in roles else 403), (role, url, r.text[-500:])
            assert r.headers["content-security-policy"].startswith("default-src 'none'")


def test_a_person_without_a_console_role_or_the_right_code_is_refused(app: App, people: dict[str, Person]) -> None:
    assert sign_in(app.client, people["practitioner"]) == 403
    assert sign_in(app.client, people["operator"], code="000000") == 401  # the second-factor form again
    assert app.client.get("/console/health", follow_redirects=False).status_code == 303
    failures = [r for r in _audit_details(app) if r.get("interaction") in ("login", "mfa") and r.get("status", 0) >= 400]
    assert any("no console role" in str(r.get("detail")) for r in failures)
    assert any("second factor failed" in str(r.get("detail")) for r in failures)


def test_an_action_without_a_reason_is_refused_and_with_one_is_audited(app: App, people: dict[str, Person]) -> None:
    alerts = app.container.alerts
    assert alerts is not None
    alert = alerts.raise_alert("test_rule", "high", "<script>alert(1)</script> from 10.0.0.1", "k1")
    assert sign_in(app.client, people["security_officer"]) == 303
    page = app.client.get("/console/alerts")
    assert "<script>alert(1)</script>" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    token = _csrf(page.text)
    r = app.client.post(f"/console/alerts/{alert.id}/acknowledge", data={"csrf": token, "reason": " "})
    assert r.status_code == 400
    assert alerts.get(alert.id).state == "open"  # type: ignore[union-attr]
    r = app.client.post(f"/console/alerts/{alert.id}/acknowledge", data={"csrf": token, "reason": "paged the on-call"},
                        follow_redirects=False)
    assert r.status_code == 303
    acked = alerts.get(alert.id)
    assert acked is not None and acked.state == "acknowledged" and acked.note == "paged the on-call"
    assert acked.updated_by == people["security_officer"].user_id
    records = [r for r in _audit_details(app) if r.get("interaction") == "console.alert-acknowledge"]
    assert len(records) == 1 and "reason: paged the on-call" in str(records[0]["detail"])
    assert records[0]["user"] == people["security_officer"].user_id


def test_a_bad_patient_id_is_a_400_not_a_500(app: App, people: dict[str, Person]) -> None:
    assert sign_in(app.client, people["security_officer"]) == 303
    assert app.client.get("/console/access-history", params={"patient": "../../etc"}).status_code == 400
    assert app.client.get("/console/reviews/does-not-exist").status_code == 404
    assert app.client.get("/console/alerts?state=<b>").status_code == 200


def test_the_operator_cannot_disable_their_own_account(app: App, people: dict[str, Person]) -> None:
    assert sign_in(app.client, people["operator"]) == 303
    token = _csrf(app.client.get("/console/people").text)
    own = people["operator"].user_id
    r = app.client.post(f"/console/users/{own}/disable", data={"csrf": token, "reason": "oops"})
    assert r.status_code == 400
    other = people["dpo"].user_id
    r = app.client.post(f"/console/users/{other}/disable", data={"csrf": token, "reason": "left the organisation"},
                        follow_redirects=False)
    assert r.status_code == 303
    assert app.container.store.user(other).disabled  # type: ignore[union-attr]


def test_the_session_cookie_is_secure_when_the_server_is_reached_over_https(app: App) -> None:
    from starlette.responses import Response

    identity = IdentityWeb.build(app.container, None)
    for base, secure in (("https://ehr.example.org", True), (None, False)):
        settings = dataclasses.replace(app.container.settings, public_base_url=base)
        console = Console(dataclasses.replace(app.container, settings=settings), identity.server, identity.users,
                          None, None)
        response = Response()
        console._cookie(response, "fv_console", "value", None)
        header = response.headers["set-cookie"]
        assert "HttpOnly" in header and "SameSite=strict" in header and "Path=/console" in header
        assert ("Secure" in header) is secure


def test_rotating_the_admin_clients_secret_updates_admin_client_json(app: App, people: dict[str, Person]) -> None:
    import json

    path = app.settings.data_dir / "admin-client.json"
    before = json.loads(path.read_text())
    assert sign_in(app.client, people["operator"]) == 303
    token = _csrf(app.client.get("/console/people").text)
    r = app.client.post(f"/console/clients/{before['client_id']}/rotate", data={"csrf": token, "reason": "leaked"})
    assert r.status_code == 200
    shown = re.findall(r"<code>([^<]+)</code>", r.text)
    after = json.loads(path.read_text())
    assert after["client_secret"] == shown[1] != before["client_secret"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert app.client.post("/oauth2/token", data={"grant_type": "client_credentials"},
                           auth=(after["client_id"], after["client_secret"])).status_code == 200
