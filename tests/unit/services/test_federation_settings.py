"""Parsing [[identity_providers]]: defaults, secrets from file/env only, precise errors naming key and origin."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fhirvault.config import SettingsError
from fhirvault.services.federation_settings import (
    IdentityProviderSettings,
    parse_identity_providers,
)

ORIGIN = "config file /etc/fhirvault.toml"
MINIMAL = """
[[identity_providers]]
name = "keycloak"
issuer = "https://sso.example.org/realms/care"
client_id = "fhirvault"
client_secret_env = "KC_SECRET"
"""


def parse(text: str, environ: dict[str, str] | None = None) -> tuple[IdentityProviderSettings, ...]:
    return parse_identity_providers(tomllib.loads(text).get("identity_providers"), ORIGIN,
                                    {"KC_SECRET": "s3cret\n"} if environ is None else environ)


def test_absent_section_means_no_providers() -> None:
    assert parse("") == ()
    assert parse_identity_providers({}, ORIGIN, {}) == ()


def test_minimal_provider_defaults() -> None:
    (p,) = parse(MINIMAL)
    assert p.name == "keycloak" and p.label == "keycloak"
    assert p.client_secret == "s3cret"  # read from the environment, stripped
    assert p.auth_method == "client_secret_basic"
    assert p.scopes == "openid profile email"
    assert p.username_claims == ("preferred_username", "email")
    assert p.allowed_algs == ("RS256", "ES256", "PS256")
    assert p.mfa_amr_values == ("mfa", "otp", "hwk", "swk", "sms")
    assert p.role_map == () and p.use_userinfo is False and p.auto_provision is False
    assert "s3cret" not in repr(p)  # the secret stays out of logs and tracebacks


def test_full_example_keeps_role_map_order(tmp_path: Path) -> None:
    secret = tmp_path / "psc.secret"
    secret.write_text("from-file\n")
    (p,) = parse(f"""
[[identity_providers]]
name = "psc"
display_name = "Pro Santé Connect"
issuer = "https://auth.esw.esante.gouv.fr/auth/realms/esante-wallet"
client_id = "fhirvault-psc"
client_secret_file = "{secret}"
auth_method = "client_secret_post"
scopes = ["openid", "scope_all"]
username_claim = ["SubjectNameID", "preferred_username"]
role_claim = "SubjectRole"
fhir_user_claim = "fhirUser"
organization_claim = "SubjectOrganization"
mfa_amr_values = []
mfa_acr_values = ["eidas1"]
acr_values = "eidas1"
max_age = 3600
allowed_algs = ["RS256"]
use_userinfo = true
auto_provision = true
validate_access_token = true
[identity_providers.role_map]
"10^1.2.250.1.213.1.1.5.5" = "practitioner"
"60^1.2.250.1.213.1.1.5.5" = "nurse"
""")
    assert p.label == "Pro Santé Connect"
    assert p.client_secret == "from-file"
    assert p.scopes == "openid scope_all"
    assert p.username_claims == ("SubjectNameID", "preferred_username")
    assert p.role_map == (("10^1.2.250.1.213.1.1.5.5", "practitioner"), ("60^1.2.250.1.213.1.1.5.5", "nurse"))
    assert p.mfa_amr_values == () and p.mfa_acr_values == ("eidas1",)
    assert (p.acr_values, p.max_age, p.use_userinfo, p.auto_provision) == ("eidas1", 3600, True, True)


def test_public_client_needs_no_secret() -> None:
    (p,) = parse(MINIMAL.replace('client_secret_env = "KC_SECRET"', 'auth_method = "none"'))
    assert p.client_secret is None


def test_http_issuer_allowed_for_localhost_only() -> None:
    for host in ("localhost:8080", "127.0.0.1:9400", "[::1]:9400"):
        (p,) = parse(MINIMAL.replace("https://sso.example.org", f"http://{host}"))
        assert p.issuer.startswith("http://")
    with pytest.raises(SettingsError, match=r"identity_providers\[0\]\.issuer: must be an https://.*from config file"):
        parse(MINIMAL.replace("https://sso.example.org", "http://sso.example.org"))


def test_issuer_kept_verbatim() -> None:
    # The ID token's iss must equal it exactly: no trailing-slash normalisation.
    (p,) = parse(MINIMAL.replace("realms/care", "realms/care/"))
    assert p.issuer == "https://sso.example.org/realms/care/"


@pytest.mark.parametrize(("line", "message"), [
    ('client_secret = "hunter2"', r"client_secret: secrets are not accepted inline.*client_secret_file or client_secret_env"),
    ('colour = "blue"', r"unknown setting 'identity_providers\[0\]\.colour'"),
    ('auth_method = "private_key_jwt"', r"auth_method: must be one of"),
    ('allowed_algs = ["RS256", "HS256"]', r"allowed_algs: 'HS256' is not allowed"),
    ('allowed_algs = ["none"]', r"allowed_algs: 'none' is not allowed"),
    ('scopes = "profile email"', r"scopes: must include 'openid'"),
    ('use_userinfo = "yes"', r"use_userinfo: expected true or false"),
    ('max_age = -1', r"max_age: expected a number of seconds"),
    ('role_map = { doctor = "surgeon" }', r"role_map\.doctor: 'surgeon' is not a role"),
    ('role_map = {}', r"role_map: expected a table"),
    ('issuer = "https://sso.example.org/?x=1"', r"issuer: expected a URL without query"),
])
def test_bad_values_name_the_key_and_origin(line: str, message: str) -> None:
    text = MINIMAL.replace('client_id = "fhirvault"', f'client_id = "fhirvault"\n{line}')
    if line.startswith("issuer"):
        text = text.replace('issuer = "https://sso.example.org/realms/care"\n', "")
    with pytest.raises(SettingsError, match=message) as info:
        parse(text)
    assert ORIGIN in str(info.value)
    assert "hunter2" not in str(info.value)  # a refused inline secret is not echoed


def test_required_keys() -> None:
    with pytest.raises(SettingsError, match=r"identity_providers\[0\]\.client_id is required"):
        parse(MINIMAL.replace('client_id = "fhirvault"\n', ""))


def test_bad_name_and_duplicate_name() -> None:
    with pytest.raises(SettingsError, match=r"name: lowercase letters"):
        parse(MINIMAL.replace('"keycloak"', '"Key Cloak/1"'))
    with pytest.raises(SettingsError, match=r"identity_providers\[1\]\.name: 'keycloak' is used twice"):
        parse(MINIMAL + MINIMAL)


def test_secret_sources(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"client_secret_env: environment variable KC_SECRET is not set"):
        parse(MINIMAL, environ={})
    with pytest.raises(SettingsError, match=r"the client secret is empty"):
        parse(MINIMAL, environ={"KC_SECRET": "  "})
    missing = tmp_path / "nope.secret"
    with pytest.raises(SettingsError, match=r"client_secret_file: cannot read .*nope.secret"):
        parse(MINIMAL.replace('client_secret_env = "KC_SECRET"', f'client_secret_file = "{missing}"'))
    both = MINIMAL.replace('client_secret_env = "KC_SECRET"',
                           f'client_secret_env = "KC_SECRET"\nclient_secret_file = "{missing}"')
    with pytest.raises(SettingsError, match=r"not both"):
        parse(both)
    with pytest.raises(SettingsError, match=r"needs client_secret_file or client_secret_env"):
        parse(MINIMAL.replace('client_secret_env = "KC_SECRET"', ""))
    with pytest.raises(SettingsError, match=r"auth_method 'none' \(public client\) takes no client secret"):
        parse(MINIMAL + 'auth_method = "none"\n')


def test_not_an_array_of_tables() -> None:
    with pytest.raises(SettingsError, match=r"expected an array of tables"):
        parse_identity_providers({"name": "x"}, ORIGIN, {})
