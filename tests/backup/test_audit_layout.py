"""Backups and the audit log in the main database file (migration 3): a backup taken before the move (two
files) still restores, and is merged at its first start; a backup taken after it is one file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fhirvault.adapters.sqlite_backup import SqliteChangeFeed
from fhirvault.backup.engine import create_backup, restore_backup
from fhirvault.bootstrap import initialise
from fhirvault.config import Settings, load_settings
from fhirvault.container import build
from fhirvault.services.audit import AuditRecord
from fhirvault.services.audit_verify import verify_data_dir
from tests.backup.conftest import file_target, root_of

DATA = Path(__file__).parents[1] / "data"
ENTRIES = 30
AUDIT_TABLES = ("audit_log", "audit_index", "audit_nodes", "audit_checkpoints")


def _logged(data: Path) -> Settings:
    settings = load_settings({"data_dir": data}, environ={})
    initialise(settings)
    c = build(settings)
    try:
        for i in range(ENTRIES):
            record = AuditRecord(1_700_000_000_000 + i, "read", "0", 200, f"req-{i}", client_id="c1",
                                 entity=f"Observation/o{i}/_history/1", patient=f"Patient/p{i % 3}")
            c.store.write_sync("audit", lambda tx, r=record: c.audit.record(tx, r))
        c.checkpointer.step(force=True, witness=True)
    finally:
        c.close()
    return settings


def _as_previous_release(data: Path) -> None:
    """Put the audit tables back in audit.sqlite3 at schema version 2, as releases before migration 3 kept them."""
    conn = sqlite3.connect(data / "fhirvault.sqlite3", isolation_level=None)
    conn.execute("ATTACH DATABASE ? AS audit", (str(data / "audit.sqlite3"),))
    conn.execute("PRAGMA audit.journal_mode=WAL")
    conn.executescript((DATA / "sqlite_v1_audit.sql").read_text())
    conn.execute("BEGIN")
    for table in AUDIT_TABLES:
        conn.execute(f"INSERT INTO audit.{table} SELECT * FROM main.{table}")
        conn.execute(f"DROP TABLE main.{table}")
    conn.execute("UPDATE meta SET value=? WHERE name='schema_version'", (b"2",))
    conn.execute("COMMIT")
    conn.close()


def _audit_rows(db: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT seq, blob FROM audit_log ORDER BY seq").fetchall()
    finally:
        conn.close()


@pytest.mark.sqlite_only
def test_a_backup_of_the_two_file_layout_restores_and_is_merged_at_its_first_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _logged(data)
    _as_previous_release(data)
    old_rows = _audit_rows(data / "audit.sqlite3")
    assert len(old_rows) >= ENTRIES
    target = file_target(tmp_path / "target")
    result = create_backup(data, target, root_of(data))
    assert result.watermarks["audit.sqlite3"] == {"audit_log": len(old_rows)}
    restored = tmp_path / "restored"
    restore_backup(target, restored, (data / "root.key").read_bytes())
    assert (restored / "audit.sqlite3").is_file()  # restored as it was backed up
    report = verify_data_dir(load_settings({"data_dir": restored}, environ={}))  # its first start
    assert report.ok, report.problems
    assert report.entries == len(old_rows) and report.checkpoints == 1
    assert _audit_rows(restored / "fhirvault.sqlite3") == old_rows
    assert not (restored / "audit.sqlite3").exists()


@pytest.mark.sqlite_only
def test_a_backup_is_one_database_file_holding_both_logical_databases(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _logged(data)
    rows = _audit_rows(data / "fhirvault.sqlite3")
    target = file_target(tmp_path / "target")
    result = create_backup(data, target, root_of(data))
    # The backup format keeps its logical names: the audit watermark is read from the main file.
    assert result.watermarks["audit.sqlite3"] == {"audit_log": len(rows)}
    restored = tmp_path / "restored"
    restore_backup(target, restored, (data / "root.key").read_bytes())
    assert not list(restored.glob("audit.sqlite3*"))
    assert _audit_rows(restored / "fhirvault.sqlite3") == rows
    assert verify_data_dir(load_settings({"data_dir": restored}, environ={})).ok


@pytest.mark.sqlite_only
def test_the_change_feed_shows_the_main_file_as_the_two_logical_databases_in_one_snapshot(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _logged(data)
    feed = SqliteChangeFeed(data)
    try:
        dbs = feed.databases()
        assert set(AUDIT_TABLES) == set(dbs["audit.sqlite3"].tables())
        assert not set(AUDIT_TABLES) & set(dbs["fhirvault.sqlite3"].tables())
        assert "resource_versions" in dbs["fhirvault.sqlite3"].tables()
        assert dbs["audit.sqlite3"].conn is dbs["fhirvault.sqlite3"].conn  # one read transaction covers both
        with feed.read():
            assert dbs["audit.sqlite3"].conn.in_transaction
    finally:
        feed.close()
    _as_previous_release(data)
    feed = SqliteChangeFeed(data)
    try:
        dbs = feed.databases()
        assert set(AUDIT_TABLES) <= set(dbs["audit.sqlite3"].tables())
        assert dbs["audit.sqlite3"].conn is not dbs["fhirvault.sqlite3"].conn
    finally:
        feed.close()
