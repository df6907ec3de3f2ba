"""Opening targets by name or URL, with their declared location."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fhirvault.backup.file_target import FileTarget
from fhirvault.backup.settings import parse_backup_settings
from fhirvault.backup.targets import open_target, resolve
from fhirvault.config import SettingsError


def test_file_url_needs_a_declared_eea_location(tmp_path: Path) -> None:
    url = (tmp_path / "t").as_uri()
    with pytest.raises(SettingsError, match="no declared location"):
        open_target(url, None)
    with pytest.raises(SettingsError, match="outside the EEA"):
        open_target(url, None, location="US")
    assert open_target(url, None, location="US", allow_outside_eea=True).location == "US"
    t = open_target(url, None, location="fr")
    assert isinstance(t, FileTarget) and t.location == "FR"


def test_configured_target_by_name_url_or_default(tmp_path: Path) -> None:
    url = (tmp_path / "t").as_uri()
    cfg = parse_backup_settings(tomllib.loads(f'[targets.local]\nurl = "{url}"\nlocation = "BE"\n'), "x")
    assert open_target("local", cfg).location == "BE"
    assert open_target(url, cfg).location == "BE"
    assert open_target("", cfg).location == "BE"
    with pytest.raises(SettingsError, match="contradicts"):
        resolve("local", cfg, location="FR")
    with pytest.raises(SettingsError, match="unknown backup target"):
        open_target("elsewhere", cfg)


def test_s3_credentials_come_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_backup_settings(tomllib.loads(
        '[targets.off]\nurl = "s3://bucket/p"\nlocation = "FR"\naccess_key_id_env = "MY_KEY_ID"\n'
        f'secret_access_key_file = "{tmp_path / "secret"}"\n'), "x")
    monkeypatch.delenv("MY_KEY_ID", raising=False)
    with pytest.raises(SettingsError, match="MY_KEY_ID"):
        open_target("off", cfg)
