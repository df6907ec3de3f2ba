"""A PostgreSQL server of a test's own, to crash and start again (the shared one in pg_server stays up)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests import pg_server


class RestartablePg:
    def __init__(self, base: Path, port: int) -> None:
        self.base = base
        self.port = port

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        done = subprocess.run([str(pg_server.SCRIPT), "start", str(self.base), str(self.port)], capture_output=True,
                              text=True, check=False, timeout=120)
        log = self.base / "server.log"
        assert done.returncode == 0, done.stderr + (log.read_text()[-2000:] if log.exists() else "")

    def stop(self, mode: str = "immediate") -> None:
        """``immediate``: a crash as far as the data goes (no shutdown checkpoint, recovery at start)."""
        as_pg = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
        subprocess.run([*as_pg, str(Path(pg_server.bindir()) / "pg_ctl"), "-D", str(self.base / "data"), "-m", mode,
                        "stop"], check=True, capture_output=True, timeout=120)

    def kill(self) -> None:
        """kill -9 of the postmaster and every process it started (as a power cut does to them)."""
        pid = int((self.base / "data" / "postmaster.pid").read_text().split()[0])
        family = [pid, *_children(pid)]
        for p in family:
            os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in family):  # their shared memory must be gone before a restart
            assert time.monotonic() < deadline, "PostgreSQL processes survived SIGKILL"
            time.sleep(0.05)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextmanager
def restartable_pg() -> Iterator[RestartablePg]:
    # Not under pytest's basetemp: other pytest sessions on the machine prune old ones.
    base = Path(tempfile.mkdtemp(prefix="fhirvault-pg-own-"))
    base.chmod(0o711)
    pg = RestartablePg(base / "pg", pg_server.free_port())
    pg.start()
    try:
        yield pg
    finally:
        subprocess.run([str(pg_server.SCRIPT), "stop", str(pg.base)], check=False, capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)
