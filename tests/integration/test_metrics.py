from __future__ import annotations

import json
import os
import subprocess
import sys
import timeit
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fhirvault.domain.scopes import METRICS_SCOPE, ScopeError, parse_scopes
from fhirvault.web.middleware import _interaction, _interaction_of, _route_kind
from tests.conftest import PATIENT, App, get_token, start_server

FHIR_JSON = {"Content-Type": "application/fhir+json"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metrics_creds(app: App, scope: str = METRICS_SCOPE) -> dict[str, str]:
    c = app.container.auth.register_client("prometheus", scope)
    assert c.client_secret is not None
    return {"client_id": c.client_id, "client_secret": c.client_secret}


def scrape(app: App, token: str) -> Samples:
    r = app.client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


# -- interaction labels ------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("GET", "/fhir/Patient/8a1f", "read"),
    ("HEAD", "/fhir/Patient/8a1f", "read"),
    ("GET", "/fhir/Patient/8a1f/_history/3", "vread"),
    ("GET", "/fhir/Patient", "search"),
    ("POST", "/fhir/Patient/_search", "search"),
    ("GET", "/fhir", "search"),
    ("POST", "/fhir/Patient", "create"),
    ("PUT", "/fhir/Patient/8a1f", "update"),
    ("PATCH", "/fhir/Patient/8a1f", "patch"),
    ("DELETE", "/fhir/Patient/8a1f", "delete"),
    ("DELETE", "/fhir/Patient", "delete"),
    ("GET", "/fhir/Patient/8a1f/_history", "history"),
    ("GET", "/fhir/Patient/_history", "history"),
    ("GET", "/fhir/_history", "history"),
    ("GET", "/fhir/metadata", "capabilities"),
    ("POST", "/fhir", "transaction"),
    ("GET", "/fhir/Patient/8a1f/$everything", "operation"),
    ("POST", "/fhir/$export", "operation"),
    ("POST", "/oauth2/token", "token"),
    ("GET", "/metrics", "metrics"),
    ("GET", "/livez", "health"),
    ("GET", "/readyz", "health"),
    ("GET", "/.well-known/smart-configuration", "discovery"),
    ("GET", "/fhir/.well-known/smart-configuration", "discovery"),
    ("GET", "/fhirx/Patient", "other"),
    ("GET", "/fhir/Patient/1/2/3/4/5", "other"),
    ("POST", "/fhir/Patient/8a1f", "other"),
    ("BREW", "/fhir/Patient", "other"),
    ("GET", "/", "other"),
])
def test_interaction_labels(method: str, path: str, expected: str) -> None:
    assert _interaction(method, path) == expected
    assert _interaction_of(method, _route_kind(path)) == expected  # same answer from the route shape


def test_interaction_label_cost_is_small() -> None:
    n = 20_000
    per_call = timeit.timeit(lambda: _interaction_of("GET", _route_kind("/fhir/Patient/8a1f")), number=n) / n
    assert per_call < 50e-6  # generous: shared CI machines; measured ~2.5 us locally


# -- the metrics scope ------------------------------------------------------------


def test_metrics_scope_is_operational_not_a_resource_scope() -> None:
    assert parse_scopes(METRICS_SCOPE) == []
    assert [str(s) for s in parse_scopes(f"system/Patient.rs {METRICS_SCOPE}")] == ["system/Patient.rs"]
    with pytest.raises(ScopeError):
        parse_scopes("fhirvault/metrics.write")  # only the known operational scope is accepted


def test_registration_and_token_issue_for_the_metrics_scope(app: App) -> None:
    with pytest.raises(ScopeError):
        app.container.auth.register_client("x", "openid")  # still needs a real scope
    creds = metrics_creds(app)
    r = app.client.post("/oauth2/token", data={"grant_type": "client_credentials"},
                        auth=(creds["client_id"], creds["client_secret"]))
    assert r.status_code == 200 and r.json()["scope"] == METRICS_SCOPE
    asked = app.client.post("/oauth2/token", data={"grant_type": "client_credentials", "scope": METRICS_SCOPE},
                            auth=(creds["client_id"], creds["client_secret"]))
    assert asked.status_code == 200 and asked.json()["scope"] == METRICS_SCOPE
    # The metrics client cannot be widened into FHIR access, and FHIR clients do not get metrics.
    wider = app.client.post("/oauth2/token", data={"grant_type": "client_credentials", "scope": "system/*.cruds"},
                            auth=(creds["client_id"], creds["client_secret"]))
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"
    admin = app.client.post("/oauth2/token", data={"grant_type": "client_credentials", "scope": METRICS_SCOPE},
                            auth=(app.creds["client_id"], app.creds["client_secret"]))
    assert admin.status_code == 400 and admin.json()["error"] == "invalid_scope"


def test_a_client_with_both_kinds_of_scope_can_narrow_to_either(app: App) -> None:
    creds = metrics_creds(app, f"system/Patient.rs {METRICS_SCOPE}")
    both = get_token(app.client, creds)
    fhir_only = get_token(app.client, creds, "system/Patient.rs")
    assert app.client.get("/metrics", headers={"Authorization": f"Bearer {both}"}).status_code == 200
    assert app.client.get("/metrics", headers={"Authorization": f"Bearer {fhir_only}"}).status_code == 403
    r = app.client.get("/fhir/Patient", headers={"Authorization": f"Bearer {both}"})
    assert r.status_code == 200


# -- /metrics over HTTP (in process) --------------------------------------------------


def test_metrics_requires_a_metrics_token(app: App) -> None:
    missing = app.client.get("/metrics")
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert "fhirvault_" not in missing.text
    bad = app.client.get("/metrics", headers={"Authorization": "Bearer not.a.token"})
    assert bad.status_code == 401 and 'error="invalid_token"' in bad.headers["www-authenticate"]
    basic = app.client.get("/metrics", auth=(app.creds["client_id"], app.creds["client_secret"]))
    assert basic.status_code == 401
    admin = app.client.get("/metrics", headers=app.auth)  # full FHIR access, but no metrics scope
    assert admin.status_code == 403
    assert 'error="insufficient_scope"' in admin.headers["www-authenticate"] and METRICS_SCOPE in admin.text
    assert app.client.post("/metrics", headers=app.auth).status_code in (404, 405)


def test_metrics_token_has_no_fhir_access(app: App) -> None:
    token = get_token(app.client, metrics_creds(app))
    pid = app.client.post("/fhir/Patient", json=PATIENT, headers={**app.auth, **FHIR_JSON}).json()["id"]
    h = {"Authorization": f"Bearer {token}"}
    assert app.client.get(f"/fhir/Patient/{pid}", headers=h).status_code == 403
    assert app.client.get("/fhir/Patient", headers=h).status_code == 403
    assert app.client.get("/fhir/_history", headers=h).status_code == 403
    assert app.client.post("/fhir/Patient", json=PATIENT, headers={**h, **FHIR_JSON}).status_code == 403
    assert app.client.get("/fhir/metadata", headers=h).status_code == 200  # public anyway


def test_counters_move_and_carry_no_ids(app: App) -> None:
    token = get_token(app.client, metrics_creds(app))
    before = scrape(app, token)
    pid = app.client.post("/fhir/Patient", json=PATIENT, headers={**app.auth, **FHIR_JSON}).json()["id"]
    for _ in range(3):
        assert app.client.get(f"/fhir/Patient/{pid}", headers=app.auth).status_code == 200
    assert app.client.get("/fhir/Patient", params={"family": "Martin"}, headers=app.auth).status_code == 200
    assert app.client.get("/fhir/Patient/nope", headers=app.auth).status_code == 404
    assert app.client.get("/fhir/Patient").status_code == 401
    assert app.client.get("/fhir/Patient", headers={"Authorization": "Bearer x"}).status_code == 401
    assert app.client.get("/fhir/Patient", headers={"Authorization": f"Bearer {token}"}).status_code == 403
    assert app.client.post("/oauth2/token", data={"grant_type": "client_credentials"},
                           auth=("fv-nobody", "wrong")).status_code == 401

    r = app.client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    after = parse(r.text)

    def moved(name: str, **labels: str) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    req = "fhirvault_http_requests_total"
    assert moved(req, interaction="create", method="POST", status="201") == 1
    assert moved(req, interaction="read", method="GET", status="200") == 3
    assert moved(req, interaction="read", method="GET", status="404") == 1
    assert moved(req, interaction="search", method="GET", status="200") == 1
    assert moved(req, interaction="search", method="GET", status="401") == 2
    assert moved(req, interaction="token", method="POST", status="401") == 1
    assert moved(req, interaction="metrics", method="GET", status="200") == 1  # the first scrape
    assert moved("fhirvault_http_request_duration_seconds_count", interaction="read") == 4
    assert moved("fhirvault_http_request_duration_seconds_bucket", interaction="read", le="+Inf") == 4
    assert moved("fhirvault_auth_failures_total", kind="missing_token") == 1
    assert moved("fhirvault_auth_failures_total", kind="invalid_token") == 1
    assert moved("fhirvault_auth_failures_total", kind="forbidden") == 1
    assert moved("fhirvault_auth_failures_total", kind="client_auth") == 1
    assert get(after, "fhirvault_audit_verified") == 1  # build() trusts the table log until the verifier runs
    assert get(after, "process_cpu_seconds_total") > 0
    assert pid not in r.text and "Martin" not in r.text and app.creds["client_id"] not in r.text


def test_audit_verified_gauge_follows_health(app: App) -> None:
    token = get_token(app.client, metrics_creds(app))
    app.container.health.audit_verified = None
    assert get(scrape(app, token), "fhirvault_audit_verified") == -1
    app.container.health.audit_verified = False
    assert get(scrape(app, token), "fhirvault_audit_verified") == 0


def test_openmetrics_when_asked(app: App) -> None:
    token = get_token(app.client, metrics_creds(app))
    r = app.client.get("/metrics", headers={"Authorization": f"Bearer {token}",
                                            "Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")


# -- a real server, a client registered with the CLI ------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
    return subprocess.run([sys.executable, "-m", "fhirvault.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.sqlite_only  # its CLI init makes a SQLite data directory
@pytest.mark.server
def test_prometheus_scrapes_a_real_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert _cli("init", "--data-dir", str(data)).returncode == 0
    r = _cli("client", "create", "--data-dir", str(data), "--name", "prometheus", "--scope", METRICS_SCOPE)
    assert r.returncode == 0, r.stderr
    prom = json.loads(r.stdout)
    assert prom["scope"] == METRICS_SCOPE
    srv = start_server(data, tmp_path / "server.log")
    try:
        with httpx.Client(base_url=srv.base_url, timeout=30) as h:
            token = get_token(h, prom)  # what Prometheus' oauth2: client_credentials does
            auth = {"Authorization": f"Bearer {token}"}
            assert h.get("/metrics").status_code == 401
            assert h.get("/metrics", headers={"Authorization": f"Bearer {srv.token()}"}).status_code == 403
            first = h.get("/metrics", headers=auth)
            assert first.status_code == 200
            before = parse(first.text)
            with srv.client() as fhir:
                pid = fhir.post("/Patient", json=PATIENT, headers=FHIR_JSON).json()["id"]
                for _ in range(2):
                    assert fhir.get(f"/Patient/{pid}").status_code == 200
            assert h.get(f"/fhir/Patient/{pid}", headers=auth).status_code == 403
            after = parse(h.get("/metrics", headers=auth).text)
            assert h.get("/readyz").status_code == 200
    finally:
        srv.stop()
    req = "fhirvault_http_requests_total"
    read = {"interaction": "read", "method": "GET"}
    assert get(after, req, **read, status="200") - get(before, req, **read, status="200") == 2
    assert get(after, req, **read, status="403") - get(before, req, **read, status="403") == 1
    assert get(after, req, interaction="create", method="POST", status="201") == 1
    assert get(after, "fhirvault_auth_failures_total", kind="forbidden") >= 2  # /metrics 403 and the FHIR read
    assert get(after, "process_resident_memory_bytes") > 0
    assert get(after, "fhirvault_audit_verified") in (0, 1, -1)
