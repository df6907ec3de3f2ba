"""/admin/registers and /admin/compliance: deny by default; DPO clients read and write, every change audited."""

from __future__ import annotations

from dataclasses import replace

from fhirvault.domain.scopes import Grants
from fhirvault.services.auth import Principal
from fhirvault.web.registers import may
from tests.conftest import App, get_token


def _dpo_token(app: App, scope: str) -> str:
    client = app.container.auth.register_client("dpo tool", scope)
    return get_token(app.client, {"client_id": client.client_id, "client_secret": str(client.client_secret)})


def test_registers_need_a_token_and_the_registers_scope(app: App) -> None:
    assert app.client.get("/admin/registers/incidents").status_code == 401
    r = app.client.get("/admin/registers/incidents", headers=app.auth)  # system/*.cruds: clinical, not DPO
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    read = {"Authorization": "Bearer " + _dpo_token(app, "fhirvault/registers.read")}
    assert app.client.get("/admin/registers/incidents", headers=read).json() == {"incidents": []}
    r = app.client.post("/admin/registers/incidents", headers=read, json={"title": "x", "reason": "reason"})
    assert r.status_code == 403  # read-only scope cannot write
    assert app.client.post("/admin/registers/incidents", content=b"{").status_code == 401  # auth before the body


def test_a_dpo_client_keeps_the_registers_and_each_change_is_audited(app: App) -> None:
    h = {"Authorization": "Bearer " + _dpo_token(app, "fhirvault/registers.write")}
    r = app.client.post("/admin/registers/incidents", headers=h,
                        json={"title": "phishing on the ward", "reason": "reported by the nurse in charge",
                              "detected": "2026-01-01T00:00:00Z"})
    assert r.status_code == 201, r.text
    inc = r.json()
    assert inc["notificationDue"] == "2026-01-04T00:00:00Z" and inc["overdue"] is True
    r = app.client.post(f"/admin/registers/incidents/{inc['id']}", headers=h,
                        json={"reason": "no personal data involved", "status": "closed", "personalDataBreach": False})
    assert r.status_code == 200 and r.json()["status"] == "closed" and r.json()["overdue"] is False
    assert app.client.post(f"/admin/registers/incidents/{inc['id']}", headers=h, json={"reason": ""}).status_code == 400
    assert app.client.get("/admin/registers/incidents/inc-0123456789abcdef", headers=h).status_code == 404
    r = app.client.post("/admin/registers/requests", headers=h,
                        json={"type": "portability", "subject": "M. Martin", "reason": "e-mail of 2 March"})
    assert r.status_code == 201 and r.json()["status"] == "open"
    assert app.client.post("/admin/registers/requests", headers=h, json=[1]).status_code == 400
    processing = app.client.get("/admin/registers/processing", headers=h).json()
    assert {c["name"] for c in processing["recipients"]} == {"admin", "dpo tool"}
    residency = app.client.get("/admin/registers/residency", headers=h).json()
    assert residency["destinations"][0]["setting"] == "data_dir"
    from fhirvault.ports import AuditQuery

    rows = app.container.store.audit_find(AuditQuery(app.settings.tenant, descending=True, limit=200))
    details = [app.container.audit.decrypt(r.seq, r.ts_ms, r.blob) for r in rows]
    changes = [d["detail"] for d in details if d.get("interaction") == "register-change"]
    assert any(c.endswith("closed: no personal data involved") for c in changes)
    assert any("received: e-mail of 2 March" in c for c in changes)


def test_the_report_is_served_as_json_html_and_pdf(app: App) -> None:
    h = {"Authorization": "Bearer " + _dpo_token(app, "fhirvault/registers.read")}
    doc = app.client.get("/admin/compliance/report", headers=h).json()
    assert {c["key"] for c in doc["controls"]} >= {"encryption", "mfa", "backup", "restore-drill", "audit-log",
                                                   "residency", "separation-of-duties", "incidents"}
    html = app.client.get("/admin/compliance/report.html?lang=fr", headers=h)
    assert html.headers["content-type"].startswith("text/html") and "Rapport de conformité" in html.text
    assert '<a href="/admin/registers/incidents">/admin/registers/incidents</a>' in html.text
    pdf = app.client.get("/admin/compliance/report.pdf", headers=h)
    assert pdf.headers["content-type"] == "application/pdf" and pdf.content.startswith(b"%PDF-")
    assert app.client.get("/admin/compliance/report.html?lang=de", headers=h).status_code == 400
    assert app.client.get("/admin/compliance/report.pdf", headers=app.auth).status_code == 403


def test_officer_roles_may_and_clinical_roles_may_not() -> None:
    base = Principal("c", "default", "", Grants(()), 0, "t")
    assert may(replace(base, user="u1", role="security_officer"), write=True)
    assert may(replace(base, user="u1", role="platform_admin"), write=False)
    assert not may(replace(base, user="u1", role="practitioner", scope="fhirvault/registers.write"), write=False)
    assert not may(replace(base, scope="system/*.cruds"), write=False)
    assert may(replace(base, scope="fhirvault/registers.read"), write=False)
    assert not may(replace(base, scope="fhirvault/registers.read"), write=True)


def test_a_logged_in_security_officer_reads_and_writes_and_a_practitioner_does_not(app: App) -> None:
    from tests.integration.authz_support import bearer, mint

    so = bearer(mint(app.container, role="security_officer", user="u-so", scope="user/*.rs"))
    dr = bearer(mint(app.container, role="practitioner", user="u-dr", scope="user/*.cruds"))
    r = app.client.post("/admin/registers/requests", headers=so,
                        json={"type": "rectification", "subject": "M. Durand", "reason": "wrong birth date"})
    assert r.status_code == 201, r.text
    assert r.json()["notes"][0]["by"] == "u-so"
    assert app.client.get("/admin/registers/requests", headers=dr).status_code == 403
    assert app.client.get("/admin/compliance/report.html", headers=dr).status_code == 403


def test_the_french_report_words_every_evidence_line_in_french(app: App) -> None:
    from fhirvault.services.compliance_report import build_report, evidence_text

    report = build_report(app.container)
    lines = [ev for c in report.controls for ev in c.evidence if not ev.text.startswith("mode ")]
    untranslated = [ev.text for ev in lines if evidence_text(ev, "fr") == ev.text]
    assert untranslated == []
    assert all(evidence_text(ev, "en") == ev.text for ev in lines)
