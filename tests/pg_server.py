"""A real PostgreSQL server for the tests, started once per test process (one per xdist worker).

``scripts/pg-test-server.sh`` starts it (as the ``postgres`` user when the tests run as root) on
a free loopback port. Each test gets its own database, copied from a template that already has
the schema (``CREATE DATABASE … TEMPLATE`` takes milliseconds). Nothing is skipped: if
PostgreSQL cannot be started, the tests that need it fail with the script's message.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import psycopg

from fhirvault.adapters.postgres_store import migrate

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pg-test-server.sh"
TEMPLATE = "fhirvault_template"
# postgresql: the server/app fixtures run on PostgreSQL. Not FHIRVAULT_*: the settings refuse unknown
# FHIRVAULT_ variables, and CLI commands run by the tests inherit the environment.
ENGINE_ENV = "TEST_DB_ENGINE"


def engine() -> str:
    value = os.environ.get(ENGINE_ENV, "sqlite").lower()
    if value not in ("sqlite", "postgresql"):
        raise RuntimeError(f"{ENGINE_ENV} must be sqlite or postgresql, not {value!r}")
    return value


class PgServer:
    def __init__(self, base: Path, port: int, url: str) -> None:
        self.base = base
        self.port = port
        self.admin_url = url  # superuser, database "postgres"
        self._names = itertools.count(1)
        self._lock = threading.Lock()

    def url(self, database: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str, *args: object) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as c:
            c.execute(sql, args or None)  # type: ignore[arg-type]

    def create_database(self, name: str | None = None, *, empty: bool = False) -> str:
        """A new database (with the schema, unless ``empty``); returns its URL."""
        with self._lock:
            name = name or f"t{os.getpid()}_{next(self._names)}"
        self.admin(f'CREATE DATABASE "{name}" TEMPLATE {"template0" if empty else TEMPLATE}')
        return self.url(name)

    def database_for(self, data_dir: Path) -> str:
        """The database of a server data directory: the same one again when the server restarts on it."""
        name = "d" + hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:20]
        with psycopg.connect(self.admin_url, autocommit=True) as c:
            if c.execute("SELECT 1 FROM pg_database WHERE datname=%s", (name,)).fetchone() is None:
                c.execute(f'CREATE DATABASE "{name}" TEMPLATE {TEMPLATE}')  # type: ignore[arg-type]
        return self.url(name)

    def files_of(self, data_dir: Path) -> list[Path]:
        """What PostgreSQL writes for a server data directory's database: its files, the WAL, the log."""
        name = self.database_for(data_dir).rsplit("/", 1)[1]
        with psycopg.connect(self.admin_url, autocommit=True) as c:
            c.execute("CHECKPOINT")  # table files up to date too, not only the WAL
            row = c.execute("SELECT oid FROM pg_database WHERE datname=%s", (name,)).fetchone()
        assert row is not None
        data = self.base / "data"
        return [data / "base" / str(row[0]), data / "pg_wal", self.base / "server.log"]

    def stop(self) -> None:
        subprocess.run([str(SCRIPT), "stop", str(self.base)], check=False, capture_output=True, timeout=120)
        shutil.rmtree(self.base, ignore_errors=True)


def bindir() -> str:
    """The PostgreSQL server binaries' directory (the newest installed version)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not found:
        raise RuntimeError("PostgreSQL binaries not found: run scripts/pg-test-server.sh start once (it installs them)")
    return str(found[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_server: PgServer | None = None
_start_lock = threading.Lock()


def server() -> PgServer:
    """This process's server, started on first use and stopped at exit."""
    global _server
    with _start_lock:
        if _server is None:
            base = Path(tempfile.mkdtemp(prefix="fhirvault-pg-"))
            os.chmod(base, 0o711)  # the server runs as another user
            port = free_port()
            proc = subprocess.run([str(SCRIPT), "start", str(base), str(port)], capture_output=True, text=True,
                                  timeout=300, check=False)
            if proc.returncode != 0:
                log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
                raise RuntimeError(f"could not start PostgreSQL with {SCRIPT.name} (exit {proc.returncode}):\n"
                                   f"{proc.stderr}\n{log[-2000:]}")
            srv = PgServer(base, port, proc.stdout.strip().splitlines()[-1])
            atexit.register(srv.stop)
            srv.admin(f"CREATE DATABASE {TEMPLATE}")
            migrate(srv.url(TEMPLATE))  # the schema once; every test database is a copy
            _server = srv
        return _server
