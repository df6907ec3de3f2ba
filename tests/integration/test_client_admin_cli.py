"""A leaked admin-client.json is revoked with the CLI while the server runs: the old secret and
the tokens it got stop working at the next request, and each step is in the audit trail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.services.auth import REVOCATION_POLL_S
from tests.conftest import PATIENT, Server, get_token


def fhirvault(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
    return subprocess.run([sys.executable, "-m", "fhirvault.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def _refused_soon(server: Server, token: str) -> httpx.Response:
    deadline = time.monotonic() + REVOCATION_POLL_S + 2
    while True:
        r = httpx.get(server.fhir + "/Patient", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        if r.status_code != 200 or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


@pytest.mark.slow
def test_rotate_disable_enable_and_list_on_a_live_server(server: Server) -> None:
    data = str(server.data_dir)
    admin_id, old_secret = server.creds["client_id"], server.creds["client_secret"]
    old_token = server.token()
    with server.client(old_token) as c:
        assert c.post("/Patient", json=PATIENT, headers={"Content-Type": "application/fhir+json"}).status_code == 201

    r = fhirvault("client", "rotate-secret", "--data-dir", data, "--client-id", admin_id)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["client_id"] == admin_id and out["client_secret"] != old_secret
    assert "shown once" in r.stderr
    refused = _refused_soon(server, old_token)
    assert refused.status_code == 401, refused.text
    with httpx.Client(base_url=server.base_url) as c:
        assert c.post("/oauth2/token", data={"grant_type": "client_credentials"},
                      auth=(admin_id, old_secret)).status_code == 401
        creds = json.loads((server.data_dir / "admin-client.json").read_text())
        assert creds == {"client_id": admin_id, "client_secret": out["client_secret"]}
        assert (server.data_dir / "admin-client.json").stat().st_mode & 0o777 == 0o600
        new_token = get_token(c, creds)  # the new secret works at once
    assert httpx.get(server.fhir + "/Patient", headers={"Authorization": f"Bearer {new_token}"}).status_code == 200

    r = fhirvault("client", "create", "--data-dir", data, "--name", "lab feed", "--scope", "system/Patient.rs")
    assert r.returncode == 0, r.stderr
    feed = json.loads(r.stdout)
    with httpx.Client(base_url=server.base_url) as c:
        feed_token = get_token(c, feed)
    r = fhirvault("client", "disable", "--data-dir", data, "--client-id", feed["client_id"])
    assert r.returncode == 0 and "disabled" in r.stdout, r.stderr
    assert _refused_soon(server, feed_token).status_code == 401
    assert httpx.get(server.fhir + "/Patient", headers={"Authorization": f"Bearer {new_token}"}).status_code == 200

    r = fhirvault("client", "list", "--data-dir", data, "--json")
    assert r.returncode == 0, r.stderr
    listed = {row["client_id"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert listed[feed["client_id"]]["disabled"] is True and listed[admin_id]["disabled"] is False
    assert listed[feed["client_id"]]["name"] == "lab feed"
    assert out["client_secret"] not in r.stdout and "argon2" not in r.stdout
    r = fhirvault("client", "list", "--data-dir", data)
    assert r.returncode == 0 and "lab feed" in r.stdout and "disabled" in r.stdout

    r = fhirvault("client", "enable", "--data-dir", data, "--client-id", feed["client_id"])
    assert r.returncode == 0, r.stderr
    with httpx.Client(base_url=server.base_url) as c:
        fresh = get_token(c, feed)
    assert httpx.get(server.fhir + "/Patient", headers={"Authorization": f"Bearer {fresh}"}).status_code == 200
    assert _refused_soon(server, feed_token).status_code == 401  # the old token stays dead

    r = fhirvault("client", "disable", "--data-dir", data, "--client-id", "fv-nobody")
    assert r.returncode == 2 and "no client fv-nobody" in r.stderr

    # every step is in the audit trail, never a secret
    container = build(load_settings({"data_dir": server.data_dir}, environ={}))
    try:
        records = [container.audit.decrypt(seq, ts, blob)
                   for seq, ts, blob in container.store.audit_entries("default", limit=100_000)]
    finally:
        container.close()
    details = [r["detail"] for r in records if r.get("category") == "system" and r["interaction"] in
               ("user-change", "key-change")]
    assert details == [f"client {admin_id}: secret rotated",
                       f"client {feed['client_id']} created with scope system/Patient.rs",
                       f"client {feed['client_id']}: disabled", f"client {feed['client_id']}: enabled"]
    assert out["client_secret"] not in json.dumps(records) and old_secret not in json.dumps(records)
    r = fhirvault("audit", "verify", "--data-dir", data)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("level", ["root", "tenant"])
def test_key_rotation_tells_to_restart(tmp_path: Path, level: str) -> None:
    data = str(tmp_path / "d")
    assert fhirvault("init", "--data-dir", data).returncode == 0
    r = fhirvault("keys", "rotate", "--data-dir", data, "--level", level)
    assert r.returncode == 0, r.stderr
    assert "restart it now" in r.stdout
