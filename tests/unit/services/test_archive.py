"""What the archive's config.json keeps of the settings: everything but secrets."""

from __future__ import annotations

from dataclasses import dataclass, field

from fhirvault.services.archive import _redact, fingerprint


@dataclass(frozen=True)
class _Sink:
    url: str
    secret: bytes = field(repr=False)
    password: str | None = None


@dataclass(frozen=True)
class _Settings:
    port: int
    database_url: str
    sinks: tuple[_Sink, ...]
    extra: dict[str, object]
    token_ttl_seconds: int = 300


def test_secrets_are_redacted_and_the_rest_kept() -> None:
    doc = _redact(_Settings(8080, "postgresql://fv:hunter2@db.example.org:5432/fv",
                            (_Sink("https://hooks.example.org/x", b"k" * 32, "pw"),),
                            {"client_secret": "abc", "issuer": "https://idp.example.org", "raw": b"\x01"}))
    text = repr(doc)
    for secret in ("hunter2", "kkkk", "'pw'", "abc", "\\x01"):
        assert secret not in text
    assert doc["port"] == 8080 and doc["token_ttl_seconds"] == 300
    assert doc["database_url"] == "postgresql://(redacted)@db.example.org:5432/fv"
    assert doc["sinks"][0]["url"] == "https://hooks.example.org/x"
    assert doc["extra"]["issuer"] == "https://idp.example.org"


def test_fingerprint_is_grouped_sha256() -> None:
    fp = fingerprint(bytes(32))
    assert len(fp.replace(":", "")) == 64 and fp.count(":") == 15
