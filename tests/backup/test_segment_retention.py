"""Replication segments a retained backup already contains are pruned; the rest stay replayable."""

from __future__ import annotations

from pathlib import Path

from fhirvault.adapters.keyfile import KeyFileProvider
from fhirvault.backup.engine import create_backup, prune
from fhirvault.backup.file_target import FileTarget
from fhirvault.backup.manifest import BackupKeys
from fhirvault.backup.replication import Replicator, list_generations
from fhirvault.backup.settings import RetentionSettings
from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.services.audit import AuditRecord


def _segments(target: FileTarget) -> list[str]:
    return [k for keys in list_generations(target).values() for k in keys]


def test_prune_deletes_only_segments_the_oldest_backup_in_the_window_contains(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    (tmp_path / "target").mkdir()
    target = FileTarget(tmp_path / "target", "FR")
    c = build(settings)
    root = KeyFileProvider.load(settings.root_key_path)
    try:
        keys = BackupKeys(c.secrets.get("backup"), c.secrets.get("backup-signing"))
        replicator = Replicator(settings.data_dir, target, keys.seal_key)

        def write_and_ship(n: int) -> None:
            for i in range(n):
                c.store.write_sync("w", lambda tx, i=i: c.audit.record(
                    tx, AuditRecord(c.clock.now_ms(), "read", "0", 200, f"r{i}")))
                replicator.run_once()

        write_and_ship(5)
        shipped_before_backup = _segments(target)
        assert len(shipped_before_backup) >= 3
        create_backup(settings.data_dir, target, root)
        write_and_ship(3)
        everything = _segments(target)
        result = prune(target, root, c.store.get_meta("instance-id").decode(),  # type: ignore[union-attr]
                       RetentionSettings(keep_all_days=7, grace_seconds=0))
        left = _segments(target)
    finally:
        c.close()
    # Segments shipped before the backup are in it; every segment shipped after it is kept for
    # point-in-time restore.
    assert result.deleted_segments == len(shipped_before_backup)
    assert left == [k for k in everything if k not in shipped_before_backup]
    assert left  # and each generation keeps its last segment, where a restarted replicator resumes


def test_a_generation_keeps_its_last_segment(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    (tmp_path / "target").mkdir()
    target = FileTarget(tmp_path / "target", "FR")
    c = build(settings)
    root = KeyFileProvider.load(settings.root_key_path)
    try:
        keys = BackupKeys(c.secrets.get("backup"), c.secrets.get("backup-signing"))
        replicator = Replicator(settings.data_dir, target, keys.seal_key)
        for i in range(3):
            c.store.write_sync("w", lambda tx, i=i: c.audit.record(
                tx, AuditRecord(c.clock.now_ms(), "read", "0", 200, f"r{i}")))
            replicator.run_once()
        shipped = _segments(target)
        create_backup(settings.data_dir, target, root)
        prune(target, root, c.store.get_meta("instance-id").decode(),  # type: ignore[union-attr]
              RetentionSettings(keep_all_days=7, grace_seconds=0))
    finally:
        c.close()
    assert _segments(target) == shipped[-1:]
