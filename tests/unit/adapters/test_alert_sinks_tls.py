"""TLS for the SMTP and syslog sinks and the syslog witness, against real local TLS servers whose
certificates come from a private CA made here (pyca/cryptography)."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fhirvault.adapters.alert_sinks import SmtpSink, SyslogSink
from fhirvault.adapters.witness import open_witness
from fhirvault.services.alert_settings import SmtpSinkSettings, SyslogSinkSettings
from fhirvault.services.alerts import FIRING
from fhirvault.services.audit_checkpoints import WitnessedCheckpoint
from tests.unit.adapters.test_alert_sinks import (
    Mailbox,
    _authenticator,
    free_port,
    make_alert,
    parse_syslog,
)


@dataclass
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path
    other_ca_file: Path  # a CA that did not sign the server certificate

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _ca("fhirvault test CA")
    _, other_cert = _ca("some other CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pki = Pki(base / "ca.pem", base / "server.pem", base / "server.key", base / "other-ca.pem")
    pki.ca_file.write_bytes(_pem(ca_cert))
    pki.other_ca_file.write_bytes(_pem(other_cert))
    pki.cert_file.write_bytes(_pem(cert))
    pki.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return pki


# --- SMTP ---------------------------------------------------------------------------------------


@pytest.fixture
def starttls_server(pki: Pki) -> Iterator[tuple[Mailbox, int]]:
    """A relay that requires STARTTLS before anything else, and TLS before AUTH."""
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port, tls_context=pki.server_context(),
                            require_starttls=True, auth_require_tls=True, authenticator=_authenticator)
    controller.start()
    yield box, port
    controller.stop()


def _smtp(port: int, **kw: object) -> SmtpSink:
    return SmtpSink(SmtpSinkSettings(host="127.0.0.1", port=port, sender="fhirvault@example.org",
                                     recipients=("soc@example.org",), **kw))  # type: ignore[arg-type]


def test_smtp_starttls_with_private_ca_and_login(pki: Pki, starttls_server: tuple[Mailbox, int]) -> None:
    box, port = starttls_server
    _smtp(port, ca_file=pki.ca_file, username="alerts", password="s3cret").send(make_alert(), FIRING)
    [(envelope, raw)] = box.messages
    assert envelope.rcpt_tos == ["soc@example.org"]
    assert message_from_bytes(raw)["Subject"].startswith("[fhirvault HIGH] brute_force:")


def test_smtp_starttls_refuses_an_unverified_certificate(pki: Pki, starttls_server: tuple[Mailbox, int]) -> None:
    box, port = starttls_server
    with pytest.raises(ssl.SSLCertVerificationError):
        _smtp(port).send(make_alert(), FIRING)  # system CAs: the test CA is unknown
    with pytest.raises(ssl.SSLCertVerificationError):
        _smtp(port, ca_file=pki.other_ca_file).send(make_alert(), FIRING)
    assert not box.messages


def test_smtp_implicit_tls(pki: Pki) -> None:
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port, ssl_context=pki.server_context())
    controller.start()
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            _smtp(port, implicit_tls=True, ca_file=pki.other_ca_file).send(make_alert(), FIRING)
        assert not box.messages
        _smtp(port, implicit_tls=True, ca_file=pki.ca_file).send(make_alert(id="tls"), FIRING)
    finally:
        controller.stop()
    [(_, raw)] = box.messages
    assert message_from_bytes(raw)["X-Fhirvault-Alert-Id"] == "tls"


# --- syslog over TLS (RFC 5425) ----------------------------------------------------------------


class TlsSyslogServer:
    """Accepts TLS connections and collects octet-counted frames (RFC 5425 §4.3)."""

    def __init__(self, context: ssl.SSLContext, host: str = "127.0.0.1") -> None:
        self.frames: list[bytes] = []
        self.got = threading.Semaphore(0)
        self.handshake_failures = 0
        self.connections = 0
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._context = context
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            try:
                conn = self._context.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError):
                self.handshake_failures += 1
                raw.close()
                continue
            self.connections += 1
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: ssl.SSLSocket) -> None:
        buf = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b" " in buf:
                    length, _, rest = buf.partition(b" ")
                    if len(rest) < int(length):
                        break
                    self.frames.append(rest[:int(length)])
                    buf = rest[int(length):]
                    self.got.release()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()


@pytest.fixture
def tls_syslog(pki: Pki) -> Iterator[TlsSyslogServer]:
    server = TlsSyslogServer(pki.server_context())
    yield server
    server.close()


def test_syslog_tls_octet_counting(pki: Pki, tls_syslog: TlsSyslogServer) -> None:
    sink = SyslogSink(SyslogSinkSettings(host="127.0.0.1", port=tls_syslog.port, transport="tls",
                                         ca_file=pki.ca_file))
    try:
        sink.send(make_alert(id="one"), FIRING)
        assert tls_syslog.got.acquire(timeout=5)
        sink.send(make_alert(id="two"), FIRING)
        assert tls_syslog.got.acquire(timeout=5)
    finally:
        sink.close()
    assert [parse_syslog(f)["params"]["id"] for f in tls_syslog.frames] == ["one", "two"]
    assert tls_syslog.connections == 1  # kept open: a TLS 1.3 session ticket waiting is not a hang-up


def test_syslog_tls_refuses_an_unverified_certificate(pki: Pki, tls_syslog: TlsSyslogServer) -> None:
    for ca in (None, pki.other_ca_file):
        sink = SyslogSink(SyslogSinkSettings(host="127.0.0.1", port=tls_syslog.port, transport="tls", ca_file=ca))
        with pytest.raises(ssl.SSLCertVerificationError):
            sink.send(make_alert(), FIRING)
        sink.close()
    assert tls_syslog.frames == []


def test_syslog_tls_checks_the_host_name(pki: Pki) -> None:
    # The certificate (from the trusted CA) names localhost and 127.0.0.1, not 127.0.0.2.
    server = TlsSyslogServer(pki.server_context(), host="127.0.0.2")
    sink = SyslogSink(SyslogSinkSettings(host="127.0.0.2", port=server.port, transport="tls", ca_file=pki.ca_file))
    try:
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            sink.send(make_alert(), FIRING)
    finally:
        sink.close()
        server.close()
    assert server.frames == []


def test_syslog_tls_witness(pki: Pki, tls_syslog: TlsSyslogServer) -> None:
    witness = open_witness(f"syslog+tls://localhost:{tls_syslog.port}?ca={pki.ca_file}")
    assert witness.name == f"syslog+tls://localhost:{tls_syslog.port}"
    checkpoint = WitnessedCheckpoint(origin="fhirvault/default", size=3, root=b"\xab" * 32,
                                     ts_ms=1_764_000_000_000, key_id="k1", signature=b"sig")
    witness.publish(checkpoint)
    assert tls_syslog.got.acquire(timeout=5)
    [frame] = tls_syslog.frames
    assert frame.startswith(b"<110>1 ") and b'"size":3' in frame
    with pytest.raises(ssl.SSLCertVerificationError):
        open_witness(f"syslog+tls://localhost:{tls_syslog.port}").publish(checkpoint)
