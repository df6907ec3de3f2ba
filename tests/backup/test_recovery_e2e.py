"""Lose the server: a new machine with only the backup target and the recovery material serves again.

Everything goes through the ``fhirvault`` command, as in docs/disaster-recovery.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.backup.conftest import MARKER, all_object_bytes, seed
from tests.conftest import get_token, start_server


def fv(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
    return subprocess.run([sys.executable, "-m", "fhirvault.cli.main", *args], capture_output=True, text=True,
                          input=stdin, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.server
def test_new_machine_with_recovery_file_or_shares_serves_the_data_again(tmp_path: Path) -> None:
    old, target_dir, vault = tmp_path / "old-server", tmp_path / "backups", tmp_path / "vault"
    config = tmp_path / "backup.toml"
    config.write_text(f'[backup.targets.offsite]\nurl = "{target_dir.as_uri()}"\nlocation = "FR"\n')
    srv = start_server(old, tmp_path / "old.log")
    try:
        ids = seed(srv, 30, 2)
        creds = srv.creds
        with srv.client() as c:
            original = c.get(f"/Patient/{ids[7]}").json()
        assert original["name"][0]["family"].startswith(MARKER)

        # Day 0: escrow (passphrase file and 2-of-3 shares), kept apart from the backups.
        (tmp_path / "pass").write_text("correct horse battery staple\n")
        r = fv("escrow", "export", "--data-dir", str(old), "--out", str(vault / "recovery.json"),
               "--passphrase-file", str(tmp_path / "pass"), "--shares", "3", "--threshold", "2",
               "--out-dir", str(vault / "shares"))
        assert r.returncode == 0, r.stderr
        # Backups run while the server serves.
        r = fv("backup", "create", "--data-dir", str(old), "--target", "offsite", "--backup-config", str(config))
        assert r.returncode == 0, r.stderr
        assert "complete" in r.stdout
        r = fv("backup", "verify", "--data-dir", str(old), "--target", "offsite", "--backup-config", str(config))
        assert r.returncode == 0, r.stderr
    finally:
        srv.kill_all()  # the server is lost (and never leaked if an assertion above fails)

    # The server is lost.
    shutil.rmtree(old)
    r = fv("backup", "list", "--target", target_dir.as_uri(), "--location", "FR")
    assert r.returncode == 0 and r.stdout.count("\n") == 2, r.stdout

    # Wrong passphrase, too few shares: clear errors, nothing created.
    r = fv("backup", "restore", "--target", target_dir.as_uri(), "--location", "FR", "--to", str(tmp_path / "new"),
           "--recovery-file", str(vault / "recovery.json"), "--passphrase-file", "-", stdin="wrong passphrase!\n")
    assert r.returncode == 1 and "wrong recovery passphrase" in r.stderr
    r = fv("backup", "restore", "--target", target_dir.as_uri(), "--location", "FR", "--to", str(tmp_path / "new"),
           "--share", str(vault / "shares" / "fhirvault-share-2-of-3.json"))
    assert r.returncode == 1 and "too few shares" in r.stderr
    assert not (tmp_path / "new").exists()

    # New machine, recovery file + passphrase.
    new = tmp_path / "new"
    r = fv("backup", "restore", "--target", target_dir.as_uri(), "--location", "FR", "--to", str(new),
           "--recovery-file", str(vault / "recovery.json"), "--passphrase-file", "-",
           stdin="correct horse battery staple\n")
    assert r.returncode == 0, r.stderr
    assert oct((new / "root.key").stat().st_mode & 0o777) == "0o600"
    assert not (new / "admin-client.json").exists()  # a client secret: never in a backup
    # The operator's own copy of the old admin credentials (start_server reads this file).
    (new / "admin-client.json").write_text(json.dumps(creds))
    srv2 = start_server(new, tmp_path / "new.log")
    try:
        with httpx.Client(base_url=srv2.base_url) as c:
            token = get_token(c, creds)  # the old clients are in the restored database
        with httpx.Client(base_url=srv2.fhir, headers={"Authorization": f"Bearer {token}"}) as c:
            back = c.get(f"/Patient/{ids[7]}")
            assert back.status_code == 200
            assert back.json() == original
            assert c.get("/Observation", params={"_summary": "count"}).json()["total"] == 60
    finally:
        srv2.stop()
    r = fv("audit", "verify", "--data-dir", str(new))
    assert r.returncode in (0, 2), r.stderr  # 2: this build has no 'audit verify' command yet

    # Another new machine, with two of the three shares (rebuild the key file first, as officers would).
    r = fv("escrow", "recover", "--share", str(vault / "shares" / "fhirvault-share-1-of-3.json"),
           "--share", str(vault / "shares" / "fhirvault-share-3-of-3.json"), "--out", str(tmp_path / "root.key"))
    assert r.returncode == 0, r.stderr
    other = tmp_path / "other"
    r = fv("backup", "restore", "--target", target_dir.as_uri(), "--location", "FR", "--to", str(other),
           "--root-key-file", str(tmp_path / "root.key"))
    assert r.returncode == 0, r.stderr
    (other / "admin-client.json").write_text(json.dumps(creds))
    srv3 = start_server(other, tmp_path / "other.log")
    try:
        with httpx.Client(base_url=srv3.base_url) as c:
            token = get_token(c, creds)
        with httpx.Client(base_url=srv3.fhir, headers={"Authorization": f"Bearer {token}"}) as c:
            assert c.get(f"/Patient/{ids[0]}").status_code == 200
    finally:
        srv3.stop()

    for path, raw in all_object_bytes(target_dir):
        assert MARKER.encode() not in raw, path


def test_restore_refuses_outside_eea_and_missing_key(tmp_path: Path) -> None:
    r = fv("backup", "restore", "--target", (tmp_path / "t").as_uri(), "--location", "US", "--to", str(tmp_path / "n"),
           "--root-key-file", str(tmp_path / "k"))
    assert r.returncode == 2 and "outside the EEA" in r.stderr
    r = fv("backup", "restore", "--target", (tmp_path / "t").as_uri(), "--location", "FR", "--to", str(tmp_path / "n"))
    assert r.returncode == 2 and "needs the root key" in r.stderr
