from __future__ import annotations

import pytest

from fhirvault.services.keys import KeyRing
from tests.conftest import App


def test_livez_is_public_and_trivial(app: App) -> None:
    r = app.client.get("/livez")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_ready_when_database_keys_and_audit_are_good(app: App) -> None:
    app.container.health.audit_verified = True
    r = app.client.get("/readyz")  # public: no token
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "checks": {"database": "ok", "keys": "ok", "audit": "ok"}}
    assert r.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(("verified", "state"), [(None, "pending"), (False, "failed")])
def test_not_ready_until_the_audit_log_verified(app: App, verified: bool | None, state: str) -> None:
    app.container.health.audit_verified = verified
    app.container.health.audit_failure = "entry 7: hash mismatch"  # for operators, not for this endpoint
    r = app.client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["failed"] == ["audit"] and body["checks"]["audit"] == state
    assert body["checks"]["database"] == "ok" and body["checks"]["keys"] == "ok"
    assert "mismatch" not in r.text
    app.container.health.audit_verified = True
    assert app.client.get("/readyz").status_code == 200


def test_not_ready_without_a_tenant_key(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    app.container.health.audit_verified = True
    monkeypatch.setattr(app.container.keys, "_keks", {})  # as if the key ring never loaded
    assert isinstance(app.container.keys, KeyRing)
    r = app.client.get("/readyz")
    assert r.status_code == 503 and r.json()["failed"] == ["keys"]


def test_not_ready_when_the_store_is_closed(app: App) -> None:
    app.container.health.audit_verified = True
    app.container.store.close()
    r = app.client.get("/readyz")
    assert r.status_code == 503
    assert "database" in r.json()["failed"]
    assert app.client.get("/livez").status_code == 200  # alive, just not ready
