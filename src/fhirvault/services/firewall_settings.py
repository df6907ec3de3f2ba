"""The ``[firewall]`` table: rate limits and source allow-lists (see docs/security-model.md).

On by default. The limits are far above what a busy clinic integration sends (a FHIR
client doing hundreds of reads a second stays under them) and stop a runaway script or
a flood from one address before it takes the server down for everyone else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fhirvault.config import SettingsError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class FirewallSettings:
    enabled: bool = True
    # Per source address (after trusted-proxy resolution), every route but the health checks.
    source_rate: float = 200.0
    source_burst: int = 400
    # Per OAuth client (bearer token's client_id): all of that client's users together.
    client_rate: float = 500.0
    client_burst: int = 1000
    # Per user behind a user token (a person in an app).
    user_rate: float = 50.0
    user_burst: int = 200
    # Per source address, POSTs to the authentication routes (token, authorize, revoke, introspect,
    # logout): where secrets are checked. A hospital behind one NAT address logs ~150 people in a minute.
    auth_rate: float = 10.0
    auth_burst: int = 100
    # One audit record / alert per throttled bucket per this many seconds.
    report_window_seconds: int = 60
    max_tracked: int = 100_000  # buckets kept per kind (LRU)
    # Who may reach /admin and the login pages (empty: any address).
    admin_allowed_sources: tuple[Network, ...] = ()
    login_allowed_sources: tuple[Network, ...] = ()


def parse_networks(name: str, raw: Any) -> tuple[Network, ...]:
    """CIDRs (or single addresses) from a TOML list or a comma/space-separated string."""
    items: Iterable[Any]
    if isinstance(raw, str):
        items = [p for p in raw.replace(",", " ").split() if p]
    elif isinstance(raw, list | tuple):
        items = raw
    else:
        raise SettingsError(f"{name}: expected a list of addresses or CIDRs")
    out: list[Network] = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise SettingsError(f"{name}: '{item}' is not an IP address or CIDR") from None
    return tuple(out)


def _number(name: str, raw: Any, lo: float, hi: float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise SettingsError(f"{name}: expected a number")
    if not lo <= raw <= hi:
        raise SettingsError(f"{name}: must be between {lo:g} and {hi:g}")
    return float(raw)


_RATES = ("source_rate", "client_rate", "user_rate", "auth_rate")
_INTS = {"source_burst": (1, 10_000_000), "client_burst": (1, 10_000_000), "user_burst": (1, 10_000_000),
         "auth_burst": (1, 10_000_000), "report_window_seconds": (1, 86_400), "max_tracked": (100, 10_000_000)}


def parse_firewall_settings(raw: Any, origin: str) -> FirewallSettings:
    if not isinstance(raw, Mapping):
        raise SettingsError(f"firewall: expected a table (from {origin})")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        where = f"firewall.{key}"
        try:
            if name == "enabled":
                if not isinstance(value, bool):
                    raise SettingsError(f"{where}: expected true or false")
                values[name] = value
            elif name in _RATES:
                values[name] = _number(where, value, 0.001, 1e7)
            elif name in _INTS:
                lo, hi = _INTS[name]
                if isinstance(value, bool) or not isinstance(value, int):
                    raise SettingsError(f"{where}: expected an integer")
                values[name] = int(_number(where, value, lo, hi))
            elif name in ("admin_allowed_sources", "login_allowed_sources"):
                values[name] = parse_networks(where, value)
            else:
                raise SettingsError(f"unknown setting '{where}'")
        except SettingsError as exc:
            raise SettingsError(f"{exc} (from {origin})") from None
    return FirewallSettings(**values)
