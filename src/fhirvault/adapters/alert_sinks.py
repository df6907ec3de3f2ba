"""Alert sinks: signed JSON webhook, e-mail (SMTP, STARTTLS or implicit TLS), syslog (RFC 5424 over
UDP, TCP or TLS per RFC 5425), JSON-lines file.

Each sink runs on its own delivery thread (see ``services.alerts``), so they are
plain blocking code over the standard library: ``urllib.request`` for the
webhook (no event loop to share, no extra dependency, timeouts and TLS
verification by default), ``smtplib`` and ``socket``. ``send`` raises on
failure; the worker retries with backoff.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import select
import smtplib
import socket
import ssl
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import orjson

from fhirvault.services.alert_settings import (
    SYSLOG_FACILITIES,
    JsonLinesSinkSettings,
    SinkSettings,
    SmtpSinkSettings,
    SyslogSinkSettings,
    WebhookSinkSettings,
)
from fhirvault.services.alerts import CLOSED, RESOLVED, Alert, AlertSink
from fhirvault.services.residency import check_outbound

SIGNATURE_HEADER = "X-Fhirvault-Signature"
TIMESTAMP_HEADER = "X-Fhirvault-Timestamp"
_ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "no end time"
# RFC 5424 severities: crit, err, warning, notice, info.
SYSLOG_SEVERITY = {"critical": 2, "high": 3, "medium": 4, "low": 5, "info": 6}
SD_ID = "fhirvault@32473"  # 32473: the private enterprise number reserved for examples (RFC 5612)


def tls_client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """Certificates and host names verified, TLS 1.2 at least; ``ca_file`` replaces the system CAs
    (a private CA for the clinic's mail relay or SIEM)."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _iso(ms: int) -> str:
    dt = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def alert_document(alert: Alert, event: str) -> dict[str, Any]:
    """The JSON form every sink shares (timestamps as RFC 3339 UTC)."""
    return {
        "id": alert.id, "event": event, "rule": alert.rule, "severity": alert.severity,
        "summary": alert.summary, "state": alert.state, "count": alert.count,
        "first": _iso(alert.first_ms), "last": _iso(alert.last_ms), "labels": alert.labels,
        "dedup_key": alert.dedup_key, "updated_by": alert.updated_by, "note": alert.note,
    }


def alertmanager_alert(alert: Alert, event: str) -> dict[str, Any]:
    """One alert in Alertmanager's shape (``/api/v2/alerts`` item, webhook ``alerts[]`` item)."""
    resolved = event == RESOLVED or alert.state == CLOSED
    return {
        "status": "resolved" if resolved else "firing",
        "labels": {**alert.labels, "alertname": alert.rule, "severity": alert.severity, "service": "fhirvault"},
        "annotations": {"summary": alert.summary, "count": str(alert.count), "state": alert.state},
        "startsAt": _iso(alert.first_ms),
        "endsAt": _iso(alert.last_ms) if resolved else _ZERO_TIME,
        "generatorURL": "",
        "fingerprint": alert.id,
    }


def webhook_body(alert: Alert, event: str) -> bytes:
    """Our payload, shaped like Alertmanager's webhook so receivers for it accept it too."""
    am = alertmanager_alert(alert, event)
    return orjson.dumps({
        "version": "4", "receiver": "fhirvault", "status": am["status"],
        "groupKey": f"{alert.rule}:{alert.id}", "groupLabels": {"alertname": alert.rule},
        "commonLabels": am["labels"], "commonAnnotations": am["annotations"], "externalURL": "",
        "alerts": [am], "alert": alert_document(alert, event),
    })


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, timestamp + "." + body)."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str, *, now: float | None = None,
           tolerance_seconds: int = 300) -> bool:
    """What a receiver does: constant-time compare, and refuse stale timestamps (replays)."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_seconds and hmac.compare_digest(sign(secret, timestamp, body), signature)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would replay a POST as a GET without the body; a moved receiver is a configuration error.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebhookSink:
    def __init__(self, settings: WebhookSinkSettings, name: str = "webhook") -> None:
        self.name = name
        self.min_severity = settings.min_severity
        self._settings = settings
        self._opener = urllib.request.build_opener(_NoRedirect())

    def send(self, alert: Alert, event: str) -> None:
        s = self._settings
        check_outbound(s.url, "alert webhook")
        if s.format == "alertmanager":
            body = orjson.dumps([alertmanager_alert(alert, event)])
        else:
            body = webhook_body(alert, event)
        timestamp = str(int(time.time()))
        request = urllib.request.Request(s.url, data=body, method="POST", headers={  # noqa: S310 (http/https checked in settings)
            "Content-Type": "application/json", "User-Agent": "fhirvault-alerts",
            TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(s.secret, timestamp, body)})
        with self._opener.open(request, timeout=s.timeout_seconds) as response:
            response.read(65536)  # non-2xx raises HTTPError, which the worker retries

    def close(self) -> None:
        pass


class SmtpSink:
    def __init__(self, settings: SmtpSinkSettings, name: str = "smtp") -> None:
        self.name = name
        self.min_severity = settings.min_severity
        self._settings = settings

    def message(self, alert: Alert, event: str) -> EmailMessage:
        s = self._settings
        msg = EmailMessage()
        status = "RESOLVED" if event == RESOLVED else alert.severity.upper()
        msg["Subject"] = f"[fhirvault {status}] {alert.rule}: {alert.summary}"[:250]
        msg["From"] = s.sender
        msg["To"] = ", ".join(s.recipients)
        msg["X-Fhirvault-Alert-Id"] = alert.id
        doc = alert_document(alert, event)
        lines = [f"{k}: {v}" for k, v in doc.items() if k not in ("labels",) and v is not None]
        lines += [f"label {k}: {v}" for k, v in sorted(alert.labels.items())]
        msg.set_content("\n".join(lines) + "\n")
        return msg

    def send(self, alert: Alert, event: str) -> None:
        s = self._settings
        check_outbound(s.host, "alert e-mail")
        context = tls_client_context(s.ca_file)
        smtp = (smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout_seconds, context=context) if s.implicit_tls
                else smtplib.SMTP(s.host, s.port, timeout=s.timeout_seconds))
        with smtp:
            smtp.ehlo()
            if s.starttls and not s.implicit_tls:
                # Raises SMTPNotSupportedError if the server does not offer it: never fall back to clear text.
                smtp.starttls(context=context)
                smtp.ehlo()
            if s.username is not None:
                smtp.login(s.username, s.password or "")
            smtp.send_message(self.message(alert, event))

    def close(self) -> None:
        pass


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _printable(value: str, limit: int) -> str:
    """RFC 5424 header fields: printable US-ASCII, no spaces, bounded length."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


class SyslogSink:
    def __init__(self, settings: SyslogSinkSettings, name: str = "syslog") -> None:
        self.name = name
        self.min_severity = settings.min_severity
        self._settings = settings
        self._facility = SYSLOG_FACILITIES[settings.facility]
        self._hostname = _printable(socket.gethostname(), 255)
        self._app = _printable(settings.app_name, 48)
        self._procid = str(os.getpid())
        self._tcp: socket.socket | None = None
        self._tls = tls_client_context(settings.ca_file) if settings.transport == "tls" else None

    def format(self, alert: Alert, event: str) -> bytes:
        pri = self._facility * 8 + SYSLOG_SEVERITY[alert.severity]
        params = {"id": alert.id, "rule": alert.rule, "severity": alert.severity, "state": alert.state,
                  "event": event, "count": str(alert.count)}
        sd = "[" + SD_ID + "".join(f' {k}="{_sd_escape(v)}"' for k, v in params.items()) + "]"
        header = f"<{pri}>1 {_iso(alert.last_ms)} {self._hostname} {self._app} {self._procid} {_printable(alert.rule, 32)}"
        msg = orjson.dumps(alert_document(alert, event))  # the whole alert, for SIEMs that parse JSON
        return f"{header} {sd} ".encode() + b"\xef\xbb\xbf" + msg

    def send(self, alert: Alert, event: str) -> None:
        data = self.format(alert, event)
        s = self._settings
        if s.transport == "udp":
            family, kind, proto, _, address = socket.getaddrinfo(s.host, s.port, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, kind, proto) as sock:
                sock.sendto(data, address)
            return
        frame = str(len(data)).encode() + b" " + data  # RFC 6587 / RFC 5425 octet counting
        if self._tcp is not None and self._peer_closed(self._tcp):
            self.close()
        if self._tcp is None:
            raw = socket.create_connection((s.host, s.port), timeout=s.timeout_seconds)
            try:
                self._tcp = raw if self._tls is None else self._tls.wrap_socket(raw, server_hostname=s.host)
            except (OSError, ssl.SSLError):
                raw.close()
                raise
        try:
            self._tcp.sendall(frame)
        except OSError:
            self.close()
            raise

    @staticmethod
    def _peer_closed(sock: socket.socket) -> bool:
        # A syslog receiver never writes: a readable socket means EOF or reset (over TLS, perhaps
        # only a TLS 1.3 session ticket). Writing into a half-closed connection would "succeed" and
        # lose the message, so reconnect first.
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        if isinstance(sock, ssl.SSLSocket):  # no MSG_PEEK over TLS: a non-blocking read instead
            timeout = sock.gettimeout()
            sock.setblocking(False)
            try:
                return sock.recv(1) == b""
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return False  # only handshake records (tickets) were waiting
            except OSError:
                return True
            finally:
                sock.settimeout(timeout)
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        if self._tcp is not None:
            try:
                self._tcp.close()
            finally:
                self._tcp = None


class JsonLinesSink:
    """Append one JSON object per line and fsync, for a SIEM agent to tail.

    The file is opened per alert, so log rotation (rename, then a new file) just works.
    """

    def __init__(self, settings: JsonLinesSinkSettings, name: str = "jsonl") -> None:
        self.name = name
        self.min_severity = settings.min_severity
        self._path = Path(settings.path)

    def send(self, alert: Alert, event: str) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        line = orjson.dumps(alert_document(alert, event)) + b"\n"
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        pass


def build_sinks(configured: tuple[SinkSettings, ...]) -> list[AlertSink]:
    sinks: list[AlertSink] = []
    for index, s in enumerate(configured):
        if isinstance(s, WebhookSinkSettings):
            sinks.append(WebhookSink(s, f"webhook{index}"))
        elif isinstance(s, SmtpSinkSettings):
            sinks.append(SmtpSink(s, f"smtp{index}"))
        elif isinstance(s, SyslogSinkSettings):
            sinks.append(SyslogSink(s, f"syslog{index}"))
        else:
            sinks.append(JsonLinesSink(s, f"jsonl{index}"))
    return sinks
