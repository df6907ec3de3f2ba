"""The point-in-time recovery recipe of docs/postgresql-backup.md, run for real: pgBackRest (encrypted repository,
WAL archiving) under a PostgreSQL that fhirvault writes to, restored to an instant between two sets of writes.

The test starts what it needs: its own PostgreSQL cluster (scripts/pg-test-server.sh), pgBackRest (apt-get'ed
when missing and the tests run as root, as the script does for PostgreSQL; .ci/run installs it too).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from fhirvault.config import load_settings
from fhirvault.container import build
from tests import debian_packages
from tests.backup.conftest import seed
from tests.backup.test_recovery_e2e import fv
from tests.conftest import start_server
from tests.pg_server import SCRIPT, free_port

STANZA = "fhirvault"


def _pgbackrest() -> str:
    return debian_packages.ensure("pgbackrest", "pgbackrest")


class Cluster:
    """A PostgreSQL cluster archiving its WAL to an encrypted pgBackRest repository, both under ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.conf = base / "pgbackrest.conf"
        self.passphrase = secrets.token_urlsafe(32)  # repo1-cipher-pass: keep it apart from the repository
        self.exe = _pgbackrest()

    def _as_pg(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        r = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=300, check=False)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def backrest(self, *args: str, conf: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._as_pg(self.exe, f"--config={conf or self.conf}", f"--stanza={STANZA}", *args, check=check)

    def pg(self, action: str) -> None:
        r = subprocess.run([str(SCRIPT), action, str(self.base), str(self.port)], capture_output=True, text=True,
                           timeout=300, check=False)
        if r.returncode != 0:
            log = (self.base / "server.log").read_text()[-3000:] if (self.base / "server.log").exists() else ""
            raise AssertionError(f"pg-test-server.sh {action} failed:\n{r.stderr}\n{log}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str) -> object:
        with psycopg.connect(self.url(), autocommit=True) as c:
            cur = c.execute(statement)  # type: ignore[arg-type]
            row = cur.fetchone() if cur.description else None
            return None if row is None else row[0]

    def write_config(self, path: Path, *, with_passphrase: bool = True) -> None:
        b = self.base
        lines = ["[global]", f"repo1-path={b}/repo", "repo1-cipher-type=aes-256-cbc", "repo1-retention-full=2",
                 f"log-path={b}/log", f"lock-path={b}/lock", f"spool-path={b}/spool", "log-level-console=warn",
                 "log-level-file=info", "start-fast=y", "",
                 f"[{STANZA}]", f"pg1-path={b}/data", f"pg1-port={self.port}", f"pg1-socket-path={b}",
                 "pg1-user=postgres"]
        if with_passphrase:
            lines.insert(3, f"repo1-cipher-pass={self.passphrase}")
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")

    def start(self) -> None:
        """initdb and start, then turn WAL archiving to pgBackRest on (a restart) and create the stanza."""
        self.pg("start")
        for d in ("repo", "log", "lock", "spool"):
            (self.base / d).mkdir(mode=0o700)
            if os.geteuid() == 0:
                shutil.chown(self.base / d, "postgres", "postgres")
        self.write_config(self.conf)
        archive = f"{self.exe} --config={self.conf} --stanza={STANZA} archive-push %p"
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute("ALTER SYSTEM SET archive_mode = on")
            c.execute("ALTER SYSTEM SET wal_level = replica")
            c.execute(f"ALTER SYSTEM SET archive_command = '{archive}'")  # type: ignore[arg-type]
        self.pg("stop")
        self.pg("start")
        self.backrest("stanza-create")
        self.backrest("check")  # archiving works: a WAL switch reached the repository


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    base = Path(tempfile.mkdtemp(prefix="fhirvault-pitr-"))
    os.chmod(base, 0o711)  # the server and pgBackRest run as another user
    c = Cluster(base)
    try:
        c.start()
        yield c
    finally:
        subprocess.run([str(SCRIPT), "stop", str(base)], capture_output=True, timeout=120, check=False)
        shutil.rmtree(base, ignore_errors=True)


def _present(data: Path, ids: list[str]) -> set[str]:
    c = build(load_settings({"data_dir": data}, environ={}))
    try:
        return {i for i in ids if (v := c.store.read_current("default", "Patient", i)) is not None and not v.deleted}
    finally:
        c.close()


@pytest.mark.slow
@pytest.mark.server
def test_pgbackrest_restores_fhirvault_to_a_point_in_time(cluster: Cluster, tmp_path: Path) -> None:
    cluster.sql("CREATE DATABASE fhirvault")
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "fhirvault.toml").write_text(f'database_url = "{cluster.url("fhirvault")}"\n')
    (data / "fhirvault.toml").chmod(0o600)
    env = {"FHIRVAULT_DATABASE_URL": cluster.url("fhirvault")}  # whatever TEST_DB_ENGINE says
    srv = start_server(data, tmp_path / "server.log", env=env)
    try:
        before_backup = seed(srv, 5)
        cluster.backrest("--type=full", "backup")
        before_target = seed(srv, 4)  # after the full backup: only in the archived WAL
        time.sleep(0.5)
        target = str(cluster.sql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC',"
                                 " 'YYYY-MM-DD HH24:MI:SS.US') || '+00'"))
        time.sleep(0.5)
        after_target = seed(srv, 3)
    finally:
        srv.stop()
    everything = before_backup + before_target + after_target
    assert _present(data, everything) == set(everything)
    cluster.backrest("check")  # switches the WAL: the writes after the target are archived too

    # The recipe: stop PostgreSQL, restore to the instant, promote at the target, start.
    cluster.pg("stop")
    cluster.backrest("--delta", "--type=time", f"--target={target}", "--target-action=promote", "restore")
    cluster.pg("start")
    deadline = time.monotonic() + 60
    while cluster.sql("SELECT pg_is_in_recovery()") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.sql("SELECT pg_is_in_recovery()") is False

    assert _present(data, everything) == set(before_backup + before_target)  # exactly the writes before the target

    # The audit log on the recovered database: the witness saw checkpoints past the target, so to it the
    # recovery is a rollback, and verification says so (also the server's: it would not become ready).
    r = fv("audit", "verify", "--data-dir", str(data))
    assert r.returncode == 1 and "rolled back" in r.stdout + r.stderr
    # The recipe's next step: move the file witness aside (kept: it documents the rollback). Then every entry,
    # the Merkle tree and the signatures verify, and the server starts, becomes ready and serves the data.
    (data / "audit-witness.log").rename(data / "audit-witness.before-pitr.log")
    r = fv("audit", "verify", "--data-dir", str(data), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["ok"] is True
    srv = start_server(data, tmp_path / "server-after.log", env=env)
    try:
        deadline = time.monotonic() + 60
        while httpx.get(srv.base_url + "/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(srv.base_url + "/readyz").status_code == 200
        with srv.client() as c:
            assert c.get("/Patient", params={"_summary": "count"}).json()["total"] == 9
    finally:
        srv.stop()

    # The repository is encrypted at rest: without the passphrase pgBackRest cannot even read its catalogue.
    info = json.loads(cluster.backrest("--output=json", "info").stdout)
    assert info[0]["cipher"] == "aes-256-cbc" and info[0]["backup"][0]["type"] == "full"
    cluster.write_config(cluster.base / "no-pass.conf", with_passphrase=False)
    r = cluster.backrest("info", conf=cluster.base / "no-pass.conf", check=False)
    assert r.returncode != 0
