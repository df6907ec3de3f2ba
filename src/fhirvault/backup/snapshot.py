"""Online, consistent copies of a live data directory's databases.

``sqlite3.Connection.backup`` run as one step holds a single read transaction
for the whole copy: with WAL, writers keep committing meanwhile and the copy is
exactly the database as of the moment the step began. The clinical database is
copied before the audit database, so the audit copy is never behind the data.

The secrets the backup engine needs (backup key, signing seed) are service
secrets in the clinical database's ``meta`` table. They are read (and created
on first use) through a minimal meta-only store over a plain connection, not a
full ``SqliteStore``: opening one runs crash recovery of the search index,
which must stay the live server's business.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from fhirvault.container import INSTANCE_META
from fhirvault.ports import ResourceStore, RootKeyProvider
from fhirvault.services.secrets import ServiceSecrets

T = TypeVar("T")

CLINICAL_DB = "fhirvault.sqlite3"
AUDIT_DB = "audit.sqlite3"
# Plain files worth restoring besides the databases. Never root.key (the backup would
# then open itself) nor admin-client.json (a client secret).
EXTRA_FILES = ("fhirvault.toml",)
NEVER = frozenset({"root.key", "admin-client.json"})
# Which table's max(seq) says how far each database goes (replication ships what follows).
WATERMARK_TABLES = {CLINICAL_DB: "resource_versions", AUDIT_DB: "audit_log"}
_TMP_PREFIX = ".backup-tmp-"


class SnapshotError(RuntimeError):
    pass


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


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


@dataclass(frozen=True)
class DeploymentSecrets:
    instance_id: str
    backup_key: bytes
    signing_seed: bytes


def deployment_secrets(data_dir: Path, root: RootKeyProvider) -> DeploymentSecrets:
    db = data_dir / CLINICAL_DB
    if not db.is_file():
        raise SnapshotError(f"{data_dir} is not an initialised data directory (no {CLINICAL_DB})")
    conn = _connect(db)
    try:
        meta = _MetaStore(conn)
        instance = meta.get_meta(INSTANCE_META)
        if instance is None:
            raise SnapshotError(f"{data_dir} is not an initialised data directory (no instance id)")
        secrets = ServiceSecrets(cast(ResourceStore, meta), root)
        return DeploymentSecrets(instance.decode(), secrets.get("backup"), secrets.get("backup-signing"))
    finally:
        conn.close()


@dataclass(frozen=True)
class SnapshotFile:
    name: str
    path: Path  # the consistent copy (or the original, for small plain files)
    kind: str  # "sqlite" or "file"


@dataclass(frozen=True)
class Snapshot:
    files: list[SnapshotFile]
    snapshot_ms: int  # the clinical copy holds every write committed before this instant
    watermarks: dict[str, dict[str, int]]


def _databases(data_dir: Path) -> list[str]:
    names = sorted(p.name for p in data_dir.glob("*.sqlite3") if p.is_file())
    # Clinical first, audit right after it, then the rest.
    order = {CLINICAL_DB: 0, AUDIT_DB: 1}
    return sorted(names, key=lambda n: (order.get(n, 2), n))


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


def _clean_stale(data_dir: Path) -> None:
    """Remove copies left by a backup process that died (its pid is in the name)."""
    for old in data_dir.glob(_TMP_PREFIX + "*"):
        try:
            pid = int(old.name[len(_TMP_PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


@contextlib.contextmanager
def snapshot(data_dir: Path) -> Iterator[Snapshot]:
    """Consistent copies of the data directory's databases (+ config), removed afterwards."""
    _clean_stale(data_dir)
    tmp = data_dir / f"{_TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir(mode=0o700)
    try:
        files: list[SnapshotFile] = []
        watermarks: dict[str, dict[str, int]] = {}
        snapshot_ms = 0
        for name in _databases(data_dir):
            started = time.time_ns() // 1_000_000
            copy = tmp / name
            try:
                copy_database(data_dir / name, copy)
            except sqlite3.Error as exc:
                raise SnapshotError(f"cannot copy database {name}: {exc}") from None
            if name == CLINICAL_DB:
                snapshot_ms = started
            table = WATERMARK_TABLES.get(name)
            mark = _watermark(copy, table) if table else None
            if table and mark is not None:
                watermarks[name] = {table: mark}
            files.append(SnapshotFile(name, copy, "sqlite"))
        if not snapshot_ms:
            raise SnapshotError(f"{data_dir} has no {CLINICAL_DB}")
        for name in EXTRA_FILES:
            path = data_dir / name
            if path.is_file() and name not in NEVER:
                shutil.copyfile(path, tmp / name)
                files.append(SnapshotFile(name, tmp / name, "file"))
        yield Snapshot(files, snapshot_ms, watermarks)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
