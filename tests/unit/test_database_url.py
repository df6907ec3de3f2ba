"""The database_url setting: SQLite by default, postgresql://… selects PostgreSQL, never printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhirvault.adapters.postgres_store import PostgresStore
from fhirvault.adapters.sqlite_store import SqliteStore
from fhirvault.config import SettingsError, load_settings
from fhirvault.container import open_store

SECRET_URL = "postgresql://app:S3cr3t-pw@db.example:5432/fhirvault"


def test_default_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path}, environ={})
    assert settings.database_url is None
    store = open_store(settings)
    try:
        assert isinstance(store, SqliteStore) and store.path == tmp_path / "fhirvault.sqlite3"
    finally:
        store.close()


def test_postgresql_url_from_environment_and_never_in_repr(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path}, environ={"FHIRVAULT_DATABASE_URL": SECRET_URL})
    assert settings.database_url == SECRET_URL
    assert "S3cr3t" not in repr(settings) and "S3cr3t" not in str(settings)


@pytest.mark.parametrize("bad", ["mysql://u:S3cr3t-pw@h/db", "S3cr3t-pw", "postgresql://u:S3cr3t-pw@h:99999999/db",
                                 "postgresql://"])
def test_bad_urls_are_refused_without_echoing_them(tmp_path: Path, bad: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"data_dir": tmp_path}, environ={"FHIRVAULT_DATABASE_URL": bad})
    assert "database_url" in str(caught.value) and "S3cr3t" not in str(caught.value)


def test_open_store_selects_postgresql(tmp_path: Path, pg_url: str) -> None:
    store = open_store(load_settings({"data_dir": tmp_path, "database_url": pg_url}, environ={}))
    try:
        assert isinstance(store, PostgresStore)
        store.write_sync("m", lambda tx: tx.set_meta("x", b"1"))
        assert store.get_meta("x") == b"1"
        assert not list(tmp_path.iterdir())  # nothing written to the data directory
    finally:
        store.close()


def test_backup_settings_are_accepted_with_postgresql(tmp_path: Path) -> None:
    (tmp_path / "fhirvault.toml").write_text('[backup.targets.local]\nurl = "file:///backups"\nlocation = "FR"\n')
    settings = load_settings({"data_dir": tmp_path}, environ={"FHIRVAULT_DATABASE_URL": SECRET_URL})
    assert settings.backup is not None and settings.database_url == SECRET_URL


def test_replication_is_refused_with_several_postgresql_workers(tmp_path: Path) -> None:
    (tmp_path / "fhirvault.toml").write_text('[backup]\nreplicate_to = "local"\n'
                                             '[backup.targets.local]\nurl = "file:///backups"\nlocation = "FR"\n')
    env = {"FHIRVAULT_DATABASE_URL": SECRET_URL}
    assert load_settings({"data_dir": tmp_path, "workers": 1}, environ=env).backup is not None  # one writer: works
    for workers in (2, None):  # None: one per core on PostgreSQL
        with pytest.raises(SettingsError, match=r"replicate_to.*workers = 1") as err:
            load_settings({"data_dir": tmp_path, "workers": workers}, environ=env)
        assert SECRET_URL not in str(err.value)
