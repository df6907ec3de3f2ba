"""Patients are told when the glass is broken on their record (break-the-glass, services/break_glass.py).

``[patient_notifications]`` configures the channel(s)::

    [patient_notifications]
    language = "fr"                       # fr | en
    # a webhook (the patient portal or a messaging gateway): JSON POST, HMAC-signed like alert webhooks
    webhook_url = "https://portal.example.fr/hooks/break-glass"
    webhook_secret_file = "/etc/fhirvault/notify-webhook.secret"
    # and/or e-mail to the address in the patient's own Patient.telecom (system = email)
    smtp_host = "smtp.example.fr"
    smtp_port = 587
    from = "dpo@clinic.example.fr"
    # starttls = true, implicit_tls = false, ca_file, username, password_file | password_env
    retry_attempts = 6

After a grant is stored, a background worker reads the patient's e-mail address by decrypting the
Patient resource inside the server (never logged), sends the notice on each channel, retries with
back-off, and writes the outcome to the audit trail under the patient's compartment (so it appears in
the patient's access history). The notice says that emergency access was opened, when, by which role,
until when and whom to ask; never the clinical reason. Logs name the grant id only.
"""

from __future__ import annotations

import logging
import queue
import smtplib
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from fhirvault.config import SettingsError
from fhirvault.services.audit import AuditRecord
from fhirvault.services.residency import check_outbound

if TYPE_CHECKING:
    from fhirvault.container import Container
    from fhirvault.services.break_glass import Grant

log = logging.getLogger("fhirvault.patient_notify")
SIGNATURE_HEADER = "X-Fhirvault-Signature"
TIMESTAMP_HEADER = "X-Fhirvault-Timestamp"


@dataclass(frozen=True, slots=True)
class PatientNotifySettings:
    language: str = "fr"
    webhook_url: str | None = None
    webhook_secret: bytes | None = field(default=None, repr=False)
    smtp_host: str | None = None
    smtp_port: int = 587
    sender: str | None = None
    starttls: bool = True
    implicit_tls: bool = False
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_seconds: float = 10.0
    retry_attempts: int = 6
    retry_initial_seconds: float = 2.0


def _secret(where: str, raw: Mapping[str, Any], base: str, environ: Mapping[str, str]) -> bytes | None:
    file_key, env_key = f"{base}_file", f"{base}_env"
    if file_key in raw and env_key in raw:
        raise SettingsError(f"{where}: give {file_key} or {env_key}, not both")
    if file_key in raw:
        try:
            value = Path(str(raw[file_key])).expanduser().read_bytes().strip()
        except OSError as exc:
            raise SettingsError(f"{where}.{file_key}: cannot read it: {exc.strerror}") from None
    elif env_key in raw:
        env = environ.get(str(raw[env_key]))
        if env is None:
            raise SettingsError(f"{where}.{env_key}: environment variable {raw[env_key]} is not set")
        value = env.strip().encode()
    else:
        return None
    if not value:
        raise SettingsError(f"{where}: the secret is empty")
    return value


def parse_patient_notify(raw: Mapping[str, Any], origin: str, environ: Mapping[str, str]) -> PatientNotifySettings:
    where = "patient_notifications"
    known = {"language", "webhook_url", "webhook_secret_file", "webhook_secret_env", "smtp_host", "smtp_port",
             "from", "starttls", "implicit_tls", "ca_file", "username", "password_file", "password_env",
             "timeout_seconds", "retry_attempts", "retry_initial_seconds"}
    try:
        if not isinstance(raw, Mapping):
            raise SettingsError(f"{where}: expected a table")
        unknown = set(raw) - known
        if unknown:
            raise SettingsError(f"{where}: unknown key '{sorted(unknown)[0]}'")
        for key in ("password", "webhook_secret"):
            if key in raw:
                raise SettingsError(f"{where}.{key}: secrets are not written in the config file; use {key}_file"
                                    f" or {key}_env")
        lang = raw.get("language", "fr")
        if lang not in ("fr", "en"):
            raise SettingsError(f"{where}.language: fr or en")
        url = raw.get("webhook_url")
        if url is not None and (not isinstance(url, str) or not url.startswith(("https://", "http://"))):
            raise SettingsError(f"{where}.webhook_url: must start with https:// or http://")
        secret = _secret(where + ".webhook_secret", raw, "webhook_secret", environ)
        if url is not None and secret is None:
            raise SettingsError(f"{where}: webhook_secret_file or webhook_secret_env is required with webhook_url")
        host = raw.get("smtp_host")
        if host is not None and (not isinstance(host, str) or not host):
            raise SettingsError(f"{where}.smtp_host: expected a host name")
        sender = raw.get("from")
        if host is not None and (not isinstance(sender, str) or "@" not in sender):
            raise SettingsError(f"{where}.from: the sender address is required with smtp_host")
        if url is None and host is None:
            raise SettingsError(f"{where}: configure webhook_url and/or smtp_host")

        def typed(key: str, kind: type, default: Any, lo: float = 0, hi: float = 1e9) -> Any:
            value: Any = raw.get(key, default)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if (kind is bool and not isinstance(value, bool)) or (kind is int and not isinstance(value, int)) \
                    or (kind is not bool and not number):
                raise SettingsError(f"{where}.{key}: expected {kind.__name__}")
            if kind is not bool and not lo <= value <= hi:
                raise SettingsError(f"{where}.{key}: must be between {lo:g} and {hi:g}")
            return value

        password = _secret(where + ".password", raw, "password", environ)
        ca = raw.get("ca_file")
        return PatientNotifySettings(
            lang, url, secret, host, typed("smtp_port", int, 587, 1, 65535), sender, typed("starttls", bool, True),
            typed("implicit_tls", bool, False), Path(str(ca)).expanduser() if ca else None,
            str(raw["username"]) if "username" in raw else None, password.decode() if password else None,
            float(typed("timeout_seconds", float, 10.0, 0.1, 300)), typed("retry_attempts", int, 6, 1, 100),
            float(typed("retry_initial_seconds", float, 2.0, 0.01, 3600)))
    except SettingsError as exc:
        raise SettingsError(f"{exc} (from {origin})") from None


_TEXT = {
    "fr": ("Accès d'urgence à votre dossier de santé",
           "Bonjour,\n\nUn accès d'urgence (« bris de glace ») à votre dossier de santé a été ouvert le {start}"
           " (UTC) par un professionnel de santé ({role}), pour une durée limitée (jusqu'au {end}).\n"
           "Cet accès est enregistré et sera contrôlé par le responsable de la sécurité.\n"
           "Référence : {grant}.\n{contact}\n"),
    "en": ("Emergency access to your health record",
           "Hello,\n\nEmergency (\"break-the-glass\") access to your health record was opened on {start} (UTC)"
           " by a health professional ({role}), for a limited time (until {end}).\n"
           "This access is recorded and will be reviewed by the security officer.\n"
           "Reference: {grant}.\n{contact}\n"),
}
_CONTACT = {"fr": "Pour toute question : {who}.", "en": "Questions: {who}."}


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000))


def patient_email(resource: Mapping[str, Any]) -> str | None:
    """The patient's own e-mail (telecom system=email; use=home/mobile first, then any not ended)."""
    found: list[tuple[int, str]] = []
    for t in resource.get("telecom") or ():
        if not isinstance(t, Mapping) or t.get("system") != "email" or not isinstance(t.get("value"), str):
            continue
        if isinstance(t.get("period"), Mapping) and t["period"].get("end"):
            continue
        value = t["value"].strip()
        if "@" in value and "\n" not in value and len(value) <= 254:
            found.append((0 if t.get("use") in ("home", "mobile") else 1, value))
    return min(found)[1] if found else None


class PatientNotifier:
    """Send the notices in the background, with retries; each outcome audited."""

    def __init__(self, container: Container, settings: PatientNotifySettings) -> None:
        self._c = container
        self._s = settings
        self._queue: queue.Queue[Grant | None] = queue.Queue(maxsize=10_000)
        self._thread = threading.Thread(target=self._run, name="fhirvault-patient-notify", daemon=True)
        self._thread.start()
        self.sent = 0  # notices delivered (for tests and metrics)

    def grant_started(self, grant: Grant) -> None:
        try:
            self._queue.put_nowait(grant)
        except queue.Full:
            log.error("patient notification queue full; grant %s not notified", grant.grant_id)
            self._audit(grant, 503, "patient not notified: notification queue full")

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (grant := self._queue.get()) is not None:
            try:
                self._notify(grant)
            except Exception:
                log.exception("patient notification failed for grant %s", grant.grant_id)

    def _notify(self, grant: Grant) -> None:
        email = self._email(grant.patient_id) if self._s.smtp_host else None
        channels: list[tuple[str, Any]] = []
        if self._s.webhook_url:
            channels.append(("webhook", lambda: self._send_webhook(grant, email)))
        if self._s.smtp_host:
            if email is None:
                self._audit(grant, 422, "patient not notified by e-mail: no e-mail address on the Patient record")
            else:
                channels.append(("smtp", lambda: self._send_mail(grant, email)))
        for name, send in channels:
            delay = self._s.retry_initial_seconds
            for attempt in range(1, self._s.retry_attempts + 1):
                try:
                    send()
                except Exception as exc:  # network, refused host, non-2xx: retried
                    log.warning("patient notification by %s for grant %s failed (attempt %d): %s", name,
                                grant.grant_id, attempt, type(exc).__name__)
                    if attempt == self._s.retry_attempts:
                        self._audit(grant, 502, f"patient notification by {name} failed after {attempt} attempts")
                        break
                    time.sleep(delay)
                    delay = min(delay * 2, 300.0)
                else:
                    self.sent += 1
                    self._audit(grant, 200, f"patient notified by {name} of break-the-glass {grant.grant_id}")
                    break

    def _email(self, patient_id: str) -> str | None:
        import orjson as _json

        v = self._c.repository.current_version("Patient", patient_id)
        if v is None or v.deleted:
            return None
        doc = _json.loads(self._c.repository._open(v))  # decrypted in this process only; never logged
        return patient_email(doc) if isinstance(doc, dict) else None

    def _text(self, grant: Grant) -> tuple[str, str]:
        lang = self._s.language
        processing = self._c.settings.processing
        who = processing.dpo_contact if processing is not None and processing.dpo_contact else None
        contact = _CONTACT[lang].format(who=who) if who else ""
        subject, body = _TEXT[lang]
        return subject, body.format(start=_when(grant.created_ms), end=_when(grant.expires_ms),
                                    role=grant.role or "-", grant=grant.grant_id, contact=contact)

    def _send_mail(self, grant: Grant, email: str) -> None:
        from fhirvault.adapters.alert_sinks import tls_client_context

        s = self._s
        assert s.smtp_host is not None and s.sender is not None
        check_outbound(s.smtp_host, "patient notification (SMTP)")
        subject, body = self._text(grant)
        msg = EmailMessage()
        msg["Subject"], msg["From"], msg["To"] = subject, s.sender, email
        msg["X-Fhirvault-Grant"] = grant.grant_id
        msg.set_content(body)
        context = tls_client_context(s.ca_file)
        smtp = (smtplib.SMTP_SSL(s.smtp_host, s.smtp_port, timeout=s.timeout_seconds, context=context)
                if s.implicit_tls else smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.timeout_seconds))
        with smtp:
            smtp.ehlo()
            if s.starttls and not s.implicit_tls:
                smtp.starttls(context=context)  # never falls back to clear text
                smtp.ehlo()
            if s.username is not None:
                smtp.login(s.username, s.password or "")
            smtp.send_message(msg)

    def _send_webhook(self, grant: Grant, email: str | None) -> None:
        from fhirvault.adapters.alert_sinks import sign

        s = self._s
        assert s.webhook_url is not None and s.webhook_secret is not None
        check_outbound(s.webhook_url, "patient notification (webhook)")
        subject, text = self._text(grant)
        body = orjson.dumps({"event": "break-the-glass", "grant": grant.grant_id,
                             "patient": f"Patient/{grant.patient_id}", "email": email, "role": grant.role,
                             "started": grant.created_ms, "expires": grant.expires_ms, "language": s.language,
                             "subject": subject, "text": text})
        timestamp = str(int(time.time()))
        request = urllib.request.Request(s.webhook_url, data=body, method="POST", headers={  # noqa: S310 (scheme checked)
            "Content-Type": "application/json", "User-Agent": "fhirvault-patient-notify",
            TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(s.webhook_secret, timestamp, body)})
        with urllib.request.build_opener(_NoRedirect()).open(request, timeout=s.timeout_seconds) as response:
            response.read(65536)

    def _audit(self, grant: Grant, status: int, detail: str) -> None:
        c = self._c
        record = AuditRecord(c.clock.now_ms(), "patient-notification", "0" if status < 400 else "4", status, "-",
                             entity=f"break-glass/{grant.grant_id}", patient=f"Patient/{grant.patient_id}",
                             detail=detail, category="system")
        try:
            c.store.write_sync("audit.patient-notify", lambda tx: c.audit.record(tx, record))
        except Exception:
            log.exception("could not audit the patient notification of grant %s", grant.grant_id)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
