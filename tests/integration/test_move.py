"""``fhirvault move``: a clinic served on SQLite moves into PostgreSQL and serves the same data from there."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import pytest

from tests import pg_server
from tests.conftest import PATIENT, get_token, observation, start_server

pytestmark = [pytest.mark.server, pytest.mark.sqlite_only]  # starts servers; the source is a SQLite data dir


def fv(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
    return subprocess.run([sys.executable, "-m", "fhirvault.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=300, input=stdin)


def _digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_move_a_clinic_from_sqlite_to_postgresql(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (tmp_path / "pw").write_text("correct horse battery staple 42\n")
    srv = start_server(data, tmp_path / "sqlite.log")
    try:
        with srv.client() as c:
            ids = []
            for i in range(6):
                r = c.post("/Patient", json={**PATIENT, "name": [{"family": f"Mover{i}", "given": ["Ann"]}]})
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
                assert c.post("/Observation", json=observation(ids[-1])).status_code == 201
            for pid in ids[:3]:  # a history of several versions
                body = {**c.get(f"/Patient/{pid}").json(), "gender": "other"}
                assert c.put(f"/Patient/{pid}", json=body).status_code == 200
            assert c.delete(f"/Patient/{ids[5]}").status_code in (200, 204)
            types = ("Patient", "Observation")
            before = {(t, r["resource"]["id"]): c.get(f"/{t}/{r['resource']['id']}/_history").json()
                      for t in types for r in c.get(f"/{t}", params={"_count": 100}).json().get("entry", [])}
            gone_history = c.get(f"/Patient/{ids[5]}/_history").json()
        r = fv("user", "create", "--data-dir", str(data), "--username", "dr.who", "--role", "practitioner",
               "--fhir-user", "Practitioner/1", "--password-file", str(tmp_path / "pw"))
        assert r.returncode == 0, r.stderr
        old_token = srv.token()
        r = fv("client", "create", "--data-dir", str(data), "--name", "lab", "--scope", "system/*.rs")
        assert r.returncode == 0, r.stderr
        lab = json.loads(r.stdout)
        r = fv("client", "create-app", "--data-dir", str(data), "--name", "viewer", "--public",
               "--scope", "launch/patient patient/*.rs", "--redirect-uri", "https://app.example/cb")
        assert r.returncode == 0, r.stderr
        # Refused while the server runs (it holds the data directory's lock).
        url = pg_server.server().create_database()  # schema only, as an operator's migrate would leave it
        r = fv("move", "--data-dir", str(data), "--to", url)
        assert r.returncode == 2 and "stop it first" in r.stderr, r.stderr
    finally:
        srv.stop()
    sqlite_files = [p for name in ("fhirvault.sqlite3", "audit.sqlite3") for p in (data / name, data / f"{name}-wal")
                    if p.exists()]
    untouched = _digest(sqlite_files)
    r = fv("move", "--data-dir", str(data), "--to", "postgresql://u:s3cret@db:notaport/x")
    assert r.returncode == 2 and "s3cret" not in r.stdout + r.stderr and "not a valid postgresql:// URL" in r.stderr and "(from --to)" in r.stderr, r.stderr

    r = fv("move", "--data-dir", str(data), "--to", "-", stdin=url + "\n")  # out of ps
    assert r.returncode == 0, r.stdout + r.stderr
    assert "every table matches" in r.stdout and url not in r.stdout + r.stderr
    assert "127.0.0.1" not in r.stdout + r.stderr  # nothing of the URL is echoed
    assert _digest(sqlite_files) == untouched
    config = (data / "fhirvault.toml").read_text()
    assert "database_url" in config
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM resource_versions").fetchone()
        assert row is not None and row[0] == 6 + 6 + 3 + 1  # creates, updates, the delete

    again = start_server(data, tmp_path / "pg.log")
    try:
        with again.client() as c:  # the admin client's credentials still work: a new token
            for (t, rid), history in before.items():
                got = c.get(f"/{t}/{rid}/_history").json()
                assert [e.get("resource") for e in got["entry"]] == [e.get("resource") for e in history["entry"]]
            assert c.get(f"/Patient/{ids[5]}").status_code == 410
            assert len(c.get(f"/Patient/{ids[5]}/_history").json()["entry"]) == len(gone_history["entry"])
            found = c.get("/Patient", params={"family": "Mover2"}).json()  # search tags rebuilt
            assert found["total"] == 1 and found["entry"][0]["resource"]["id"] == ids[2]
            r = c.post("/Patient", json=PATIENT)
            assert r.status_code == 201
        with httpx.Client(base_url=again.base_url) as h:
            lab_token = get_token(h, lab)
        with again.client(lab_token) as c:
            assert c.get(f"/Patient/{ids[0]}").status_code == 200
        with again.client(old_token) as c:  # a token issued before the move, by the SQLite server
            assert c.get(f"/Patient/{ids[1]}").status_code == 200
    finally:
        again.stop()
    assert _digest(sqlite_files) == untouched  # the new write went to PostgreSQL
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM resource_versions").fetchone()
        assert row is not None and row[0] == 17
        for table, least in (("users", 1), ("oauth_apps", 1), ("clients", 2), ("audit.audit_checkpoints", 1),
                             ("audit.audit_log", 20), ("data_keys", 6)):
            got = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            assert got is not None and got[0] >= least, table

    r = fv("audit", "verify", "--data-dir", str(data))
    assert r.returncode == 0, r.stdout + r.stderr

    # The data directory is on PostgreSQL now, and a database holding data is never a target.
    r = fv("move", "--data-dir", str(data), "--to", url)
    assert r.returncode == 2 and "already on PostgreSQL" in r.stderr
    other = tmp_path / "other"
    srv = start_server(other, tmp_path / "other.log")
    srv.stop()
    r = fv("move", "--data-dir", str(other), "--to", url)
    assert r.returncode == 2 and "not empty" in r.stderr, r.stderr
    assert not (other / "fhirvault.toml").exists()
