"""Reading Subscription resources: criteria, channel, payload, heartbeat, owner, endpoint address policy."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from fhirvault.domain.errors import OperationOutcomeError
from fhirvault.domain.subscription import (
    CONTENT_EXT,
    EMPTY,
    FULL,
    HEARTBEAT_EXT,
    OWNER_EXT,
    Owner,
    address_refusal,
    check_endpoint,
    owner_of,
    parse_criteria,
    parse_subscription,
    with_owner,
)


def sub(**channel: Any) -> dict[str, Any]:
    return {"resourceType": "Subscription", "id": "s1", "status": "active", "criteria": "Observation?code=1",
            "channel": {"type": "rest-hook", "endpoint": "https://hooks.example.org/in", **channel}}


def test_criteria_split_into_type_and_parameters() -> None:
    assert parse_criteria("Observation?code=http://loinc.org|8867-4&patient=Patient/1") == (
        "Observation", (("code", "http://loinc.org|8867-4"), ("patient", "Patient/1")))
    assert parse_criteria("Condition") == ("Condition", ())


@pytest.mark.parametrize("criteria", ["", None, "observation?code=1", "Foo?x=1", "Subscription?status=active",
                                      "AuditEvent?action=R", "Observation?_count=5", "Observation?_include=x:y"])
def test_bad_criteria_refused(criteria: Any) -> None:
    with pytest.raises(OperationOutcomeError) as exc:
        parse_criteria(criteria)
    assert exc.value.status == 422


def test_endpoints_are_https_unless_http_is_allowed() -> None:
    assert check_endpoint("https://h.example/x?y=1", allow_http=False) == ("https", "h.example", 443, "/x?y=1")
    with pytest.raises(OperationOutcomeError):
        check_endpoint("http://h.example/x", allow_http=False)
    assert check_endpoint("http://h.example:8080", allow_http=True) == ("http", "h.example", 8080, "/")
    for bad in ("file:///etc/passwd", "https://u:p@h.example/", "https:///x", "https://h.example/#frag", 5):
        with pytest.raises(OperationOutcomeError):
            check_endpoint(bad, allow_http=True)


@pytest.mark.parametrize("address", ["10.0.0.1", "127.0.0.1", "169.254.169.254", "192.168.1.1", "100.64.0.1",
                                     "::1", "fe80::1", "fd00::1", "::ffff:10.0.0.1", "224.0.0.1", "0.0.0.0"])
def test_non_public_addresses_are_refused(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address), ()) is not None


def test_public_addresses_and_allowed_networks_pass() -> None:
    assert address_refusal(ipaddress.ip_address("93.184.216.34"), ()) is None
    assert address_refusal(ipaddress.ip_address("2606:4700::1"), ()) is None
    lan = (ipaddress.ip_network("10.20.0.0/16"),)
    assert address_refusal(ipaddress.ip_address("10.20.3.4"), lan) is None
    assert address_refusal(ipaddress.ip_address("10.21.3.4"), lan) is not None


def test_payload_heartbeat_and_headers() -> None:
    assert parse_subscription(sub(), allow_http=False, min_heartbeat_s=60).content == EMPTY
    full = parse_subscription(sub(payload="application/fhir+json", header=["Authorization: Bearer x"],
                                  extension=[{"url": HEARTBEAT_EXT, "valueUnsignedInt": 120}]),
                              allow_http=False, min_heartbeat_s=60)
    assert (full.content, full.heartbeat_s, full.headers) == (FULL, 120, (("Authorization", "Bearer x"),))
    empty = parse_subscription(sub(payload="application/fhir+json",
                                   _payload={"extension": [{"url": CONTENT_EXT, "valueCode": "empty"}]}),
                               allow_http=False, min_heartbeat_s=60)
    assert empty.content == EMPTY


@pytest.mark.parametrize("channel", [
    {"type": "email"},
    {"payload": "application/fhir+xml"},
    {"payload": "application/fhir+json", "_payload": {"extension": [{"url": CONTENT_EXT, "valueCode": "id-only"}]}},
    {"extension": [{"url": HEARTBEAT_EXT, "valueUnsignedInt": 5}]},
    {"header": ["X-A: b\r\nX-Injected: 1"]},
    {"header": ["Content-Length: 0"]},
    {"header": [f"X-{i}: v" for i in range(17)]},
])
def test_channels_that_cannot_be_honoured(channel: dict[str, Any]) -> None:
    with pytest.raises(OperationOutcomeError) as exc:
        parse_subscription(sub(**channel), allow_http=False, min_heartbeat_s=60)
    assert exc.value.status == 422


def test_owner_recorded_by_the_server_replaces_a_forged_one() -> None:
    resource = sub()
    resource["extension"] = [{"url": OWNER_EXT, "extension": [{"url": "client", "valueString": "admin"},
                                                               {"url": "scope", "valueString": "system/*.*"}]},
                             {"url": "http://example.org/other", "valueString": "kept"}]
    with_owner(resource, Owner("app-1", "patient/Observation.rs", "u-1", "p-9"))
    assert owner_of(resource) == Owner("app-1", "patient/Observation.rs", "u-1", "p-9")
    assert [e["url"] for e in resource["extension"]] == ["http://example.org/other", OWNER_EXT]


@pytest.mark.parametrize("channel", [
    {"_payload": "x"}, {"_payload": {"extension": "x"}}, {"extension": [1, "a", None]}, {"header": "X-A: b"},
    {"header": [None, 5]}, {"endpoint": None}, {"endpoint": ["https://x"]}, {"payload": 5},
])
def test_odd_shapes_are_refused_or_read_never_crash(channel: dict[str, Any]) -> None:
    try:
        parse_subscription(sub(**channel), allow_http=False, min_heartbeat_s=60)
    except OperationOutcomeError as exc:
        assert exc.status == 422
    assert owner_of({"extension": [{"url": OWNER_EXT, "extension": "x"}]}) is None
