"""FileTarget: a directory as an object store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fhirvault.backup.file_target import FileTarget, path_from_url
from fhirvault.backup.target import TargetError, TargetNotFound, TargetUnavailable


def test_put_get_list_delete(tmp_path: Path) -> None:
    t = FileTarget.from_url((tmp_path / "t").as_uri(), "FR")
    assert t.url == (tmp_path / "t").as_uri() and t.location == "FR"
    t.put("chunks/ab/abc", b"1")
    t.put("chunks/cd/cde", b"22")
    t.put("manifests/m1.json", b"{}")
    t.put("chunks/ab/abc", b"333")  # overwrite
    assert t.get("chunks/ab/abc") == b"333"
    assert t.exists("chunks/cd/cde") and not t.exists("chunks/zz/zzz")
    assert list(t.list("chunks/")) == ["chunks/ab/abc", "chunks/cd/cde"]
    assert list(t.list("chunks/c")) == ["chunks/cd/cde"]
    assert list(t.list("")) == ["chunks/ab/abc", "chunks/cd/cde", "manifests/m1.json"]
    t.delete("chunks/ab/abc")
    t.delete("chunks/ab/abc")  # absent is fine
    with pytest.raises(TargetNotFound):
        t.get("chunks/ab/abc")
    assert oct((tmp_path / "t" / "manifests" / "m1.json").stat().st_mode & 0o777) == "0o600"


def test_temp_files_are_never_listed_and_keys_cannot_escape(tmp_path: Path) -> None:
    t = FileTarget(tmp_path / "t", "FR")
    t.put("manifests/a.json", b"x")
    (tmp_path / "t" / "manifests" / ".tmp-123").write_bytes(b"half")
    assert list(t.list("manifests/")) == ["manifests/a.json"]
    for bad in ("../x", "a//b", "/abs", "manifests/.tmp-1", ""):
        with pytest.raises(TargetError):
            t.put(bad, b"x")


def test_unwritable_target_is_unavailable(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("not a dir")
        t = FileTarget(blocker, "FR")  # a file where the directory should be
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        t = FileTarget(tmp_path / "ro", "FR")
    with pytest.raises(TargetUnavailable):
        t.put("chunks/aa/a", b"x")
    with pytest.raises(TargetUnavailable):
        list(FileTarget(tmp_path / "missing", "FR").list(""))


def test_url_parsing() -> None:
    assert path_from_url("file:///srv/backups") == Path("/srv/backups")
    with pytest.raises(TargetError):
        path_from_url("file://host/srv")
    with pytest.raises(TargetError):
        path_from_url("s3://bucket")


def test_retention_is_kept_as_on_s3(tmp_path: Path) -> None:
    from fhirvault.backup.target import TargetImmutable

    t = FileTarget(tmp_path / "t", "FR")
    now = time.time_ns() // 1_000_000
    t.put("manifests/a.json", b"x", retain_until_ms=now + 3_600_000)
    t.put("manifests/old.json", b"y", retain_until_ms=now - 1)
    assert list(t.list("")) == ["manifests/a.json", "manifests/old.json"]  # the retention records are not objects
    with pytest.raises(TargetImmutable):
        t.delete("manifests/a.json")
    t.put("manifests/a.json", b"x", retain_until_ms=now + 1000)  # a renewal never shortens it
    assert t.retained_until("manifests/a.json") == now + 3_600_000
    with pytest.raises(TargetImmutable):
        t.delete("manifests/a.json")
    t.delete("manifests/old.json")  # its retention is over
    assert list(t.list("")) == ["manifests/a.json"]
    assert not (tmp_path / "t" / "manifests" / ".retain-old.json").exists()
    with pytest.raises(TargetError):
        t.put("manifests/.retain-a.json", b"0")  # the records cannot be written as objects


def test_prune_keeps_backups_under_retention_on_a_file_target(tmp_path: Path) -> None:
    import sqlite3

    from fhirvault.backup.engine import create_backup, list_backups, prune
    from fhirvault.backup.settings import RetentionSettings
    from fhirvault.bootstrap import initialise
    from fhirvault.config import load_settings
    from tests.backup.conftest import root_of

    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    target = FileTarget(tmp_path / "t", "FR")
    root = root_of(settings.data_dir)
    now = time.time_ns() // 1_000_000
    first = create_backup(settings.data_dir, target, root, retain_days=30, clock=lambda: now - 86_400_000)
    con = sqlite3.connect(settings.database_path)
    con.execute("INSERT INTO meta (name, value) VALUES ('filler', x'01')")
    con.commit()
    instance = con.execute("SELECT value FROM meta WHERE name='instance-id'").fetchone()[0].decode()
    con.close()
    second = create_backup(settings.data_dir, target, root, retain_days=30)
    res = prune(target, root, instance, RetentionSettings(0, 0, 0, grace_seconds=0))
    assert res.deleted_manifests == [] and any("retention" in n for n in res.notes)
    assert [m.backup_id for m in list_backups(target).manifests] == [first.backup_id, second.backup_id]
