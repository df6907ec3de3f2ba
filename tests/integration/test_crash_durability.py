"""Kill -9 in the middle of a create load: every acknowledged create survives, intact; a power cut at any
point never keeps a write without its audit entry, or the reverse."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import PATIENT, start_server

FHIR_JSON = {"Content-Type": "application/fhir+json"}


async def _load(fhir: str, token: str, acknowledged: dict[str, str], stop_at: float) -> None:
    async with httpx.AsyncClient(base_url=fhir, headers={"Authorization": f"Bearer {token}"}, timeout=10) as c:

        async def worker(n: int) -> None:
            i = 0
            while time.monotonic() < stop_at:
                i += 1
                family = f"Crash{n}x{i}"
                try:
                    r = await c.post("/Patient", json=dict(PATIENT, name=[{"family": family}]), headers=FHIR_JSON)
                except httpx.HTTPError:
                    return  # the server died under us
                if r.status_code == 201:
                    acknowledged[r.json()["id"]] = family

        await asyncio.gather(*(worker(n) for n in range(16)))


@pytest.mark.slow
@pytest.mark.server
def test_sigkill_loses_no_acknowledged_write(tmp_path: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "server.log"
    srv = start_server(data, log)
    token = srv.token()
    acknowledged: dict[str, str] = {}

    async def run() -> None:
        load = asyncio.create_task(_load(srv.fhir, token, acknowledged, time.monotonic() + 30))
        while len(acknowledged) < 300:
            await asyncio.sleep(0.01)
        srv.kill_all()  # mid-load, supervisor and worker at once: no clean shutdown
        await load

    asyncio.run(run())
    assert len(acknowledged) >= 300
    restarted = start_server(data, log)
    try:
        with restarted.client() as c:
            for pid, family in acknowledged.items():
                r = c.get(f"/Patient/{pid}")
                assert r.status_code == 200, (pid, r.status_code)
                assert r.json()["name"][0]["family"] == family
            # the search index caught up too (tags not yet flushed at the crash are rebuilt on start)
            for pid, family in list(acknowledged.items())[-50:]:
                found = c.get("/Patient", params={"family:exact": family}).json()
                assert [e["resource"]["id"] for e in found.get("entry", [])] == [pid], family
    finally:
        restarted.stop()


# -- power loss: a clinical write and its audit entry are durable together, or not at all -------------------------
_WORKLOAD = """
import os, signal, sys, threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from fhirvault.adapters.sqlite_store import SqliteStore
from fhirvault.ports import StoredVersion

store = SqliteStore(Path(sys.argv[1]))
done = 0
lock = threading.Lock()

def write(i):
    global done
    def job(tx):  # what the repository does: the version and its audit entry in one write job
        seq = tx.insert_version("t", StoredVersion("Patient", f"p{i}", 1, i, False, "k", os.urandom(64)))
        tx.append_audit("t", i, lambda _s: b"version %d" % seq)
    store.write_sync("create", job)
    with lock:
        done += 1
        if done == 400:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-load, writes still queued: no clean shutdown

with ThreadPoolExecutor(8) as pool:
    list(pool.map(write, range(800)))
"""
_WAL_HEADER, _FRAME_HEADER = 32, 24


def _wal_cuts(wal: bytes) -> list[int]:
    """Lengths a power cut can leave the WAL at: around each commit frame, the transaction's frames all
    there but its commit frame missing, torn in the middle, or whole (the frames between two commits are
    ignored by recovery the same way as the one just before a commit)."""
    page = int.from_bytes(wal[8:12], "big")
    frame = _FRAME_HEADER + page
    cuts = [0, _WAL_HEADER]
    for start in range(_WAL_HEADER, len(wal) - frame + 1, frame):
        if int.from_bytes(wal[start + 4 : start + 8], "big"):  # a commit frame
            cuts += [start, start + frame // 2, start + frame]
    return cuts


def _pairing(data: Path) -> tuple[set[int], set[int]]:
    """(seqs of clinical versions, seqs their audit entries name), wherever the audit table lives."""
    conn = sqlite3.connect(data / "fhirvault.sqlite3")
    try:
        schema = "main"
        if (data / "audit.sqlite3").exists():  # the layout before migration 3
            conn.execute("ATTACH DATABASE ? AS audit", (str(data / "audit.sqlite3"),))
            schema = "audit"
        tables = {r[0] for r in conn.execute(f"SELECT name FROM {schema}.sqlite_master")}
        versions = {r[0] for r in conn.execute("SELECT seq FROM resource_versions")} \
            if "resource_versions" in {r[0] for r in conn.execute("SELECT name FROM main.sqlite_master")} else set()
        audited = {int(bytes(r[0]).split()[1]) for r in conn.execute(f"SELECT blob FROM {schema}.audit_log")} \
            if "audit_log" in tables else set()
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        return versions, audited
    finally:
        conn.close()


@pytest.mark.sqlite_only  # the SQLite files' write-ahead log (PostgreSQL commits the audit schema in the same transaction)
def test_power_loss_at_any_point_never_splits_a_write_from_its_audit_entry(tmp_path: Path) -> None:
    """kill -9 mid-load, then every state a power cut can leave each WAL in (cut at every frame, torn commit
    frames): on reopen, every clinical version has its audit entry and every entry its version. With the
    audit log in an ATTACHed second file (before migration 3) a cut of one WAL between the two files'
    commits leaves one without the other, which this test reports."""
    data = tmp_path / "data"
    data.mkdir()
    run = subprocess.run([sys.executable, "-c", _WORKLOAD, str(data / "fhirvault.sqlite3")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr
    wals = sorted(data.glob("*-wal"))
    assert wals and all(w.stat().st_size > _WAL_HEADER for w in wals)
    versions, audited = _pairing(_copy(data, tmp_path / "whole", {}))
    assert len(versions) >= 400 and versions == audited  # kill -9 alone
    states = 0
    split: list[str] = []
    for wal in wals:
        raw = wal.read_bytes()
        for cut in _wal_cuts(raw):
            copy = _copy(data, tmp_path / f"cut-{states}", {wal.name: raw[:cut]})
            versions, audited = _pairing(copy)
            if versions != audited:
                split.append(f"{wal.name} cut at {cut}: {len(versions - audited)} versions without an audit entry,"
                             f" {len(audited - versions)} entries without a version")
            shutil.rmtree(copy)
            states += 1
    assert states > 100
    assert split == [], split[-3:]  # the last: a cut between the two files' commits


def _copy(data: Path, to: Path, cut: dict[str, bytes]) -> Path:
    to.mkdir()
    for f in data.iterdir():
        if not f.name.endswith("-shm"):  # shared memory does not survive a power cut; SQLite rebuilds it
            (to / f.name).write_bytes(cut.get(f.name, f.read_bytes()))
    return to
