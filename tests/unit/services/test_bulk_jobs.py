"""Bulk job rows (sealed in the meta table, on every engine) and their sealed files."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fhirvault.adapters.memory_keys import MemoryRootKeyProvider
from fhirvault.container import SystemClock
from fhirvault.ports import ResourceStore
from fhirvault.services import bulk_jobs
from fhirvault.services.bulk_jobs import (
    COMPLETED,
    FAILED,
    RUNNING,
    BulkJobStore,
    JobControl,
    JobFile,
    JobFiles,
    JobRunner,
    new_job,
)
from fhirvault.services.crypto import DecryptionError
from fhirvault.services.keys import KeyRing
from tests.store_engines import open_test_store


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResourceStore]:
    yield from open_test_store(request.param, tmp_path)


@pytest.fixture
def jobs(store: ResourceStore) -> BulkJobStore:
    ring = KeyRing(store, MemoryRootKeyProvider(), "default", SystemClock())
    ring.initialise()
    return BulkJobStore(store, ring, "default")


def _job(now: int = 1_000) -> bulk_jobs.BulkJob:
    return new_job("export", "default", "client-a", None, "http://x/fhir/$export?_typeFilter=Patient%3Fname%3DMartin",
                   now, {"types": ["Patient"]})


def test_job_round_trips_sealed_and_is_deleted(jobs: BulkJobStore, store: ResourceStore) -> None:
    job = _job()
    jobs.save(job)
    name = f"bulk-job/default/{job.job_id}"
    raw = store.get_meta(name)
    assert raw is not None and b"Martin" not in raw and job.file_key not in raw  # sealed, not in clear
    again = jobs.get(job.job_id)
    assert again == job
    assert [j.job_id for j in jobs.all()] == [job.job_id]
    jobs.delete(job.job_id)
    assert jobs.get(job.job_id) is None and jobs.all() == []
    assert store.get_meta(name) is None


def test_update_is_read_modify_write(jobs: BulkJobStore) -> None:
    job = _job()
    jobs.save(job)

    def finish(j: bulk_jobs.BulkJob) -> bool:
        j.status = COMPLETED
        j.outputs = [JobFile("Patient", "Patient.1.ndjson", 3)]
        return True

    jobs.update(job.job_id, finish)
    found = jobs.get(job.job_id)
    assert found is not None and found.status == COMPLETED and found.outputs[0].count == 3
    assert jobs.update("x" * 20, finish) is None
    assert jobs.get("../../etc") is None  # not an id: never a meta lookup


def test_stale_when_no_heartbeat() -> None:
    job = _job(now=0)
    assert not job.stale(bulk_jobs.STALE_MS)
    assert job.stale(bulk_jobs.STALE_MS + 1)
    job.status = COMPLETED
    assert not job.stale(10 * bulk_jobs.STALE_MS)


def test_files_are_sealed_in_chunks_and_detect_tampering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk_jobs, "_CHUNK", 64)
    files = JobFiles(tmp_path / "bulk")
    job = _job()
    w = files.writer(job, "Patient.1.ndjson")
    lines = b"".join(b'{"resourceType":"Patient","name":[{"family":"Martin%d"}]}\n' % i for i in range(20))
    w.write(lines)
    w.close()
    stored = (tmp_path / "bulk" / job.job_id / "Patient.1.ndjson").read_bytes()
    assert b"Martin" not in stored
    assert b"".join(files.read(job, "Patient.1.ndjson")) == lines
    cut = tmp_path / "bulk" / job.job_id / "cut.ndjson"
    cut.write_bytes(stored[: len(stored) // 2])
    with pytest.raises(DecryptionError):
        b"".join(files.read(job, "cut.ndjson"))
    other = _job()
    with pytest.raises(DecryptionError):  # another job's key
        b"".join(files.read(dataclasses.replace(job, file_key=other.file_key), "Patient.1.ndjson"))
    assert files.folders() == [job.job_id]
    files.remove(job.job_id)
    assert files.folders() == []
    with pytest.raises(ValueError):
        files.writer(job, "../escape")


def test_runner_runs_cancels_and_records_failures(jobs: BulkJobStore) -> None:
    runner = JobRunner(jobs, SystemClock(), threads=1)
    done = threading.Event()
    ok = _job()
    jobs.save(ok)

    def work(control: JobControl) -> None:
        control.checkpoint("half", force=True)
        control.complete(lambda j: j.outputs.append(JobFile("Patient", "p.ndjson", 1)))
        done.set()

    runner.submit(ok.job_id, work)
    assert done.wait(10)
    found = jobs.get(ok.job_id)
    assert found is not None and found.status == COMPLETED and found.outputs

    bad = _job()
    jobs.save(bad)
    failed = threading.Event()

    def broken(control: JobControl) -> None:
        try:
            raise ValueError("no such group")
        finally:
            failed.set()

    runner.submit(bad.job_id, broken)
    assert failed.wait(10)
    for _ in range(100):
        found = jobs.get(bad.job_id)
        if found is not None and found.status == FAILED:
            break
        threading.Event().wait(0.05)
    assert found is not None and found.status == FAILED and found.failure == "no such group"

    slow = _job()
    jobs.save(slow)
    started, stopped = threading.Event(), threading.Event()

    def waits(control: JobControl) -> None:
        started.set()
        try:
            for _ in range(200):
                control.checkpoint("working")
                threading.Event().wait(0.02)
        finally:
            stopped.set()

    runner.submit(slow.job_id, waits)
    assert started.wait(10)
    assert runner.runs(slow.job_id) and not runner.runs(ok.job_id)  # alive here, whatever its heartbeat
    runner.cancel(slow.job_id)
    assert stopped.wait(10)
    found = jobs.get(slow.job_id)
    assert found is not None and found.status == RUNNING  # the canceller deletes the row, not the runner
    runner.close()
