"""Incremental backups as a chain of change-feed deltas on top of a full backup.

A full backup copies the database files page for page. After 1 % of the
resources changed, nearly every 256 KiB piece of those files differs (the search
index, ``resources_current``, the indexes of ``resource_versions`` and the audit
index are B-trees keyed by random values), so a page-level incremental uploads
almost a full. An incremental backup is therefore a *delta*: the rows committed
since the previous backup, read from the live database by the change feed
(``changefeed.capture``, the format replication ships) in one read snapshot. Its
manifest names the previous backup's files (their chunks are already on the
target) plus one more ``delta`` file; a restore rebuilds the full backup's files,
then applies the deltas in order (``apply_deltas``), the derived search index
included, as replay does.

A delta is taken only when it is safe and small; otherwise the backup is full:

* the previous backup of this deployment carries a ``chain`` record (its feed
  position: every append table's watermark, and a hash of the row at each one);
* the live database still holds those very rows (not restored from older state),
  with the same tables and columns (no migration since);
* the chain is shorter than ``MAX_CHAIN`` and its deltas add up to less than
  ``MAX_DELTA_SHARE`` of the full backup's size, and the delta fits in
  ``MAX_DELTA_ROWS`` rows (a bulk import is cheaper as a full backup).

Only an engine whose commits are ordered like their keys offers a feed here
(SQLite: one writer at a time); see ``fhirvault.container.delta_feed_source``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from fhirvault.backup.changefeed import (
    APPEND_TABLES,
    MAIN_DB,
    Applied,
    FeedState,
    Segment,
    Watermarks,
    anchor,
    apply_db,
    capture,
    restored_marks,
)
from fhirvault.backup.ports import ChangeFeedSource, FeedReader, RestoreSink

DELTA_KIND = "delta"
MAX_CHAIN = 30  # deltas after one full backup
MAX_DELTA_SHARE = 0.25  # of the full backup's file size: beyond it, a full backup restores faster
MAX_DELTA_ROWS = 100_000  # rows per append table in one delta (held in memory while it is encoded: ~200 MB)
FORMAT = 1


@dataclass(frozen=True)
class FeedPosition:
    """Where a backup stands in the change feed: enough to take the next delta from it."""

    marks: Watermarks  # every append table's highest key
    anchors: dict[str, dict[str, str]]  # hash of the row at each mark (proves the same history)
    schema: str  # hash of every table's columns
    small: dict[tuple[str, str], str]  # content hash of each small table (shipped whole when it changes)

    def to_json(self) -> dict[str, Any]:
        return {"marks": self.marks, "anchors": self.anchors, "schema": self.schema,
                "small": [[db, t, h] for (db, t), h in sorted(self.small.items())]}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> FeedPosition:
        return cls({d: {t: int(k) for t, k in m.items()} for d, m in doc["marks"].items()},
                   {d: dict(a) for d, a in doc["anchors"].items()}, str(doc["schema"]),
                   {(str(db), str(t)): str(h) for db, t, h in doc["small"]})


@dataclass(frozen=True)
class ChainInfo:
    """The ``chain`` record of a manifest body."""

    position: FeedPosition
    length: int  # deltas since the full backup (0: this backup is full)
    base_size: int  # bytes of the full backup's files
    delta_bytes: int  # bytes of the deltas so far

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "position": self.position.to_json(), "length": self.length,
                "base_size": self.base_size, "delta_bytes": self.delta_bytes}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> ChainInfo | None:
        if not doc or doc.get("format") != FORMAT:
            return None
        return cls(FeedPosition.from_json(doc["position"]), int(doc["length"]), int(doc["base_size"]),
                   int(doc["delta_bytes"]))

    def room_for_delta(self) -> bool:
        return self.length < MAX_CHAIN and self.delta_bytes < MAX_DELTA_SHARE * self.base_size


def _schema(conns: Mapping[str, FeedReader]) -> str:
    digest = hashlib.sha256()
    for db in sorted(conns):
        for table in sorted(conns[db].tables()):
            digest.update(orjson.dumps([db, table, conns[db].columns(table)]))
    return digest.hexdigest()


def position(feed: ChangeFeedSource) -> FeedPosition | None:
    """The feed position of a database at rest (a full backup's consistent copy); None without a database."""
    conns = feed.databases()
    if not conns:
        return None
    with feed.read():
        marks: Watermarks = {}
        anchors: dict[str, dict[str, str]] = {}
        for db, conn in conns.items():
            present = conn.tables()
            marks[db], anchors[db] = {}, {}
            for spec in APPEND_TABLES.get(db, ()):
                if spec.name not in present:
                    continue
                mark = conn.max_key(spec)
                marks[db][spec.name] = mark
                h = anchor(conn, spec, conn.columns(spec.name), mark)
                if h is not None:
                    anchors[db][spec.name] = h
        # A capture from the end ships no row: it only hashes the small tables.
        small = capture(conns, FeedState(watermarks={d: dict(m) for d, m in marks.items()}), 1).state.small_hashes
        return FeedPosition(marks, anchors, _schema(conns), small)


def _holds(conns: Mapping[str, FeedReader], marks: Watermarks) -> bool:
    """Whether the database reaches ``marks`` in every append table they name."""
    for db, tables in marks.items():
        conn = conns.get(db)
        for table, mark in tables.items():
            spec = next((s for s in APPEND_TABLES.get(db, ()) if s.name == table), None)
            if spec is None or conn is None or table not in conn.tables() or conn.max_key(spec) < mark:
                return False
    return True


@dataclass(frozen=True)
class Delta:
    segment: bytes  # the encoded change-feed segment
    position: FeedPosition  # where the feed stands after it
    snapshot_ms: int  # it holds every write committed before this instant


def capture_delta(feed: ChangeFeedSource, since: FeedPosition, header: dict[str, Any]) -> Delta | None:
    """The rows committed since ``since``, in one read snapshot; None when a full backup is needed."""
    conns = feed.databases()
    if not conns:
        return None
    snapshot_ms = time.time_ns() // 1_000_000
    with feed.read():
        schema = _schema(conns)
        if schema != since.schema:
            return None  # a migration ran since: the restored base tables would not take the rows
        if not _holds(conns, since.marks):
            return None  # behind the previous backup: restored from older state
        state = FeedState(watermarks={d: dict(m) for d, m in since.marks.items()}, small_hashes=dict(since.small))
        cap = capture(conns, state, MAX_DELTA_ROWS)
    if cap.more:
        return None
    for db, anchors in since.anchors.items():
        for table, expected in anchors.items():
            if cap.anchor_before.get(db, {}).get(table) != expected:
                return None  # another history under the same keys (a restore that then grew past the mark)
    seg = Segment({**header, "captured_ms": snapshot_ms, "before": cap.before, "after": cap.after, "anchor_before": cap.anchor_before,
                   "anchor_after": cap.anchor_after, "min_ms": cap.min_ms, "max_ms": cap.max_ms}, cap.blocks)
    return Delta(seg.encode(), FeedPosition(cap.state.watermarks, cap.anchor_after, schema, cap.state.small_hashes),
                 snapshot_ms)


def apply_deltas(sink: RestoreSink, deltas: list[bytes], watermarks: Watermarks) -> Watermarks:
    """Apply a chain's deltas, oldest first, to the restored full backup; returns the watermarks reached.

    ``watermarks`` are the full backup's (tables it does not name start at their restored highest key)."""
    with sink.feed() as conns:
        current = restored_marks(conns, watermarks)
        for raw in deltas:
            seg = Segment.decode(raw)
            applied = Applied()
            for db, conn in conns.items():
                with conn.transaction():
                    apply_db(conn, db, seg, current.setdefault(db, {}), None, applied)
            for db, marks in seg.header["after"].items():
                for t, mark in marks.items():
                    current.setdefault(db, {})[t] = max(current.get(db, {}).get(t, 0), int(mark))
        return current


# -- the feed position of a restored database (for replication) -------------------------------------
POSITION_META = "replication-position"


def record_position(sink: RestoreSink) -> Watermarks:
    """Write into the restored database where it stands in the change feed (each append table's highest key:
    it holds every row up to it), so a replicator started on it ships only what is newer."""
    with sink.feed() as conns:
        marks = restored_marks(conns, {})
        main = conns.get(MAIN_DB)
        if main is not None and "meta" in main.tables():
            with main.transaction():
                main.upsert("meta", ["name", "value"], [(POSITION_META, orjson.dumps(marks))])
        return marks


def recorded_position(conns: Mapping[str, FeedReader]) -> Watermarks:
    """The position ``record_position`` wrote, if the database still holds every row up to it; else {}."""
    main = conns.get(MAIN_DB)
    if main is None or "meta" not in main.tables():
        return {}
    found = [v for n, v in main.all_rows("meta", ["name", "value"]) if n == POSITION_META]
    if not found:
        return {}
    try:
        marks = {str(d): {str(t): int(k) for t, k in m.items()} for d, m in orjson.loads(bytes(found[0])).items()}
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return {}
    return marks if _holds(conns, marks) else {}
