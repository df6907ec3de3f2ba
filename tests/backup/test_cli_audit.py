"""Backup and restore runs from the command line leave system events in the audit trails."""

from __future__ import annotations

from pathlib import Path

from fhirvault.bootstrap import initialise
from fhirvault.cli.main import main
from fhirvault.config import load_settings
from fhirvault.container import build


def _events(data_dir: Path, interaction: str) -> list[dict[str, object]]:
    c = build(load_settings({"data_dir": data_dir}, environ={}))
    try:
        records = [c.audit.decrypt(seq, ts, blob) for seq, ts, blob in c.store.audit_entries("default", limit=10**6)]
    finally:
        c.close()
    return [r for r in records if r["interaction"] == interaction]


def test_backup_and_restore_are_audited(tmp_path: Path) -> None:
    data = tmp_path / "data"
    initialise(load_settings({"data_dir": data}, environ={}))
    (tmp_path / "target").mkdir()
    url = f"file://{tmp_path / 'target'}"
    assert main(["backup", "create", "--data-dir", str(data), "--target", url, "--location", "FR"]) == 0
    [backup] = _events(data, "backup")
    assert backup["category"] == "system" and url in str(backup["detail"])
    restored = tmp_path / "restored"
    assert main(["backup", "restore", "--target", url, "--location", "FR", "--to", str(restored),
                 "--root-key-file", str(data / "root.key")]) == 0
    [restore] = _events(restored, "restore")
    assert "recovery point" in str(restore["detail"])
