"""Patients are told when the glass is broken on their record: e-mail (aiosmtpd) and webhook, retried, audited;
and the security alert it raises goes into the incident register in one call."""

from __future__ import annotations

import email
import email.policy
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session
from starlette.testclient import TestClient

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import Container, build
from fhirvault.ports import AuditQuery
from fhirvault.services.patient_notify import patient_email
from fhirvault.web.app import create_app
from tests.conftest import engine_settings, free_port, get_token
from tests.integration.authz_support import bearer, break_glass, mint, patient, put
from tests.unit.adapters.test_alert_sinks import SECRET, Receiver

EMAIL = "camille.patient@example.org"


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []
        self.event = threading.Event()

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.messages.append((list(envelope.rcpt_tos), bytes(envelope.content or b"")))  # type: ignore[arg-type]
        self.event.set()
        return "250 OK"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    mailbox = Mailbox()
    smtp_port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    hook = Receiver(status=503)  # fails first: the notifier retries
    data = tmp_path / "data"
    config = tmp_path / "fhirvault.toml"
    config.write_text(f"""
[patient_notifications]
language = "fr"
webhook_url = "{hook.url}"
webhook_secret_env = "NOTIFY_SECRET"
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
starttls = false
from = "dpo@clinic.example.fr"
retry_initial_seconds = 0.05
[processing]
dpo_contact = "dpo@clinic.example.fr"
""")
    settings = load_settings({"data_dir": data, **engine_settings(data)}, environ={"NOTIFY_SECRET": SECRET.decode()},
                             config_file=config)
    creds = initialise(settings)
    container = build(settings)
    with TestClient(create_app(container), base_url="http://testserver") as client:
        import json

        token = get_token(client, json.loads(creds.read_text()))
        yield {"c": client, "container": container, "admin": bearer(token), "mail": mailbox, "hook": hook}
    controller.stop()
    hook.stop()


def _audit(container: Container, interaction: str) -> list[dict[str, Any]]:
    rows = container.store.audit_find(AuditQuery(container.settings.tenant, descending=True, limit=500))
    docs = [container.audit.decrypt(r.seq, r.ts_ms, r.blob) for r in rows]
    return [d for d in docs if d.get("interaction") == interaction]


def test_the_patient_is_notified_by_mail_and_webhook_and_it_is_audited(env: dict[str, Any],
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    c, container = env["c"], env["container"]
    put(c, env["admin"], patient("pn", telecom=[{"system": "phone", "value": "0600000000"},
                                                {"system": "email", "value": EMAIL, "use": "home"}]))
    dr = mint(container, role="practitioner", user="u-er", fhir_user="Practitioner/er")
    with caplog.at_level(logging.DEBUG):
        r = break_glass(c, dr, "pn")
        assert r.status_code == 201, r.text
        grant = {p["name"]: p for p in r.json()["parameter"]}["grant"]["valueString"]
        deadline = time.monotonic() + 10
        while not any("failed (attempt 1)" in m.getMessage() for m in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.01)  # the first webhook attempt gets a 503
        env["hook"].status = 200  # the receiver recovers: a retry gets through
        assert env["hook"].event.wait(10), "no webhook received"
        assert env["mail"].event.wait(10), "no e-mail received"
        deadline = time.monotonic() + 10
        while len(_audit(container, "patient-notification")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    (rcpt, content), = env["mail"].messages
    assert rcpt == [EMAIL]
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert message["Subject"] == "Accès d'urgence à votre dossier de santé"
    text = message.get_body().get_content()  # type: ignore[union-attr]
    assert "bris de glace" in text and "dpo@clinic.example.fr" in text and "(practitioner)" in text
    assert grant in text and "unconscious" not in text  # the clinical reason never leaves the server
    (payload,) = env["hook"].received
    assert payload["grant"] == grant and payload["patient"] == "Patient/pn" and payload["email"] == EMAIL
    outcomes = _audit(container, "patient-notification")
    assert {o["detail"] for o in outcomes} == {f"patient notified by smtp of break-the-glass {grant}",
                                               f"patient notified by webhook of break-the-glass {grant}"}
    assert all(o["patient"] == "Patient/pn" for o in outcomes)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("fhirvault")]
    assert any("failed (attempt 1)" in m for m in ours)  # the 503 was retried
    assert not any(EMAIL in m or "Test" in m for m in ours)  # no PHI in our logs


def test_a_patient_without_an_address_is_recorded_as_not_notified_by_mail(env: dict[str, Any]) -> None:
    c, container = env["c"], env["container"]
    put(c, env["admin"], patient("pq"))
    env["hook"].status = 200
    assert break_glass(c, mint(container, role="practitioner", user="u-er2"), "pq").status_code == 201
    deadline = time.monotonic() + 10
    while len(_audit(container, "patient-notification")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    details = {o["detail"] for o in _audit(container, "patient-notification")}
    assert "patient not notified by e-mail: no e-mail address on the Patient record" in details
    assert env["mail"].messages == []


def test_the_break_glass_alert_opens_an_incident_in_one_call(env: dict[str, Any]) -> None:
    c, container = env["c"], env["container"]
    put(c, env["admin"], patient("pr"))
    env["hook"].status = 200
    assert break_glass(c, mint(container, role="practitioner", user="u-er3"), "pr").status_code == 201
    assert container.alerts is not None
    container.alerts.flush()
    (alert,) = [a for a in container.alerts.list() if a.rule == "break_the_glass"]
    dpo = container.auth.register_client("dpo", "fhirvault/registers.write")
    h = bearer(get_token(c, {"client_id": dpo.client_id, "client_secret": str(dpo.client_secret)}))
    r = c.post("/admin/registers/incidents", headers=h, json={"alert": alert.id, "reason": "emergency access to check"})
    assert r.status_code == 201, r.text
    inc = r.json()
    assert inc["alert"] == alert.id and inc["rule"] == "break_the_glass" and inc["status"] == "open"
    assert inc["hoursLeft"] > 71.9
    again = c.post("/admin/registers/incidents", headers=h, json={"alert": alert.id, "reason": "a second time"})
    assert again.status_code == 400 and "already in the register" in again.text


def test_patient_email_picks_a_current_personal_address() -> None:
    assert patient_email({"telecom": [{"system": "email", "value": "work@x.fr", "use": "work"},
                                      {"system": "email", "value": "old@x.fr", "use": "home",
                                       "period": {"end": "2020-01-01"}},
                                      {"system": "email", "value": "home@x.fr", "use": "home"}]}) == "home@x.fr"
    assert patient_email({"telecom": [{"system": "phone", "value": "1"}]}) is None
