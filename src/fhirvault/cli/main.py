"""The ``fhirvault`` command: init, serve, migrate, client create, keys rotate."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fhirvault import __version__
from fhirvault.cli import archive as archive_cli
from fhirvault.cli import backup as backup_cli
from fhirvault.cli import clients as clients_cli
from fhirvault.cli import migrate as migrate_cli
from fhirvault.cli import users as users_cli
from fhirvault.config import Settings, SettingsError, load_settings


def _settings_options(p: argparse.ArgumentParser, *, server: bool = False) -> None:
    p.add_argument("--data-dir", dest="data_dir", help="data directory (env FHIRVAULT_DATA_DIR)")
    p.add_argument("--config", dest="config_file", type=Path, help="TOML config file (env FHIRVAULT_CONFIG)")
    p.add_argument("--root-key-file", dest="root_key_file", help="root key file (default DATA_DIR/root.key)")
    if server:
        p.add_argument("--host", help="bind address (default 127.0.0.1)")
        p.add_argument("--port", type=int, help="port (default 8080)")
        p.add_argument("--tls-cert", dest="tls_cert", help="PEM certificate chain; enables HTTPS (TLS 1.2+)")
        p.add_argument("--tls-key", dest="tls_key", help="PEM private key for --tls-cert")
        p.add_argument("--public-base-url", dest="public_base_url", help="external URL, e.g. https://fhir.example.org")
        p.add_argument("--log-level", dest="log_level", help="debug, info, warning or error")
        p.add_argument("--workers", type=int, help="worker processes (PostgreSQL only; default: the core count)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fhirvault", description="Encrypted FHIR R4 health-data host.")
    parser.add_argument("--version", action="version", version=f"fhirvault {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p_init = sub.add_parser("init", help="create a new data directory (keys, database, admin client)")
    _settings_options(p_init)

    p_serve = sub.add_parser("serve", help="serve the FHIR API (initialises the data directory on first run)")
    _settings_options(p_serve, server=True)

    p_client = sub.add_parser("client", help="manage OAuth clients")
    client_sub = p_client.add_subparsers(dest="client_command", required=True)
    p_create = client_sub.add_parser("create", help="register a client and print its credentials as JSON")
    _settings_options(p_create)
    p_create.add_argument("--name", required=True, help="a label for people reading lists and audit records")
    p_create.add_argument("--scope", required=True, help='SMART scopes, e.g. "system/*.cruds"')
    p_create.add_argument("--jwks-file", type=Path, help="public JWK Set for private_key_jwt authentication")
    p_create.add_argument("--no-secret", action="store_true", help="private_key_jwt only (needs --jwks-file)")
    p_create.add_argument("--allowed-source", dest="allowed_sources", action="append", default=[],
                          metavar="CIDR", help="address or CIDR the client may call from (repeatable;"
                          " default: anywhere)")
    p_create.add_argument("--owner", help="the person or team answering for this client (required for clinical"
                          " scopes in production mode; recorded in the record of processing)")
    p_create.add_argument("--purpose", help="what the client is for (required with --owner)")

    p_keys = sub.add_parser("keys", help="key management")
    keys_sub = p_keys.add_subparsers(dest="keys_command", required=True)
    p_rot = keys_sub.add_parser("rotate", help="rotate the root key or the tenant key (re-wraps, no re-encryption)")
    _settings_options(p_rot)
    p_rot.add_argument("--level", choices=["root", "tenant"], required=True,
                       help="root: new root key file key; tenant: new tenant key (data keys re-wrapped)")

    from fhirvault.cli import audit as audit_cli

    audit_cli.register(sub, _settings_options)
    backup_cli.register(sub, _settings_options)
    from fhirvault.cli import move as move_cli

    move_cli.register(sub, _settings_options)
    migrate_cli.register(sub, _settings_options)
    from fhirvault.cli import terminology as terminology_cli

    terminology_cli.register(sub, _settings_options)
    from fhirvault.cli import compliance as compliance_cli
    from fhirvault.cli import register as register_cli

    register_cli.register(sub, _settings_options)
    compliance_cli.register(sub, _settings_options)
    archive_cli.register(sub, _settings_options)
    users_cli.register(sub, _settings_options, client_sub)  # user …, client create-app
    clients_cli.register(client_sub, _settings_options)  # client list|disable|enable|rotate-secret
    from fhirvault.cli import retention as retention_cli
    from fhirvault.cli import tenant as tenant_cli

    retention_cli.register(sub, _settings_options)  # retention run, patient erase|restrict|hold…
    tenant_cli.register(sub, _settings_options)  # tenant purge, tenant verify-certificate
    return parser


def _load(args: argparse.Namespace) -> Settings:
    names = ("data_dir", "root_key_file", "host", "port", "tls_cert", "tls_key", "public_base_url", "log_level",
             "workers")
    cli: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return load_settings(cli, config_file=args.config_file)


def _load_existing(args: argparse.Namespace) -> Settings:
    """Settings for a command that works on an existing data directory (all but init and serve)."""
    settings = _load(args)
    # On PostgreSQL the data directory holds the keys; the database is checked when it is opened.
    marker = settings.database_path if settings.database_url is None else settings.root_key_path
    if not marker.is_file():
        raise SettingsError(f"data directory missing or not initialised: {settings.data_dir} (no "
                            f"{marker.name}); check --data-dir, or run 'fhirvault init'")
    from fhirvault.cli import live

    live.check(settings, args)  # refuses what must not run under a live server
    return settings


def _fail(message: str, code: int = 2) -> int:
    print(f"fhirvault: error: {message}", file=sys.stderr)
    return code


def _operator_error(exc: Exception) -> str | None:
    """One line for an error the operator can fix; None for a bug, which keeps its traceback."""
    if isinstance(exc, ImportError):
        return f"{exc}: the installation is incomplete; reinstall fhirvault (pip install --force-reinstall fhirvault)"
    from fhirvault.adapters.memory_keys import RootKeyError
    from fhirvault.bootstrap import InitError
    from fhirvault.cli.serve import ServeError
    from fhirvault.ports import SchemaError

    if isinstance(exc, SettingsError | InitError | ServeError | RootKeyError | SchemaError):
        return str(exc)
    from fhirvault.adapters.database_errors import DATABASE_ERRORS, describe

    if isinstance(exc, DATABASE_ERRORS):
        return f"database error: {describe(exc)}"
    if isinstance(exc, OSError):
        return str(exc)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    umask = os.umask(0o077)  # every file this command creates (databases, their WAL, logs, backups): owner only
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = _operator_error(exc)
        if message is None:
            raise
        return _fail(message)
    finally:
        os.umask(umask)  # for callers that run main() in their own process (tests)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in backup_cli.COMMANDS:
        return backup_cli.run(args, _load_existing)
    if args.command == "tenant" and args.tenant_command == "verify-certificate":
        from fhirvault.cli import tenant as tenant_cli

        return tenant_cli.verify(args)
    if args.command == "archive":  # verify needs no data directory; import makes a new one
        return archive_cli.run(args, _load, _load_existing)
    new_dir_ok = args.command in ("init", "serve")
    settings = _load(args) if new_dir_ok else _load_existing(args)
    if args.command == "init":
        return _init(settings)
    if args.command == "serve":
        from fhirvault.cli.serve import serve

        return serve(settings)
    if users_cli.handles(args):
        return users_cli.run(args, settings)
    if clients_cli.handles(args):
        return clients_cli.run(args, settings)
    if args.command == "client":
        return _client_create(settings, args)
    if args.command == "migrate":
        return migrate_cli.run(args, settings)
    if args.command == "keys":
        return _rotate(settings, args.level)
    if args.command == "audit":
        from fhirvault.cli import audit as audit_cli

        return audit_cli.run(args, settings)
    if args.command == "terminology":
        from fhirvault.cli import terminology as terminology_cli

        return terminology_cli.run(args, settings)
    if args.command == "register":
        from fhirvault.cli import register as register_cli

        return register_cli.run(args, settings)
    if args.command == "compliance":
        from fhirvault.cli import compliance as compliance_cli

        return compliance_cli.run(args, settings)
    if args.command == "move":
        from fhirvault.cli import move as move_cli

        return move_cli.run(args, settings)
    if args.command in ("retention", "patient"):
        from fhirvault.cli import retention as retention_cli

        return retention_cli.run(args, settings)
    if args.command == "tenant":
        from fhirvault.cli import tenant as tenant_cli

        return tenant_cli.run(args, settings)
    return _fail("unknown command")


def _init(settings: Settings) -> int:
    from fhirvault.bootstrap import InitError, initialise

    try:
        path = initialise(settings)
    except InitError as exc:
        return _fail(str(exc))
    print(f"Initialised {settings.data_dir}; admin client credentials written to {path}")
    return 0


def _client_create(settings: Settings, args: argparse.Namespace) -> int:
    from fhirvault.container import build
    from fhirvault.domain.scopes import ScopeError

    jwks = None
    if args.jwks_file is not None:
        try:
            jwks = json.loads(args.jwks_file.read_text())
        except (OSError, ValueError) as exc:
            return _fail(f"cannot read JWK Set: {exc}")
    from fhirvault.services.client_owners import ClientOwner, OwnerError, check_owner, set_owner
    from fhirvault.services.registers import has_clinical_scopes

    owner: ClientOwner | None = None
    try:
        if args.owner is not None or args.purpose is not None:
            owner = check_owner(args.owner, args.purpose)
        elif settings.mode == "production" and has_clinical_scopes(args.scope):
            check_owner(None, None)  # separation of duties: refused, with the reason
    except OwnerError as exc:
        return _fail(str(exc))
    try:
        container = build(settings)
    except Exception as exc:  # a missing or uninitialised data dir, a wrong key file
        return _fail(str(exc))
    try:
        client = container.auth.register_client(args.name, args.scope, jwks=jwks, with_secret=not args.no_secret,
                                                allowed_sources=args.allowed_sources)
        if owner is not None:
            container.store.write_sync("clients.owner", lambda tx: set_owner(tx, client.client_id, owner))
        container.audit.record_system_event(container.store, container.clock, "user-change",
                                            f"client {client.client_id} created with scope {client.scope}"
                                            + (f"; owner {owner.owner}, purpose {owner.purpose}" if owner else ""))
    except ScopeError as exc:
        return _fail(str(exc))
    finally:
        container.close()
    out: dict[str, Any] = {"client_id": client.client_id, "name": client.name, "scope": client.scope}
    if client.allowed_sources is not None:
        out["allowed_sources"] = client.allowed_sources.split()
    if owner is not None:
        out["owner"], out["purpose"] = owner.owner, owner.purpose
    if client.client_secret is not None:
        out["client_secret"] = client.client_secret
    print(json.dumps(out, indent=2))
    return 0


def _rotate(settings: Settings, level: str) -> int:
    from fhirvault.keyrotation import rotate_root_key, rotate_tenant_key

    if level == "root":
        new_id = rotate_root_key(settings)
        print(f"root key rotated; new root key id {new_id}; tenant keys and token signing key re-wrapped")
    else:
        version = rotate_tenant_key(settings)
        print(f"tenant key rotated to version {version}; data keys re-wrapped")
    print("A running server keeps the keys it loaded at start: restart it now"
          " (e.g. 'systemctl restart fhirvault'), then check /readyz.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
