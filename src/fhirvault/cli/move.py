"""``fhirvault move --data-dir DIR --to postgresql://…``: move a clinic from SQLite to PostgreSQL.

The server must be stopped (the data directory's serve lock is taken for the whole move). Every table goes
into a new, empty database; both sides are then compared table by table (row counts and SHA-256 content
hashes) and the audit log is verified on the copy. Only then is ``database_url`` written into
DIR/fhirvault.toml (the old file kept as a backup); the SQLite files are left as they were.

Exit codes: 0 moved and proven, 1 the copy differs or its audit log fails, 2 refused (bad usage, server
running, not a SQLite data directory, target not empty). The database URL is never printed: it may hold
a password.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fhirvault.config import CONFIG_FILE_NAME, Settings, SettingsError, load_settings

BACKUP_SUFFIX = ".before-move"


def register(sub: Any, settings_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("move", help="move a stopped clinic's SQLite data into a new, empty PostgreSQL database")
    settings_options(p)
    p.add_argument("--to", required=True, metavar="URL",
                   help="postgresql://user@host:port/database of a new, empty database, or '-' to read it from"
                        " stdin (keeps it out of 'ps'); it is written to DIR/fhirvault.toml, so prefer a"
                        " password in ~/.pgpass or PGPASSWORD to one in the URL")


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string with ASCII escapes is a valid TOML basic string


def _write_config(settings: Settings, url: str) -> tuple[Path, Path | None]:
    """Put ``database_url`` at the top of DIR/fhirvault.toml (top-level keys go before any table)."""
    config = settings.data_dir / CONFIG_FILE_NAME
    old = config.read_text() if config.is_file() else ""
    saved: Path | None = None
    if config.is_file():
        saved = config.with_name(config.name + BACKUP_SUFFIX)
        saved.write_text(old)
        saved.chmod(0o600)
    tmp = config.with_name(config.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"# written by 'fhirvault move': the clinic's data is in this PostgreSQL database\n"
                 f"database_url = {_toml_string(url)}\n{old}")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, config)
    return config, saved


def run(args: argparse.Namespace, settings: Settings) -> int:
    from fhirvault.backup.move import MoveError, move
    from fhirvault.cli.serve import lock_data_dir
    from fhirvault.container import change_feed_source, restore_sink

    if settings.database_url is not None:
        raise SettingsError(f"{settings.data_dir} is already on PostgreSQL (database_url is set): nothing to move")
    url: str = sys.stdin.readline().strip() if args.to == "-" else args.to
    own_config = settings.config_path is None or settings.config_path == settings.data_dir / CONFIG_FILE_NAME
    if not own_config:
        raise SettingsError(f"the settings come from {settings.config_path}: move writes database_url into "
                            f"{settings.data_dir / CONFIG_FILE_NAME}; run it without --config/FHIRVAULT_CONFIG")
    # What the next 'serve' will load: refuses a bad URL (without echoing it) or a [backup] section.
    try:
        target = load_settings({"data_dir": settings.data_dir, "database_url": url},
                               config_file=settings.config_path, environ={})
    except SettingsError as exc:
        raise SettingsError(str(exc).replace("option --database-url", "--to")) from None
    lock = lock_data_dir(settings.data_dir)  # raises if a server is running; keeps one from starting
    try:
        try:
            report = move(lambda: change_feed_source(settings), lambda: change_feed_source(target),
                          lambda d: restore_sink(d, url), settings.data_dir)
        except MoveError as exc:
            print(f"fhirvault: error: {exc}", file=sys.stderr)
            return 2
        print(f"copied {report.rows} rows in {len(report.tables)} tables in {report.seconds_copy:.1f} s;"
              f" compared both sides in {report.seconds_check:.1f} s")
        if report.mismatches:
            print("fhirvault: error: the copy differs from the SQLite data; the configuration was not changed:",
                  file=sys.stderr)
            for line in report.mismatches:
                print(f"  {line}", file=sys.stderr)
            return 1
        from fhirvault.services.audit_verify import verify_data_dir

        audit = verify_data_dir(target)
        if not audit.ok:
            print(f"fhirvault: error: the audit log of the copy does not verify: {audit.summary()}; the"
                  " configuration was not changed", file=sys.stderr)
            return 1
        print(f"every table matches (row counts and SHA-256 content hashes); audit log on PostgreSQL: "
              f"{audit.summary()}")
        _record(target, report.rows)
        config, saved = _write_config(settings, url)
    finally:
        os.close(lock)
    print(f"database_url written to {config}" + (f" (previous file kept as {saved})" if saved else ""))
    print(f"next: fhirvault serve --data-dir {settings.data_dir}  (now on PostgreSQL)")
    names = ", ".join(p.name for p in sorted(settings.data_dir.glob("fhirvault.sqlite3*"))
                      + sorted(settings.data_dir.glob("audit.sqlite3*")))
    print(f"The SQLite files ({names}) were left untouched. Once the server has run on PostgreSQL and you are"
          f" satisfied (and have a backup of the new database), delete them: they still hold the data"
          f" (encrypted) and are no longer updated.")
    return 0


def _record(target: Settings, rows: int) -> None:
    """The move itself, in the new database's audit trail."""
    from fhirvault.container import build

    container = build(target)
    try:
        container.audit.record_system_event(container.store, container.clock, "move",
                                            f"moved from SQLite: {rows} rows copied and compared")
    finally:
        container.close()
