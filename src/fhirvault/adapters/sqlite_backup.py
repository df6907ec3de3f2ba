"""The backup ports (fhirvault.backup.ports) on a SQLite data directory.

Snapshots: ``sqlite3.Connection.backup`` run as one step holds a single read
transaction for the whole copy: with WAL, writers keep committing meanwhile and
the copy is exactly the database as of the moment the step began.

Change feed: read-only connections, one short read transaction per file per
cycle, so the store's write path is untouched; ``PRAGMA data_version`` tells an
idle database apart for the cost of one pragma per file.

The logical databases of the backup format (``fhirvault.sqlite3``, ``audit.sqlite3``)
are views here: since migration 3 both are tables of the one main file (read in
one transaction, so a cut never splits a write from its audit entry); a data
directory of an older release, or restored from its backup before its first
start, still has the audit tables in their own file, and the feed reads that.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from fhirvault.adapters.sqlite_schema import AUDIT_TABLES
from fhirvault.backup.changefeed import SEGMENT_MAGIC
from fhirvault.backup.ports import (
    AUDIT_DB,
    CLINICAL_DB,
    DK_STAT_MODULUS,
    AppendTable,
    DatabaseCheckError,
    DatabaseDump,
    FeedWriter,
    Row,
    SnapshotError,
    SnapshotFile,
    VersionCatalog,
)

T = TypeVar("T")

DATABASES = (CLINICAL_DB, AUDIT_DB)
# Per file copied: which (logical database, table)'s max(seq) says how far it goes (replication ships
# what follows). The main file holds the audit log too since migration 3.
WATERMARK_TABLES = {CLINICAL_DB: ((CLINICAL_DB, "resource_versions"), (AUDIT_DB, "audit_log")),
                    AUDIT_DB: ((AUDIT_DB, "audit_log"),)}
_AUDIT = frozenset(AUDIT_TABLES)


def feed_files(data_dir: Path) -> dict[str, tuple[Path, bool | None]]:
    """Logical database -> (file, which tables: True the audit ones, False the others, None all of them)."""
    main, legacy = data_dir / CLINICAL_DB, data_dir / AUDIT_DB
    if legacy.exists():  # not migrated yet (an older release's directory, or a restore of its backup)
        return {CLINICAL_DB: (main, None), AUDIT_DB: (legacy, None)}
    return {CLINICAL_DB: (main, False), AUDIT_DB: (main, True)}


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _open_ro(path: Path, *, check_same_thread: bool = True) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                           check_same_thread=check_same_thread, timeout=30.0)
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA query_only=ON")
    return conn


# -- snapshots ------------------------------------------------------------------------------------
class _MetaTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def get_meta(self, name: str) -> bytes | None:
        row = self._conn.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return bytes(row[0]) if row else None

    def set_meta(self, name: str, value: bytes) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))


class _MetaStore(_MetaTx):
    """The two ``ResourceStore`` methods ``ServiceSecrets`` uses, over one plain connection."""

    def write_sync(self, name: str, fn: Callable[[Any], T]) -> T:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(_MetaTx(self._conn))
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return result


def copy_database(src: Path, dst: Path) -> None:
    source = _connect(src)
    try:
        source.execute("PRAGMA query_only=ON")
        target = sqlite3.connect(dst, isolation_level=None)
        try:
            source.backup(target, pages=-1)  # one step: one read transaction, one consistent copy
        finally:
            target.close()
    finally:
        source.close()
    for suffix in ("-journal", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            dst.with_name(dst.name + suffix).unlink()


def _watermark(copy: Path, table: str) -> int | None:
    conn = sqlite3.connect(f"{copy.as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone() is None:
            return None
        return int(conn.execute(f"SELECT coalesce(max(seq), 0) FROM {table}").fetchone()[0])  # noqa: S608
    finally:
        conn.close()


class SqliteSnapshotSource:
    """``SnapshotSource`` and ``CatalogReader`` over the ``*.sqlite3`` files of a data directory."""

    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir

    @contextlib.contextmanager
    def meta(self, *, read_only: bool = False) -> Iterator[_MetaStore]:
        db = self._dir / CLINICAL_DB
        if not db.is_file():
            raise SnapshotError(f"{self._dir} is not an initialised data directory (no {CLINICAL_DB})")
        conn = _open_ro(db) if read_only else _connect(db)
        try:
            yield _MetaStore(conn)
        finally:
            conn.close()

    def _databases(self) -> list[str]:
        names = sorted(p.name for p in self._dir.glob("*.sqlite3") if p.is_file())
        # Clinical first, audit right after it, then the rest.
        order = {CLINICAL_DB: 0, AUDIT_DB: 1}
        return sorted(names, key=lambda n: (order.get(n, 2), n))

    def dump(self, into: Path) -> DatabaseDump:
        files: list[SnapshotFile] = []
        watermarks: dict[str, dict[str, int]] = {}
        snapshot_ms = 0
        for name in self._databases():
            started = time.time_ns() // 1_000_000
            copy = into / name
            try:
                copy_database(self._dir / name, copy)
            except sqlite3.Error as exc:
                raise SnapshotError(f"cannot copy database {name}: {exc}") from None
            if name == CLINICAL_DB:
                snapshot_ms = started
            for db, table in WATERMARK_TABLES.get(name, ()):
                mark = _watermark(copy, table)
                if mark is not None:
                    watermarks[db] = {table: mark}
            files.append(SnapshotFile(name, copy, "sqlite"))
        if not snapshot_ms:
            raise SnapshotError(f"{self._dir} has no {CLINICAL_DB}")
        return DatabaseDump(files, snapshot_ms, watermarks)

    def copy_for_reading(self, into: Path) -> bool:
        copy_database(self._dir / CLINICAL_DB, into / CLINICAL_DB)
        return True

    def catalog(self, tenant: str, until_seq: int | None = None) -> VersionCatalog:
        conn = _open_ro(self._dir / CLINICAL_DB)
        try:
            top = until_seq if until_seq is not None else int(
                conn.execute("SELECT coalesce(max(seq), 0) FROM resource_versions").fetchone()[0])
            newest = int(conn.execute("SELECT coalesce(max(last_updated), 0) FROM resource_versions WHERE seq <= ?",
                                      (top,)).fetchone()[0])
            rows = conn.execute(
                "SELECT type, id, max(version) FROM resource_versions WHERE tenant=? AND seq <= ?"
                " GROUP BY type, id ORDER BY type, id", (tenant, top)).fetchall()
            return VersionCatalog(top, newest, [(str(t), str(i), int(v)) for t, i, v in rows])
        finally:
            conn.close()


# -- change feed ----------------------------------------------------------------------------------
def _key_sql(spec: AppendTable) -> str:
    return "((idx + 1) << level)" if spec.node_key else _q(spec.key)


class SqliteFeedTables:
    """``FeedReader`` and ``FeedWriter`` over one connection: one logical database's tables of a file."""

    def __init__(self, conn: sqlite3.Connection, audit: bool | None = None) -> None:
        self.conn = conn
        self._audit = audit  # True: only the audit tables; False: all but them; None: every table

    # -- reading
    def tables(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        return [r[0] for r in rows if self._audit is None or (r[0] in _AUDIT) == self._audit]

    def columns(self, table: str) -> list[str]:
        return [r[1] for r in self.conn.execute(f"PRAGMA table_info({_q(table)})")]

    def max_key(self, spec: AppendTable) -> int:
        row = self.conn.execute(f"SELECT coalesce(max({_key_sql(spec)}), 0) FROM {_q(spec.name)}").fetchone()  # noqa: S608
        return int(row[0])

    def key_at_offset(self, spec: AppendTable, after: int, offset: int) -> int | None:
        k = _key_sql(spec)
        row = self.conn.execute(
            f"SELECT {k} FROM {_q(spec.name)} WHERE {k} > ? ORDER BY {k} LIMIT 1 OFFSET ?",  # noqa: S608
            (after, offset)).fetchone()
        return None if row is None else int(row[0])

    def rows_between(self, spec: AppendTable, cols: list[str], lo: int, hi: int) -> list[Row]:
        k = _key_sql(spec)
        return self.conn.execute(
            f"SELECT {','.join(map(_q, cols))} FROM {_q(spec.name)}"  # noqa: S608
            f" WHERE {k} > ? AND {k} <= ? ORDER BY {k}", (lo, hi)).fetchall()

    def row_at(self, spec: AppendTable, cols: list[str], key: int) -> Row | None:
        sql = f"SELECT {','.join(map(_q, cols))} FROM {_q(spec.name)} WHERE {_q(spec.key)}=?"  # noqa: S608
        row: Row | None = self.conn.execute(sql, (key,)).fetchone()
        return row

    def first_time_after(self, spec: AppendTable, key: int) -> int | None:
        assert spec.time is not None
        row = self.conn.execute(
            f"SELECT {_q(spec.time)} FROM {_q(spec.name)} WHERE {_q(spec.key)} > ?"  # noqa: S608
            f" ORDER BY {_q(spec.key)} LIMIT 1", (key,)).fetchone()
        return None if row is None else int(row[0])

    def current_rows(self, lo: int, hi: int) -> list[Row]:
        return self.conn.execute(
            "SELECT c.rk, c.tenant, c.type, c.id, c.seq, c.deleted, c.tags FROM resources_current c"
            " WHERE (c.tenant, c.type, c.id) IN"
            " (SELECT tenant, type, id FROM resource_versions WHERE seq > ? AND seq <= ?) ORDER BY c.rk",
            (lo, hi),
        ).fetchall()

    def all_rows(self, table: str, cols: list[str]) -> list[Row]:
        order = ",".join(str(i + 1) for i in range(len(cols)))
        return self.conn.execute(f"SELECT {','.join(map(_q, cols))} FROM {_q(table)} ORDER BY {order}").fetchall()  # noqa: S608

    def data_keys(self, cols: list[str], created_since: int | None) -> list[Row]:
        select = f"SELECT {','.join(map(_q, cols))} FROM data_keys"  # noqa: S608
        if created_since is None:
            return self.conn.execute(select + " ORDER BY key_id").fetchall()
        return self.conn.execute(select + " WHERE created_ms >= ?", (created_since,)).fetchall()

    def data_key_stat(self) -> tuple[int, int, int]:
        sums = f"coalesce(sum(kek_version), 0), coalesce(sum(created_ms % {DK_STAT_MODULUS}), 0)"
        row = self.conn.execute(f"SELECT count(*), {sums} FROM data_keys").fetchone()  # noqa: S608 - constants
        return int(row[0]), int(row[1]), int(row[2])

    # -- writing
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def insert_new(self, table: str, cols: list[str], rows: list[Row]) -> None:
        marks = ",".join("?" * len(cols))
        self.conn.executemany(
            f"INSERT OR IGNORE INTO {_q(table)} ({','.join(map(_q, cols))}) VALUES ({marks})", rows)  # noqa: S608

    def upsert(self, table: str, cols: list[str], rows: list[Row], *, replace_all: bool = False) -> None:
        marks = ",".join("?" * len(cols))
        if replace_all:
            self.conn.execute(f"DELETE FROM {_q(table)}")  # noqa: S608
        self.conn.executemany(
            f"INSERT OR REPLACE INTO {_q(table)} ({','.join(map(_q, cols))}) VALUES ({marks})", rows)  # noqa: S608

    def current_state(self, rk: int) -> tuple[int, bytes] | None:
        row = self.conn.execute("SELECT seq, tags FROM resources_current WHERE rk=?", (rk,)).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def put_current(self, row: tuple[int, str, str, str, int, int, bytes], gone: list[bytes],
                    added: list[bytes]) -> None:
        rk = row[0]
        self.conn.execute(
            "INSERT INTO resources_current (rk, tenant, type, id, seq, deleted, tags) VALUES (?,?,?,?,?,?,?)"
            " ON CONFLICT (rk) DO UPDATE SET seq=excluded.seq, deleted=excluded.deleted, tags=excluded.tags", row)
        # search_tags is derived from the tag lists: remove what the old list had, add the new one.
        if gone:
            self.conn.executemany("DELETE FROM search_tags WHERE tag=? AND rk=?", [(t, rk) for t in gone])
        if added:
            self.conn.executemany("INSERT OR IGNORE INTO search_tags (tag, rk) VALUES (?,?)",
                                  [(t, rk) for t in added])


class SqliteChangeFeed:
    """``ChangeFeedSource`` over a live data directory: read-only connections, opened when the files exist."""

    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir
        self._dbs: dict[str, SqliteFeedTables] = {}

    def databases(self) -> dict[str, SqliteFeedTables]:
        if not self._dbs and (self._dir / CLINICAL_DB).exists():
            opened: dict[Path, sqlite3.Connection] = {}
            for db, (path, audit) in feed_files(self._dir).items():
                if path not in opened:
                    # the replicator's thread and its final flush (another thread) take turns under its lock
                    opened[path] = _open_ro(path, check_same_thread=False)
                self._dbs[db] = SqliteFeedTables(opened[path], audit)
        return self._dbs

    def _conns(self) -> list[sqlite3.Connection]:
        return list({id(t.conn): t.conn for t in self._dbs.values()}.values())

    def change_tokens(self) -> dict[str, int]:
        return {db: int(t.conn.execute("PRAGMA data_version").fetchone()[0]) for db, t in self._dbs.items()}

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        # One short read transaction per file: a consistent cut that never blocks the writer.
        for conn in self._conns():
            conn.execute("BEGIN")
        try:
            yield
        finally:
            for conn in self._conns():
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("COMMIT")

    def close(self) -> None:
        for conn in self._conns():
            conn.close()
        self._dbs.clear()


class SqliteRestoreSink:
    """``RestoreSink`` over a staging data directory the restore wrote ``sqlite`` files into."""

    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir

    def load(self, names: list[str]) -> None:
        # the restored files are the databases, unless the backup was taken on PostgreSQL
        for name in names:
            with (self._dir / name).open("rb") as f:
                if f.read(len(SEGMENT_MAGIC)) == SEGMENT_MAGIC:
                    raise DatabaseCheckError(f"{name} in this backup is a PostgreSQL export: restore it into a "
                                             "PostgreSQL database (docs/postgresql-backup.md)")

    def check(self, names: list[str]) -> None:
        for name in names:
            conn = sqlite3.connect(self._dir / name)
            try:
                row = conn.execute("PRAGMA quick_check").fetchone()
            except sqlite3.Error as exc:
                raise DatabaseCheckError(f"restored database {name} does not open: {exc}") from None
            finally:
                conn.close()
            if row is None or row[0] != "ok":
                raise DatabaseCheckError(f"restored database {name} fails its integrity check")

    @contextlib.contextmanager
    def feed(self) -> Iterator[dict[str, FeedWriter]]:
        # A backup of an older release restores as its two files: its audit segments go to its audit
        # file, which the store's first start merges into the main one (migration 3).
        files = feed_files(self._dir) if (self._dir / CLINICAL_DB).exists() else {}
        conns = {path: sqlite3.connect(path, isolation_level=None) for path, _ in files.values()}
        try:
            yield {db: SqliteFeedTables(conns[path], audit) for db, (path, audit) in files.items()}
        finally:
            for conn in conns.values():
                conn.close()
