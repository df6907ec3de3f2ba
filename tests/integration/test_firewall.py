"""The application firewall through the whole ASGI app: the real client behind trusted proxies, the
Host header, rate limits, source allow-lists (per OAuth client, /admin, login pages)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from fhirvault.bootstrap import initialise
from fhirvault.config import Settings, load_settings
from fhirvault.container import Container, build
from fhirvault.services.firewall_settings import FirewallSettings
from fhirvault.web.app import create_app
from tests.conftest import PATIENT

FHIR_JSON = {"Content-Type": "application/fhir+json"}


@dataclass
class Env:
    container: Container
    creds: dict[str, str]
    asgi: Any

    def client(self, peer: str, base_url: str = "http://testserver") -> TestClient:
        """A client connecting from ``peer`` (the TCP peer address the server sees)."""
        return TestClient(self.asgi, base_url=base_url, client=(peer, 40000))

    def records(self) -> list[dict[str, Any]]:
        c = self.container
        return [c.audit.decrypt(seq, ts, blob) for seq, ts, blob in c.store.audit_entries("default", limit=100_000)]

    def token(self, client: TestClient, creds: dict[str, str] | None = None) -> str:
        creds = creds or self.creds
        r = client.post("/oauth2/token", data={"grant_type": "client_credentials"},
                        auth=(creds["client_id"], creds["client_secret"]))
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])


Configure = Callable[..., Env]


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Configure]:
    opened: list[TestClient] = []

    def configure(firewall: FirewallSettings | None = None, **overrides: Any) -> Env:
        base = load_settings({"data_dir": tmp_path / "data"}, environ={})
        creds = json.loads(initialise(base).read_text())
        settings: Settings = dataclasses.replace(base, firewall=firewall, **overrides)
        container = build(settings)
        asgi = create_app(container)
        life = TestClient(asgi)  # runs the lifespan (start-up checks, audit monitor) for the test
        life.__enter__()
        opened.append(life)
        return Env(container, creds, asgi)

    yield configure
    for life in opened:
        life.__exit__(None, None, None)


def _sources(env: Env, interaction: str) -> list[str]:
    return [str(r["source_ip"]) for r in env.records() if r["interaction"] == interaction]


def _bad_token_request(client: TestClient, headers: dict[str, str] | None = None) -> None:
    r = client.post("/oauth2/token", data={"grant_type": "client_credentials"}, auth=("fv-nobody", "wrong"),
                    headers=headers)
    assert r.status_code == 401


# --- trusted proxies ---------------------------------------------------------------------------


def test_forwarded_headers_from_an_untrusted_peer_are_ignored(make_env: Configure) -> None:
    env = make_env()  # no trusted_proxies: nobody's headers are believed
    client = env.client("198.51.100.20")
    _bad_token_request(client, {"X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.10"})
    assert _sources(env, "token") == ["198.51.100.20"]
    r = client.get("/fhir/metadata", headers={"X-Forwarded-Proto": "https"})
    assert r.json()["implementation"]["url"].startswith("http://testserver/")


def test_a_trusted_proxy_names_the_real_client(make_env: Configure) -> None:
    env = make_env(trusted_proxies=("10.0.0.0/8",))
    proxy = env.client("10.0.0.5")
    # The left-most entry is whatever the client sent; the walk stops at the first untrusted hop.
    _bad_token_request(proxy, {"X-Forwarded-For": "192.0.2.1, 203.0.113.66, 10.0.0.7"})
    _bad_token_request(proxy, {"Forwarded": 'for=192.0.2.1, for="[2001:db8::17]:4711";proto=https, for=10.0.0.9'})
    # Not from a proxy we trust: the headers are ignored.
    _bad_token_request(env.client("198.51.100.1"), {"X-Forwarded-For": "203.0.113.99"})
    assert _sources(env, "token") == ["203.0.113.66", "2001:db8::17", "198.51.100.1"]
    # X-Forwarded-Proto from the proxy: links are https.
    r = proxy.get("/fhir/metadata", headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.66"})
    assert r.json()["implementation"]["url"].startswith("https://testserver/")


# --- Host header and public_base_url -------------------------------------------------------------


def test_unknown_host_is_refused_without_public_base_url(make_env: Configure) -> None:
    env = make_env()
    client = env.client("127.0.0.1", base_url="http://127.0.0.1:8080")
    assert client.get("/fhir/metadata").status_code == 200
    assert client.get("/fhir/metadata", headers={"Host": "localhost:8080"}).status_code == 200
    for evil in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example", "127.0.0.1:80@evil.example", ""):
        r = client.get("/fhir/metadata", headers={"Host": evil})
        assert r.status_code == 400, evil
        assert r.json()["resourceType"] == "OperationOutcome"
        assert "evil" not in r.text
    assert client.get("/livez", headers={"Host": "evil.example"}).status_code == 200  # probes are exempt
    token = env.token(client)
    r = client.get("/.well-known/smart-configuration", headers={"Host": "evil.example"})
    assert r.status_code == 400
    r = client.get("/fhir/Patient", headers={"Host": "evil.example", "Authorization": f"Bearer {token}"})
    assert r.status_code == 400


def test_allowed_hosts_setting(make_env: Configure) -> None:
    env = make_env(allowed_hosts=("fhir.clinic.example", "*.ward.example"))
    client = env.client("127.0.0.1", base_url="http://fhir.clinic.example")
    assert client.get("/fhir/metadata").json()["implementation"]["url"] == "http://fhir.clinic.example/fhir"
    assert client.get("/fhir/metadata", headers={"Host": "a.ward.example:8443"}).status_code == 200
    assert client.get("/fhir/metadata", headers={"Host": "ward.example.evil"}).status_code == 400
    assert client.get("/fhir/metadata", headers={"Host": "localhost"}).status_code == 400  # the list replaces it


def test_public_base_url_is_used_and_host_never_reflected(make_env: Configure) -> None:
    env = make_env(public_base_url="https://fhir.example.org")
    client = env.client("127.0.0.1", base_url="http://evil.example")
    token = env.token(client)
    auth = {"Authorization": f"Bearer {token}"}
    created = client.post("/fhir/Patient", json=PATIENT, headers={**auth, **FHIR_JSON})
    assert created.status_code == 201
    assert created.headers["location"].startswith("https://fhir.example.org/fhir/Patient/")
    bundle = client.get("/fhir/Patient", headers=auth).json()
    links = [link["url"] for link in bundle["link"]] + [e["fullUrl"] for e in bundle["entry"]]
    assert links and all(u.startswith("https://fhir.example.org/fhir/") for u in links)
    capability = client.get("/fhir/metadata").text
    smart = client.get("/.well-known/smart-configuration").text
    oidc = client.get("/.well-known/openid-configuration").text
    for doc in (capability, smart, oidc, created.text, json.dumps(bundle)):
        assert "evil.example" not in doc
    assert json.loads(smart)["token_endpoint"] == "https://fhir.example.org/oauth2/token"
    assert json.loads(oidc)["authorization_endpoint"] == "https://fhir.example.org/oauth2/authorize"


# --- rate limits -------------------------------------------------------------------------------


def test_source_bucket_429_retry_after_and_recovery(make_env: Configure) -> None:
    env = make_env(FirewallSettings(source_rate=0.5, source_burst=4))
    client = env.client("198.51.100.7")
    statuses = [client.get("/fhir/metadata").status_code for _ in range(4)]
    assert statuses == [200] * 4
    r = client.get("/fhir/metadata")
    assert r.status_code == 429
    assert r.headers["retry-after"] in ("1", "2")  # one token in 2 s
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "throttled"
    for _ in range(5):  # refused again and again: still one audit record for the window
        assert client.get("/fhir/metadata").status_code == 429
    assert env.client("198.51.100.8").get("/fhir/metadata").status_code == 200  # another address is untouched
    time.sleep(float(r.headers["retry-after"]))
    assert client.get("/fhir/metadata").status_code == 200  # refilled
    limited = [r for r in env.records() if r["interaction"] == "rate-limit"]
    assert len(limited) == 1 and limited[0]["status"] == 429 and limited[0]["source_ip"] == "198.51.100.7"
    assert "source bucket" in str(limited[0]["detail"])
    metrics = env.container.metrics.registry.get_sample_value("fhirvault_rate_limited_requests_total",
                                                              {"bucket": "source"})
    assert metrics == 6.0
    alerts = env.container.alerts.open_counts() if env.container.alerts is not None else {}
    assert any(rule == "rate_limited" for rule, _ in alerts)


def test_client_bucket_spans_addresses(make_env: Configure) -> None:
    env = make_env(FirewallSettings(client_rate=0.5, client_burst=3))
    token = env.token(env.client("198.51.100.1"))
    auth = {"Authorization": f"Bearer {token}"}
    statuses = [env.client(f"198.51.100.{i}").get("/fhir/Patient", headers=auth).status_code for i in range(1, 6)]
    assert statuses[:3] == [200] * 3 and statuses[3:] == [429, 429]
    # Another client (and unauthenticated calls) are not affected by this client's bucket.
    other = env.container.auth.register_client("other", "system/*.rs")
    other_token = env.token(env.client("198.51.100.1"), {"client_id": other.client_id,
                                                         "client_secret": str(other.client_secret)})
    r = env.client("198.51.100.1").get("/fhir/Patient", headers={"Authorization": f"Bearer {other_token}"})
    assert r.status_code == 200
    [record] = [r for r in env.records() if r["interaction"] == "rate-limit"]
    assert record["client_id"] == env.creds["client_id"] and "client bucket" in str(record["detail"])


def test_auth_bucket_slows_password_guessing_per_source(make_env: Configure) -> None:
    env = make_env(FirewallSettings(auth_rate=0.1, auth_burst=3))
    attacker = env.client("203.0.113.7")
    for _ in range(3):
        _bad_token_request(attacker)
    r = attacker.post("/oauth2/token", data={"grant_type": "client_credentials"}, auth=("fv-nobody", "wrong"))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"] == "temporarily_unavailable"  # an OAuth error body, which OAuth clients parse
    assert attacker.get("/fhir/metadata").status_code == 200  # reads are not auth requests
    env.token(env.client("198.51.100.1"))  # the legitimate client elsewhere gets its token


def test_firewall_can_be_disabled(make_env: Configure) -> None:
    env = make_env(FirewallSettings(enabled=False, source_rate=0.01, source_burst=1))
    client = env.client("198.51.100.7")
    assert all(client.get("/fhir/metadata").status_code == 200 for _ in range(5))
    # Only the buckets are off: a client's allow-list still holds.
    reg = env.container.auth.register_client("lab", "system/*.rs", allowed_sources=["192.0.2.0/24"])
    token = env.token(env.client("192.0.2.1"), {"client_id": reg.client_id, "client_secret": str(reg.client_secret)})
    assert client.get("/fhir/Patient", headers={"Authorization": f"Bearer {token}"}).status_code == 403


# --- allow-lists -------------------------------------------------------------------------------


def test_client_allow_list_at_the_token_endpoint_and_on_every_request(make_env: Configure) -> None:
    env = make_env()
    reg = env.container.auth.register_client("lab", "system/*.rs", allowed_sources=["192.0.2.0/24", "2001:db8::1"])
    assert reg.allowed_sources == "192.0.2.0/24 2001:db8::1/128"
    creds = {"client_id": reg.client_id, "client_secret": str(reg.client_secret)}
    inside, outside = env.client("192.0.2.44"), env.client("198.51.100.9")
    r = outside.post("/oauth2/token", data={"grant_type": "client_credentials"},
                     auth=(creds["client_id"], creds["client_secret"]))
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    token = env.token(inside, creds)
    auth = {"Authorization": f"Bearer {token}"}
    assert inside.get("/fhir/Patient", headers=auth).status_code == 200
    r = outside.get("/fhir/Patient", headers=auth)  # a stolen token used elsewhere
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    assert outside.get("/fhir/Patient", headers=auth).status_code == 403
    records = env.records()
    refused = [r for r in records if r["interaction"] == "firewall"]
    assert len(refused) == 1 and refused[0]["client_id"] == reg.client_id  # once per window
    token_refusal = [r for r in records if r["interaction"] == "token" and r["status"] == 401]
    assert token_refusal and token_refusal[0]["source_ip"] == "198.51.100.9"
    assert env.client("2001:db8::1").get("/fhir/Patient", headers=auth).status_code == 200
    # Introspection (a resource server authenticating as this client) holds to the list as well.
    basic = (creds["client_id"], creds["client_secret"])
    assert inside.post("/oauth2/introspect", data={"token": token}, auth=basic).json()["active"] is True
    r = outside.post("/oauth2/introspect", data={"token": token}, auth=basic)
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    # The admin client made by init has no allow-list.
    assert env.client("198.51.100.9").get("/fhir/metadata").status_code == 200
    env.token(outside)


def test_admin_and_login_allow_lists(make_env: Configure) -> None:
    fw = FirewallSettings(admin_allowed_sources=(ipaddress.ip_network("10.20.0.0/16"),),
                          login_allowed_sources=(ipaddress.ip_network("10.0.0.0/8"),))
    env = make_env(fw)
    inside, ward, outside = env.client("10.20.1.1"), env.client("10.30.0.1"), env.client("198.51.100.4")
    assert outside.get("/admin/break-glass").status_code == 403
    assert ward.get("/admin/break-glass").status_code == 403
    assert inside.get("/admin/break-glass").status_code == 401  # reached the endpoint: no token
    assert outside.get("/console/login").status_code == 403  # the console is an administration page too
    assert inside.get("/console/login").status_code == 200
    for client in (inside, ward):
        assert client.get("/oauth2/authorize").status_code != 403
    r = outside.get("/oauth2/authorize", params={"client_id": "x"})
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    assert outside.get("/login/oidc/any").status_code == 403
    env.token(outside)  # the token endpoint is for backend clients: their own allow-lists apply


# --- certificate-bound tokens (RFC 8705) behind a TLS-terminating proxy (RFC 9440) ----------------


def _client_cert_header(cn: str) -> tuple[str, str]:
    """An RFC 9440 Client-Cert value for a fresh self-signed certificate, and its x5t#S256."""
    import base64
    import datetime
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    x5t = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    return f":{base64.b64encode(der).decode()}:", x5t


def test_tokens_bound_to_the_client_certificate_a_trusted_proxy_verified(make_env: Configure) -> None:
    import base64

    env = make_env(trusted_proxies=("10.0.0.0/8",))
    proxy, direct = env.client("10.0.0.5"), env.client("198.51.100.3")
    cert, x5t = _client_cert_header("lab-backend")
    other, _ = _client_cert_header("someone-else")
    r = proxy.post("/oauth2/token", data={"grant_type": "client_credentials"},
                   auth=(env.creds["client_id"], env.creds["client_secret"]), headers={"Client-Cert": cert})
    assert r.status_code == 200
    token = r.json()["access_token"]
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["cnf"] == {"x5t#S256": x5t}
    auth = {"Authorization": f"Bearer {token}"}
    assert proxy.get("/fhir/Patient", headers={**auth, "Client-Cert": cert}).status_code == 200
    for headers in (auth, {**auth, "Client-Cert": other}):
        refused = proxy.get("/fhir/Patient", headers=headers)
        assert refused.status_code == 401 and 'error="invalid_token"' in refused.headers["www-authenticate"]
        assert refused.json()["resourceType"] == "OperationOutcome"
    # The header is believed from trusted proxies only: a direct caller cannot claim the certificate.
    assert direct.get("/fhir/Patient", headers={**auth, "Client-Cert": cert}).status_code == 401
    # Without a certificate the token is a plain bearer token, as before.
    plain = env.token(direct)
    assert direct.get("/fhir/Patient", headers={"Authorization": f"Bearer {plain}"}).status_code == 200


# --- lockout an attacker cannot turn against the owner ---------------------------------------------


def _wait_until(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_client_lockout_is_per_source_then_everywhere_after_many_sources(make_env: Configure) -> None:
    env = make_env()
    client_id, secret = env.creds["client_id"], env.creds["client_secret"]

    def attempt(source: str, password: str) -> int:
        r = env.client(source).post("/oauth2/token", data={"grant_type": "client_credentials"},
                                    auth=(client_id, password))
        return r.status_code

    for _ in range(5):  # an attacker who knows only the client id
        assert attempt("203.0.113.7", "guess") == 401
    assert _wait_until(lambda: attempt("203.0.113.7", secret) == 429)  # locked for the attacker's address...
    assert attempt("198.51.100.1", secret) == 200  # ...not for the owner's
    for n in range(9):  # failures from 10 addresses in all: a distributed attack locks it everywhere
        assert attempt(f"192.0.2.{n}", "guess") == 401
    assert _wait_until(lambda: attempt("198.51.100.1", secret) == 429)
