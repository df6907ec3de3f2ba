"""The logical change feed: what changed in the databases since a watermark, and how to apply it.

Engine-independent by design: a segment lists rows, not pages, so the same feed
can be read from and applied to another engine. Every statement is behind the
``FeedReader``/``FeedWriter`` ports (backup/ports.py; SQLite: adapters/sqlite_backup.py). Every value it carries is
already ciphertext, an HMAC or routing data (see sqlite_schema.py).

Tables are handled by kind:

* append tables (``resource_versions``, ``audit_log``, ``audit_index``,
  ``audit_checkpoints``): rows keyed by an increasing integer, never rewritten;
  the feed ships the rows above a watermark. Rows must be committed in key order
  (true with one writer per file), otherwise a late row below the watermark would
  be skipped.
* ``resources_current``: the current-version rows of the resources a segment
  touches (their tag lists included), applied as "newer seq wins".
* ``data_keys``: new keys incrementally; the whole table when anything else
  changed (a tenant key rotation re-wraps every key, a destroyed key must vanish).
* small tables (``meta``, ``tenant_keys``, ``clients``, ``seen_jti`` and any table
  this module does not know): a full copy whenever their content hash changes.
* derived tables (``search_tags``, ``index_dirty``) are never shipped: replay
  rebuilds them from the tag lists.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from fhirvault.backup.ports import (
    AUDIT_DB,
    DK_STAT_MODULUS,
    AppendTable,
    FeedReader,
    FeedWriter,
    Row,
    Watermarks,
)
from fhirvault.backup.ports import CLINICAL_DB as MAIN_DB
from fhirvault.ports import SEARCH_TAG_BYTES

__all__ = [
    "APPEND_TABLES",
    "AUDIT_DB",
    "DATABASES",
    "MAIN_DB",
    "SEGMENT_MAGIC",
    "AppendTable",
    "Applied",
    "Block",
    "Capture",
    "FeedState",
    "Row",
    "Segment",
    "Watermarks",
    "anchor",
    "append_spec",
    "apply_db",
    "capture",
    "decode_rows",
    "encode_rows",
    "restored_marks",
    "row_hash",
]

DATABASES = (MAIN_DB, AUDIT_DB)


APPEND_TABLES: dict[str, tuple[AppendTable, ...]] = {
    MAIN_DB: (
        AppendTable("resource_versions", "seq", "last_updated"),
        AppendTable("audit_log", "seq", "ts_ms"),  # until the audit log moves to audit.sqlite3
    ),
    AUDIT_DB: (
        AppendTable("audit_log", "seq", "ts_ms"),
        AppendTable("audit_index", "seq", bound_by="audit_log"),
        # written by the checkpointer in tree order, once the tree reaches the size that completes them
        AppendTable("audit_nodes", "size", bound_by="audit_log", node_key=True),
        # a checkpoint of size N covers audit rows 1..N (seq starts at 1, one writer: dense)
        AppendTable("audit_checkpoints", "size", bound_by="audit_log"),
    ),
}
CURRENT = "resources_current"
DATA_KEYS = "data_keys"
DERIVED = frozenset({"search_tags", "index_dirty"})
_DK_SLACK_MS = 300_000  # data keys created this long before the newest known one are re-checked (clock steps)


# -- row codec ------------------------------------------------------------------
# A compact typed encoding of SQLite values (orjson has no bytes type, and base64
# would inflate ciphertext by a third before compression).
_Q = struct.Struct(">q")
_D = struct.Struct(">d")
_L = struct.Struct(">I")


def encode_rows(rows: Iterable[Sequence[Any]]) -> bytes:
    out = bytearray()
    for row in rows:
        for v in row:
            if v is None:
                out += b"N"
            elif isinstance(v, int):
                out += b"I" + _Q.pack(v)
            elif isinstance(v, float):
                out += b"F" + _D.pack(v)
            elif isinstance(v, str):
                raw = v.encode()
                out += b"S" + _L.pack(len(raw)) + raw
            else:
                raw = bytes(v)
                out += b"B" + _L.pack(len(raw)) + raw
    return bytes(out)


def decode_rows(data: bytes, width: int) -> list[Row]:
    try:
        return _decode_rows(data, width)
    except (struct.error, UnicodeDecodeError):
        raise ValueError("corrupt segment: truncated value") from None


def _decode_rows(data: bytes, width: int) -> list[Row]:
    view = memoryview(data)
    values: list[Any] = []
    i, n = 0, len(data)
    while i < n:
        t = data[i]
        i += 1
        if t == 78:  # N
            values.append(None)
        elif t == 73:  # I
            values.append(_Q.unpack_from(data, i)[0])
            i += 8
        elif t == 70:  # F
            values.append(_D.unpack_from(data, i)[0])
            i += 8
        elif t in (83, 66):  # S, B
            size = _L.unpack_from(data, i)[0]
            i += 4
            if i + size > n:
                raise ValueError("corrupt segment: truncated value")
            chunk = view[i : i + size]
            values.append(str(chunk, "utf-8") if t == 83 else bytes(chunk))
            i += size
        else:
            raise ValueError("corrupt segment: unknown value type")
    if width <= 0 or len(values) % width:
        raise ValueError("corrupt segment: row width mismatch")
    return [tuple(values[j : j + width]) for j in range(0, len(values), width)]


def row_hash(row: Sequence[Any]) -> str:
    return hashlib.sha256(encode_rows([row])).hexdigest()


# -- segments -----------------------------------------------------------------
SEGMENT_MAGIC = _MAGIC = b"FVSEG1\n"


@dataclass
class Block:
    db: str
    table: str
    mode: str  # append | current | upsert | replace
    columns: list[str]
    rows: list[Row]

    def meta(self) -> dict[str, Any]:
        return {"db": self.db, "table": self.table, "mode": self.mode, "columns": self.columns, "rows": len(self.rows)}


@dataclass
class Segment:
    header: dict[str, Any]
    blocks: list[Block]

    def encode(self) -> bytes:
        head = orjson.dumps({**self.header, "blocks": [b.meta() for b in self.blocks]})
        parts = [_MAGIC, _L.pack(len(head)), head]
        for b in self.blocks:
            payload = encode_rows(b.rows)
            parts += [_Q.pack(len(payload)), payload]
        return b"".join(parts)

    @staticmethod
    def decode(data: bytes) -> Segment:
        if not data.startswith(_MAGIC):
            raise ValueError("not a change-feed segment")
        i = len(_MAGIC)
        size = _L.unpack_from(data, i)[0]
        i += 4
        header = orjson.loads(data[i : i + size])
        i += size
        blocks = []
        for meta in header.pop("blocks"):
            length = _Q.unpack_from(data, i)[0]
            i += 8
            rows = decode_rows(data[i : i + length], len(meta["columns"]))
            i += length
            if len(rows) != meta["rows"]:
                raise ValueError("corrupt segment: row count mismatch")
            blocks.append(Block(meta["db"], meta["table"], meta["mode"], list(meta["columns"]), rows))
        return Segment(header, blocks)

    def block(self, db: str, table: str) -> Block | None:
        return next((b for b in self.blocks if b.db == db and b.table == table), None)


# -- reading ------------------------------------------------------------------
def append_spec(db: str, table: str) -> AppendTable | None:
    return next((s for s in APPEND_TABLES.get(db, ()) if s.name == table), None)


def anchor(db: FeedReader, spec: AppendTable, cols: list[str], key: int) -> str | None:
    """Hash of the row at ``key`` of a table with a unique key: proves two files share a history."""
    if spec.time is None or key <= 0:
        return None
    row = db.row_at(spec, cols, key)
    return None if row is None else row_hash(row)


@dataclass
class FeedState:
    """What the target already has, per database file."""

    watermarks: Watermarks = field(default_factory=dict)
    small_hashes: dict[tuple[str, str], str] = field(default_factory=dict)
    data_keys: set[str] | None = None  # key ids on the target; None: ship the full table next
    dk_stat: tuple[int, int, int] = (0, 0, 0)  # _dk_stat() of what is on the target
    dk_max_created: int = 0
    # Tables changed in a segment that advanced no watermark: replay cannot tell such a segment
    # from one taken before its base snapshot and skips it, so the next segment that does
    # advance ships them again.
    reship: set[tuple[str, str]] = field(default_factory=set)

    def copy(self) -> FeedState:
        return FeedState({d: dict(w) for d, w in self.watermarks.items()}, dict(self.small_hashes),
                         None if self.data_keys is None else set(self.data_keys), self.dk_stat,
                         self.dk_max_created,
                         set(self.reship))


@dataclass
class Capture:
    blocks: list[Block]
    before: Watermarks
    after: Watermarks
    anchor_before: dict[str, dict[str, str]]
    anchor_after: dict[str, dict[str, str]]
    min_ms: int | None
    max_ms: int | None
    state: FeedState  # the state once this capture is on the target
    oldest_pending_ms: int | None  # commit time of the first row left for a later segment
    more: bool = False  # rows of some append table (timed or not) were left for a later segment

    @property
    def rows(self) -> int:
        return sum(len(b.rows) for b in self.blocks)


_P = DK_STAT_MODULUS  # created_ms is summed modulo this, so the sum stays an exact integer
# FeedReader.data_key_stat(): (count, sum of kek versions, sum of creation times): any insert, delete
# or re-wrap changes it.


def capture(conns: Mapping[str, FeedReader], state: FeedState, max_rows: int) -> Capture:
    """Everything committed since ``state``, read in one snapshot per file (the caller holds it open)."""
    new = state.copy()
    blocks: list[Block] = []
    before: Watermarks = {}
    after: Watermarks = {}
    a_before: dict[str, dict[str, str]] = {}
    a_after: dict[str, dict[str, str]] = {}
    times: list[int] = []
    pending: list[int] = []
    more = False
    present_by_db = {db: conn.tables() for db, conn in conns.items()}
    for db, conn in conns.items():
        present = present_by_db[db]
        marks = new.watermarks.setdefault(db, {})
        before[db], after[db], a_before[db], a_after[db] = {}, {}, {}, {}
        for spec in APPEND_TABLES.get(db, ()):
            if spec.name not in present:
                continue
            cols = conn.columns(spec.name)
            lo = marks.get(spec.name, 0)
            top = conn.max_key(spec)
            # Cap the segment; never split one key's rows (audit_index has several rows per seq).
            edge = conn.key_at_offset(spec, lo, max_rows - 1)
            hi = min(top, edge) if edge is not None else top
            if spec.bound_by is not None:
                # Replay applies these rows only up to the bounding table's applied watermark: rows past
                # what this segment ships of it wait for a later segment, or they would never be applied.
                hi = min(hi, after[db].get(spec.bound_by, hi))
            hi = max(hi, lo)
            more = more or hi < top
            rows = conn.rows_between(spec, cols, lo, hi)
            blocks.append(Block(db, spec.name, "append", cols, rows))
            before[db][spec.name], after[db][spec.name] = lo, hi
            marks[spec.name] = hi
            for key, mark in ((a_before, lo), (a_after, hi)):
                h = anchor(conn, spec, cols, mark)
                if h is not None:
                    key[db][spec.name] = h
            if spec.time is not None:
                ti = cols.index(spec.time)
                times += [r[ti] for r in rows]
                if hi < top:
                    nxt = conn.first_time_after(spec, hi)
                    if nxt is not None:
                        pending.append(nxt)
            if spec.name == "resource_versions" and CURRENT in present:
                blocks.append(_current_block(db, conn, lo, hi))
    progress = any(b.rows for b in blocks)
    small: list[Block] = []
    for db, conn in conns.items():
        present = present_by_db[db]
        handled = DERIVED | {s.name for s in APPEND_TABLES.get(db, ())} | ({CURRENT, DATA_KEYS} if db == MAIN_DB else set())
        if DATA_KEYS in present and db == MAIN_DB:
            if progress and (db, DATA_KEYS) in new.reship:
                new.data_keys = None
            block = _data_keys_block(db, conn, new)
            if block is not None:
                small.append(block)
        for table in present:
            if table in handled:
                continue
            cols = conn.columns(table)
            rows = conn.all_rows(table, cols)
            digest = hashlib.sha256(encode_rows(rows)).hexdigest()
            if new.small_hashes.get((db, table)) != digest or (progress and (db, table) in new.reship):
                small.append(Block(db, table, "replace", cols, rows))
                new.small_hashes[(db, table)] = digest
    new.reship = set() if progress else new.reship | {(b.db, b.table) for b in small}
    blocks += small
    return Capture(blocks, before, after, a_before, a_after, min(times, default=None), max(times, default=None),
                   new, min(pending, default=None), more)


def _current_block(db: str, conn: FeedReader, lo: int, hi: int) -> Block:
    # The current rows of every resource with a version in (lo, hi], even if its current version
    # is newer than hi (a capped segment): replay needs each resource's rk and tags.
    cols = ["rk", "tenant", "type", "id", "seq", "deleted", "tags"]
    return Block(db, CURRENT, "current", cols, conn.current_rows(lo, hi))


def _data_keys_block(db: str, conn: FeedReader, state: FeedState) -> Block | None:
    cols = conn.columns(DATA_KEYS)
    kid, kek, created = cols.index("key_id"), cols.index("kek_version"), cols.index("created_ms")
    stat = conn.data_key_stat()
    if state.data_keys is not None:
        if stat == state.dk_stat:
            return None
        rows = conn.data_keys(cols, state.dk_max_created - _DK_SLACK_MS)
        fresh = [r for r in rows if r[kid] not in state.data_keys]
        grown = (state.dk_stat[0] + len(fresh), state.dk_stat[1] + sum(r[kek] for r in fresh),
                 state.dk_stat[2] + sum(r[created] % _P for r in fresh))
        if grown == stat:  # only new keys: ship them
            state.data_keys |= {r[kid] for r in fresh}
            state.dk_stat = stat
            state.dk_max_created = max([state.dk_max_created, *(r[created] for r in fresh)])
            return Block(db, DATA_KEYS, "upsert", cols, fresh)
    # First segment of a process, a re-wrap (key rotation) or a destroyed key: the whole table.
    rows = conn.data_keys(cols, None)
    state.data_keys = {r[kid] for r in rows}
    state.dk_stat = (len(rows), sum(r[kek] for r in rows), sum(r[created] % _P for r in rows))
    state.dk_max_created = max((r[created] for r in rows), default=0)
    return Block(db, DATA_KEYS, "replace", cols, rows)


# -- applying -----------------------------------------------------------------
@dataclass
class Applied:
    rows: dict[str, int] = field(default_factory=dict)  # "db/table" -> rows applied
    last_ms: int | None = None  # latest commit time applied
    cut: bool = False  # a row after the point in time was reached
    # resources whose exact tag list was not shipped: (tenant, type, id), for retag()
    approximate_tags: list[tuple[str, str, str]] = field(default_factory=list)


def restored_marks(conns: Mapping[str, FeedReader], given: Watermarks) -> Watermarks:
    """Where a restored database stands: the ``given`` watermarks, else each append table's highest key."""
    current: Watermarks = {}
    for db, conn in conns.items():
        mine = given.get(db, {})
        present = conn.tables()
        current[db] = {s.name: int(mine[s.name]) if s.name in mine else conn.max_key(s)
                       for s in APPEND_TABLES.get(db, ()) if s.name in present}
    return current


def _split_tags(blob: bytes) -> set[bytes]:
    return {blob[i : i + SEARCH_TAG_BYTES] for i in range(0, len(blob), SEARCH_TAG_BYTES)}


def apply_db(conn: FeedWriter, db: str, seg: Segment, current: dict[str, int],
             until_ms: int | None, out: Applied) -> None:
    """Apply ``seg``'s blocks for one file inside the caller's transaction; advances ``current``."""
    present = set(conn.tables())
    applied_versions: list[Row] = []
    rv_cols: list[str] = []
    for spec in APPEND_TABLES.get(db, ()):
        block = seg.block(db, spec.name)
        if block is None or spec.name not in present:
            continue
        lo = current.get(spec.name, 0)
        key = spec.key_of(block.columns)
        rows = [r for r in block.rows if key(r) > lo]
        if spec.time is not None and until_ms is not None:
            ti = block.columns.index(spec.time)
            # A prefix in key order: the restored state is one the source really went through.
            stop = next((n for n, r in enumerate(rows) if r[ti] > until_ms), None)
            if stop is not None:
                rows, out.cut = rows[:stop], True
        elif spec.bound_by is not None:
            bound = current.get(spec.bound_by, 0)
            rows = [r for r in rows if key(r) <= bound]
        if rows:
            conn.insert_new(spec.name, block.columns, rows)
            current[spec.name] = max(lo, max(key(r) for r in rows))
            out.rows[f"{db}/{spec.name}"] = out.rows.get(f"{db}/{spec.name}", 0) + len(rows)
            if spec.time is not None:
                ti = block.columns.index(spec.time)
                out.last_ms = max([*([out.last_ms] if out.last_ms is not None else []), *(r[ti] for r in rows)])
        if spec.name == "resource_versions":
            applied_versions, rv_cols = rows, block.columns
    cur_block = seg.block(db, CURRENT)
    if cur_block is not None and CURRENT in present:
        _apply_current(conn, cur_block, applied_versions, rv_cols, current.get("resource_versions", 0), out)
        out.rows[f"{db}/{CURRENT}"] = out.rows.get(f"{db}/{CURRENT}", 0) + len(cur_block.rows)
    for block in seg.blocks:
        if block.db != db or block.mode not in ("upsert", "replace") or block.table not in present:
            continue
        conn.upsert(block.table, block.columns, block.rows, replace_all=block.mode == "replace")
        out.rows[f"{db}/{block.table}"] = out.rows.get(f"{db}/{block.table}", 0) + len(block.rows)


def _apply_current(conn: FeedWriter, block: Block, applied: list[Row], rv_cols: list[str],
                   applied_to: int, out: Applied) -> None:
    """Bring resources_current (and search_tags) to the state at the last applied version."""
    seq_i, del_i = rv_cols.index("seq") if rv_cols else 0, rv_cols.index("deleted") if rv_cols else 0
    ident = (rv_cols.index("tenant"), rv_cols.index("type"), rv_cols.index("id")) if rv_cols else (0, 0, 0)
    latest: dict[tuple[str, str, str], Row] = {}
    for r in applied:  # key order: the last one wins
        latest[(r[ident[0]], r[ident[1]], r[ident[2]])] = r
    for rk, tenant, rtype, rid, seq, deleted, tags in block.rows:
        if seq <= applied_to:
            target = (seq, deleted, bytes(tags))  # its current version is applied: the row is exact
        else:
            version = latest.get((tenant, rtype, rid))
            if version is None:
                continue  # nothing of this resource applied from this segment
            # Cut between two versions shipped in one segment: the tag list of the intermediate
            # version was never shipped. A superset keeps searches complete (every candidate is
            # verified against the decrypted resource); a deleted version has no tags.
            existing = conn.current_state(rk)
            union = b"".join(sorted(_split_tags(bytes(tags)) | _split_tags(existing[1] if existing else b"")))
            target = (version[seq_i], version[del_i], b"" if version[del_i] else union)
            if not version[del_i]:
                out.approximate_tags.append((tenant, rtype, rid))
        old = conn.current_state(rk)
        if old is not None and old[0] >= target[0]:
            continue
        old_tags = _split_tags(old[1]) if old is not None else set()
        new_tags = _split_tags(target[2])
        # search_tags is derived from the tag lists: the adapter removes what the old list had, adds the new one.
        conn.put_current((rk, tenant, rtype, rid, target[0], target[1], target[2]), sorted(old_tags - new_tags),
                         sorted(new_tags))
