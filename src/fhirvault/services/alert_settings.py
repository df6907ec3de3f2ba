"""Detection rules, thresholds and alert sinks, parsed from the ``[alerts]`` TOML section.

Every rule is on by default and one JSON-lines sink (``DATA_DIR/alerts.jsonl``)
is configured, so alerts are visible out of the box. Secrets (webhook HMAC
key, SMTP password) are never accepted inline: the config file is often
world-readable, copied into tickets or kept in version control, so it names a
file (``secret_file``) or an environment variable (``secret_env``) instead,
and the value is read once here. Secret fields are left out of ``repr``.
"""

from __future__ import annotations

import dataclasses
import os
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fhirvault.config import SettingsError

SEVERITIES = ("info", "low", "medium", "high", "critical")
SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
SYSLOG_FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13, "console": 14,
    "local0": 16, "local1": 17, "local2": 18, "local3": 19, "local4": 20, "local5": 21,
    "local6": 22, "local7": 23,
}


@dataclass(frozen=True, slots=True)
class BruteForceRule:
    enabled: bool = True
    severity: str = "high"
    failures: int = 5  # failed logins / token requests for one account (client id or user) from one source IP
    source_failures: int = 20  # failed logins, token requests or bearer checks from one source IP
    window_seconds: int = 300
    # Refuse the account at the token/login endpoint for lock_seconds: from the failing source only,
    # and from every source once failures for it came from lock_after_sources distinct sources.
    lock_accounts: bool = True
    lock_after_sources: int = 10
    lock_seconds: int = 900
    throttle_sources: bool = True  # refuse the source IP for throttle_seconds
    throttle_seconds: int = 900


@dataclass(frozen=True, slots=True)
class MassAccessRule:
    enabled: bool = True
    severity: str = "high"
    distinct_patients: int = 200  # absolute threshold per actor and window
    window_seconds: int = 3600
    baseline_factor: float = 5.0  # alert above k x the actor's usual (EWMA) distinct patients per window
    baseline_min_windows: int = 24  # windows of history before the baseline is trusted
    baseline_min_patients: int = 20  # never alert on the baseline below this many patients
    baseline_alpha: float = 0.1  # EWMA weight of the newest window


@dataclass(frozen=True, slots=True)
class CareRelationshipRule:
    enabled: bool = True
    severity: str = "medium"
    refusals: int = 3
    window_seconds: int = 900


@dataclass(frozen=True, slots=True)
class SimpleRule:
    enabled: bool = True
    severity: str = "medium"


@dataclass(frozen=True, slots=True)
class AfterHoursRule:
    enabled: bool = True
    severity: str = "medium"
    timezone: str = "UTC"
    days: tuple[int, ...] = (0, 1, 2, 3, 4)  # working days, Monday = 0
    start_hour: int = 7  # working hours are [start_hour, end_hour) local time
    end_hour: int = 20
    large_search_results: int = 1000  # result_count at or above this is a "large search"


@dataclass(frozen=True, slots=True)
class MfaNewSourceRule:
    enabled: bool = True
    severity: str = "high"
    window_seconds: int = 3600  # after a failed second factor, watch the user's sources this long


@dataclass(frozen=True, slots=True)
class ClockSkewRule:
    enabled: bool = True
    severity: str = "high"
    max_skew_seconds: int = 60


@dataclass(frozen=True, slots=True)
class DetectionSettings:
    brute_force: BruteForceRule = BruteForceRule()
    mass_access: MassAccessRule = MassAccessRule()
    care_relationship: CareRelationshipRule = CareRelationshipRule()
    break_glass: SimpleRule = SimpleRule(severity="high")
    restricted: SimpleRule = SimpleRule(severity="medium")
    after_hours: AfterHoursRule = AfterHoursRule()
    mfa_new_source: MfaNewSourceRule = MfaNewSourceRule()
    clock_skew: ClockSkewRule = ClockSkewRule()
    # Care relationships written by users (docs/access-control.md, "Who writes relationships").
    relationship_change: SimpleRule = SimpleRule(severity="info")
    relationship_refused: SimpleRule = SimpleRule(severity="high")
    self_assignment: SimpleRule = SimpleRule(severity="high")
    max_tracked_actors: int = 10_000  # per rule: least recently seen actors are forgotten first


@dataclass(frozen=True, slots=True)
class WebhookSinkSettings:
    url: str
    secret: bytes = field(repr=False)
    format: str = "fhirvault"  # fhirvault | alertmanager (POST to Alertmanager's /api/v2/alerts)
    timeout_seconds: float = 5.0
    min_severity: str = "info"


@dataclass(frozen=True, slots=True)
class SmtpSinkSettings:
    host: str
    sender: str
    recipients: tuple[str, ...]
    port: int = 25
    starttls: bool = True  # upgrade with STARTTLS; refused (not sent in clear) if the server cannot
    implicit_tls: bool = False  # TLS from the first byte (SMTPS, port 465); starttls is then moot
    ca_file: Path | None = None  # trust these CAs instead of the system's (certificates always verified)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_seconds: float = 10.0
    min_severity: str = "high"


@dataclass(frozen=True, slots=True)
class SyslogSinkSettings:
    host: str
    port: int = 514
    transport: str = "udp"  # udp (RFC 5426) | tcp (RFC 6587 octet counting) | tls (RFC 5425, port 6514)
    ca_file: Path | None = None  # tls: trust these CAs instead of the system's (certificates always verified)
    facility: str = "auth"
    app_name: str = "fhirvault"
    timeout_seconds: float = 5.0
    min_severity: str = "info"


@dataclass(frozen=True, slots=True)
class JsonLinesSinkSettings:
    path: Path
    min_severity: str = "info"


SinkSettings = WebhookSinkSettings | SmtpSinkSettings | SyslogSinkSettings | JsonLinesSinkSettings


@dataclass(frozen=True, slots=True)
class AlertSettings:
    detection: DetectionSettings = DetectionSettings()
    sinks: tuple[SinkSettings, ...] = ()
    renotify_seconds: int = 3600  # a deduplicated alert is delivered again at most this often
    queue_size: int = 1000  # per sink; the oldest waiting alert is dropped when full
    retry_attempts: int = 8
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 60.0

    @staticmethod
    def default(data_dir: Path) -> AlertSettings:
        return AlertSettings(sinks=(JsonLinesSinkSettings(path=data_dir / "alerts.jsonl"),))


# --- parsing -----------------------------------------------------------------

Parser = Callable[[str, Any], Any]
R = TypeVar("R")


def _bool(name: str, raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise SettingsError(f"{name}: expected true or false")
    return raw


def _int(lo: int, hi: int) -> Parser:
    def parse(name: str, raw: Any) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise SettingsError(f"{name}: expected an integer")
        if not lo <= raw <= hi:
            raise SettingsError(f"{name}: must be between {lo} and {hi}")
        return raw
    return parse


def _float(lo: float, hi: float) -> Parser:
    def parse(name: str, raw: Any) -> float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise SettingsError(f"{name}: expected a number")
        if not lo <= raw <= hi:
            raise SettingsError(f"{name}: must be between {lo} and {hi}")
        return float(raw)
    return parse


def _text(name: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw or any(ord(c) < 32 for c in raw):
        raise SettingsError(f"{name}: expected a non-empty single-line string")
    return raw


def _choice(*choices: str) -> Parser:
    def parse(name: str, raw: Any) -> str:
        if raw not in choices:
            raise SettingsError(f"{name}: must be one of {', '.join(choices)}")
        return str(raw)
    return parse


def _timezone(name: str, raw: Any) -> str:
    value = _text(name, raw)
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise SettingsError(f"{name}: unknown time zone '{value}'") from None
    return value


def _days(name: str, raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, str) and d.lower() in DAY_NAMES for d in raw):
        raise SettingsError(f"{name}: expected a list of day names ({', '.join(DAY_NAMES)})")
    return tuple(sorted({DAY_NAMES.index(d.lower()) for d in raw}))


def _url(name: str, raw: Any) -> str:
    value = _text(name, raw)
    if not value.startswith(("http://", "https://")):
        raise SettingsError(f"{name}: must start with http:// or https://")
    return value


def _path(name: str, raw: Any) -> Path:
    return Path(_text(name, raw)).expanduser().absolute()


def _addresses(name: str, raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw or not all(isinstance(a, str) and "@" in a for a in raw):
        raise SettingsError(f"{name}: expected a non-empty list of e-mail addresses")
    return tuple(_text(name, a) for a in raw)


_SEVERITY = _choice(*SEVERITIES)
_WINDOW = _int(1, 7 * 24 * 3600)
_COMMON_RULE: dict[str, Parser] = {"enabled": _bool, "severity": _SEVERITY}
_RULES: dict[str, tuple[type[Any], dict[str, Parser]]] = {
    "brute_force": (BruteForceRule, {
        "failures": _int(1, 1_000_000), "source_failures": _int(1, 1_000_000), "window_seconds": _WINDOW,
        "lock_after_sources": _int(1, 1_000_000),
        "lock_accounts": _bool, "lock_seconds": _WINDOW, "throttle_sources": _bool, "throttle_seconds": _WINDOW,
    }),
    "mass_access": (MassAccessRule, {
        "distinct_patients": _int(1, 10_000_000), "window_seconds": _WINDOW,
        "baseline_factor": _float(1.0, 1000.0), "baseline_min_windows": _int(1, 100_000),
        "baseline_min_patients": _int(1, 10_000_000), "baseline_alpha": _float(0.001, 1.0),
    }),
    "care_relationship": (CareRelationshipRule, {"refusals": _int(1, 1_000_000), "window_seconds": _WINDOW}),
    "break_glass": (SimpleRule, {}),
    "restricted": (SimpleRule, {}),
    "relationship_change": (SimpleRule, {}),
    "relationship_refused": (SimpleRule, {}),
    "self_assignment": (SimpleRule, {}),
    "after_hours": (AfterHoursRule, {
        "timezone": _timezone, "days": _days, "start_hour": _int(0, 24), "end_hour": _int(0, 24),
        "large_search_results": _int(1, 100_000_000),
    }),
    "mfa_new_source": (MfaNewSourceRule, {"window_seconds": _WINDOW}),
    "clock_skew": (ClockSkewRule, {"max_skew_seconds": _int(1, 86_400)}),
}
_TOP: dict[str, Parser] = {
    "renotify_seconds": _int(0, 30 * 24 * 3600), "queue_size": _int(1, 1_000_000),
    "retry_attempts": _int(1, 1000), "retry_initial_seconds": _float(0.001, 3600.0),
    "retry_max_seconds": _float(0.001, 86_400.0), "max_tracked_actors": _int(10, 10_000_000),
}
_SINK_COMMON: dict[str, Parser] = {"type": _text, "min_severity": _SEVERITY}
_SINKS: dict[str, dict[str, Parser]] = {
    "webhook": {"url": _url, "secret_file": _path, "secret_env": _text,
                "format": _choice("fhirvault", "alertmanager"), "timeout_seconds": _float(0.1, 300.0)},
    "smtp": {"host": _text, "port": _int(1, 65535), "starttls": _bool, "implicit_tls": _bool, "ca_file": _path,
             "username": _text,
             "password_file": _path, "password_env": _text, "from": _text, "to": _addresses,
             "timeout_seconds": _float(0.1, 300.0)},
    "syslog": {"host": _text, "port": _int(1, 65535), "transport": _choice("udp", "tcp", "tls"), "ca_file": _path,
               "facility": _choice(*SYSLOG_FACILITIES), "app_name": _text, "timeout_seconds": _float(0.1, 300.0)},
    "jsonl": {"path": _path},
}


def _table(name: str, raw: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise SettingsError(f"{name}: expected a table (from {where})")
    return raw


def _parse_table(prefix: str, raw: Mapping[str, Any], parsers: Mapping[str, Parser], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}.{key}"
        parse = parsers.get(key)
        if parse is None:
            raise SettingsError(f"unknown setting '{name}' (from {where})")
        try:
            out[key.replace("-", "_")] = parse(name, value)
        except SettingsError as exc:
            raise SettingsError(f"{exc} (from {where})") from None
    return out


def _secret(name: str, values: Mapping[str, Any], file_key: str, env_key: str, where: str,
            environ: Mapping[str, str], required: bool) -> bytes | None:
    if file_key in values and env_key in values:
        raise SettingsError(f"{name}: give {file_key} or {env_key}, not both (from {where})")
    if file_key in values:
        path: Path = values[file_key]
        try:
            secret = path.read_bytes().strip()
        except OSError as exc:
            raise SettingsError(f"{name}.{file_key}: cannot read {path}: {exc.strerror} (from {where})") from None
    elif env_key in values:
        env_secret = environ.get(values[env_key])
        if env_secret is None:
            raise SettingsError(f"{name}.{env_key}: environment variable {values[env_key]} is not set (from {where})")
        secret = env_secret.strip().encode()
    elif required:
        raise SettingsError(f"{name}: {file_key} or {env_key} is required (from {where})")
    else:
        return None
    if not secret:
        raise SettingsError(f"{name}: the secret is empty (from {where})")
    return secret


def _require(name: str, values: Mapping[str, Any], *keys: str, where: str) -> None:
    for key in keys:
        if key not in values:
            raise SettingsError(f"{name}.{key} is required (from {where})")


def _sink(index: int, raw: Any, where: str, environ: Mapping[str, str]) -> SinkSettings:
    name = f"alerts.sinks[{index}]"
    table = _table(name, raw, where)
    kind = table.get("type")
    if kind not in _SINKS:
        raise SettingsError(f"{name}.type: must be one of {', '.join(_SINKS)} (from {where})")
    values = _parse_table(name, table, {**_SINK_COMMON, **_SINKS[kind]}, where)
    values.pop("type")
    if kind == "webhook":
        _require(name, values, "url", where=where)
        secret = _secret(name, values, "secret_file", "secret_env", where, environ, required=True)
        assert secret is not None
        values.pop("secret_file", None)
        values.pop("secret_env", None)
        return WebhookSinkSettings(secret=secret, **values)
    if kind == "smtp":
        _require(name, values, "host", "from", "to", where=where)
        password = _secret(name, values, "password_file", "password_env", where, environ, required=False)
        if password is not None and "username" not in values:
            raise SettingsError(f"{name}: a password needs a username (from {where})")
        if password is not None and not (values.get("starttls", True) or values.get("implicit_tls", False)):
            raise SettingsError(f"{name}: a password is only sent over TLS: set starttls or implicit_tls"
                                f" (from {where})")
        values.pop("password_file", None)
        values.pop("password_env", None)
        return SmtpSinkSettings(sender=values.pop("from"), recipients=values.pop("to"),
                                password=password.decode() if password else None, **values)
    if kind == "syslog":
        _require(name, values, "host", where=where)
        return SyslogSinkSettings(**values)
    _require(name, values, "path", where=where)
    return JsonLinesSinkSettings(**values)


def parse_alert_settings(raw: Mapping[str, Any], origin: str, data_dir: Path,
                         environ: Mapping[str, str] | None = None) -> AlertSettings:
    """The ``[alerts]`` table of a config file (``origin`` names it in errors)."""
    environ = os.environ if environ is None else environ
    default = AlertSettings.default(data_dir)
    raw = _table("alerts", raw, origin)
    unknown = set(raw) - set(_TOP) - {"rules", "sinks"}
    if unknown:
        raise SettingsError(f"unknown setting 'alerts.{sorted(unknown)[0]}' (from {origin})")
    top = _parse_table("alerts", {k: v for k, v in raw.items() if k in _TOP}, _TOP, origin)

    rules: dict[str, Any] = {}
    for rule_name, rule_raw in _table("alerts.rules", raw.get("rules", {}), origin).items():
        if rule_name not in _RULES:
            raise SettingsError(f"unknown rule 'alerts.rules.{rule_name}' (from {origin})")
        _, parsers = _RULES[rule_name]
        prefix = f"alerts.rules.{rule_name}"
        values = _parse_table(prefix, _table(prefix, rule_raw, origin), {**_COMMON_RULE, **parsers}, origin)
        rules[rule_name] = dataclasses.replace(getattr(default.detection, rule_name), **values)
    after = rules.get("after_hours")
    if after is not None and after.start_hour >= after.end_hour:
        raise SettingsError(f"alerts.rules.after_hours: start_hour must be before end_hour (from {origin})")

    detection_kwargs = dict(rules)
    if "max_tracked_actors" in top:
        detection_kwargs["max_tracked_actors"] = top.pop("max_tracked_actors")
    detection = dataclasses.replace(default.detection, **detection_kwargs)

    sinks = default.sinks
    if "sinks" in raw:
        if not isinstance(raw["sinks"], list):
            raise SettingsError(f"alerts.sinks: expected an array of tables (from {origin})")
        sinks = tuple(_sink(i, s, origin, environ) for i, s in enumerate(raw["sinks"]))
    settings = dataclasses.replace(default, detection=detection, sinks=sinks, **top)
    if settings.retry_initial_seconds > settings.retry_max_seconds:
        raise SettingsError(f"alerts.retry_initial_seconds must not exceed retry_max_seconds (from {origin})")
    return settings
