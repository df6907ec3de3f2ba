"""Federated login against a real OpenID Connect provider process (oidc-provider-mock), and strict
ID token checks against tokens we sign ourselves, served with a JWKS by a tiny local HTTP server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey

from fhirvault.services.federation import OidcProvider
from fhirvault.services.federation_settings import IdentityProviderSettings
from fhirvault.services.identity_types import FederatedIdentity, FederationError
from tests.conftest import free_port

REDIRECT = "https://fhirvault.test/login/oidc/mock/callback"
CLIENT_ID = "fhirvault"
USERS = [
    {"sub": "alice", "preferred_username": "alice", "email": "alice@example.org", "roles": ["doctor"],
     "amr": ["pwd", "otp"], "fhirUser": "Practitioner/p-1", "org": "Organization/o-1"},
    {"sub": "nina", "email": "nina@example.org", "realm_access": {"roles": ["offline", "nurse"]},
     "acr": "eidas1"},
    {"sub": "bob", "email": "bob@example.org", "roles": ["visitor"]},
]


# -- the real provider process -------------------------------------------------------------------

@pytest.fixture(scope="module")
def mock_issuer() -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "oidc_provider_mock", "-p", str(port)]
    for user in USERS:
        cmd += ["--user-claims", json.dumps(user)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    issuer = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(issuer + "/.well-known/openid-configuration", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("oidc-provider-mock did not start")
            time.sleep(0.1)
        yield issuer
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def settings_for(issuer: str, **overrides: Any) -> IdentityProviderSettings:
    base = IdentityProviderSettings(
        name="mock", display_name="Mock IdP", issuer=issuer, client_id=CLIENT_ID, client_secret="s3cret",
        role_claim="roles", role_map=(("doctor", "practitioner"), ("nurse", "nurse")),
        fhir_user_claim="fhirUser", organization_claim="org", mfa_acr_values=("eidas1",))
    return replace(base, **overrides)


def authorize(url: str, form: dict[str, str]) -> dict[str, str]:
    """Submit the provider's login form non-interactively; the query of its redirect to us."""
    with httpx.Client(follow_redirects=False) as client:
        assert client.get(url).status_code == 200  # the login page renders
        response = client.post(url, data=form)
    assert response.status_code == 302, response.text[:200]
    location = response.headers["location"]
    assert location.startswith(REDIRECT + "?")  # captured, not followed
    return dict(parse_qsl(urlsplit(location).query))


def login(provider: OidcProvider, sub: str) -> tuple[dict[str, str], dict[str, str]]:
    url, saved = asyncio.run(provider.begin(REDIRECT))
    return authorize(url, {"sub": sub}), saved


def complete(provider: OidcProvider, params: dict[str, str], saved: dict[str, str]) -> FederatedIdentity:
    return asyncio.run(provider.complete(params, saved, REDIRECT))


def test_full_login_maps_username_role_fhir_user_and_mfa(mock_issuer: str) -> None:
    provider = OidcProvider(settings_for(mock_issuer))
    assert (provider.name, provider.display_name) == ("mock", "Mock IdP")
    params, saved = login(provider, "alice")
    assert set(params) == {"code", "state"}
    identity = complete(provider, params, saved)
    assert identity.provider == "mock" and identity.issuer == mock_issuer and identity.subject == "alice"
    assert identity.username == "alice" and identity.role == "practitioner"
    assert identity.fhir_user == "Practitioner/p-1" and identity.organization == "Organization/o-1"
    assert identity.mfa is True  # amr contains "otp"
    assert identity.claims["email"] == "alice@example.org" and "nonce" not in identity.claims


def test_nested_role_claim_and_acr_mfa(mock_issuer: str) -> None:
    provider = OidcProvider(settings_for(mock_issuer, role_claim="realm_access.roles"))
    identity = complete(provider, *login(provider, "nina"))
    assert identity.role == "nurse" and identity.mfa is True  # acr eidas1 is configured as MFA
    assert identity.username == "nina@example.org"  # no preferred_username: falls back to email


def test_unmapped_role_and_no_second_factor(mock_issuer: str) -> None:
    provider = OidcProvider(settings_for(mock_issuer))
    identity = complete(provider, *login(provider, "bob"))
    assert identity.role is None and identity.mfa is False  # the caller refuses the login


def test_client_secret_post_and_userinfo(mock_issuer: str) -> None:
    # (The mock has no public clients: auth_method "none" is tested against the fake IdP below.)
    provider = OidcProvider(settings_for(mock_issuer, auth_method="client_secret_post", use_userinfo=True))
    identity = complete(provider, *login(provider, "alice"))
    assert identity.role == "practitioner" and identity.claims["email"] == "alice@example.org"


def test_begin_sends_pkce_s256_state_and_nonce(mock_issuer: str) -> None:
    provider = OidcProvider(settings_for(mock_issuer, acr_values="eidas1", max_age=600))
    url, saved = asyncio.run(provider.begin(REDIRECT))
    query = dict(parse_qsl(urlsplit(url).query))
    assert url.startswith(mock_issuer + "/oauth2/authorize?")
    assert 43 <= len(saved["code_verifier"]) <= 128
    challenge = base64.urlsafe_b64encode(hashlib.sha256(saved["code_verifier"].encode()).digest()).rstrip(b"=")
    assert query["code_challenge"] == challenge.decode() and query["code_challenge_method"] == "S256"
    assert query["state"] == saved["state"] and query["nonce"] == saved["nonce"]
    assert (query["client_id"], query["redirect_uri"], query["scope"]) == (CLIENT_ID, REDIRECT, "openid profile email")
    assert (query["acr_values"], query["max_age"]) == ("eidas1", "600")
    _, again = asyncio.run(provider.begin(REDIRECT))
    assert again["state"] != saved["state"] and again["nonce"] != saved["nonce"]


# -- attacks through the real provider -----------------------------------------------------------

def test_state_mismatch_refused(mock_issuer: str) -> None:
    provider = OidcProvider(settings_for(mock_issuer))
    params, saved = login(provider, "alice")
    with pytest.raises(FederationError, match="state does not match"):
        complete(provider, {**params, "state": params["state"][:-1] + "x"}, saved)
    with pytest.raises(FederationError, match="state does not match"):
        complete(provider, {"code": params["code"]}, saved)
    # The code was never exchanged, so the genuine callback still works.
    assert complete(provider, params, saved).subject == "alice"


def test_nonce_mismatch_refused(mock_issuer: str) -> None:
    provider = OidcProvider(settings_for(mock_issuer))
    params, saved = login(provider, "alice")
    with pytest.raises(FederationError, match="nonce does not match"):
        complete(provider, params, {**saved, "nonce": "attacker-nonce"})


def test_replayed_callback_refused(mock_issuer: str) -> None:
    provider = OidcProvider(settings_for(mock_issuer))
    params, saved = login(provider, "alice")
    assert complete(provider, params, saved).role == "practitioner"
    with pytest.raises(FederationError, match="refused the authorization code"):
        complete(provider, params, saved)


def test_access_denied_at_provider(mock_issuer: str) -> None:
    provider = OidcProvider(settings_for(mock_issuer))
    url, saved = asyncio.run(provider.begin(REDIRECT))
    params = authorize(url, {"action": "deny"})
    assert params["error"] == "access_denied"
    with pytest.raises(FederationError, match="cancelled or refused") as info:
        complete(provider, params, saved)
    assert "denied the request" not in str(info.value)  # the provider's free text is not relayed


def test_callback_checks(mock_issuer: str) -> None:
    clock = [time.time()]
    provider = OidcProvider(settings_for(mock_issuer), clock=lambda: clock[0])
    params, saved = login(provider, "alice")
    with pytest.raises(FederationError, match="callback address does not match"):
        asyncio.run(provider.complete(params, saved, "https://evil.test/callback"))
    with pytest.raises(FederationError, match="another identity provider"):
        complete(provider, {**params, "iss": "https://evil.test"}, saved)  # RFC 9207 mix-up
    with pytest.raises(FederationError, match="another identity provider"):
        complete(provider, params, {**saved, "provider": "other"})
    with pytest.raises(FederationError, match="no login in progress"):
        complete(provider, params, {})
    clock[0] += 3600
    with pytest.raises(FederationError, match="took too long"):
        complete(provider, params, saved)


@pytest.mark.parametrize(("override", "message"), [
    ({"iss": "https://evil.example"}, "wrong issuer"),
    ({"aud": ["another-client"]}, "wrong audience"),
    ({"aud": [CLIENT_ID, "another-client"]}, r"authorized party \(azp\)"),
    ({"azp": "another-client"}, r"authorized party \(azp\)"),
    ({"exp": 1_000_000_000}, "expired"),
    ({"nbf": 4_000_000_000}, "not valid yet"),
    ({"iat": 4_000_000_000}, "issued in the future"),
    ({"at_hash": "AAAAAAAAAAAAAAAAAAAAAA"}, "at_hash"),
])
def test_provider_signed_but_wrong_claims_refused(mock_issuer: str, override: dict[str, Any], message: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # The mock copies a user's claims into the ID token it signs: a validly signed token with one bad claim.
    sub = "mallory-" + hashlib.sha256(json.dumps(override).encode()).hexdigest()[:8]
    assert httpx.put(f"{mock_issuer}/users/{sub}", json={"email": "m@example.org", **override}).status_code == 204
    provider = OidcProvider(settings_for(mock_issuer))
    params, saved = login(provider, sub)
    with pytest.raises(FederationError, match=message) as info:
        complete(provider, params, saved)
    assert "m@example.org" not in str(info.value) and params["code"] not in str(info.value)
    assert message.replace("\\", "") in caplog.text  # the safe reason is logged…
    for secret in ("m@example.org", params["code"], saved["nonce"], saved["code_verifier"], sub):
        assert secret not in caplog.text  # …never a code, nonce, verifier or claim


def test_discovery_issuer_mismatch(mock_issuer: str) -> None:
    # The provider says "http://127.0.0.1:port"; a configured trailing slash is another issuer.
    provider = OidcProvider(settings_for(mock_issuer + "/"))
    with pytest.raises(FederationError, match="names another issuer"):
        asyncio.run(provider.begin(REDIRECT))


def test_cached_metadata_outlives_a_provider_outage(idp: FakeIdp) -> None:
    clock = [time.time()]
    provider = OidcProvider(settings_for(idp.issuer), clock=lambda: clock[0], timeout=2)
    asyncio.run(provider.begin(REDIRECT))
    idp.server.shutdown()
    idp.server.server_close()
    clock[0] += 2 * 3600  # the metadata is stale and cannot be refreshed
    url, _ = asyncio.run(provider.begin(REDIRECT))
    assert url.startswith(idp.issuer + "/authorize?")
    assert idp.hits["/.well-known/openid-configuration"] == 1


def test_unreachable_provider() -> None:
    provider = OidcProvider(settings_for(f"http://127.0.0.1:{free_port()}"), timeout=2)
    with pytest.raises(FederationError, match="could not be reached"):
        asyncio.run(provider.begin(REDIRECT))


# -- tokens we sign ourselves --------------------------------------------------------------------

class FakeIdp:
    """Discovery, JWKS, token and userinfo endpoints whose answers the test sets; counts requests."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.jwks: dict[str, Any] = {"keys": []}
        self.issuer_override: str | None = None
        self.token_response: dict[str, Any] = {}
        self.userinfo: tuple[str, bytes] = ("application/json", b"{}")
        self.token_requests: list[tuple[dict[str, str], str | None]] = []
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, body: bytes, ctype: str = "application/json", status: int = 200) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                idp.hits[self.path] += 1
                if self.path == "/.well-known/openid-configuration":
                    self.reply(json.dumps(idp.discovery()).encode())
                elif self.path == "/jwks":
                    self.reply(json.dumps(idp.jwks).encode())
                elif self.path == "/userinfo":
                    self.reply(idp.userinfo[1], idp.userinfo[0])
                else:
                    self.reply(b"{}", status=404)

            def do_POST(self) -> None:
                idp.hits[self.path] += 1
                length = int(self.headers.get("Content-Length", "0"))
                form = dict(parse_qsl(self.rfile.read(length).decode()))
                idp.token_requests.append((form, self.headers.get("Authorization")))
                self.reply(json.dumps(idp.token_response).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def discovery(self) -> dict[str, Any]:
        return {"issuer": self.issuer_override or self.issuer, "authorization_endpoint": self.issuer + "/authorize",
                "token_endpoint": self.issuer + "/token", "jwks_uri": self.issuer + "/jwks",
                "userinfo_endpoint": self.issuer + "/userinfo"}


@pytest.fixture
def idp() -> Iterator[FakeIdp]:
    server = FakeIdp()
    yield server
    server.server.shutdown()
    server.server.server_close()


RSA1 = RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig"})
RSA2 = RSAKey.generate_key(2048, parameters={"kid": "k2", "use": "sig"})
EC1 = ECKey.generate_key("P-256", parameters={"kid": "e1"})
NONCE = "n-0123456789"


def publish(idp: FakeIdp, *keys: RSAKey | ECKey) -> None:
    idp.jwks = {"keys": [k.as_dict(private=False) for k in keys]}


def claims(issuer: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": issuer, "sub": "u-1", "aud": CLIENT_ID, "iat": now, "exp": now + 300, "nonce": NONCE, **extra}


def sign(payload: dict[str, Any], key: RSAKey | ECKey | OctKey, alg: str = "RS256", **header: Any) -> str:
    head = {"alg": alg, **({"kid": key.kid} if key.kid else {}), **header}
    return jwt.encode(head, payload, key, algorithms=[alg])


def check(provider: OidcProvider, token: str, nonce: str = NONCE, access_token: str | None = None) -> dict[str, Any]:
    return asyncio.run(provider.validate_id_token(token, nonce=nonce, access_token=access_token))


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_self_signed_rs256_and_es256_accepted(idp: FakeIdp) -> None:
    publish(idp, RSA1, EC1)
    provider = OidcProvider(settings_for(idp.issuer))
    assert check(provider, sign(claims(idp.issuer), RSA1))["sub"] == "u-1"
    assert check(provider, sign(claims(idp.issuer), EC1, "ES256"))["sub"] == "u-1"
    # No kid: the one key of the right type is used (oidc-provider-mock signs this way).
    assert check(provider, jwt.encode({"alg": "RS256"}, claims(idp.issuer), RSA1, algorithms=["RS256"]))


def test_forged_and_confused_signatures_refused(idp: FakeIdp) -> None:
    publish(idp, RSA1)
    provider = OidcProvider(settings_for(idp.issuer))
    body = claims(idp.issuer)
    with pytest.raises(FederationError, match="unknown key"):
        check(provider, sign(body, RSA2))  # a key the issuer never published
    impostor = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    with pytest.raises(FederationError, match="invalid signature"):
        check(provider, sign(body, impostor))  # the published kid, another private key
    # HS256 keyed with the provider's public key (algorithm confusion).
    signing_input = f"{b64({'alg': 'HS256', 'kid': 'k1'})}.{b64(body)}"
    mac = hmac.new(RSA1.as_pem(private=False), signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(FederationError, match="algorithm not allowed"):
        check(provider, f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}")
    unsigned = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(body)}."
    with pytest.raises(FederationError, match="algorithm not allowed"):
        check(provider, unsigned)
    with pytest.raises(FederationError, match="algorithm not allowed"):  # allowed by the IdP, not by us
        check(OidcProvider(settings_for(idp.issuer, allowed_algs=("ES256",))), sign(body, RSA1))
    tampered = sign(body, RSA1).split(".")
    tampered[1] = b64({**body, "sub": "admin"})
    with pytest.raises(FederationError, match="invalid signature"):
        check(provider, ".".join(tampered))
    with pytest.raises(FederationError, match="critical header"):
        check(provider, f"{b64({'alg': 'RS256', 'kid': 'k1', 'crit': ['x-policy'], 'x-policy': 1})}.{b64(body)}.c2ln")
    with pytest.raises(FederationError, match="not an ID token"):
        check(provider, sign(body, RSA1, typ="at+jwt"))
    with pytest.raises(FederationError, match="encrypted tokens"):
        check(provider, "a.b.c.d.e")


@pytest.mark.parametrize(("extra", "message"), [
    ({"iss": "https://evil.example"}, "wrong issuer"),
    ({"aud": "other"}, "wrong audience"),
    ({"aud": [CLIENT_ID, "other"]}, "azp"),
    ({"aud": [CLIENT_ID, "other"], "azp": "other"}, "azp"),
    ({"exp": int(time.time()) - 120}, "expired"),
    ({"exp": "tomorrow"}, "malformed expiry"),
    ({"nbf": int(time.time()) + 600}, "not valid yet"),
    ({"iat": int(time.time()) + 600}, "issued in the future"),
    ({"nonce": "other"}, "nonce"),
    ({"sub": ""}, "subject"),
])
def test_bad_claims_refused(idp: FakeIdp, extra: dict[str, Any], message: str) -> None:
    publish(idp, RSA1)
    with pytest.raises(FederationError, match=message):
        check(OidcProvider(settings_for(idp.issuer)), sign(claims(idp.issuer, **extra), RSA1))


def test_small_clock_skew_tolerated_and_multi_audience_with_azp(idp: FakeIdp) -> None:
    publish(idp, RSA1)
    provider = OidcProvider(settings_for(idp.issuer))
    now = int(time.time())
    assert check(provider, sign(claims(idp.issuer, exp=now - 10, iat=now + 10, nbf=now + 10), RSA1))
    assert check(provider, sign(claims(idp.issuer, aud=[CLIENT_ID, "api"], azp=CLIENT_ID), RSA1))


def test_max_age_and_at_hash(idp: FakeIdp) -> None:
    publish(idp, RSA1)
    provider = OidcProvider(settings_for(idp.issuer, max_age=300))
    with pytest.raises(FederationError, match="auth_time missing"):
        check(provider, sign(claims(idp.issuer), RSA1))
    with pytest.raises(FederationError, match="too old"):
        check(provider, sign(claims(idp.issuer, auth_time=int(time.time()) - 3600), RSA1))
    assert check(provider, sign(claims(idp.issuer, auth_time=int(time.time()) - 60), RSA1))
    access = "opaque-access-token"
    at_hash = base64.urlsafe_b64encode(hashlib.sha256(access.encode()).digest()[:16]).rstrip(b"=").decode()
    token = sign(claims(idp.issuer, at_hash=at_hash, auth_time=int(time.time())), RSA1)
    assert check(provider, token, access_token=access)
    with pytest.raises(FederationError, match="at_hash"):
        check(provider, token, access_token="another-access-token")


def test_key_rotation_refetches_once_and_is_rate_limited(idp: FakeIdp) -> None:
    start = time.time()
    clock = [start]
    publish(idp, RSA1)
    provider = OidcProvider(settings_for(idp.issuer), clock=lambda: clock[0])

    def at(offset: float, token: str) -> dict[str, Any]:
        clock[0] = start + offset  # drives the caches; the tokens stay valid for 300 s
        return check(provider, token)

    body = claims(idp.issuer)
    assert at(0, sign(body, RSA1))
    assert idp.hits["/jwks"] == 1
    publish(idp, RSA2)  # the provider rotates its signing key
    assert at(61, sign(body, RSA2))["sub"] == "u-1"  # unknown kid: one refetch, accepted
    assert idp.hits["/jwks"] == 2
    stranger = RSAKey.generate_key(2048, parameters={"kid": "k9"})
    for offset in (62, 63, 70):
        with pytest.raises(FederationError, match="unknown key"):
            at(offset, sign(body, stranger))
    assert idp.hits["/jwks"] == 2  # unknown kids within the interval do not hammer the JWKS endpoint
    with pytest.raises(FederationError, match="unknown key"):
        at(130, sign(body, stranger))
    assert idp.hits["/jwks"] == 3  # one more fetch once the interval has passed
    assert at(131, sign(body, RSA2))  # the cached key set still verifies
    assert idp.hits["/jwks"] == 3 and idp.hits["/.well-known/openid-configuration"] == 1


def test_symmetric_and_private_jwks_entries_ignored(idp: FakeIdp) -> None:
    secret = OctKey.generate_key(256, parameters={"kid": "k1"})
    idp.jwks = {"keys": [secret.as_dict(private=True), {"kty": "RSA", "kid": "bad", "n": "x"}]}
    with pytest.raises(FederationError, match=r"algorithm not allowed"):
        check(OidcProvider(settings_for(idp.issuer)), sign(claims(idp.issuer), secret, "HS256"))
    with pytest.raises(FederationError, match="unknown key"):
        check(OidcProvider(settings_for(idp.issuer)), sign(claims(idp.issuer), RSA1))


def test_fake_discovery_issuer_mismatch(idp: FakeIdp) -> None:
    idp.issuer_override = "https://evil.example"
    with pytest.raises(FederationError, match="names another issuer"):
        asyncio.run(OidcProvider(settings_for(idp.issuer)).begin(REDIRECT))


# -- the token exchange, access token and userinfo, against the fake IdP ------------------------

def run_callback(idp: FakeIdp, provider: OidcProvider, make_tokens: Any) -> FederatedIdentity:
    _, saved = asyncio.run(provider.begin(REDIRECT))
    idp.token_response = make_tokens(saved["nonce"])
    return complete(provider, {"code": "c-1", "state": saved["state"]}, saved)


def test_token_request_carries_code_verifier_and_basic_auth(idp: FakeIdp) -> None:
    publish(idp, RSA1)
    provider = OidcProvider(settings_for(idp.issuer, client_secret="s3cret:with/odd chars"))
    _, saved = asyncio.run(provider.begin(REDIRECT))
    idp.token_response = {"id_token": sign(claims(idp.issuer, nonce=saved["nonce"], roles="nurse"), RSA1)}
    identity = complete(provider, {"code": "c-1", "state": saved["state"]}, saved)
    assert identity.role == "nurse" and identity.mfa is False
    form, authorization = idp.token_requests[-1]
    assert form == {"grant_type": "authorization_code", "code": "c-1", "redirect_uri": REDIRECT,
                    "code_verifier": saved["code_verifier"]}
    assert authorization is not None
    pair = base64.b64decode(authorization.removeprefix("Basic ")).decode()
    assert pair == "fhirvault:s3cret%3Awith%2Fodd%20chars"  # RFC 6749 §2.3.1 form-encoding


def test_public_client_sends_client_id_and_no_secret(idp: FakeIdp) -> None:
    publish(idp, RSA1)
    provider = OidcProvider(settings_for(idp.issuer, auth_method="none", client_secret=None))
    assert run_callback(idp, provider, lambda n: {"id_token": sign(claims(idp.issuer, nonce=n), RSA1)}).subject == "u-1"
    form, authorization = idp.token_requests[-1]
    assert form["client_id"] == CLIENT_ID and "client_secret" not in form and authorization is None


def test_jwt_access_token_validated(idp: FakeIdp) -> None:
    publish(idp, RSA1)
    provider = OidcProvider(settings_for(idp.issuer, validate_access_token=True))
    now = int(time.time())

    def tokens(at_claims: dict[str, Any]) -> Any:
        def make(nonce: str) -> dict[str, Any]:
            return {"token_type": "Bearer", "access_token": sign(at_claims, RSA1, typ="at+jwt"),
                    "id_token": sign(claims(idp.issuer, nonce=nonce, roles=["doctor"]), RSA1)}
        return make

    good = {"iss": idp.issuer, "sub": "u-1", "aud": "api", "azp": CLIENT_ID, "exp": now + 300, "iat": now}
    assert run_callback(idp, provider, tokens(good)).role == "practitioner"
    for bad, message in [({"exp": now - 600}, "expired"), ({"sub": "u-2"}, "another subject"),
                         ({"azp": "other"}, "not issued to this client"), ({"iss": "https://x"}, "wrong issuer")]:
        with pytest.raises(FederationError, match=f"access token refused: {message}"):
            run_callback(idp, provider, tokens({**good, **bad}))
    opaque = {"token_type": "Bearer", "access_token": "opaque"}
    with pytest.raises(FederationError, match="not a signed JWT"):
        run_callback(idp, provider, lambda n: {**opaque, "id_token": sign(claims(idp.issuer, nonce=n), RSA1)})


def test_userinfo_merge_and_substitution(idp: FakeIdp) -> None:
    publish(idp, RSA1)
    provider = OidcProvider(settings_for(idp.issuer, use_userinfo=True, role_claim="SubjectRole",
                                         role_map=(("10^1.2.250.1.213.1.1.5.5", "practitioner"),)))

    def make(nonce: str) -> dict[str, Any]:
        return {"token_type": "Bearer", "access_token": "opaque",
                "id_token": sign(claims(idp.issuer, nonce=nonce, acr="eidas1"), RSA1)}

    idp.userinfo = ("application/json", json.dumps(
        {"sub": "u-1", "SubjectRole": ["10^1.2.250.1.213.1.1.5.5"], "preferred_username": "899700000001",
         "acr": "weak"}).encode())
    identity = run_callback(idp, provider, make)
    assert identity.role == "practitioner" and identity.username == "899700000001"
    assert identity.mfa is True  # the signed ID token's acr wins over userinfo's
    signed = sign({"iss": idp.issuer, "aud": CLIENT_ID, "sub": "u-1", "SubjectRole": "10^1.2.250.1.213.1.1.5.5"}, RSA1)
    idp.userinfo = ("application/jwt", signed.encode())
    assert run_callback(idp, provider, make).role == "practitioner"
    idp.userinfo = ("application/json", json.dumps({"sub": "someone-else"}).encode())
    with pytest.raises(FederationError, match="another subject"):
        run_callback(idp, provider, make)


def test_token_endpoint_errors(idp: FakeIdp) -> None:
    publish(idp, RSA1)
    provider = OidcProvider(settings_for(idp.issuer))
    with pytest.raises(FederationError, match="no ID token"):
        run_callback(idp, provider, lambda n: {"token_type": "Bearer", "access_token": "x"})
    with pytest.raises(FederationError, match="unsupported token type"):
        run_callback(idp, provider, lambda n: {"token_type": "MAC", "access_token": "x",
                                               "id_token": sign(claims(idp.issuer, nonce=n), RSA1)})
