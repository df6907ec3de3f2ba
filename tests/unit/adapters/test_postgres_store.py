"""PostgreSQL-only behaviour (the shared behaviour is in test_store_contract.py): several
processes on one database, the audit head lock, the application role, leader election."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from fhirvault.adapters.postgres_schema import APP_ROLE
from fhirvault.adapters.postgres_store import PostgresLeadership, PostgresStore
from fhirvault.ports import HistoryQuery, SearchQuery, StoredVersion, StoreUnavailable, WriteTx
from tests import pg_server


@pytest.fixture
def two_stores(pg_url: str) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database: what two server processes see (each has its own writer connection)."""
    a, b = PostgresStore(pg_url, read_pool_size=2), PostgresStore(pg_url, read_pool_size=2)
    yield a, b
    a.close()
    b.close()


def _v(rid: str) -> StoredVersion:
    return StoredVersion("Patient", rid, 1, 1, False, "k1", rid.encode())


def test_audit_seqs_stay_gap_free_and_in_commit_order_under_concurrent_writers(
        two_stores: tuple[PostgresStore, PostgresStore], pg_url: str) -> None:
    """Writers in two "processes"; a reader polling meanwhile must only ever see 1..k (no hole that a
    later commit fills: a hole would mean leaf k+1 committed before leaf k)."""
    holes: list[list[int]] = []
    stop = threading.Event()

    def poll() -> None:
        with psycopg.connect(pg_url, autocommit=True) as c:
            while not stop.is_set():
                seqs = [r[0] for r in c.execute("SELECT seq FROM audit.audit_log ORDER BY seq").fetchall()]
                if seqs != list(range(1, len(seqs) + 1)):
                    holes.append(seqs)

    def job(i: int) -> Callable[[WriteTx], Callable[[], int]]:
        def run(tx: WriteTx) -> Callable[[], int]:
            tx.insert_version("t", _v(f"p{i}"))
            return tx.append_audit("t", i, lambda seq: b"entry %d" % seq)
        return run

    async def burst(store: PostgresStore, start: int) -> list[int]:
        return [seq() for seq in await asyncio.gather(*[store.write("w", job(i)) for i in range(start, start + 150)])]

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            runs = [pool.submit(asyncio.run, burst(s, n * 150)) for n, s in enumerate([*two_stores, *two_stores])]
            seqs = [seq for r in runs for seq in r.result(60)]
    finally:
        stop.set()
        poller.join()
    assert sorted(seqs) == list(range(1, 601))
    a, _ = two_stores
    rows = a.audit_rows(limit=1000)
    assert [r.seq for r in rows] == list(range(1, 601))
    assert all(r.blob == b"entry %d" % r.seq for r in rows)  # each sealed with its own final seq
    assert holes == []


_WRITER_PROCESS = """
import asyncio, os, sys
from fhirvault.adapters.postgres_store import PostgresStore
from fhirvault.ports import StoredVersion

store = PostgresStore(sys.argv[1], read_pool_size=1)  # the default number of writer connections
name = sys.argv[2]

def job(i):
    def run(tx):
        tx.insert_version("t", StoredVersion("Patient", f"{name}-{i}", 1, 1, False, "k1", b"x"))
        tx.append_audit("t", i, lambda seq: b"%s %d" % (name.encode(), seq))
    return run

async def main():
    for start in range(0, 400, 100):  # bursts of 100 concurrent writes
        await asyncio.gather(*[store.write("w", job(i)) for i in range(start, start + 100)])

asyncio.run(main())
store.close()
"""


def test_audit_log_of_two_writer_processes_is_gap_free_in_commit_order_and_each_entry_sealed_with_its_seq(
        pg_url: str) -> None:
    """Two OS processes, each with several writer connections, append at once. A reader polling
    meanwhile must only ever see leaves 1..k: a hole that a later commit fills would be a leaf
    committed after a higher one (an unordered append, e.g. from a sequence, shows them at once)."""
    PostgresStore(pg_url, read_pool_size=1).close()  # the schema, before both start
    holes: list[list[int]] = []
    polls = 0
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER_PROCESS, pg_url, name]) for name in ("a", "b")]
    with psycopg.connect(pg_url, autocommit=True) as c:
        while any(p.poll() is None for p in procs):
            seqs = [r[0] for r in c.execute("SELECT seq FROM audit.audit_log ORDER BY seq").fetchall()]
            polls += 1
            if seqs != list(range(1, len(seqs) + 1)):
                holes.append(seqs)
    assert [p.wait(60) for p in procs] == [0, 0]
    assert holes == [] and polls > 5
    store = PostgresStore(pg_url, read_pool_size=1, writers=1)
    try:
        rows = store.audit_rows(limit=10_000)
        assert [r.seq for r in rows] == list(range(1, 801))
        assert all(r.blob.split()[1] == b"%d" % r.seq for r in rows)  # sealed with its final seq
        assert {r.blob.split()[0] for r in rows} == {b"a", b"b"}
        assert store.history_count(HistoryQuery("t")) == 800
    finally:
        store.close()


def test_serialize_makes_check_then_insert_atomic_across_processes(
        two_stores: tuple[PostgresStore, PostgresStore]) -> None:
    """The conditional-create pattern: lock the criteria in the database, re-check, insert."""
    def create_once(n: int) -> bool:
        def job(tx: WriteTx) -> bool:
            assert tx.serialize("conditional-create:Patient?identifier=x")
            if two_stores[0].history_count(HistoryQuery("t")):  # the check reads committed data, as search does
                return False
            threading.Event().wait(0.02)  # widen the race window between the check and the insert
            tx.insert_version("t", _v(f"p{n}"))  # a new id each time, as the server assigns
            return True
        return two_stores[n % 2].write_sync("c", job)

    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(create_once, range(8)))
    assert created.count(True) == 1
    assert two_stores[1].history_count(HistoryQuery("t")) == 1


def test_audit_entries_and_advisory_locks_share_a_transaction_but_two_jobs_locks_do_not(pg_url: str) -> None:
    """The audit head is locked only at the end of the batch, so a job may lock after an earlier job's
    (or its own) audit entry; a second job wanting an advisory lock starts the next transaction."""
    store = PostgresStore(pg_url, read_pool_size=2, writers=1)  # one writer: the jobs form one batch
    try:
        inside, release = threading.Event(), threading.Event()

        def hold(tx: WriteTx) -> None:
            inside.set()
            release.wait(10)

        def batch(jobs: list[tuple[str, Callable[[WriteTx], object]]]) -> tuple[list[object], int]:
            """Run ``jobs`` queued behind a blocked one (so they form one batch): results, commits taken."""
            inside.clear()
            release.clear()

            async def run() -> list[object]:
                futs = [store.write(name, fn) for name, fn in jobs]
                await asyncio.sleep(0.1)
                release.set()
                return list(await asyncio.gather(*futs, return_exceptions=True))

            with ThreadPoolExecutor(1) as pool:
                held = pool.submit(store.write_sync, "hold", hold)
                assert inside.wait(10)
                commits = store.commits
                results = asyncio.run(run())
                held.result(10)
            return results, store.commits - commits - 1

        def audited(tx: WriteTx) -> Callable[[], int]:
            return tx.append_audit("t", 1, lambda seq: b"a%d" % seq)

        def locking(key: str) -> Callable[[WriteTx], Callable[[], int]]:
            def job(tx: WriteTx) -> Callable[[], int]:
                seq = tx.append_audit("t", 2, lambda seq: b"b%d" % seq)
                assert tx.serialize(key)  # after its own entry: fine, the head is not locked yet
                return seq
            return job

        results, commits = batch([("a", audited), ("b", locking("k")), ("c", audited)])
        assert [seq() for seq in results] == [1, 2, 3] and commits == 1  # type: ignore[operator]
        # two jobs wanting advisory locks (the same key or not): the second one waits for the first's COMMIT
        results, commits = batch([("a", locking("k")), ("b", locking("k2")), ("c", locking("k"))])
        assert [seq() for seq in results] == [4, 5, 6] and commits == 3  # type: ignore[operator]
        assert [r.blob for r in store.audit_rows()] == [b"a1", b"b2", b"a3", b"b4", b"b5", b"b6"]

        def fails_after_locking(tx: WriteTx) -> None:
            locking("k")(tx)
            raise ValueError("refused")

        # a failed job's lock and entry went with its savepoint: the next job of the batch may lock
        results, commits = batch([("bad", fails_after_locking), ("b", locking("k"))])
        assert isinstance(results[0], ValueError) and commits == 1
        assert results[1]() == 7  # type: ignore[operator]
        assert store.audit_size() == 7
    finally:
        store.close()


def test_the_application_role_cannot_rewrite_the_audit_log(pg_url: str) -> None:
    srv = pg_server.server()
    srv.admin(f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname='fv_web') THEN"
              f" CREATE ROLE fv_web LOGIN IN ROLE {APP_ROLE}; END IF; END $$")
    app_url = pg_url.replace("postgres@", "fv_web@")
    store = PostgresStore(app_url, read_pool_size=2)  # the schema exists: the app role starts without DDL
    try:
        def job(tx: WriteTx) -> Callable[[], int]:
            tx.insert_version("t", _v("a"))
            tx.set_search_tags("t", "Patient", "a", [b"T" * 8])
            tx.revoke_jti("j", 10, 1)
            return tx.append_audit("t", 1, lambda _s: b"sealed", b"T" * 8)

        assert store.write_sync("w", job)() == 1
        assert store.read_current("t", "Patient", "a") is not None
    finally:
        store.close()
    with psycopg.connect(app_url, autocommit=True) as c:
        for sql in ("UPDATE audit.audit_log SET blob = '\\x00'", "DELETE FROM audit.audit_log",
                    "TRUNCATE audit.audit_log", "DELETE FROM audit.audit_checkpoints",
                    "UPDATE audit.audit_index SET seq = 9", "DELETE FROM audit.audit_nodes"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(sql)  # type: ignore[arg-type]
        assert c.execute("SELECT count(*) FROM audit.audit_log").fetchone() == (1,)
    # the owner is stopped by the append-only triggers (accidents; tampering is caught by audit verify)
    with psycopg.connect(pg_url, autocommit=True) as c, pytest.raises(psycopg.errors.RaiseException):
        c.execute("DELETE FROM audit.audit_log")


def test_one_leader_per_role_and_the_role_passes_on_when_it_goes(pg_url: str) -> None:
    first, second = PostgresLeadership(pg_url), PostgresLeadership(pg_url)
    try:
        assert first.lead("audit-checkpoints")
        assert first.lead("audit-checkpoints")  # still
        assert not second.lead("audit-checkpoints")
        assert second.lead("other-singleton")  # roles are independent
        first.close()  # process gone: its session and lock with it
        assert second.lead("audit-checkpoints")
        assert not first.lead("audit-checkpoints")  # reconnects, but the role is taken
    finally:
        first.close()
        second.close()


def test_a_leader_that_lost_its_connection_knows_it(pg_url: str) -> None:
    leader, other = PostgresLeadership(pg_url), PostgresLeadership(pg_url)
    try:
        assert leader.lead("r")
        pg_server.server().admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'fhirvault-leader'"
            " AND pid <> pg_backend_pid()")
        assert other.lead("r")  # the lock went with the session
        assert not leader.lead("r")
    finally:
        leader.close()
        other.close()


def test_writer_reconnects_after_losing_its_connection(pg_url: str) -> None:
    store = PostgresStore(pg_url, read_pool_size=2, writers=1)
    try:
        store.write_sync("m", lambda tx: tx.set_meta("a", b"1"))
        kill = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'fhirvault-writer'")
        pg_server.server().admin(kill)
        # The session died before this batch's COMMIT: nothing of it can be stored, so the writer runs it
        # again on a new session and the caller never sees the outage.
        store.write_sync("m", lambda tx: tx.set_meta("b", b"1"))
        assert store.get_meta("b") == b"1"
        # A session lost again on the second attempt: the batch fails, known not stored (503, not 500).
        calls = 0

        def dies_twice(tx: WriteTx) -> None:
            nonlocal calls
            calls += 1
            pg_server.server().admin(kill)
            tx.set_meta("c", b"1")

        with pytest.raises(StoreUnavailable) as failed:
            store.write_sync("m", dies_twice)
        assert not failed.value.outcome_unknown and calls == 2
        store.write_sync("m", lambda tx: tx.set_meta("d", b"1"))  # the next one reconnects
        assert (store.get_meta("c"), store.get_meta("d")) == (None, b"1")
    finally:
        store.close()


def test_acknowledged_writes_survive_a_database_crash(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A server of its own, stopped in `immediate` mode (no shutdown checkpoint: recovery replays the WAL)."""
    base = tmp_path_factory.mktemp("crash")
    base.chmod(0o711)
    port = pg_server.free_port()
    script = str(pg_server.SCRIPT)
    url = subprocess.run([script, "start", str(base / "pg"), str(port)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        store = PostgresStore(url, read_pool_size=2)
        acked: list[int] = []

        def job(i: int) -> object:
            def run(tx: WriteTx) -> Callable[[], int]:
                tx.insert_version("t", _v(f"p{i}"))
                return tx.append_audit("t", i, lambda seq: b"%d" % seq)
            return run

        async def writes() -> None:
            async def writer(k: int) -> None:  # 8 writers, each one write at a time, until the crash
                for i in range(k, 100_000, 8):
                    try:
                        await store.write("w", job(i))
                    except StoreUnavailable:
                        return
                    acked.append(i)
            await asyncio.gather(*(writer(k) for k in range(8)))

        crash = threading.Timer(1.5, lambda: subprocess.run(
            ["runuser", "-u", "postgres", "--"] * (os.getuid() == 0) + [
                str(Path(pg_server.bindir()) / "pg_ctl"), "-D", str(base / "pg" / "data"), "-m", "immediate",
                "stop"], check=True, capture_output=True))
        crash.start()
        asyncio.run(writes())
        crash.join()
        with contextlib.suppress(Exception):
            store.close()
        subprocess.run([script, "start", str(base / "pg"), str(port)], check=True, capture_output=True)
        after = PostgresStore(url, read_pool_size=2)
        try:
            assert acked, "no write was acknowledged before the crash"
            assert all(after.read_current("t", "Patient", f"p{i}") is not None for i in acked)
            seqs = [r.seq for r in after.audit_rows(limit=1_000_000)]
            assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= len(acked)
        finally:
            after.close()
    finally:
        subprocess.run([script, "stop", str(base / "pg")], check=False, capture_output=True)


def test_a_wide_criterion_is_checked_in_the_candidates_tag_lists_not_by_one_index_seek_per_tag(pg_url: str) -> None:
    """A range criterion (dozens of block tags) beside a more selective one: checking it with index seeks
    cost one seek per tag and candidate (52 tags: ~70 index pages a candidate, 0.4-0.8 s for a one-day
    Observation search on a 100k store); the candidate's own tag list answers it without the index."""
    store = PostgresStore(pg_url, read_pool_size=1)
    common, wide = b"code0000", [b"day%05d" % i for i in range(48)]
    try:
        def load(tx: WriteTx) -> None:
            for i in range(400):
                tx.insert_version("t", StoredVersion("Observation", f"o{i}", 1, 1, False, "k1", b"x"))
                # every candidate carries the common tag; every other one a tag of the wide group
                tx.set_search_tags("t", "Observation", f"o{i}", [common, b"pad%05d" % i]
                                   + ([wide[i % len(wide)]] if i % 2 else []))
            for i in range(1000):  # in the range but not of the code: the range group is the larger one
                tx.insert_version("t", StoredVersion("Observation", f"x{i}", 1, 1, False, "k1", b"x"))
                tx.set_search_tags("t", "Observation", f"x{i}", [wide[i % len(wide)]])
        store.write_sync("load", load)
        statements: list[tuple[str, object]] = []
        query = store._all

        def capture(sql: str, args: object = ()) -> list[tuple[object, ...]]:
            statements.append((sql, args))
            return query(sql, args)

        store._all = capture  # type: ignore[method-assign]
        found = store.search(SearchQuery("t", ("Observation",), ((common,), tuple(wide)), limit=1000))
        assert sorted(v.id for _, v in found) == sorted(f"o{i}" for i in range(1, 400, 2))
        sql, args = statements[-1]
        with psycopg.connect(pg_url, autocommit=True) as c:
            # the plan of a large store (per-candidate checks), which a 1,400-row table would not get
            c.execute("ANALYZE")
            c.execute("SET enable_hashjoin = off")
            c.execute("SET enable_mergejoin = off")
            row = c.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, args).fetchone()  # type: ignore[call-overload]
        plan = row[0][0]["Plan"]
        pages = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
        assert pages < 3000, f"{pages} buffer pages for 400 candidates"  # before: 6,800 here
    finally:
        store.close()
