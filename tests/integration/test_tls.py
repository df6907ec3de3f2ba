"""HTTPS: TLS 1.2 and 1.3 accepted, older protocols and plaintext refused."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
import warnings
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import start_server


def _self_signed(dir: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                   x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = dir / "cert.pem", dir / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _handshake(port: int, version: ssl.TLSVersion) -> str | None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer old protocols: the server must say no
    ctx.minimum_version = ctx.maximum_version = version
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.version()
    except (ssl.SSLError, OSError):
        return None


def _legacy_server(cert: Path, key: Path) -> int:
    """A deliberately permissive TLS 1.0-1.1 server, to prove the client really offers those versions."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        conn, _ = listener.accept()
        with contextlib.suppress(ssl.SSLError, OSError), ctx.wrap_socket(conn, server_side=True):
            pass
        listener.close()

    threading.Thread(target=accept, daemon=True).start()
    return int(listener.getsockname()[1])


@pytest.mark.server
def test_tls_versions(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    srv = start_server(tmp_path / "data", tmp_path / "log", "--tls-cert", str(cert), "--tls-key", str(key), tls=True)
    port = int(srv.base_url.rsplit(":", 1)[1])
    try:
        assert _handshake(port, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
        assert _handshake(port, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            assert _handshake(_legacy_server(cert, key), ssl.TLSVersion.TLSv1_1) == "TLSv1.1"  # client can
            assert _handshake(port, ssl.TLSVersion.TLSv1_1) is None  # fhirvault refuses
        r = httpx.get(srv.base_url + "/fhir/metadata", verify=ssl.create_default_context(cafile=str(cert)))
        assert r.status_code == 200 and r.headers.get("strict-transport-security")
        with pytest.raises(httpx.HTTPError):
            httpx.get(srv.base_url.replace("https://", "http://") + "/livez", timeout=3)
    finally:
        srv.stop()
