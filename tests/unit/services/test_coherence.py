"""Coherence between server processes: the invalidation feed of the PostgreSQL store and its consumer."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from fhirvault.adapters.postgres_store import PostgresStore
from fhirvault.services.coherence import RELATIONSHIPS, REVOCATIONS, Coherence
from fhirvault.services.relationships import Change, Relationships


class FakeFeed:
    def __init__(self) -> None:
        self.head = 0
        self.rows: list[tuple[int, str, str]] = []
        self.lost = False
        self.calls = 0

    def publish(self, *items: tuple[str, str]) -> None:
        self.head += 1
        self.rows += [(self.head, k, v) for k, v in items]

    def changes_since(self, seq: int | None) -> tuple[int, list[tuple[str, str]] | None]:
        self.calls += 1
        if seq is None or self.lost:
            return self.head, None
        return self.head, [(k, v) for s, k, v in self.rows if s > seq]


def test_sync_hands_each_kind_its_keys_once_and_costs_nothing_when_nothing_changed() -> None:
    feed = FakeFeed()
    coherence = Coherence(feed)
    seen: list[tuple[str, frozenset[str] | None]] = []
    coherence.on(REVOCATIONS, lambda keys: seen.append((REVOCATIONS, keys)))
    coherence.on(RELATIONSHIPS, lambda keys: seen.append((RELATIONSHIPS, keys)))
    coherence.sync()  # first call: everything may have changed
    assert sorted(seen, key=str) == [(RELATIONSHIPS, None), (REVOCATIONS, None)]
    seen.clear()
    coherence.sync()
    assert seen == []
    feed.publish((RELATIONSHIPS, "ref:Practitioner/1"))
    feed.publish((RELATIONSHIPS, "patient:9"), (REVOCATIONS, ""))
    coherence.sync()
    assert sorted(seen, key=str) == [(RELATIONSHIPS, frozenset({"ref:Practitioner/1", "patient:9"})),
                                     (REVOCATIONS, frozenset({""}))]
    seen.clear()
    feed.lost = True  # rows pruned before this process read them
    feed.publish((REVOCATIONS, ""))
    coherence.sync()
    assert sorted(seen, key=str) == [(RELATIONSHIPS, None), (REVOCATIONS, None)]


def test_a_failing_handler_leaves_the_changes_for_the_next_request() -> None:
    feed = FakeFeed()
    coherence = Coherence(feed)
    coherence.sync()
    calls: list[Any] = []

    def flaky(keys: frozenset[str] | None) -> None:
        calls.append(keys)
        if len(calls) == 1:
            raise psycopg.OperationalError("database gone")

    coherence.on(REVOCATIONS, flaky)
    feed.publish((REVOCATIONS, ""))
    with pytest.raises(psycopg.OperationalError):
        coherence.sync()
    coherence.sync()
    assert calls == [frozenset({""}), frozenset({""})]


def test_without_a_feed_sync_does_nothing() -> None:
    coherence = Coherence(None)
    coherence.on(REVOCATIONS, lambda keys: pytest.fail("called"))
    coherence.sync()
    assert not coherence.shared


def test_relationship_changes_round_trip_through_their_published_keys() -> None:
    looked: list[str | None] = []

    def find(rtype: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        looked.append(rtype)
        return []

    class Clock:
        def now_ms(self) -> int:
            return 0

    rel = Relationships(find, Clock())
    rel.patients_of("Practitioner/a", None)
    rel.patients_of("Practitioner/b", None)
    n = rel.lookups
    keys = Relationships.published_keys(Change(refs=frozenset({"Practitioner/a"})))
    assert keys == frozenset({"ref:Practitioner/a"})
    rel.invalidate_keys(keys)
    rel.patients_of("Practitioner/a", None)
    rel.patients_of("Practitioner/b", None)
    assert rel.lookups == n + 1  # only a's answer was dropped
    assert Relationships.published_keys(Change(everything=True)) == frozenset({"*"})


def test_postgres_publishes_invalidations_at_commit_in_commit_order(pg_url: str) -> None:
    store = PostgresStore(pg_url, read_pool_size=2)
    try:
        head, rows = store.changes_since(None)
        assert rows is None
        assert store.changes_since(head) == (head, [])

        def job(tx: Any) -> None:
            tx.invalidate(RELATIONSHIPS, "ref:Practitioner/1")
            tx.invalidate(RELATIONSHIPS, "ref:Practitioner/1")  # once per transaction is enough

        def failing(tx: Any) -> None:
            tx.invalidate(RELATIONSHIPS, "ref:Practitioner/never")
            raise ValueError("refused")

        store.write_sync("one", job)
        with pytest.raises(ValueError):
            store.write_sync("failing", failing)
        store.write_sync("revoke", lambda tx: tx.revoke_jti("jti-1", 10**13, 0))
        assert store.changes_since(head) == (head + 2, [(RELATIONSHIPS, "ref:Practitioner/1"), (REVOCATIONS, "")])
        assert store.changes_since(head + 1) == (head + 2, [(REVOCATIONS, "")])
        # Rows pruned under a reader that is behind: it is told to drop everything.
        with psycopg.connect(pg_url, autocommit=True) as c:
            c.execute("DELETE FROM coherence_log WHERE seq = %s", (head + 1,))
        assert store.changes_since(head) == (head + 2, None)
    finally:
        store.close()


def test_two_processes_creating_one_compartment_key_at_once_share_the_first(pg_url: str) -> None:
    """Two stores (two server processes): the second insert waits for the first, then uses its key."""
    import threading

    from fhirvault.adapters.memory_keys import MemoryRootKeyProvider
    from fhirvault.container import SystemClock
    from fhirvault.services.keys import KeyRing

    root = MemoryRootKeyProvider()
    first, second = PostgresStore(pg_url, read_pool_size=2), PostgresStore(pg_url, read_pool_size=2)
    try:
        ring_a = KeyRing(first, root, "default", SystemClock())
        ring_a.initialise()
        ring_b = KeyRing(second, root, "default", SystemClock())
        ring_b.load()
        inserted, release = threading.Event(), threading.Event()

        def slow_create(tx: Any) -> Any:
            found = ring_a.get_or_create_in_tx(tx, "patient/p1")
            inserted.set()
            release.wait(30)  # hold the transaction open while the other process inserts too
            return found

        holder: list[Any] = []
        t = threading.Thread(target=lambda: holder.append(first.write_sync("slow", slow_create)))
        t.start()
        assert inserted.wait(30)
        threading.Timer(0.5, release.set).start()  # commit the first while the second waits on the key
        key_b = ring_b.for_compartment_sync("patient/p1")
        t.join(30)
        key_a = holder[0][0]
        assert key_b.key_id == key_a.key_id
        assert ring_b.by_id(key_a.key_id).aead.open(key_a.aead.seal(b"x", b"ad"), b"ad") == b"x"
    finally:
        first.close()
        second.close()


def test_a_database_created_before_the_coherence_log_gets_it_at_the_next_start(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("DROP TABLE coherence_head, coherence_log")
        # As such a database was: at schema version 2, the step before the coherence tables.
        c.execute("UPDATE meta SET value = %s WHERE name = 'schema_version'", (b"2",))
    store = PostgresStore(pg_url, read_pool_size=1)
    try:
        head, _ = store.changes_since(None)
        store.write_sync("one", lambda tx: tx.invalidate(RELATIONSHIPS, "*"))
        assert store.changes_since(head) == (head + 1, [(RELATIONSHIPS, "*")])
    finally:
        store.close()
