"""Kill -9 again and again under write load: every acknowledged create survives each restart, and the audit
log verifies after each kill. (The 100-kill version with figures: bench/killloop.py.)"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import start_server
from tests.integration.test_crash_durability import _load

pytestmark = pytest.mark.server  # starts real server processes

KILLS = 5


def _audit_verify(data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fhirvault.cli.main", "audit", "verify", "--data-dir", str(data)],
                          capture_output=True, text=True, timeout=300, check=False)


def test_repeated_sigkill_loses_no_acknowledged_write(tmp_path: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "server.log"
    everything: dict[str, str] = {}
    previous: dict[str, str] = {}
    for kill in range(KILLS):
        srv = start_server(data, log)
        with srv.client() as c:  # what the last round had acknowledged is all there after the restart
            for pid, family in previous.items():
                r = c.get(f"/Patient/{pid}")
                assert r.status_code == 200 and r.json()["name"][0]["family"] == family, (kill, pid, r.text)
        acknowledged: dict[str, str] = {}

        async def run() -> None:
            load = asyncio.create_task(_load(srv.fhir, srv.token(), acknowledged, time.monotonic() + 30))
            deadline = time.monotonic() + 20
            while len(acknowledged) < 20 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            srv.kill_all()  # mid-load: supervisor and worker at once
            await load

        asyncio.run(run())
        assert acknowledged, f"round {kill}: no create was acknowledged before the kill"
        verify = _audit_verify(data)
        assert verify.returncode == 0, (kill, verify.stdout, verify.stderr)
        everything.update(acknowledged)
        previous = acknowledged
    srv = start_server(data, log)
    try:
        with srv.client() as c:
            missing = [pid for pid in everything if c.get(f"/Patient/{pid}").status_code != 200]
        assert not missing and len(everything) >= KILLS * 20
    finally:
        srv.stop()
