"""``fhirvault migrate [--check]``: apply the database's pending schema migrations, or list them.

Opening a store (``serve`` and every other command) applies pending steps too, logging each one,
so a small clinic upgrades by installing the new release and restarting. This command is for
upgrade scripts and for PostgreSQL sites whose server role may not change the schema: run it as
the owner role before starting the new release. ``--check`` exits 1 while steps are pending.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from fhirvault.config import Settings


def register(sub: Any, settings_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("migrate", help="apply pending database schema migrations and print them")
    settings_options(p)
    p.add_argument("--check", action="store_true",
                   help="change nothing: list pending migrations and exit 1 if there are any")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from fhirvault.container import schema_migrator

    migrator = schema_migrator(settings)
    if args.check:
        steps = migrator.pending()  # raises SchemaTooNew for a database newer than this release
        for m in steps:
            print(f"pending: {m.version} {m.description}")
        print(f"schema version {migrator.current()}; this fhirvault: {migrator.latest}"
              f"; {len(steps)} migration(s) pending")
        return 1 if steps else 0
    before = migrator.current()
    applied = migrator.apply()
    for m in applied:
        print(f"applied: {m.version} {m.description}")
    if applied:
        print(f"schema migrated from version {before} to {applied[-1].version}")
    else:
        print(f"schema version {before} is current; nothing to do")
    return 0
