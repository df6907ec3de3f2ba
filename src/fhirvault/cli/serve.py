"""``fhirvault serve``: initialise on first run, then serve with Granian.

Granian (a Rust HTTP server for Python) runs ``workers`` worker processes that each
build the application (default: the core count on PostgreSQL, one on SQLite). The
database serialises what must be (on SQLite each worker's writer takes the file's
write lock in turn), and services/coherence.py keeps each worker's caches correct.
The supervising process restarts a worker that dies. TLS is rustls, TLS 1.2 minimum, forward-secret AEAD suites only.

Before anything is served the supervisor checks what an operator can get wrong
and refuses with one line (exit status 2): another server on the same data
directory (an exclusive lock held for the server's life), a port already in
use (Granian binds with SO_REUSEPORT, so two servers would silently share it),
a directory that is neither new nor initialised, a bad key file, a missing
package (the app is imported and built here, not first in the worker).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from fhirvault.config import NOT_PARSED, Settings, load_settings
from fhirvault.logs import configure, dict_config

log = logging.getLogger("fhirvault.serve")
WORKER_SETTINGS_ENV = "_FHIRVAULT_WORKER_SETTINGS"  # not FHIRVAULT_*: internal, parent → worker
# The worker tells the supervisor that it could not start (Granian would otherwise respawn it).
STARTUP_FAILED = signal.SIGUSR1


class ServeError(Exception):
    """A refusal to serve that the operator can fix; the command prints it as one line."""


def _encode(settings: Settings) -> str:
    # The flat settings travel as values; the config file's tables are parsed again from the file.
    return json.dumps({f.name: (str(v) if isinstance(v := getattr(settings, f.name), Path) else v)
                       for f in dataclasses.fields(settings)
                       if getattr(settings, f.name) is not None and f.name not in NOT_PARSED}
                      | {"_config_path": str(settings.config_path) if settings.config_path else None})


def _decode(raw: str) -> Settings:
    values = json.loads(raw)
    path = values.pop("_config_path", None)
    return load_settings(values, environ=os.environ, config_file=Path(path) if path else None)


def _exit_with_parent() -> None:
    """Linux: if the supervisor dies (even by SIGKILL), the worker gets SIGTERM and shuts down cleanly.

    Without it an orphaned worker would keep serving, and holding the database, after its parent is gone.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def app_factory() -> Any:
    """Granian worker entry point: rebuild the settings the parent validated, then the app.

    The parent built the same app a moment ago, so a failure here is unexpected (a file changed in
    between): one line on stderr, the supervisor is told, and it stops instead of respawning.
    """
    from fhirvault.container import build
    from fhirvault.web.app import create_app

    _exit_with_parent()
    # The store's writer thread and the event loop share the GIL; a shorter switch
    # interval keeps the writer from waiting up to 5 ms each time it needs it back.
    sys.setswitchinterval(0.0005)
    try:
        settings = _decode(os.environ[WORKER_SETTINGS_ENV])
        configure(settings.log_level)
        return create_app(build(settings))
    except Exception as exc:
        print(f"fhirvault: error: the server worker could not start: {exc}", file=sys.stderr, flush=True)
        if (supervisor := os.getppid()) != 1:  # 1: the supervisor is gone already
            os.kill(supervisor, STARTUP_FAILED)
        raise SystemExit(3) from None


def lock_data_dir(data_dir: Path) -> int:
    """Take the data directory's exclusive lock (creating the directory, 0700, if it is new).

    Held by the supervisor (and inherited by its worker) until the server is gone; the kernel
    releases it when the processes exit, even killed. Returns the lock's file descriptor."""
    from fhirvault.bootstrap import LOCK_FILE

    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + 1.0  # a server killed a moment ago may still be exiting
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ServeError(f"another fhirvault server (pid {holder}) is already serving {data_dir}; "
                             "stop it first (one server per data directory)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on, as a plain bind would (Granian's SO_REUSEPORT would not)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ServeError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
        try:
            probe.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeError(f"port {port} on {host} is already in use by another program or server; "
                                 "stop it or choose another --port") from None
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: loopback only if every address it resolves to is
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return False
        return all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def _make_private(settings: Settings) -> None:
    """Files of a data directory created before 0600 was enforced: owner-only from now on.

    The root key file is left alone: a key readable by others is refused, not silently fixed."""
    data_dir, key = settings.data_dir, settings.root_key_path
    paths = [data_dir, *(p for p in data_dir.iterdir() if p != key and p.is_file() and not p.is_symlink())]
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            try:
                os.chmod(path, mode & 0o700)
            except PermissionError:  # not ours (a config file owned by root): leave it
                continue
            log.warning("permissions tightened", extra={"path": str(path), "was": oct(mode), "now": oct(mode & 0o700)})


def _prepare(settings: Settings) -> None:
    """Initialise a new or empty directory; otherwise it must hold a database. Then build the app once."""
    from fhirvault.bootstrap import data_dir_is_new, initialise, is_initialised
    from fhirvault.container import build
    from fhirvault.web.app import create_app

    if not is_initialised(settings):
        if not data_dir_is_new(settings.data_dir):
            raise ServeError(f"data directory missing or not initialised: {settings.data_dir} has files but no "
                             f"{settings.database_path.name}; check --data-dir (serve initialises only a new or "
                             "empty directory)")
        path = initialise(settings)
        print(f"Initialised {settings.data_dir}; admin client credentials written to {path}", file=sys.stderr)
    _make_private(settings)
    # Import and build the whole app here, so that a missing package, a wrong key file or a bad
    # database is one line and a non-zero exit now, not a worker dying at start-up.
    container = build(settings)
    try:
        if settings.mode == "production":
            from fhirvault.services.client_owners import production_problems

            problems = production_problems(container.store, settings.tenant)
            if problems:
                raise ServeError("; ".join(problems))
        create_app(container)
    finally:
        container.close()


def worker_count(settings: Settings) -> int:
    """``workers``, or the default: one per core on PostgreSQL, one on SQLite."""
    if settings.workers is not None:
        return settings.workers
    if settings.database_url is None:
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def serve(settings: Settings) -> int:
    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.http import HTTP1Settings
    from granian.log import LogLevels

    from fhirvault.bootstrap import LOCK_FILE

    configure(settings.log_level)
    new_dir = not settings.data_dir.exists()
    # One server per SQLite data directory (its workers share the file; the supervisor holds the lock).
    # On PostgreSQL the database serialises what must be, and several servers (or one per node) may
    # share the key directory.
    if settings.database_url is None:
        lock: int | None = lock_data_dir(settings.data_dir)
    else:
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = None
    try:
        check_port_free(settings.host, settings.port)
        _prepare(settings)
        os.environ[WORKER_SETTINGS_ENV] = _encode(settings)
        tls: dict[str, Any] = {}
        if settings.tls_cert and settings.tls_key:
            from granian.constants import SSLProtocols

            tls = {"ssl_cert": settings.tls_cert, "ssl_key": settings.tls_key,
                   "ssl_protocol_min": SSLProtocols.tls12}
        elif not is_loopback(settings.host):
            print(f"fhirvault: warning: serving plain HTTP on {settings.host}, not loopback: access tokens, client "
                  "secrets and health data cross the network in clear; use --tls-cert/--tls-key, or a TLS proxy on "
                  "this host with --host 127.0.0.1", file=sys.stderr)
        scheme = "https" if tls else "http"
        workers = worker_count(settings)
        server = Granian(
            "fhirvault.cli.serve:app_factory",
            factory=True,
            address=settings.host,
            port=settings.port,
            interface=Interfaces.ASGI,
            workers=workers,
            loop=Loops.uvloop,
            http1_settings=HTTP1Settings(max_buffer_size=settings.max_body_bytes + 65536),
            log_level=LogLevels(settings.log_level),
            log_dictconfig=dict_config(settings.log_level),
            log_access=False,
            respawn_failed_workers=True,  # a worker that crashes while serving is replaced
            workers_kill_timeout=30,
            **tls,
        )
        failed_start = False

        def startup_failed(signum: int, frame: FrameType | None) -> None:
            nonlocal failed_start
            failed_start = True
            server.signal_handler_interrupt()  # type: ignore[no-untyped-call]  # stop, do not respawn

        previous = signal.signal(STARTUP_FAILED, startup_failed)
        log.info("serving", extra={"url": f"{scheme}://{settings.host}:{settings.port}/fhir", "workers": workers})
        try:
            server.serve()
        except SystemExit as exc:  # Granian's own crash-loop detection
            if exc.code and not failed_start:
                raise ServeError("the server worker kept failing; see the log above") from None
            # (with failed_start: Granian stopped on its own before our interrupt; same cause, said below)
        finally:
            signal.signal(STARTUP_FAILED, previous)
        if failed_start:
            raise ServeError("the server did not start (the worker's error is above)")
        return 0
    finally:
        initialised = (settings.database_path if settings.database_url is None else settings.root_key_path).exists()
        if not initialised:  # refused before initialising: leave the directory as it was
            (settings.data_dir / LOCK_FILE).unlink(missing_ok=True)
            if new_dir:
                with contextlib.suppress(OSError):
                    settings.data_dir.rmdir()
        if lock is not None:
            os.close(lock)
