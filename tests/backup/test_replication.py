"""Continuous replication: a real server writes, the replicator ships, replay restores (exactly, or to an instant)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import statistics
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhirvault.backup.changefeed import DATABASES, MAIN_DB, Block, Segment, decode_rows, encode_rows
from fhirvault.backup.file_target import FileTarget
from fhirvault.backup.replication import (
    ReplayReport,
    Replicator,
    list_generations,
    load_segment,
    replay,
    retag,
)
from fhirvault.backup.target import TargetUnavailable
from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.keyrotation import rotate_tenant_key
from tests.conftest import PATIENT, Server, observation, start_server

FHIR_JSON = {"Content-Type": "application/fhir+json"}
Expected = dict[tuple[str, str], int | None]  # (type, id) -> current version, None when deleted


class TestTarget:
    """FileTarget that can be switched off (an outage) and records when each object landed."""

    __test__ = False

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.inner = FileTarget(root, "FR")
        self.down = False
        self.landed: dict[str, float] = {}

    @property
    def url(self) -> str:
        return self.inner.url

    @property
    def location(self) -> str:
        return self.inner.location

    def put(self, key: str, data: bytes, *, retain_until_ms: int | None = None) -> None:
        if self.down:
            raise TargetUnavailable("test target is down")
        self.inner.put(key, data, retain_until_ms=retain_until_ms)
        self.landed[key] = time.time()

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def ms(instant: str) -> int:
    return int(datetime.fromisoformat(instant).timestamp() * 1000)


def write(c: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[str, int, int]:
    """One write; returns (id, version, lastUpdated ms) as acknowledged."""
    r = c.request(method, path, json=body, headers=FHIR_JSON)
    # every PUT here updates an existing resource
    assert r.status_code == (201 if method == "POST" else 200), (method, path, r.status_code, r.text)
    res = r.json()
    return res["id"], int(res["meta"]["versionId"]), ms(res["meta"]["lastUpdated"])


def delete(c: httpx.Client, rtype: str, rid: str) -> None:
    assert c.delete(f"/{rtype}/{rid}").status_code == 204


def max_seq(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / MAIN_DB) as conn:
        return int(conn.execute("SELECT coalesce(max(seq), 0) FROM resource_versions").fetchone()[0])


def caught_up(rep: Replicator, data_dir: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    target = max_seq(data_dir)
    while time.monotonic() < deadline:
        if rep.watermarks.get(MAIN_DB, {}).get("resource_versions", 0) >= target and rep.lag_seconds() == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"replicator did not catch up (lag {rep.lag_seconds():.1f}s)")


def base_snapshot(src: Path, dst: Path) -> dict[str, dict[str, int]]:
    """What a full backup restores: a consistent copy of each file, the root key; and its watermarks."""
    dst.mkdir(parents=True)
    marks: dict[str, dict[str, int]] = {}
    for db in DATABASES:
        if not (src / db).exists():
            continue
        with sqlite3.connect(src / db) as s, sqlite3.connect(dst / db) as d:
            s.backup(d)
            table = "resource_versions" if db == MAIN_DB else "audit_log"
            marks[db] = {table: int(d.execute(f"SELECT coalesce(max(seq), 0) FROM {table}").fetchone()[0])}
    for name in ("root.key", "admin-client.json"):
        shutil.copy2(src / name, dst / name)
    return marks


def restore(base: Path, dst: Path, target: TestTarget, key: bytes,
            marks: dict[str, dict[str, int]], until_ms: int | None = None) -> ReplayReport:
    shutil.copytree(base, dst)
    return replay(target, key, dst, marks, until_ms)


def ready(srv: Server, timeout: float = 30.0) -> dict[str, Any]:
    """/readyz of a restored server: writable, keys loaded, and its audit log verifies."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(srv.base_url + "/readyz", timeout=10)
        body: dict[str, Any] = r.json()
        if r.status_code == 200 or body.get("checks", {}).get("audit") != "pending" or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def check_state(srv: Server, expected: Expected) -> None:
    assert ready(srv)["status"] != "unavailable", ready(srv)
    with srv.client() as c:
        for (rtype, rid), version in expected.items():
            r = c.get(f"/{rtype}/{rid}")
            if version is None:
                assert r.status_code == 410, (rtype, rid, r.status_code)
            else:
                assert r.status_code == 200, (rtype, rid, r.status_code)
                assert r.json()["meta"]["versionId"] == str(version), (rtype, rid)


def counts(srv: Server, queries: list[str]) -> dict[str, int]:
    """Entries found for each search (every page), so stale or missing tags would show."""
    out = {}
    with srv.client() as c:
        for q in queries:
            url: str | None = q
            found = 0
            while url:
                bundle = c.get(url).json()
                found += len(bundle.get("entry", []))
                url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
            out[q] = found
    return out


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


def test_segment_codec_round_trips_every_sqlite_type() -> None:
    rows = [(1, "Patient", b"\x00\xff", None, 2.5, -(2**63)), (2, "é", b"", None, 0.0, 2**63 - 1)]
    assert decode_rows(encode_rows(rows), 6) == rows
    seg = Segment({"index": 3, "before": {}, "after": {}}, [Block("a.db", "t", "append", list("abcdef"), rows)])
    back = Segment.decode(seg.encode())
    assert back.header["index"] == 3 and back.blocks[0].rows == rows
    with pytest.raises(ValueError):
        decode_rows(encode_rows(rows)[:-3], 6)


@pytest.mark.slow
@pytest.mark.server
def test_replicated_writes_restore_exactly_and_to_a_point_in_time(tmp_path: Path, key: bytes) -> None:
    srv = start_server(tmp_path / "data", tmp_path / "server.log")
    target = TestTarget(tmp_path / "target")
    rep = Replicator(srv.data_dir, target, key, interval_s=0.2)
    expected: Expected = {}
    try:
        with srv.client() as c:
            patients = [write(c, "POST", "/Patient", dict(PATIENT, name=[{"family": f"Base{i}"}]))[0]
                        for i in range(12)]
            for pid in patients:
                expected[("Patient", pid)] = 1
                oid = write(c, "POST", "/Observation", observation(pid))[0]
                expected[("Observation", oid)] = 1
            rep.start()
            caught_up(rep, srv.data_dir)
            marks = base_snapshot(srv.data_dir, tmp_path / "base")  # taken while replication runs

            # After the base: creates, updates (new names), deletes.
            for i in range(10):
                pid, v, _ = write(c, "POST", "/Patient", dict(PATIENT, name=[{"family": f"New{i}"}]))
                expected[("Patient", pid)] = v
                patients.append(pid)
            for i, pid in enumerate(patients[:6]):
                _, v, _ = write(c, "PUT", f"/Patient/{pid}", dict(PATIENT, id=pid, name=[{"family": f"Moved{i}"}]))
                expected[("Patient", pid)] = v
            for pid in patients[6:9]:
                delete(c, "Patient", pid)
                expected[("Patient", pid)] = None
            # The instant to restore to: the state right after this write, nothing of what follows.
            twice = patients[10]
            _, v, t_mid = write(c, "PUT", f"/Patient/{twice}", dict(PATIENT, id=twice, name=[{"family": "Between"}]))
            expected[("Patient", twice)] = v
            at_mid = dict(expected)
            time.sleep(0.02)  # the next write gets a later millisecond
            _, v, t_after = write(c, "PUT", f"/Patient/{twice}", dict(PATIENT, id=twice, name=[{"family": "Last"}]))
            assert t_after > t_mid
            expected[("Patient", twice)] = v
            late = write(c, "POST", "/Patient", dict(PATIENT, name=[{"family": "Late"}]))[0]
            expected[("Patient", late)] = 1
            delete(c, "Patient", patients[0])
            expected[("Patient", patients[0])] = None
        caught_up(rep, srv.data_dir)
        queries = ["/Patient?_count=7", "/Observation?_count=50", "/Patient?family=Moved", "/Patient?family=New",
                   "/Patient?family:exact=Last", "/Patient?family:exact=Between", "/Patient?family=Base",
                   "/Observation?code=http://loinc.org|8867-4"]
        source_counts = counts(srv, queries)
    finally:
        rep.stop()
        srv.stop()
    assert rep.stats.segments >= 2 and rep.stats.failures == 0

    # Full replay: everything acknowledged is back, at its version; deletes are gone; searches agree.
    report = restore(tmp_path / "base", tmp_path / "full", target, key, marks)
    assert report.gap is None and not report.reached_until and report.segments_applied >= 1
    assert report.watermarks[MAIN_DB]["resource_versions"] == max_seq(srv.data_dir)
    assert report.last_commit_ms is not None and report.last_commit_ms >= t_after
    restored = start_server(tmp_path / "full", tmp_path / "full.log")
    try:
        check_state(restored, expected)
        assert counts(restored, queries) == source_counts
    finally:
        restored.stop()

    # Point in time: exactly the state at t_mid (the write at t_mid is in, the ones after are not).
    report = restore(tmp_path / "base", tmp_path / "pitr", target, key, marks, until_ms=t_mid)
    assert report.reached_until and report.last_commit_ms == t_mid
    restored = start_server(tmp_path / "pitr", tmp_path / "pitr.log")
    try:
        check_state(restored, at_mid)
        with restored.client() as c:
            assert c.get(f"/Patient/{patients[0]}").json()["meta"]["versionId"] == "2"  # not yet deleted
            assert c.get(f"/Patient/{late}").status_code == 404
            assert c.get(f"/Patient/{twice}/_history/{at_mid[('Patient', twice)]}").status_code == 200
            assert c.get(f"/Patient/{twice}/_history/{expected[('Patient', twice)]}").status_code == 404
        found = counts(restored, ["/Patient?family:exact=Between", "/Patient?family:exact=Last"])
        if not report.approximate_tags:  # the two updates were shipped in different segments
            assert found == {"/Patient?family:exact=Between": 1, "/Patient?family:exact=Last": 0}
    finally:
        restored.stop()
    if report.approximate_tags:  # one segment held both: its tag list is a superset until retagged
        settings = load_settings({"data_dir": tmp_path / "pitr"}, environ={})
        container = build(settings)
        try:
            assert retag(container.store, container.keys, report.approximate_tags) == len(report.approximate_tags)
        finally:
            container.store.close()
        restored = start_server(tmp_path / "pitr", tmp_path / "pitr.log")
        try:
            found = counts(restored, ["/Patient?family:exact=Between", "/Patient?family:exact=Last",
                                      "/Patient?family=Moved"])
            # all six renamed before t_mid (the deletion of one of them came after)
            assert found == {"/Patient?family:exact=Between": 1, "/Patient?family:exact=Last": 0,
                             "/Patient?family=Moved": 6}
        finally:
            restored.stop()


@pytest.mark.slow
@pytest.mark.server
def test_outage_and_restart_lose_and_duplicate_nothing(tmp_path: Path, key: bytes) -> None:
    srv = start_server(tmp_path / "data", tmp_path / "server.log")
    target = TestTarget(tmp_path / "target")
    marks = base_snapshot(srv.data_dir, tmp_path / "base")  # the empty (initialised) database
    rep = Replicator(srv.data_dir, target, key, interval_s=0.1, max_rows=3)  # small segments: the backlog spans several
    expected: Expected = {}
    try:
        rep.start()
        with srv.client() as c:
            for i in range(5):
                expected[("Patient", write(c, "POST", "/Patient", dict(PATIENT, name=[{"family": f"A{i}"}]))[0])] = 1
            caught_up(rep, srv.data_dir)
            target.down = True
            for i in range(5):
                expected[("Patient", write(c, "POST", "/Patient", dict(PATIENT, name=[{"family": f"B{i}"}]))[0])] = 1
            renamed = next(iter(expected))[1]
            for family in ("Renamed1", "Renamed2", "Renamed3"):  # versions that land in different segments
                _, v, _ = write(c, "PUT", f"/Patient/{renamed}", dict(PATIENT, id=renamed, name=[{"family": family}]))
                expected[("Patient", renamed)] = v
            time.sleep(2.0)
            assert rep.lag_seconds() >= 1.5  # reported while the target is away
            assert rep.stats.failures >= 1 and rep.stats.last_error == "TargetUnavailable"
            target.down = False
            caught_up(rep, srv.data_dir)
            assert rep.lag_seconds() == 0
            generation = rep.generation
            rep.stop()

            for i in range(5):  # written while no replicator runs
                expected[("Patient", write(c, "POST", "/Patient", dict(PATIENT, name=[{"family": f"C{i}"}]))[0])] = 1
            rep = Replicator(srv.data_dir, target, key, interval_s=0.1, max_rows=3)  # small segments: the backlog spans several
            rep.start()
            for i in range(5):
                expected[("Patient", write(c, "POST", "/Patient", dict(PATIENT, name=[{"family": f"D{i}"}]))[0])] = 1
            caught_up(rep, srv.data_dir)
            assert rep.generation == generation  # resumed, not restarted
    finally:
        rep.stop()
        srv.stop()

    # The feed is contiguous: each segment starts where the previous one ended, no row twice.
    assert generation is not None
    keys = list_generations(target)[generation]
    shipped: list[int] = []
    previous = None
    for name in keys:
        seg = load_segment(target, name, key)
        if previous is not None:
            assert seg.header["before"] == previous, name
        previous = seg.header["after"]
        block = seg.block(MAIN_DB, "resource_versions")
        assert block is not None
        shipped += [r[block.columns.index("seq")] for r in block.rows]
    assert shipped == list(range(1, max_seq(srv.data_dir) + 1))

    report = restore(tmp_path / "base", tmp_path / "restored", target, key, marks)
    assert report.gap is None and report.rows[f"{MAIN_DB}/resource_versions"] == len(expected) + 3
    restored = start_server(tmp_path / "restored", tmp_path / "restored.log")
    try:
        check_state(restored, expected)
        assert counts(restored, ["/Patient?family=Renamed", "/Patient?family:exact=Renamed3", "/Patient?family=A"]) \
            == {"/Patient?family=Renamed": 1, "/Patient?family:exact=Renamed3": 1, "/Patient?family=A": 4}
    finally:
        restored.stop()

    # A lost segment is a hole: replay applies what precedes it, reports it, and applies nothing after.
    hole = next(i for i, name in enumerate(keys) if i > 0 and load_segment(target, name, key).block(
        MAIN_DB, "resource_versions").rows)  # type: ignore[union-attr]
    target.delete(keys[hole])
    report = restore(tmp_path / "base", tmp_path / "holed", target, key, marks)
    assert report.gap is not None and report.segments_applied + report.segments_skipped == hole
    assert report.watermarks[MAIN_DB]["resource_versions"] < max_seq(srv.data_dir)


@pytest.mark.server
def test_replay_refuses_a_base_from_another_history(tmp_path: Path, key: bytes) -> None:
    """A generation shipped from one database is not replayed onto another one's snapshot."""
    one = start_server(tmp_path / "one", tmp_path / "one.log")
    other = start_server(tmp_path / "other", tmp_path / "other.log")
    target = TestTarget(tmp_path / "target")
    rep = Replicator(one.data_dir, target, key, interval_s=0.1)
    try:
        rep.start()
        for srv, n in ((one, 6), (other, 3)):
            with srv.client() as c:
                for i in range(n):
                    write(c, "POST", "/Patient", dict(PATIENT, name=[{"family": f"H{i}"}]))
        caught_up(rep, one.data_dir)
        marks = base_snapshot(other.data_dir, tmp_path / "base")
    finally:
        rep.stop()
        one.stop()
        other.stop()
    report = restore(tmp_path / "base", tmp_path / "restored", target, key, marks)
    assert report.generation is None and report.segments_applied == 0
    with sqlite3.connect(tmp_path / "restored" / MAIN_DB) as conn:
        assert conn.execute("SELECT count(*) FROM resource_versions").fetchone()[0] == 3


@pytest.mark.slow
@pytest.mark.server
def test_lag_and_cost_under_a_steady_write_load(tmp_path: Path, key: bytes) -> None:
    """Time from a 201 to the segment holding it being on the target, at the default 1 s cadence."""
    srv = start_server(tmp_path / "data", tmp_path / "server.log")
    target = TestTarget(tmp_path / "target")
    rep = Replicator(srv.data_dir, target, key)  # interval_s=1.0, as deployed
    acked: dict[str, float] = {}
    try:
        rep.start()
        with srv.client() as c:
            started = time.monotonic()
            while time.monotonic() - started < 8:  # ~25 creates/s
                pid = write(c, "POST", "/Patient", dict(PATIENT, name=[{"family": "Lag"}]))[0]
                acked[pid] = time.time()
                time.sleep(0.04)
        caught_up(rep, srv.data_dir)
    finally:
        rep.stop()
        srv.stop()
    landed: dict[str, float] = {}
    for name in list_generations(target)[rep.generation or ""]:
        block = load_segment(target, name, key).block(MAIN_DB, "resource_versions")
        assert block is not None
        for row in block.rows:
            landed.setdefault(row[block.columns.index("id")], target.landed[name])
    lags = sorted(max(0.0, landed[pid] - t) for pid, t in acked.items())
    p50, p95 = statistics.median(lags), lags[int(len(lags) * 0.95) - 1]
    per_create = rep.stats.bytes_shipped / len(acked)
    cpu_ms = rep.stats.cycle_cpu_s * 1000 / max(1, rep.stats.cycles)
    print(f"\nreplication: {len(acked)} creates, lag p50 {p50 * 1000:.0f} ms p95 {p95 * 1000:.0f} ms, "
          f"{per_create:.0f} B shipped/create ({rep.stats.raw_bytes / len(acked):.0f} B raw), "
          f"{rep.stats.segments} segments, {cpu_ms:.1f} ms CPU/cycle over {rep.stats.cycles} cycles")
    assert set(landed) >= set(acked)
    assert p95 < 2.5  # one 1 s cadence plus a cycle, with margin for a shared CI machine


def _table(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.server
def test_key_rotation_after_the_base_is_replayed(tmp_path: Path, key: bytes) -> None:
    """Small tables follow: a tenant key rotation (no resource written with it) reaches the restore."""
    srv = start_server(tmp_path / "data", tmp_path / "server.log")
    target = TestTarget(tmp_path / "target")
    rep = Replicator(srv.data_dir, target, key, interval_s=0.1)
    expected: Expected = {}
    try:
        with srv.client() as c:
            for i in range(3):
                expected[("Patient", write(c, "POST", "/Patient", dict(PATIENT, name=[{"family": f"K{i}"}]))[0])] = 1
            rep.start()
            caught_up(rep, srv.data_dir)
            marks = base_snapshot(srv.data_dir, tmp_path / "base")
            assert rotate_tenant_key(load_settings({"data_dir": srv.data_dir}, environ={})) == 2
            time.sleep(0.5)  # shipped on its own: a segment that moves no watermark
            for i in range(2):
                expected[("Patient", write(c, "POST", "/Patient", dict(PATIENT, name=[{"family": f"R{i}"}]))[0])] = 1
        caught_up(rep, srv.data_dir)
    finally:
        rep.stop()
        srv.stop()
    report = restore(tmp_path / "base", tmp_path / "restored", target, key, marks)
    assert report.gap is None
    for sql in ("SELECT * FROM data_keys ORDER BY key_id", "SELECT * FROM tenant_keys ORDER BY tenant, version",
                "SELECT * FROM meta ORDER BY name"):
        assert _table(tmp_path / "restored" / MAIN_DB, sql) == _table(srv.data_dir / MAIN_DB, sql), sql
    base_keys = {r[0] for r in _table(tmp_path / "base" / MAIN_DB, "SELECT key_id FROM data_keys")}
    rewrapped = dict(_table(tmp_path / "restored" / MAIN_DB, "SELECT key_id, kek_version FROM data_keys"))
    assert base_keys and all(rewrapped[k] == 2 for k in base_keys)  # the rotation, not the base's wrapping
    restored = start_server(tmp_path / "restored", tmp_path / "restored.log")
    try:
        check_state(restored, expected)
    finally:
        restored.stop()


def _shipped_versions(target: FileTarget, key: bytes) -> int:
    from fhirvault.backup.replication import list_generations, load_segment

    rows = 0
    for keys in list_generations(target).values():
        for name in keys:
            block = load_segment(target, name, key).block(MAIN_DB, "resource_versions")
            rows += len(block.rows) if block is not None else 0
    return rows


@pytest.mark.slow
@pytest.mark.server
def test_replication_after_a_restore_ships_only_newer_changes(tmp_path: Path) -> None:
    from fhirvault.adapters.keyfile import KeyFileProvider
    from fhirvault.backup.engine import create_backup, restore_backup
    from fhirvault.backup.manifest import BackupKeys
    from fhirvault.services.secrets import ServiceSecrets

    srv = start_server(tmp_path / "data", tmp_path / "server.log")
    with srv.client() as c:
        for _ in range(40):
            write(c, "POST", "Patient", PATIENT)
    srv.stop()
    backups = FileTarget(tmp_path / "backups", "FR")
    create_backup(srv.data_dir, backups, KeyFileProvider.load(srv.data_dir / "root.key"))
    restored = tmp_path / "restored"
    restore_backup(backups, restored, (srv.data_dir / "root.key").read_bytes())
    shutil.copy(srv.data_dir / "admin-client.json", restored)

    srv = start_server(restored, tmp_path / "restored.log")
    container = build(load_settings({"data_dir": restored}, environ={}))
    try:
        secrets = ServiceSecrets(container.store, container.root)
        seal_key = BackupKeys(secrets.get("backup"), secrets.get("backup-signing")).seal_key
    finally:
        container.close()
    (tmp_path / "wal").mkdir()
    wal = FileTarget(tmp_path / "wal", "FR")
    rep = Replicator(restored, wal, seal_key, interval_s=0.1)
    while rep.run_once():
        pass
    assert _shipped_versions(wal, seal_key) == 0  # the 40 restored versions are in the backup already
    with srv.client() as c:
        write(c, "POST", "Patient", PATIENT)
    while rep.run_once():
        pass
    assert _shipped_versions(wal, seal_key) == 1
    rep.stop()
    srv.stop()
