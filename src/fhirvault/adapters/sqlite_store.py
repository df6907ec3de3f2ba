"""ResourceStore on SQLite in WAL mode, with group commit.

One writer thread owns the only write connection. Callers hand it closures;
it runs every closure waiting in the queue inside one ``BEGIN IMMEDIATE`` …
``COMMIT`` (each under its own SAVEPOINT, so one failure does not undo the
others), and only then wakes the callers. ``synchronous=FULL`` makes SQLite
fsync the WAL at every commit, so an acknowledged write survives a crash or a
power cut; batching is what lets many writers share one fsync.

Reads use one connection per thread and never block on the writer (WAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from fhirvault.adapters.sqlite_schema import SCHEMA, SCHEMA_VERSION
from fhirvault.ports import (
    SEARCH_TAG_BYTES,
    ClientRow,
    HistoryQuery,
    SearchQuery,
    StoredVersion,
    TenantKeyRow,
    WrappedKey,
)

T = TypeVar("T")
log = logging.getLogger("fhirvault.store")

_MAX_BATCH = 512
_VERSION_COLUMNS = "type, id, version, last_updated, deleted, key_id, blob, seq"
# Statements are built from constants only; every value is a bound parameter.
_SELECT_VERSIONS = f"SELECT {_VERSION_COLUMNS} FROM resource_versions"  # noqa: S608
_SELECT_CURRENT = (
    f"{_SELECT_VERSIONS} WHERE seq = (SELECT seq FROM resources_current WHERE tenant=? AND type=? AND id=?)"  # noqa: S608
)


def _version(row: tuple[Any, ...]) -> StoredVersion:
    return StoredVersion(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6], row[7])


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA secure_delete=ON")  # freed pages are zeroed, not left behind
    # The search index is keyed by random tags, so writes touch pages all over it: keep them cached.
    conn.execute("PRAGMA cache_size=-262144")  # KiB: 256 MiB for the writer
    return conn


class _Tx:
    """WriteTx over the writer connection."""

    __slots__ = ("_c",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn

    def current(self, tenant: str, type: str, id: str) -> StoredVersion | None:
        row = self._c.execute(
            _SELECT_CURRENT,
            (tenant, type, id),
        ).fetchone()
        return _version(row) if row else None

    def insert_version(self, tenant: str, v: StoredVersion) -> int:
        cur = self._c.execute(
            "INSERT INTO resource_versions (tenant, type, id, version, last_updated, deleted, key_id, blob)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (tenant, v.type, v.id, v.version, v.last_updated_ms, int(v.deleted), v.key_id, v.blob),
        )
        seq = cur.lastrowid
        assert seq is not None
        self._c.execute(
            "INSERT INTO resources_current (tenant, type, id, seq, deleted) VALUES (?,?,?,?,?)"
            " ON CONFLICT (tenant, type, id) DO UPDATE SET seq=excluded.seq, deleted=excluded.deleted",
            (tenant, v.type, v.id, seq, int(v.deleted)),
        )
        return seq

    def set_search_tags(self, tenant: str, type: str, id: str, tags: list[bytes]) -> None:
        row = self._c.execute(
            "SELECT rk, tags FROM resources_current WHERE tenant=? AND type=? AND id=?", (tenant, type, id)
        ).fetchone()
        if row is None:
            raise LookupError("set_search_tags on a resource that has no version")
        rk, old = row
        new = b"".join(sorted(set(tags)))
        if old == new:
            return
        old_set = {old[i : i + SEARCH_TAG_BYTES] for i in range(0, len(old), SEARCH_TAG_BYTES)}
        new_set = {new[i : i + SEARCH_TAG_BYTES] for i in range(0, len(new), SEARCH_TAG_BYTES)}
        self._c.executemany("DELETE FROM search_tags WHERE tag=? AND rk=?", [(t, rk) for t in old_set - new_set])
        self._c.executemany("INSERT OR IGNORE INTO search_tags (tag, rk) VALUES (?,?)",
                            [(t, rk) for t in new_set - old_set])
        self._c.execute("UPDATE resources_current SET tags=? WHERE rk=?", (new, rk))

    def data_key_by_lookup(self, tenant: str, lookup: bytes) -> WrappedKey | None:
        row = self._c.execute(
            "SELECT key_id, wrapped, kek_version, compartment FROM data_keys WHERE tenant=? AND lookup=?",
            (tenant, lookup),
        ).fetchone()
        return WrappedKey(*row) if row else None

    def insert_data_key(self, tenant: str, lookup: bytes, key: WrappedKey, created_ms: int) -> None:
        self._c.execute(
            "INSERT INTO data_keys (key_id, tenant, lookup, wrapped, kek_version, compartment, created_ms)"
            " VALUES (?,?,?,?,?,?,?)",
            (key.key_id, tenant, lookup, key.wrapped, key.kek_version, key.compartment, created_ms),
        )

    def rewrap_data_key(self, key_id: str, wrapped: bytes, compartment: bytes, kek_version: int) -> None:
        self._c.execute(
            "UPDATE data_keys SET wrapped=?, compartment=?, kek_version=? WHERE key_id=?",
            (wrapped, compartment, kek_version, key_id),
        )

    def all_data_keys(self, tenant: str) -> list[WrappedKey]:
        rows = self._c.execute(
            "SELECT key_id, wrapped, kek_version, compartment FROM data_keys WHERE tenant=?", (tenant,)
        ).fetchall()
        return [WrappedKey(*r) for r in rows]

    def insert_tenant_key(self, row: TenantKeyRow, created_ms: int) -> None:
        self._c.execute(
            "INSERT INTO tenant_keys (tenant, version, wrapped, root_key_id, created_ms) VALUES (?,?,?,?,?)",
            (row.tenant, row.version, row.wrapped, row.root_key_id, created_ms),
        )

    def replace_tenant_key(self, row: TenantKeyRow) -> None:
        self._c.execute(
            "UPDATE tenant_keys SET wrapped=?, root_key_id=? WHERE tenant=? AND version=?",
            (row.wrapped, row.root_key_id, row.tenant, row.version),
        )

    def tenant_keys(self, tenant: str) -> list[TenantKeyRow]:
        return _tenant_keys(self._c, tenant)

    def set_meta(self, name: str, value: bytes) -> None:
        self._c.execute(
            "INSERT INTO meta (name, value) VALUES (?,?) ON CONFLICT (name) DO UPDATE SET value=excluded.value",
            (name, value),
        )

    def insert_client(self, row: ClientRow) -> None:
        self._c.execute(
            "INSERT INTO clients (client_id, tenant, name, secret_hash, scopes, jwks, created_ms, disabled)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (row.client_id, row.tenant, row.name, row.secret_hash, row.scopes, row.jwks,
             row.created_ms, int(row.disabled)),
        )

    def remember_jti(self, jti: str, expires_ms: int, now_ms: int) -> bool:
        self._c.execute("DELETE FROM seen_jti WHERE expires_ms < ?", (now_ms,))
        cur = self._c.execute(
            "INSERT INTO seen_jti (jti, expires_ms) VALUES (?,?) ON CONFLICT DO NOTHING", (jti, expires_ms)
        )
        return cur.rowcount == 1

    def append_audit(self, tenant: str, ts_ms: int, blob: bytes) -> int:
        cur = self._c.execute("INSERT INTO audit_log (tenant, ts_ms, blob) VALUES (?,?,?)", (tenant, ts_ms, blob))
        assert cur.lastrowid is not None
        return cur.lastrowid


def _tenant_keys(conn: sqlite3.Connection, tenant: str) -> list[TenantKeyRow]:
    rows = conn.execute(
        "SELECT tenant, version, wrapped, root_key_id FROM tenant_keys WHERE tenant=? ORDER BY version",
        (tenant,),
    ).fetchall()
    return [TenantKeyRow(*r) for r in rows]


# A job: its name, the closure, and where to deliver the outcome: a thread
# future (sync callers) or an asyncio future with its loop (async callers).
_Job = tuple[str, Callable[[Any], Any], Any, asyncio.AbstractEventLoop | None]
_STOP = object()


def _deliver(fut: Any, ok: bool, value: Any) -> None:
    if fut.cancelled():  # the caller went away; the write itself is committed regardless
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def _settle(outcomes: list[tuple[Any, bool, Any]]) -> None:
    """Deliver a batch's outcomes on the event loop: one wake-up per batch, not per job."""
    for fut, ok, value in outcomes:
        try:
            _deliver(fut, ok, value)
        except Exception:  # never strand the rest of the batch
            log.exception("could not deliver a write outcome")


class SqliteStore:
    """The embedded default store: one SQLite file in WAL mode."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer_conn = _connect(path)
        self._migrate()
        self._closed = False
        self._lifecycle = threading.Lock()
        self._thread = threading.Thread(target=self._run_writer, name="fhirvault-writer", daemon=True)
        self._thread.start()
        self.commits = 0  # batches committed (for metrics and tests)
        self.batched_jobs = 0

    # -- schema -------------------------------------------------------------
    def _migrate(self) -> None:
        conn = self._writer_conn
        conn.executescript(SCHEMA)  # idempotent: every statement is IF NOT EXISTS
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta (name, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION).encode(),))
        elif int(row[0]) != SCHEMA_VERSION:
            conn.execute("ROLLBACK")
            raise RuntimeError(f"database schema version {int(row[0])} is not supported by this release")
        conn.execute("COMMIT")

    # -- writes -------------------------------------------------------------
    def _run_writer(self) -> None:
        conn = self._writer_conn
        tx = _Tx(conn)
        while True:
            first = self._queue.get()
            if first is _STOP:
                break
            batch: list[_Job] = [first]
            stop = False
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._commit_batch(conn, tx, batch)
            if stop:
                break
        conn.close()

    def _commit_batch(self, conn: sqlite3.Connection, tx: _Tx, batch: list[_Job]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for _name, fn, _fut, _loop in batch:
                conn.execute("SAVEPOINT job")
                try:
                    value = fn(tx)
                except BaseException as exc:  # the job's own failure: undo only its work
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    if isinstance(exc, StopIteration):  # futures refuse it (PEP 479 does the same)
                        wrapped = RuntimeError("write job raised StopIteration")
                        wrapped.__cause__ = exc
                        exc = wrapped
                    outcomes.append((False, exc))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((True, value))
            conn.execute("COMMIT")
        except Exception as exc:  # the commit itself failed: nothing is durable
            log.error("write batch failed", extra={"error": type(exc).__name__})
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            outcomes = [(False, exc)] * len(batch)
        else:
            self.commits += 1
            self.batched_jobs += len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, bool, Any]]] = {}
        for (_name, _fn, fut, loop), (ok, value) in zip(batch, outcomes, strict=True):
            if loop is None:
                _deliver(fut, ok, value)
            else:
                by_loop.setdefault(loop, []).append((fut, ok, value))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_settle, items)

    def _enqueue(self, job: _Job) -> None:
        # Check and enqueue under the lock close() takes, so no job can land behind the stop marker.
        with self._lifecycle:
            if self._closed:
                raise RuntimeError("store is closed")
            self._queue.put(job)

    async def write(self, name: str, fn: Callable[[Any], T]) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._enqueue((name, fn, fut, loop))
        return await fut

    def write_sync(self, name: str, fn: Callable[[Any], T]) -> T:
        fut: Future[T] = Future()
        self._enqueue((name, fn, fut, None))
        return fut.result()

    # -- reads --------------------------------------------------------------
    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA cache_size=-65536")  # KiB: 64 MiB per reader thread
            self._local.conn = conn
        return conn

    def read_current(self, tenant: str, type: str, id: str) -> StoredVersion | None:
        row = self._reader().execute(
            _SELECT_CURRENT,
            (tenant, type, id),
        ).fetchone()
        return _version(row) if row else None

    def read_version(self, tenant: str, type: str, id: str, version: int) -> StoredVersion | None:
        row = self._reader().execute(
            f"{_SELECT_VERSIONS} WHERE tenant=? AND type=? AND id=? AND version=?",
            (tenant, type, id, version),
        ).fetchone()
        return _version(row) if row else None

    @staticmethod
    def _history_where(q: HistoryQuery) -> tuple[str, list[Any]]:
        clauses = ["tenant=?"]
        args: list[Any] = [q.tenant]
        if q.type is not None:
            clauses.append("type=?")
            args.append(q.type)
        if q.id is not None:
            clauses.append("id=?")
            args.append(q.id)
        if q.types is not None:
            clauses.append(f"type IN ({','.join('?' * len(q.types))})")
            args.extend(sorted(q.types))
        if q.since_ms is not None:
            clauses.append("last_updated >= ?")
            args.append(q.since_ms)
        if q.before_seq is not None:
            clauses.append("seq < ?")
            args.append(q.before_seq)
        return " AND ".join(clauses), args

    def history(self, query: HistoryQuery) -> list[StoredVersion]:
        where, args = self._history_where(query)
        rows = self._reader().execute(
            f"{_SELECT_VERSIONS} WHERE {where} ORDER BY seq DESC LIMIT ?",
            [*args, query.limit],
        ).fetchall()
        return [_version(r) for r in rows]

    def history_count(self, query: HistoryQuery) -> int:
        where, args = self._history_where(query)
        sql = f"SELECT count(*) FROM resource_versions WHERE {where}"  # noqa: S608 - clauses are constants
        row = self._reader().execute(sql, args).fetchone()
        return int(row[0])

    def search(self, q: SearchQuery) -> list[tuple[int, StoredVersion]]:
        """Current, non-deleted versions of ``q.types`` whose tags satisfy every group, in rk order."""
        clauses = ["c.tenant=?", f"c.type IN ({','.join('?' * len(q.types))})", "c.deleted=0"]
        args: list[Any] = [q.tenant, *q.types]
        if q.after_rk is not None:
            clauses.append("c.rk > ?")
            args.append(q.after_rk)
        if q.before_rk is not None:
            clauses.append("c.rk < ?")
            args.append(q.before_rk)
        for group in q.tag_groups:  # AND of ORs: each group is one criterion's tags
            clauses.append(f"c.rk IN (SELECT rk FROM search_tags WHERE tag IN ({','.join('?' * len(group))}))")  # noqa: S608
            args.extend(group)
        order = "DESC" if q.descending else "ASC"
        sql = (
            "SELECT c.rk, v.type, v.id, v.version, v.last_updated, v.deleted, v.key_id, v.blob, v.seq"  # noqa: S608
            f" FROM resources_current c JOIN resource_versions v ON v.seq = c.seq WHERE {' AND '.join(clauses)}"
            f" ORDER BY c.rk {order} LIMIT ?"
        )
        rows = self._reader().execute(sql, [*args, q.limit]).fetchall()
        return [(r[0], _version(r[1:])) for r in rows]

    def count_current(self, tenant: str, type: str) -> int:
        row = self._reader().execute(
            "SELECT count(*) FROM resources_current WHERE tenant=? AND type=? AND deleted=0", (tenant, type)
        ).fetchone()
        return int(row[0])

    def max_rk(self) -> int:
        row = self._reader().execute("SELECT coalesce(max(rk), 0) FROM resources_current").fetchone()
        return int(row[0])

    def max_seq(self) -> int:
        row = self._reader().execute("SELECT coalesce(max(seq), 0) FROM resource_versions").fetchone()
        return int(row[0])

    def data_key(self, tenant: str, key_id: str) -> WrappedKey | None:
        row = self._reader().execute(
            "SELECT key_id, wrapped, kek_version, compartment FROM data_keys WHERE tenant=? AND key_id=?",
            (tenant, key_id),
        ).fetchone()
        return WrappedKey(*row) if row else None

    def tenant_keys(self, tenant: str) -> list[TenantKeyRow]:
        return _tenant_keys(self._reader(), tenant)

    def get_meta(self, name: str) -> bytes | None:
        row = self._reader().execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return bytes(row[0]) if row else None

    def client(self, client_id: str) -> ClientRow | None:
        row = self._reader().execute(
            "SELECT client_id, tenant, name, secret_hash, scopes, jwks, created_ms, disabled"
            " FROM clients WHERE client_id=?",
            (client_id,),
        ).fetchone()
        if row is None:
            return None
        return ClientRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]))

    def audit_entries(self, tenant: str, after_seq: int = 0, limit: int = 1000) -> list[tuple[int, int, bytes]]:
        rows = self._reader().execute(
            "SELECT seq, ts_ms, blob FROM audit_log WHERE tenant=? AND seq > ? ORDER BY seq LIMIT ?",
            (tenant, after_seq, limit),
        ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def close(self) -> None:
        with self._lifecycle:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout=30)
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()


def fsync_dir(path: Path) -> None:
    """Make a new file's directory entry durable too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

