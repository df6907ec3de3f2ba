"""The ``[subscriptions]`` table: FHIR Subscription notifications (see docs/subscriptions.md).

Safe by default: endpoints must be https:// URLs whose every address is public (no private,
loopback, link-local or cloud metadata address: a subscription cannot be used to reach into the
server's own network). An operator opens a network (``allowed_networks``) or plain http
(``allow_http``) explicitly, e.g. for a receiver on the hospital LAN or for tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fhirvault.config import SettingsError
from fhirvault.services.firewall_settings import Network, parse_networks


@dataclass(frozen=True, slots=True)
class SubscriptionSettings:
    enabled: bool = True
    allow_http: bool = False  # http:// endpoints (any address still has to pass the network check)
    allowed_networks: tuple[Network, ...] = ()  # non-public destinations allowed anyway (CIDRs)
    max_attempts: int = 8  # then the subscription goes to status "error"
    retry_initial_seconds: float = 5.0  # back-off doubles per failed attempt, with jitter
    retry_max_seconds: float = 900.0
    timeout_seconds: float = 10.0  # connect and read, per attempt
    poll_seconds: float = 1.0  # how often the delivering process looks for new writes and due notifications
    min_heartbeat_seconds: int = 60  # the shortest heartbeat period a subscription may ask for


_FLOATS = {"retry_initial_seconds": (0.01, 86_400.0), "retry_max_seconds": (0.01, 86_400.0),
           "timeout_seconds": (0.1, 300.0), "poll_seconds": (0.05, 60.0)}
_INTS = {"max_attempts": (1, 100), "min_heartbeat_seconds": (1, 86_400)}


def parse_subscription_settings(raw: Any, origin: str) -> SubscriptionSettings:
    if not isinstance(raw, Mapping):
        raise SettingsError(f"subscriptions: expected a table (from {origin})")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        where = f"subscriptions.{key}"
        if name in ("enabled", "allow_http"):
            if not isinstance(value, bool):
                raise SettingsError(f"{where}: expected true or false (from {origin})")
            values[name] = value
        elif name == "allowed_networks":
            values[name] = parse_networks(where, value)
        elif name in _FLOATS or name in _INTS:
            lo, hi = _FLOATS.get(name) or _INTS[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi \
                    or (name in _INTS and not isinstance(value, int)):
                raise SettingsError(f"{where}: expected a number between {lo:g} and {hi:g} (from {origin})")
            values[name] = value
        else:
            raise SettingsError(f"unknown setting '{where}' (from {origin})")
    return SubscriptionSettings(**values)
