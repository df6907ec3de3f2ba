"""Firewall building blocks: forwarded-header walk, Host matching, token buckets, settings."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from fhirvault.config import Settings, SettingsError, load_settings
from fhirvault.services.auth import normalise_sources, source_allowed
from fhirvault.services.firewall_settings import parse_firewall_settings
from fhirvault.services.ratelimit import BucketLimit, RateLimiter
from fhirvault.web.firewall import ProxyResolver, default_allowed_hosts, host_allowed

PROXIES = ProxyResolver((ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")))


def _h(**headers: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]


@pytest.mark.parametrize(("peer", "headers", "expected"), [
    ("198.51.100.1", _h(x_forwarded_for="203.0.113.1"), None),  # untrusted peer: ignored
    ("10.0.0.1", _h(), None),  # a trusted peer that forwarded nothing
    ("10.0.0.1", _h(x_forwarded_for="203.0.113.1"), ("203.0.113.1", None)),
    ("10.0.0.1", _h(x_forwarded_for="1.1.1.1, 203.0.113.1, 10.2.2.2"), ("203.0.113.1", None)),
    ("10.0.0.1", _h(x_forwarded_for="10.9.9.9, 10.2.2.2"), ("10.9.9.9", None)),  # all ours: the furthest
    ("10.0.0.1", _h(x_forwarded_for="unknown"), ("10.0.0.1", None)),  # garbage: the last proxy we know
    ("10.0.0.1", _h(x_forwarded_for="203.0.113.1:5555"), ("203.0.113.1", None)),
    ("10.0.0.1", _h(x_forwarded_for="::ffff:203.0.113.1"), ("203.0.113.1", None)),
    ("10.0.0.1", _h(x_forwarded_for="203.0.113.1", x_forwarded_proto="https"), ("203.0.113.1", "https")),
    ("10.0.0.1", _h(x_forwarded_proto="https"), ("10.0.0.1", "https")),
    ("10.0.0.1", _h(x_forwarded_for="203.0.113.1", x_forwarded_proto="gopher"), ("203.0.113.1", None)),
    ("10.0.0.1", _h(forwarded='for=192.0.2.60;proto=https;by=10.0.0.1'), ("192.0.2.60", "https")),
    ("10.0.0.1", _h(forwarded='for="[2001:db8:cafe::17]:4711"'), ("2001:db8:cafe::17", None)),
    ("10.0.0.1", _h(forwarded="for=6.6.6.6, for=192.0.2.60, for=10.1.1.1", x_forwarded_for="203.0.113.9"),
     ("192.0.2.60", None)),  # Forwarded wins over X-Forwarded-For
    ("fd00::1", _h(x_forwarded_for="2001:db8::5"), ("2001:db8::5", None)),
])
def test_proxy_walk(peer: str, headers: list[tuple[bytes, bytes]], expected: tuple[str, str | None] | None) -> None:
    assert PROXIES.resolve(peer, headers) == expected


def test_no_trusted_proxies_means_headers_are_never_read() -> None:
    assert ProxyResolver(()).resolve("127.0.0.1", _h(x_forwarded_for="203.0.113.1")) is None


def test_host_matching(tmp_path: Path) -> None:
    allowed = ("fhir.example.org", "*.ward.example", "127.0.0.1", "[::1]")
    for ok in ("fhir.example.org", "FHIR.example.org:443", "fhir.example.org.", "a.ward.example", "127.0.0.1:80",
               "[::1]:8080"):
        assert host_allowed(allowed, ok), ok
    for bad in ("", "evil.example", "fhir.example.org.evil", "ward.example", "xward.example", "127.0.0.2",
                "fhir.example.org:80@evil"):
        assert not host_allowed(allowed, bad), bad
    base = load_settings({"data_dir": tmp_path}, environ={})
    assert default_allowed_hosts(base) == ("localhost", "127.0.0.1", "[::1]")
    wildcard = load_settings({"data_dir": tmp_path, "host": "0.0.0.0"}, environ={})
    assert default_allowed_hosts(wildcard) == ("localhost", "127.0.0.1", "[::1]")
    public = load_settings({"data_dir": tmp_path, "public_base_url": "https://fhir.example.org"}, environ={})
    assert default_allowed_hosts(public) is None  # links never come from Host then
    listed = load_settings({"data_dir": tmp_path}, environ={"FHIRVAULT_ALLOWED_HOSTS": "a.example, b.example"})
    assert default_allowed_hosts(listed) == ("a.example", "b.example")
    anything = load_settings({"data_dir": tmp_path}, environ={"FHIRVAULT_ALLOWED_HOSTS": "*"})
    assert default_allowed_hosts(anything) is None


def test_token_bucket_refills_and_is_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(BucketLimit(rate=2.0, burst=3), max_keys=100, monotonic=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0  # another key
    now[0] += 0.5
    assert limiter.take("a") == 0.0 and limiter.take("a") > 0
    now[0] += 100  # never more than the burst
    assert [limiter.take("a") for _ in range(4)][-1] > 0
    assert limiter.first_refusal_in("a", 60) and not limiter.first_refusal_in("a", 60)
    now[0] += 61
    assert limiter.first_refusal_in("a", 60)
    for i in range(1000):
        limiter.take(f"k{i}")
    assert len(limiter) == 100


def test_client_source_lists() -> None:
    assert normalise_sources([]) is None
    assert normalise_sources(["192.0.2.7", "10.0.0.0/8, 10.0.0.0/8", "2001:db8::/32"]) == \
        "192.0.2.7/32 10.0.0.0/8 2001:db8::/32"
    with pytest.raises(ValueError, match="not an IP"):
        normalise_sources(["clinic.example"])
    allowed = "192.0.2.0/24 2001:db8::/32"
    assert source_allowed(None, "203.0.113.1") and source_allowed(None, None)
    assert source_allowed(allowed, "192.0.2.99") and source_allowed(allowed, "::ffff:192.0.2.99")
    assert source_allowed(allowed, "2001:db8::1")
    for refused in ("192.0.3.1", None, "testclient", ""):
        assert not source_allowed(allowed, refused)


def test_firewall_settings_parse_and_fail_fast(tmp_path: Path) -> None:
    config = tmp_path / "fhirvault.toml"
    config.write_text('trusted_proxies = ["10.0.0.1", "fd00::/8"]\nallowed_hosts = ["fhir.example.org"]\n'
                      "[firewall]\nsource_rate = 50\nsource-burst = 100\nadmin_allowed_sources = [\"10.1.0.0/16\"]\n")
    s: Settings = load_settings({"data_dir": tmp_path}, environ={}, config_file=config)
    assert s.trusted_proxies == ("10.0.0.1/32", "fd00::/8") and s.allowed_hosts == ("fhir.example.org",)
    assert s.firewall is not None and s.firewall.source_rate == 50.0 and s.firewall.source_burst == 100
    assert s.firewall.admin_allowed_sources == (ipaddress.ip_network("10.1.0.0/16"),)
    assert s.firewall.client_rate == 500.0  # the defaults stay
    for bad, message in [({"source_rate": 0}, "between"), ({"source_burst": 1.5}, "integer"),
                         ({"enabled": "yes"}, "true or false"), ({"login_allowed_sources": ["x"]}, "CIDR"),
                         ({"typo": 1}, "unknown setting 'firewall.typo'")]:
        with pytest.raises(SettingsError, match=message):
            parse_firewall_settings(bad, "test")
    with pytest.raises(SettingsError, match="trusted_proxies"):
        load_settings({"data_dir": tmp_path}, environ={"FHIRVAULT_TRUSTED_PROXIES": "proxy.local"})
    with pytest.raises(SettingsError, match="allowed_hosts"):
        load_settings({"data_dir": tmp_path}, environ={"FHIRVAULT_ALLOWED_HOSTS": "http://x.example/"})


def test_client_cert_header_thumbprint() -> None:
    import base64
    import hashlib

    from fhirvault.web.firewall import cert_thumbprint

    der = b"\x30\x03\x02\x01\x01"
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert cert_thumbprint(b":" + base64.b64encode(der) + b":") == expected
    for bad in (b"", b"::", base64.b64encode(der), b":not base64!:", b"-----BEGIN CERTIFICATE-----"):
        assert cert_thumbprint(bad) is None
