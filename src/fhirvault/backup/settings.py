"""The ``[backup]`` section of the TOML configuration.

Example::

    [backup]
    default_target = "offsite"
    interval = "1h"          # scheduled backups (inside the server)
    jitter = "5m"
    drill_interval = "7d"    # the drill, inside the server
    # drill_scratch_url = "postgresql://drill@db2:5432/postgres"  # PostgreSQL: where the drill's scratch
    #                          database is created (default: the deployment's server; the role needs CREATEDB)

    [backup.retention]
    keep_all_days = 7         # every backup (and every replicated change) for 7 days
    daily_days = 35           # then the newest backup of each day for 35 days
    monthly_months = 12       # then the newest backup of each month for 12 months
    grace = "1h"              # unreferenced chunks are deleted only after this long

    [backup.targets.local]
    url = "file:///srv/fhirvault-backups"
    location = "FR"

    [backup.targets.offsite]
    url = "s3://bucket/prefix"
    endpoint = "https://s3.example.eu"
    region = "eu-west-3"
    location = "FR"
    access_key_id_env = "S3_ACCESS_KEY_ID"
    secret_access_key_file = "/etc/fhirvault/s3-secret"
    object_lock_days = 35

Every target must declare ``location`` (ISO 3166-1 alpha-2 country where the
bytes are stored); one outside the EEA needs ``allow_outside_eea = true``.
Credentials are never written in the file itself: only the name of an
environment variable or of a file that holds them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhirvault.backup.target import EEA_COUNTRIES
from fhirvault.config import SettingsError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


@dataclass(frozen=True, slots=True)
class TargetSettings:
    name: str
    url: str  # file:///… or s3://bucket/prefix
    location: str  # ISO 3166-1 alpha-2, upper case
    allow_outside_eea: bool = False
    endpoint: str | None = None
    region: str | None = None
    access_key_id_env: str | None = None
    access_key_id_file: Path | None = None
    secret_access_key_env: str | None = None
    secret_access_key_file: Path | None = None
    object_lock_days: int = 0


@dataclass(frozen=True, slots=True)
class ScheduleSettings:
    interval_seconds: int = 0  # 0: no scheduled backups
    jitter_seconds: int = 0
    max_age_seconds: int = 0  # alert when the last success is older (0: twice the interval)


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    keep_all_days: int = 7
    daily_days: int = 35
    monthly_months: int = 12
    grace_seconds: int = 3600


@dataclass(frozen=True, slots=True)
class BackupSettings:
    targets: Mapping[str, TargetSettings] = field(default_factory=dict)
    default_target: str | None = None
    schedule: ScheduleSettings = ScheduleSettings()
    retention: RetentionSettings = RetentionSettings()
    replicate_to: str | None = None  # a target name: ship committed changes there continuously
    drill_interval_seconds: int = 0  # run `dr drill` against the default target this often (0: never)
    # PostgreSQL: the server on which the drill creates its scratch database (default: the deployment's own);
    # may hold a password, so never printed.
    drill_scratch_url: str | None = field(default=None, repr=False)


def check_location(name: str, location: Any, allow_outside_eea: bool) -> str:
    """Validate a declared location; refuse one outside the EEA unless explicitly allowed."""
    if not isinstance(location, str) or not re.fullmatch(r"[A-Za-z]{2}", location):
        raise SettingsError(f"{name}: 'location' must be declared as an ISO 3166-1 alpha-2 country code, e.g. \"FR\"")
    code = location.upper()
    if code not in EEA_COUNTRIES and not allow_outside_eea:
        raise SettingsError(f"{name}: location {code} is outside the EEA; set allow_outside_eea = true to accept it")
    return code


def duration_seconds(name: str, raw: Any) -> int:
    """``3600``, ``"90s"``, ``"15m"``, ``"1h"`` or ``"7d"``."""
    if isinstance(raw, bool):
        raise SettingsError(f"{name}: expected a duration such as \"1h\"")
    if isinstance(raw, int):
        if raw < 0:
            raise SettingsError(f"{name}: must not be negative")
        return raw
    match = _DURATION.match(raw) if isinstance(raw, str) else None
    if match is None:
        raise SettingsError(f"{name}: expected a duration such as \"90s\", \"15m\", \"1h\" or \"7d\"")
    return int(match.group(1)) * _UNITS[match.group(2)]


def _int(name: str, raw: Any, lo: int, hi: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not lo <= raw <= hi:
        raise SettingsError(f"{name}: expected an integer between {lo} and {hi}")
    return raw


def _str(name: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise SettingsError(f"{name}: expected a non-empty string")
    return raw


def _table(name: str, raw: Any) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise SettingsError(f"{name}: expected a table")
    return raw


def _unknown(name: str, table: Mapping[str, Any], known: set[str]) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise SettingsError(f"{name}: unknown key '{extra[0]}'")


def _target(name: str, raw: Any, prefix: str) -> TargetSettings:
    where = f"{prefix}.targets.{name}"
    if not _NAME.match(name):
        raise SettingsError(f"{where}: target names use letters, digits, '-' and '_'")
    t = _table(where, raw)
    fields = {"url", "location", "allow_outside_eea", "endpoint", "region", "access_key_id_env",
              "access_key_id_file", "secret_access_key_env", "secret_access_key_file", "object_lock_days"}
    _unknown(where, t, fields)
    url = _str(f"{where}.url", t.get("url"))
    if not url.startswith(("file:///", "s3://")):
        raise SettingsError(f"{where}.url: expected file:///absolute/path or s3://bucket/prefix")
    allow = t.get("allow_outside_eea", False)
    if not isinstance(allow, bool):
        raise SettingsError(f"{where}.allow_outside_eea: expected true or false")
    location = check_location(where, t.get("location"), allow)
    endpoint = t.get("endpoint")
    if endpoint is not None and not _str(f"{where}.endpoint", endpoint).startswith(("http://", "https://")):
        raise SettingsError(f"{where}.endpoint: must start with http:// or https://")
    for secret_key in ("access_key_id", "secret_access_key"):
        if f"{secret_key}_env" in t and f"{secret_key}_file" in t:
            raise SettingsError(f"{where}: give {secret_key}_env or {secret_key}_file, not both")
    for env_key in ("access_key_id_env", "secret_access_key_env"):
        if str(t.get(env_key, "")).startswith("FHIRVAULT_"):
            raise SettingsError(f"{where}.{env_key}: FHIRVAULT_* variables are reserved for settings; use another name")
    if any(k in t for k in ("secret_access_key", "access_key_id")):
        raise SettingsError(f"{where}: credentials must not be written in the config file")

    def opt_path(key: str) -> Path | None:
        return Path(_str(f"{where}.{key}", t[key])).expanduser() if key in t else None

    def opt_str(key: str) -> str | None:
        return _str(f"{where}.{key}", t[key]) if key in t else None

    return TargetSettings(
        name=name, url=url, location=location, allow_outside_eea=allow,
        endpoint=endpoint, region=opt_str("region"),
        access_key_id_env=opt_str("access_key_id_env"), access_key_id_file=opt_path("access_key_id_file"),
        secret_access_key_env=opt_str("secret_access_key_env"),
        secret_access_key_file=opt_path("secret_access_key_file"),
        object_lock_days=_int(f"{where}.object_lock_days", t.get("object_lock_days", 0), 0, 36500),
    )


def parse_backup_settings(raw: Mapping[str, Any], origin: str) -> BackupSettings:
    """Validate a ``[backup]`` table; errors name the key and ``origin`` (e.g. the config file)."""
    try:
        return _parse(raw)
    except SettingsError as exc:
        raise SettingsError(f"{exc} (from {origin})") from None


def _parse(raw: Mapping[str, Any]) -> BackupSettings:
    top = _table("backup", raw)
    _unknown("backup", top, {"targets", "default_target", "interval", "jitter", "max_age", "retention",
                             "replicate_to", "drill_interval", "drill_scratch_url"})
    targets = {n: _target(n, t, "backup") for n, t in _table("backup.targets", top.get("targets", {})).items()}
    default = top.get("default_target")
    if default is not None and default not in targets:
        raise SettingsError(f"backup.default_target: no target named '{default}'")
    if default is None and len(targets) == 1:
        default = next(iter(targets))
    schedule = ScheduleSettings(
        interval_seconds=duration_seconds("backup.interval", top.get("interval", 0)),
        jitter_seconds=duration_seconds("backup.jitter", top.get("jitter", 0)),
        max_age_seconds=duration_seconds("backup.max_age", top.get("max_age", 0)),
    )
    if schedule.interval_seconds and schedule.interval_seconds < 60:
        raise SettingsError("backup.interval: at least 60 seconds (continuous replication covers shorter gaps)")
    if schedule.jitter_seconds > schedule.interval_seconds:
        raise SettingsError("backup.jitter: must not exceed backup.interval")
    ret = _table("backup.retention", top.get("retention", {}))
    _unknown("backup.retention", ret, {"keep_all_days", "daily_days", "monthly_months", "grace"})
    retention = RetentionSettings(
        keep_all_days=_int("backup.retention.keep_all_days", ret.get("keep_all_days", 7), 0, 3650),
        daily_days=_int("backup.retention.daily_days", ret.get("daily_days", 35), 0, 3650),
        monthly_months=_int("backup.retention.monthly_months", ret.get("monthly_months", 12), 0, 1200),
        grace_seconds=duration_seconds("backup.retention.grace", ret.get("grace", 3600)),
    )
    replicate_to = top.get("replicate_to")
    if replicate_to is not None and replicate_to not in targets:
        raise SettingsError(f"backup.replicate_to: no target named '{replicate_to}'")
    drill = duration_seconds("backup.drill_interval", top.get("drill_interval", 0))
    if drill and drill < 3600:
        raise SettingsError("backup.drill_interval: at least 1h (a drill restores and starts a whole server)")
    scratch = top.get("drill_scratch_url")
    if scratch is not None and (not isinstance(scratch, str) or not scratch.startswith(("postgresql://", "postgres://"))):
        raise SettingsError("backup.drill_scratch_url: expected a postgresql://user@host:port/database URL")
    return BackupSettings(targets, default, schedule, retention, replicate_to, drill, scratch)
