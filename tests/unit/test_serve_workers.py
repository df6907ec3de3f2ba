"""The ``workers`` setting: how many server processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fhirvault.cli.serve import worker_count
from fhirvault.config import SettingsError, load_settings

PG = "postgresql://app@db.internal:5432/fhirvault"


def test_sqlite_serves_with_one_worker_unless_told_otherwise(tmp_path: Path) -> None:
    assert worker_count(load_settings({"data_dir": tmp_path}, environ={})) == 1
    assert worker_count(load_settings({"data_dir": tmp_path, "workers": 1}, environ={})) == 1
    assert worker_count(load_settings({"data_dir": tmp_path}, environ={"FHIRVAULT_WORKERS": "2"})) == 2


def test_postgresql_defaults_to_the_cores_this_process_may_use(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path}, environ={"FHIRVAULT_DATABASE_URL": PG})
    assert worker_count(settings) == len(os.sched_getaffinity(0))
    explicit = load_settings({"data_dir": tmp_path, "workers": 3}, environ={"FHIRVAULT_DATABASE_URL": PG})
    assert worker_count(explicit) == 3


@pytest.mark.parametrize("value", ["0", "-1", "two", "257"])
def test_bad_worker_counts_are_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(SettingsError, match="workers"):
        load_settings({"data_dir": tmp_path}, environ={"FHIRVAULT_WORKERS": value, "FHIRVAULT_DATABASE_URL": PG})
