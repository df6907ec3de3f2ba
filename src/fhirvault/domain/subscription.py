"""FHIR R4 Subscription (rest-hook): what a Subscription resource asks for, checked, without I/O.

The server reads a Subscription into a ``SubscriptionSpec``: the criteria (a search on one resource
type), the endpoint and its headers, the payload (R4: none = an empty ping, ``application/fhir+json``
= the resource; the Subscriptions Backport IG's ``backport-payload-content`` extension may say
``empty`` or ``full-resource``), an optional heartbeat period (the Backport IG's
``backport-heartbeat-period`` extension on ``channel``), ``end``, and the owner the server recorded.

Endpoint destinations are judged by ``address_refusal``: only public unicast addresses, unless the
operator allowed a network (a lab receiver, or loopback for tests).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fhirvault.domain import errors
from fhirvault.domain.errors import Issue
from fhirvault.domain.r4 import is_resource_type

REST_HOOK = "rest-hook"
FHIR_JSON = "application/fhir+json"
EMPTY, FULL = "empty", "full-resource"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
HEARTBEAT_EXT = BACKPORT + "backport-heartbeat-period"
CONTENT_EXT = BACKPORT + "backport-payload-content"
OWNER_EXT = "https://fhirvault.org/fhir/StructureDefinition/subscription-owner"
STATUSES = frozenset({"requested", "active", "error", "off"})
# Types nobody may subscribe to: the server's own records, and subscriptions themselves.
UNSUBSCRIBABLE = frozenset({"AuditEvent", "Subscription"})
# Result parameters say how to page or shape a search: meaningless for one resource being matched.
_RESULT_PARAMS = frozenset({"_sort", "_count", "_include", "_revinclude", "_summary", "_elements", "_total",
                            "_contained", "_containedType", "_format", "_pretty"})
_FORBIDDEN_HEADERS = frozenset({"host", "content-length", "content-type", "transfer-encoding", "connection",
                                "te", "upgrade", "expect", "proxy-authorization"})
MAX_HEADERS = 16
MAX_HEADER_BYTES = 4096

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Owner:
    """Who created (or last changed) the subscription: deliveries are re-authorised as them."""

    client_id: str
    scope: str
    user: str | None = None
    patient: str | None = None  # SMART launch context of a patient/ scope


@dataclass(frozen=True, slots=True)
class SubscriptionSpec:
    id: str
    status: str
    criteria_type: str
    criteria_params: tuple[tuple[str, str], ...]
    endpoint: str
    headers: tuple[tuple[str, str], ...]
    content: str  # EMPTY | FULL
    heartbeat_s: int | None
    end: str | None  # instant after which the server turns it off
    owner: Owner | None


def _invalid(message: str, path: str) -> errors.OperationOutcomeError:
    return errors.unprocessable([Issue("error", "invalid", message, (path,))])


def parse_criteria(criteria: Any) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``Observation?code=…&patient=…`` → ("Observation", params). The search parameters themselves are
    checked by the search parser (services/subscriptions.py)."""
    if not isinstance(criteria, str) or not criteria.strip():
        raise _invalid("Subscription.criteria is required: a search such as Observation?code=1234-5", "Subscription.criteria")
    rtype, _, query = criteria.strip().partition("?")
    if not is_resource_type(rtype):
        raise _invalid(f"Subscription.criteria must start with a resource type, not '{rtype[:64]}'",
                       "Subscription.criteria")
    if rtype in UNSUBSCRIBABLE:
        raise _invalid(f"Subscriptions to {rtype} are not supported", "Subscription.criteria")
    try:
        params = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _invalid("Subscription.criteria has a malformed query string", "Subscription.criteria") from None
    for name, _value in params:
        if name.split(":")[0] in _RESULT_PARAMS:
            raise _invalid(f"Subscription.criteria may not use the result parameter {name}", "Subscription.criteria")
    return rtype, tuple(params)


def check_endpoint(url: Any, *, allow_http: bool) -> tuple[str, str, int, str]:
    """(scheme, host, port, path+query) of an allowed endpoint URL; https only unless ``allow_http``."""
    path = "Subscription.channel.endpoint"
    if not isinstance(url, str) or not url:
        raise _invalid("Subscription.channel.endpoint is required for a rest-hook", path)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _invalid("Subscription.channel.endpoint is not a valid URL", path) from None
    scheme = parts.scheme.lower()
    if scheme != "https" and not (scheme == "http" and allow_http):
        raise _invalid("Subscription.channel.endpoint must be an https:// URL", path)
    if not parts.hostname or parts.username is not None or parts.password is not None or parts.fragment:
        raise _invalid("Subscription.channel.endpoint needs a host, and no user, password or fragment", path)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80), target


def address_refusal(address: Address, allowed: Iterable[Network]) -> str | None:
    """Why notifications may not be sent to ``address``, or None. Private, loopback, link-local (cloud
    metadata 169.254.169.254), shared, multicast and reserved addresses are refused unless allowed."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in net for net in allowed):
        return None
    if address.is_global and not address.is_multicast:
        return None
    return "the endpoint resolves to a non-public address"


def _headers(channel: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    raw = channel.get("header") or []
    if not isinstance(raw, list) or len(raw) > MAX_HEADERS:
        raise _invalid(f"Subscription.channel.header: at most {MAX_HEADERS} headers", "Subscription.channel.header")
    out = []
    for item in raw:
        name, sep, value = str(item).partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not name or not name.isascii() or any(c in name for c in " \t()<>@,;\\\"/[]?={}") \
                or any(c in str(item) for c in "\r\n\0") or len(str(item)) > MAX_HEADER_BYTES:
            raise _invalid("Subscription.channel.header entries are 'Name: value' lines",
                           "Subscription.channel.header")
        if name.lower() in _FORBIDDEN_HEADERS:
            raise _invalid(f"Subscription.channel.header may not set {name}", "Subscription.channel.header")
        out.append((name, value))
    return tuple(out)


def _extension(element: Any, url: str) -> Mapping[str, Any] | None:
    if not isinstance(element, Mapping) or not isinstance(element.get("extension"), list):
        return None
    for ext in element["extension"]:
        if isinstance(ext, Mapping) and ext.get("url") == url:
            return ext
    return None


def _content(channel: Mapping[str, Any]) -> str:
    payload = channel.get("payload")
    ext = _extension(channel.get("_payload") or {}, CONTENT_EXT)
    code = ext.get("valueCode") if ext is not None else None
    if payload is None:
        if code not in (None, EMPTY):
            raise _invalid("Subscription.channel.payload is needed for content other than 'empty'",
                           "Subscription.channel.payload")
        return EMPTY
    if payload != FHIR_JSON:
        raise errors.unprocessable([Issue("error", "not-supported", f"Subscription.channel.payload: only {FHIR_JSON}"
                                          " is supported", ("Subscription.channel.payload",))])
    if code in (None, FULL):
        return FULL
    if code == EMPTY:
        return EMPTY
    raise errors.unprocessable([Issue("error", "not-supported", "payload content 'id-only' is not supported: use "
                                      "'empty' or 'full-resource'", ("Subscription.channel.payload",))])


def _heartbeat(channel: Mapping[str, Any], minimum: int) -> int | None:
    ext = _extension(channel, HEARTBEAT_EXT)
    if ext is None:
        return None
    value = ext.get("valueUnsignedInt")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _invalid(f"the heartbeat period is a whole number of seconds, at least {minimum}",
                       "Subscription.channel.extension")
    return value


def owner_of(resource: Mapping[str, Any]) -> Owner | None:
    ext = _extension(resource, OWNER_EXT)
    if ext is None:
        return None
    inner = ext.get("extension")
    parts = {str(e.get("url")): e.get("valueString") for e in (inner if isinstance(inner, list) else ())
             if isinstance(e, Mapping)}
    client, scope = parts.get("client"), parts.get("scope")
    if not isinstance(client, str) or not isinstance(scope, str):
        return None
    user, patient = parts.get("user"), parts.get("patient")
    return Owner(client, scope, user if isinstance(user, str) else None, patient if isinstance(patient, str) else None)


def with_owner(resource: dict[str, Any], owner: Owner) -> None:
    """Record ``owner`` in the resource, replacing whatever a client put there."""
    parts = [{"url": "client", "valueString": owner.client_id}, {"url": "scope", "valueString": owner.scope}]
    if owner.user:
        parts.append({"url": "user", "valueString": owner.user})
    if owner.patient:
        parts.append({"url": "patient", "valueString": owner.patient})
    present = resource.get("extension")
    others = [e for e in (present if isinstance(present, list) else ())
              if not (isinstance(e, Mapping) and e.get("url") == OWNER_EXT)]
    resource["extension"] = [*others, {"url": OWNER_EXT, "extension": parts}]


def parse_subscription(resource: Mapping[str, Any], *, allow_http: bool, min_heartbeat_s: int) -> SubscriptionSpec:
    """Read a Subscription; refuses (422) what the server cannot honour."""
    channel = resource.get("channel")
    if not isinstance(channel, Mapping):
        raise _invalid("Subscription.channel is required", "Subscription.channel")
    if channel.get("type") != REST_HOOK:
        raise errors.unprocessable([Issue("error", "not-supported", "only the rest-hook channel type is supported",
                                          ("Subscription.channel.type",))])
    rtype, params = parse_criteria(resource.get("criteria"))
    endpoint = channel.get("endpoint")
    check_endpoint(endpoint, allow_http=allow_http)
    status = resource.get("status")
    end = resource.get("end")
    return SubscriptionSpec(
        id=str(resource.get("id") or ""), status=str(status) if status in STATUSES else "requested",
        criteria_type=rtype, criteria_params=params, endpoint=str(endpoint), headers=_headers(channel),
        content=_content(channel), heartbeat_s=_heartbeat(channel, min_heartbeat_s),
        end=end if isinstance(end, str) else None, owner=owner_of(resource))


__all__ = [
    "CONTENT_EXT", "EMPTY", "FHIR_JSON", "FULL", "HEARTBEAT_EXT", "OWNER_EXT", "REST_HOOK", "Owner",
    "SubscriptionSpec", "address_refusal", "check_endpoint", "owner_of", "parse_criteria", "parse_subscription",
    "with_owner",
]
