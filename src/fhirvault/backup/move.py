"""Move a deployment's tables from one engine to another (SQLite to PostgreSQL), then prove the copy.

Engine-neutral: the source is read through the change feed's ``FeedReader`` port (one full capture in one
read snapshot, exactly what a PostgreSQL backup export holds), the copy is loaded by the target's
``RestoreSink`` (which refuses a database that already holds resources), and the proof reads both sides
through the same port again: per table, the row count and a SHA-256 over the sorted row hashes (sorted,
so the engines' collations cannot make equal tables differ). Derived tables are rebuilt by the sink from
the tag lists, so they are compared too.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fhirvault.backup.changefeed import FeedState, Segment, capture, row_hash
from fhirvault.backup.ports import ChangeFeedSource, FeedReader, RestoreSink

_ALL = 1 << 62  # no row cap: one capture holds everything
# Rows the target engine writes itself when it creates its schema (not clinic data).
_ENGINE_ROWS = {("fhirvault.sqlite3", "meta"): "schema_version"}
# Engine bookkeeping the other side does not have (PostgreSQL's audit head, SQLite's index queue).
_ENGINE_TABLES = frozenset({"audit_head", "coherence_head", "index_dirty"})


class MoveError(Exception):
    """The move was refused or its proof failed; the message says which table and why."""


@dataclass(frozen=True)
class TableProof:
    db: str
    table: str
    rows: int
    sha256: str


@dataclass
class MoveReport:
    tables: list[TableProof] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    seconds_copy: float = 0.0
    seconds_check: float = 0.0

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)


def _table_proof(db: str, reader: FeedReader, table: str, cols: list[str]) -> TableProof:
    rows = reader.all_rows(table, cols)
    if (db, table) in _ENGINE_ROWS:
        rows = [r for r in rows if r[0] != _ENGINE_ROWS[(db, table)]]
    digest = hashlib.sha256("".join(sorted(row_hash(r) for r in rows)).encode()).hexdigest()
    return TableProof(db, table, len(rows), digest)


@contextlib.contextmanager
def _reading(source: ChangeFeedSource) -> Iterator[Mapping[str, FeedReader]]:
    try:
        dbs = source.databases()
        with source.read():
            yield dbs
    finally:
        source.close()


def _proofs(source: ChangeFeedSource, columns: dict[tuple[str, str], list[str]] | None = None
            ) -> dict[tuple[str, str], TableProof]:
    """Per (database, table): count and hash. ``columns`` fixes the column order (the source's)."""
    out: dict[tuple[str, str], TableProof] = {}
    with _reading(source) as dbs:
        for db, reader in dbs.items():
            for table in reader.tables():
                if table in _ENGINE_TABLES:
                    continue
                cols = (columns or {}).get((db, table)) or reader.columns(table)
                out[(db, table)] = _table_proof(db, reader, table, cols)
    return out


def _columns(source: ChangeFeedSource) -> dict[tuple[str, str], list[str]]:
    with _reading(source) as dbs:
        return {(db, t): r.columns(t) for db, r in dbs.items() for t in r.tables()}


def holds_data(target: ChangeFeedSource) -> str | None:
    """The first table of the target database that holds rows (None if it is empty or has no schema)."""
    with _reading(target) as dbs:
        for db, reader in dbs.items():
            for table in reader.tables():
                if table in _ENGINE_TABLES:
                    continue
                if _table_proof(db, reader, table, reader.columns(table)).rows:
                    return table
    return None


def move(source: Callable[[], ChangeFeedSource], target: Callable[[], ChangeFeedSource],
         sink: Callable[[Path], RestoreSink], staging_parent: Path) -> MoveReport:
    """Copy every table of ``source`` into the empty database behind ``sink``, then compare both sides.

    Raises MoveError if the target holds data; returns a report whose ``mismatches`` list what differs."""
    report = MoveReport()
    busy = holds_data(target())
    if busy is not None:
        raise MoveError(f"the target database is not empty (table {busy} holds rows): give a new, empty database")
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=".move-", dir=staging_parent))
    try:
        with _reading(source()) as dbs:
            cap = capture(dbs, FeedState(), _ALL)
            names = list(dbs)
        for db in names:
            blocks = [b for b in cap.blocks if b.db == db]
            header = {"format": 1, "export": db, "after": {db: cap.after.get(db, {})}}
            (staging / db).write_bytes(Segment(header, blocks).encode())
        restore = sink(staging)
        restore.load(names)
        restore.check(names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.seconds_copy = time.monotonic() - started
    started = time.monotonic()
    columns = _columns(source())
    before = _proofs(source(), columns)
    after = _proofs(target(), columns)
    for key in sorted(before.keys() | after.keys()):
        want, got = before.get(key), after.get(key)
        db, table = key
        if want is None or got is None:
            present = want or got
            assert present is not None
            if present.rows:  # an empty table one engine has and the other lacks is no data lost
                side = "source" if got is None else "target"
                report.mismatches.append(f"{db}/{table}: {present.rows} rows only in the {side}")
            continue
        if (want.rows, want.sha256) != (got.rows, got.sha256):
            report.mismatches.append(f"{db}/{table}: {want.rows} rows (sha256 {want.sha256[:12]}) in the source,"
                                     f" {got.rows} rows (sha256 {got.sha256[:12]}) in the target")
        report.tables.append(want)
    report.seconds_check = time.monotonic() - started
    return report
