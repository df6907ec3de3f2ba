"""Numbered schema migrations of the SQLite store (``meta.schema_version`` records the last one applied).

Version 1 is what the first release created; each later change is its own step. A step runs in one
``BEGIN IMMEDIATE`` transaction together with the version update, so a crash leaves the database at
the previous version, and the write lock makes concurrent openers apply each step once. Steps are
idempotent: databases made by unreleased builds may already have a change without its version.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fhirvault.adapters.sqlite_schema import (
    AUDIT_SCHEMA,
    AUDIT_TABLES,
    BREAK_GLASS_SCHEMA,
    IDENTITY_SCHEMA,
    MULTI_PROCESS_SCHEMA,
    REGISTERS_SCHEMA,
    SCHEMA,
    SUBSCRIPTION_SCHEMA,
)
from fhirvault.ports import Migration, SchemaError, SchemaTooNew

log = logging.getLogger("fhirvault.migrate")


@dataclass(frozen=True, slots=True)
class _Step:
    migration: Migration
    run: Callable[[sqlite3.Connection], None]


def _script(*scripts: str) -> Callable[[sqlite3.Connection], None]:
    """Run scripts statement by statement (executescript would COMMIT the step's transaction)."""

    def run(conn: sqlite3.Connection) -> None:
        for script in scripts:
            statement = ""
            for line in script.splitlines(keepends=True):
                statement += line
                if sqlite3.complete_statement(statement):
                    conn.execute(statement)
                    statement = ""
            if statement.strip() and not all(ln.strip().startswith("--") for ln in statement.splitlines()
                                             if ln.strip()):
                raise ValueError(f"unterminated SQL statement in a migration: {statement[:60]!r}")

    return run


def _add_column(table: str, column: str, definition: str) -> Callable[[sqlite3.Connection], None]:
    def run(conn: sqlite3.Connection) -> None:
        if column not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    return run


def _both(*runs: Callable[[sqlite3.Connection], None]) -> Callable[[sqlite3.Connection], None]:
    def run(conn: sqlite3.Connection) -> None:
        for one in runs:
            one(conn)

    return run


# Releases before migration 3 kept the audit tables in this second file, ATTACHed as ``audit``.
LEGACY_AUDIT = "audit.sqlite3"
MERGED_SUFFIX = ".merged"  # the old file once merged: kept until the next start, then deleted
_LEGACY = "legacy"  # schema name the old file is attached under while migration 3 runs
_MERGE_STEP = 3


def _merge_audit(conn: sqlite3.Connection) -> None:
    """Create the audit tables in this file and copy the old ``audit.sqlite3``'s rows in, verbatim.

    A WAL-mode transaction over two files is atomic per file only: a crash could keep a clinical write
    and lose its audit entry, or the reverse. In one file, one commit covers both. Only this file is
    written, so the copy and the version bump commit (or vanish) together.
    """
    _script(AUDIT_SCHEMA)(conn)
    if _LEGACY not in {r[1] for r in conn.execute("PRAGMA database_list")}:
        return
    present = {r[0] for r in conn.execute(f"SELECT name FROM {_LEGACY}.sqlite_master WHERE type='table'")}  # noqa: S608
    for table in AUDIT_TABLES:
        if table not in present:
            continue
        cols = ",".join(r[1] for r in conn.execute(f"PRAGMA {_LEGACY}.table_info({table})"))
        # Values are copied as stored (a row a DBA rewrote as text stays text, and still fails verification).
        conn.execute(f"INSERT INTO main.{table} ({cols}) SELECT {cols} FROM {_LEGACY}.{table}")  # noqa: S608
        counts = [conn.execute(f"SELECT count(*) FROM {schema}.{table}").fetchone()[0]  # noqa: S608
                  for schema in ("main", _LEGACY)]
        if counts[0] != counts[1]:
            raise SchemaError(f"merging {LEGACY_AUDIT} into the main database: {table} has {counts[0]} rows"
                              f" after the copy, {counts[1]} in the old file; nothing was changed")
        log.info("audit table merged into the main database", extra={"table": table, "rows": counts[0]})


STEPS: tuple[_Step, ...] = (
    _Step(Migration(1, "initial schema (fhirvault 0.1)"), _script(SCHEMA, BREAK_GLASS_SCHEMA, IDENTITY_SCHEMA)),
    _Step(Migration(2, "clients.allowed_sources: CIDRs a client may call from"),
          _add_column("clients", "allowed_sources", "TEXT")),
    _Step(Migration(_MERGE_STEP, f"audit tables moved from {LEGACY_AUDIT} into the main database file"),
          _merge_audit),
    _Step(Migration(4, "index_dirty.flushed, coherence_log: several server processes on one database"),
          _both(_add_column("index_dirty", "flushed", "BLOB"), _script(MULTI_PROCESS_SCHEMA))),
    _Step(Migration(5, "register_entries: incident and data-subject request registers"), _script(REGISTERS_SCHEMA)),
    _Step(Migration(6, "subscription_changes, subscription_deliveries: FHIR Subscription notifications"),
          _script(SUBSCRIPTION_SCHEMA)),
)
LATEST = STEPS[-1].migration.version
assert [s.migration.version for s in STEPS] == list(range(1, LATEST + 1)), "steps must be numbered 1..N"


def current_version(conn: sqlite3.Connection) -> int:
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is None:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
    return int(row[0]) if row else 0


def pending(conn: sqlite3.Connection) -> list[Migration]:
    version = current_version(conn)
    if version > LATEST:
        raise SchemaTooNew(version, LATEST)
    return [s.migration for s in STEPS[version:]]


def _open_existing(path: Path, mode: str) -> sqlite3.Connection:
    """Never creates the file (another process may have just renamed it)."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True, isolation_level=None)


def _max_seq(path: Path) -> int:
    conn = _open_existing(path, "ro")
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='audit_log'").fetchone() is None:
            return 0
        return int(conn.execute("SELECT coalesce(max(seq), 0) FROM audit_log").fetchone()[0])
    finally:
        conn.close()


def _settle_legacy(conn: sqlite3.Connection, legacy: Path, merged_now: bool) -> None:
    """After migration 3: rename the old audit file out of the way; delete it at the following start."""
    merged = legacy.with_name(legacy.name + MERGED_SUFFIX)
    if legacy.exists():  # merged just now, or by a start that stopped before this rename
        with contextlib.suppress(sqlite3.Error):  # fold its WAL in, so one file holds it all
            old = _open_existing(legacy, "rw")
            try:
                old.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                old.execute("PRAGMA journal_mode=DELETE")
            finally:
                old.close()
        ours = int(conn.execute("SELECT coalesce(max(seq), 0) FROM audit_log").fetchone()[0])
        try:
            theirs = _max_seq(legacy)
        except sqlite3.OperationalError:  # renamed meanwhile by another process opening the store
            return
        if theirs > ours:
            raise SchemaError(f"{legacy} holds audit entries up to {theirs}, the main database only up to {ours}:"
                              f" it was put back after the audit log moved into the main database. Move it away"
                              f" (keep it: it is audit evidence) and start again")
        for suffix in ("", "-wal", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                legacy.with_name(legacy.name + suffix).rename(merged.with_name(merged.name + suffix))
        with contextlib.suppress(FileNotFoundError):
            legacy.with_name(legacy.name + "-shm").unlink()
        log.info("old audit file kept as %s until the next start", merged.name)
    elif not merged_now:
        for suffix in ("", "-wal", "-journal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                merged.with_name(merged.name + suffix).unlink()


def apply(conn: sqlite3.Connection, legacy_audit: Path | None = None) -> list[Migration]:
    """Apply the pending steps one transaction each; the connection must be in autocommit mode.

    ``legacy_audit`` is where releases before migration 3 kept the audit tables (``audit.sqlite3``
    next to the main file): attached (outside any transaction, as SQLite requires) while step 3 copies it.
    """
    attached = False
    if legacy_audit is not None and legacy_audit.exists() and current_version(conn) < _MERGE_STEP:
        conn.execute(f"ATTACH DATABASE ? AS {_LEGACY}", (str(legacy_audit),))
        attached = True
    try:
        done = _apply(conn)
    finally:
        if attached:
            conn.execute(f"DETACH DATABASE {_LEGACY}")
    if legacy_audit is not None and current_version(conn) >= _MERGE_STEP:
        _settle_legacy(conn, legacy_audit, any(m.version == _MERGE_STEP for m in done))
    return done


def _apply(conn: sqlite3.Connection) -> list[Migration]:
    done: list[Migration] = []
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = current_version(conn)  # re-read under the write lock: another process may have migrated
            if version > LATEST:
                raise SchemaTooNew(version, LATEST)
            if version == LATEST:
                conn.execute("COMMIT")
                return done
            step = STEPS[version]
            if version == 1:
                # Builds before numbered migrations recorded version 1 and created missing tables at each start,
                # so version 1 does not prove all of step 1's tables exist: re-run it (all IF NOT EXISTS).
                STEPS[0].run(conn)
            step.run(conn)
            conn.execute("INSERT INTO meta (name, value) VALUES ('schema_version', ?)"
                         " ON CONFLICT (name) DO UPDATE SET value=excluded.value",
                         (str(step.migration.version).encode(),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        log.info("applied schema migration %d: %s", step.migration.version, step.migration.description)
        done.append(step.migration)
