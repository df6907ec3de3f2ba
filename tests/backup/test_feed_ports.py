"""The change-feed ports: every adapter answers the same, and capture → segment → apply rebuilds the source.

The feed algorithm (changefeed.py) only talks to ``FeedReader``/``FeedWriter``; these tests run it
over the SQLite adapter, the PostgreSQL one (a real server, started by the tests) and the in-memory
one on the same rows. An adapter for another engine joins the ``KINDS`` list and must pass them unchanged.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fhirvault.adapters.memory_backup import MemoryChangeFeed, MemoryFeedTables, MemoryTable
from fhirvault.adapters.postgres_backup import PostgresFeedTables
from fhirvault.adapters.sqlite_backup import SqliteFeedTables
from fhirvault.backup.changefeed import (
    APPEND_TABLES,
    AUDIT_DB,
    MAIN_DB,
    Applied,
    Capture,
    FeedState,
    Segment,
    apply_db,
    capture,
)
from fhirvault.backup.file_target import FileTarget
from fhirvault.backup.ports import FeedWriter, Row
from fhirvault.backup.replication import Replicator, replay
from tests import pg_server

# table -> (columns, primary key); a subset of the real schema with the same shapes
SCHEMA: dict[str, dict[str, tuple[list[str], tuple[str, ...]]]] = {
    MAIN_DB: {
        "resource_versions": (["seq", "tenant", "type", "id", "version", "last_updated", "deleted", "key_id", "blob"],
                              ("seq",)),
        "resources_current": (["rk", "tenant", "type", "id", "seq", "deleted", "tags"], ("rk",)),
        "search_tags": (["tag", "rk"], ("tag", "rk")),
        "index_dirty": (["rk"], ("rk",)),
        "data_keys": (["key_id", "tenant", "wrapped", "kek_version", "created_ms"], ("key_id",)),
        "meta": (["name", "value"], ("name",)),
    },
    AUDIT_DB: {
        "audit_log": (["seq", "tenant", "ts_ms", "tags", "blob"], ("seq",)),
        "audit_index": (["tag", "seq"], ("tag", "seq")),
        "audit_nodes": (["level", "idx", "hash"], ("level", "idx")),
        "audit_checkpoints": (["size", "root", "ts_ms"], ("size",)),
    },
}


_INTS = {"seq", "version", "last_updated", "rk", "kek_version", "created_ms", "ts_ms", "level", "idx", "size"}
_TEXTS = {"tenant", "type", "id", "key_id", "name"}
_IDENTITY = {("resource_versions", "seq"), ("resources_current", "rk")}  # generated keys in PostgreSQL


def _ddl(name: str, cols: list[str], key: tuple[str, ...], sqlite: bool, schema: str = "") -> str:
    def typed(c: str) -> str:
        if c in _INTS:
            kind = "INTEGER" if sqlite else "BIGINT"
            if not sqlite and (name, c) in _IDENTITY:
                kind += " GENERATED ALWAYS AS IDENTITY"
        elif c in _TEXTS:
            kind = "TEXT"
        elif c == "deleted":
            kind = "INTEGER" if sqlite else "BOOLEAN"
        else:
            kind = "BLOB" if sqlite else "BYTEA"
        return f"{c} {kind}"
    table = f"{schema}.{name}" if schema else name
    return f"CREATE TABLE {table} ({', '.join(map(typed, cols))}, PRIMARY KEY ({', '.join(key)}))"


def _sqlite_db(path: Path, tables: dict[str, tuple[list[str], tuple[str, ...]]]) -> SqliteFeedTables:
    conn = sqlite3.connect(path, isolation_level=None)
    for name, (cols, key) in tables.items():
        conn.execute(_ddl(name, cols, key, sqlite=True))
    return SqliteFeedTables(conn)


def _postgres_dbs() -> tuple[psycopg.Connection[Any], dict[str, FeedWriter]]:
    conn = psycopg.connect(pg_server.server().create_database(empty=True), autocommit=True)
    out: dict[str, FeedWriter] = {}
    for db, schema in ((MAIN_DB, "public"), (AUDIT_DB, "audit")):
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")  # type: ignore[arg-type]
        for name, (cols, key) in SCHEMA[db].items():
            conn.execute(_ddl(name, cols, key, sqlite=False, schema=schema))  # type: ignore[arg-type]
        out[db] = PostgresFeedTables(conn, schema)
    return conn, out


def _memory_db(tables: dict[str, tuple[list[str], tuple[str, ...]]]) -> MemoryFeedTables:
    return MemoryFeedTables({name: MemoryTable(list(cols), key) for name, (cols, key) in tables.items()})


Factory = Callable[[str], dict[str, FeedWriter]]
KINDS = ["sqlite", "postgresql", "memory"]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[[str, str], dict[str, FeedWriter]]]:
    opened: list[SqliteFeedTables] = []
    pg: list[psycopg.Connection[Any]] = []

    def new(kind: str, label: str) -> dict[str, FeedWriter]:
        if kind == "postgresql":
            conn, dbs = _postgres_dbs()
            pg.append(conn)
            return dbs
        out: dict[str, FeedWriter] = {}
        for db, tables in SCHEMA.items():
            if kind == "sqlite":
                t = _sqlite_db(tmp_path / f"{label}-{db}", tables)
                opened.append(t)
                out[db] = t
            else:
                out[db] = _memory_db(tables)
        return out

    yield new
    for t in opened:
        t.conn.close()
    for c in pg:
        c.close()


def tag(n: int) -> bytes:
    return n.to_bytes(8, "big")


def write(dbs: Mapping[str, FeedWriter], db: str, table: str, rows: list[Row], *, replace: bool = False) -> None:
    conn = dbs[db]
    with conn.transaction():
        cols = SCHEMA[db][table][0]
        if replace:
            conn.upsert(table, cols, rows)
        else:
            conn.insert_new(table, cols, rows)


def version(dbs: Mapping[str, FeedWriter], seq: int, rk: int, rid: str, v: int, ms: int, tags: list[int],
            deleted: int = 0) -> None:
    write(dbs, MAIN_DB, "resource_versions", [(seq, "t1", "Patient", rid, v, ms, deleted, "k1", b"ct%d" % seq)])
    blob = b"".join(tag(t) for t in tags)
    write(dbs, MAIN_DB, "resources_current", [(rk, "t1", "Patient", rid, seq, deleted, blob)], replace=True)


def audit(dbs: Mapping[str, FeedWriter], seq: int, ms: int, tags: list[int]) -> None:
    write(dbs, AUDIT_DB, "audit_log", [(seq, "t1", ms, b"".join(tag(t) for t in tags), b"entry%d" % seq)])
    write(dbs, AUDIT_DB, "audit_index", [(tag(t), seq) for t in tags])


def populate(dbs: Mapping[str, FeedWriter]) -> None:
    write(dbs, MAIN_DB, "meta", [("instance-id", b"abc"), ("secret", None)])
    write(dbs, MAIN_DB, "data_keys", [("dk1", "t1", b"w1", 1, 1_000), ("dk2", "t1", b"w2", 1, 2_000)])
    version(dbs, 1, 1, "a", 1, 10_000, [1, 2])
    version(dbs, 2, 2, "b", 1, 11_000, [3])
    version(dbs, 3, 1, "a", 2, 12_000, [2, 4])
    version(dbs, 4, 3, "c", 1, 13_000, [5])
    version(dbs, 5, 2, "b", 2, 14_000, [], deleted=1)
    for seq in range(1, 6):
        audit(dbs, seq, 10_000 + seq * 1_000, [100 + seq, 200])
    write(dbs, AUDIT_DB, "audit_nodes", [(0, 0, b"h00"), (0, 1, b"h01"), (1, 0, b"h10")])
    write(dbs, AUDIT_DB, "audit_checkpoints", [(2, b"root2", 12_000), (4, b"root4", 14_000)])


def drain(dbs: Mapping[str, FeedWriter], state: FeedState, max_rows: int) -> list[Capture]:
    caps = []
    for _ in range(50):
        cap = capture(dbs, state, max_rows)
        state = cap.state
        caps.append(cap)
        if not any(b.rows for b in cap.blocks):
            return caps
    raise AssertionError("the feed never caught up")


def contents(dbs: Mapping[str, FeedWriter]) -> dict[str, list[Row]]:
    return {f"{db}/{t}": conn.all_rows(t, conn.columns(t)) for db, conn in dbs.items() for t in conn.tables()}


def apply_all(dbs: Mapping[str, FeedWriter], caps: list[Capture], until_ms: int | None = None) -> Applied:
    out = Applied()
    current: dict[str, dict[str, int]] = {}
    for cap in caps:
        seg = Segment.decode(Segment({"index": 0}, cap.blocks).encode())  # through the wire format
        for db, conn in dbs.items():
            with conn.transaction():
                apply_db(conn, db, seg, current.setdefault(db, {}), until_ms, out)
        if out.cut:
            break
    return out


def test_every_adapter_captures_the_same_feed(make: Callable[[str, str], dict[str, FeedWriter]]) -> None:
    feeds = {}
    for kind in KINDS:
        src = make(kind, "src")
        populate(src)
        caps = drain(src, FeedState(), max_rows=3)
        audit(src, 6, 16_000, [106])  # a later cycle ships only what is new
        write(src, MAIN_DB, "data_keys", [("dk3", "t1", b"w3", 1, 3_000)])
        caps += drain(src, caps[-1].state, max_rows=3)
        feeds[kind] = [([(b.db, b.table, b.mode, b.columns, sorted(b.rows)) for b in c.blocks], c.before, c.after,
                        c.anchor_before, c.anchor_after, c.min_ms, c.max_ms, c.oldest_pending_ms) for c in caps]
    reference = feeds[KINDS[0]]
    assert len(reference) > 3  # capped segments: the cap and the pending commit time are exercised
    assert any(c[7] is not None for c in reference)
    for kind in KINDS[1:]:
        assert feeds[kind] == reference, kind


@pytest.mark.parametrize("kind", KINDS)
def test_capture_then_apply_rebuilds_the_source(kind: str, make: Callable[[str, str], dict[str, FeedWriter]]) -> None:
    src, dst = make(kind, "src"), make(kind, "dst")
    populate(src)
    caps = drain(src, FeedState(), max_rows=2)
    write(src, MAIN_DB, "data_keys", [("dk1", "t1", b"rewrapped", 2, 1_000)], replace=True)  # a key rotation
    write(src, MAIN_DB, "meta", [("later", b"x")])
    caps += drain(src, caps[-1].state, max_rows=2)
    out = apply_all(dst, caps)
    want, got = contents(src), contents(dst)
    # search_tags is derived: replay builds it from the current tag lists (the source's test rows have none)
    assert got.pop(f"{MAIN_DB}/search_tags") == sorted([(tag(2), 1), (tag(4), 1), (tag(5), 3)])
    want.pop(f"{MAIN_DB}/search_tags")
    assert got == want
    assert out.rows[f"{MAIN_DB}/resource_versions"] == 5
    assert not out.cut


@pytest.mark.parametrize("kind", KINDS)
def test_point_in_time_apply_keeps_a_prefix(kind: str, make: Callable[[str, str], dict[str, FeedWriter]]) -> None:
    src, dst = make(kind, "src"), make(kind, "dst")
    populate(src)
    caps = drain(src, FeedState(), max_rows=100)  # one segment holds both versions of "a"
    out = apply_all(dst, caps, until_ms=12_500)  # after a/2 (12,000), before c/1 (13,000)
    assert out.cut and out.last_ms == 12_000
    got = contents(dst)
    assert [r[0] for r in got[f"{MAIN_DB}/resource_versions"]] == [1, 2, 3]
    assert [r[0] for r in got[f"{AUDIT_DB}/audit_log"]] == [1, 2]  # ts 11,000 and 12,000
    assert {r[1] for r in got[f"{AUDIT_DB}/audit_index"]} == {1, 2}  # bound by the applied audit_log
    current = {r[0]: r for r in got[f"{MAIN_DB}/resources_current"]}
    assert sorted(current) == [1, 2]  # "c" did not exist yet
    assert current[2][4:6] == (2, 0)  # "b" at version 1 (its deletion came later)...
    assert current[2][6] == b"" and ("t1", "Patient", "b") in out.approximate_tags  # ...its tags were not shipped
    assert current[1][4:7] == (3, 0, tag(2) + tag(4))  # "a" is exact: its current version is applied


def test_replicator_and_replay_through_the_memory_adapter(tmp_path: Path) -> None:
    src = {db: _memory_db(t) for db, t in SCHEMA.items()}
    populate(src)
    (tmp_path / "target").mkdir()
    target = FileTarget(tmp_path / "target", "FR")
    key = bytes(range(32))
    rep = Replicator(MemoryChangeFeed(src), target, key, max_rows=2)
    shipped = 0
    while rep.run_once():
        shipped += 1
    assert shipped >= 3 and rep.watermarks[MAIN_DB]["resource_versions"] == 5
    assert not rep.run_once()  # idle: the change tokens did not move
    version(src, 6, 3, "c", 2, 20_000, [6])
    assert rep.run_once()
    dst = {db: _memory_db(t) for db, t in SCHEMA.items()}
    report = replay(target, key, tmp_path / "unused", {}, sink=MemoryChangeFeed(dst))
    assert report.gap is None and report.generation == rep.generation
    assert report.last_commit_ms == 20_000
    want, got = contents(src), contents(dst)
    want.pop(f"{MAIN_DB}/search_tags")
    got.pop(f"{MAIN_DB}/search_tags")
    assert got == want
    assert {s.name for s in APPEND_TABLES[AUDIT_DB]} <= {t.split("/")[1] for t in got if t.startswith(AUDIT_DB)}
