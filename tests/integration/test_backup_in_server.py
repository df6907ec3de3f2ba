"""Backups and replication run by the server itself: audited, measured, alerted."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from fhirvault.backup.scheduler import BACKUP_FAILED, BackupScheduler
from fhirvault.backup.settings import parse_backup_settings
from tests import pg_server
from tests.conftest import PATIENT, App, engine_settings, start_server


def _backup_settings(url: str) -> object:
    return parse_backup_settings({"targets": {"local": {"url": url, "location": "FR"}}, "interval": "1h"},
                                 "test")


def _engine_lines(data: Path) -> str:
    """The engine under test in the data directory's config file, so that CLI commands reach it too."""
    return "".join(f'{k} = "{v}"\n' for k, v in engine_settings(data).items())


def _audit(app: App) -> list[dict[str, object]]:
    c = app.container
    return [c.audit.decrypt(seq, ts, blob) for seq, ts, blob in c.store.audit_entries("default", limit=100_000)]


def test_a_scheduled_run_backs_up_verifies_is_audited_and_measured(app: App, tmp_path: Path) -> None:
    assert app.client.post("/fhir/Patient", json=PATIENT, headers=app.auth).status_code == 201
    settings = _backup_settings(f"file://{tmp_path / 'target'}")
    detection = app.container.enable_alerting()
    scheduler = BackupScheduler(app.container, detection, settings)  # type: ignore[arg-type]
    assert scheduler.run_once()
    runs = [r for r in _audit(app) if r["interaction"] == "backup"]
    assert len(runs) == 1 and runs[0]["category"] == "system" and "verified" in str(runs[0]["detail"])
    assert (tmp_path / "target" / "manifests").is_dir()
    scrape = generate_latest(app.container.metrics.registry).decode()
    assert 'fhirvault_backup_last_success_timestamp_seconds{target="local"}' in scrape


def test_a_failed_run_is_alerted_and_audited(app: App, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the target directory should be")
    settings = _backup_settings(f"file://{blocker}/target")
    detection = app.container.enable_alerting()
    scheduler = BackupScheduler(app.container, detection, settings)  # type: ignore[arg-type]
    assert not scheduler.run_once()
    assert any(r["interaction"] == "backup" and r["status"] == 500 for r in _audit(app))
    assert app.container.alerts is not None
    assert any(rule == BACKUP_FAILED for rule, _ in app.container.alerts.open_counts())


@pytest.mark.server
def test_the_server_replicates_changes_within_seconds(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    target = tmp_path / "replica"
    target.mkdir()  # a missing target directory (an unmounted volume) is refused, not created
    (data / "fhirvault.toml").write_text(
        _engine_lines(data) + f'workers = 1\n[backup]\nreplicate_to = "offsite"\n[backup.targets.offsite]\nurl = "file://{target}"\nlocation = "FR"\n')
    srv = start_server(data, tmp_path / "server.log")
    try:
        with srv.client() as c:
            time.sleep(2)  # let the start-up state ship first
            before = len(list(target.glob("wal/*/*.seg")))
            r = c.post("/Patient", json=PATIENT)
            assert r.status_code == 201
        acked = time.monotonic()
        deadline = acked + 10
        while time.monotonic() < deadline and len(list(target.glob("wal/*/*.seg"))) <= before:
            time.sleep(0.05)
        assert len(list(target.glob("wal/*/*.seg"))) > before, (tmp_path / "server.log").read_text()[-2000:]
        print(f"replication: first segment on the target {time.monotonic() - acked:.2f} s after the 201")
    finally:
        srv.stop()


def test_a_scheduled_drill_feeds_the_metrics_and_the_audit(app: App, tmp_path: Path) -> None:
    assert app.client.post("/fhir/Patient", json=PATIENT, headers=app.auth).status_code == 201
    (tmp_path / "target").mkdir()
    settings = _backup_settings(f"file://{tmp_path / 'target'}")
    scheduler = BackupScheduler(app.container, app.container.enable_alerting(), settings)  # type: ignore[arg-type]
    assert scheduler.run_once()
    assert scheduler.drill_once()
    scrape = generate_latest(app.container.metrics.registry).decode()
    rto = [line for line in scrape.splitlines() if line.startswith("fhirvault_dr_drill_rto_seconds ")]
    assert rto and float(rto[0].split()[1]) > 0
    drills = [r for r in _audit(app) if r["interaction"] == "dr-drill"]
    assert len(drills) == 1 and "passed" in str(drills[0]["detail"])
    assert list((app.settings.data_dir / "dr-drills").glob("*.json"))


@pytest.mark.server
def test_point_in_time_restore_from_a_replicating_server(tmp_path: Path) -> None:
    """The whole chain an operator uses: server replicating, CLI backup, CLI restore --at."""
    from datetime import UTC, datetime

    from fhirvault.cli.main import main
    from fhirvault.config import load_settings
    from fhirvault.container import build

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    target = tmp_path / "offsite"
    target.mkdir()
    (data / "fhirvault.toml").write_text(
        _engine_lines(data) + f'workers = 1\n[backup]\nreplicate_to = "offsite"\n[backup.targets.offsite]\nurl = "file://{target}"\nlocation = "FR"\n')
    srv = start_server(data, tmp_path / "server.log")
    try:
        with srv.client() as c:
            first = c.post("/Patient", json=PATIENT).json()["id"]
            assert main(["backup", "create", "--data-dir", str(data), "--target", "offsite"]) == 0
            second = c.post("/Patient", json=PATIENT).json()["id"]
            time.sleep(0.05)
            cut = datetime.now(UTC)
            time.sleep(0.05)
            third = c.post("/Patient", json=PATIENT).json()["id"]
        time.sleep(3)  # replication ships within about a second
    finally:
        srv.stop()

    def restored(args: list[str], name: str) -> set[str]:
        dest = tmp_path / name
        # On PostgreSQL the tables go into a new, empty database.
        engine = {"database_url": pg_server.server().create_database(empty=True)} if pg_server.engine() == "postgresql" \
            else {}
        if engine:
            args = [*args, "--database-url", str(engine["database_url"])]
        # A new machine has no data directory: the target comes from the same config file.
        assert main(["backup", "restore", "--target", "offsite", "--backup-config", str(data / "fhirvault.toml"),
                     "--to", str(dest), "--root-key-file", str(data / "root.key"), *args]) == 0
        c = build(load_settings({"data_dir": dest, **engine}, environ={}))
        try:
            return {pid for pid in (first, second, third) if c.store.read_current("default", "Patient", pid)}
        finally:
            c.close()

    assert restored([], "latest") == {first, second, third}
    assert restored(["--at", cut.isoformat()], "at-cut") == {first, second}
