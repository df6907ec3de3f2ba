"""The store adapters the contract suites run against: memory, SQLite and a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fhirvault.adapters.memory_store import MemoryStore
from fhirvault.adapters.postgres_store import PostgresStore
from fhirvault.adapters.sqlite_store import SqliteStore
from fhirvault.ports import ResourceStore
from tests import pg_server


def open_test_store(engine: str, tmp_path: Path) -> Iterator[ResourceStore]:
    s: ResourceStore
    if engine == "sqlite":
        s = SqliteStore(tmp_path / "db.sqlite3")
    elif engine == "postgresql":
        s = PostgresStore(pg_server.server().create_database(), read_pool_size=4)
    else:
        s = MemoryStore()
    yield s
    s.close()
