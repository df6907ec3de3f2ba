"""Numbered schema migrations of the SQLite store (``meta.schema_version`` records the last one applied).

Version 1 is what the first release created; each later change is its own step. A step runs in one
``BEGIN IMMEDIATE`` transaction together with the version update, so a crash leaves the database at
the previous version, and the write lock makes concurrent openers apply each step once. Steps are
idempotent: databases made by unreleased builds may already have a change without its version.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from fhirvault.adapters.sqlite_schema import (
    AUDIT_SCHEMA,
    BREAK_GLASS_SCHEMA,
    IDENTITY_SCHEMA,
    MULTI_PROCESS_SCHEMA,
    SCHEMA,
)
from fhirvault.ports import Migration, SchemaTooNew

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


STEPS: tuple[_Step, ...] = (
    _Step(Migration(1, "initial schema (fhirvault 0.1)"),
          _script(SCHEMA, AUDIT_SCHEMA, BREAK_GLASS_SCHEMA, IDENTITY_SCHEMA)),
    _Step(Migration(2, "clients.allowed_sources: CIDRs a client may call from"),
          _add_column("clients", "allowed_sources", "TEXT")),
    _Step(Migration(3, "index_dirty.flushed, coherence_log: several server processes on one database"),
          _both(_add_column("index_dirty", "flushed", "BLOB"), _script(MULTI_PROCESS_SCHEMA))),
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


def apply(conn: sqlite3.Connection) -> list[Migration]:
    """Apply the pending steps one transaction each; the connection must be in autocommit mode."""
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
