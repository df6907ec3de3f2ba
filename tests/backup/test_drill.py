"""``fhirvault dr drill`` end to end: restore, serve, compare, audit, RPO/RTO report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.backup.conftest import MARKER, seed
from tests.backup.test_recovery_e2e import fv
from tests.conftest import start_server


@pytest.mark.slow
@pytest.mark.server
def test_drill_restores_serves_compares_and_reports(tmp_path: Path) -> None:
    data, target, reports = tmp_path / "data", (tmp_path / "target").as_uri(), tmp_path / "reports"
    srv = start_server(data, tmp_path / "server.log")
    try:
        seed(srv, 60, 3)
        r = fv("backup", "create", "--data-dir", str(data), "--target", target, "--location", "FR")
        assert r.returncode == 0, r.stderr
        seed(srv, 4, 0)  # written after the backup: the achieved RPO is not zero
        r = fv("dr", "drill", "--data-dir", str(data), "--target", target, "--location", "FR",
               "--report-dir", str(reports))
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        srv.stop()
    assert "PASSED" in r.stdout
    [json_path] = list(reports.glob("dr-drill-*.json"))
    [text_path] = list(reports.glob("dr-drill-*.txt"))
    report = json.loads(json_path.read_text())
    assert report["ok"] is True and report["problems"] == []
    assert report["counts"]["Observation"] == 180
    assert report["counts"]["Patient"] >= 60  # + any the replication feed shipped after the backup
    assert report["served_counts_match"] is True
    assert report["rto_seconds"] == report["restore_seconds"] + report["startup_seconds"] > 0
    assert report["rpo_seconds"] >= 0 and report["backup_age_seconds"] > 0
    if report["counts"]["Patient"] == 60:
        assert report["rpo_seconds"] > 0
    assert "OK" in report["audit"]
    assert "RPO achieved" in text_path.read_text() and "RTO achieved" in text_path.read_text()
    for path in (json_path, text_path):
        assert MARKER not in path.read_text()


@pytest.mark.slow
def test_drill_fails_loudly_on_a_damaged_backup(tmp_path: Path) -> None:
    data, target_dir = tmp_path / "data", tmp_path / "target"
    r = fv("init", "--data-dir", str(data))
    assert r.returncode == 0, r.stderr
    r = fv("backup", "create", "--data-dir", str(data), "--target", target_dir.as_uri(), "--location", "FR")
    assert r.returncode == 0, r.stderr
    chunk = next(p for p in (target_dir / "chunks").rglob("*") if p.is_file())
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    r = fv("dr", "drill", "--data-dir", str(data), "--target", target_dir.as_uri(), "--location", "FR",
           "--report-dir", str(tmp_path / "reports"))
    assert r.returncode == 1 and "damaged" in r.stderr
