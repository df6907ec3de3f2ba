"""Asynchronous bulk jobs ($export, $import): their records, their encrypted files, their threads.

A job is one row of the store's ``meta`` table (``bulk-job/<tenant>/<id>``), so it lives in the
database of either engine, survives a restart, and needs no migration. The row is sealed (AES-GCM)
under the tenant's ``bulk-jobs`` data key: the request may carry search values (``_typeFilter``),
and the row carries the job's own file key. Files (NDJSON outputs, error files) are written under
``DATA_DIR/bulk/<id>/`` in sealed chunks under that per-job key, never in clear; deleting the job
deletes its files and, with its row, the only copy of their key.

Jobs run in a small thread pool in the server process (``JobRunner``); the running job writes a
heartbeat into its row, so a job whose process died is recognised (``stale``) and marked failed.
Used by services/bulk_export.py; the kick-off/status/cancel pattern is the same for $import.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import re
import secrets
import shutil
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from fhirvault.ports import Clock, ResourceStore, WriteTx
from fhirvault.services.crypto import Aead, DecryptionError, associated_data, new_key
from fhirvault.services.keys import DataKey, KeyRing

log = logging.getLogger("fhirvault.bulk")

BULK_COMPARTMENT = "bulk-jobs"  # the data key sealing job rows (files have a key per job)
_META_PREFIX = "bulk-job/"
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_CHUNK = 1 << 20  # plaintext bytes per sealed chunk of a file
HEARTBEAT_MS = 5_000
STALE_MS = 60_000  # no heartbeat for this long: the process running it died

# Job states. A job ends in one of the last three; a cancelled job's row is deleted at once.
QUEUED, RUNNING, COMPLETED, FAILED = "queued", "running", "completed", "failed"
FINISHED = frozenset({COMPLETED, FAILED})


class JobCancelled(Exception):
    """Raised inside a running job once its cancellation was asked for."""


def valid_job_id(job_id: str) -> bool:
    return bool(_JOB_ID.match(job_id))


@dataclass(frozen=True, slots=True)
class JobFile:
    """One output (or error) file of a job: resource type, file name in the job's folder, lines."""

    type: str
    name: str
    count: int


@dataclass(slots=True)
class BulkJob:
    job_id: str
    kind: str  # export | import
    tenant: str
    client_id: str  # the client that started it: the only one that may poll, download, cancel
    user: str | None  # and the user behind that client, for user tokens
    request: str  # the kick-off URL, as the manifest echoes it
    created_ms: int
    params: dict[str, Any] = field(default_factory=dict)  # kind-specific (types, since, filters…)
    status: str = QUEUED
    heartbeat_ms: int = 0
    progress: str = "queued"
    transaction_time_ms: int = 0
    finished_ms: int = 0
    outputs: list[JobFile] = field(default_factory=list)
    errors: list[JobFile] = field(default_factory=list)
    failure: str | None = None  # why a failed job failed (one line, no PHI)
    file_key: bytes = b""  # AES-256 key of this job's files

    def owned_by(self, client_id: str | None, user: str | None) -> bool:
        return client_id is not None and client_id == self.client_id and user == self.user

    def stale(self, now_ms: int) -> bool:
        """Queued or running, but nothing has moved it for too long: its process is gone."""
        return self.status not in FINISHED and now_ms - max(self.heartbeat_ms, self.created_ms) > STALE_MS

    def to_json(self) -> bytes:
        doc = dataclasses.asdict(self)
        doc["file_key"] = base64.b64encode(self.file_key).decode()
        return orjson.dumps(doc)

    @staticmethod
    def from_json(raw: bytes) -> BulkJob:
        doc = orjson.loads(raw)
        doc["file_key"] = base64.b64decode(doc["file_key"])
        doc["outputs"] = [JobFile(**f) for f in doc["outputs"]]
        doc["errors"] = [JobFile(**f) for f in doc["errors"]]
        return BulkJob(**doc)


def new_job(kind: str, tenant: str, client_id: str, user: str | None, request: str, now_ms: int,
            params: dict[str, Any]) -> BulkJob:
    return BulkJob(secrets.token_urlsafe(24), kind, tenant, client_id, user, request, now_ms, params,
                   heartbeat_ms=now_ms, file_key=new_key())


class BulkJobStore:
    """Job rows in the store's ``meta`` table, sealed under the tenant's bulk-jobs data key."""

    def __init__(self, store: ResourceStore, keys: KeyRing, tenant: str) -> None:
        self._store = store
        self._keys = keys
        self._tenant = tenant
        self._key: DataKey | None = None

    def _data_key(self) -> DataKey:
        if self._key is None:
            self._key = self._keys.for_compartment_sync(BULK_COMPARTMENT)
        return self._key

    def _name(self, job_id: str) -> str:
        return f"{_META_PREFIX}{self._tenant}/{job_id}"

    def _seal(self, job: BulkJob) -> bytes:
        key = self._data_key()
        name = self._name(job.job_id)
        return key.key_id.encode() + b"\0" + key.aead.seal(job.to_json(), associated_data("bulk-job", name, key.key_id))

    def _open(self, name: str, raw: bytes) -> BulkJob:
        key_id, _, blob = raw.partition(b"\0")
        key = self._keys.by_id(key_id.decode())
        return BulkJob.from_json(key.aead.open(blob, associated_data("bulk-job", name, key.key_id)))

    def get(self, job_id: str) -> BulkJob | None:
        if not valid_job_id(job_id):
            return None
        name = self._name(job_id)
        raw = self._store.get_meta(name)
        return None if raw is None else self._open(name, raw)

    def save(self, job: BulkJob) -> None:
        sealed = self._seal(job)
        self._store.write_sync("bulk.job", lambda tx: tx.set_meta(self._name(job.job_id), sealed))

    def update(self, job_id: str, change: Callable[[BulkJob], bool]) -> BulkJob | None:
        """Read, change and write the job in one transaction (so a cancel and the runner never lose
        each other's writes); ``change`` returns False to write nothing. None: no such job."""
        name = self._name(job_id)
        self._data_key()

        def job(tx: WriteTx) -> BulkJob | None:
            raw = tx.get_meta(name)
            if raw is None:
                return None
            found = self._open(name, raw)
            if change(found):
                tx.set_meta(name, self._seal(found))
            return found

        return self._store.write_sync("bulk.job", job)

    def delete(self, job_id: str) -> None:
        self._store.write_sync("bulk.job", lambda tx: tx.delete_meta(self._name(job_id)))

    def all(self) -> list[BulkJob]:
        """Every job of the tenant (a maintenance pass: retention, crash recovery)."""
        prefix = f"{_META_PREFIX}{self._tenant}/"
        names = self._store.write_sync("bulk.list", lambda tx: [n for n in tx.meta_names() if n.startswith(prefix)])
        jobs = []
        for name in names:
            raw = self._store.get_meta(name)
            if raw is not None:
                try:
                    jobs.append(self._open(name, raw))
                except (DecryptionError, ValueError, KeyError, TypeError):
                    log.error("unreadable bulk job row %s left alone", name[len(prefix):][:64])
        return jobs


class JobFiles:
    """A job's files under ``root/<job id>/``, each a sequence of AES-GCM sealed chunks.

    Every chunk's associated data names the job, the file, its position and whether it is the last,
    so chunks cannot be swapped between files or reordered, and a truncated file fails to open."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, job_id: str) -> Path:
        if not valid_job_id(job_id):
            raise ValueError("malformed job id")
        return self.root / job_id

    def _path(self, job_id: str, name: str) -> Path:
        if not _FILE_NAME.match(name) or name.startswith("."):
            raise ValueError("malformed file name")
        return self.folder(job_id) / name

    def writer(self, job: BulkJob, name: str) -> SealedWriter:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder = self.folder(job.job_id)
        folder.mkdir(mode=0o700, exist_ok=True)
        return SealedWriter(self._path(job.job_id, name), Aead(job.file_key), job.job_id, name)

    def read(self, job: BulkJob, name: str) -> Iterator[bytes]:
        """The plaintext of a file, chunk by chunk; DecryptionError if it was altered or cut short."""
        path = self._path(job.job_id, name)
        aead = Aead(job.file_key)
        with path.open("rb") as f:
            index = 0
            while True:
                head = f.read(5)
                if len(head) < 5:
                    raise DecryptionError("truncated bulk file")
                length, last = struct.unpack(">IB", head)
                blob = f.read(length)
                yield aead.open(blob, associated_data("bulk-file", job.job_id, name, index, last))
                if last:
                    return
                index += 1

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    def folders(self) -> list[str]:
        """Job ids that have a folder (to find files whose job row is gone)."""
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.is_dir() and valid_job_id(p.name)]


class SealedWriter:
    """Appends plaintext, seals it in chunks; ``close`` seals the last one (a file without it is cut)."""

    def __init__(self, path: Path, aead: Aead, job_id: str, name: str) -> None:
        self._aead = aead
        self._job_id = job_id
        self._name = name
        self._buffer = bytearray()
        self._index = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._file = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, data: bytes) -> None:
        self._buffer += data
        self.size += len(data)
        while len(self._buffer) >= _CHUNK * 2:  # always keep a chunk for close() to seal as the last
            self._seal(bytes(self._buffer[:_CHUNK]), last=False)
            del self._buffer[:_CHUNK]

    def _seal(self, data: bytes, *, last: bool) -> None:
        blob = self._aead.seal(data, associated_data("bulk-file", self._job_id, self._name, self._index, int(last)))
        self._file.write(struct.pack(">IB", len(blob), int(last)) + blob)
        self._index += 1

    def close(self) -> None:
        self._seal(bytes(self._buffer), last=True)
        self._buffer.clear()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


class JobRunner:
    """Runs jobs on a few threads; a cancellation is a flag the job checks (``checkpoint``)."""

    def __init__(self, jobs: BulkJobStore, clock: Clock, *, threads: int = 2) -> None:
        self.jobs = jobs
        self.clock = clock
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bulk-job")
        self._cancelled: set[str] = set()
        self._mine: set[str] = set()
        self._lock = threading.Lock()

    def submit(self, job_id: str, work: Callable[[JobControl], None]) -> None:
        with self._lock:
            self._mine.add(job_id)
        self._pool.submit(self._run, job_id, work)

    def runs(self, job_id: str) -> bool:
        """Whether this process has the job queued or running: then it is alive, whatever its heartbeat
        (a busy database can delay heartbeats), and must not be declared dead."""
        with self._lock:
            return job_id in self._mine

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.add(job_id)

    def cancelled(self, job_id: str) -> bool:
        with self._lock:
            return self._closed or job_id in self._cancelled

    def _run(self, job_id: str, work: Callable[[JobControl], None]) -> None:
        control = JobControl(self, job_id)
        try:
            if self.cancelled(job_id):
                return
            self.jobs.update(job_id, control.mark(RUNNING, "started"))
            work(control)
        except JobCancelled:
            log.info("bulk job cancelled")
        except Exception as exc:
            log.exception("bulk job failed")
            reason = exc.args[0] if isinstance(exc, ValueError) and exc.args else type(exc).__name__
            try:
                self.jobs.update(job_id, control.fail(str(reason)[:200]))
            except Exception:
                log.exception("could not record a bulk job's failure")
        finally:
            with self._lock:
                self._cancelled.discard(job_id)
                self._mine.discard(job_id)

    def close(self) -> None:
        with self._lock:
            self._closed = True  # running jobs stop at their next checkpoint; a restart marks them failed
        self._pool.shutdown(wait=False, cancel_futures=True)


class JobControl:
    """What a running job uses: heartbeats with progress, cancellation checks, its end."""

    def __init__(self, runner: JobRunner, job_id: str) -> None:
        self._runner = runner
        self.job_id = job_id
        self._last = 0

    def checkpoint(self, progress: str, *, force: bool = False) -> None:
        """Raise JobCancelled if cancelled; write the progress at most every few seconds."""
        if self._runner.cancelled(self.job_id):
            raise JobCancelled()
        now = self._runner.clock.now_ms()
        if force or now - self._last >= HEARTBEAT_MS:
            self._last = now
            found = self._runner.jobs.update(self.job_id, self.mark(RUNNING, progress))
            if found is None:  # the row was deleted (cancelled from another process)
                raise JobCancelled()

    def mark(self, status: str, progress: str) -> Callable[[BulkJob], bool]:
        now = self._runner.clock.now_ms()

        def change(job: BulkJob) -> bool:
            if job.status in FINISHED:
                return False
            job.status, job.progress, job.heartbeat_ms = status, progress, now
            return True

        return change

    def fail(self, reason: str) -> Callable[[BulkJob], bool]:
        now = self._runner.clock.now_ms()

        def change(job: BulkJob) -> bool:
            if job.status in FINISHED:
                return False
            job.status, job.failure, job.finished_ms, job.heartbeat_ms = FAILED, reason, now, now
            return True

        return change

    def complete(self, fill: Callable[[BulkJob], None]) -> BulkJob | None:
        """Mark the job completed, ``fill`` setting its outputs, in one transaction."""
        now = self._runner.clock.now_ms()

        def change(job: BulkJob) -> bool:
            if job.status in FINISHED:
                return False
            fill(job)
            job.status, job.progress, job.finished_ms, job.heartbeat_ms = COMPLETED, "completed", now, now
            return True

        return self._runner.jobs.update(self.job_id, change)
