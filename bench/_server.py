"""A real ``fhirvault serve`` on loopback for the abuse benchmarks (soak, kill loop).

The server runs in its own session (process group), so the supervisor and its
worker(s) can be sampled together and killed together, as a power cut would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fhirvault.cli.main", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, env=clean_env(), timeout=600, check=False)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def creds(self) -> dict[str, str]:
        return dict(json.loads((self.data_dir / "admin-client.json").read_text()))

    def token(self) -> str:
        c = self.creds()
        r = httpx.post(self.base + "/oauth2/token", data={"grant_type": "client_credentials"},
                       auth=(c["client_id"], c["client_secret"]), timeout=30)
        r.raise_for_status()
        return str(r.json()["access_token"])

    def pids(self) -> list[int]:
        """The supervisor and every process of its group (the workers)."""
        pgid = self.proc.pid
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.getpgid(int(entry)) == pgid:
                        found.append(int(entry))
        return sorted(found)

    def kill9(self) -> None:
        """SIGKILL to the whole group at once: no clean shutdown, no flush."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 10  # the workers are reaped by init, wait until they are gone
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()


def start(data_dir: Path, log_path: Path, port: int | None = None) -> Server:
    port = port or free_port()
    with open(log_path, "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fhirvault.cli.main", "serve", "--data-dir", str(data_dir),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1).status_code == 200:
                return Server(proc, port, data_dir)
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"server did not come up; see {log_path}")
