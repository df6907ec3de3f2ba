"""The [backup] configuration section."""

from __future__ import annotations

import tomllib

import pytest

from fhirvault.backup.settings import parse_backup_settings
from fhirvault.config import SettingsError

GOOD = """
[backup]
interval = "1h"
jitter = "5m"
[backup.retention]
keep_all_days = 7
daily_days = 35
monthly_months = 12
grace = "2h"
[backup.targets.local]
url = "file:///srv/backups"
location = "fr"
[backup.targets.offsite]
url = "s3://bucket/prefix"
endpoint = "https://s3.example.eu"
region = "eu-west-3"
location = "DE"
access_key_id_env = "S3_KEY"
secret_access_key_file = "/etc/fhirvault/s3-secret"
object_lock_days = 35
"""


def _parse(text: str) -> object:
    return parse_backup_settings(tomllib.loads(text).get("backup", {}), "test.toml")


def test_a_full_section_parses() -> None:
    s = parse_backup_settings(tomllib.loads(GOOD)["backup"], "test.toml")
    assert s.schedule.interval_seconds == 3600 and s.schedule.jitter_seconds == 300
    assert s.retention.grace_seconds == 7200 and s.retention.daily_days == 35
    assert s.targets["local"].location == "FR"
    off = s.targets["offsite"]
    assert off.object_lock_days == 35 and off.access_key_id_env == "S3_KEY" and off.region == "eu-west-3"
    assert s.default_target is None  # two targets, none chosen


@pytest.mark.parametrize(("text", "message"), [
    ('[backup.targets.x]\nurl = "file:///a"\n', "location' must be declared"),
    ('[backup.targets.x]\nurl = "file:///a"\nlocation = "US"\n', "outside the EEA"),
    ('[backup.targets.x]\nurl = "ftp://a"\nlocation = "FR"\n', "expected file:///"),
    ('[backup.targets.x]\nurl = "s3://b"\nlocation = "FR"\nsecret_access_key = "s"\n', "unknown key|must not be written"),
    ('[backup.targets.x]\nurl = "s3://b"\nlocation = "FR"\nobject_lock_days = -1\n', "object_lock_days"),
    ('[backup.targets.x]\nurl = "s3://b"\nlocation = "FR"\naccess_key_id_env = "FHIRVAULT_K"\n', "reserved"),
    ('[backup]\ninterval = "10s"\n', "at least 60 seconds"),
    ('[backup]\ninterval = "1h"\njitter = "2h"\n', "must not exceed"),
    ('[backup]\ninterval = "soon"\n', "expected a duration"),
    ('[backup]\nfrequency = 1\n', "unknown key 'frequency'"),
    ('[backup]\ndefault_target = "nope"\n', "no target named"),
    ('[backup]\ndrill_scratch_url = "mysql://x"\n', "drill_scratch_url: expected a postgresql://"),
])
def test_bad_input_is_refused_with_the_key_and_origin(text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as info:
        _parse(text)
    assert "test.toml" in str(info.value)


def test_outside_eea_needs_an_explicit_override() -> None:
    s = _parse('[backup.targets.x]\nurl = "file:///a"\nlocation = "CH"\nallow_outside_eea = true\n')
    assert s.targets["x"].location == "CH"  # type: ignore[attr-defined]
    assert s.default_target == "x"  # type: ignore[attr-defined]


def test_the_drill_scratch_url_is_kept_out_of_reprs() -> None:
    s = _parse('[backup]\ndrill_scratch_url = "postgresql://drill:S3cret@db2/postgres"\n')
    assert s.drill_scratch_url == "postgresql://drill:S3cret@db2/postgres"  # type: ignore[attr-defined]
    assert "S3cret" not in repr(s)
