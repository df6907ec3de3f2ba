"""Each sink against a real local receiver: HTTP server checking the HMAC, aiosmtpd, UDP/TCP syslog."""

from __future__ import annotations

import http.server
import re
import smtplib
import socket
import stat
import threading
import time
import urllib.error
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, Session

from fhirvault.adapters.alert_sinks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    JsonLinesSink,
    SmtpSink,
    SyslogSink,
    WebhookSink,
    build_sinks,
    sign,
    verify,
)
from fhirvault.services.alert_settings import (
    JsonLinesSinkSettings,
    SmtpSinkSettings,
    SyslogSinkSettings,
    WebhookSinkSettings,
)
from fhirvault.services.alerts import CLOSED, FIRING, RESOLVED, Alert

SECRET = b"test-webhook-secret-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_alert(**kw: Any) -> Alert:
    base: dict[str, Any] = dict(
        id="a1b2c3", rule="brute_force", severity="high", summary='5+ failed logins for client "x"]',
        dedup_key="account:client:x", state="open", first_ms=1_764_000_000_000, last_ms=1_764_000_005_000,
        count=7, labels={"client_id": "x", "source_ip": "10.0.0.9"})
    base.update(kw)
    return Alert(**base)


# --- webhook ---------------------------------------------------------------------


class Receiver:
    """A real HTTP server that verifies the signature like a receiver would."""

    def __init__(self, port: int = 0, status: int = 200) -> None:
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.bad_signatures = 0
        self.status = status
        self.event = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ts = self.headers.get(TIMESTAMP_HEADER, "")
                if not verify(SECRET, ts, body, self.headers.get(SIGNATURE_HEADER, "")):
                    outer.bad_signatures += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                if outer.status == 200:
                    outer.received.append(orjson.loads(body))
                    outer.headers.append(dict(self.headers))
                    outer.event.set()
                self.send_response(outer.status)
                if outer.status in (301, 302, 307):
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def test_webhook_posts_signed_alertmanager_shaped_json(receiver: Receiver) -> None:
    sink = WebhookSink(WebhookSinkSettings(url=receiver.url, secret=SECRET))
    sink.send(make_alert(), FIRING)
    assert receiver.bad_signatures == 0
    [doc] = receiver.received
    assert doc["status"] == "firing"
    [am] = doc["alerts"]
    assert am["labels"]["alertname"] == "brute_force" and am["labels"]["severity"] == "high"
    assert am["endsAt"] == "0001-01-01T00:00:00Z" and am["startsAt"].startswith("2025-11-24T")
    assert doc["alert"]["count"] == 7 and doc["alert"]["id"] == "a1b2c3"
    assert receiver.headers[0][SIGNATURE_HEADER].startswith("sha256=")


def test_resolved_event_and_alertmanager_api_format(receiver: Receiver) -> None:
    sink = WebhookSink(WebhookSinkSettings(url=receiver.url, secret=SECRET, format="alertmanager"))
    sink.send(make_alert(state=CLOSED), RESOLVED)
    [doc] = receiver.received
    assert isinstance(doc, list)  # the body of POST /api/v2/alerts
    assert doc[0]["status"] == "resolved" and doc[0]["endsAt"] != "0001-01-01T00:00:00Z"


def test_signature_covers_body_and_timestamp() -> None:
    body = b'{"a":1}'
    now = time.time()
    ts = str(int(now))
    sig = sign(SECRET, ts, body)
    assert verify(SECRET, ts, body, sig, now=now)
    assert not verify(SECRET, ts, b'{"a":2}', sig, now=now)  # tampered body
    assert not verify(b"other", ts, body, sig, now=now)  # wrong key
    assert not verify(SECRET, str(int(now) - 1), body, sig, now=now)  # timestamp is in the MAC
    assert not verify(SECRET, ts, body, sig, now=now + 3600)  # replayed later


def test_webhook_with_wrong_secret_is_refused_and_raises(receiver: Receiver) -> None:
    sink = WebhookSink(WebhookSinkSettings(url=receiver.url, secret=b"not-the-secret"))
    with pytest.raises(urllib.error.HTTPError):
        sink.send(make_alert(), FIRING)
    assert receiver.bad_signatures == 1 and not receiver.received


@pytest.mark.parametrize("status", [500, 302])
def test_webhook_failure_status_and_redirects_raise(status: int) -> None:
    r = Receiver(status=status)
    try:
        sink = WebhookSink(WebhookSinkSettings(url=r.url, secret=SECRET))
        with pytest.raises(urllib.error.HTTPError):
            sink.send(make_alert(), FIRING)
    finally:
        r.stop()


def test_webhook_receiver_down_raises_quickly() -> None:
    sink = WebhookSink(WebhookSinkSettings(url=f"http://127.0.0.1:{free_port()}/x", secret=SECRET,
                                           timeout_seconds=2))
    start = time.monotonic()
    with pytest.raises(OSError):
        sink.send(make_alert(), FIRING)
    assert time.monotonic() - start < 2.5


# --- SMTP --------------------------------------------------------------------------


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, bytes]] = []

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.messages.append((envelope, bytes(envelope.original_content or b"")))
        return "250 OK"


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = data.login == b"alerts" and data.password == b"s3cret"
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp_server() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port, auth_require_tls=False,
                            authenticator=_authenticator)
    controller.start()
    yield box, port
    controller.stop()


def test_smtp_sink_sends_mail_with_login(smtp_server: tuple[Mailbox, int]) -> None:
    box, port = smtp_server
    sink = SmtpSink(SmtpSinkSettings(host="127.0.0.1", port=port, starttls=False, sender="fhirvault@example.org",
                                     recipients=("soc@example.org", "oncall@example.org"),
                                     username="alerts", password="s3cret"))
    sink.send(make_alert(), FIRING)
    [(envelope, raw)] = box.messages
    assert envelope.mail_from == "fhirvault@example.org"
    assert envelope.rcpt_tos == ["soc@example.org", "oncall@example.org"]
    msg = message_from_bytes(raw)
    assert msg["Subject"].startswith("[fhirvault HIGH] brute_force:")
    assert "count: 7" in msg.get_payload()


def test_smtp_bad_login_raises(smtp_server: tuple[Mailbox, int]) -> None:
    box, port = smtp_server
    sink = SmtpSink(SmtpSinkSettings(host="127.0.0.1", port=port, starttls=False, sender="a@example.org",
                                     recipients=("b@example.org",), username="alerts", password="wrong"))
    with pytest.raises(smtplib.SMTPAuthenticationError):
        sink.send(make_alert(), FIRING)
    assert not box.messages


def test_smtp_starttls_required_is_not_downgraded(smtp_server: tuple[Mailbox, int]) -> None:
    box, port = smtp_server  # this server offers no STARTTLS: the sink must refuse to send in clear
    sink = SmtpSink(SmtpSinkSettings(host="127.0.0.1", port=port, starttls=True, sender="a@example.org",
                                     recipients=("b@example.org",)))
    with pytest.raises(smtplib.SMTPNotSupportedError):
        sink.send(make_alert(), FIRING)
    assert not box.messages


# --- syslog --------------------------------------------------------------------------

RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<proc>\S+) (?P<msgid>\S+) "
    rb"(?P<sd>\[(?:[^\]\\]|\\.)*\]) \xef\xbb\xbf(?P<msg>.*)$", re.S)


def parse_syslog(data: bytes) -> dict[str, Any]:
    m = RFC5424.match(data)
    assert m, data
    sd = m["sd"].decode()
    params = {k: v.replace('\\"', '"').replace("\\]", "]").replace("\\\\", "\\")
              for k, v in re.findall(r' (\w+)="((?:[^"\\]|\\.)*)"', sd)}
    return {"pri": int(m["pri"]), "ts": m["ts"].decode(), "app": m["app"].decode(), "msgid": m["msgid"].decode(),
            "sd_id": sd[1:].split(" ")[0], "params": params, "msg": orjson.loads(m["msg"])}


def test_syslog_udp_rfc5424() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(5)
        port = listener.getsockname()[1]
        sink = SyslogSink(SyslogSinkSettings(host="127.0.0.1", port=port, facility="local3"))
        sink.send(make_alert(severity="critical"), FIRING)
        data, _ = listener.recvfrom(65536)
    parsed = parse_syslog(data)
    assert parsed["pri"] == 19 * 8 + 2  # local3, crit
    assert parsed["app"] == "fhirvault" and parsed["msgid"] == "brute_force"
    assert parsed["ts"] == "2025-11-24T16:00:05.000Z"
    assert parsed["sd_id"] == "fhirvault@32473"
    assert parsed["params"]["rule"] == "brute_force" and parsed["params"]["severity"] == "critical"
    assert parsed["msg"]["summary"] == '5+ failed logins for client "x"]'


def test_syslog_tcp_octet_counting_and_reconnect() -> None:
    frames: list[bytes] = []
    got = threading.Semaphore(0)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        for _ in range(2):  # the first connection is dropped after one frame, the sink must reconnect
            conn, _ = server.accept()
            buf = b""
            with conn:
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                    while b" " in buf:
                        length, _, rest = buf.partition(b" ")
                        if len(rest) < int(length):
                            break
                        frames.append(rest[:int(length)])
                        buf = rest[int(length):]
                        got.release()
                    if len(frames) == 1:
                        break

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    sink = SyslogSink(SyslogSinkSettings(host="127.0.0.1", port=port, transport="tcp"))
    try:
        sink.send(make_alert(id="one"), FIRING)
        assert got.acquire(timeout=5)
        time.sleep(0.2)  # the server has closed that connection by now
        sink.send(make_alert(id="two", severity="low"), FIRING)
        assert got.acquire(timeout=5)
    finally:
        sink.close()
        server.close()
    first, second = (parse_syslog(f) for f in frames[:2])
    assert first["params"]["id"] == "one" and second["params"]["id"] == "two"
    assert second["pri"] == 4 * 8 + 5  # auth, notice


# --- JSON lines ------------------------------------------------------------------------


def test_jsonl_appends_lines_with_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "siem" / "alerts.jsonl"
    sink = JsonLinesSink(JsonLinesSinkSettings(path=path))
    sink.send(make_alert(), FIRING)
    sink.send(make_alert(state=CLOSED), RESOLVED)
    lines = path.read_bytes().splitlines()
    assert [orjson.loads(line)["event"] for line in lines] == ["firing", "resolved"]
    assert orjson.loads(lines[0])["labels"]["source_ip"] == "10.0.0.9"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_build_sinks_names_each(tmp_path: Path) -> None:
    sinks = build_sinks((JsonLinesSinkSettings(path=tmp_path / "a"),
                         WebhookSinkSettings(url="http://127.0.0.1:1/", secret=SECRET),
                         SyslogSinkSettings(host="127.0.0.1")))
    assert [s.name for s in sinks] == ["jsonl0", "webhook1", "syslog2"]
    assert SECRET.decode() not in repr(WebhookSinkSettings(url="http://x/", secret=SECRET))
