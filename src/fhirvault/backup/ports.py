"""Ports of the backup subsystem: what backup, replication, restore and drills need from the database engine.

The engine-neutral logic (chunking, manifests, sealing, targets, scheduling, the
change-feed algorithm and segment format, the drill's comparison) lives in
``fhirvault.backup``; every statement that touches the database lives in an
adapter (``fhirvault.adapters.sqlite_backup``) chosen in ``fhirvault.container``.
docs/postgresql-backup.md says how each port maps onto PostgreSQL.

"Database" here is a logical name (``fhirvault.sqlite3``, ``audit.sqlite3``): it
is written into manifests and replication segments, so it stays the same whatever
engine holds the tables (a PostgreSQL adapter maps each name to its tables).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

CLINICAL_DB = "fhirvault.sqlite3"
AUDIT_DB = "audit.sqlite3"

Row = tuple[Any, ...]
Watermarks = dict[str, dict[str, int]]

# data_keys creation times are summed modulo this (by the adapter and by the feed), so the sum stays exact
DK_STAT_MODULUS = 1_000_000_007


class SnapshotError(RuntimeError):
    pass


class DatabaseCheckError(Exception):
    """A restored database fails to open or its integrity check; the message names the database."""


@dataclass(frozen=True)
class AppendTable:
    """A table whose rows are keyed by an increasing integer and never rewritten (see changefeed.py)."""

    name: str
    key: str  # increasing integer column
    time: str | None = None  # commit time (ms): where a point-in-time cut falls
    bound_by: str | None = None  # no time of its own: cut at the applied watermark of this table
    node_key: bool = False  # a Merkle subtree (level, idx): keyed by the tree size that completes it

    def key_of(self, cols: list[str]) -> Callable[[Row], int]:
        if self.node_key:
            li, ii = cols.index("level"), cols.index("idx")
            return lambda r: int((r[ii] + 1) << r[li])
        ki = cols.index(self.key)
        return lambda r: int(r[ki])


@dataclass(frozen=True)
class SnapshotFile:
    name: str
    path: Path  # the consistent copy (or the original, for small plain files)
    kind: str  # "sqlite" or "file"; a restore sink accepts the kinds its engine wrote


@dataclass(frozen=True)
class DatabaseDump:
    files: list[SnapshotFile]
    snapshot_ms: int  # the clinical copy holds every write committed before this instant
    watermarks: Watermarks  # per database, the append table whose max key says how far it goes


@dataclass(frozen=True)
class VersionCatalog:
    """The resource versions of one tenant up to a write sequence number (what a drill compares)."""

    max_seq: int
    newest_ms: int  # commit time of the newest version at or below max_seq
    latest: list[tuple[str, str, int]]  # (type, id, highest version), ordered by type then id


class MetaStore(Protocol):
    """The two ``ResourceStore`` methods ``ServiceSecrets`` uses (the backup secrets are service secrets)."""

    def get_meta(self, name: str) -> bytes | None: ...
    def write_sync(self, name: str, fn: Callable[[Any], T]) -> T: ...


class SnapshotSource(Protocol):
    """A live deployment's database, seen by the backup engine and the drill (never through a full store:
    opening one runs the store's start-up recovery, which stays the live server's business)."""

    def meta(self, *, read_only: bool = False) -> AbstractContextManager[MetaStore]:
        """Raises SnapshotError if the database was never initialised."""
        ...

    def dump(self, into: Path) -> DatabaseDump:
        """Consistent online copies of the databases, written under ``into`` (clinical first, audit after it,
        so the audit copy is never behind the data). Raises SnapshotError."""
        ...

    def copy_for_reading(self, into: Path) -> bool:
        """A consistent copy of the clinical database that a store opened on ``into`` reads; True if one was
        written. False: the engine's live database can be read as it is (a server engine whose readers do not
        disturb the writers; the drill bounds what it reads by ``seq``, and versions never change)."""
        ...


class CatalogReader(Protocol):
    """What a drill compares: the resource versions up to a write sequence number (read-only)."""

    def catalog(self, tenant: str, until_seq: int | None = None) -> VersionCatalog: ...


class FeedReader(Protocol):
    """Read primitives of the change feed over one logical database (inside the source's read snapshot)."""

    def tables(self) -> list[str]: ...
    def columns(self, table: str) -> list[str]: ...
    def max_key(self, spec: AppendTable) -> int: ...
    def key_at_offset(self, spec: AppendTable, after: int, offset: int) -> int | None:
        """The key of the ``offset``-th row (0-based, in key order) with a key above ``after``."""
        ...
    def rows_between(self, spec: AppendTable, cols: list[str], lo: int, hi: int) -> list[Row]:
        """Rows with lo < key <= hi, in key order."""
        ...
    def row_at(self, spec: AppendTable, cols: list[str], key: int) -> Row | None: ...
    def first_time_after(self, spec: AppendTable, key: int) -> int | None:
        """Commit time of the first row above ``key`` (tables with a time column)."""
        ...
    def current_rows(self, lo: int, hi: int) -> list[Row]:
        """resources_current (rk, tenant, type, id, seq, deleted, tags) of every resource with a version in
        (lo, hi], ordered by rk."""
        ...
    def all_rows(self, table: str, cols: list[str]) -> list[Row]:
        """The whole table, ordered by every column (a stable content hash)."""
        ...
    def data_keys(self, cols: list[str], created_since: int | None) -> list[Row]:
        """data_keys rows (all, ordered by key_id; or those created at or after ``created_since``)."""
        ...
    def data_key_stat(self) -> tuple[int, int, int]:
        """(count, sum of kek_version, sum of created_ms mod DK_STAT_MODULUS)."""
        ...


class FeedWriter(FeedReader, Protocol):
    """Write primitives replay uses on a restored database (inside ``transaction()``)."""

    def transaction(self) -> AbstractContextManager[None]: ...
    def insert_new(self, table: str, cols: list[str], rows: list[Row]) -> None:
        """Insert, ignoring rows whose key is already there."""
        ...
    def upsert(self, table: str, cols: list[str], rows: list[Row], *, replace_all: bool = False) -> None: ...
    def current_state(self, rk: int) -> tuple[int, bytes] | None:
        """(seq, tags) of a resources_current row."""
        ...
    def put_current(self, row: tuple[int, str, str, str, int, int, bytes], gone: list[bytes],
                    added: list[bytes]) -> None:
        """Upsert a resources_current row and move its derived search tags (remove ``gone``, add ``added``)."""
        ...


class ChangeFeedSource(Protocol):
    """What the replicator reads: the live databases, without ever blocking the writer."""

    errors: tuple[type[Exception], ...]  # the engine's own error types (a final flush tolerates them)

    def databases(self) -> Mapping[str, FeedReader]:
        """The logical databases that exist now (opened once, kept)."""
        ...
    def change_tokens(self) -> dict[str, int]:
        """Per database, a number that moves when another connection commits (idle check)."""
        ...
    def read(self) -> AbstractContextManager[None]:
        """One short read snapshot per database for the duration of the block."""
        ...
    def close(self) -> None: ...


class RestoreSink(Protocol):
    """A data directory being restored (the staging directory)."""

    def load(self, names: list[str]) -> None:
        """Bring the restored database files (written under their names) into the engine. SQLite: nothing to do,
        the files are the databases; an engine with a server loads them into its (empty) database."""
        ...
    def check(self, names: list[str]) -> None:
        """Raise DatabaseCheckError if a restored database does not open or fails its integrity check."""
        ...
    def feed(self) -> AbstractContextManager[Mapping[str, FeedWriter]]:
        """The restored logical databases, for replay."""
        ...
