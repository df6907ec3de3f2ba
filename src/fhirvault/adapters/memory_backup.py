"""The change-feed ports (fhirvault.backup.ports) over tables in process memory.

For unit tests of the feed, the replicator and replay without a database engine,
and as the reference the port contract tests hold every engine's adapter to:
each method answers what the SQLite adapter's statement answers (same order,
same NULL-first sorting, same conflict rules on the declared primary key).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fhirvault.backup.ports import DK_STAT_MODULUS, AppendTable, FeedWriter, Row

CURRENT_COLUMNS = ["rk", "tenant", "type", "id", "seq", "deleted", "tags"]


@dataclass
class MemoryTable:
    columns: list[str]
    key: tuple[str, ...]  # the primary key: conflicts on it are ignored or replaced, as in SQL
    rows: dict[tuple[Any, ...], Row] = field(default_factory=dict)

    def pk(self, row: Row) -> tuple[Any, ...]:
        return tuple(row[self.columns.index(c)] for c in self.key)

    def project(self, row: Row, cols: list[str]) -> Row:
        return tuple(row[self.columns.index(c)] for c in cols)

    def put(self, cols: list[str], row: Row, *, replace: bool) -> None:
        full = tuple(row[cols.index(c)] if c in cols else None for c in self.columns)
        pk = self.pk(full)
        if replace or pk not in self.rows:
            self.rows[pk] = full

    def delete(self, cols: list[str], row: Row) -> None:
        self.rows.pop(self.pk(tuple(row[cols.index(c)] if c in cols else None for c in self.columns)), None)


def _sortable(row: Row) -> tuple[tuple[bool, Any], ...]:
    return tuple((v is not None, v) for v in row)  # NULL first, as SQLite and PostgreSQL (NULLS FIRST) sort


class MemoryFeedTables:
    """``FeedReader`` and ``FeedWriter`` over named ``MemoryTable``s (one logical database)."""

    def __init__(self, tables: Mapping[str, MemoryTable]) -> None:
        self._tables = dict(tables)
        self.version = 0  # moves at every committed write (the change token)

    def table(self, name: str) -> MemoryTable:
        return self._tables[name]

    # -- reading
    def tables(self) -> list[str]:
        return sorted(self._tables)

    def columns(self, table: str) -> list[str]:
        return list(self._tables[table].columns)

    def _keyed(self, spec: AppendTable) -> list[tuple[int, Row]]:
        t = self._tables[spec.name]
        key = spec.key_of(t.columns)
        return sorted(((key(r), r) for r in t.rows.values()), key=lambda kr: (kr[0], _sortable(kr[1])))

    def max_key(self, spec: AppendTable) -> int:
        return max((k for k, _ in self._keyed(spec)), default=0)

    def key_at_offset(self, spec: AppendTable, after: int, offset: int) -> int | None:
        keys = [k for k, _ in self._keyed(spec) if k > after]
        return keys[offset] if offset < len(keys) else None

    def rows_between(self, spec: AppendTable, cols: list[str], lo: int, hi: int) -> list[Row]:
        t = self._tables[spec.name]
        return [t.project(r, cols) for k, r in self._keyed(spec) if lo < k <= hi]

    def row_at(self, spec: AppendTable, cols: list[str], key: int) -> Row | None:
        t = self._tables[spec.name]
        ki = t.columns.index(spec.key)
        return next((t.project(r, cols) for r in t.rows.values() if r[ki] == key), None)

    def first_time_after(self, spec: AppendTable, key: int) -> int | None:
        assert spec.time is not None
        t = self._tables[spec.name]
        ki, ti = t.columns.index(spec.key), t.columns.index(spec.time)
        later = sorted((r[ki], r[ti]) for r in t.rows.values() if r[ki] > key)
        return int(later[0][1]) if later else None

    def current_rows(self, lo: int, hi: int) -> list[Row]:
        versions, current = self._tables["resource_versions"], self._tables["resources_current"]
        touched = {versions.project(r, ["tenant", "type", "id"]) for r in versions.rows.values()
                   if lo < r[versions.columns.index("seq")] <= hi}
        rows = [current.project(r, CURRENT_COLUMNS) for r in current.rows.values()
                if current.project(r, ["tenant", "type", "id"]) in touched]
        return sorted(rows, key=lambda r: r[0])

    def all_rows(self, table: str, cols: list[str]) -> list[Row]:
        t = self._tables[table]
        return sorted((t.project(r, cols) for r in t.rows.values()), key=_sortable)

    def data_keys(self, cols: list[str], created_since: int | None) -> list[Row]:
        t = self._tables["data_keys"]
        ci = t.columns.index("created_ms")
        if created_since is None:
            return [t.project(r, cols) for r in sorted(t.rows.values(), key=lambda r: r[t.columns.index("key_id")])]
        return [t.project(r, cols) for r in t.rows.values() if r[ci] >= created_since]

    def data_key_stat(self) -> tuple[int, int, int]:
        t = self._tables["data_keys"]
        kek, created = t.columns.index("kek_version"), t.columns.index("created_ms")
        rows = list(t.rows.values())
        return len(rows), sum(r[kek] for r in rows), sum(r[created] % DK_STAT_MODULUS for r in rows)

    # -- writing
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        saved = copy.deepcopy(self._tables)
        try:
            yield
        except BaseException:
            self._tables = saved
            raise
        self.version += 1

    def insert_new(self, table: str, cols: list[str], rows: list[Row]) -> None:
        for row in rows:
            self._tables[table].put(cols, row, replace=False)

    def upsert(self, table: str, cols: list[str], rows: list[Row], *, replace_all: bool = False) -> None:
        if replace_all:
            self._tables[table].rows.clear()
        for row in rows:
            self._tables[table].put(cols, row, replace=True)

    def current_state(self, rk: int) -> tuple[int, bytes] | None:
        row = self._tables["resources_current"].rows.get((rk,))
        if row is None:
            return None
        t = self._tables["resources_current"]
        return int(row[t.columns.index("seq")]), bytes(row[t.columns.index("tags")])

    def put_current(self, row: tuple[int, str, str, str, int, int, bytes], gone: list[bytes],
                    added: list[bytes]) -> None:
        self._tables["resources_current"].put(CURRENT_COLUMNS, row, replace=True)
        tags = self._tables["search_tags"]
        for tag in gone:
            tags.delete(["tag", "rk"], (tag, row[0]))
        for tag in added:
            tags.put(["tag", "rk"], (tag, row[0]), replace=False)


class MemoryChangeFeed:
    """``ChangeFeedSource`` and ``RestoreSink`` over ``MemoryFeedTables`` (one lock stands for the read snapshot)."""

    errors: tuple[type[Exception], ...] = ()

    def __init__(self, databases: Mapping[str, MemoryFeedTables]) -> None:
        self._dbs = dict(databases)
        self._lock = threading.RLock()

    def databases(self) -> dict[str, MemoryFeedTables]:
        return self._dbs

    def change_tokens(self) -> dict[str, int]:
        return {db: t.version for db, t in self._dbs.items()}

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._lock:
            yield

    def close(self) -> None:
        pass

    def load(self, names: list[str]) -> None:
        pass

    def check(self, names: list[str]) -> None:
        pass

    @contextlib.contextmanager
    def feed(self) -> Iterator[Mapping[str, FeedWriter]]:
        with self._lock:
            yield self._dbs
