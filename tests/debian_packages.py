"""Debian packages some tests drive for real (Chromium, pgBackRest): installed on first use when the suite runs
as root on Debian (as on a fresh CI machine), so the README's test command needs no manual step there."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

_LOCK = Path("/tmp/fhirvault-test-apt.lock")  # xdist workers may get here together; dpkg runs once at a time


def ensure(program: str, package: str) -> str:
    """The path of ``program``, installing ``package`` with apt-get first if it is missing and we may."""
    found = shutil.which(program)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        with _LOCK.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if shutil.which(program) is None:
                env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
                proc = subprocess.run(["apt-get", "install", "-y", "-q", package], capture_output=True, text=True,
                                      env=env, timeout=900, check=False)
                if proc.returncode != 0:  # a stale package index: refresh once and retry
                    subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600,
                                   check=False)
                    subprocess.run(["apt-get", "install", "-y", "-q", package], capture_output=True, env=env,
                                   timeout=900, check=False)
        found = shutil.which(program)
    if found is None:
        pytest.fail(f"{program} is not installed and could not be installed here: apt-get install -y {package}",
                    pytrace=False)
    return found
