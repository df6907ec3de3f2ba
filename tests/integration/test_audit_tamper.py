"""Tampering with the audit log, each way the issue lists, is caught by ``fhirvault audit verify``."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fhirvault.bootstrap import initialise
from fhirvault.config import Settings, load_settings
from fhirvault.container import build
from fhirvault.services.audit import AuditRecord
from fhirvault.services.audit_verify import VerifyReport, verify_data_dir

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
