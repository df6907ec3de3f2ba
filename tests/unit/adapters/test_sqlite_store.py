from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from fhirvault.adapters.sqlite_store import SqliteStore
from fhirvault.ports import HistoryQuery, StoredVersion


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "db.sqlite3")
    yield s
    s.close()


def _v(rid: str, version: int, ts: int = 1) -> StoredVersion:
    return StoredVersion("Patient", rid, version, ts, False, "k", b"blob")


def test_wal_and_full_sync(store: SqliteStore) -> None:
    conn = store._reader()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._writer_conn is not None
    # synchronous is per-connection; the writer's is what matters (2 = FULL)
    assert store.write_sync("t", lambda tx: tx._c.execute("PRAGMA synchronous").fetchone()[0]) == 2


def test_concurrent_writes_share_commits(store: SqliteStore) -> None:
    async def many() -> list[int]:
        return await asyncio.gather(*(store.write("w", lambda tx, i=i: tx.insert_version("t", _v(f"p{i}", 1)))
                                      for i in range(400)))

    seqs = asyncio.run(many())
    assert len(set(seqs)) == 400
    assert store.commits < 400  # group commit batched them
    assert store.read_current("t", "Patient", "p7") is not None


def test_a_failing_job_does_not_undo_its_batch_neighbours(store: SqliteStore) -> None:
    def bad(tx: object) -> None:
        tx.insert_version("t", _v("dup", 1))  # type: ignore[attr-defined]
        raise ValueError("refused")

    async def run() -> list[object]:
        return await asyncio.gather(
            store.write("ok1", lambda tx: tx.insert_version("t", _v("a", 1))),
            store.write("bad", bad),
            store.write("ok2", lambda tx: tx.insert_version("t", _v("b", 1))),
            return_exceptions=True,
        )

    results = asyncio.run(run())
    assert isinstance(results[1], ValueError)
    assert store.read_current("t", "Patient", "a") and store.read_current("t", "Patient", "b")
    assert store.read_current("t", "Patient", "dup") is None


def test_history_order_and_cursor(store: SqliteStore) -> None:
    for i in range(1, 6):
        store.write_sync("w", lambda tx, i=i: tx.insert_version("t", _v("x", i, ts=i * 10)))
    page = store.history(HistoryQuery("t", "Patient", "x", limit=2))
    assert [v.version for v in page] == [5, 4]
    nxt = store.history(HistoryQuery("t", "Patient", "x", before_seq=page[-1].seq, limit=10))
    assert [v.version for v in nxt] == [3, 2, 1]
    assert [v.version for v in store.history(HistoryQuery("t", since_ms=40))] == [5, 4]
    assert store.history_count(HistoryQuery("t", "Patient", "x")) == 5
    assert store.read_current("t", "Patient", "x").version == 5  # type: ignore[union-attr]


def test_audit_table_is_append_only(store: SqliteStore) -> None:
    store.write_sync("a", lambda tx: tx.append_audit("t", 1, lambda _s: b"x"))
    with pytest.raises(Exception, match="append-only"):
        store.write_sync("tamper", lambda tx: tx._c.execute("DELETE FROM audit_log"))
    assert len(store.audit_entries("t")) == 1


def _tagged(store: SqliteStore, rid: str, tags: list[bytes]) -> None:
    def job(tx: object) -> None:
        current = tx.current("t", "Patient", rid)  # type: ignore[attr-defined]
        version = current.version + 1 if current else 1
        tx.insert_version("t", _v(rid, version))  # type: ignore[attr-defined]
        tx.set_search_tags("t", "Patient", rid, tags)  # type: ignore[attr-defined]

    store.write_sync("w", job)


def _found(store: SqliteStore, tag: bytes) -> list[str]:
    from fhirvault.ports import SearchQuery

    return [v.id for _, v in store.search(SearchQuery("t", ("Patient",), ((tag,),)))]


def test_search_tags_are_searchable_before_and_after_the_deferred_flush(store: SqliteStore) -> None:
    a, b = b"A" * 8, b"B" * 8
    _tagged(store, "p1", [a])
    assert _found(store, a) == ["p1"]  # pending, not yet in search_tags
    assert store._reader().execute("SELECT count(*) FROM search_tags").fetchone()[0] == 0
    _tagged(store, "p1", [b])  # an update replaces the tags
    assert _found(store, b) == ["p1"]
    store.close()  # closing flushes
    reopened = SqliteStore(store.path)
    try:
        assert _found(reopened, b) == ["p1"]
        assert _found(reopened, a) == []
        assert reopened._reader().execute("SELECT count(*) FROM index_dirty").fetchone()[0] == 0
    finally:
        reopened.close()


def test_unflushed_tags_are_recovered_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = SqliteStore(path)
    _tagged(store, "p1", [b"C" * 8])
    # simulate a crash: the writer never flushes (the committed tag list and index_dirty row remain)
    store._index.flush = lambda conn: None  # type: ignore[method-assign]
    store.close()
    reopened = SqliteStore(path)
    try:
        assert _found(reopened, b"C" * 8) == ["p1"]
        assert reopened._reader().execute("SELECT count(*) FROM search_tags").fetchone()[0] == 1
    finally:
        reopened.close()


def test_flushed_tags_an_update_dropped_are_deleted_from_the_index(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3")
    tags = [i.to_bytes(8, "big") for i in range(1, 700)]  # more than one delete statement's worth
    _tagged(store, "p1", tags)
    _tagged(store, "p2", tags[:3])
    store.close()  # flushed
    store = SqliteStore(tmp_path / "db.sqlite3")
    _tagged(store, "p1", tags[600:])  # keeps 99 of its tags, drops 600
    store.close()
    conn = sqlite3.connect(tmp_path / "db.sqlite3")
    rows = conn.execute("SELECT tag, rk FROM search_tags ORDER BY rk, tag").fetchall()
    conn.close()
    by_rk: dict[int, set[bytes]] = {}
    for tag, rk in rows:
        by_rk.setdefault(rk, set()).add(tag)
    assert sorted(map(len, by_rk.values())) == [3, 99]
    assert set(tags[600:]) in by_rk.values()


def test_audit_entries_appended_by_another_process_do_not_collide(tmp_path: Path) -> None:
    server = SqliteStore(tmp_path / "db.sqlite3")
    cli = SqliteStore(tmp_path / "db.sqlite3")  # e.g. `fhirvault user create` on a live data dir
    try:
        server.write_sync("a", lambda tx: tx.append_audit("t", 1, lambda seq: b"s%d" % seq))
        cli.write_sync("a", lambda tx: tx.append_audit("t", 2, lambda seq: b"c%d" % seq))
        server.write_sync("a", lambda tx: tx.append_audit("t", 3, lambda seq: b"s%d" % seq))
        assert [(r.seq, r.blob) for r in server.audit_rows()] == [(1, b"s1"), (2, b"c2"), (3, b"s3")]
    finally:
        cli.close()
        server.close()


def test_a_data_dir_from_before_client_allow_lists_gains_the_column(tmp_path: Path) -> None:
    from fhirvault.ports import ClientRow

    path = tmp_path / "db.sqlite3"
    store = SqliteStore(path)
    store.close()
    conn = sqlite3.connect(path)  # the clients table as the first release made it, at its schema version (1)
    conn.executescript("UPDATE meta SET value=CAST('1' AS BLOB) WHERE name='schema_version';"
                       "DROP TABLE clients; CREATE TABLE clients (client_id TEXT PRIMARY KEY, tenant TEXT NOT NULL,"
                       " name TEXT NOT NULL, secret_hash TEXT, scopes TEXT NOT NULL, jwks TEXT,"
                       " created_ms INTEGER NOT NULL, disabled INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;"
                       "INSERT INTO clients VALUES ('old', 'default', 'old', NULL, 'system/*.rs', NULL, 1, 0);")
    conn.close()
    store = SqliteStore(path)
    try:
        old = store.client("old")
        assert old is not None and old.allowed_sources is None
        row = ClientRow("new", "default", "new", None, "system/*.rs", None, 2, allowed_sources="10.0.0.0/8")
        store.write_sync("clients.create", lambda tx: tx.insert_client(row))
        assert store.client("new") == row
    finally:
        store.close()
