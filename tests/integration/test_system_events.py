"""Configuration and key events are in the audit trail, and source IPs can be pseudonymised."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from starlette.testclient import TestClient

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.keyrotation import rotate_tenant_key
from fhirvault.web.app import create_app
from tests.conftest import App


def _records(app_container: object) -> list[dict[str, object]]:
    c = app_container
    return [c.audit.decrypt(seq, ts, blob)  # type: ignore[attr-defined]
            for seq, ts, blob in c.store.audit_entries("default", limit=100_000)]  # type: ignore[attr-defined]


def test_first_start_and_key_rotation_are_recorded(app: App) -> None:
    assert any(r["interaction"] == "config-change" and r["detail"] == "first start" and r["category"] == "system"
               for r in _records(app.container))
    rotate_tenant_key(app.settings)
    rotations = [r for r in _records(app.container) if r["interaction"] == "key-rotation"]
    assert len(rotations) == 1 and "tenant key rotated to version 2" in str(rotations[0]["detail"])


def test_changed_settings_are_named_at_the_next_start(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    for s in (settings, settings, dataclasses.replace(settings, default_page_size=20)):
        container = build(s)
        with TestClient(create_app(container)):
            pass
    container = build(settings)
    try:
        changes = [r["detail"] for r in _records(container) if r["interaction"] == "config-change"]
    finally:
        container.close()
    assert changes == ["first start", "changed: default_page_size"]


def test_source_ips_can_be_stored_as_keyed_hashes(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path / "data", "audit_hash_source_ips": True}, environ={})
    creds = json.loads(initialise(settings).read_text())
    container = build(settings)
    with TestClient(create_app(container), client=("203.0.113.7", 5000)) as client:
        r = client.post("/oauth2/token", data={"grant_type": "client_credentials"},
                        auth=(creds["client_id"], creds["client_secret"]))
        assert r.status_code == 200
        everything = _records(container)
    records = [r for r in everything if r["interaction"] == "token"]
    assert records and all(str(r["source_ip"]).startswith("hmac-sha256:") for r in records)
    assert "203.0.113.7" not in json.dumps(everything)
