"""Continuous replication of the change feed to a backup target, and point-in-time replay.

The ``Replicator`` runs beside the server: about once a second it reads what was
committed since its watermarks (through a ``ChangeFeedSource``: for SQLite its own
read-only connections, one short read transaction per file, so the store's write
path is untouched), seals it as one
segment and puts it on the target. A segment only counts once the put succeeded;
until then the same sealed bytes are retried (with backoff) and the watermarks
stay where they are, so an outage loses nothing and a retry never duplicates.

Segments are named ``wal/<generation>/<index:012d>-<before:020d>-<after:020d>.seg``
(the numbers are the resource_versions watermarks), so a listing is the order of
the feed. A generation is one unbroken history: a restarted replicator continues
the latest generation when the database still holds the row that generation's
last segment ends at; otherwise (a restored or replaced database) it starts a
new one.

``replay`` applies the segments after a base snapshot's watermarks to a restored
data directory, optionally stopping at a point in time.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from fhirvault.backup.chain import recorded_position
from fhirvault.backup.changefeed import (
    APPEND_TABLES,
    MAIN_DB,
    Applied,
    Capture,
    FeedState,
    Segment,
    Watermarks,
    anchor,
    append_spec,
    apply_db,
    capture,
    restored_marks,
    row_hash,
)
from fhirvault.backup.objects import open_sealed, seal
from fhirvault.backup.ports import ChangeFeedSource, FeedReader, FeedWriter, RestoreSink
from fhirvault.backup.target import BackupTarget, TargetError, TargetImmutable
from fhirvault.ports import ResourceStore, WriteTx
from fhirvault.services.keys import KeyRing
from fhirvault.services.repository import resource_aad
from fhirvault.services.search_index import SearchIndex

log = logging.getLogger("fhirvault.replication")

PREFIX = "wal/"
KIND = "segment"
FORMAT = 1
_MAX_BACKOFF_S = 30.0


def segment_name(generation: str, index: int, before: int, after: int) -> str:
    return f"{PREFIX}{generation}/{index:012d}-{before:020d}-{after:020d}.seg"


def new_generation(now: float) -> str:
    # Sorts by creation time; the random part keeps two replicators started in one second apart.
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + secrets.token_hex(4)


def list_generations(target: BackupTarget) -> dict[str, list[str]]:
    """generation -> its segment keys in feed order (generations sorted oldest first)."""
    out: dict[str, list[str]] = {}
    for key in target.list(PREFIX):
        parts = key[len(PREFIX):].split("/")
        if len(parts) == 2 and parts[1].endswith(".seg"):
            out.setdefault(parts[0], []).append(key)
    return {g: sorted(out[g]) for g in sorted(out)}


def load_segment(target: BackupTarget, name: str, backup_key: bytes) -> Segment:
    return Segment.decode(open_sealed(backup_key, KIND, name, target.get(name)))


def prune_segments(target: BackupTarget, backup_key: bytes, base: Watermarks, *, dry_run: bool = False) -> int:
    """Delete the segments that ``base`` (a retained backup's watermarks) already contains.

    Replay from any backup at or after ``base`` skips them anyway. The last segment of each
    generation is kept: a restarted replicator resumes from it. Returns how many were deleted.
    """
    deleted = 0
    base_rv = base.get(MAIN_DB, {}).get("resource_versions", 0)
    for keys in list_generations(target).values():
        for key in keys[:-1]:
            after_rv = int(key.rsplit("-", 1)[1].split(".", 1)[0])
            if after_rv > base_rv:
                break  # this and the later segments hold versions the base does not have
            if not _covered(load_segment(target, key, backup_key), base):
                break
            if not dry_run:
                try:
                    target.delete(key)
                except TargetImmutable:
                    break
            deleted += 1
    return deleted


@dataclass
class ReplicationStats:
    cycles: int = 0
    segments: int = 0
    rows: int = 0
    bytes_shipped: int = 0  # sealed bytes put on the target
    raw_bytes: int = 0  # encoded segment bytes before compression and sealing
    failures: int = 0
    cycle_cpu_s: float = 0.0  # CPU time of this process's cycles (reading, encoding, sealing)
    last_cycle_ms: float = 0.0
    last_error: str | None = None  # an exception type name, never its message (it could name a path)


class Replicator:
    """Ships the change feed of ``source`` (a data directory or a ChangeFeedSource) to ``target``; start() runs
    it on a daemon thread."""

    def __init__(self, source: Path | ChangeFeedSource, target: BackupTarget, backup_key: bytes, *, interval_s: float = 1.0,
                 max_rows: int = 20_000, initial_watermarks: Watermarks | None = None,
                 retain_ms: int | None = None) -> None:
        if isinstance(source, Path):
            from fhirvault.container import change_feed_source

            source = change_feed_source(source)
        self._source = source
        self._target = target
        self._key = backup_key
        self.interval_s = interval_s
        self._max_rows = max_rows
        self._initial = initial_watermarks or {}
        self._retain_ms = retain_ms
        self._generation: str | None = None
        self._index = 0
        self._state = FeedState()
        self._pending: tuple[str, bytes, Capture, int] | None = None
        self._oldest_unshipped_ms: int | None = None
        self._seen_versions: dict[str, int] = {}  # the source's change tokens at the last complete capture
        self._pending_versions: dict[str, int] = {}
        self._behind = False
        self._lock = threading.Lock()  # one cycle at a time (thread, final flush, tests)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = ReplicationStats()
        self.last_success_ms: int | None = None  # wall clock of the last segment put (or idle check)

    # -- status ---------------------------------------------------------------
    @property
    def generation(self) -> str | None:
        return self._generation

    @property
    def watermarks(self) -> Watermarks:
        return {db: dict(w) for db, w in self._state.watermarks.items()}

    def lag_seconds(self) -> float:
        """Age of the oldest commit not yet on the target (0 when caught up)."""
        oldest = self._oldest_unshipped_ms
        return 0.0 if oldest is None else max(0.0, time.time() - oldest / 1000)

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fhirvault-replicator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread, then try once to ship what is left (a clean shutdown has no lag)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with contextlib.suppress(TargetError, OSError, *self._source.errors):
            for _ in range(100):  # bounded: writers should be stopped by now, but never spin forever
                if not self.run_once():
                    break
        self._source.close()

    def _run(self) -> None:
        failures = 0
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                self.run_once()
            except Exception as exc:  # keep replicating; the type (never the message) is logged
                failures += 1
                self.stats.failures += 1
                self.stats.last_error = type(exc).__name__
                delay = min(_MAX_BACKOFF_S, self.interval_s * 2 ** min(failures, 8))
                log.warning("replication cycle failed; retrying",
                            extra={"error": type(exc).__name__, "retry_s": round(delay, 1),
                                   "lag_s": round(self.lag_seconds(), 1)})
                continue
            failures = 0
            delay = 0.0 if self._behind else self.interval_s

    # -- one cycle ------------------------------------------------------------
    def _resume(self, conns: Mapping[str, FeedReader]) -> None:
        """Continue the latest generation if this database is its continuation, else start a new one."""
        gens = list_generations(self._target)
        if gens:
            generation, keys = list(gens.items())[-1]
            last = load_segment(self._target, keys[-1], self._key)
            if self.continues(conns, last):
                self._generation = generation
                self._index = int(last.header["index"]) + 1
                self._state = FeedState(watermarks={d: dict(w) for d, w in last.header["after"].items()})
                log.info("replication resumed", extra={"generation": generation, "segment": self._index})
                return
            log.warning("database does not continue the latest replicated generation; starting a new one")
        self._generation = new_generation(time.time())
        self._index = 0
        # A restored database knows where it stands in the feed: ship what is newer, not the whole store again.
        initial = self._initial or recorded_position(conns)
        self._state = FeedState(watermarks={d: dict(w) for d, w in initial.items()})
        log.info("replication generation started", extra={"generation": self._generation})

    @staticmethod
    def continues(conns: Mapping[str, FeedReader], seg: Segment) -> bool:
        for db, marks in seg.header["after"].items():
            conn = conns.get(db)
            for table, mark in marks.items():
                spec = append_spec(db, table)
                if spec is None or int(mark) == 0:
                    continue
                if conn is None or table not in conn.tables() or conn.max_key(spec) < int(mark):
                    return False  # the database is behind what was shipped: restored from older state
                expected = seg.header["anchor_after"].get(db, {}).get(table)
                if expected is not None and anchor(conn, spec, conn.columns(table), int(mark)) != expected:
                    return False
        return True

    def _probe(self, conns: Mapping[str, FeedReader]) -> None:
        """Commit time of the first row not on the target, for lag_seconds()."""
        oldest: list[int] = []
        for db, conn in conns.items():
            present = conn.tables()
            for spec in APPEND_TABLES.get(db, ()):
                if spec.time is None or spec.name not in present:
                    continue
                mark = self._state.watermarks.get(db, {}).get(spec.name, 0)
                first = conn.first_time_after(spec, mark)
                if first is not None:
                    oldest.append(first)
        self._oldest_unshipped_ms = min(oldest, default=None)

    def run_once(self) -> bool:
        """Ship at most one segment; True if one was shipped. Raises when the target fails."""
        with self._lock:
            started_cpu = time.thread_time()
            started = time.perf_counter()
            try:
                return self._cycle()
            finally:
                self.stats.cycles += 1
                self.stats.cycle_cpu_s += time.thread_time() - started_cpu
                self.stats.last_cycle_ms = (time.perf_counter() - started) * 1000

    def _cycle(self) -> bool:
        conns = self._source.databases()
        if MAIN_DB not in conns:
            return False  # the server has not created its database yet
        if self._generation is None:
            self._resume(conns)
        assert self._generation is not None
        if self._pending is None:
            # The change tokens move when another connection commits: an idle database costs one look per file.
            versions = self._source.change_tokens()
            if versions == self._seen_versions and not self._behind:
                self.last_success_ms = int(time.time() * 1000)
                return False
            cap = self._snapshot(conns)
            if not self._has_changes(cap):
                self._state = cap.state
                self._seen_versions = versions
                self._probe(conns)
                self._behind = False
                self.last_success_ms = int(time.time() * 1000)
                return False
            self._pending = self._build(cap)
            self._pending_versions = versions
        name, sealed, cap, raw = self._pending
        try:
            self._target.put(name, sealed, retain_until_ms=self._retain_until())
        except (TargetError, OSError):
            self._probe(conns)  # the lag keeps growing while the target is away
            raise
        self._pending = None
        self._seen_versions = self._pending_versions
        self._state = cap.state
        self._index += 1
        # Untimed tables (audit_index, audit_nodes, audit_checkpoints) may still be behind: the next cycle
        # runs at once even if nothing new was committed.
        self._behind = cap.more
        self.stats.segments += 1
        self.stats.rows += cap.rows
        self.stats.bytes_shipped += len(sealed)
        self.stats.raw_bytes += raw
        self.stats.last_error = None
        self.last_success_ms = int(time.time() * 1000)
        self._probe(conns)
        return True

    def _retain_until(self) -> int | None:
        return None if self._retain_ms is None else int(time.time() * 1000) + self._retain_ms

    def _snapshot(self, conns: Mapping[str, FeedReader]) -> Capture:
        # One short read snapshot per database: a consistent cut that never blocks the writer.
        with self._source.read():
            return capture(conns, self._state, self._max_rows)

    @staticmethod
    def _has_changes(cap: Capture) -> bool:
        return any(b.rows for b in cap.blocks) or any(b.mode == "replace" for b in cap.blocks)

    def _build(self, cap: Capture) -> tuple[str, bytes, Capture, int]:
        assert self._generation is not None
        rv_before = cap.before.get(MAIN_DB, {}).get("resource_versions", 0)
        rv_after = cap.after.get(MAIN_DB, {}).get("resource_versions", 0)
        name = segment_name(self._generation, self._index, rv_before, rv_after)
        header: dict[str, Any] = {
            "format": FORMAT, "generation": self._generation, "index": self._index,
            "captured_ms": int(time.time() * 1000),
            "before": cap.before, "after": cap.after,
            "anchor_before": cap.anchor_before, "anchor_after": cap.anchor_after,
            "min_ms": cap.min_ms, "max_ms": cap.max_ms,
        }
        raw = Segment(header, cap.blocks).encode()
        return name, seal(self._key, KIND, name, raw), cap, len(raw)


# -- replay -------------------------------------------------------------------
@dataclass
class ReplayReport:
    generation: str | None = None
    segments_applied: int = 0
    segments_skipped: int = 0  # already covered by the base snapshot
    rows: dict[str, int] = field(default_factory=dict)
    last_commit_ms: int | None = None  # the achieved recovery point: newest commit applied
    reached_until: bool = False  # stopped at the requested point in time
    gap: str | None = None  # the feed has a hole after this point: nothing later was applied
    # resources cut between two versions shipped in one segment: their search tags are a superset
    # until retag() recomputes them (see docs/replication.md)
    approximate_tags: list[tuple[str, str, str]] = field(default_factory=list)
    watermarks: Watermarks = field(default_factory=dict)


def _covered(seg: Segment, current: Watermarks) -> bool:
    return all(int(mark) <= current.get(db, {}).get(t, 0)
               for db, marks in seg.header["after"].items() for t, mark in marks.items())


def _gap(seg: Segment, current: Watermarks) -> str | None:
    for db, marks in seg.header["before"].items():
        for t, mark in marks.items():
            if int(mark) > current.get(db, {}).get(t, 0):
                return f"{db}/{t}: segment {seg.header['index']} starts at {mark}, restored data ends at " \
                       f"{current.get(db, {}).get(t, 0)}"
    return None


def _same_history(conns: Mapping[str, FeedReader], seg: Segment, current: Watermarks) -> bool:
    """The restored base holds the very row this segment starts after (not another database's)."""
    for db, conn in conns.items():
        for spec in APPEND_TABLES.get(db, ()):
            mark = current.get(db, {}).get(spec.name, 0)
            if spec.time is None or mark <= 0 or spec.name not in conn.tables():
                continue
            block = seg.block(db, spec.name)
            if block is None:
                continue
            key = spec.key_of(block.columns)
            shipped = next((r for r in block.rows if key(r) == mark), None)
            if shipped is not None:
                expected: str | None = row_hash(shipped)
            elif int(seg.header["before"].get(db, {}).get(spec.name, -1)) == mark:
                expected = seg.header["anchor_before"].get(db, {}).get(spec.name)
            else:
                continue
            if expected is not None and anchor(conn, spec, block.columns, mark) != expected:
                return False
    return True


def replay(target: BackupTarget, backup_key: bytes, data_dir: Path, watermarks: Watermarks,
           until_ms: int | None = None, *, generation: str | None = None,
           sink: RestoreSink | None = None) -> ReplayReport:
    """Apply the feed after ``watermarks`` (the base snapshot's) to ``data_dir``, up to ``until_ms``.

    The cut is per row on its commit time (resource_versions.last_updated, audit_log.ts_ms) and
    keeps a prefix of the feed, so the result is a state the source really was in. The store's
    start-up recovery is not needed afterwards: search_tags is brought up to date here.
    """
    if sink is None:
        from fhirvault.container import restore_sink

        sink = restore_sink(data_dir)
    report = ReplayReport()
    with sink.feed() as conns:
        current = restored_marks(conns, watermarks)
        gens = list_generations(target)
        order = [generation] if generation is not None else list(reversed(gens))
        for gen in order:
            if _replay_generation(target, backup_key, conns, gens.get(gen, []), current, until_ms, report):
                report.generation = gen
                break
        report.watermarks = current
        return report


def _replay_generation(target: BackupTarget, backup_key: bytes, conns: Mapping[str, FeedWriter],
                       keys: list[str], current: Watermarks, until_ms: int | None, report: ReplayReport) -> bool:
    """Apply one generation from where the base ends; False if it does not continue this base."""
    started = False
    seg: Segment | None = None
    for key in keys:
        seg = load_segment(target, key, backup_key)
        if _covered(seg, current):
            report.segments_skipped += 1
            continue
        gap = _gap(seg, current)
        if gap is not None:
            report.gap = gap  # cleared if an older generation continues the base after all
            return started
        if not started:
            if not _same_history(conns, seg, current):
                return False
            started = True
            report.gap = None
        applied = Applied()
        for db, conn in conns.items():
            with conn.transaction():
                apply_db(conn, db, seg, current.setdefault(db, {}), until_ms, applied)
        report.segments_applied += 1
        for name, n in applied.rows.items():
            report.rows[name] = report.rows.get(name, 0) + n
        if applied.last_ms is not None:
            report.last_commit_ms = max(applied.last_ms, report.last_commit_ms or 0)
        report.approximate_tags += applied.approximate_tags
        if applied.cut:
            report.reached_until = True
            return True
        for db, marks in seg.header["after"].items():  # tables the restored files lack: still continuous
            for t, mark in marks.items():
                current.setdefault(db, {})[t] = max(current.get(db, {}).get(t, 0), int(mark))
    # Nothing newer than the base here: this generation is the base's only if it ends on the base's rows.
    return started or (seg is not None and Replicator.continues(conns, seg))


def retag(store: ResourceStore, keys: KeyRing, resources: list[tuple[str, str, str]]) -> int:
    """Recompute the search tags of ``resources`` from their decrypted current version.

    For the few resources a point-in-time replay left with a superset tag list (their
    intermediate version's tags were never shipped): needs the keys, which replay has not.
    Returns how many were re-tagged.
    """
    index = SearchIndex(keys)
    done = 0
    for tenant, rtype, rid in resources:
        if tenant != keys.tenant:
            continue
        v = store.read_current(tenant, rtype, rid)
        if v is None or v.deleted:
            continue
        body = orjson.loads(keys.by_id(v.key_id).aead.open(v.blob, resource_aad(tenant, rtype, rid, v.version,
                                                                                 v.key_id)))
        tags = index.resource_tags(rtype, body)  # the stamped meta is in the body: _lastUpdated included

        def write(tx: WriteTx, t: list[bytes] = tags, rt: str = rtype, i: str = rid, tn: str = tenant) -> None:
            tx.set_search_tags(tn, rt, i, t)

        store.write_sync("restore.retag", write)
        done += 1
    return done
