"""The operator console in a real browser: Debian's Chromium, headless, driven by Playwright, against a
real server process. Each role signs in with its second factor and does its job; every page is checked
by axe-core (no serious or critical violation) and saved as a screenshot in build/console-screenshots/.

Needs /usr/bin/chromium (installed with apt-get on first use when root; .ci/run installs it): `playwright install` cannot
download browsers here, so the test drives the system's Chromium.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyotp
import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests import debian_packages
from tests.conftest import PATIENT, Server, engine_settings, start_server
from tests.integration.identity_helpers import (
    APP_SCOPE,
    PASSWORD,
    REDIRECT,
    Person,
    exchange,
    login,
)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
SHOTS = Path(__file__).resolve().parents[2] / "build" / "console-screenshots"
BLOCKING = ("serious", "critical")

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fhirvault.cli.main", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items()
                                                       if not k.startswith("FHIRVAULT_")})


def _user(data: Path, username: str, role: str) -> Person:
    made = _cli("user", "create", "--data-dir", str(data), "--username", username, "--role", role,
                stdin=PASSWORD + "\n")
    assert made.returncode == 0, made.stderr
    user_id = re.search(r'"user_id": "([^"]+)"', made.stdout)
    uri = next(line for line in made.stdout.splitlines() if line.startswith("otpauth://"))
    totp = pyotp.parse_uri(uri)
    assert user_id is not None and isinstance(totp, pyotp.TOTP)
    return Person(user_id.group(1), username, totp)


@dataclass
class Env:
    server: Server
    browser: Browser
    people: dict[str, Person]
    used_codes: set[str]
    grant_patient: str
    axe: Axe


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if not Path(CHROMIUM).exists():
        debian_packages.ensure("chromium", "chromium")
    base = tmp_path_factory.mktemp("console")
    data, target = base / "data", base / "target"
    data.mkdir(mode=0o700)
    target.mkdir()
    (data / "fhirvault.toml").write_text(
        "".join(f'{k} = "{v}"\n' for k, v in engine_settings(data).items())
        + f'[backup]\ninterval = "1h"\n[backup.targets.local]\nurl = "file://{target}"\nlocation = "FR"\n')
    server = start_server(data, base / "server.log")
    try:
        people = {role: _user(data, name, role) for name, role in (
            ("sofia", "security_officer"), ("oscar", "operator"), ("dora", "dpo"), ("dr.house", "practitioner"))}
        used: set[str] = set()
        pid = _grant_break_glass(server, people["practitioner"], used)
        SHOTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                yield Env(server, browser, people, used, pid, Axe())
            finally:
                browser.close()
    finally:
        server.stop()


def _grant_break_glass(server: Server, practitioner: Person, used: set[str]) -> str:
    """A practitioner signs in through a SMART app and breaks the glass (which also raises an alert)."""
    with server.client() as admin:
        r = admin.post("/Patient", json=PATIENT)
        assert r.status_code == 201, r.text
        pid = str(r.json()["id"])
    made = _cli("client", "create-app", "--data-dir", str(server.data_dir), "--name", "Ward app", "--public",
                "--scope", APP_SCOPE, "--redirect-uri", REDIRECT)
    assert made.returncode == 0, made.stderr
    client_id = re.search(r'"client_id": "([^"]+)"', made.stdout)
    assert client_id is not None
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        code, verifier, _ = login(c, client_id.group(1), practitioner, scope="openid fhirUser user/*.cruds",
                                  used_codes=used)
        token = exchange(c, client_id.group(1), code, verifier).json()["access_token"]
        r = c.post(f"/fhir/Patient/{pid}/$break-glass", headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}, json={
            "resourceType": "Parameters", "parameter": [
                {"name": "reason", "valueString": "unconscious patient in the emergency room"},
                {"name": "purposeOfUse", "valueCode": "ETREAT"}]})
        assert r.status_code == 201, r.text
    return pid


def _code(env: Env, person: Person) -> str:
    assert person.totp is not None
    for _ in range(3):  # a step this person already used is refused (replay): wait for the next one
        key = f"{person.username}:{int(time.time()) // 30}"
        if key not in env.used_codes:
            env.used_codes.add(key)
            return person.totp.now()
        time.sleep(30.5 - time.time() % 30)
    raise AssertionError("no fresh TOTP step")


def _sign_in(env: Env, role: str, lang: str = "en") -> tuple[BrowserContext, Page]:
    person = env.people[role]
    context = env.browser.new_context(base_url=env.server.base_url, locale=lang,
                                      extra_http_headers={"Accept-Language": lang})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto("/console")
    assert "/console/login" in page.url
    page.fill("#username", person.username)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.fill("#code", _code(env, person))
    page.click("button[type=submit]")
    page.wait_for_load_state()
    assert "/console/login" not in page.url, page.content()[:2000]
    return context, page


def _check(env: Env, page: Page, name: str) -> None:
    """Screenshot, then axe-core: no serious or critical violation."""
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    results = env.axe.run(page)
    blocking = [v for v in results.response["violations"] if v.get("impact") in BLOCKING]
    assert not blocking, f"{name}: " + "; ".join(
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}" for v in blocking)


def _reason(page: Page, selector: str, text: str = "checked with the on-call team") -> None:
    page.locator(selector).locator("input[name=reason]").fill(text)


def test_the_security_officer_handles_alerts_break_glass_and_an_access_review_then_the_dpo_sees_them(
        env: Env) -> None:
    context, page = _sign_in(env, "security_officer")
    try:
        assert page.url.endswith("/console/alerts")
        _check(env, page, "security-alerts")
        rows = page.locator("tbody tr")
        assert rows.count() >= 1
        first = rows.first
        alert_id = (first.get_attribute("id") or "")[len("alert-"):]
        _reason(page, f"#alert-{alert_id}")
        first.locator("button", has_text="Acknowledge").click()
        page.wait_for_load_state()
        assert page.locator("[role=status]").is_visible()
        page.goto("/console/alerts?state=acknowledged")
        _check(env, page, "security-alerts-acknowledged")
        assert page.locator(f"#alert-{alert_id}").is_visible()
        _reason(page, f"#alert-{alert_id}", "false positive: drill")
        page.locator(f"#alert-{alert_id} button", has_text="Close").click()
        page.goto("/console/alerts?state=closed")
        assert "false positive: drill" in page.locator(f"#alert-{alert_id}").inner_text()
        _reason(page, f"#alert-{alert_id}", "emergency access to be assessed by the DPO")
        page.locator(f"#alert-{alert_id} button", has_text="Record as an incident").click()  # the incident register
        page.wait_for_load_state()
        assert page.locator("[role=status]").is_visible(), page.content()[:2000]

        page.goto("/console/break-glass")
        _check(env, page, "security-break-glass")
        grant = page.locator("tbody tr[id^=grant-]").first
        assert f"Patient/{env.grant_patient}" in grant.inner_text()
        grant.locator("input[value=justified]").check()
        grant.locator("input[name=reason]").fill("cardiac arrest confirmed by the ward")
        grant.locator("button").click()
        page.wait_for_load_state()
        assert page.locator("tbody tr[id^=grant-]").count() == 0
        assert "cardiac arrest confirmed by the ward" in page.content()

        page.goto("/console/reviews")
        page.fill("#name", "Q4 recertification")
        _reason(page, "form[action='/console/reviews']", "quarterly recertification")
        page.locator("form[action='/console/reviews'] button").click()
        page.wait_for_load_state()
        assert "/console/reviews/" in page.url
        _check(env, page, "security-access-review")
        doctor = env.people["practitioner"]
        row = page.locator(f"#item-{doctor.user_id}")
        assert "never" not in row.inner_text()  # signed in through the SMART app: a last use is shown
        row.locator("select").select_option("revoke")
        row.locator("input[name=reason]").fill("left the organisation")
        row.locator("button").click()
        page.wait_for_load_state()
        assert "Revoke — left the organisation" in page.locator(f"#item-{doctor.user_id}").inner_text()
        kept = page.locator(f"#item-{env.people['operator'].user_id}")
        assert "never" in kept.inner_text()  # created by the CLI, never signed in
        kept.locator("input[name=reason]").fill("on-call operator")
        kept.locator("button").click()
        page.wait_for_load_state()
        assert "Keep — on-call operator" in page.locator(f"#item-{env.people['operator'].user_id}").inner_text()
        page.goto("/console/reviews")
        _check(env, page, "security-access-reviews")
        assert "Q4 recertification" in page.content()

        page.goto(f"/console/access-history?patient={env.grant_patient}")
        _check(env, page, "security-access-history")
        assert "ETREAT" in page.content()  # the emergency access is in the patient's history
    finally:
        context.close()
    # One scenario (xdist spreads a module's tests over workers, each with its own server): the DPO
    # reads the campaign and the incident the security officer just recorded.
    _the_dpo_page_and_separation_of_roles(env)


def test_the_operator_sees_health_and_charts_manages_clients_and_users_and_runs_a_backup(env: Env) -> None:
    context, page = _sign_in(env, "operator")
    try:
        assert page.url.endswith("/console/health")
        _check(env, page, "operator-health")
        assert "ok" in page.locator("tbody tr", has_text="Database writable").inner_text()

        page.goto("/console/charts?hours=1")
        _check(env, page, "operator-charts")
        # One stored sample (taken at start-up) and the live one: a drawn line for the requests.
        requests_chart = page.locator("svg#chart-requests")
        assert requests_chart.locator("polyline").count() == 1
        assert "Requests per minute" in (requests_chart.locator("title").text_content() or "")
        assert page.locator("svg#chart-audit polyline").count() == 1

        page.goto("/console/people")
        _check(env, page, "operator-people")
        page.fill("#new-client", "Lab interface")
        page.fill("#new-scope", "system/Observation.cr")
        _reason(page, "form[action='/console/clients']", "new lab analyser, change CHG-42")
        page.locator("form[action='/console/clients'] button").click()
        page.wait_for_load_state()
        _check(env, page, "operator-client-secret")
        values = page.locator("dl.secret dd code").all_inner_texts()
        client_id, secret = values[0], values[1]
        with httpx.Client(base_url=env.server.base_url) as c:  # the secret shown once works…
            r = c.post("/oauth2/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret))
            assert r.status_code == 200, r.text
        page.goto("/console/people")
        row = page.locator(f"#client-{client_id}")
        row.locator("input[name=reason]").fill("secret pasted in a ticket")
        row.locator("button", has_text="Rotate the secret").click()
        page.wait_for_load_state()
        rotated = page.locator("dl.secret dd code").nth(1).inner_text()
        with httpx.Client(base_url=env.server.base_url) as c:  # the old secret stops working, the new one works
            r = c.post("/oauth2/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret))
            assert r.status_code in (400, 401), r.text
            r = c.post("/oauth2/token", data={"grant_type": "client_credentials"}, auth=(client_id, rotated))
            assert r.status_code == 200, r.text
        secret = rotated
        page.goto("/console/people")
        row = page.locator(f"#client-{client_id}")
        row.locator("input[name=reason]").fill("analyser decommissioned")
        row.locator("button", has_text="Disable").click()
        page.wait_for_load_state()
        assert "disabled" in page.locator(f"#client-{client_id}").inner_text()
        with httpx.Client(base_url=env.server.base_url) as c:  # …until the client is disabled
            r = c.post("/oauth2/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret))
            assert r.status_code in (400, 401), r.text

        page.fill("#new-username", "nadia")
        page.select_option("#new-role", "nurse")
        _reason(page, "form[action='/console/users']", "new ward nurse")
        page.locator("form[action='/console/users'] button").click()
        page.wait_for_load_state()
        assert page.locator("dl.secret dd code").nth(1).inner_text().startswith("otpauth://")
        page.goto("/console/people")
        assert "nurse" in page.locator("#user-nadia").inner_text()

        page.goto("/console/backups")
        _check(env, page, "operator-backups")
        assert page.locator("#backups").count() == 0  # none yet
        page.locator("form[action='/console/backups/backup'] input[name=reason]").fill("before the upgrade")
        page.locator("form[action='/console/backups/backup'] button").click()
        page.wait_for_load_state()
        assert "done=ok" in page.url, page.content()[:3000]
        assert page.locator("#backups tbody tr").count() == 1
        _check(env, page, "operator-backups-done")
    finally:
        context.close()


def _the_dpo_page_and_separation_of_roles(env: Env) -> None:
    context, page = _sign_in(env, "dpo", lang="fr")
    try:
        assert page.url.endswith("/console/dpo")
        _check(env, page, "dpo-registers")
        assert page.locator("html").get_attribute("lang") == "fr"
        assert "Registres et conformité" in page.locator("h1").inner_text()
        # The live compliance report: the access review the security officer just ran counts.
        review = page.locator("#control-access-review").inner_text()
        assert "1 campaign(s), 1 open" in review, review
        assert page.locator("#controls tbody tr").count() >= 10
        assert "break-the-glass access" in page.locator("#incidents").inner_text()  # recorded by the security officer
        with page.expect_download() as download:
            page.click("a[href='/console/dpo/report.pdf']")
        pdf = Path(download.value.path())
        assert pdf.read_bytes().startswith(b"%PDF")
        for other in ("/console/alerts", "/console/health", "/console/people", "/console/break-glass"):
            response = page.goto(other)
            assert response is not None and response.status == 403, other
        _check(env, page, "dpo-forbidden")
        page.click("a[hreflang=en]")  # the language switch
        assert page.locator("html").get_attribute("lang") == "en"
        assert "Your role may not open this page." in page.content()
    finally:
        context.close()
    context, page = _sign_in(env, "operator")
    try:
        for other in ("/console/alerts", "/console/reviews", "/console/dpo"):
            response = page.goto(other)
            assert response is not None and response.status == 403, other
    finally:
        context.close()


def test_headers_csrf_and_sign_out(env: Env) -> None:
    anonymous = env.browser.new_context(base_url=env.server.base_url)
    try:
        page = anonymous.new_page()
        response = page.goto("/console/people")
        assert response is not None and "/console/login?next=%2Fconsole%2Fpeople" in page.url
        _check(env, page, "login")
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp and "style-src 'self'" in csp
        assert response.headers["x-frame-options"] == "DENY" and response.headers["cache-control"] == "no-store"
        assert page.locator("script").count() == 0
    finally:
        anonymous.close()
    context, page = _sign_in(env, "security_officer")
    try:
        cookie = next(c for c in context.cookies() if c["name"] == "fv_console")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
        alert_form = {"reason": "no token in this form"}
        r = context.request.post("/console/alerts/0123456789abcdef01234567/close", form=alert_form)
        assert r.status == 403 and "did not come from this console" in r.text()
        r = context.request.post("/console/alerts/0123456789abcdef01234567/close",
                                 form={**alert_form, "csrf": "forged-token"})
        assert r.status == 403
        page.goto("/console/alerts")
        token = page.locator("input[name=csrf]").first.get_attribute("value") or ""
        r = context.request.post("/console/reviews", form={"csrf": token, "name": "no reason", "due": "2030-01-01"})
        assert r.status == 400 and "needs a reason" in r.text()  # a valid token, but no reason: refused
        page.locator("header form button").click()  # sign out
        page.wait_for_load_state()
        response = page.goto("/console/alerts")
        assert "/console/login" in page.url
    finally:
        context.close()
