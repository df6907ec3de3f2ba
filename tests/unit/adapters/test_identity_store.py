"""Identity tables (users, apps, sessions, codes, refresh tokens, revoked jtis): same behaviour in
SqliteStore, MemoryStore and PostgresStore."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from fhirvault.adapters.memory_store import ConstraintError
from fhirvault.adapters.sqlite_store import SqliteStore
from fhirvault.ports import (
    AppRow,
    AuthCodeRow,
    LoginSessionRow,
    RefreshTokenRow,
    ResourceStore,
    UserRow,
)
from tests.store_engines import open_test_store


@pytest.fixture(params=["sqlite", "memory", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResourceStore]:
    yield from open_test_store(request.param, tmp_path)


def _user(uid: str = "u-1", name: str = "alice") -> UserRow:
    return UserRow(uid, "default", name, "$argon2id$x", "practitioner", "Practitioner/1", "org1", "R",
                   b"sealed", 0, False, 0, 0, 1000)


def _refresh(h: bytes, family: str = "f1", session: str = "s1") -> RefreshTokenRow:
    return RefreshTokenRow(h, family, "c1", "u-1", session, "patient/*.rs", "p1", 1, 10_000, 1)


def test_users(store: ResourceStore) -> None:
    store.write_sync("t", lambda tx: tx.insert_user(_user()))
    assert store.user("u-1") == _user()
    assert store.user_by_username("default", "alice") == _user()
    assert store.user_by_username("other", "alice") is None
    with pytest.raises((ConstraintError, sqlite3.IntegrityError, psycopg.IntegrityError)):
        store.write_sync("t", lambda tx: tx.insert_user(_user("u-2", "alice")))
    changed = dataclasses.replace(_user(), failures=3, locked_until_ms=-1)
    store.write_sync("t", lambda tx: tx.update_user(changed))
    assert store.user("u-1") == changed
    assert [u.user_id for u in store.users("default")] == ["u-1"]
    store.write_sync("t", lambda tx: tx.link_identity("psc", "https://idp", "sub-1", "u-1"))
    assert store.linked_user("psc", "https://idp", "sub-1") == "u-1"
    assert store.linked_user("psc", "https://idp", "sub-2") is None


def test_failed_job_leaves_no_user(store: ResourceStore) -> None:
    def job(tx: object) -> None:
        tx.insert_user(_user())  # type: ignore[attr-defined]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.write_sync("t", job)  # type: ignore[arg-type]
    assert store.user("u-1") is None


def test_apps_and_sessions(store: ResourceStore) -> None:
    app = AppRow("c1", ("https://a/cb", "http://127.0.0.1/cb"), True)
    store.write_sync("t", lambda tx: tx.upsert_app(app))
    assert store.app("c1") == app
    session = LoginSessionRow("s1", "u-1", 100, 100, "pwd otp")
    store.write_sync("t", lambda tx: tx.insert_login_session(session))
    store.write_sync("t", lambda tx: tx.touch_login_session("s1", 500))
    store.write_sync("t", lambda tx: tx.touch_login_session("s1", 200))  # never goes back
    assert store.login_session("s1") == dataclasses.replace(session, last_seen_ms=500)
    store.write_sync("t", lambda tx: tx.end_login_session("s1", 600))
    store.write_sync("t", lambda tx: tx.end_login_session("s1", 700))  # first end wins
    row = store.login_session("s1")
    assert row is not None and row.ended_ms == 600


def test_codes_are_single_use(store: ResourceStore) -> None:
    code = AuthCodeRow(b"h" * 32, "f1", "c1", "u-1", "s1", "https://a/cb", "openid", "ch", "n", "p1", 1, 5000)
    store.write_sync("t", lambda tx: tx.insert_code(code))
    first = store.write_sync("t", lambda tx: tx.consume_code(b"h" * 32, 1000))
    second = store.write_sync("t", lambda tx: tx.consume_code(b"h" * 32, 1000))
    assert first == code and second == dataclasses.replace(code, used=True)
    assert store.write_sync("t", lambda tx: tx.consume_code(b"x" * 32, 1000)) is None
    # purged an hour after expiry
    assert store.write_sync("t", lambda tx: tx.consume_code(b"h" * 32, 5000 + 3_600_001)) is None


def test_refresh_rotation_and_family_revocation(store: ResourceStore) -> None:
    store.write_sync("t", lambda tx: tx.insert_refresh(_refresh(b"a" * 32)))
    store.write_sync("t", lambda tx: tx.insert_refresh(_refresh(b"b" * 32)))
    store.write_sync("t", lambda tx: tx.insert_refresh(_refresh(b"c" * 32, family="f2", session="s2")))
    assert store.write_sync("t", lambda tx: tx.consume_refresh(b"a" * 32)) == _refresh(b"a" * 32)
    used = store.refresh_token(b"a" * 32)
    assert used is not None and used.used and not used.revoked
    store.write_sync("t", lambda tx: tx.record_issued("j1", "f1", "s1", 9_000))
    store.write_sync("t", lambda tx: tx.record_issued("j2", "f2", "s2", 9_000))
    store.write_sync("t", lambda tx: tx.record_issued("j3", "f1", "s1", 10))  # already expired
    n = store.write_sync("t", lambda tx: tx.revoke_tokens(100, family_id="f1"))
    assert n == 3  # two refresh tokens + one live access token
    assert [j for _s, j, _e in store.revoked_jtis(0, 100)] == ["j1"]
    assert not store.refresh_token(b"c" * 32).revoked  # type: ignore[union-attr]
    store.write_sync("t", lambda tx: tx.revoke_tokens(100, session_id="s2"))
    revoked = store.revoked_jtis(0, 100)
    assert [j for _s, j, _e in revoked] == ["j1", "j2"]
    assert store.revoked_jtis(revoked[0][0], 100) == revoked[1:]  # incremental by seq
    assert store.refresh_token(b"c" * 32).revoked  # type: ignore[union-attr]
    store.write_sync("t", lambda tx: tx.revoke_jti("j9", 50, 100))
    assert "j9" not in [j for _s, j, _e in store.revoked_jtis(0, 100)]  # expired: not reported


def test_revoke_single_refresh(store: ResourceStore) -> None:
    store.write_sync("t", lambda tx: tx.insert_refresh(_refresh(b"a" * 32)))
    row = store.write_sync("t", lambda tx: tx.revoke_refresh(b"a" * 32))
    assert row == _refresh(b"a" * 32)
    assert store.refresh_token(b"a" * 32).revoked  # type: ignore[union-attr]
    assert store.write_sync("t", lambda tx: tx.revoke_refresh(b"z" * 32)) is None


def test_old_data_directory_gains_the_tables(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.commit()
    conn.close()
    store = SqliteStore(path)
    try:
        store.write_sync("t", lambda tx: tx.insert_user(_user()))
        assert store.user("u-1") == _user()
    finally:
        store.close()


def test_end_user_sessions(store: ResourceStore) -> None:
    for sid, uid in (("s1", "u-1"), ("s2", "u-1"), ("s3", "u-2")):
        store.write_sync("t", lambda tx, sid=sid, uid=uid: tx.insert_login_session(LoginSessionRow(sid, uid, 1, 1, "pwd")))
    store.write_sync("t", lambda tx: tx.insert_refresh(_refresh(b"a" * 32, session="s1")))
    store.write_sync("t", lambda tx: tx.record_issued("j1", "f9", "s2", 9_000))
    store.write_sync("t", lambda tx: tx.record_issued("j3", "f8", "s3", 9_000))
    assert store.write_sync("t", lambda tx: tx.end_user_sessions("u-1", 100)) == 2
    assert store.login_session("s1").ended_ms == 100  # type: ignore[union-attr]
    assert store.login_session("s3").ended_ms == 0  # type: ignore[union-attr]
    assert store.refresh_token(b"a" * 32).revoked  # type: ignore[union-attr]
    assert [j for _s, j, _e in store.revoked_jtis(0, 100)] == ["j1"]
