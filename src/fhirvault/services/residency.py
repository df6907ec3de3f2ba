"""Data residency: where every destination of the data is, checked when the configuration is loaded.

Every place the server writes to or connects to is a *destination*: the data directory, the database
host(s), backup and replication targets, alert sinks (webhook, SMTP, syslog), audit witnesses, identity
providers (federation), the drill's scratch database, the patient-notification channel. Each carries a
country (ISO 3166-1 alpha-2):

* the data directory and anything on this machine (loopback, a Unix socket): the instance ``country``;
* backup targets: their own ``location`` (backup/settings.py);
* any other remote host: ``[[residency.destinations]] host = "…" country = "…"``.

A destination outside the EEA is refused at load, naming the setting, unless its entry carries
``allow_non_eea = "justification"`` (the instance: ``[residency] allow_non_eea``; a backup target: its
``allow_outside_eea = true``); the accepted overrides are written to the audit trail at server start.
A remote destination without a country is refused in production mode (``mode = "production"``) and
reported as a warning otherwise (the default single-machine install has none).

The same list is the **outbound allow-list**: the hosts the server may connect to are exactly these
destinations plus ``[residency] extra_outbound``; loopback is always allowed. The server installs it
(``install_guard``); the webhook/SMTP alert sinks, OpenID Connect federation (discovery, keys, tokens:
metadata may point elsewhere) and patient notifications call ``check_outbound`` before connecting, so a
call to any other host is refused and alerted. S3 (boto3) and syslog/witness endpoints come only from
the configuration, so for them the check at load is the enforcement.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fhirvault.config import SettingsError

if TYPE_CHECKING:
    from fhirvault.config import Settings

# The European Economic Area: the EU 27 and Iceland, Liechtenstein, Norway (same list as backup/target.py).
EEA_COUNTRIES = frozenset((
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT",
    "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", "IS", "LI", "NO",
))
_COUNTRY = re.compile(r"^[A-Za-z]{2}$")
MIN_JUSTIFICATION = 10


@dataclass(frozen=True, slots=True)
class DestinationSettings:
    """One ``[[residency.destinations]]`` entry: a remote host and the country its data is in."""

    host: str
    country: str
    allow_non_eea: str | None = None  # the recorded justification for a country outside the EEA
    note: str | None = None  # e.g. the provider and contract (shown in the registers)


@dataclass(frozen=True, slots=True)
class ResidencySettings:
    destinations: tuple[DestinationSettings, ...] = ()
    extra_outbound: tuple[str, ...] = ()  # hosts allowed besides the destinations (e.g. an OCSP responder)
    allow_non_eea: str | None = None  # justification for an instance country outside the EEA

    def country_of(self, host: str) -> DestinationSettings | None:
        host = host.lower().rstrip(".")
        for d in self.destinations:
            if d.host == host:
                return d
        return None


def check_country(name: str, raw: Any) -> str:
    if not isinstance(raw, str) or not _COUNTRY.match(raw):
        raise SettingsError(f"{name}: expected an ISO 3166-1 alpha-2 country code, e.g. \"FR\"")
    return raw.upper()


def _justification(name: str, raw: Any) -> str:
    if not isinstance(raw, str) or len(raw.strip()) < MIN_JUSTIFICATION:
        raise SettingsError(f"{name}: expected the reason for accepting a country outside the EEA"
                            f" (at least {MIN_JUSTIFICATION} characters), e.g. \"support contract C-42, SCCs signed\"")
    return raw.strip()


def _host(name: str, raw: Any) -> str:
    if not isinstance(raw, str) or not re.fullmatch(r"[A-Za-z0-9.\-]{1,253}|\[?[0-9A-Fa-f:.]{2,45}\]?", raw):
        raise SettingsError(f"{name}: expected a host name or address (no scheme, no port)")
    return raw.lower().strip("[]").rstrip(".")


def parse_residency_settings(raw: Mapping[str, Any], origin: str) -> ResidencySettings:
    """Validate a ``[residency]`` table; errors name the key and ``origin``."""
    try:
        if not isinstance(raw, Mapping):
            raise SettingsError("residency: expected a table")
        extra = set(raw) - {"destinations", "extra_outbound", "allow_non_eea"}
        if extra:
            raise SettingsError(f"residency: unknown key '{sorted(extra)[0]}'")
        items = raw.get("destinations", [])
        if not isinstance(items, list):
            raise SettingsError("residency.destinations: expected an array of tables ([[residency.destinations]])")
        destinations: list[DestinationSettings] = []
        for i, item in enumerate(items):
            where = f"residency.destinations[{i}]"
            if not isinstance(item, Mapping):
                raise SettingsError(f"{where}: expected a table")
            unknown = set(item) - {"host", "country", "allow_non_eea", "note"}
            if unknown:
                raise SettingsError(f"{where}: unknown key '{sorted(unknown)[0]}'")
            note = item.get("note")
            if note is not None and not isinstance(note, str):
                raise SettingsError(f"{where}.note: expected a string")
            destinations.append(DestinationSettings(
                _host(f"{where}.host", item.get("host")), check_country(f"{where}.country", item.get("country")),
                _justification(f"{where}.allow_non_eea", item["allow_non_eea"]) if "allow_non_eea" in item else None,
                note))
        hosts = [d.host for d in destinations]
        if len(set(hosts)) != len(hosts):
            raise SettingsError("residency.destinations: a host is listed twice")
        extra_raw = raw.get("extra_outbound", [])
        if not isinstance(extra_raw, list):
            raise SettingsError("residency.extra_outbound: expected a list of host names")
        extra_hosts = tuple(_host("residency.extra_outbound", h) for h in extra_raw)
        allow = _justification("residency.allow_non_eea", raw["allow_non_eea"]) if "allow_non_eea" in raw else None
        return ResidencySettings(tuple(destinations), extra_hosts, allow)
    except SettingsError as exc:
        raise SettingsError(f"{exc} (from {origin})") from None


# -- the destinations of a configuration ----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Destination:
    """Where some data goes, as resolved from the settings."""

    setting: str  # the setting that names it, e.g. "alerts.sinks[0]"
    kind: str  # data-dir | database | backup | replication | alert-sink | audit-witness | identity-provider | ...
    host: str | None  # None: this machine
    country: str | None
    override: str | None = None  # the recorded justification when outside the EEA

    @property
    def eea(self) -> bool | None:
        return None if self.country is None else self.country in EEA_COUNTRIES

    def to_json(self) -> dict[str, Any]:
        return {"setting": self.setting, "kind": self.kind, "host": self.host or "(this machine)",
                "country": self.country, "eea": self.eea, "override": self.override}


def is_local(host: str | None) -> bool:
    if not host or host.startswith("/") or host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.endswith(".localhost")


def _url_host(url: str) -> str | None:
    try:
        return (urlsplit(url).hostname or "").lower() or None
    except ValueError:
        return None


def _database_hosts(url: str) -> list[str]:
    from psycopg import Error as PsycopgError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except PsycopgError:
        return []
    raw = str(params.get("host") or params.get("hostaddr") or "")
    return [h.strip().lower() for h in raw.split(",") if h.strip()]


def _raw_destinations(settings: Settings) -> Iterable[tuple[str, str, str | None]]:
    """(setting, kind, host) for every destination except backup targets (they carry a location)."""
    if settings.database_url is not None:
        for host in _database_hosts(settings.database_url):
            yield "database_url", "database", host
    for spec in settings.audit_witness_specs:
        yield "audit_witnesses", "audit-witness", None if spec.startswith("file://") else _url_host(spec)
    alerts = settings.alerts
    for i, sink in enumerate(alerts.sinks if alerts is not None else ()):
        url: Any = getattr(sink, "url", None)
        sink_host: Any = getattr(sink, "host", None)
        yield f"alerts.sinks[{i}]", "alert-sink", _url_host(url) if isinstance(url, str) else sink_host
    for p in settings.identity_providers:
        yield f"identity_providers.{p.name}", "identity-provider", _url_host(p.issuer)
    if settings.backup is not None and settings.backup.drill_scratch_url:
        for host in _database_hosts(settings.backup.drill_scratch_url):
            yield "backup.drill_scratch_url", "drill-database", host
    notify = settings.patient_notifications
    if notify is not None:
        if notify.webhook_url:
            yield "patient_notifications.webhook_url", "patient-notification", _url_host(notify.webhook_url)
        if notify.smtp_host:
            yield "patient_notifications.smtp_host", "patient-notification", notify.smtp_host


def destinations(settings: Settings) -> list[Destination]:
    """Every destination of these settings with its country (None: not declared)."""
    residency = settings.residency or ResidencySettings()
    instance = settings.country
    out = [Destination("data_dir", "data-dir", None, instance, residency.allow_non_eea)]
    for setting, kind, host in _raw_destinations(settings):
        if is_local(host):
            out.append(Destination(setting, kind, None, instance, residency.allow_non_eea))
            continue
        assert host is not None
        declared = residency.country_of(host)
        out.append(Destination(setting, kind, host, declared.country if declared else None,
                               declared.allow_non_eea if declared else None))
    backup = settings.backup
    for name, t in (backup.targets.items() if backup is not None else ()):
        kind = "replication" if backup is not None and backup.replicate_to == name else "backup"
        host = _url_host(t.endpoint) if t.endpoint else (None if t.url.startswith("file://")
                                                         else f"s3.{t.region or 'us-east-1'}.amazonaws.com")
        override = "allow_outside_eea = true (backup target setting)" if t.allow_outside_eea else None
        out.append(Destination(f"backup.targets.{name}", kind, None if is_local(host) else host, t.location,
                               override))
    return out


def check_residency(settings: Settings) -> list[str]:
    """Refuse a destination outside the EEA without a justification (and, in production, one without a
    country); return warnings for what the default mode accepts."""
    warnings: list[str] = []
    production = settings.mode == "production"
    if production and settings.country is None:
        raise SettingsError("country: production mode needs the instance's country (ISO 3166-1 alpha-2, e.g."
                            " country = \"FR\"): it is where the data directory is")
    for d in destinations(settings):
        if d.country is None:
            if d.host is None:
                continue  # this machine, no instance country declared (default mode): nothing to say
            message = (f"{d.setting}: destination {d.host} has no declared country; add [[residency.destinations]]"
                       f" host = \"{d.host}\" country = \"..\"")
            if production:
                raise SettingsError(message + " (production mode refuses undeclared destinations)")
            warnings.append(message)
        elif not d.eea and d.override is None:
            where = "[residency] allow_non_eea" if d.host is None else \
                f"allow_non_eea in its [[residency.destinations]] entry (host = \"{d.host}\")"
            raise SettingsError(f"{d.setting}: destination {d.host or 'on this machine'} is in {d.country}, outside"
                                f" the EEA; refused unless accepted with a recorded justification: {where}")
    return warnings


def overrides(settings: Settings) -> list[Destination]:
    """Destinations outside the EEA accepted by an explicit justification."""
    return [d for d in destinations(settings) if d.eea is False and d.override is not None]


def allowed_hosts(settings: Settings) -> frozenset[str]:
    residency = settings.residency or ResidencySettings()
    hosts = {d.host for d in destinations(settings) if d.host is not None}
    hosts.update(d.host for d in residency.destinations)
    hosts.update(residency.extra_outbound)
    return frozenset(hosts)


# -- the outbound allow-list, enforced where clients connect -----------------------------------------

class OutboundRefused(ConnectionRefusedError):
    """A connection to a host outside the configured destinations (the message names the host only)."""


class OutboundGuard:
    def __init__(self, hosts: Iterable[str], on_refused: Callable[[str, str], None] | None = None) -> None:
        self.hosts = frozenset(h.lower().rstrip(".") for h in hosts)
        self._on_refused = on_refused

    def check(self, host: str | None, what: str) -> None:
        name = (host or "").lower().strip("[]").rstrip(".")
        if is_local(name) or name in self.hosts:
            return
        if self._on_refused is not None:
            with contextlib.suppress(Exception):  # the refusal itself must still happen
                self._on_refused(name, what)
        raise OutboundRefused(f"outbound connection to {name} refused: not a configured destination ({what})")


_guard: OutboundGuard | None = None
_guard_lock = threading.Lock()


def install_guard(guard: OutboundGuard | None) -> None:
    """Install (the server, at start) or remove the process-wide outbound allow-list."""
    global _guard
    with _guard_lock:
        _guard = guard


def check_outbound(host_or_url: str | None, what: str) -> None:
    """Raise OutboundRefused if a guard is installed and the host is not allowed (no guard: one-shot tools)."""
    guard = _guard
    if guard is None:
        return
    host = _url_host(host_or_url) if host_or_url and "://" in host_or_url else host_or_url
    guard.check(host, what)


__all__ = ["EEA_COUNTRIES", "Destination", "DestinationSettings", "OutboundGuard", "OutboundRefused",
           "ResidencySettings", "allowed_hosts", "check_outbound", "check_residency", "destinations",
           "install_guard", "overrides", "parse_residency_settings"]
