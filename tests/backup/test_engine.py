"""The backup engine against real data directories, a real server under load and a file target."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fhirvault.backup.engine import (
    BackupError,
    RestoreError,
    Retry,
    create_backup,
    list_backups,
    prune,
    restore_backup,
    verify_backup,
)
from fhirvault.backup.file_target import FileTarget
from fhirvault.backup.manifest import manifest_key
from fhirvault.backup.settings import RetentionSettings
from fhirvault.backup.target import TargetUnavailable
from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.services.audit_verify import verify_data_dir
from tests.backup.conftest import (
    FHIR_JSON,
    MARKER,
    all_object_bytes,
    file_target,
    root_of,
    seed,
    state,
)
from tests.conftest import PATIENT, Server, start_server

FAST = Retry((0.01, 0.02))


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    s = start_server(tmp_path / "data", tmp_path / "server.log")
    try:
        yield s
    finally:
        s.stop()


def _writer(server: Server, stop: threading.Event, done: list[str]) -> threading.Thread:
    token = server.token()

    def run() -> None:
        with httpx.Client(base_url=server.fhir, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    r = c.post("/Patient", json=dict(PATIENT, name=[{"family": f"{MARKER}load{n}"}]), headers=FHIR_JSON)
                except httpx.HTTPError:
                    return
                if r.status_code == 201:
                    done.append(r.json()["id"])

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _restored_settings(path: Path) -> object:
    return load_settings({"data_dir": path}, environ={})


@pytest.mark.server
def test_backup_while_server_writes_restores_a_consistent_copy(srv: Server, tmp_path: Path) -> None:
    seed(srv, 100, 4)
    target = file_target(tmp_path / "target")
    stop, done = threading.Event(), []
    writer = _writer(srv, stop, done)
    time.sleep(0.3)
    before = len(done)
    result = create_backup(srv.data_dir, target, root_of(srv.data_dir))
    time.sleep(0.3)
    stop.set()
    writer.join(timeout=30)
    srv.stop()
    assert len(done) > before, "the server kept accepting writes during the backup"

    restored = tmp_path / "restored"
    res = restore_backup(target, restored, (srv.data_dir / "root.key").read_bytes())
    assert res.backup_id == result.backup_id
    got = state(restored)
    mark = result.watermarks["fhirvault.sqlite3"]["resource_versions"]
    assert got.max_seq == mark
    want = state(srv.data_dir, mark)
    assert got.counts == want.counts and got.hashes == want.hashes
    assert got.counts["Patient"] >= 100 and got.counts["Observation"] == 400
    assert state(srv.data_dir).max_seq > mark, "writes after the snapshot are not in it"
    report = verify_data_dir(load_settings({"data_dir": restored}, environ={}))
    assert report.ok, report.summary()
    assert "audit.sqlite3" in result.watermarks
    assert not any(p.name.startswith(".backup-tmp") for p in srv.data_dir.iterdir())
    for path, raw in all_object_bytes(tmp_path / "target"):
        assert MARKER.encode() not in raw, path


@pytest.mark.slow
@pytest.mark.server
def test_incremental_backup_uploads_only_what_changed(tmp_path: Path) -> None:
    # The server is stopped around each backup here so that its background work (index flush,
    # audit checkpoints) does not blur the count; backups under load are tested above.
    data = tmp_path / "data"
    srv = start_server(data, tmp_path / "server.log")
    seed(srv, 600, 4)
    srv.stop()
    target = file_target(tmp_path / "target")
    root = root_of(data)
    first = create_backup(data, target, root)
    unchanged = create_backup(data, target, root)
    srv = start_server(data, tmp_path / "server.log")
    seed(srv, 1, 0)
    srv.stop()
    small = create_backup(data, target, root)
    print(f"\nfull: {first.size / 1e6:.1f} MB, {first.uploaded_chunks} chunks, {first.uploaded_bytes / 1e6:.2f} MB "
          f"stored, {first.seconds:.2f} s; after one create: {small.uploaded_chunks} chunks, "
          f"{small.uploaded_bytes / 1e6:.2f} MB, {small.seconds:.2f} s")
    assert first.uploaded_chunks == first.chunks >= 20 and not first.incremental
    # Nothing changed: a delta (backup/chain.py) of the small tables and data keys, one chunk.
    assert unchanged.incremental and unchanged.uploaded_chunks == 1 and unchanged.chunks == first.chunks + 1
    assert small.incremental and small.uploaded_bytes < first.uploaded_bytes * 0.1
    full = create_backup(data, target, root, full=True)
    assert not full.incremental and full.uploaded_chunks < first.chunks * 0.8
    stored = {p.name for p in (tmp_path / "target" / "chunks").rglob("*") if p.is_file()}
    assert len(stored) == first.chunks + unchanged.uploaded_chunks + small.uploaded_chunks + full.uploaded_chunks
    for backup in (first, unchanged, small, full):
        assert verify_backup(target, root, backup.backup_id).ok


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Path, FileTarget, str]:
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    target = file_target(tmp_path / "target")
    res = create_backup(settings.data_dir, target, root_of(settings.data_dir))
    return settings.data_dir, target, res.backup_id


def _chunks(target_dir: Path) -> list[Path]:
    return sorted(p for p in (target_dir / "chunks").rglob("*") if p.is_file())


def test_verify_passes_then_catches_a_corrupted_chunk(backed_up: tuple[Path, FileTarget, str], tmp_path: Path) -> None:
    data, target, backup_id = backed_up
    root = root_of(data)
    assert verify_backup(target, root, backup_id).ok
    chunk = _chunks(tmp_path / "target")[0]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    chunk.write_bytes(bytes(raw))
    result = verify_backup(target, root, backup_id)
    assert not result.ok and "does not match its SHA-256" in result.problems[0]
    with pytest.raises(RestoreError, match="damaged"):
        restore_backup(target, tmp_path / "restored", (data / "root.key").read_bytes(), retry=FAST)
    assert not (tmp_path / "restored").exists()
    assert not list(tmp_path.glob(".restored.restoring-*"))


def test_verify_catches_a_missing_chunk(backed_up: tuple[Path, FileTarget, str], tmp_path: Path) -> None:
    data, target, backup_id = backed_up
    _chunks(tmp_path / "target")[-1].unlink()
    result = verify_backup(target, root_of(data), backup_id)
    assert not result.ok and "missing" in result.problems[0]


def test_verify_catches_a_manifest_with_a_bad_signature(backed_up: tuple[Path, FileTarget, str], tmp_path: Path) -> None:
    data, target, backup_id = backed_up
    path = tmp_path / "target" / manifest_key(backup_id)
    doc = json.loads(path.read_bytes())
    doc["snapshot_ms"] += 3_600_000  # claim a fresher backup than it is
    path.write_text(json.dumps(doc))
    result = verify_backup(target, root_of(data), backup_id)
    assert not result.ok and "signature does not verify" in result.problems[0]


def test_a_backup_from_another_deployment_is_refused(backed_up: tuple[Path, FileTarget, str], tmp_path: Path) -> None:
    data, target, own_id = backed_up
    other = load_settings({"data_dir": tmp_path / "other"}, environ={})
    initialise(other)
    foreign_id = create_backup(other.data_dir, target, root_of(other.data_dir)).backup_id
    root = root_of(data)
    instance = sqlite3.connect(data / "fhirvault.sqlite3").execute(
        "SELECT value FROM meta WHERE name='instance-id'").fetchone()[0].decode()
    result = verify_backup(target, root, foreign_id, instance_id=instance)
    assert not result.ok and "another deployment" in result.problems[0]
    result = verify_backup(target, root, foreign_id)  # without the instance id: the key does not unwrap
    assert not result.ok and "another deployment" in result.problems[0]
    with pytest.raises(BackupError, match="another deployment"):
        restore_backup(target, tmp_path / "r1", (data / "root.key").read_bytes(), backup_id=foreign_id)
    # "latest" skips the foreign (newer) backup, says so, and restores our own.
    res = restore_backup(target, tmp_path / "r2", (data / "root.key").read_bytes())
    assert res.backup_id == own_id and any("another deployment" in n for n in res.notes)


class FailingTarget(FileTarget):
    """Fails every put after ``ok_puts`` successful ones (the network went away), or ``flaky`` times."""

    def __init__(self, root: Path, ok_puts: int, flaky: int = 0) -> None:
        super().__init__(root, "FR")
        self.ok_puts, self.flaky, self.puts = ok_puts, flaky, 0

    def put(self, key: str, data: bytes, *, retain_until_ms: int | None = None) -> None:
        self.puts += 1
        if self.puts > self.ok_puts and self.flaky != 0:
            self.flaky -= 1
            raise TargetUnavailable(f"{self.url}: connection reset")
        super().put(key, data, retain_until_ms=retain_until_ms)


@pytest.mark.server
def test_target_failing_mid_upload_fails_clearly_and_lists_nothing(srv: Server, tmp_path: Path) -> None:
    seed(srv, 300, 4)
    down = FailingTarget(tmp_path / "target", ok_puts=3, flaky=-1)  # never comes back
    with pytest.raises(BackupError, match="target unavailable while uploading chunks"):
        create_backup(srv.data_dir, down, root_of(srv.data_dir), retry=FAST)
    assert down.puts > 3
    assert list_backups(down).manifests == []
    assert list(down.list("leases/")) == []
    # A flaky target (two failures) is retried and the backup completes.
    flaky = FailingTarget(tmp_path / "target", ok_puts=2, flaky=2)
    res = create_backup(srv.data_dir, flaky, root_of(srv.data_dir), retry=FAST)
    assert [m.backup_id for m in list_backups(flaky).manifests] == [res.backup_id]
    assert verify_backup(flaky, root_of(srv.data_dir)).ok


class SlowTarget(FileTarget):
    def put(self, key: str, data: bytes, *, retain_until_ms: int | None = None) -> None:
        time.sleep(0.05)
        super().put(key, data, retain_until_ms=retain_until_ms)


@pytest.mark.server
def test_server_killed_during_a_backup_next_backup_is_consistent(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data, tmp_path / "server.log")
    seed(srv, 200, 4)
    stop, done = threading.Event(), []
    writer = _writer(srv, stop, done)
    target = SlowTarget(tmp_path / "target", "FR")
    outcome: list[object] = []

    def backup() -> None:
        try:
            outcome.append(create_backup(data, target, root_of(data), retry=FAST))
        except Exception as exc:
            outcome.append(exc)

    t = threading.Thread(target=backup)
    t.start()
    time.sleep(0.15)
    srv.kill_all()
    stop.set()
    t.join(timeout=120)
    writer.join(timeout=30)
    assert outcome, "the backup finished one way or the other"

    srv = start_server(data, tmp_path / "server.log")
    seed(srv, 5, 0)
    res = create_backup(data, target, root_of(data))
    srv.stop()
    assert verify_backup(target, root_of(data), res.backup_id).ok
    restore_backup(target, tmp_path / "restored", (data / "root.key").read_bytes(), backup_id=res.backup_id)
    mark = res.watermarks["fhirvault.sqlite3"]["resource_versions"]
    got, want = state(tmp_path / "restored"), state(data, mark)
    assert got.counts == want.counts and got.hashes == want.hashes
    assert verify_data_dir(load_settings({"data_dir": tmp_path / "restored"}, environ={})).ok


def test_prune_keeps_the_last_verified_backup_and_sweeps_safely(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    data, root = settings.data_dir, root_of(settings.data_dir)
    target = file_target(tmp_path / "target")
    day = 86_400_000
    now = time.time_ns() // 1_000_000
    ids = []
    for age_days in (30, 20, 10):
        con = sqlite3.connect(data / "fhirvault.sqlite3")
        con.execute("INSERT INTO meta (name, value) VALUES (?, ?)", (f"filler-{age_days}", os.urandom(300_000)))
        con.commit()
        con.close()
        ids.append(create_backup(data, target, root, clock=lambda a=age_days: now - a * day).backup_id)
    instance = sqlite3.connect(data / "fhirvault.sqlite3").execute(
        "SELECT value FROM meta WHERE name='instance-id'").fetchone()[0].decode()
    assert verify_backup(target, root, ids[0]).ok  # only the oldest was ever verified
    nothing = RetentionSettings(keep_all_days=0, daily_days=0, monthly_months=0, grace_seconds=0)

    # A backup in progress (lease) holds the sweep back.
    target.put("leases/in-progress", json.dumps({"started_ms": now}).encode())
    res = prune(target, root, instance, nothing, now_ms=now)
    assert set(res.kept) == {ids[0], ids[2]}  # the last verified and the newest
    assert res.deleted_manifests == [ids[1]]
    assert res.deleted_chunks == 0 and res.pending_chunks > 0
    target.delete("leases/in-progress")

    res = prune(target, root, instance, nothing, now_ms=now)
    assert res.deleted_chunks > 0 and res.pending_chunks == 0
    assert [m.backup_id for m in list_backups(target).manifests] == [ids[0], ids[2]]
    for backup_id in (ids[0], ids[2]):
        assert verify_backup(target, root, backup_id).ok
    # With a grace period, a newly unreferenced chunk is only marked the first time.
    assert prune(target, root, instance, RetentionSettings(0, 0, 0, 3600), now_ms=now).deleted_chunks == 0


def test_prune_with_grace_marks_first_and_deletes_later(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    data, root = settings.data_dir, root_of(settings.data_dir)
    target = file_target(tmp_path / "target")
    now = time.time_ns() // 1_000_000
    first = create_backup(data, target, root, clock=lambda: now - 10 * 86_400_000).backup_id
    con = sqlite3.connect(data / "fhirvault.sqlite3")
    con.execute("INSERT INTO meta (name, value) VALUES ('filler', ?)", (os.urandom(200_000),))
    con.commit()
    con.close()
    create_backup(data, target, root, clock=lambda: now, full=True)  # a delta would keep the first one's chunks
    instance = sqlite3.connect(data / "fhirvault.sqlite3").execute(
        "SELECT value FROM meta WHERE name='instance-id'").fetchone()[0].decode()
    policy = RetentionSettings(keep_all_days=1, daily_days=0, monthly_months=0, grace_seconds=3600)
    res = prune(target, root, instance, policy, now_ms=now)
    assert res.deleted_manifests == [first] and res.deleted_chunks == 0 and res.pending_chunks > 0
    res = prune(target, root, instance, policy, now_ms=now + 3_600_000)
    assert res.deleted_chunks > 0 and res.pending_chunks == 0
    assert verify_backup(target, root).ok


def test_restore_refuses_a_non_empty_directory(backed_up: tuple[Path, FileTarget, str], tmp_path: Path) -> None:
    data, target, _ = backed_up
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("x")
    with pytest.raises(RestoreError, match="not empty"):
        restore_backup(target, busy, (data / "root.key").read_bytes())
    assert (busy / "something").read_text() == "x"


_DISK_FULL = """
import resource, signal, sys
from pathlib import Path
from fhirvault.backup.engine import RestoreError, restore_backup
from fhirvault.backup.file_target import FileTarget
key = Path(sys.argv[2]).read_bytes()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # the disk fills after 200 kB per file
try:
    restore_backup(FileTarget(Path(sys.argv[1]), "FR"), Path(sys.argv[3]), key)
except RestoreError as exc:
    print(exc)
    sys.exit(3)
"""


def test_disk_full_on_restore_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    con = sqlite3.connect(settings.database_path)
    con.execute("INSERT INTO meta (name, value) VALUES ('filler', ?)", (os.urandom(600_000),))
    con.commit()
    con.close()
    target = file_target(tmp_path / "target")
    create_backup(settings.data_dir, target, root_of(settings.data_dir))
    out = tmp_path / "restored"
    proc = subprocess.run([sys.executable, "-c", _DISK_FULL, str(tmp_path / "target"),
                           str(settings.root_key_path), str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "disk full while restoring" in proc.stdout
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".restored")]


def test_restore_at_a_point_in_time_picks_the_backup_before_it(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    data, root = settings.data_dir, root_of(settings.data_dir)
    target = file_target(tmp_path / "target")
    first = create_backup(data, target, root)
    time.sleep(0.05)
    between = time.time_ns() // 1_000_000
    time.sleep(0.05)
    create_backup(data, target, root)
    calls: list[tuple[dict[str, dict[str, int]], int | None]] = []

    def replay(target: object, backup_key: bytes, data_dir: Path, watermarks: dict[str, dict[str, int]],
               until_ms: int | None) -> object:
        assert len(backup_key) == 32 and (data_dir / "fhirvault.sqlite3").is_file()
        calls.append((watermarks, until_ms))
        return "replayed"

    res = restore_backup(target, tmp_path / "r", (data / "root.key").read_bytes(), at_ms=between, replay=replay)
    assert res.backup_id == first.backup_id and res.replayed == "replayed"
    assert calls == [(first.watermarks, between)]
    with pytest.raises(BackupError, match="no backup taken before"):
        restore_backup(target, tmp_path / "r2", (data / "root.key").read_bytes(), at_ms=1)


_SLOW_BACKUP = """
import sys, time
from pathlib import Path
from fhirvault.adapters.keyfile import KeyFileProvider
from fhirvault.backup.engine import create_backup
from fhirvault.backup.file_target import FileTarget

class Slow(FileTarget):
    def put(self, key, data, *, retain_until_ms=None):
        if key.startswith("chunks/"):
            sys.stdout.write("uploading" + chr(10))  # one write: uploads run on several threads
            sys.stdout.flush()
            time.sleep(0.3)
        super().put(key, data, retain_until_ms=retain_until_ms)

data = Path(sys.argv[1])
create_backup(data, Slow(Path(sys.argv[2]), "FR"), KeyFileProvider.load(data / "root.key"))
"""


def test_backup_process_killed_midway_leaves_no_listed_backup(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    con = sqlite3.connect(settings.database_path)
    con.execute("INSERT INTO meta (name, value) VALUES ('filler', ?)", (os.urandom(1_500_000),))
    con.commit()
    con.close()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_BACKUP, str(settings.data_dir), str(tmp_path / "target")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("uploading")
    time.sleep(0.5)
    proc.kill()
    proc.wait(timeout=30)
    target = file_target(tmp_path / "target")
    assert list(target.list("chunks/")), "some chunks were uploaded"
    assert list_backups(target).manifests == []  # …but no backup is listed
    assert any(p.name.startswith(".backup-tmp-") for p in settings.data_dir.iterdir())

    res = create_backup(settings.data_dir, target, root_of(settings.data_dir))
    assert [m.backup_id for m in list_backups(target).manifests] == [res.backup_id]
    assert verify_backup(target, root_of(settings.data_dir)).ok
    assert not any(p.name.startswith(".backup-tmp-") for p in settings.data_dir.iterdir())  # stale copy removed


class LockingTarget(FileTarget):
    """Records the object-lock deadline asked for each put (as S3 object lock would enforce it)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, "FR")
        self.locks: dict[str, int | None] = {}

    def put(self, key: str, data: bytes, *, retain_until_ms: int | None = None) -> None:
        self.locks[key] = retain_until_ms
        super().put(key, data, retain_until_ms=retain_until_ms)


def test_object_lock_is_asked_for_and_renewed_on_reused_chunks(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    data, root = settings.data_dir, root_of(settings.data_dir)
    target = LockingTarget(tmp_path / "target")
    day = 86_400_000
    t0 = time.time_ns() // 1_000_000
    first = create_backup(data, target, root, retain_days=10, clock=lambda: t0)
    chunk_locks = {k: v for k, v in target.locks.items() if k.startswith("chunks/")}
    assert chunk_locks and set(chunk_locks.values()) == {t0 + 10 * day}
    assert target.locks[manifest_key(first.backup_id)] == t0 + 10 * day
    target.locks.clear()
    soon = create_backup(data, target, root, retain_days=10, clock=lambda: t0 + 1 * day)
    assert soon.uploaded_chunks <= 1  # locks still long enough: chunks are reused
    target.locks.clear()
    later = create_backup(data, target, root, retain_days=10, clock=lambda: t0 + 6 * day)
    assert later.uploaded_chunks == later.chunks  # locks end within 5 days: stored again, locked anew
    assert {v for k, v in target.locks.items() if k.startswith("chunks/")} == {t0 + 16 * day}
    assert verify_backup(target, root, later.backup_id).ok


def test_a_crashed_backups_lease_does_not_block_the_sweep(tmp_path: Path) -> None:
    # A backup killed mid-upload leaves its lease and orphan chunks; the next prune sweeps them at once
    # (the lease's process is gone), not 24 hours later.
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    target = file_target(tmp_path / "target")
    kept = set(target.list("chunks/")) if create_backup(settings.data_dir, target, root_of(settings.data_dir)) else set()
    con = sqlite3.connect(settings.database_path)
    con.execute("INSERT INTO meta (name, value) VALUES ('filler', ?)", (os.urandom(1_500_000),))
    con.commit()
    con.close()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_BACKUP, str(settings.data_dir), str(tmp_path / "target")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("uploading")
    time.sleep(0.5)
    proc.kill()
    proc.wait(timeout=30)
    orphans = set(target.list("chunks/")) - kept
    assert orphans and list(target.list("leases/"))
    instance = sqlite3.connect(settings.database_path).execute(
        "SELECT value FROM meta WHERE name='instance-id'").fetchone()[0].decode()
    res = prune(target, root_of(settings.data_dir), instance, RetentionSettings(0, 0, 0, grace_seconds=0))
    assert res.deleted_chunks == len(orphans) and set(target.list("chunks/")) == kept


def test_lease_liveness() -> None:
    import socket

    from fhirvault.backup.engine import LEASE_TTL_MS, lease_live

    now = time.time_ns() // 1_000_000
    elsewhere = {"started_ms": now - 3_600_000, "renewed_ms": now - 60_000, "ttl_ms": LEASE_TTL_MS,
                 "host": "another-host", "pid": 1}
    assert lease_live(elsewhere, now)  # renewed a minute ago on another host: running
    assert not lease_live(elsewhere, now + LEASE_TTL_MS)  # no renewal for the TTL: that backup died
    assert lease_live({**elsewhere, "host": socket.gethostname(), "pid": os.getpid()}, now)
    assert lease_live({"started_ms": now - 3_600_000}, now)  # an older release's lease: 24 h as before
    assert not lease_live({"started_ms": now - 25 * 3_600_000}, now)
    assert not lease_live({"started": "x"}, now)


def test_a_long_backup_renews_its_lease(tmp_path: Path) -> None:
    from fhirvault.backup.engine import DEFAULT_RETRY, Lease

    target = file_target(tmp_path / "target")
    lease = Lease(target, "leases/b1", time.time_ns() // 1_000_000, DEFAULT_RETRY, renew_s=0.05)
    lease.start()
    first = json.loads(target.get("leases/b1"))["renewed_ms"]
    time.sleep(0.3)
    assert json.loads(target.get("leases/b1"))["renewed_ms"] > first
    lease.end()
    assert list(target.list("leases/")) == []
