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
    store._index.flush = lambda conn, gate: None  # type: ignore[method-assign]
    store.close()
    reopened = SqliteStore(path)
    try:
        assert _found(reopened, b"C" * 8) == ["p1"]  # searched on its tag list until flushed
    finally:
        reopened.close()  # the next flush writes it
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM search_tags").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM index_dirty").fetchone()[0] == 0
    conn.close()


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


# -- several processes on one file (serve --workers N): two stores stand for two processes --------------
def test_a_search_sees_what_another_process_wrote_before_any_index_flush(tmp_path: Path) -> None:
    one, two = SqliteStore(tmp_path / "db.sqlite3"), SqliteStore(tmp_path / "db.sqlite3")
    try:
        _tagged(one, "p1", [b"A" * 8])
        assert _found(two, b"A" * 8) == ["p1"]
        _tagged(two, "p1", [b"B" * 8])  # the other one updates it
        assert _found(one, b"B" * 8) == ["p1"]
        assert one._reader().execute("SELECT count(*) FROM search_tags").fetchone()[0] == 0
    finally:
        two.close()
        one.close()


def test_only_one_process_flushes_and_updates_from_another_are_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    one, two = SqliteStore(path), SqliteStore(path)
    a, b, c = b"A" * 8, b"B" * 8, b"C" * 8
    try:
        _tagged(one, "p1", [a, b])
        _tagged(two, "p1", [b, c])  # drops a, adds c
        _tagged(one, "p1", [a, c])  # drops b, adds a back
        assert _found(one, a) == ["p1"] and _found(two, c) == ["p1"] and _found(one, b) == []
    finally:
        one.close()  # each flushes when it closes, if it holds the index role (one at a time)
        assert not one._index_leader._held
        two.close()
    conn = sqlite3.connect(path)
    assert sorted(r[0] for r in conn.execute("SELECT tag FROM search_tags")) == [a, c]
    assert conn.execute("SELECT count(*) FROM index_dirty").fetchone()[0] == 0
    conn.close()


def test_a_revocation_is_published_to_the_other_processes(tmp_path: Path) -> None:
    from fhirvault.services.coherence import REVOCATIONS

    one, two = SqliteStore(tmp_path / "db.sqlite3"), SqliteStore(tmp_path / "db.sqlite3")
    try:
        head, _ = two.changes_since(None)
        assert two.changes_since(head) == (head, [])
        one.write_sync("revoke", lambda tx: tx.revoke_jti("jti-1", 10**13, 1))
        new, rows = two.changes_since(head)
        assert new == head + 1 and rows == [(REVOCATIONS, "")]
        assert two.revoked_jtis(0, 1)[-1][1] == "jti-1"
    finally:
        two.close()
        one.close()


def test_audit_entries_of_processes_writing_at_once_are_gap_free(tmp_path: Path) -> None:
    import threading

    stores = [SqliteStore(tmp_path / "db.sqlite3") for _ in range(2)]

    def append(store: SqliteStore, mark: bytes) -> None:
        for _ in range(50):
            store.write_sync("a", lambda tx: tx.append_audit("t", 1, lambda seq: mark + b"%d" % seq))

    threads = [threading.Thread(target=append, args=(s, m)) for s, m in zip(stores, (b"s", b"c"), strict=True)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows = stores[0].audit_rows(limit=1000)
        assert [r.seq for r in rows] == list(range(1, 101))
        assert all(r.blob.endswith(b"%d" % r.seq) for r in rows)
    finally:
        for s in stores:
            s.close()


def test_leadership_goes_to_one_process_and_moves_when_it_closes(tmp_path: Path) -> None:
    from fhirvault.adapters.sqlite_locks import FileLeadership

    one, two = FileLeadership(tmp_path), FileLeadership(tmp_path)
    assert one.lead("audit-checkpoints") is True
    assert two.lead("audit-checkpoints") is False
    assert two.lead("audit-verify") is True  # roles are independent
    assert one.lead("audit-checkpoints") is True  # held until closed
    one.close()
    assert two.lead("audit-checkpoints") is True
    two.close()


def test_a_resource_changed_during_a_flush_stays_dirty_from_what_the_flush_wrote(tmp_path: Path) -> None:
    """The flush plans from one snapshot and writes in slices; another process may update meanwhile."""
    import math

    from fhirvault.adapters.sqlite_locks import FileLeadership, WriteGate
    from fhirvault.adapters.sqlite_store import _connect, _DeferredIndex

    path = tmp_path / "db.sqlite3"
    a, b, c = b"A" * 8, b"B" * 8, b"C" * 8

    def write(tags: list[bytes]) -> None:  # as another process: its writer never flushes
        other = SqliteStore(path)
        other._index.flush = lambda conn, gate: None  # type: ignore[method-assign]
        _tagged(other, "p1", tags)
        other.close()

    write([a, b])
    conn = _connect(path)
    leader = FileLeadership(tmp_path)
    index, gate = _DeferredIndex(leader), WriteGate(tmp_path / "gate.lock")
    try:
        index._since = -math.inf
        assert index.step(conn, gate, budget=1) is False  # planned {a, b}; one row written
        write([b, c])  # meanwhile: drops a, adds c
        while not index.step(conn, gate, budget=1):
            pass
        assert conn.execute("SELECT flushed FROM index_dirty").fetchall() == [(a + b,)]
        assert sorted(r[0] for r in conn.execute("SELECT tag FROM search_tags")) == [a, b]
        index._since = -math.inf
        assert index.step(conn, gate) is True
        assert sorted(r[0] for r in conn.execute("SELECT tag FROM search_tags")) == [b, c]
        assert conn.execute("SELECT count(*) FROM index_dirty").fetchone()[0] == 0
    finally:
        gate.close()
        leader.close()
        conn.close()
