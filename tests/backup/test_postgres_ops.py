"""Backup operations of a deployment on PostgreSQL: the drill and the scheduled backups of several workers."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import psycopg
import pytest

from fhirvault.backup.engine import list_backups
from fhirvault.backup.scheduler import BackupScheduler
from fhirvault.backup.settings import parse_backup_settings
from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import Container, build
from tests import pg_server
from tests.backup.conftest import MARKER, file_target, seed
from tests.backup.test_recovery_e2e import fv
from tests.conftest import start_server


def _drill_databases() -> list[str]:
    with psycopg.connect(pg_server.server().admin_url, autocommit=True) as c:
        return [r[0] for r in c.execute("SELECT datname FROM pg_database WHERE datname LIKE 'fhirvault_drill_%'")]


def _deployment(tmp_path: Path) -> tuple[Path, str]:
    """A data directory whose config file names a new database (so CLI commands reach it, as an operator's do)."""
    url = pg_server.server().create_database()
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "fhirvault.toml").write_text(f'database_url = "{url}"\n')
    (data / "fhirvault.toml").chmod(0o600)
    return data, url


@pytest.mark.slow
@pytest.mark.server
def test_drill_on_postgresql_restores_into_a_scratch_database_and_drops_it(tmp_path: Path) -> None:
    data, url = _deployment(tmp_path)
    target, reports = (tmp_path / "target").as_uri(), tmp_path / "reports"
    before = set(_drill_databases())
    srv = start_server(data, tmp_path / "server.log", env={"FHIRVAULT_DATABASE_URL": url})
    try:
        seed(srv, 20, 2)
        r = fv("backup", "create", "--data-dir", str(data), "--target", target, "--location", "FR")
        assert r.returncode == 0, r.stderr
        seed(srv, 3, 0)  # after the backup: not restored, so the achieved RPO is not zero
        r = fv("dr", "drill", "--data-dir", str(data), "--target", target, "--location", "FR",
               "--report-dir", str(reports))
        assert r.returncode == 0, r.stdout + r.stderr
        # The scratch database may also live on another server: the drill creates and drops it there.
        r2 = fv("dr", "drill", "--data-dir", str(data), "--target", target, "--location", "FR",
                "--report-dir", str(tmp_path / "reports2"), "--scratch-url", pg_server.server().admin_url)
        assert r2.returncode == 0, r2.stdout + r2.stderr
    finally:
        srv.stop()
    assert "PASSED" in r.stdout and "PASSED" in r2.stdout
    [json_path] = list(reports.glob("dr-drill-*.json"))
    report = json.loads(json_path.read_text())
    assert report["ok"] is True and report["problems"] == []
    assert report["counts"] == {"Patient": 20, "Observation": 40}  # the backup's point, not the live 23
    assert report["served_counts_match"] is True and "OK" in report["audit"]
    assert report["rpo_seconds"] > 0 and report["rto_seconds"] > 0
    assert MARKER not in json_path.read_text()
    assert set(_drill_databases()) == before  # created and dropped by the drill


def _containers(tmp_path: Path, n: int) -> tuple[list[Container], object]:
    data, url = _deployment(tmp_path)
    settings = load_settings({"data_dir": data}, environ={})
    assert settings.database_url == url
    initialise(settings)
    (tmp_path / "target").mkdir()
    backup = parse_backup_settings({"targets": {"local": {"url": (tmp_path / "target").as_uri(), "location": "FR"}},
                                    "interval": "1h"}, "test")
    # Each container is what one `serve --workers N` process builds: its own store and leader connection.
    return [build(settings) for _ in range(n)], backup


def test_scheduled_backups_run_once_per_cluster_and_move_to_the_next_worker(tmp_path: Path) -> None:
    containers, backup = _containers(tmp_path, 2)
    closed: set[int] = set()
    try:
        schedulers = [BackupScheduler(c, c.enable_alerting(), backup) for c in containers]  # type: ignore[arg-type]
        results: list[bool | None] = [None, None]
        barrier = threading.Barrier(2)

        def round_of(i: int) -> None:
            barrier.wait()
            results[i] = schedulers[i].scheduled_round(schedulers[i].run_once)

        threads = [threading.Thread(target=round_of, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results, key=str) == [None, True]  # one worker backed up, the other stood aside
        leader = results.index(True)
        assert schedulers[1 - leader].scheduled_round(schedulers[1 - leader].run_once) is None
        assert len(list_backups(file_target(tmp_path / "target")).manifests) == 1
        # The leader stops (its session, and with it the advisory lock, ends): the other worker takes over.
        containers[leader].close()
        closed.add(leader)
        assert schedulers[1 - leader].scheduled_round(schedulers[1 - leader].run_once) is True
        assert len(list_backups(file_target(tmp_path / "target")).manifests) == 2
    finally:
        for i, c in enumerate(containers):
            if i not in closed:
                c.close()


@pytest.mark.server
def test_an_export_in_several_parts_restores_the_same_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fhirvault.adapters import postgres_backup
    from fhirvault.backup.drill import data_state
    from fhirvault.backup.engine import choose, create_backup, restore_backup
    from fhirvault.container import restore_sink, snapshot_source
    from fhirvault.services.audit_verify import verify_data_dir
    from tests.backup.conftest import root_of

    data, url = _deployment(tmp_path)
    srv = start_server(data, tmp_path / "server.log", env={"FHIRVAULT_DATABASE_URL": url})
    try:
        seed(srv, 15, obs_each=1, per_bundle=4)
    finally:
        srv.stop()
    monkeypatch.setattr(postgres_backup, "EXPORT_PART_ROWS", 7)  # a few rows per part: many parts
    settings = load_settings({"data_dir": data}, environ={})
    (tmp_path / "target").mkdir()
    target = file_target(tmp_path / "target")
    create_backup(data, target, root_of(data), source=snapshot_source(settings))
    _, _, body, _ = choose(target, root_of(data))
    parts = [f.name for f in body.files if f.kind == "feed"]
    assert len(parts) >= 8 and parts[:2] == ["fhirvault.sqlite3", "audit.sqlite3"]
    restored_url = pg_server.server().create_database(empty=True)
    restore_backup(target, tmp_path / "restored", (data / "root.key").read_bytes(),
                   sink=lambda d: restore_sink(d, restored_url))
    restored = load_settings({"data_dir": tmp_path / "restored", "database_url": restored_url}, environ={})
    got, want = data_state(restored), data_state(settings)
    assert got.counts == want.counts == {"Patient": 15, "Observation": 15}
    assert got.hashes == want.hashes and got.max_seq == want.max_seq
    assert verify_data_dir(restored).ok
    c = build(restored)
    try:
        client = c.auth.register_client("parts-test", "system/*.rs")
    finally:
        c.close()
    (tmp_path / "restored" / "admin-client.json").write_text(
        json.dumps({"client_id": client.client_id, "client_secret": client.client_secret}))
    again = start_server(tmp_path / "restored", tmp_path / "restored.log",
                         env={"FHIRVAULT_DATABASE_URL": restored_url})
    try:  # the search tags, rebuilt part by part, find every patient
        with again.client() as http:
            for n in range(15):
                assert http.get("/Patient", params={"family:exact": f"{MARKER}{n}"}).json()["total"] == 1, n
    finally:
        again.stop()
