"""Backups, replication and restore of a deployment on PostgreSQL (a real server process on a real database)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhirvault.adapters.postgres_backup import PostgresRestoreSink
from fhirvault.backup.engine import RestoreError, create_backup, restore_backup
from fhirvault.backup.manifest import BackupKeys, open_manifest
from fhirvault.backup.replication import ReplayReport, Replicator, replay
from fhirvault.backup.snapshot import deployment_secrets
from fhirvault.backup.target import BackupTarget
from fhirvault.config import Settings, load_settings
from fhirvault.container import build, change_feed_source, snapshot_source
from tests import pg_server
from tests.backup.conftest import MARKER, all_object_bytes, file_target, root_of, seed
from tests.conftest import start_server

pytestmark = pytest.mark.server  # starts real server processes


def _settings(data_dir: Path, url: str) -> Settings:
    return load_settings({"data_dir": data_dir, "database_url": url}, environ={})


def test_backup_replicate_and_restore_into_a_new_database(tmp_path: Path) -> None:
    from fhirvault.backup.drill import data_state

    url = pg_server.server().create_database()
    data = tmp_path / "data"
    srv = start_server(data, tmp_path / "server.log", env={"FHIRVAULT_DATABASE_URL": url})
    try:
        seed(srv, 12, obs_each=1)
        settings = _settings(data, url)
        assert not (data / "fhirvault.sqlite3").exists()  # the deployment really is on PostgreSQL
        (tmp_path / "target").mkdir()
        target = file_target(tmp_path / "target")
        root = root_of(data)
        base = create_backup(data, target, root, source=snapshot_source(settings))
        secrets = deployment_secrets(data, root, snapshot_source(settings))
        seal_key = BackupKeys(secrets.backup_key, secrets.signing_seed).seal_key
        rep = Replicator(change_feed_source(settings), target, seal_key, max_rows=25,
                         initial_watermarks=base.watermarks)
        seed(srv, 8, obs_each=1)  # after the base: only in the replicated feed
        shipped = 0
        while rep.run_once():
            shipped += 1
        rep.stop()
        assert shipped >= 2
        source = data_state(settings)
    finally:
        srv.stop()
    assert all(MARKER.encode() not in raw for _, raw in all_object_bytes(tmp_path / "target"))

    restored_url = pg_server.server().create_database(empty=True)
    reports: list[ReplayReport] = []

    def replay_into(t: BackupTarget, key: bytes, d: Path, marks: dict[str, dict[str, int]],
                    until: int | None) -> object:
        reports.append(replay(t, key, d, marks, until, sink=PostgresRestoreSink(d, restored_url)))
        return reports[-1]

    res = restore_backup(target, tmp_path / "restored", (data / "root.key").read_bytes(),
                         sink=lambda d: PostgresRestoreSink(d, restored_url), replay=replay_into)
    assert res.backup_id == base.backup_id
    assert reports[0].gap is None and reports[0].segments_applied >= 2
    assert not (tmp_path / "restored" / "fhirvault.sqlite3").exists()  # the tables went into the database
    assert (tmp_path / "restored" / "alerts.sqlite3").is_file()  # local files are restored as files
    restored = _settings(tmp_path / "restored", restored_url)
    got = data_state(restored)
    assert got.counts == source.counts == {"Patient": 20, "Observation": 20}
    assert got.hashes == source.hashes and got.max_seq == source.max_seq

    # The restored database serves, searches (tags rebuilt from the tag lists) and takes new writes.
    container = build(restored)
    try:
        client = container.auth.register_client("restore-test", "system/*.cruds")
    finally:
        container.close()
    (tmp_path / "restored" / "admin-client.json").write_text(
        json.dumps({"client_id": client.client_id, "client_secret": client.client_secret}))
    again = start_server(tmp_path / "restored", tmp_path / "restored.log",
                         env={"FHIRVAULT_DATABASE_URL": restored_url})
    try:
        with again.client() as c:
            found = c.get("/Patient", params={"family": f"{MARKER}11"})  # only in the base backup
            assert found.status_code == 200 and found.json()["total"] == 1
            both = c.get("/Patient", params={"family": f"{MARKER}7"})  # one in the base, one replicated
            assert both.status_code == 200 and both.json()["total"] == 2
        assert len(seed(again, 1)) == 1
    finally:
        again.stop()


def test_a_postgresql_backup_holds_engine_neutral_exports(tmp_path: Path) -> None:
    url = pg_server.server().create_database()
    data = tmp_path / "data"
    srv = start_server(data, tmp_path / "server.log", env={"FHIRVAULT_DATABASE_URL": url})
    try:
        seed(srv, 3)
    finally:
        srv.stop()
    (tmp_path / "target").mkdir()
    target = file_target(tmp_path / "target")
    result = create_backup(data, target, root_of(data), source=snapshot_source(_settings(data, url)))
    from fhirvault.backup.engine import choose

    m, _, body, _ = choose(target, root_of(data))
    assert m.backup_id == result.backup_id
    assert {(f.name, f.kind) for f in body.files} >= {("fhirvault.sqlite3", "feed"), ("audit.sqlite3", "feed")}
    assert open_manifest(m, root_of(data))[1].watermarks["fhirvault.sqlite3"]["resource_versions"] >= 3
    # Into a database that already holds resources: refused, nothing touched.
    refused = tmp_path / "refused"
    with pytest.raises(RestoreError, match="already holds resources"):
        restore_backup(target, refused, (data / "root.key").read_bytes(), sink=lambda d: PostgresRestoreSink(d, url))
    assert not refused.exists()
    with pytest.raises(RestoreError, match="PostgreSQL export"):  # the default (SQLite) restore says why
        restore_backup(target, refused, (data / "root.key").read_bytes())
    assert not refused.exists()


def test_cli_backup_then_restore_into_a_new_database(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    def fv(*args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
        if url is not None:
            env["FHIRVAULT_DATABASE_URL"] = url
        return subprocess.run([sys.executable, "-m", "fhirvault.cli.main", *args], capture_output=True, text=True,
                              env=env, timeout=300)

    url = pg_server.server().create_database()
    old, backups = tmp_path / "old", tmp_path / "backups"
    srv = start_server(old, tmp_path / "old.log", env={"FHIRVAULT_DATABASE_URL": url})
    try:
        ids = seed(srv, 5)
        with srv.client() as c:
            original = c.get(f"/Patient/{ids[3]}").json()
        backups.mkdir()
        r = fv("backup", "create", "--data-dir", str(old), "--target", backups.as_uri(), "--location", "FR", url=url)
        assert r.returncode == 0, r.stderr
    finally:
        srv.stop()
    new_url = pg_server.server().create_database(empty=True)
    new = tmp_path / "new"
    r = fv("backup", "restore", "--target", backups.as_uri(), "--location", "FR", "--to", str(new),
           "--root-key-file", str(old / "root.key"), "--database-url", new_url)
    assert r.returncode == 0, r.stderr
    assert "point the restored server at it" in r.stderr and not (new / "fhirvault.sqlite3").exists()
    (new / "admin-client.json").write_text(json.dumps(srv.creds))  # the operator's copy of the old credentials
    again = start_server(new, tmp_path / "new.log", env={"FHIRVAULT_DATABASE_URL": new_url})
    try:
        with again.client() as c:
            assert c.get(f"/Patient/{ids[3]}").json() == original
    finally:
        again.stop()
