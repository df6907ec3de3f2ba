"""``fhirvault serve`` refuses what an operator can get wrong, in one line, and never crash-loops.

Everything here runs the real command in a subprocess, as an operator would.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from tests.conftest import PATIENT, free_port, start_server

pytestmark = pytest.mark.server  # starts real server processes


def fhirvault(*args: str, env: dict[str, str] | None = None, python_args: tuple[str, ...] = ("-m", "fhirvault.cli.main"),
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the command; a server that does not stop by itself is killed (with its worker) and fails the test."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
    proc = subprocess.Popen([sys.executable, *python_args, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**base_env, **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"fhirvault {' '.join(args)} was still running after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The refusal: a non-zero status, exactly one 'fhirvault: error:' line, no traceback, nothing served."""
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "Respawning" not in r.stderr, r.stderr
    assert '"msg":"serving"' not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("fhirvault: error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.mark.sqlite_only  # SQLite files and the SQLite lock
def test_second_server_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start_server(data, tmp_path / "first.log")
    try:
        r = fhirvault("serve", "--data-dir", str(data), "--port", str(free_port()))
        line = one_error_line(r)
        assert "already serving" in line and str(data) in line and f"pid {first.proc.pid}" in line
        assert httpx.get(first.base_url + "/readyz", timeout=10).status_code == 200  # the first one carries on
    finally:
        first.stop()
    assert first.proc.returncode == 0  # SIGTERM: a clean stop
    second = start_server(data, tmp_path / "second.log")  # the lock went with the first server
    second.stop()


def test_port_in_use_is_refused_and_leaves_no_directory(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "a", tmp_path / "a.log")
    try:
        port = srv.base_url.rsplit(":", 1)[1]
        r = fhirvault("serve", "--data-dir", str(tmp_path / "b"), "--port", port)
        assert "already in use" in one_error_line(r)
        assert not (tmp_path / "b").exists()
    finally:
        srv.stop()


def test_plain_http_on_a_network_address_warns(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", tmp_path / "log", "--host", "0.0.0.0")
    srv.stop()
    warning = [line for line in (tmp_path / "log").read_text().splitlines() if line.startswith("fhirvault: warning:")]
    assert len(warning) == 1 and "in clear" in warning[0] and "tokens" in warning[0] and "health data" in warning[0]
    loopback = start_server(tmp_path / "data", tmp_path / "log2")
    loopback.stop()
    assert "fhirvault: warning:" not in (tmp_path / "log2").read_text()


@pytest.mark.parametrize("command", [
    ["keys", "rotate", "--level", "tenant"],
    ["client", "create", "--name", "x", "--scope", "system/*.cruds"],
    ["user", "list"],
    ["audit", "verify"],
    ["backup", "create", "--target", "file:///nonexistent-fhirvault-backups", "--location", "FR"],
    ["dr", "drill", "--target", "file:///nonexistent-fhirvault-backups", "--location", "FR"],
])
def test_a_mistyped_data_directory_is_one_line(tmp_path: Path, command: list[str]) -> None:
    typo = tmp_path / "fhirvault-dta"
    line = one_error_line(fhirvault(*command, "--data-dir", str(typo)))
    assert "data directory missing or not initialised" in line and str(typo) in line
    assert not typo.exists()


def test_serve_initialises_only_a_new_directory(tmp_path: Path) -> None:
    stray = tmp_path / "home"
    stray.mkdir()
    (stray / "notes.txt").write_text("not a data directory")
    line = one_error_line(fhirvault("serve", "--data-dir", str(stray), "--port", str(free_port())))
    assert "data directory missing or not initialised" in line
    assert sorted(p.name for p in stray.iterdir()) == ["notes.txt"]


def test_a_key_file_readable_by_others_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert fhirvault("init", "--data-dir", str(data)).returncode == 0
    (data / "root.key").chmod(0o644)
    line = one_error_line(fhirvault("serve", "--data-dir", str(data), "--port", str(free_port())))
    assert "chmod 600" in line
    assert "chmod 600" in one_error_line(fhirvault("keys", "rotate", "--data-dir", str(data), "--level", "root"))


def test_a_missing_package_is_one_line_not_a_worker_crash_loop(tmp_path: Path) -> None:
    # What a plain install without httpx did: the worker died importing it and Granian respawned it.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "httpx.py").write_text("raise ModuleNotFoundError(\"No module named 'httpx'\", name='httpx')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shadow), *sys.path])}
    r = fhirvault("serve", "--data-dir", str(tmp_path / "data"), "--port", str(free_port()), env=env)
    line = one_error_line(r)
    assert "No module named 'httpx'" in line and "reinstall" in line


def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path) -> None:
    # The parent's check passes; the worker (forked from it) fails building the app: the supervisor
    # must exit non-zero at once instead of respawning it.
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent("""
        import os, sys
        import fhirvault.web.app as web_app
        real, parent = web_app.create_app, os.getpid()
        def create_app(container):
            if os.getpid() != parent:
                raise RuntimeError("boom in the worker")
            return real(container)
        web_app.create_app = create_app
        from fhirvault.cli.main import main
        sys.exit(main(sys.argv[1:]))
    """))
    r = fhirvault("serve", "--data-dir", str(tmp_path / "data"), "--port", str(free_port()),
                  python_args=(str(driver),), timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "Respawning" not in r.stderr, r.stderr
    assert "fhirvault: error: the server worker could not start: boom in the worker" in r.stderr
    assert "fhirvault: error: the server did not start" in r.stderr


@pytest.mark.sqlite_only  # SQLite files and the SQLite lock
def test_data_files_are_owner_only_including_wal_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data, tmp_path / "log")
    try:
        with srv.client() as c:
            r = c.post("/Patient", json=PATIENT, headers={"Content-Type": "application/fhir+json"})
            assert r.status_code == 201
        names = {p.name for p in data.iterdir()}
        for db in ("fhirvault.sqlite3", "alerts.sqlite3"):
            assert {db, db + "-wal", db + "-shm"} <= names, names
        assert not {n for n in names if n.startswith("audit.sqlite3")}  # the audit log is in fhirvault.sqlite3
        loose = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in data.iterdir()
                 if stat.S_IMODE(p.stat().st_mode) & 0o077}
        assert loose == {}
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
    finally:
        srv.stop()
    # A data directory from before: loose files are tightened at the next start.
    (data / "fhirvault.sqlite3").chmod(0o644)
    (data / "admin-client.json").chmod(0o644)
    again = start_server(data, tmp_path / "log2")
    again.stop()
    assert stat.S_IMODE((data / "fhirvault.sqlite3").stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "admin-client.json").stat().st_mode) == 0o600
