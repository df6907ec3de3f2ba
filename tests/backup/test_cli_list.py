"""``fhirvault backup list --json``: what scripts read (the README's backup example, with --location)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def fv(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
    return subprocess.run([sys.executable, "-m", "fhirvault.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_list_json_after_the_readme_backup_example(tmp_path: Path) -> None:
    data, target = tmp_path / "data", (tmp_path / "backups").as_uri()
    assert fv("init", "--data-dir", str(data)).returncode == 0
    r = fv("backup", "create", "--data-dir", str(data), "--target", target)
    assert r.returncode == 2 and "no declared location" in r.stderr  # why the README passes --location
    r = fv("backup", "create", "--data-dir", str(data), "--target", target, "--location", "FR", "--json")
    assert r.returncode == 0, r.stderr
    backup_id = json.loads(r.stdout)["backup_id"]
    r = fv("backup", "list", "--target", target, "--location", "FR", "--json")
    assert r.returncode == 0, r.stderr
    listing = json.loads(r.stdout)
    [entry] = listing["backups"]
    assert entry["backup_id"] == backup_id and entry["size_bytes"] > 0 and entry["files"] >= 1
    assert entry["snapshot"].endswith("Z") and listing["problems"] == []
