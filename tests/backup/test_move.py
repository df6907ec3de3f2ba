"""The engine-neutral move (fhirvault.backup.move) over in-memory tables: it copies, and its proof catches loss."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from fhirvault.adapters.memory_backup import MemoryChangeFeed, MemoryFeedTables, MemoryTable
from fhirvault.backup.changefeed import Applied, Segment, apply_db
from fhirvault.backup.move import MoveError, move
from fhirvault.backup.ports import CLINICAL_DB, FeedWriter, RestoreSink

TABLES = {"meta": (["name", "value"], ("name",)), "clients": (["client_id", "secret_hash", "scope"], ("client_id",)),
          "users": (["username", "role"], ("username",))}


def _db(rows: dict[str, list[tuple[object, ...]]] | None = None) -> MemoryFeedTables:
    tables = {name: MemoryTable(cols, key) for name, (cols, key) in TABLES.items()}
    for name, got in (rows or {}).items():
        for row in got:
            tables[name].put(tables[name].columns, row, replace=True)
    return MemoryFeedTables(tables)


class _Sink:
    """Applies the exported segments as the PostgreSQL sink does; ``lose`` drops one table's last row."""

    def __init__(self, staging: Path, target: MemoryChangeFeed, lose: str | None = None) -> None:
        self._dir, self._target, self._lose = staging, target, lose

    def load(self, names: list[str]) -> None:
        with self._target.feed() as dbs:
            for name in names:
                seg = Segment.decode((self._dir / name).read_bytes())
                apply_db(dbs[name], name, seg, {}, None, Applied())
        if self._lose:
            table = self._target.databases()[CLINICAL_DB].table(self._lose)
            table.rows.pop(sorted(table.rows)[-1])

    def check(self, names: list[str]) -> None:
        pass

    def feed(self) -> AbstractContextManager[Mapping[str, FeedWriter]]:
        return self._target.feed()


SOURCE = {"meta": [("schema_version", b"1"), ("instance-id", b"abc")],
          "clients": [("c1", b"h1", "system/*.rs"), ("c2", b"h2", "system/*.cruds")],
          "users": [("dr.who", "practitioner")]}


def _run(tmp_path: Path, target: MemoryChangeFeed, lose: str | None = None) -> list[str]:
    source = MemoryChangeFeed({CLINICAL_DB: _db(SOURCE)})

    def sink(d: Path) -> RestoreSink:
        return _Sink(d, target, lose)

    report = move(lambda: source, lambda: target, sink, tmp_path)
    assert report.rows == 5 - 1  # the engine's own schema_version row is not clinic data
    assert not list(tmp_path.iterdir())  # the staging export is gone
    return report.mismatches


def test_a_faithful_copy_matches(tmp_path: Path) -> None:
    target = MemoryChangeFeed({CLINICAL_DB: _db({"meta": [("schema_version", b"1")]})})  # a migrated, empty db
    assert _run(tmp_path, target) == []
    assert sorted(target.databases()[CLINICAL_DB].all_rows("clients", ["client_id"])) == [("c1",), ("c2",)]


def test_a_lost_row_is_reported(tmp_path: Path) -> None:
    mismatches = _run(tmp_path, MemoryChangeFeed({CLINICAL_DB: _db()}), lose="clients")
    assert len(mismatches) == 1 and mismatches[0].startswith(f"{CLINICAL_DB}/clients: 2 rows")


def test_a_target_holding_data_is_refused(tmp_path: Path) -> None:
    target = MemoryChangeFeed({CLINICAL_DB: _db({"users": [("someone", "nurse")]})})
    with pytest.raises(MoveError, match=r"not empty \(table users"):
        _run(tmp_path, target)
    assert target.databases()[CLINICAL_DB].all_rows("users", ["username"]) == [("someone",)]
