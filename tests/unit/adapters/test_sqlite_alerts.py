"""Both AlertStore implementations against the same contract, plus SQLite durability details."""

from __future__ import annotations

import dataclasses
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhirvault.adapters.sqlite_alerts import MemoryAlertStore, SqliteAlertStore
from fhirvault.services.alerts import Alert, AlertStore


def alert(id: str, **kw: Any) -> Alert:
    base: dict[str, Any] = dict(id=id, rule="brute_force", severity="high", summary="s", dedup_key="k:" + id,
                                state="open", first_ms=1000, last_ms=2000, count=1, labels={"client_id": "c"})
    base.update(kw)
    return Alert(**base)


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AlertStore]:
    s: AlertStore = SqliteAlertStore(tmp_path / "alerts.sqlite3") if request.param == "sqlite" else MemoryAlertStore()
    yield s
    s.close()


def test_save_get_and_replace(store: AlertStore) -> None:
    a = alert("a", labels={"user": "u1", "source_ip": "10.0.0.1"}, updated_by=None, note=None)
    store.save_many([a])
    assert store.get("a") == a
    b = dataclasses.replace(a, count=9, state="acknowledged", updated_by="admin", note="on it", last_ms=3000)
    store.save_many([b])
    assert store.get("a") == b
    assert store.get("missing") is None


def test_list_filters_and_order(store: AlertStore) -> None:
    store.save_many([
        alert("a", severity="low", last_ms=100),
        alert("b", severity="critical", last_ms=300, rule="mass_access"),
        alert("c", severity="medium", last_ms=200, state="closed"),
    ])
    assert [a.id for a in store.list()] == ["b", "c", "a"]
    assert [a.id for a in store.list(state="open")] == ["b", "a"]
    assert [a.id for a in store.list(rule="mass_access")] == ["b"]
    assert [a.id for a in store.list(min_severity="medium")] == ["b", "c"]
    assert [a.id for a in store.list(since_ms=150)] == ["b", "c"]
    assert [a.id for a in store.list(limit=1)] == ["b"]
    assert sorted(a.id for a in store.active()) == ["a", "b"]


def test_sqlite_survives_reopen_with_wal_full_and_private_file(tmp_path: Path) -> None:
    path = tmp_path / "alerts.sqlite3"
    s = SqliteAlertStore(path)
    s.save_many([alert("a"), alert("b", state="closed")])
    s.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    s2 = SqliteAlertStore(path)
    try:
        assert [a.id for a in s2.active()] == ["a"]
        assert s2.get("b") is not None
        conn = s2._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        s2.close()


def test_sqlite_failed_batch_rolls_back(tmp_path: Path) -> None:
    s = SqliteAlertStore(tmp_path / "a.sqlite3")
    try:
        with pytest.raises(KeyError):  # unknown severity fails while building the batch
            s.save_many([alert("a"), alert("b", severity="bogus")])
        assert s.get("a") is None
        s._conn.execute("CREATE TRIGGER boom BEFORE INSERT ON alerts WHEN NEW.id = 'y' "
                        "BEGIN SELECT RAISE(ABORT, 'boom'); END")
        with pytest.raises(sqlite3.IntegrityError):
            s.save_many([alert("x"), alert("y")])
        assert s.get("x") is None  # one transaction: nothing of the batch was kept
        s.save_many([alert("z")])
        assert s.get("z") is not None
    finally:
        s.close()


def test_sqlite_concurrent_writers(tmp_path: Path) -> None:
    s = SqliteAlertStore(tmp_path / "a.sqlite3")

    def write(n: int) -> None:
        for i in range(50):
            s.save_many([alert(f"{n}-{i}")])

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(s.list(limit=1000)) == 200
    finally:
        s.close()
