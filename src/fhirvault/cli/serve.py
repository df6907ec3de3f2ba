"""``fhirvault serve``: initialise on first run, then serve with Granian.

Granian (a Rust HTTP server for Python) runs worker processes that each build the
application. On SQLite there is one: the store's single writer thread lives there,
so there is exactly one writer per data directory. On PostgreSQL there are
``workers`` (default: the core count); the database serialises what must be, and
services/coherence.py keeps each worker's caches correct. The supervising process
restarts a worker that dies. TLS is rustls, TLS 1.2 minimum, forward-secret AEAD suites only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from fhirvault.config import NOT_PARSED, Settings, load_settings
from fhirvault.logs import configure, dict_config

log = logging.getLogger("fhirvault.serve")
WORKER_SETTINGS_ENV = "_FHIRVAULT_WORKER_SETTINGS"  # not FHIRVAULT_*: internal, parent → worker


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
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def app_factory() -> Any:
    """Granian worker entry point: rebuild the settings the parent validated, then the app."""
    from fhirvault.container import build
    from fhirvault.web.app import create_app

    _exit_with_parent()
    # The store's writer thread and the event loop share the GIL; a shorter switch
    # interval keeps the writer from waiting up to 5 ms each time it needs it back.
    sys.setswitchinterval(0.0005)
    settings = _decode(os.environ[WORKER_SETTINGS_ENV])
    configure(settings.log_level)
    return create_app(build(settings))


def worker_count(settings: Settings) -> int:
    """``workers``, or the default: one per core on PostgreSQL, one on SQLite (config.py refuses more)."""
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

    from fhirvault.bootstrap import initialise, is_initialised
    from fhirvault.container import build

    configure(settings.log_level)
    if not is_initialised(settings):
        path = initialise(settings)
        print(f"Initialised {settings.data_dir}; admin client credentials written to {path}", file=sys.stderr)
    build(settings).close()  # fail fast here (wrong key file, bad database) rather than in the worker
    os.environ[WORKER_SETTINGS_ENV] = _encode(settings)
    tls: dict[str, Any] = {}
    if settings.tls_cert and settings.tls_key:
        from granian.constants import SSLProtocols

        tls = {"ssl_cert": settings.tls_cert, "ssl_key": settings.tls_key, "ssl_protocol_min": SSLProtocols.tls12}
    scheme = "https" if tls else "http"
    workers = worker_count(settings)
    log.info("serving", extra={"url": f"{scheme}://{settings.host}:{settings.port}/fhir", "workers": workers})
    Granian(
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
        respawn_failed_workers=True,
        workers_kill_timeout=30,
        **tls,
    ).serve()
    return 0
