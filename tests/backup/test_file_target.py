"""FileTarget: a directory as an object store."""

from __future__ import annotations

import os
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
