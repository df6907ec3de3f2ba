"""Replication segments a retained backup already contains are pruned; the rest stay replayable."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fhirvault.adapters.keyfile import KeyFileProvider
from fhirvault.backup.engine import PruneResult, create_backup, prune
from fhirvault.backup.file_target import FileTarget
from fhirvault.backup.manifest import BackupKeys
from fhirvault.backup.replication import Replicator, list_generations
from fhirvault.backup.settings import RetentionSettings
from fhirvault.bootstrap import initialise
from fhirvault.config import Settings, load_settings
from fhirvault.container import Container, build
from fhirvault.services.audit import AuditRecord


@dataclass
class Shipping:
    settings: Settings
    container: Container
    target: FileTarget
    replicator: Replicator

    def write_and_ship(self, n: int) -> None:
        c = self.container
        for i in range(n):
            c.store.write_sync("w", lambda tx, i=i: c.audit.record(
                tx, AuditRecord(c.clock.now_ms(), "read", "0", 200, f"r{i}")))
            self.replicator.run_once()

    def segments(self) -> list[str]:
        return [k for keys in list_generations(self.target).values() for k in keys]

    def backup_then_prune(self) -> PruneResult:
        root = KeyFileProvider.load(self.settings.root_key_path)
        create_backup(self.settings.data_dir, self.target, root)
        instance = self.container.store.get_meta("instance-id")
        assert instance is not None
        return prune(self.target, root, instance.decode(), RetentionSettings(keep_all_days=7, grace_seconds=0))


@pytest.fixture
def shipping(tmp_path: Path) -> Iterator[Shipping]:
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    (tmp_path / "target").mkdir()
    target = FileTarget(tmp_path / "target", "FR")
    c = build(settings)
    try:
        keys = BackupKeys(c.secrets.get("backup"), c.secrets.get("backup-signing"))
        yield Shipping(settings, c, target, Replicator(settings.data_dir, target, keys.seal_key))
    finally:
        c.close()


def test_prune_deletes_only_segments_the_oldest_backup_in_the_window_contains(shipping: Shipping) -> None:
    shipping.write_and_ship(5)
    shipped_before_backup = shipping.segments()
    assert len(shipped_before_backup) >= 3
    root = KeyFileProvider.load(shipping.settings.root_key_path)
    create_backup(shipping.settings.data_dir, shipping.target, root)
    shipping.write_and_ship(3)
    everything = shipping.segments()
    instance = shipping.container.store.get_meta("instance-id")
    assert instance is not None
    result = prune(shipping.target, root, instance.decode(), RetentionSettings(keep_all_days=7, grace_seconds=0))
    left = shipping.segments()
    # Segments shipped before the backup are in it; every segment shipped after it is kept for
    # point-in-time restore.
    assert result.deleted_segments == len(shipped_before_backup)
    assert left == [k for k in everything if k not in shipped_before_backup]
    assert left  # and each generation keeps its last segment, where a restarted replicator resumes


def test_a_generation_keeps_its_last_segment(shipping: Shipping) -> None:
    shipping.write_and_ship(3)
    shipped = shipping.segments()
    shipping.backup_then_prune()
    assert shipping.segments() == shipped[-1:]
