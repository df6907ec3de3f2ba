"""The backup engine: create, list, verify, restore and prune backups on a target.

Layout on the target::

    chunks/<id[:2]>/<id>        sealed 256 KiB pieces of the files; id = HMAC-SHA256(key, plaintext)
    manifests/<backup id>.json  one per complete backup, written last (see manifest.py)
    leases/<backup id>          a backup in progress (prune does not sweep chunks meanwhile)
    verified/<backup id>        written by a successful ``verify``
    gc/pending                  chunks found unreferenced by the previous prune (mark phase)

Files are cut into fixed 256 KiB pieces: SQLite rewrites pages in place, so an
unchanged region of the database gives the same pieces again and only changed
pieces are uploaded. A backup is complete only once its manifest exists; the
manifest is written after every chunk it names has been stored, so an
interrupted backup is never listed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import orjson

from fhirvault.adapters.files import fsync_dir, write_new
from fhirvault.backup import erasure_ledger
from fhirvault.backup.chain import (
    DELTA_KIND,
    ChainInfo,
    Delta,
    apply_deltas,
    capture_delta,
    position,
    record_position,
)
from fhirvault.backup.manifest import (
    CHUNK_PREFIX,
    MANIFEST_PREFIX,
    BackupKeys,
    FileEntry,
    ForeignBackup,
    Manifest,
    ManifestBody,
    ManifestError,
    build_manifest,
    chunk_key,
    manifest_key,
    open_manifest,
    parse_manifest,
)
from fhirvault.backup.objects import ObjectError, open_sealed, seal
from fhirvault.backup.ports import (
    CLINICAL_DB,
    ChangeFeedSource,
    DatabaseCheckError,
    RestoreSink,
    SnapshotSource,
)
from fhirvault.backup.retention import keep
from fhirvault.backup.settings import RetentionSettings
from fhirvault.backup.snapshot import SnapshotFile, deployment_secrets, snapshot
from fhirvault.backup.target import (
    BackupTarget,
    TargetError,
    TargetImmutable,
    TargetNotFound,
    TargetUnavailable,
)
from fhirvault.ports import RootKeyProvider

T = TypeVar("T")
log = logging.getLogger("fhirvault.backup")

# 256 KiB, a multiple of every SQLite page size. Measured on 4,000 resources (12 MB): one
# create rewrites ~100 pages scattered over the search index, which changes 66/185 chunks
# at 64 KiB (1.2 MB uploaded), 30/48 at 256 KiB (2.7 MB) and 13/13 at 1 MiB (5.5 MB).
# 256 KiB keeps small changes cheap without multiplying object counts on S3.
CHUNK_SIZE = 256 << 10
LEASE_PREFIX = "leases/"
VERIFIED_PREFIX = "verified/"
GC_PENDING = "gc/pending"
# A backup renews its lease every LEASE_RENEW_S; one not renewed for LEASE_TTL_MS is from a backup that died
# (killed, host down). Leases of releases that did not renew them expire LEGACY_LEASE_TTL_MS after their start.
LEASE_RENEW_S = 60.0
LEASE_TTL_MS = 10 * 60_000
LEGACY_LEASE_TTL_MS = 24 * 3_600_000
_PIPELINE = 8  # chunks sealed/uploaded concurrently


class BackupError(Exception):
    """A backup operation failed; the message says what to do, never contains data."""


class RestoreError(BackupError):
    pass


class Replay(Protocol):
    """Replays replicated changes after a base backup (``fhirvault.backup.replication.replay``)."""

    def __call__(self, target: BackupTarget, backup_key: bytes, data_dir: Path,
                 watermarks: dict[str, dict[str, int]], until_ms: int | None) -> object: ...


def default_replay() -> Replay | None:
    """The replication module's ``replay`` if this build has one."""
    try:
        from importlib import import_module

        fn = getattr(import_module("fhirvault.backup.replication"), "replay", None)
    except ImportError:
        return None
    return fn if callable(fn) else None


@dataclass(frozen=True)
class Retry:
    delays: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)

    def run(self, what: str, fn: Callable[[], T]) -> T:
        for delay in (*self.delays, None):
            try:
                return fn()
            except TargetUnavailable as exc:
                if delay is None:
                    raise BackupError(f"target unavailable while {what} ({len(self.delays)} retries): {exc}") from None
                log.warning("backup target unavailable, retrying", extra={"what": what, "delay_s": delay})
                time.sleep(delay)
        raise AssertionError("unreachable")


DEFAULT_RETRY = Retry()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_backup_id(now_ms: int) -> str:
    """Sortable by time: ``20261129T033000123Z-1a2b3c``."""
    stamp = datetime.fromtimestamp(now_ms / 1000, UTC).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}{now_ms % 1000:03d}Z-{secrets.token_hex(3)}"


# -- listing ------------------------------------------------------------------------------------
@dataclass
class Listing:
    manifests: list[Manifest]  # oldest first
    problems: list[str] = field(default_factory=list)  # unreadable manifests


def list_backups(target: BackupTarget, retry: Retry = DEFAULT_RETRY) -> Listing:
    keys = retry.run("listing manifests", lambda: list(target.list(MANIFEST_PREFIX)))
    out = Listing([])
    for key in keys:
        if not key.endswith(".json"):
            continue
        try:
            raw = retry.run(f"reading {key}", partial(target.get, key))
            out.manifests.append(parse_manifest(raw, key))
        except (ManifestError, TargetNotFound) as exc:
            out.problems.append(str(exc))
    out.manifests.sort(key=lambda m: (m.created_ms, m.backup_id))
    return out


def verified_ids(target: BackupTarget, keys: BackupKeys, retry: Retry = DEFAULT_RETRY) -> set[str]:
    found: set[str] = set()
    for key in retry.run("listing verifications", lambda: list(target.list(VERIFIED_PREFIX))):
        backup_id = key[len(VERIFIED_PREFIX):]
        try:
            open_sealed(keys.seal_key, "verified", backup_id, retry.run("reading a verification", partial(target.get, key)))
        except (ObjectError, TargetNotFound):
            continue
        found.add(backup_id)
    return found


# -- leases -------------------------------------------------------------------------------------
class Lease:
    """A backup in progress on the target: prune sweeps no chunk while one is live.

    A thread renews it every ``renew_s``, so the lease of a backup that died goes stale within
    ``LEASE_TTL_MS``; one from a dead process of this very host is stale at once."""

    def __init__(self, target: BackupTarget, key: str, started_ms: int, retry: Retry,
                 renew_s: float = LEASE_RENEW_S) -> None:
        self._target, self._key, self._started, self._retry, self._renew_s = target, key, started_ms, retry, renew_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> bytes:
        return orjson.dumps({"started_ms": self._started, "renewed_ms": _now_ms(), "ttl_ms": LEASE_TTL_MS,
                             "host": socket.gethostname(), "pid": os.getpid()})

    def start(self) -> None:
        self._retry.run("writing the lease", lambda: self._target.put(self._key, self._doc()))
        self._thread = threading.Thread(target=self._run, name="fhirvault-backup-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._renew_s):
            try:
                self._target.put(self._key, self._doc())
            except TargetError as exc:  # the backup itself will fail or retry; keep trying
                log.warning("could not renew the backup lease", extra={"error": type(exc).__name__})

    def end(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(TargetError):
            self._target.delete(self._key)


def lease_live(doc: object, now_ms: int) -> bool:
    """Whether a lease document (``Lease``'s, or an older release's) stands for a backup still running."""
    if not isinstance(doc, dict) or not isinstance(doc.get("started_ms"), int):
        return False
    renewed = doc.get("renewed_ms")
    if not isinstance(renewed, int):
        return bool(now_ms - doc["started_ms"] < LEGACY_LEASE_TTL_MS)
    if doc.get("host") == socket.gethostname() and isinstance(doc.get("pid"), int):
        try:
            os.kill(doc["pid"], 0)
        except ProcessLookupError:
            return False  # its process is gone
        except PermissionError:
            pass  # alive, another user's
    ttl = doc.get("ttl_ms")
    ttl = min(ttl, LEGACY_LEASE_TTL_MS) if isinstance(ttl, int) and ttl > 0 else LEASE_TTL_MS
    return bool(now_ms - renewed < ttl)


# -- create -------------------------------------------------------------------------------------
@dataclass
class CreateResult:
    backup_id: str
    size: int
    files: int
    chunks: int
    uploaded_chunks: int
    uploaded_bytes: int
    seconds: float
    watermarks: dict[str, dict[str, int]]
    incremental: bool = False  # a delta on top of the previous backup (backup/chain.py)


def _previous(target: BackupTarget, root: RootKeyProvider, instance_id: str,
              retry: Retry) -> tuple[Manifest, ManifestBody] | None:
    """This deployment's newest readable backup."""
    for m in reversed(list_backups(target, retry).manifests):
        if m.instance_id != instance_id:
            continue
        with contextlib.suppress(ManifestError):
            return m, open_manifest(m, root)[1]
    return None


def create_backup(data_dir: Path, target: BackupTarget, root: RootKeyProvider, *, retain_days: int = 0,
                  retry: Retry = DEFAULT_RETRY, clock: Callable[[], int] = _now_ms,
                  chunk_size: int = CHUNK_SIZE, source: SnapshotSource | None = None,
                  feed: ChangeFeedSource | None = None, full: bool = False) -> CreateResult:
    """Take an online, consistent backup of ``data_dir`` (a server may be writing to it).

    ``source`` is the database behind it (``container.snapshot_source``; by default found from ``data_dir``).
    ``feed`` (``container.delta_feed_source``; by default found from ``data_dir`` when ``source`` is) lets the
    backup be a delta on top of the previous one (backup/chain.py) unless ``full``."""
    started = time.monotonic()
    if source is None:
        from fhirvault.container import delta_feed_source, snapshot_source

        source = snapshot_source(data_dir)
        feed = feed or delta_feed_source(data_dir)
    secrets_ = deployment_secrets(data_dir, root, source)
    keys = BackupKeys(secrets_.backup_key, secrets_.signing_seed)
    created_ms = clock()
    backup_id = new_backup_id(created_ms)
    retain = created_ms + retain_days * 86_400_000 if retain_days else None
    lease = Lease(target, LEASE_PREFIX + backup_id, created_ms, retry)
    lease.start()
    try:
        found = _previous(target, root, secrets_.instance_id, retry)
        previous = None if found is None else found[1]
        known = {} if previous is None else {cid: (h, previous.chunk_retain.get(cid))
                                             for cid, h in previous.chunk_sha256.items()}
        present = set(retry.run("listing chunks", lambda: list(target.list(CHUNK_PREFIX))))
        # With object lock, a chunk whose lock ends within half the lock period is stored again
        # (a fresh, locked version), so every chunk a new backup names stays undeletable long enough.
        lock_floor = created_ms + retain_days * 43_200_000 if retain_days else None
        reusable = {cid: (h, until) for cid, (h, until) in known.items() if chunk_key(cid) in present
                    and (lock_floor is None or (until is not None and until >= lock_floor))}
        delta = None
        if feed is not None and previous is not None and not full and set(known) <= set(reusable):
            delta = _delta(feed, previous, backup_id)
        if delta is not None and previous is not None:
            body, uploaded, snapshot_ms = _upload_delta(delta, previous, target, keys, reusable, retain, retry,
                                                        chunk_size)
        else:
            with snapshot(data_dir, source) as snap:
                body, uploaded = _upload(snap.files, target, keys, reusable, retain, retry, chunk_size)
                body.watermarks = snap.watermarks
                snapshot_ms = snap.snapshot_ms
                if feed is not None:
                    body.chain = _chain_start(snap.files, body)
        # A prune running meanwhile may have removed a chunk we reused: never name a missing one.
        for cid in set(body.chunk_sha256) - uploaded:
            if not retry.run("checking chunks", partial(target.exists, chunk_key(cid))):
                raise BackupError(f"chunk {cid[:12]}… vanished from the target during the backup; run it again")
        raw = build_manifest(backup_id, secrets_.instance_id, created_ms, snapshot_ms, body, keys, root)
        retry.run("writing the manifest", lambda: target.put(manifest_key(backup_id), raw, retain_until_ms=retain))
        with source.meta(read_only=True) as meta:
            erased = erasure_ledger.local_entries(data_dir, meta.get_meta(erasure_ledger.LEDGER_META))
        retry.run("writing the erasure ledger", partial(erasure_ledger.publish, target, erased, keys.signer,
                                                        keys.public_key_hex))
    finally:
        lease.end()
    return CreateResult(backup_id, sum(f.size for f in body.files), len(body.files), len(body.chunk_sha256),
                        body.uploaded_chunks, body.uploaded_bytes, time.monotonic() - started, body.watermarks,
                        incremental=delta is not None)


# -- deltas (backup/chain.py) -----------------------------------------------------------------------
def _chain_start(files: list[SnapshotFile], body: ManifestBody) -> dict[str, object] | None:
    """The feed position of a full backup, read from its consistent copies (None: no database there)."""
    from fhirvault.container import change_feed_source

    copies = files[0].path.parent
    feed = change_feed_source(copies)
    try:
        pos = position(feed)
    finally:
        feed.close()
    if pos is None:
        return None
    return ChainInfo(pos, 0, sum(f.size for f in body.files), 0).to_json()


def _delta(feed: ChangeFeedSource, previous: ManifestBody, backup_id: str) -> tuple[Delta, ChainInfo] | None:
    chain = ChainInfo.from_json(previous.chain)
    if chain is None or not chain.room_for_delta():
        return None
    header = {"backup_id": backup_id, "index": chain.length + 1}
    try:
        delta = capture_delta(feed, chain.position, header)
    finally:
        feed.close()
    if delta is None:
        return None
    return delta, ChainInfo(delta.position, chain.length + 1, chain.base_size,
                            chain.delta_bytes + len(delta.segment))


def _upload_delta(found: tuple[Delta, ChainInfo], previous: ManifestBody, target: BackupTarget, keys: BackupKeys,
                  reusable: dict[str, tuple[str, int | None]], retain: int | None, retry: Retry,
                  chunk_size: int) -> tuple[ManifestBody, set[str], int]:
    delta, chain = found
    with tempfile.TemporaryDirectory(prefix="fhirvault-delta-") as tmp:
        path = Path(tmp) / f"delta-{chain.length:04d}.seg"
        write_new(path, delta.segment)
        body, uploaded = _upload([SnapshotFile(path.name, path, DELTA_KIND)], target, keys, reusable, retain, retry,
                                 chunk_size)
    body.files = [*previous.files, *body.files]
    for cid in {c for f in previous.files for c in f.chunks}:
        body.chunk_sha256[cid], until = reusable[cid]
        if until is not None:
            body.chunk_retain[cid] = until
    body.watermarks = delta.position.marks
    body.chain = chain.to_json()
    return body, uploaded, delta.snapshot_ms


def _upload(files: list[SnapshotFile], target: BackupTarget, keys: BackupKeys,
            reusable: dict[str, tuple[str, int | None]], retain: int | None, retry: Retry,
            chunk_size: int) -> tuple[ManifestBody, set[str]]:
    seal_key = keys.seal_key
    if chunk_size % 65536:
        raise ValueError("the chunk size must be a multiple of 64 KiB (the largest SQLite page)")
    body = ManifestBody([], {}, {}, chunk_size)
    uploaded: set[str] = set()
    pending: dict[str, Future[tuple[str, int]]] = {}

    def store(cid: str, data: bytes) -> tuple[str, int]:
        sealed = seal(seal_key, "chunk", cid, data)
        retry.run("uploading chunks", lambda: target.put(chunk_key(cid), sealed, retain_until_ms=retain))
        return hashlib.sha256(sealed).hexdigest(), len(sealed)

    def settle(fut_id: str) -> None:
        digest, size = pending.pop(fut_id).result()
        body.chunk_sha256[fut_id] = digest
        if retain is not None:
            body.chunk_retain[fut_id] = retain
        body.uploaded_chunks += 1
        body.uploaded_bytes += size

    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="fhirvault-backup") as pool:
        try:
            for f in files:
                file_hash = hashlib.sha256()
                entry = FileEntry(f.name, f.kind, 0, "", [])
                with f.path.open("rb") as fh:
                    while data := fh.read(chunk_size):
                        file_hash.update(data)
                        entry.size += len(data)
                        cid = keys.chunk_id(data)
                        entry.chunks.append(cid)
                        if cid in body.chunk_sha256 or cid in pending:
                            continue
                        if cid in reusable:
                            body.chunk_sha256[cid], until = reusable[cid]
                            if until is not None:
                                body.chunk_retain[cid] = until
                            continue
                        uploaded.add(cid)
                        pending[cid] = pool.submit(store, cid, data)
                        while len(pending) >= _PIPELINE:
                            done = next((c for c, fu in pending.items() if fu.done()), None)
                            if done is None:
                                next(iter(pending.values())).result()
                                continue
                            settle(done)
                entry.sha256 = file_hash.hexdigest()
                body.files.append(entry)
            for cid in list(pending):
                settle(cid)
        except BaseException:
            for fut in pending.values():
                fut.cancel()
            raise
    return body, uploaded


# -- open / choose --------------------------------------------------------------------------------
def choose(target: BackupTarget, root: RootKeyProvider, *, backup_id: str | None = None, at_ms: int | None = None,
           instance_id: str | None = None, retry: Retry = DEFAULT_RETRY) -> tuple[Manifest, BackupKeys, ManifestBody, list[str]]:
    """The backup to restore: ``backup_id``, or the newest one (before ``at_ms``) that opens.

    Returns notes about skipped backups (foreign or damaged manifests).
    """
    listing = list_backups(target, retry)
    notes = list(listing.problems)
    if backup_id is not None:
        found = [m for m in listing.manifests if m.backup_id == backup_id]
        if not found:
            raise BackupError(f"no backup {backup_id} on {target.url}")
        candidates = found
    else:
        candidates = [m for m in reversed(listing.manifests) if at_ms is None or m.snapshot_ms <= at_ms]
        if not candidates:
            when = "" if at_ms is None else " taken before the requested time"
            raise BackupError(f"no backup{when} on {target.url}")
    for m in candidates:
        try:
            if instance_id is not None and m.instance_id != instance_id:
                raise ForeignBackup(f"backup {m.backup_id} belongs to another deployment "
                                    f"(instance {m.instance_id}, this one is {instance_id})")
            keys, body = open_manifest(m, root)
            return m, keys, body, notes
        except ManifestError as exc:
            if backup_id is not None:
                raise BackupError(str(exc)) from None
            notes.append(f"skipped: {exc}")
    raise BackupError("no usable backup: " + "; ".join(notes[-3:]))


# -- verify ---------------------------------------------------------------------------------------
@dataclass
class VerifyResult:
    backup_id: str
    chunks: int = 0
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_chunk(target: BackupTarget, keys: BackupKeys, body: ManifestBody, cid: str, retry: Retry) -> bytes:
    """A chunk's plaintext, after checking its stored hash, its seal and its keyed id."""
    try:
        sealed = retry.run("reading chunks", lambda: target.get(chunk_key(cid)))
    except TargetNotFound:
        raise ObjectError(f"chunk {cid[:16]}… is missing from the target") from None
    if hashlib.sha256(sealed).hexdigest() != body.chunk_sha256.get(cid):
        raise ObjectError(f"chunk {cid[:16]}… does not match its SHA-256 in the manifest (corrupt)")
    data = open_sealed(keys.seal_key, "chunk", cid, sealed)
    if keys.chunk_id(data) != cid:
        raise ObjectError(f"chunk {cid[:16]}… holds other content than its id says")
    return data


def verify_backup(target: BackupTarget, root: RootKeyProvider, backup_id: str | None = None, *,
                  instance_id: str | None = None, retry: Retry = DEFAULT_RETRY, mark: bool = True) -> VerifyResult:
    """Re-read every chunk and file of a backup; on success, record it as verified on the target."""
    try:
        m, keys, body, _ = choose(target, root, backup_id=backup_id, instance_id=instance_id, retry=retry)
    except BackupError as exc:
        return VerifyResult(backup_id or "latest", problems=[str(exc)])
    result = VerifyResult(m.backup_id)
    good: set[str] = set()
    for f in body.files:
        digest = hashlib.sha256()
        for cid in f.chunks:
            try:
                data = _read_chunk(target, keys, body, cid, retry)
            except ObjectError as exc:
                result.problems.append(f"{f.name}: {exc}")
                break
            if cid not in good:
                good.add(cid)
                result.chunks += 1
            result.bytes_read += len(data)
            digest.update(data)
        else:
            if digest.hexdigest() != f.sha256:
                result.problems.append(f"{f.name}: reassembled file does not match its SHA-256")
    if result.ok and mark:
        marker = seal(keys.seal_key, "verified", m.backup_id, orjson.dumps({"verified_ms": _now_ms()}))
        retry.run("recording the verification", lambda: target.put(VERIFIED_PREFIX + m.backup_id, marker))
    return result


# -- restore --------------------------------------------------------------------------------------
@dataclass
class RestoreResult:
    backup_id: str
    data_dir: Path
    size: int
    seconds: float
    snapshot_ms: int
    watermarks: dict[str, dict[str, int]]
    replayed: object = None
    notes: list[str] = field(default_factory=list)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def restore_backup(target: BackupTarget, to_dir: Path, root_key_file: bytes, *, backup_id: str | None = None,
                   at_ms: int | None = None, replay: Replay | None = None, retry: Retry = DEFAULT_RETRY,
                   sink: Callable[[Path], RestoreSink] | None = None,
                   allow_missing_ledger: bool = False,
                   erasure_entries: set[erasure_ledger.Entry] | None = None) -> RestoreResult:
    """Rebuild a data directory from a backup; ``to_dir`` must be absent or empty.

    The target's erasure ledger (with ``erasure_entries``, a copy the operator gives) goes into the
    restored directory (backup/erasure_ledger.py); without one the restore fails unless ``allow_missing_ledger``.

    Everything is written to a hidden staging directory next to ``to_dir`` and renamed
    into place only when complete and checked, so a failure never leaves a directory
    that looks like a valid data directory.
    """
    from fhirvault.adapters.keyfile import KeyFileProvider
    from fhirvault.container import restore_sink

    started = time.monotonic()
    to_dir = to_dir.absolute()
    if to_dir.exists() and (not to_dir.is_dir() or any(to_dir.iterdir())):
        raise RestoreError(f"refusing to restore into {to_dir}: it exists and is not empty")
    to_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = to_dir.parent / f".{to_dir.name}.restoring-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o700)
    try:
        try:
            write_new(staging / "root.key", root_key_file)
            root = KeyFileProvider.load(staging / "root.key")
        except (OSError, ValueError) as exc:
            raise RestoreError(f"the root key material is unusable: {exc}") from None
        m, keys, body, notes = choose(target, root, backup_id=backup_id, at_ms=at_ms, retry=retry)
        erased = _erasure_ledger(target, keys, m.snapshot_ms, allow_missing_ledger, retry, erasure_entries)
        free = shutil.disk_usage(staging).free
        if free < m.size + (64 << 20):
            raise RestoreError(f"not enough disk space in {to_dir.parent}: backup {m.backup_id} needs "
                               f"{m.size / 1e6:.0f} MB plus headroom, {free / 1e6:.0f} MB free")
        for f in body.files:
            if f.kind != DELTA_KIND:
                _restore_file(target, keys, body, f, staging / f.name, retry)
        databases = [f.name for f in body.files if f.kind not in ("file", DELTA_KIND)]
        restored = (sink or restore_sink)(staging)
        try:
            restored.load(databases)
        except DatabaseCheckError as exc:
            raise RestoreError(str(exc)) from None
        _restore_deltas(target, keys, body, restored, retry)
        replayed = None
        if replay is not None:
            replayed = replay(target, keys.seal_key, staging, body.watermarks, at_ms)  # as the replicator seals
        _check_databases(restored, databases)
        record_position(restored)
        erasure_ledger.write_file(staging, erased)  # re-applied by the first start, before anything serves
        fsync_dir(staging)
        if to_dir.exists():
            to_dir.rmdir()
        os.rename(staging, to_dir)
        fsync_dir(to_dir.parent)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno in _NO_SPACE:
            raise RestoreError(f"disk full while restoring into {to_dir}; nothing was left behind. "
                               "Free space (or pick another --to) and run the restore again") from None
        raise RestoreError(f"cannot restore into {to_dir}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RestoreResult(m.backup_id, to_dir, m.size, time.monotonic() - started, m.snapshot_ms, body.watermarks,
                         replayed, notes)


def _erasure_ledger(target: BackupTarget, keys: BackupKeys, snapshot_ms: int, allow_missing: bool,
                    retry: Retry, extra: set[erasure_ledger.Entry] | None) -> set[erasure_ledger.Entry]:
    try:
        return retry.run("reading the erasure ledger", partial(
            erasure_ledger.for_restore, target, keys.public_key_hex, snapshot_ms, allow_missing=allow_missing,
            extra=extra))
    except erasure_ledger.LedgerError as exc:
        raise RestoreError(str(exc)) from None


def _restore_file(target: BackupTarget, keys: BackupKeys, body: ManifestBody, f: FileEntry, path: Path,
                  retry: Retry) -> None:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for cid in f.chunks:
            try:
                data = _read_chunk(target, keys, body, cid, retry)
            except ObjectError as exc:
                raise RestoreError(f"backup is damaged ({f.name}): {exc}; try an older backup (--backup ID)") from None
            digest.update(data)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if digest.hexdigest() != f.sha256:
        raise RestoreError(f"backup is damaged: {f.name} does not match its SHA-256")


def _restore_deltas(target: BackupTarget, keys: BackupKeys, body: ManifestBody, restored: RestoreSink,
                    retry: Retry) -> None:
    """Apply the deltas of an incremental backup (backup/chain.py) on top of its restored full backup."""
    deltas: list[bytes] = []
    for f in body.files:
        if f.kind != DELTA_KIND:
            continue
        try:
            data = b"".join(_read_chunk(target, keys, body, cid, retry) for cid in f.chunks)
        except ObjectError as exc:
            raise RestoreError(f"backup is damaged ({f.name}): {exc}; try an older backup (--backup ID)") from None
        if hashlib.sha256(data).hexdigest() != f.sha256:
            raise RestoreError(f"backup is damaged: {f.name} does not match its SHA-256")
        deltas.append(data)
    if deltas:
        try:
            apply_deltas(restored, deltas, {})  # the full backup's files end at their highest keys
        except ValueError as exc:
            raise RestoreError(f"backup is damaged: a delta does not decode ({exc})") from None


def _check_databases(sink: RestoreSink, names: list[str]) -> None:
    if CLINICAL_DB not in names:
        raise RestoreError(f"the backup holds no {CLINICAL_DB}")
    try:
        sink.check(names)
    except DatabaseCheckError as exc:
        raise RestoreError(str(exc)) from None


# -- prune ----------------------------------------------------------------------------------------
@dataclass
class PruneResult:
    kept: list[str]
    deleted_manifests: list[str]
    deleted_chunks: int = 0
    pending_chunks: int = 0  # unreferenced, deleted at a later prune once the grace period is over
    deleted_segments: int = 0  # replication segments every retained backup already contains
    notes: list[str] = field(default_factory=list)


def _active_leases(target: BackupTarget, now_ms: int) -> list[str]:
    active = []
    for key in target.list(LEASE_PREFIX):
        try:
            doc = orjson.loads(target.get(key))
        except (TargetNotFound, orjson.JSONDecodeError):
            continue
        if lease_live(doc, now_ms):
            active.append(key)
    return active


def prune(target: BackupTarget, root: RootKeyProvider, instance_id: str, policy: RetentionSettings, *,
          now_ms: int | None = None, dry_run: bool = False, retry: Retry = DEFAULT_RETRY) -> PruneResult:
    """Apply the retention policy, then mark-and-sweep unreferenced chunks.

    Never deletes the newest backup nor the newest verified one. A chunk is deleted only
    if it was already unreferenced at a previous prune at least ``grace_seconds`` ago, is
    still unreferenced now, and no backup is in progress (lease) now.
    """
    now = _now_ms() if now_ms is None else now_ms
    listing = list_backups(target, retry)
    opened: dict[str, tuple[Manifest, ManifestBody]] = {}
    keys: BackupKeys | None = None
    foreign = list(listing.problems)
    for m in listing.manifests:
        try:
            if m.instance_id != instance_id:
                raise ForeignBackup(f"backup {m.backup_id} belongs to instance {m.instance_id}")
            keys, body = open_manifest(m, root)
            opened[m.backup_id] = (m, body)
        except ManifestError as exc:
            foreign.append(str(exc))
    mine = [opened[b][0] for b in opened]
    protected: set[str] = set()
    if keys is not None:
        verified = verified_ids(target, keys, retry) & set(opened)
        if verified:
            protected.add(max(verified, key=lambda b: (opened[b][0].created_ms, b)))
    kept_ids = keep(((m.backup_id, m.created_ms) for m in mine), now, policy, protected)
    result = PruneResult(sorted(kept_ids), [])
    for m in mine:
        if m.backup_id in kept_ids:
            continue
        if not dry_run:
            try:
                retry.run("deleting manifests", partial(target.delete, manifest_key(m.backup_id)))
                target.delete(VERIFIED_PREFIX + m.backup_id)
            except TargetImmutable:
                result.notes.append(f"backup {m.backup_id} is under object lock; kept until its retention ends")
                continue
        result.deleted_manifests.append(m.backup_id)
        del opened[m.backup_id]
    if foreign:
        # Their chunks are not ours to judge: never sweep a target we cannot fully read.
        result.notes.append("chunks not swept: the target holds manifests this deployment cannot read: " + foreign[0])
        return result
    if keys is None:
        return result
    seal_key = keys.seal_key
    referenced = {cid for _, body in opened.values() for cid in body.chunk_sha256}
    present = {k[k.rfind("/") + 1:] for k in retry.run("listing chunks", lambda: list(target.list(CHUNK_PREFIX)))}
    unreferenced = present - referenced
    previous: dict[str, int] = {}
    with contextlib.suppress(TargetNotFound, ObjectError, orjson.JSONDecodeError):
        previous = orjson.loads(open_sealed(seal_key, "gc", "pending", target.get(GC_PENDING)))
    # Mark: remember when each chunk was first seen unreferenced.
    pending = {cid: previous.get(cid, now) for cid in unreferenced}
    due = [cid for cid, since in pending.items() if now - since >= policy.grace_seconds * 1000]
    if _active_leases(target, now):
        result.notes.append("a backup is in progress: unreferenced chunks are kept until the next prune")
        due = []
    if not dry_run:
        for cid in due:
            try:
                retry.run("deleting chunks", partial(target.delete, chunk_key(cid)))
            except TargetImmutable:
                continue
            del pending[cid]
            result.deleted_chunks += 1
        retry.run("recording unreferenced chunks",
                  lambda: target.put(GC_PENDING, seal(seal_key, "gc", "pending", orjson.dumps(pending))))
    result.pending_chunks = len(pending)
    result.deleted_segments = _prune_segments(target, seal_key, opened, now, policy, dry_run)
    return result


def _prune_segments(target: BackupTarget, seal_key: bytes, opened: dict[str, tuple[Manifest, ManifestBody]],
                    now: int, policy: RetentionSettings, dry_run: bool) -> int:
    """Replication segments: point-in-time restore is promised within ``keep_all_days``, from the oldest
    backup of that window; segments that backup already contains are deleted."""
    if not opened:
        return 0
    from fhirvault.backup.replication import prune_segments

    window_start = now - policy.keep_all_days * 86_400_000
    ordered = sorted(opened.values(), key=lambda mb: mb[0].created_ms)
    in_window = [mb for mb in ordered if mb[0].created_ms >= window_start]
    anchor = in_window[0] if in_window else ordered[-1]
    return prune_segments(target, seal_key, anchor[1].watermarks, dry_run=dry_run)

