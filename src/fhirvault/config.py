"""Settings, read once into a frozen typed object.

Precedence (highest first): command-line options, ``FHIRVAULT_*`` environment
variables, the TOML config file (``--config``, ``FHIRVAULT_CONFIG`` or
``DATA_DIR/fhirvault.toml``), built-in defaults. Unknown keys and invalid values
fail fast with a message naming the setting and where it came from. Secrets are
never part of the settings: they live in the data directory's key material.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fhirvault.backup.settings import BackupSettings
    from fhirvault.domain.retention import RetentionRules
    from fhirvault.services.alert_settings import AlertSettings
    from fhirvault.services.federation_settings import IdentityProviderSettings
    from fhirvault.services.firewall_settings import FirewallSettings
    from fhirvault.services.patient_notify import PatientNotifySettings
    from fhirvault.services.registers import ActorSettings, ProcessingSettings
    from fhirvault.services.relationships import RelationshipSettings
    from fhirvault.services.residency import ResidencySettings
    from fhirvault.services.subscription_settings import SubscriptionSettings

ENV_PREFIX = "FHIRVAULT_"
CONFIG_FILE_NAME = "fhirvault.toml"


class SettingsError(ValueError):
    """A setting is unknown or invalid; the message says which and where from."""


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: Path | None = None
    tls_key: Path | None = None
    root_key_file: Path | None = None  # default: DATA_DIR/root.key
    public_base_url: str | None = None  # e.g. https://fhir.example.org (no trailing /fhir)
    max_body_bytes: int = 16 * 1024 * 1024
    validation: str = "strict"  # strict | lenient (lenient accepts unknown elements)
    token_ttl_seconds: int = 300
    default_page_size: int = 50
    max_page_size: int = 1000
    max_bundle_entries: int = 5000
    log_level: str = "info"
    tenant: str = "default"
    # The database: None keeps the embedded SQLite files in the data directory; postgresql://… selects
    # PostgreSQL. Never printed: the URL may carry a password (repr=False, and errors do not echo it).
    database_url: str | None = dataclasses.field(default=None, repr=False)
    # Server worker processes: default the core count on PostgreSQL; SQLite has one writer, so one.
    workers: int | None = None
    # Audit log: signed checkpoints, their witnesses (file:///…, syslog+udp://…, syslog+tcp://…;
    # default: DATA_DIR/audit-witness.log — move it to another volume), full re-verification.
    audit_checkpoint_seconds: int = 10
    audit_witness_seconds: int = 60
    audit_witnesses: tuple[str, ...] | None = None
    audit_verify_hours: int = 6
    # Patients' access-history view names the individual professional only if the policy says so.
    access_history_show_names: bool = False
    # Store source IPs in the audit trail as keyed hashes (GDPR data minimisation) instead of in clear.
    audit_hash_source_ips: bool = False
    # User logins: sessions end after this idle time or this absolute time; a login expires unused.
    session_idle_minutes: int = 15
    session_max_hours: int = 12
    refresh_token_days: int = 30
    break_glass_hours: int = 4
    # Bulk Data $export: outputs are deleted this long after the export finished; output links
    # expire after bulk_link_minutes (the status URL gives fresh ones); exports run on bulk_threads.
    bulk_retention_hours: int = 24
    bulk_link_minutes: int = 60
    bulk_threads: int = 2
    # Reverse proxies whose Forwarded / X-Forwarded-* headers are believed (CIDRs; none by default:
    # the headers are then ignored). Host names this server answers to when public_base_url is unset
    # (None: loopback names and the bind address; ("*",): any, which reflects Host into links).
    trusted_proxies: tuple[str, ...] = ()  # normalised CIDRs
    allowed_hosts: tuple[str, ...] | None = None
    # default | production: production issues no clinical scopes at bootstrap, requires an owner and a
    # purpose for every backend client with clinical scopes, and a declared country for every destination.
    mode: str = "default"
    country: str | None = None  # ISO 3166-1 alpha-2: where this instance and its data directory are
    # Tables of the config file, parsed by their own modules (see SECTIONS).
    alerts: AlertSettings | None = None
    backup: BackupSettings | None = None
    identity_providers: tuple[IdentityProviderSettings, ...] = ()  # [[identity_providers]]: OIDC federation
    access: RelationshipSettings | None = None  # [access]: which care relationships open a patient's record
    firewall: FirewallSettings | None = None  # [firewall]: rate limits, source allow-lists (None: defaults)
    residency: ResidencySettings | None = None  # [residency]: destinations' countries, outbound allow-list
    actors: tuple[ActorSettings, ...] = ()  # [[actors]]: processors and subcontractors (GDPR art. 28)
    processing: ProcessingSettings | None = None  # [processing]: controller, purposes (record of processing)
    patient_notifications: PatientNotifySettings | None = None  # [patient_notifications]: break-glass notices
    retention: RetentionRules | None = None  # [retention]: record and audit retention, the retention job
    subscriptions: SubscriptionSettings | None = None  # [subscriptions]: rest-hook delivery (None: defaults)
    config_path: Path | None = None  # the config file these settings were read from, if any

    @property
    def root_key_path(self) -> Path:
        return self.root_key_file or self.data_dir / "root.key"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "fhirvault.sqlite3"

    @property
    def audit_database_path(self) -> Path:
        return self.data_dir / "audit.sqlite3"

    @property
    def audit_witness_specs(self) -> tuple[str, ...]:
        if self.audit_witnesses is not None:
            return self.audit_witnesses
        return ("file://" + str(self.data_dir / "audit-witness.log"),)


def _positive_int(lo: int, hi: int) -> Callable[[str, Any], int]:
    def parse(name: str, raw: Any) -> int:
        if isinstance(raw, bool):
            raise SettingsError(f"{name}: expected an integer")
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{name}: expected an integer") from None
        if not lo <= value <= hi:
            raise SettingsError(f"{name}: must be between {lo} and {hi}")
        return value

    return parse


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def parse(name: str, raw: Any) -> str:
        value = str(raw).lower()
        if value not in choices:
            raise SettingsError(f"{name}: must be one of {', '.join(choices)}")
        return value

    return parse


def _path(name: str, raw: Any) -> Path:
    if not isinstance(raw, (str, Path)) or not str(raw):
        raise SettingsError(f"{name}: expected a path")
    return Path(raw).expanduser().absolute()


def _text(name: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise SettingsError(f"{name}: expected a non-empty string")
    return raw


def _base_url(name: str, raw: Any) -> str:
    value = _text(name, raw).rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise SettingsError(f"{name}: must start with http:// or https://")
    return value


def _bool(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}: expected true or false")


def _witnesses(name: str, raw: Any) -> tuple[str, ...]:
    items = [p.strip() for p in raw.split(",")] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise SettingsError(f"{name}: expected a list of witness URLs")
    for item in items:
        if item and not item.startswith(("file:///", "syslog+udp://", "syslog+tcp://", "syslog+tls://")):
            raise SettingsError(f"{name}: '{item}' is not file:///…, syslog+udp://…, syslog+tcp://… or syslog+tls://…")
    return tuple(i for i in items if i)


def _networks(name: str, raw: Any) -> tuple[str, ...]:
    # Imported here: that module imports SettingsError from this one.
    from fhirvault.services.firewall_settings import parse_networks

    return tuple(str(n) for n in parse_networks(name, raw))


def _hosts(name: str, raw: Any) -> tuple[str, ...]:
    items = [p for p in raw.replace(",", " ").split() if p] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) and i for i in items):
        raise SettingsError(f"{name}: expected a list of host names")
    hosts = tuple(i.strip().lower().rstrip(".") for i in items)
    for host in hosts:
        if host != "*" and not _HOST_NAME.match(host):
            raise SettingsError(f"{name}: '{host}' is not a host name or address (no port, no scheme)")
    return hosts


_HOST_NAME = re.compile(r"^(\*\.)?[a-z0-9.\-]{1,253}$|^\[[0-9a-f:.]{2,45}\]$")


def _database_url(name: str, raw: Any) -> str:
    # The value is never put in a message: it may contain a password.
    if not isinstance(raw, str) or not raw.startswith(("postgresql://", "postgres://")):
        raise SettingsError(f"{name}: expected a postgresql://user@host:port/database URL")
    # libpq's own parser: several hosts (postgresql://h1:5432,h2:5432/db?target_session_attrs=
    # read-write) are one URL, which libpq tries in turn.
    from psycopg import Error as PsycopgError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(raw)
    except PsycopgError:
        raise SettingsError(f"{name}: not a valid postgresql:// URL") from None
    if not params.get("host") and not params.get("hostaddr"):
        raise SettingsError(f"{name}: the URL names no host")
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise SettingsError(f"{name}: not a valid postgresql:// URL (port)")
    return raw


def _country(name: str, raw: Any) -> str:
    if not isinstance(raw, str) or not re.fullmatch(r"[A-Za-z]{2}", raw):
        raise SettingsError(f"{name}: expected an ISO 3166-1 alpha-2 country code, e.g. \"FR\"")
    return raw.upper()


def _tenant(name: str, raw: Any) -> str:
    value = _text(name, raw)
    if not value.replace("-", "").isalnum() or len(value) > 64:
        raise SettingsError(f"{name}: letters, digits and '-' only, at most 64")
    return value


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "data_dir": _path,
    "host": _text,
    "port": _positive_int(0, 65535),
    "tls_cert": _path,
    "tls_key": _path,
    "root_key_file": _path,
    "public_base_url": _base_url,
    "max_body_bytes": _positive_int(1024, 1024 * 1024 * 1024),
    "validation": _choice("strict", "lenient"),
    "token_ttl_seconds": _positive_int(30, 3600),
    "default_page_size": _positive_int(1, 1000),
    "max_page_size": _positive_int(1, 10000),
    "max_bundle_entries": _positive_int(1, 100_000),
    "log_level": _choice("debug", "info", "warning", "error"),
    "tenant": _tenant,
    "database_url": _database_url,
    "workers": _positive_int(1, 256),
    "audit_checkpoint_seconds": _positive_int(1, 3600),
    "audit_witness_seconds": _positive_int(1, 86400),
    "audit_witnesses": _witnesses,
    "audit_verify_hours": _positive_int(1, 24 * 30),
    "access_history_show_names": _bool,
    "audit_hash_source_ips": _bool,
    "session_idle_minutes": _positive_int(1, 24 * 60),
    "session_max_hours": _positive_int(1, 24 * 7),
    "refresh_token_days": _positive_int(1, 365),
    "break_glass_hours": _positive_int(1, 72),
    "bulk_retention_hours": _positive_int(1, 24 * 30),
    "bulk_link_minutes": _positive_int(1, 24 * 60),
    "bulk_threads": _positive_int(1, 16),
    "trusted_proxies": _networks,
    "allowed_hosts": _hosts,
    "mode": _choice("default", "production"),
    "country": _country,
}
# Nested ``[table]`` settings, only from the config file: name -> parser(raw, origin, data_dir, environ).
SECTIONS = ("alerts", "backup", "identity_providers", "access", "firewall", "residency", "actors", "processing",
            "patient_notifications", "retention",
            "subscriptions")


def _parse_section(name: str, raw: Any, origin: str, data_dir: Path,
                   environ: Mapping[str, str]) -> Any:
    # Imported here: those modules import SettingsError from this one.
    if name == "alerts":
        from fhirvault.services.alert_settings import parse_alert_settings

        return parse_alert_settings(raw, origin, data_dir, environ)
    if name == "backup":
        from fhirvault.backup.settings import parse_backup_settings

        return parse_backup_settings(raw, origin) if raw else None
    if name == "identity_providers":
        from fhirvault.services.federation_settings import parse_identity_providers

        return parse_identity_providers(raw, origin, environ) if raw else ()
    if name == "access":
        from fhirvault.services.relationships import parse_access_settings

        return parse_access_settings(raw, origin) if raw else None
    if name == "firewall":
        from fhirvault.services.firewall_settings import parse_firewall_settings

        return parse_firewall_settings(raw, origin) if raw else None
    if name == "retention":
        from fhirvault.services.retention import parse_retention_settings

        return parse_retention_settings(raw, origin) if raw else None
    if name == "subscriptions":
        from fhirvault.services.subscription_settings import parse_subscription_settings

        return parse_subscription_settings(raw, origin) if raw else None
    return _parse_compliance_section(name, raw, origin, environ)


def _parse_compliance_section(name: str, raw: Any, origin: str, environ: Mapping[str, str]) -> Any:
    if name == "residency":
        from fhirvault.services.residency import parse_residency_settings

        return parse_residency_settings(raw, origin) if raw else None
    if name == "actors":
        from fhirvault.services.registers import parse_actors

        return parse_actors(raw, origin)
    if name == "processing":
        from fhirvault.services.registers import parse_processing

        return parse_processing(raw, origin) if raw else None
    if name == "patient_notifications":
        from fhirvault.services.patient_notify import parse_patient_notify

        return parse_patient_notify(raw, origin, environ) if raw else None
    raise AssertionError(name)


NOT_PARSED = (*SECTIONS, "config_path")
assert set(_PARSERS) == {f.name for f in dataclasses.fields(Settings)} - set(NOT_PARSED)


def _from_env(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in _PARSERS:
            raise SettingsError(f"unknown setting in environment: {key}")
        found[name] = (value, f"environment variable {key}")
    return found


def _from_file(path: Path) -> tuple[dict[str, tuple[Any, str]], dict[str, Any]]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    found: dict[str, tuple[Any, str]] = {}
    sections: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in SECTIONS:
            sections[name] = value
            continue
        if name not in _PARSERS:
            raise SettingsError(f"unknown setting '{key}' in config file {path}")
        found[name] = (value, f"config file {path}")
    return found, sections


def load_settings(
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Merge the sources and validate every value once."""
    environ = os.environ if environ is None else environ
    cli_values = {k: (v, f"option --{k.replace('_', '-')}") for k, v in (cli or {}).items() if v is not None}
    for name in cli_values:
        if name not in _PARSERS:
            raise SettingsError(f"unknown setting {name}")
    env_values = _from_env(environ)

    file_path = config_file or (Path(environ[ENV_PREFIX + "CONFIG"]) if ENV_PREFIX + "CONFIG" in environ else None)
    if file_path is None:
        data_dir_raw = cli_values.get("data_dir") or env_values.get("data_dir")
        if data_dir_raw is not None:
            candidate = Path(str(data_dir_raw[0])).expanduser() / CONFIG_FILE_NAME
            file_path = candidate if candidate.is_file() else None
    file_values, sections = _from_file(file_path) if file_path is not None else ({}, {})

    merged: dict[str, Any] = {}
    for name, parse in _PARSERS.items():
        for source in (cli_values, env_values, file_values):
            if name in source:
                raw, origin = source[name]
                try:
                    merged[name] = parse(name, raw)
                except SettingsError as exc:
                    raise SettingsError(f"{exc} (from {origin})") from None
                break
    if "data_dir" not in merged:
        raise SettingsError("data_dir is required: pass --data-dir or set FHIRVAULT_DATA_DIR")
    if ("tls_cert" in merged) != ("tls_key" in merged):
        raise SettingsError("tls_cert and tls_key must be given together")
    for name in SECTIONS:
        merged[name] = _parse_section(name, sections.get(name, {}), f"config file {file_path}",
                                      merged["data_dir"], environ)
    settings = Settings(**merged, config_path=file_path)
    if settings.database_url is not None and settings.workers != 1 and settings.backup is not None \
            and settings.backup.replicate_to:
        # The change feed reads resource_versions above a watermark: it needs seqs committed in seq order,
        # which one writer per database guarantees and several processes do not (docs/postgresql-backup.md).
        raise SettingsError("backup.replicate_to (continuous replication) on PostgreSQL needs workers = 1 (the"
                            " default is one per core): with several workers a version can commit after a later"
                            " one and be skipped; use"
                            " scheduled backups, or PostgreSQL WAL archiving for point-in-time recovery"
                            " (see docs/postgresql-backup.md)")
    if settings.default_page_size > settings.max_page_size:
        raise SettingsError("default_page_size must not exceed max_page_size")
    from fhirvault.services.residency import (
        check_residency,  # imports SettingsError from this module
    )

    for warning in check_residency(settings):
        logging.getLogger("fhirvault.config").warning("residency: %s", warning)
    return settings
