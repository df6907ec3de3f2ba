"""The backup ports (fhirvault.backup.ports) on PostgreSQL (the schema of postgres_schema.py).

The logical databases of manifests and segments map onto schemas of one
database: ``fhirvault.sqlite3`` is ``public``, ``audit.sqlite3`` is ``audit``.
Rows cross the ports as SQLite would give them (booleans as 0/1), so segments
and exports stay engine-neutral: a feed taken here applies to SQLite and back.

* Snapshot: a logical export, no ``pg_dump``: the change feed's capture of
  every table in one REPEATABLE READ snapshot of both schemas, written part by
  part as it is read (at most ``EXPORT_PART_ROWS`` rows per table in memory),
  each part of each logical database a file encoded as a segment (kind
  ``feed``): ``fhirvault.sqlite3``, ``audit.sqlite3``, then ``….partNNNNN``.
* Change feed: one REPEATABLE READ READ ONLY transaction per cycle (both schemas
  in one snapshot); the WAL insert position tells an idle database apart.
* Restore: into an empty database, migrated first; the export is applied as
  replay applies segments (``search_tags`` rebuilt from the tag lists), then the
  identity sequences and the audit head are moved past the restored rows.

``audit.audit_head`` is engine-internal (the next audit seq): never shipped,
recomputed after a restore or replay. See docs/postgresql-backup.md for what the
feed needs from writers (keys committed in key order).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from fhirvault.adapters.sqlite_backup import copy_database
from fhirvault.backup.changefeed import (
    SEGMENT_MAGIC,
    Applied,
    FeedState,
    Segment,
    apply_db,
    capture,
)
from fhirvault.backup.ports import (
    AUDIT_DB,
    CLINICAL_DB,
    DK_STAT_MODULUS,
    AppendTable,
    DatabaseCheckError,
    DatabaseDump,
    FeedReader,
    FeedWriter,
    Row,
    SnapshotError,
    SnapshotFile,
    VersionCatalog,
)

T = TypeVar("T")
log = logging.getLogger("fhirvault.backup")

SCHEMAS = {CLINICAL_DB: "public", AUDIT_DB: "audit"}
HIDDEN = frozenset({"audit_head"})
WATERMARK_TABLES = {CLINICAL_DB: "resource_versions", AUDIT_DB: "audit_log"}
EXPORT_KIND = "feed"
EXPORT_PART_ROWS = 20_000  # rows per table in one part of an export (memory bound)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _connect(url: str, *, read_only: bool = False) -> psycopg.Connection[Any]:
    conn = psycopg.connect(url, autocommit=True, application_name="fhirvault-backup")
    if read_only:
        conn.execute("SET default_transaction_read_only = on")
    return conn


def _initialised(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regclass('public.meta') IS NOT NULL AND to_regclass('audit.audit_log') IS NOT NULL"
                       ).fetchone()
    return bool(row and row[0])


class PostgresFeedTables:
    """``FeedReader`` and ``FeedWriter`` over one schema, on a connection the caller manages."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str) -> None:
        self.conn = conn
        self.schema = schema
        self._types: dict[str, dict[str, str]] = {}
        self._keys: dict[str, list[str]] = {}
        # Loading into an empty database: resources_current as this connection wrote it (saves a read per row)
        self.known_current: dict[int, tuple[int, bytes]] | None = None

    def _t(self, table: str) -> str:
        return f"{_q(self.schema)}.{_q(table)}"

    def _columns(self, table: str) -> dict[str, str]:
        if table not in self._types:
            rows = self.conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema=%s AND table_name=%s ORDER BY ordinal_position", (self.schema, table)).fetchall()
            self._types[table] = {str(r[0]): str(r[1]) for r in rows}
        return self._types[table]

    def _select(self, table: str, cols: list[str]) -> str:
        types = self._columns(table)
        return ",".join(f"{_q(c)}::int" if types.get(c) == "boolean" else _q(c) for c in cols)

    def _marks(self, table: str, cols: list[str]) -> str:
        types = self._columns(table)
        return ",".join("%s::int::boolean" if types.get(c) == "boolean" else "%s" for c in cols)

    def _primary_key(self, table: str) -> list[str]:
        if table not in self._keys:
            rows = self.conn.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
                " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary",
                (self._t(table),)).fetchall()
            self._keys[table] = [str(r[0]) for r in rows]
        return self._keys[table]

    @staticmethod
    def _key_sql(spec: AppendTable) -> str:
        return "((idx + 1) << level::int)" if spec.node_key else _q(spec.key)

    @staticmethod
    def _rows(rows: list[Any]) -> list[Row]:
        return [tuple(r) for r in rows]

    # -- reading
    def tables(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema=%s AND table_type='BASE TABLE'"
            ' ORDER BY table_name COLLATE "C"', (self.schema,)).fetchall()
        return [str(r[0]) for r in rows if r[0] not in HIDDEN]

    def columns(self, table: str) -> list[str]:
        return list(self._columns(table))

    def max_key(self, spec: AppendTable) -> int:
        row = self.conn.execute(f"SELECT coalesce(max({self._key_sql(spec)}), 0) FROM {self._t(spec.name)}").fetchone()  # noqa: S608
        return int(row[0]) if row else 0

    def key_at_offset(self, spec: AppendTable, after: int, offset: int) -> int | None:
        k = self._key_sql(spec)
        row = self.conn.execute(
            f"SELECT {k} FROM {self._t(spec.name)} WHERE {k} > %s ORDER BY {k} LIMIT 1 OFFSET %s",  # noqa: S608
            (after, offset)).fetchone()
        return None if row is None else int(row[0])

    def rows_between(self, spec: AppendTable, cols: list[str], lo: int, hi: int) -> list[Row]:
        k = self._key_sql(spec)
        return self._rows(self.conn.execute(
            f"SELECT {self._select(spec.name, cols)} FROM {self._t(spec.name)}"  # noqa: S608
            f" WHERE {k} > %s AND {k} <= %s ORDER BY {k}", (lo, hi)).fetchall())

    def row_at(self, spec: AppendTable, cols: list[str], key: int) -> Row | None:
        row = self.conn.execute(
            f"SELECT {self._select(spec.name, cols)} FROM {self._t(spec.name)} WHERE {_q(spec.key)}=%s",  # noqa: S608
            (key,)).fetchone()
        return None if row is None else tuple(row)

    def first_time_after(self, spec: AppendTable, key: int) -> int | None:
        assert spec.time is not None
        row = self.conn.execute(
            f"SELECT {_q(spec.time)} FROM {self._t(spec.name)} WHERE {_q(spec.key)} > %s"  # noqa: S608
            f" ORDER BY {_q(spec.key)} LIMIT 1", (key,)).fetchone()
        return None if row is None else int(row[0])

    def current_rows(self, lo: int, hi: int) -> list[Row]:
        return self._rows(self.conn.execute(
            f"SELECT c.rk, c.tenant, c.type, c.id, c.seq, c.deleted::int, c.tags FROM {self._t('resources_current')} c"  # noqa: S608
            " WHERE (c.tenant, c.type, c.id) IN"
            f" (SELECT tenant, type, id FROM {self._t('resource_versions')} WHERE seq > %s AND seq <= %s)"
            " ORDER BY c.rk", (lo, hi)).fetchall())

    def all_rows(self, table: str, cols: list[str]) -> list[Row]:
        order = ",".join(str(i + 1) for i in range(len(cols)))
        return self._rows(self.conn.execute(
            f"SELECT {self._select(table, cols)} FROM {self._t(table)} ORDER BY {order}").fetchall())  # noqa: S608

    def data_keys(self, cols: list[str], created_since: int | None) -> list[Row]:
        select = f"SELECT {self._select('data_keys', cols)} FROM {self._t('data_keys')}"  # noqa: S608
        if created_since is None:
            return self._rows(self.conn.execute(select + ' ORDER BY key_id COLLATE "C"').fetchall())
        return self._rows(self.conn.execute(select + " WHERE created_ms >= %s", (created_since,)).fetchall())

    def data_key_stat(self) -> tuple[int, int, int]:
        sums = f"coalesce(sum(kek_version), 0), coalesce(sum(created_ms % {DK_STAT_MODULUS}), 0)"
        row = self.conn.execute(f"SELECT count(*), {sums} FROM {self._t('data_keys')}").fetchone()  # noqa: S608
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    # -- writing
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def _insert(self, table: str, cols: list[str]) -> str:
        return (f"INSERT INTO {self._t(table)} ({','.join(map(_q, cols))}) OVERRIDING SYSTEM VALUE"  # noqa: S608
                f" VALUES ({self._marks(table, cols)})")

    def insert_new(self, table: str, cols: list[str], rows: list[Row]) -> None:
        """COPY into a temporary table, then one INSERT … SELECT (a restore loads millions of rows this way:
        one round trip per block, where a statement per row costs one each)."""
        if not rows:
            return
        staging = _q(f"fv_load_{self.schema}_{table}")
        names = ",".join(map(_q, cols))
        self.conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {staging} (LIKE {self._t(table)})"
                          " ON COMMIT DELETE ROWS")
        with self.conn.cursor() as cur:
            with cur.copy(f"COPY {staging} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)  # booleans arrive as 0/1: COPY's boolean input takes them
            cur.execute(f"INSERT INTO {self._t(table)} ({names}) OVERRIDING SYSTEM VALUE"  # noqa: S608
                        f" SELECT {names} FROM {staging} ON CONFLICT DO NOTHING")
            cur.execute(f"TRUNCATE {staging}")

    def upsert(self, table: str, cols: list[str], rows: list[Row], *, replace_all: bool = False) -> None:
        if replace_all:
            self.conn.execute(f"DELETE FROM {self._t(table)}")  # noqa: S608
        if not rows:
            return
        key = self._primary_key(table)
        rest = [c for c in cols if c not in key]
        if not key:
            tail = ""
        elif rest:
            tail = (f" ON CONFLICT ({','.join(map(_q, key))}) DO UPDATE SET "
                    + ",".join(f"{_q(c)}=excluded.{_q(c)}" for c in rest))
        else:
            tail = " ON CONFLICT DO NOTHING"
        with self.conn.cursor() as cur:
            cur.executemany(self._insert(table, cols) + tail, rows)

    def current_state(self, rk: int) -> tuple[int, bytes] | None:
        if self.known_current is not None:
            return self.known_current.get(rk)
        row = self.conn.execute(f"SELECT seq, tags FROM {self._t('resources_current')} WHERE rk=%s", (rk,)).fetchone()  # noqa: S608
        return None if row is None else (int(row[0]), bytes(row[1]))

    def put_current(self, row: tuple[int, str, str, str, int, int, bytes], gone: list[bytes],
                    added: list[bytes]) -> None:
        rk = row[0]
        if gone:
            self.conn.execute(f"DELETE FROM {self._t('search_tags')} WHERE rk=%s AND tag = ANY(%s)", (rk, gone))  # noqa: S608
        # One round trip for the row and its new tags (a data-modifying CTE always runs).
        self.conn.execute(
            f"WITH c AS (INSERT INTO {self._t('resources_current')} (rk, tenant, type, id, seq, deleted, tags)"  # noqa: S608
            " OVERRIDING SYSTEM VALUE VALUES (%s,%s,%s,%s,%s,%s::int::boolean,%s)"
            " ON CONFLICT (rk) DO UPDATE SET seq=excluded.seq, deleted=excluded.deleted, tags=excluded.tags)"
            f" INSERT INTO {self._t('search_tags')} (tag, rk) SELECT unnest(%s::bytea[]), %s ON CONFLICT DO NOTHING",
            (*row, added, rk))
        if self.known_current is not None:
            self.known_current[rk] = (row[4], row[6])


def _feed_tables(conn: psycopg.Connection[Any]) -> dict[str, PostgresFeedTables]:
    return {db: PostgresFeedTables(conn, schema) for db, schema in SCHEMAS.items()}


@contextlib.contextmanager
def _snapshot(conn: psycopg.Connection[Any]) -> Iterator[None]:
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        yield
    finally:
        with contextlib.suppress(psycopg.Error):
            conn.execute("COMMIT")


# -- change feed ----------------------------------------------------------------------------------
class PostgresChangeFeed:
    """``ChangeFeedSource`` over the live database: one connection, one REPEATABLE READ snapshot per cycle."""

    errors: tuple[type[Exception], ...] = (psycopg.Error,)

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.Connection[Any] | None = None
        self._dbs: dict[str, PostgresFeedTables] = {}

    def databases(self) -> Mapping[str, FeedReader]:
        if self._conn is None or self._conn.closed:
            self._conn = _connect(self._url, read_only=True)
            self._dbs = {}
        if not self._dbs and _initialised(self._conn):
            self._dbs = _feed_tables(self._conn)
        return self._dbs

    def change_tokens(self) -> dict[str, int]:
        if self._conn is None:
            return {}
        row = self._conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()
        lsn = int(row[0]) if row else 0
        return {db: lsn for db in self._dbs}

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        assert self._conn is not None
        with _snapshot(self._conn):
            yield

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._dbs = {}


# -- snapshots ------------------------------------------------------------------------------------
class _MetaTx:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def get_meta(self, name: str) -> bytes | None:
        row = self._conn.execute("SELECT value FROM meta WHERE name=%s", (name,)).fetchone()
        return bytes(row[0]) if row else None

    def set_meta(self, name: str, value: bytes) -> None:
        self._conn.execute("INSERT INTO meta (name, value) VALUES (%s,%s)"
                           " ON CONFLICT (name) DO UPDATE SET value=excluded.value", (name, value))


class _MetaStore(_MetaTx):
    def write_sync(self, name: str, fn: Callable[[Any], T]) -> T:
        with self._conn.transaction():
            return fn(_MetaTx(self._conn))


class PostgresSnapshotSource:
    """``SnapshotSource`` and ``CatalogReader`` over the database of ``url``; the data directory's own SQLite
    files (alerts) are copied as the SQLite adapter copies them."""

    def __init__(self, url: str, data_dir: Path | None = None) -> None:
        self._url = url
        self._dir = data_dir

    @contextlib.contextmanager
    def _open(self, *, read_only: bool) -> Iterator[psycopg.Connection[Any]]:
        try:
            conn = _connect(self._url, read_only=read_only)
        except psycopg.OperationalError as exc:
            raise SnapshotError(f"cannot connect to the database: {type(exc).__name__}") from None
        try:
            if not _initialised(conn):
                raise SnapshotError("the database is not initialised (no fhirvault tables)")
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def meta(self, *, read_only: bool = False) -> Iterator[_MetaStore]:
        with self._open(read_only=read_only) as conn:
            yield _MetaStore(conn)

    def dump(self, into: Path) -> DatabaseDump:
        with self._open(read_only=True) as conn:
            dbs = _feed_tables(conn)
            # Every write committed before this instant is in the snapshot (taken by the first statement).
            snapshot_ms = time.time_ns() // 1_000_000
            files: list[SnapshotFile] = []
            state = FeedState()
            with _snapshot(conn):
                try:
                    # In parts of at most EXPORT_PART_ROWS rows per table, written as they are read, so the
                    # export's memory stays bounded whatever the database size (the feed's own row cap).
                    for part in itertools.count(1):
                        cap = capture(dbs, state, EXPORT_PART_ROWS)
                        state = cap.state
                        for db in SCHEMAS:
                            name = db if part == 1 else f"{db}.part{part:05d}"
                            blocks = [b for b in cap.blocks if b.db == db]
                            header = {"format": 1, "export": db, "part": part, "after": {db: cap.after.get(db, {})}}
                            (into / name).write_bytes(Segment(header, blocks).encode())
                            files.append(SnapshotFile(name, into / name, EXPORT_KIND))
                        if not cap.more:
                            break
                        if not cap.rows:
                            raise SnapshotError("the export made no progress")
                except psycopg.Error as exc:
                    raise SnapshotError(f"cannot export the database: {type(exc).__name__}") from None
        for path in sorted(self._dir.glob("*.sqlite3")) if self._dir is not None else []:
            if path.is_file() and path.name not in SCHEMAS:
                copy_database(path, into / path.name)
                files.append(SnapshotFile(path.name, into / path.name, "sqlite"))
        watermarks = {db: {t: state.watermarks.get(db, {}).get(t, 0)} for db, t in WATERMARK_TABLES.items()}
        return DatabaseDump(files, snapshot_ms, watermarks)

    def copy_for_reading(self, into: Path) -> bool:
        return False  # the drill reads the live database, bounded by seq: MVCC readers never block the writers

    def catalog(self, tenant: str, until_seq: int | None = None) -> VersionCatalog:
        with _connect(self._url, read_only=True) as conn, _snapshot(conn):
            row = conn.execute("SELECT coalesce(max(seq), 0) FROM resource_versions").fetchone()
            top = until_seq if until_seq is not None else int(row[0] if row else 0)
            newest = conn.execute("SELECT coalesce(max(last_updated), 0) FROM resource_versions WHERE seq <= %s",
                                  (top,)).fetchone()
            rows = conn.execute(
                "SELECT type, id, max(version) FROM resource_versions WHERE tenant=%s AND seq <= %s"
                ' GROUP BY type, id ORDER BY type COLLATE "C", id COLLATE "C"', (tenant, top)).fetchall()
            return VersionCatalog(top, int(newest[0] if newest else 0), [(str(t), str(i), int(v)) for t, i, v in rows])


# -- scratch database (the drill) -----------------------------------------------------------------
@contextlib.contextmanager
def scratch_database(server_url: str, *, keep: bool = False) -> Iterator[str]:
    """A new, empty database on the server of ``server_url`` (its role needs CREATEDB), dropped afterwards
    unless ``keep``; yields its URL. The name is random: the drill never touches a database it did not create."""
    name = "fhirvault_drill_" + secrets.token_hex(6)
    try:
        with _connect(server_url) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.errors.InsufficientPrivilege:
        raise SnapshotError("the drill restores into a scratch database it creates: the database role needs"
                            " CREATEDB, or give --scratch-url (a role on a server where it may create one)") from None
    except psycopg.Error as exc:
        raise SnapshotError(f"cannot create the drill's scratch database: {type(exc).__name__}") from None
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path="/" + name))
    finally:
        if keep:
            log.warning("the drill's scratch database is kept: drop it yourself", extra={"database": name})
        else:
            _drop(server_url, name)


def _drop(server_url: str, name: str) -> None:
    try:
        with _connect(server_url) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        log.warning("could not drop the drill's scratch database: drop it yourself",
                    extra={"database": name, "error": type(exc).__name__})


# -- restore --------------------------------------------------------------------------------------
class PostgresRestoreSink:
    """``RestoreSink`` into the database of ``url``, which must be empty (the restore creates the schema)."""

    def __init__(self, data_dir: Path, url: str) -> None:
        self._dir = data_dir
        self._url = url

    def load(self, names: list[str]) -> None:
        from fhirvault.adapters.postgres_store import migrate

        with _connect(self._url) as conn:
            if _initialised(conn):
                row = conn.execute("SELECT count(*) FROM resource_versions").fetchone()
                if row and int(row[0]):
                    raise DatabaseCheckError("refusing to restore into a database that already holds resources")
        migrate(self._url)
        with _connect(self._url) as conn:
            row = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        # The rows are loaded into the schema migrate() just created; the export's own schema_version
        # (SQLite's numbering, for a move, or an older release's) must not replace this one's.
        version = bytes(row[0]) if row else None
        with self._tables(empty=True) as dbs:
            applied = Applied()
            marks: dict[str, dict[str, int]] = {db: {} for db in dbs}  # an export's parts apply in order
            for name in names:
                raw = (self._dir / name).read_bytes()
                if not raw.startswith(SEGMENT_MAGIC):
                    continue  # a local SQLite file (alerts): it is restored as a file
                seg = Segment.decode(raw)
                db = str(seg.header.get("export", ""))
                if db not in dbs:
                    raise DatabaseCheckError(f"{name} is not a database export this engine can load")
                with dbs[db].transaction():
                    apply_db(dbs[db], db, seg, marks[db], None, applied)
                (self._dir / name).unlink()  # the data directory of a PostgreSQL deployment holds no database
        if version is not None:
            with _connect(self._url) as conn:
                conn.execute("INSERT INTO meta (name, value) VALUES ('schema_version', %s)"
                             " ON CONFLICT (name) DO UPDATE SET value=excluded.value", (version,))

    def check(self, names: list[str]) -> None:
        with _connect(self._url, read_only=True) as conn:
            if not _initialised(conn):
                raise DatabaseCheckError("the restored database has no fhirvault tables")
            row = conn.execute("SELECT count(*) FROM meta WHERE name='instance-id'").fetchone()
            if not row or not row[0]:
                raise DatabaseCheckError("the restored database has no instance id")

    @contextlib.contextmanager
    def feed(self) -> Iterator[Mapping[str, FeedWriter]]:
        with self._tables() as dbs:
            yield dbs

    @contextlib.contextmanager
    def _tables(self, *, empty: bool = False) -> Iterator[dict[str, PostgresFeedTables]]:
        conn = _connect(self._url)
        try:
            dbs = _feed_tables(conn)
            if empty:  # load() checked it: resources_current rows are only those this connection puts
                for tables in dbs.values():
                    tables.known_current = {}
            yield dbs
            _settle(conn)
        finally:
            conn.close()


def _settle(conn: psycopg.Connection[Any]) -> None:
    """After rows were inserted with their keys: the sequences of identity and serial columns (the
    subscription queues are BIGSERIAL) and the audit head past them."""
    with conn.transaction():
        for schema, table, column in conn.execute(
                "SELECT table_schema, table_name, column_name FROM information_schema.columns"
                " WHERE (is_identity='YES' OR column_default LIKE 'nextval(%%') AND table_schema = ANY(%s)",
                (list(SCHEMAS.values()),)).fetchall():
            t = f"{_q(schema)}.{_q(table)}"
            conn.execute(f"SELECT setval(pg_get_serial_sequence(%s, %s), coalesce(max({_q(column)}), 0) + 1, false)"  # noqa: S608
                         f" FROM {t}", (t, column))
        conn.execute("UPDATE audit.audit_head SET size = (SELECT coalesce(max(seq), 0) FROM audit.audit_log)")
