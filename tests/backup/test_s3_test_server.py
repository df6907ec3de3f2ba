"""Without Swift and without root, the S3 tests fail with one message saying what to do (never a skip)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import s3_server


def test_missing_swift_without_root_fails_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3_server, "_installed", lambda: False)
    monkeypatch.setattr(s3_server.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.fail.Exception) as failed:
        s3_server._ensure_installed()
    message = str(failed.value)
    assert "sudo bash scripts/s3-test-server.sh install" in message and "-m 'not s3'" in message


def test_tests_using_the_swift_fixtures_carry_the_s3_marker() -> None:
    """`pytest -m 'not s3'` really leaves out every test that needs Swift, and only those."""
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "-m", "s3",
                        "tests/backup/test_s3.py"], cwd=root, capture_output=True, text=True, timeout=120, check=False)
    selected = {line.split("::")[1].split("[")[0] for line in r.stdout.splitlines() if "::" in line}
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test_put_get_exists_delete_roundtrip" in selected and "test_check_refuses_a_missing_bucket" in selected
    assert not any("moto" in name for name in selected), selected  # moto tests do not need Swift
