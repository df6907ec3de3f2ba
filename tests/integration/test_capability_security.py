"""The CapabilityStatement's security section names every OAuth endpoint, as smart-configuration does,
and each of them answers (no endpoint advertised that is not served)."""

from __future__ import annotations

from tests.conftest import App

OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


def test_security_lists_every_oauth_endpoint_like_smart_configuration(app: App) -> None:
    cap = app.client.get("/fhir/metadata").json()
    security = cap["rest"][0]["security"]
    codes = {c["code"] for s in security["service"] for c in s["coding"]}
    assert codes == {"OAuth", "SMART-on-FHIR"}
    [uris] = [e for e in security["extension"] if e["url"] == OAUTH_URIS]
    advertised = {e["url"]: e["valueUri"] for e in uris["extension"]}
    smart = app.client.get("/.well-known/smart-configuration").json()
    assert advertised == {
        "authorize": smart["authorization_endpoint"],
        "token": smart["token_endpoint"],
        "revoke": smart["revocation_endpoint"],
        "introspect": smart["introspection_endpoint"],
    }
    assert advertised["token"] == "http://testserver/oauth2/token"
    for grant in smart["grant_types_supported"]:
        assert grant in security["description"]
    # every advertised endpoint is served: a bare request gets its OAuth error, not a 404
    got = {name: app.client.post(advertised[name].removeprefix("http://testserver"), data={"x": "1"})
           for name in ("token", "revoke", "introspect")}
    assert {n: (r.status_code, r.json().get("error")) for n, r in got.items()} == {
        "token": (400, "unsupported_grant_type"), "revoke": (401, "invalid_client"),
        "introspect": (401, "invalid_client")}
    r = app.client.get(advertised["authorize"].removeprefix("http://testserver"), follow_redirects=False)
    assert r.status_code == 400, r.text  # no client_id: refused, and not redirected anywhere


def test_public_base_url_is_used_for_every_endpoint() -> None:
    from fhirvault.fhir.capability import capability_statement

    cap = capability_statement(["Patient"], base_url="https://fhir.example.org/fhir",
                               token_url="https://fhir.example.org/oauth2/token", published_ms_instant="2026-01-01")
    [uris] = cap["rest"][0]["security"]["extension"]
    assert [e["valueUri"] for e in uris["extension"]] == [
        "https://fhir.example.org/oauth2/authorize", "https://fhir.example.org/oauth2/token",
        "https://fhir.example.org/oauth2/revoke", "https://fhir.example.org/oauth2/introspect"]
