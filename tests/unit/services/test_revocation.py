"""Revocation beats the token cache: at once in the revoking process, within REVOCATION_POLL_S in others."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fhirvault.adapters.keyfile import KeyFileProvider
from fhirvault.adapters.sqlite_store import SqliteStore
from fhirvault.ports import UserRow, WriteTx
from fhirvault.services.auth import REVOCATION_POLL_S, AuthService, TokenError


class Clock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


def _user() -> UserRow:
    return UserRow("u-1", "default", "doc", None, "practitioner", "Practitioner/1", "o1", "R V", None, 0, False, 0,
                   0, 0)


def test_revocation_is_immediate_here_and_polled_elsewhere(tmp_path: Path) -> None:
    root = KeyFileProvider.create(tmp_path / "root.key")
    store = SqliteStore(tmp_path / "db")

    def setup(tx: WriteTx) -> None:
        AuthService.create_signing_key(tx, root)

    store.write_sync("init", setup)
    try:
        here = AuthService(store, root, Clock(), issuer="urn:t", tenant="default", token_ttl_seconds=60)
        other = AuthService(store, root, Clock(), issuer="urn:t", tenant="default", token_ttl_seconds=60)
        token, jti, exp = here.issue_user_token("c1", "user/*.rs", _user(), patient="p9", session_id="s1")
        p = here.verify(token)
        assert (p.user, p.role, p.fhir_user, p.patient, p.organization, p.session_id, p.clearances) == (
            "u-1", "practitioner", "Practitioner/1", "p9", "o1", "s1", frozenset({"R", "V"}))
        assert other.verify(token).token_id == jti  # cached in both
        store.write_sync("revoke", lambda tx: tx.revoke_jti(jti, exp * 1000, Clock().now_ms()))
        here.note_revoked(jti, exp)
        with pytest.raises(TokenError, match="revoked"):
            here.verify(token)  # at once, despite the cache
        deadline = time.monotonic() + REVOCATION_POLL_S + 1
        while time.monotonic() < deadline:
            try:
                other.verify(token)
            except TokenError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the other process never saw the revocation")
    finally:
        store.close()
