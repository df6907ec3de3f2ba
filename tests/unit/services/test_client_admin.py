"""Disabling a client or rotating its secret kills the tokens it holds: at once here, within
REVOCATION_POLL_S in another process (the server, when the CLI does it), and for user tokens too."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fhirvault.adapters.keyfile import KeyFileProvider
from fhirvault.adapters.sqlite_store import SqliteStore
from fhirvault.ports import ClientRow, UserRow, WriteTx
from fhirvault.services.auth import REVOCATION_POLL_S, AuthService, OAuthError, TokenError


class Clock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


Services = tuple[AuthService, AuthService, SqliteStore]


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    root = KeyFileProvider.create(tmp_path / "root.key")
    store = SqliteStore(tmp_path / "db")
    store.write_sync("init", lambda tx: AuthService.create_signing_key(tx, root))

    def auth() -> AuthService:
        return AuthService(store, root, Clock(), issuer="urn:t", tenant="default", token_ttl_seconds=60)

    try:
        yield auth(), auth(), store  # the CLI's and the server's
    finally:
        store.close()


def _token(auth: AuthService, client_id: str, secret: str) -> str:
    row, _ = auth.authenticate_client({}, (client_id, secret), "urn:t/oauth2/token")
    return str(auth.issue(row, None)["access_token"])


def _refused_elsewhere(auth: AuthService, token: str) -> None:
    deadline = time.monotonic() + REVOCATION_POLL_S + 1
    while time.monotonic() < deadline:
        try:
            auth.verify(token)
        except TokenError as exc:
            assert "revoked" in str(exc)
            return
        time.sleep(0.05)
    pytest.fail("the other process never saw that the client's tokens are dead")


def test_disable_kills_live_tokens_and_enable_lets_new_ones_work(services: Services) -> None:
    cli, server, store = services
    new = cli.register_client("leaked", "system/*.rs")
    assert new.client_secret is not None
    token = _token(server, new.client_id, new.client_secret)
    assert server.verify(token).client_id == new.client_id  # cached by the server
    other = cli.register_client("bystander", "system/*.rs")
    assert other.client_secret is not None
    bystander = _token(server, other.client_id, other.client_secret)
    seen: list[ClientRow] = []

    row = cli.set_client_disabled(new.client_id, True, also=lambda tx, r: seen.append(r))
    assert row.disabled and store.client(new.client_id) == row and seen == [row]
    with pytest.raises(TokenError, match="revoked"):
        cli.verify(token)  # here at once
    _refused_elsewhere(server, token)
    assert server.verify(bystander).client_id == other.client_id  # other clients unaffected
    with pytest.raises(OAuthError):
        _token(server, new.client_id, new.client_secret)  # no new tokens either

    cli.set_client_disabled(new.client_id, False)
    fresh = _token(server, new.client_id, new.client_secret)
    assert server.verify(fresh).client_id == new.client_id  # issued after the cut-off
    with pytest.raises(TokenError, match="revoked"):
        server.verify(token)  # the old one stays dead


def test_disable_kills_user_tokens_issued_through_the_client(services: Services) -> None:
    cli, server, _ = services
    app = cli.register_client("app", "system/*.rs")
    user = UserRow("u-1", "default", "doc", None, "practitioner", "Practitioner/1", None, "", None, 0, False, 0, 0, 0)
    token, _, _ = server.issue_user_token(app.client_id, "user/*.rs", user, patient=None, session_id="s1")
    assert server.verify(token).user == "u-1"
    cli.set_client_disabled(app.client_id, True)
    _refused_elsewhere(server, token)


def test_rotate_secret_refuses_the_old_secret_and_its_tokens(services: Services) -> None:
    cli, server, store = services
    new = cli.register_client("svc", "system/*.rs")
    assert new.client_secret is not None
    old_token = _token(server, new.client_id, new.client_secret)
    server.verify(old_token)
    audited: list[str] = []
    secret = cli.rotate_client_secret(new.client_id, also=lambda tx, r: audited.append(r.client_id))
    assert secret != new.client_secret and audited == [new.client_id]
    row = store.client(new.client_id)
    assert row is not None and secret not in (row.secret_hash or "")  # only a hash is stored
    with pytest.raises(OAuthError):
        _token(server, new.client_id, new.client_secret)
    right_after = _token(server, new.client_id, secret)  # usable at once: not under the cut-off
    assert server.verify(right_after).client_id == new.client_id
    _refused_elsewhere(server, old_token)


def test_unknown_clients_and_key_only_clients(services: Services) -> None:
    cli, _, store = services
    with pytest.raises(KeyError):
        cli.set_client_disabled("fv-nobody", True)
    with pytest.raises(KeyError):
        cli.rotate_client_secret("fv-nobody")

    def key_only(tx: WriteTx) -> None:
        tx.insert_client(ClientRow("fv-jwt", "default", "jwt", None, "system/*.rs", '{"keys": []}', 1))

    store.write_sync("c", key_only)
    with pytest.raises(ValueError, match="JWK Set"):
        cli.rotate_client_secret("fv-jwt")
    assert store.client("fv-jwt") == ClientRow("fv-jwt", "default", "jwt", None, "system/*.rs", '{"keys": []}', 1)
