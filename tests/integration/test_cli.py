"""The operator commands, run as a user would run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import PATIENT, start_server


def fhirvault(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
    return subprocess.run([sys.executable, "-m", "fhirvault.cli.main", *args], capture_output=True, text=True,
                          env={**base_env, **(env or {})}, timeout=120)


def test_init_writes_private_admin_credentials_and_refuses_to_overwrite(tmp_path: Path) -> None:
    data = tmp_path / "d"
    r = fhirvault("init", "--data-dir", str(data))
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and "admin-client.json" in r.stdout
    creds_file = data / "admin-client.json"
    assert creds_file.stat().st_mode & 0o777 == 0o600
    assert (data / "root.key").stat().st_mode & 0o777 == 0o600
    creds = json.loads(creds_file.read_text())
    assert set(creds) == {"client_id", "client_secret"}
    again = fhirvault("init", "--data-dir", str(data))
    assert again.returncode != 0 and "refusing" in again.stderr
    assert json.loads(creds_file.read_text()) == creds


def test_env_and_bad_settings(tmp_path: Path) -> None:
    r = fhirvault("init", env={"FHIRVAULT_DATA_DIR": str(tmp_path / "e")})
    assert r.returncode == 0, r.stderr
    bad = fhirvault("serve", "--data-dir", str(tmp_path / "e"), env={"FHIRVAULT_PORT": "eighty"})
    assert bad.returncode == 2 and "port: expected an integer" in bad.stderr


@pytest.mark.server
def test_client_create_and_key_rotation_keep_data_readable(tmp_path: Path) -> None:
    data = tmp_path / "d"
    srv = start_server(data, tmp_path / "log")
    try:
        with srv.client() as c:
            pid = c.post("/Patient", json=PATIENT, headers={"Content-Type": "application/fhir+json"}).json()["id"]
    finally:
        srv.stop()
    r = fhirvault("client", "create", "--data-dir", str(data), "--name", "lab", "--scope", "system/Observation.cruds")
    assert r.returncode == 0, r.stderr
    lab = json.loads(r.stdout)
    assert lab["client_id"].startswith("fv-") and lab["scope"] == "system/Observation.cruds"
    bad = fhirvault("client", "create", "--data-dir", str(data), "--name", "x", "--scope", "system/Patient.rx")
    assert bad.returncode == 2 and "cruds" in bad.stderr
    root_before = (data / "root.key").read_bytes()
    assert fhirvault("keys", "rotate", "--data-dir", str(data), "--level", "tenant").returncode == 0
    rot = fhirvault("keys", "rotate", "--data-dir", str(data), "--level", "root")
    assert rot.returncode == 0, rot.stderr
    assert (data / "root.key").read_bytes() != root_before
    srv = start_server(data, tmp_path / "log")
    try:
        with srv.client() as c:
            assert c.get(f"/Patient/{pid}").json()["name"][0]["family"] == "Martin"
        with httpx.Client(base_url=srv.base_url) as h:
            tok = h.post("/oauth2/token", data={"grant_type": "client_credentials"},
                         auth=(lab["client_id"], lab["client_secret"]))
            assert tok.status_code == 200 and tok.json()["scope"] == "system/Observation.cruds"
    finally:
        srv.stop()
