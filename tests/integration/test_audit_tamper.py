"""Tampering with the audit log, each way the issue lists, is caught by ``fhirvault audit verify``; the server's
start-up pass catches what follows the last witnessed checkpoint, its background full pass the rest."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fhirvault.adapters.witness import open_witness
from fhirvault.bootstrap import initialise
from fhirvault.config import Settings, load_settings
from fhirvault.container import build
from fhirvault.services.audit import AuditRecord
from fhirvault.services.audit_monitor import VERIFIED_META, AuditMonitor
from fhirvault.services.audit_verify import VerifyReport, verify_data_dir, verify_recent
from tests.conftest import start_server

ENTRIES_PER_ROUND = 40


def _record(i: int) -> AuditRecord:
    return AuditRecord(1_700_000_000_000 + i, "read", "0", 200, f"req-{i}", client_id="c1",
                       source_ip="10.0.0.1", entity=f"Observation/o{i}/_history/1", patient=f"Patient/p{i % 7}")


def _fill(settings: Settings, start: int, count: int, *, witness: bool = True) -> None:
    c = build(settings)
    try:
        for i in range(start, start + count):
            c.store.write_sync("audit", lambda tx, i=i: c.audit.record(tx, _record(i)))
            if i % 10 == 9 and i != start + count - 1:
                c.checkpointer.step(force=True, witness=False)
        c.checkpointer.step(force=True, witness=witness)
    finally:
        c.close()


@pytest.fixture
def logged(tmp_path: Path) -> Iterator[Settings]:
    """A data dir with 3 rounds of entries, signed checkpoints every 10, witnessed after each round."""
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    for r in range(3):
        _fill(settings, r * ENTRIES_PER_ROUND, ENTRIES_PER_ROUND)
    yield settings


def _sql(settings: Settings, *statements: str) -> None:
    """What a DBA with file access can do: drop the guards and edit rows."""
    conn = sqlite3.connect(settings.database_path)  # the audit tables are in the main file
    for table in ("audit_log", "audit_checkpoints"):
        for op in ("update", "delete"):
            conn.execute(f"DROP TRIGGER IF EXISTS {table}_no_{op}")
    for st in statements:
        conn.execute(st)
    conn.commit()
    conn.close()


def _verify(settings: Settings) -> VerifyReport:
    return verify_data_dir(settings)


def test_an_untouched_log_verifies(logged: Settings) -> None:
    report = _verify(logged)
    assert report.ok, report.problems
    assert report.entries == 3 * ENTRIES_PER_ROUND
    assert report.checkpoints >= 12 and report.witnessed == 3


def test_edited_entry_is_named(logged: Settings) -> None:
    conn = sqlite3.connect(logged.database_path)
    (blob,) = conn.execute("SELECT blob FROM audit_log WHERE seq = 57").fetchone()
    conn.close()
    flipped = blob[:20] + bytes([blob[20] ^ 1]) + blob[21:]
    _sql(logged, f"UPDATE audit_log SET blob = x'{flipped.hex()}' WHERE seq = 57")
    report = _verify(logged)
    assert not report.ok and report.first_bad_seq == 57
    assert "entry 57 does not authenticate" in report.problems[0]
    assert any("checkpoint at size 60 does not match" in p for p in report.problems)


def test_deleted_entry_in_the_middle(logged: Settings) -> None:
    _sql(logged, "DELETE FROM audit_log WHERE seq = 33")
    report = _verify(logged)
    assert report.first_bad_seq == 33 and "entries 33..33 are missing" in report.problems[0]


def test_deleted_and_renumbered_entries(logged: Settings) -> None:
    _sql(logged, "DELETE FROM audit_log WHERE seq = 33", "UPDATE audit_log SET seq = seq - 1 WHERE seq > 33")
    report = _verify(logged)
    assert report.first_bad_seq == 33
    assert "entry 33 holds entry 34's sealed record" in report.problems[0]


def test_reordered_entries(logged: Settings) -> None:
    _sql(logged, "UPDATE audit_log SET seq = -1 WHERE seq = 20", "UPDATE audit_log SET seq = 20 WHERE seq = 21",
         "UPDATE audit_log SET seq = 21 WHERE seq = -1")
    report = _verify(logged)
    assert report.first_bad_seq == 20 and "entry 20 holds entry 21's" in report.problems[0]


def test_forged_entry_appended(logged: Settings) -> None:
    n = 3 * ENTRIES_PER_ROUND
    _sql(logged, f"INSERT INTO audit_log (seq, tenant, ts_ms, tags, blob) "
                 f"VALUES ({n + 1}, 'default', 1, x'', randomblob(300))")
    report = _verify(logged)
    assert report.first_bad_seq == n + 1 and f"entry {n + 1} does not authenticate" in report.problems[0]


def test_truncation_is_caught_by_the_signed_checkpoints(logged: Settings) -> None:
    _sql(logged, "DELETE FROM audit_log WHERE seq > 100")
    report = _verify(logged)
    assert any(p.startswith("log truncated") for p in report.problems)
    assert report.first_bad_seq == 101


def test_shorter_consistent_log_is_caught_by_the_witness(logged: Settings) -> None:
    # Truncate the entries *and* every checkpoint beyond: internally consistent, but the witness remembers.
    _sql(logged, "DELETE FROM audit_log WHERE seq > 80", "DELETE FROM audit_checkpoints WHERE size > 80",
         "DELETE FROM audit_nodes")
    report = _verify(logged)
    assert [p for p in report.problems if "truncated or rolled back" in p and "witness" in p]


def test_rollback_to_an_older_copy_is_caught_by_the_witness(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    _fill(settings, 0, 30)
    saved = tmp_path / "old-audit"
    saved.mkdir()
    assert not list(settings.data_dir.glob("audit.sqlite3*"))  # one file holds the audit log
    for f in settings.data_dir.glob("fhirvault.sqlite3*"):
        shutil.copy2(f, saved / f.name)
    _fill(settings, 30, 30)
    assert _verify(settings).ok
    for f in settings.data_dir.glob("fhirvault.sqlite3*"):
        f.unlink()
    for f in saved.iterdir():
        shutil.copy2(f, settings.data_dir / f.name)
    report = _verify(settings)
    assert any("truncated or rolled back" in p for p in report.problems)


def test_entry_rewritten_as_text_does_not_crash_the_verifier(logged: Settings) -> None:
    _sql(logged, "UPDATE audit_log SET blob = 'plain text', ts_ms = 'x' WHERE seq = 3")
    report = _verify(logged)
    assert report.first_bad_seq == 3


def test_entry_moved_to_another_tenant_is_located_between_checkpoints(logged: Settings) -> None:
    # Entries of other tenants cannot be decrypted here: the signed tree still places the change.
    _sql(logged, "UPDATE audit_log SET tenant = 'other' WHERE seq = 15")
    report = _verify(logged)
    assert any("an entry in 11..20 was changed" in p for p in report.problems)


def test_forged_checkpoint_signature(logged: Settings) -> None:
    _sql(logged, "UPDATE audit_checkpoints SET signature = randomblob(64) WHERE size = 40")
    report = _verify(logged)
    assert any("checkpoint at size 40: signature invalid" in p for p in report.problems)


def test_cli_exit_status_and_message(logged: Settings) -> None:
    cmd = [sys.executable, "-m", "fhirvault.cli.main", "audit", "verify", "--data-dir", str(logged.data_dir)]
    ok = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "audit log OK" in ok.stdout
    _sql(logged, "DELETE FROM audit_log WHERE seq = 5")
    bad = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "entries 5..5 are missing" in bad.stdout


# -- the start-up pass (readiness) and the full pass after it -------------------------------------------------
def _recent(settings: Settings) -> VerifyReport:
    c = build(settings)
    try:
        held = [(spec, open_witness(spec).read() or []) for spec in settings.audit_witness_specs]
        return verify_recent(c.store, c.audit, c.audit_signer, held)
    finally:
        c.close()


def _set_blob(settings: Settings, seq: int) -> None:
    conn = sqlite3.connect(settings.database_path)
    (blob,) = conn.execute("SELECT blob FROM audit_log WHERE seq = ?", (seq,)).fetchone()
    conn.close()
    _sql(settings, f"UPDATE audit_log SET blob = x'{bytes(blob[:-1]).hex()}{(blob[-1] ^ 1):02x}' WHERE seq = {seq}")


@pytest.fixture
def long_logged(tmp_path: Path) -> Iterator[Settings]:
    """300 entries, witnessed at the end: the first 256 are a stored subtree the start-up pass does not reread."""
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    _fill(settings, 0, 300)
    yield settings


def test_start_up_pass_reads_only_what_follows_the_last_witnessed_checkpoint(logged: Settings) -> None:
    _fill(logged, 3 * ENTRIES_PER_ROUND, 25, witness=False)  # signed, not yet witnessed (a crash before it)
    report = _recent(logged)
    assert report.ok, report.problems
    assert (report.since, report.entries, report.tree_size) == (3 * ENTRIES_PER_ROUND, 25, 3 * ENTRIES_PER_ROUND + 25)
    assert report.checkpoints == 4 and report.witnessed == 3


def test_start_up_pass_finds_a_recent_entry_changed(logged: Settings) -> None:
    _fill(logged, 3 * ENTRIES_PER_ROUND, 25, witness=False)
    _set_blob(logged, 3 * ENTRIES_PER_ROUND + 10)
    report = _recent(logged)
    assert report.first_bad_seq == 3 * ENTRIES_PER_ROUND + 10
    assert f"entry {3 * ENTRIES_PER_ROUND + 10} does not authenticate" in report.problems[0]


def test_start_up_pass_finds_a_rollback_to_an_older_copy(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    _fill(settings, 0, 30)
    saved = {f.name: f.read_bytes() for f in settings.data_dir.glob("fhirvault.sqlite3*")}
    _fill(settings, 30, 30)
    for f in settings.data_dir.glob("fhirvault.sqlite3*"):
        f.unlink()
    for name, raw in saved.items():
        (settings.data_dir / name).write_bytes(raw)
    report = _recent(settings)
    assert any("truncated or rolled back" in p for p in report.problems), report.problems


def test_start_up_pass_names_an_entry_changed_within_its_last_partial_subtree(logged: Settings) -> None:
    # Fewer than 256 entries: no stored subtree, the start-up pass rehashes them and the full pass names it.
    _set_blob(logged, 7)
    report = _recent(logged)
    assert report.first_bad_seq == 7 and report.since == 0


def test_an_old_entry_changed_is_found_by_the_full_pass_after_readiness(long_logged: Settings) -> None:
    _set_blob(long_logged, 5)  # inside the stored subtree of entries 1..256, before the witnessed checkpoint
    assert _recent(long_logged).ok  # what readiness waits for does not reread it...
    c = build(long_logged)
    monitor = AuditMonitor(c)
    reports: list[VerifyReport] = []
    failures: list[VerifyReport] = []
    ready: list[bool | None] = []
    monitor.on_report.append(lambda r: (reports.append(r), ready.append(c.health.audit_verified)))
    monitor.on_failure.append(failures.append)
    try:
        monitor.start()
        deadline = time.monotonic() + 30
        while len(reports) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        monitor.stop()
        c.close()
    # ...the server was ready (start-up pass), then the full pass in the background alerted and took it out.
    assert [r.ok for r in reports] == [True, False] and ready == [True, False]
    assert reports[0].since == 300 and reports[1].since == 0
    assert failures == [reports[1]] and failures[0].first_bad_seq == 5
    assert c.health.audit_verified is False


def test_a_clean_full_pass_records_where_the_next_start_up_pass_may_begin(logged: Settings) -> None:
    c = build(logged)
    try:
        monitor = AuditMonitor(c)
        assert monitor.verify_now().ok
        assert c.store.get_meta(VERIFIED_META) == str(3 * ENTRIES_PER_ROUND).encode()
    finally:
        c.close()
    _fill(logged, 3 * ENTRIES_PER_ROUND, 5, witness=False)
    assert _recent(logged).since == 3 * ENTRIES_PER_ROUND


def _server_alerts(data: Path, timeout: float) -> str:
    path = data / "alerts.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and "audit_verification" in path.read_text():
            return path.read_text()
        time.sleep(0.05)
    return ""


def _audit_log_lines(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()
            if line.startswith("{") and '"fhirvault.audit"' in line]


@pytest.mark.sqlite_only  # edits the SQLite audit table
@pytest.mark.server
def test_server_with_an_old_entry_changed_gets_ready_then_alerts(long_logged: Settings, tmp_path: Path) -> None:
    _set_blob(long_logged, 5)
    srv = start_server(long_logged.data_dir, tmp_path / "server.log")
    try:
        alerts = _server_alerts(long_logged.data_dir, timeout=30)
        assert "entry 5 does not authenticate" in alerts
        assert httpx.get(srv.base_url + "/readyz").status_code == 503  # and out of the load balancer again
    finally:
        srv.stop()
    lines = [(ln["msg"], ln.get("since")) for ln in _audit_log_lines(tmp_path / "server.log")]
    # ready after the start-up pass (nothing after the shutdown's witnessed checkpoint), then the full pass
    assert lines[:2] == [("audit log verified since a checkpoint", 300), ("audit log verification FAILED", None)]


@pytest.mark.sqlite_only
@pytest.mark.server
def test_server_with_a_recent_entry_changed_never_gets_ready(logged: Settings, tmp_path: Path) -> None:
    _fill(logged, 3 * ENTRIES_PER_ROUND, 25, witness=False)  # after the last witnessed checkpoint
    _set_blob(logged, 3 * ENTRIES_PER_ROUND + 3)
    srv = start_server(logged.data_dir, tmp_path / "server.log")
    try:
        alerts = _server_alerts(logged.data_dir, timeout=30)
        assert f"entry {3 * ENTRIES_PER_ROUND + 3} does not authenticate" in alerts
        assert httpx.get(srv.base_url + "/readyz").json()["checks"]["audit"] == "failed"
    finally:
        srv.stop()
    assert [ln["msg"] for ln in _audit_log_lines(tmp_path / "server.log")][:1] == ["audit log verification FAILED"]
