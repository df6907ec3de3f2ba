"""``fhirvault serve`` on an older data directory migrates it (and logs each step); on a newer one it
refuses in one line. Real server processes, as an operator would run them."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fhirvault.adapters.sqlite_migrations import LATEST
from fhirvault.cli.main import main
from tests.conftest import free_port, start_server

pytestmark = [pytest.mark.server, pytest.mark.sqlite_only]  # edits the SQLite files to age the directory


def _set_version(db: Path, version: int, sql: str = "") -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript(sql)
    conn.execute("UPDATE meta SET value=? WHERE name='schema_version'", (str(version).encode(),))
    conn.close()


def test_serve_migrates_an_older_data_directory_and_refuses_a_newer_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert main(["init", "--data-dir", str(data)]) == 0
    db = data / "fhirvault.sqlite3"
    # Back to what the previous release had: no clients.allowed_sources, schema version 1 (the admin client stays).
    _set_version(db, 1, "ALTER TABLE clients DROP COLUMN allowed_sources;")
    log = tmp_path / "server.log"
    server = start_server(data, log)
    try:
        server.token()  # the admin client, read through the migrated clients table
    finally:
        server.stop()
    assert "applied schema migration 2: clients.allowed_sources" in log.read_text()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0] == str(LATEST).encode()
    conn.close()

    _set_version(db, LATEST + 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
    r = subprocess.run([sys.executable, "-m", "fhirvault.cli.main", "serve", "--data-dir", str(data),
                        "--port", str(free_port())], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("fhirvault: error:")]
    assert errors == [f"fhirvault: error: database schema version {LATEST + 1} is newer than this fhirvault "
                      f"({LATEST}): upgrade fhirvault"], r.stderr
