from __future__ import annotations

from pathlib import Path

import pytest

from fhirvault.adapters.keyfile import KeyFileProvider
from fhirvault.adapters.sqlite_store import SqliteStore
from fhirvault.ports import WriteTx
from fhirvault.services.auth import AuthService, OAuthError, TokenError


class FakeClock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def now_ms(self) -> int:
        return self.ms


@pytest.fixture
def auth(tmp_path: Path) -> tuple[AuthService, FakeClock]:
    root = KeyFileProvider.create(tmp_path / "root.key")
    store = SqliteStore(tmp_path / "db")

    def setup(tx: WriteTx) -> None:
        AuthService.create_signing_key(tx, root)

    store.write_sync("init", setup)
    clock = FakeClock(1_800_000_000_000)
    yield AuthService(store, root, clock, issuer="urn:test", tenant="default", token_ttl_seconds=60), clock
    store.close()


def _token(auth: AuthService) -> str:
    client = auth.register_client("c", "system/Patient.rs")
    row, _ = auth.authenticate_client({}, (client.client_id, str(client.client_secret)), "http://x/token")
    return str(auth.issue(row, None)["access_token"])


def test_token_lifetime_is_enforced(auth: tuple[AuthService, FakeClock]) -> None:
    service, clock = auth
    token = _token(service)
    principal = service.verify(token)
    assert principal.grants.allows("Patient", "r") and not principal.grants.allows("Patient", "c")
    clock.ms += 70_000  # past exp plus the 5 s leeway
    with pytest.raises(TokenError, match="expired"):
        service.verify(token)  # from the cache
    fresh = AuthService(service._store, service._root, clock, issuer="urn:test", tenant="default",
                        token_ttl_seconds=60)
    with pytest.raises(TokenError):
        fresh.verify(token)  # and without it


def test_not_yet_valid_and_wrong_issuer_or_tenant(auth: tuple[AuthService, FakeClock]) -> None:
    service, clock = auth
    token = _token(service)
    early = AuthService(service._store, service._root, FakeClock(clock.ms - 3_600_000), issuer="urn:test",
                        tenant="default", token_ttl_seconds=60)
    with pytest.raises(TokenError):
        early.verify(token)
    for issuer, tenant in (("urn:other", "default"), ("urn:test", "other")):
        other = AuthService(service._store, service._root, clock, issuer=issuer, tenant=tenant, token_ttl_seconds=60)
        with pytest.raises(TokenError):
            other.verify(token)


def test_client_authentication_failures(auth: tuple[AuthService, FakeClock]) -> None:
    service, _ = auth
    client = service.register_client("c", "system/*.rs")
    with pytest.raises(OAuthError) as exc:
        service.authenticate_client({}, (client.client_id, "nope"), "u")
    assert exc.value.status == 401 and exc.value.error == "invalid_client"
    with pytest.raises(OAuthError):
        service.authenticate_client({"client_secret": "x"}, (client.client_id, "y"), "u")  # two methods
    with pytest.raises(OAuthError):
        service.authenticate_client({"client_id": "x" * 500, "client_secret": "y"}, None, "u")
    with pytest.raises(OAuthError):
        service.authenticate_client({"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                                     "client_assertion": "a.b.c"}, None, "u")
