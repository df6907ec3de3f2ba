"""CLI commands on a data directory that a server is serving right now (SQLite).

Every ``fhirvault serve`` process holds the directory's serving lock (container.hold_serving) for its
life. Most commands are safe beside it, and run: their writes (``user create``, ``client create``, the
audit records of ``backup create``) queue at the same write gate as the server's (a flock shared by
every process of the directory), the deferred search index is flushed only by the holder of the
``search-index`` role (the server, once it has taken it), ``backup create`` copies the database in
one read transaction, and ``audit verify`` and ``backup verify`` only read. Refused while a server runs:

* ``migrate`` (not ``--check``): the running processes would work on a schema they do not know;
* ``keys rotate``: the running server keeps the keys it loaded, so it could no longer unwrap the data
  keys the rotation re-wrapped until it restarts;
* any command that would migrate the schema on opening the store (this fhirvault is newer than the
  running server): the same reason as ``migrate``.
"""

from __future__ import annotations

import argparse

from fhirvault.config import Settings, SettingsError


class LiveServerError(SettingsError):
    """The command must not run while a server serves the data directory; the message says what to do."""


def check(settings: Settings, args: argparse.Namespace) -> None:
    """Raise LiveServerError if ``args``' command must not run beside the server serving ``settings``."""
    from fhirvault.container import schema_migrator, server_running
    from fhirvault.ports import SchemaError

    if not server_running(settings):
        return
    where = settings.data_dir
    if args.command == "migrate" and not getattr(args, "check", False):
        raise LiveServerError(f"a server is running on {where}: stop it (e.g. 'systemctl stop fhirvault'), run "
                              "'fhirvault migrate', then start the new release")
    if args.command == "keys":
        raise LiveServerError(f"a server is running on {where}: it keeps the keys it loaded at start and could "
                              "not read data re-wrapped under new ones; stop it, rotate the keys, then start it")
    try:
        pending = schema_migrator(settings).pending()
    except SchemaError:
        return  # a database newer than this release: the command itself reports it
    if pending:
        raise LiveServerError(f"a server is running on {where} on schema version {pending[0].version - 1}, and "
                              f"this fhirvault would migrate it to {pending[-1].version} under it: stop the server "
                              "first, or use the fhirvault release it runs")
