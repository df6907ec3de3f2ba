"""CLI commands on a data directory a server is serving (cli/live.py): the safe ones run, the others refuse."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PATIENT, start_server

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def fhirvault(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
    return subprocess.run([sys.executable, "-m", "fhirvault.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=180)


@pytest.mark.server
@pytest.mark.sqlite_only  # the serving lock is the SQLite data directory's; PostgreSQL arbitrates sessions itself
def test_safe_commands_run_beside_a_live_server_and_the_others_refuse(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data, tmp_path / "server.log")
    try:
        with srv.client() as c:
            assert c.post("Patient", json=PATIENT, headers=FHIR_JSON).status_code == 201
        d = ("--data-dir", str(data))
        verify = fhirvault("audit", "verify", *d)
        assert verify.returncode == 0, verify.stderr
        backup = fhirvault("backup", "create", *d, "--target", (tmp_path / "t").as_uri(), "--location", "FR")
        assert backup.returncode == 0, backup.stderr
        (tmp_path / "pw").write_text("correct horse battery staple 42\n")
        user = fhirvault("user", "create", *d, "--username", "auditor1", "--role", "auditor",
                         "--password-file", str(tmp_path / "pw"))
        assert user.returncode == 0, user.stderr
        with srv.client() as c:  # the server kept serving, and sees the new user's audit record
            assert c.post("Patient", json=PATIENT, headers=FHIR_JSON).status_code == 201

        for argv in (("migrate", *d), ("keys", "rotate", *d, "--level", "tenant")):
            r = fhirvault(*argv)
            assert r.returncode == 2 and "a server is running on" in r.stderr, (argv, r.stderr)
        assert fhirvault("migrate", "--check", *d).returncode == 0  # reading is fine

        # A newer fhirvault (one more migration than the running server knows) would migrate on opening.
        con = sqlite3.connect(data / "fhirvault.sqlite3")
        version = int(con.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0])
        con.execute("UPDATE meta SET value=? WHERE name='schema_version'", (str(version - 1).encode(),))
        con.commit()
        r = fhirvault("user", "list", *d)
        assert r.returncode == 2 and "would migrate it" in r.stderr, r.stderr
        con.execute("UPDATE meta SET value=? WHERE name='schema_version'", (str(version).encode(),))
        con.commit()
        con.close()
    finally:
        srv.stop()
    r = fhirvault("migrate", "--data-dir", str(data))  # the lock went with the server
    assert r.returncode == 0, r.stderr
