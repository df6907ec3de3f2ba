"""The ResourceStore contract: every adapter must pass these, with the same results.

SQLite-only checks (WAL, synchronous=FULL, group commit batching, the audit
trigger) stay in test_sqlite_store.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from fhirvault.adapters.memory_store import ConstraintError
from fhirvault.ports import (
    SEARCH_TAG_BYTES,
    AuditCheckpoint,
    AuditQuery,
    ClientRow,
    HistoryQuery,
    ResourceStore,
    StoredVersion,
    TenantKeyRow,
    WrappedKey,
    WriteTx,
)
from tests.store_engines import open_test_store

# What each adapter raises when a uniqueness rule is broken (the ports name no error).
DUPLICATE = (sqlite3.IntegrityError, ConstraintError, psycopg.IntegrityError)


@pytest.fixture(params=["sqlite", "memory", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResourceStore]:
    yield from open_test_store(request.param, tmp_path)


def _v(rid: str, version: int, ts: int = 1, type: str = "Patient", deleted: bool = False) -> StoredVersion:
    return StoredVersion(type, rid, version, ts, deleted, "" if deleted else "k1", b"" if deleted else f"{rid}/{version}".encode())


def _put(store: ResourceStore, *versions: StoredVersion, tenant: str = "t") -> list[int]:
    return store.write_sync("w", lambda tx: [tx.insert_version(tenant, v) for v in versions])


def _wk(key_id: str, kek: int = 1) -> WrappedKey:
    return WrappedKey(key_id, b"wrapped-" + key_id.encode(), kek, b"comp-" + key_id.encode())


def _fail(*_: object) -> None:
    raise ValueError("refused")


# -- resources ------------------------------------------------------------------
def test_insert_current_and_read_version(store: ResourceStore) -> None:
    assert store.max_seq() == 0
    assert store.read_current("t", "Patient", "a") is None

    def job(tx: WriteTx) -> tuple[int, int, StoredVersion | None]:
        s1 = tx.insert_version("t", _v("a", 1))
        s2 = tx.insert_version("t", _v("a", 2, ts=5))
        return s1, s2, tx.current("t", "Patient", "a")  # a job reads its own writes

    s1, s2, seen = store.write_sync("w", job)
    assert 0 < s1 < s2 == store.max_seq()
    assert seen == StoredVersion("Patient", "a", 2, 5, False, "k1", b"a/2", s2)
    assert store.read_current("t", "Patient", "a") == seen
    assert store.read_version("t", "Patient", "a", 1) == StoredVersion("Patient", "a", 1, 1, False, "k1", b"a/1", s1)
    assert store.read_version("t", "Patient", "a", 3) is None
    # routing is by (tenant, type, id)
    assert store.read_current("u", "Patient", "a") is None
    assert store.read_current("t", "Observation", "a") is None
    assert store.read_version("u", "Patient", "a", 1) is None


def test_seq_is_store_wide_and_the_given_seq_is_ignored(store: ResourceStore) -> None:
    [a] = _put(store, StoredVersion("Patient", "a", 1, 1, False, "k", b"x", seq=999))
    [b] = _put(store, _v("b", 1), tenant="u")
    [c] = _put(store, _v("c", 1, type="Observation"))
    assert a < b < c == store.max_seq()
    assert store.read_current("t", "Patient", "a").seq == a  # type: ignore[union-attr]


def test_current_follows_the_last_insert_and_keeps_deletions(store: ResourceStore) -> None:
    _put(store, _v("a", 1), _v("a", 2, deleted=True))
    cur = store.read_current("t", "Patient", "a")
    assert cur is not None and cur.deleted and cur.version == 2 and cur.blob == b""
    _put(store, _v("b", 2), _v("b", 1))  # the "current" map points at the last write, not the highest version
    assert store.read_current("t", "Patient", "b").version == 1  # type: ignore[union-attr]


def test_duplicate_version_is_refused_and_leaves_nothing(store: ResourceStore) -> None:
    _put(store, _v("a", 1))
    before = store.max_seq()
    with pytest.raises(DUPLICATE):
        _put(store, _v("b", 1), _v("a", 1, ts=9))
    assert store.read_current("t", "Patient", "b") is None
    assert store.read_version("t", "Patient", "a", 1).last_updated_ms == 1  # type: ignore[union-attr]
    assert store.max_seq() == before


# -- history --------------------------------------------------------------------
@pytest.fixture
def histories(store: ResourceStore) -> ResourceStore:
    """Patient/x v1..5 (ts 10..50) interleaved with other types, and one row of another tenant."""
    _put(store, _v("x", 1, 10), _v("x", 2, 20), _v("o", 1, 25, "Observation"), _v("x", 3, 30),
         _v("e", 1, 35, "Encounter"), _v("x", 4, 40))
    _put(store, _v("x", 1, 45), tenant="u")
    _put(store, _v("x", 5, 50))
    return store


def _names(rows: list[StoredVersion]) -> list[str]:
    return [f"{v.type}/{v.id}/{v.version}" for v in rows]


def test_history_is_newest_first_and_pages_by_seq(histories: ResourceStore) -> None:
    s = histories
    page = s.history(HistoryQuery("t", "Patient", "x", limit=2))
    assert [v.version for v in page] == [5, 4]
    rest = s.history(HistoryQuery("t", "Patient", "x", before_seq=page[-1].seq, limit=10))
    assert [v.version for v in rest] == [3, 2, 1]
    assert s.history(HistoryQuery("t", "Patient", "x", before_seq=rest[-1].seq)) == []
    assert s.history(HistoryQuery("t", "Patient", "x", limit=0)) == []
    everything = s.history(HistoryQuery("t"))
    assert _names(everything) == ["Patient/x/5", "Patient/x/4", "Encounter/e/1", "Patient/x/3",
                                  "Observation/o/1", "Patient/x/2", "Patient/x/1"]
    seqs = [v.seq for v in everything]
    assert seqs == sorted(seqs, reverse=True) and seqs[0] == s.max_seq()


def test_history_filters(histories: ResourceStore) -> None:
    s = histories

    def names(**kw: object) -> list[str]:
        return _names(s.history(HistoryQuery("t", **kw)))  # type: ignore[arg-type]

    assert names(since_ms=35) == ["Patient/x/5", "Patient/x/4", "Encounter/e/1"]  # since is inclusive
    assert names(type="Patient", since_ms=30) == ["Patient/x/5", "Patient/x/4", "Patient/x/3"]
    assert names(type="Observation") == ["Observation/o/1"]
    assert names(id="e") == ["Encounter/e/1"]
    assert names(types=frozenset({"Observation", "Encounter"})) == ["Encounter/e/1", "Observation/o/1"]
    assert names(types=frozenset()) == []
    assert names(type="Patient", types=frozenset({"Encounter"})) == []
    assert _names(s.history(HistoryQuery("u"))) == ["Patient/x/1"]
    assert s.history(HistoryQuery("nobody")) == []


def test_history_count_honours_filters_but_not_limit(histories: ResourceStore) -> None:
    s = histories
    assert s.history_count(HistoryQuery("t", "Patient", "x", limit=1)) == 5
    assert s.history_count(HistoryQuery("t")) == 7
    assert s.history_count(HistoryQuery("u")) == 1
    assert s.history_count(HistoryQuery("t", since_ms=35)) == 3
    assert s.history_count(HistoryQuery("t", types=frozenset({"Encounter", "Observation"}))) == 2
    fourth = s.read_version("t", "Patient", "x", 4)
    assert fourth is not None
    assert s.history_count(HistoryQuery("t", "Patient", "x", before_seq=fourth.seq)) == 3


# -- transactions ---------------------------------------------------------------
def test_a_failing_job_among_concurrent_writes_leaves_no_trace(store: ResourceStore) -> None:
    def bad(tx: WriteTx) -> int:
        tx.insert_version("t", _v("bad", 1))
        tx.append_audit("t", 1, lambda _s: b"bad")
        tx.set_meta("bad", b"1")
        raise ValueError("refused")

    def good(i: int) -> Callable[[WriteTx], int]:
        def job(tx: WriteTx) -> int:
            tx.append_audit("t", i, lambda _s: b"ok")
            return tx.insert_version("t", _v(f"p{i}", 1))
        return job

    async def run() -> list[int | BaseException]:
        jobs = [store.write("ok", good(i)) for i in range(60)]
        jobs.insert(30, store.write("bad", bad))
        return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(run())
    assert isinstance(results.pop(30), ValueError)
    seqs = [r for r in results if isinstance(r, int)]
    assert len(set(seqs)) == 60 and max(seqs) == store.max_seq()
    assert all(store.read_current("t", "Patient", f"p{i}") is not None for i in range(60))
    assert store.read_current("t", "Patient", "bad") is None
    assert store.get_meta("bad") is None
    assert store.history_count(HistoryQuery("t")) == 60
    assert [b for _, _, b in store.audit_entries("t")] == [b"ok"] * 60
    # the failed job's audit entry left no hole: positions stay contiguous (the Merkle leaves)
    assert [r.seq for r in store.audit_rows(limit=1000)] == list(range(1, 61))


def test_a_failing_job_undoes_every_kind_of_write(store: ResourceStore) -> None:
    def setup(tx: WriteTx) -> None:
        tx.insert_version("t", _v("a", 1))
        tx.insert_data_key("t", b"L1", _wk("dk1"), 1)
        tx.insert_tenant_key(TenantKeyRow("t", 1, b"tk1", "rk-a"), 1)
        tx.set_meta("m", b"old")
        tx.remember_jti("expired", 5, 1)
        tx.append_audit("t", 1, lambda _s: b"a1")

    store.write_sync("setup", setup)

    def snapshot() -> tuple[object, ...]:
        return (store.read_current("t", "Patient", "a"), store.read_current("t", "Patient", "new"),
                store.history(HistoryQuery("t")), store.max_seq(), store.data_key("t", "dk1"),
                store.data_key("t", "dk2"), store.tenant_keys("t"), store.get_meta("m"), store.get_meta("n"),
                store.client("c"), store.audit_entries("t"))

    before = snapshot()

    def everything_then_fail(tx: WriteTx) -> None:
        tx.insert_version("t", _v("a", 2))
        tx.insert_version("t", _v("new", 1))
        tx.insert_data_key("t", b"L2", _wk("dk2"), 2)
        tx.rewrap_data_key("dk1", b"re", b"rc", 2)
        tx.insert_tenant_key(TenantKeyRow("t", 2, b"tk2", "rk-a"), 2)
        tx.replace_tenant_key(TenantKeyRow("t", 1, b"tk1'", "rk-b"))
        tx.set_meta("m", b"new")
        tx.set_meta("n", b"new")
        tx.insert_client(ClientRow("c", "t", "C", None, "system/*.read", None, 1))
        assert tx.remember_jti("j", 100, 50)  # also forgets "expired"
        tx.append_audit("t", 2, lambda _s: b"a2")
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        store.write_sync("fail", everything_then_fail)
    assert snapshot() == before
    # the jti neither stuck nor was the expired one forgotten: both still behave as before
    assert store.write_sync("j", lambda tx: tx.remember_jti("j", 100, 2)) is True
    assert store.write_sync("j", lambda tx: tx.remember_jti("expired", 100, 2)) is False


def test_write_returns_the_job_value_and_raises_its_error(store: ResourceStore) -> None:
    assert store.write_sync("v", lambda tx: 42) == 42
    assert asyncio.run(store.write("v", lambda tx: "x")) == "x"
    with pytest.raises(ValueError, match="refused"):
        store.write_sync("f", _fail)
    with pytest.raises(ValueError, match="refused"):
        asyncio.run(store.write("f", _fail))


def test_write_after_close_raises(store: ResourceStore) -> None:
    store.write_sync("w", lambda tx: tx.set_meta("m", b"1"))
    store.close()
    store.close()  # closing twice is harmless
    with pytest.raises(RuntimeError):
        store.write_sync("w", lambda tx: tx.set_meta("m", b"2"))
    with pytest.raises(RuntimeError):
        asyncio.run(store.write("w", lambda tx: tx.set_meta("m", b"2")))


def test_write_does_not_block_the_event_loop_while_another_thread_writes(store: ResourceStore) -> None:
    writers = getattr(store, "writers", 1)  # PostgreSQL runs several transactions at once: occupy them all
    entered, release = threading.Semaphore(0), threading.Event()
    names = iter(range(writers))

    def slow(tx: WriteTx) -> str:
        tx.set_meta(f"slow{next(names)}", b"1")  # a row each (they would wait on one another's row lock)
        entered.release()
        release.wait(10)
        return "slow"

    async def run() -> str:
        def quick(tx: WriteTx) -> str:
            tx.set_meta("fast", b"1")
            return "fast"

        fast = asyncio.ensure_future(store.write("fast", quick))
        for _ in range(5):  # the loop keeps turning while that write waits for the store
            await asyncio.sleep(0.01)
        assert not fast.done()
        release.set()
        return await asyncio.wait_for(fast, 10)

    with ThreadPoolExecutor(writers) as pool:
        slow_done = []
        for _ in range(writers):  # one at a time, so that each goes to an idle writer
            slow_done.append(pool.submit(store.write_sync, "slow", slow))
            assert entered.acquire(timeout=10)
        try:
            assert asyncio.run(run()) == "fast"
        finally:
            release.set()
        assert [f.result(10) for f in slow_done] == ["slow"] * writers
    assert [store.get_meta(f"slow{n}") for n in range(writers)] == [b"1"] * writers
    assert store.get_meta("fast") == b"1"


def test_readers_never_see_a_job_half_done(store: ResourceStore) -> None:
    inserted, release = threading.Event(), threading.Event()

    def job(tx: WriteTx) -> None:
        tx.insert_version("t", _v("a", 1))
        inserted.set()
        release.wait(10)
        raise ValueError("refused")

    with ThreadPoolExecutor(2) as pool:
        writer = pool.submit(store.write_sync, "w", job)
        assert inserted.wait(10)
        reader = pool.submit(store.read_current, "t", "Patient", "a")
        time.sleep(0.05)  # give the reader its chance while the job is open
        release.set()
        with pytest.raises(ValueError):
            writer.result(10)
        assert reader.result(10) is None


def test_a_job_raising_stopiteration_fails_only_its_caller(store: ResourceStore) -> None:
    # asyncio futures refuse StopIteration; a store that passed it on would strand the batch.

    def bad(tx: WriteTx) -> None:
        tx.set_meta("bad", b"1")
        next(iter([]))  # an ordinary bug in a job

    async def run() -> tuple[BaseException | None, int | BaseException]:
        both = asyncio.gather(store.write("bad", bad), store.write("ok", lambda tx: 1), return_exceptions=True)
        return await asyncio.wait_for(both, 3)

    failed, ok = asyncio.run(run())
    assert isinstance(failed, RuntimeError) and ok == 1
    with pytest.raises(RuntimeError):  # the same for sync callers (PEP 479: never let it escape raw)
        store.write_sync("bad", bad)
    assert store.get_meta("bad") is None


# -- keys, meta, clients --------------------------------------------------------
def test_data_keys_are_unique_per_tenant_lookup_and_rewrap(store: ResourceStore) -> None:
    def setup(tx: WriteTx) -> WrappedKey | None:
        tx.insert_data_key("t", b"L1", _wk("dk1"), 1)
        tx.insert_data_key("u", b"L1", _wk("dk2"), 1)  # the same lookup in another tenant is another key
        with contextlib.suppress(*DUPLICATE):  # a refused insert inside a job undoes only itself
            tx.insert_data_key("t", b"L1", _wk("dk3"), 1)
        return tx.data_key_by_lookup("t", b"L1")

    assert store.write_sync("k", setup) == _wk("dk1")
    assert store.data_key("t", "dk1") == _wk("dk1")
    assert store.data_key("u", "dk1") is None  # key ids are read within their tenant
    assert store.data_key("t", "dk3") is None
    with pytest.raises(DUPLICATE):
        store.write_sync("k", lambda tx: tx.insert_data_key("t", b"L1", _wk("dk4"), 1))
    with pytest.raises(DUPLICATE):  # key ids are unique store-wide
        store.write_sync("k", lambda tx: tx.insert_data_key("v", b"L9", _wk("dk1"), 1))
    assert store.data_key("t", "dk4") is None and store.data_key("v", "dk1") is None

    store.write_sync("k", lambda tx: tx.insert_data_key("t", b"L2", _wk("dk5"), 1))
    store.write_sync("k", lambda tx: tx.rewrap_data_key("dk1", b"rewrapped", b"recomp", 2))
    assert store.data_key("t", "dk1") == WrappedKey("dk1", b"rewrapped", 2, b"recomp")
    assert store.write_sync("k", lambda tx: tx.data_key_by_lookup("t", b"L1")) == store.data_key("t", "dk1")
    assert store.data_key("t", "dk5") == _wk("dk5")
    keys = store.write_sync("k", lambda tx: tx.all_data_keys("t"))
    assert sorted(keys, key=lambda k: k.key_id) == [store.data_key("t", "dk1"), _wk("dk5")]
    assert store.write_sync("k", lambda tx: tx.all_data_keys("u")) == [_wk("dk2")]
    assert store.write_sync("k", lambda tx: tx.data_key_by_lookup("t", b"nope")) is None


def test_tenant_keys_insert_replace_and_order(store: ResourceStore) -> None:
    assert store.tenant_keys("t") == []

    def setup(tx: WriteTx) -> list[TenantKeyRow]:
        tx.insert_tenant_key(TenantKeyRow("t", 2, b"w2", "rk-a"), 2)
        tx.insert_tenant_key(TenantKeyRow("t", 1, b"w1", "rk-a"), 1)
        tx.insert_tenant_key(TenantKeyRow("u", 1, b"u1", "rk-a"), 1)
        return tx.tenant_keys("t")

    listed = store.write_sync("tk", setup)
    assert listed == store.tenant_keys("t")
    assert [r.version for r in listed] == [1, 2]  # ordered by version, not by insertion
    with pytest.raises(DUPLICATE):
        store.write_sync("tk", lambda tx: tx.insert_tenant_key(TenantKeyRow("t", 1, b"x", "rk-x"), 3))
    store.write_sync("tk", lambda tx: tx.replace_tenant_key(TenantKeyRow("t", 1, b"w1'", "rk-b")))
    assert store.tenant_keys("t") == [TenantKeyRow("t", 1, b"w1'", "rk-b"), TenantKeyRow("t", 2, b"w2", "rk-a")]
    assert store.tenant_keys("u") == [TenantKeyRow("u", 1, b"u1", "rk-a")]


def test_meta_round_trip(store: ResourceStore) -> None:
    assert store.get_meta("instance-id") is None
    store.write_sync("m", lambda tx: tx.set_meta("instance-id", b"\x00abc"))
    assert store.get_meta("instance-id") == b"\x00abc"
    store.write_sync("m", lambda tx: tx.set_meta("instance-id", b"def"))
    assert store.get_meta("instance-id") == b"def"


def test_clients(store: ResourceStore) -> None:
    secret = ClientRow("c1", "t", "Secret client", "$argon2id$x", "system/*.read", None, 10)
    jwt = ClientRow("c2", "t", "JWT client", None, "system/*.*", '{"keys": []}', 11, disabled=True)
    def insert_both(tx: WriteTx) -> None:
        tx.insert_client(secret)
        tx.insert_client(jwt)

    store.write_sync("c", insert_both)
    assert store.client("c1") == secret
    assert store.client("c2") == jwt
    assert store.client("nobody") is None
    with pytest.raises(DUPLICATE):
        store.write_sync("c", lambda tx: tx.insert_client(ClientRow("c1", "u", "Other", None, "", None, 12)))
    assert store.client("c1") == secret


def test_clients_are_listed_per_tenant_and_updated_in_place(store: ResourceStore) -> None:
    rows = [ClientRow("b", "t", "B", "$h1", "system/*.read", None, 20), ClientRow("a", "t", "A", None, "system/*.*", "{}", 30),
            ClientRow("z", "t", "Z", "$h2", "system/*.read", None, 20), ClientRow("o", "u", "Other", None, "", None, 1)]
    store.write_sync("c", lambda tx: [tx.insert_client(r) for r in rows])
    assert [c.client_id for c in store.clients("t")] == ["b", "z", "a"]  # oldest first, then by id
    assert [c.client_id for c in store.clients("u")] == ["o"]
    assert store.clients("nobody") == []

    def disable_and_rotate(tx: WriteTx) -> ClientRow | None:
        row = tx.client_for_update("b")
        assert row == rows[0]
        tx.update_client(ClientRow("b", "t", "B2", "$new", "system/Patient.read", None, 20, disabled=True))
        return tx.client_for_update("b")  # a job reads its own writes

    changed = ClientRow("b", "t", "B2", "$new", "system/Patient.read", None, 20, disabled=True)
    assert store.write_sync("u", disable_and_rotate) == changed
    assert store.client("b") == changed
    assert store.client("z") == rows[2]  # the others untouched
    assert store.write_sync("r", lambda tx: tx.client_for_update("missing")) is None
    # a failing job leaves the client as it was
    def fail_after_update(tx: WriteTx) -> None:
        tx.update_client(dataclasses.replace(changed, disabled=False))
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        store.write_sync("f", fail_after_update)
    assert store.client("b") == changed


# -- jti, audit -----------------------------------------------------------------
def test_jti_replay_and_expiry(store: ResourceStore) -> None:
    def remember(jti: str, expires_ms: int, now_ms: int) -> bool:
        return store.write_sync("j", lambda tx: tx.remember_jti(jti, expires_ms, now_ms))

    assert remember("a", 100, 10) is True
    assert remember("a", 200, 20) is False  # replay
    assert remember("b", 150, 20) is True
    assert remember("a", 300, 100) is False  # expires_ms == now: still remembered
    assert remember("a", 300, 101) is True  # expired entries are forgotten, so it is new again
    assert remember("b", 300, 149) is False
    assert remember("b", 300, 151) is True
    def remember_then_fail(tx: WriteTx) -> None:
        tx.remember_jti("c", 1000, 10)
        raise ValueError("refused")

    with pytest.raises(ValueError):
        store.write_sync("j", remember_then_fail)
    assert remember("c", 1000, 10) is True  # the failed job's jti was not kept


def test_audit_append_and_entries(store: ResourceStore) -> None:
    assert store.audit_entries("t") == []
    # seal may run at the end of the transaction (PostgreSQL), so each binds its own ts
    seqs = [seq() for seq in store.write_sync("a", lambda tx: [tx.append_audit(tn, ts, lambda _s, ts=ts: b"e%d" % ts)
                                             for tn, ts in [("t", 1), ("u", 2), ("t", 3), ("t", 4)]])]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    more = store.write_sync("a", lambda tx: tx.append_audit("t", 5, lambda _s: b"e5"))()
    assert more > seqs[-1]
    entries = store.audit_entries("t")
    assert entries == [(seqs[0], 1, b"e1"), (seqs[2], 3, b"e3"), (seqs[3], 4, b"e4"), (more, 5, b"e5")]
    assert store.audit_entries("u") == [(seqs[1], 2, b"e2")]
    assert store.audit_entries("t", after_seq=seqs[2]) == entries[2:]
    assert store.audit_entries("t", limit=2) == entries[:2]
    assert store.audit_entries("t", after_seq=more) == []


def test_audit_seal_sees_its_seq_and_rows_cover_every_tenant(store: ResourceStore) -> None:
    tag = b"T" * SEARCH_TAG_BYTES
    store.write_sync("a", lambda tx: [tx.append_audit(tn, ts, lambda seq: b"seq=%d" % seq, tag if ts == 2 else b"")
                                      for tn, ts in [("t", 1), ("u", 2), ("t", 3)]])
    rows = store.audit_rows()
    assert [(r.seq, r.tenant, r.blob) for r in rows] == [(1, "t", b"seq=1"), (2, "u", b"seq=2"), (3, "t", b"seq=3")]
    assert store.audit_size() == 3 and store.audit_rows(after_seq=2) == rows[2:]
    assert [r.seq for r in store.audit_find(AuditQuery("u", tags=(tag,)))] == [2]
    assert store.audit_find(AuditQuery("t", tags=(tag,))) == []
    assert [r.seq for r in store.audit_find(AuditQuery("t", descending=True))] == [3, 1]
    assert [r.seq for r in store.audit_find(AuditQuery("t", since_ms=2))] == [3]


def test_audit_nodes_and_checkpoints(store: ResourceStore) -> None:
    cp = AuditCheckpoint(4, 10, b"r" * 32, "k1", b"s" * 64)
    store.write_sync("c", lambda tx: (tx.add_audit_nodes([(1, 0, b"h" * 32)]), tx.add_audit_checkpoint(cp)))
    assert store.audit_node(1, 0) == b"h" * 32 and store.audit_node(1, 1) is None
    assert store.latest_audit_checkpoint() == cp and store.audit_checkpoints() == [cp]
    assert store.audit_checkpoints(after_size=4) == []
    with pytest.raises(DUPLICATE):
        store.write_sync("dup", lambda tx: tx.add_audit_checkpoint(cp))


def test_on_commit_runs_after_success_only(store: ResourceStore) -> None:
    seen: list[str] = []

    def ok(tx: WriteTx) -> None:
        tx.on_commit(lambda: seen.append("ok"))
        tx.set_meta("x", b"1")

    def bad(tx: WriteTx) -> None:
        tx.on_commit(lambda: seen.append("bad"))
        raise ValueError("refused")

    async def run() -> list[object]:
        return await asyncio.gather(store.write("ok", ok), store.write("bad", bad), return_exceptions=True)

    results = asyncio.run(run())
    assert isinstance(results[1], ValueError)
    assert seen == ["ok"]
    store.write_sync("sync", ok)
    assert seen == ["ok", "ok"]


def test_lookups_by_strings_holding_nul_find_nothing(store: ResourceStore) -> None:
    # e.g. a login name from a form: PostgreSQL text cannot hold NUL, SQLite can; both find nothing.
    _put(store, _v("a", 1))
    assert store.read_current("t", "Patient", "a\x00") is None
    assert store.read_version("t", "Patient", "a\x00", 1) is None
    assert store.user_by_username("t", "alice\x00") is None
    assert store.client("c\x00") is None and store.get_meta("m\x00") is None
    assert store.history(HistoryQuery("t", "Patient", "a\x00")) == []
    assert store.history_count(HistoryQuery("t\x00")) == 0


def test_meta_with_prefix_lists_only_names_under_the_prefix(store: ResourceStore) -> None:
    def fill(tx: WriteTx) -> None:
        for name in ("lifecycle/t/b", "lifecycle/t/a", "lifecycle/t", "lifecycle/tx/a", "lifecycle/u/a", "other"):
            tx.set_meta(name, name.encode())

    store.write_sync("fill", fill)
    assert store.meta_with_prefix("lifecycle/t/") == [("lifecycle/t/a", b"lifecycle/t/a"),
                                                      ("lifecycle/t/b", b"lifecycle/t/b")]
    assert store.meta_with_prefix("lifecycle/v/") == []
    assert [n for n, _ in store.meta_with_prefix("lifecycle/")] == [
        "lifecycle/t", "lifecycle/t/a", "lifecycle/t/b", "lifecycle/tx/a", "lifecycle/u/a"]
