"""``fhirvault client list|disable|enable|rotate-secret``: look after registered OAuth clients.

A leaked ``admin-client.json`` is revoked with ``client rotate-secret`` (new secret, the old
one and every token it got stop working) or ``client disable``. Each change is written to
the audit trail in the same transaction (never the secret).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fhirvault.config import Settings

COMMANDS = ("list", "disable", "enable", "rotate-secret", "set-owner")


def register(client_sub: Any, settings_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = client_sub.add_parser("list", help="list the registered OAuth clients and SMART apps (no secrets)")
    settings_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per client")
    for name, text in (
        ("disable", "refuse the client from now on: new tokens, and the tokens it already holds (within a second)"),
        ("enable", "accept a disabled client again (tokens from before it was disabled stay dead)"),
        ("rotate-secret", "give the client a new secret, printed once; the old secret and its tokens stop working"),
    ):
        q = client_sub.add_parser(name, help=text)
        settings_options(q)
        q.add_argument("--client-id", dest="client_id", required=True,
                       help="the client's id (fv-…), as shown by 'fhirvault client list'")
    q = client_sub.add_parser("set-owner", help="name the person or team answering for a client, and its purpose"
                              " (required for clinical scopes in production mode)")
    settings_options(q)
    q.add_argument("--client-id", dest="client_id", required=True, help="the client's id (fv-…)")
    q.add_argument("--owner", required=True, help="the person or team answering for the client")
    q.add_argument("--purpose", required=True, help="what the client is for")


def handles(args: argparse.Namespace) -> bool:
    return args.command == "client" and getattr(args, "client_command", None) in COMMANDS


def _fail(message: str, code: int = 2) -> int:
    print(f"fhirvault: error: {message}", file=sys.stderr)
    return code


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from fhirvault.container import build

    try:
        container = build(settings)
    except Exception as exc:  # a missing or uninitialised data dir, a wrong key file
        return _fail(str(exc))
    try:
        if args.client_command == "list":
            return _list(container, settings, json_output=args.json)
        if args.client_command == "set-owner":
            return _set_owner(container, args.client_id, args.owner, args.purpose)
        return _change(container, settings, args.client_command, args.client_id)
    finally:
        container.close()


def _list(container: Any, settings: Settings, *, json_output: bool) -> int:
    from fhirvault.services.client_owners import owner_of

    rows = []
    for c in container.store.clients(settings.tenant):
        app = container.store.app(c.client_id)
        auth = "secret" if c.secret_hash else "private_key_jwt" if c.jwks else "none (public, PKCE)"
        owner = owner_of(container.store, c.client_id)
        rows.append({"client_id": c.client_id, "name": c.name, "kind": "smart-app" if app else "service",
                     "authentication": auth, "scope": c.scopes, "created": _iso(c.created_ms),
                     "disabled": c.disabled, "owner": owner.owner if owner else None,
                     "purpose": owner.purpose if owner else None})
    if json_output:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'CLIENT':24} {'STATE':9} {'KIND':10} {'CREATED (UTC)':21} NAME")
    for row in rows:
        state = "disabled" if row["disabled"] else "active"
        print(f"{row['client_id']:24} {state:9} {row['kind']:10} {row['created']:21} {row['name']}")
    return 0


def _set_owner(container: Any, client_id: str, owner_text: str, purpose: str) -> int:
    from fhirvault.services.audit import AuditRecord
    from fhirvault.services.client_owners import OwnerError, check_owner, set_owner

    try:
        owner = check_owner(owner_text, purpose)
    except OwnerError as exc:
        return _fail(str(exc))
    if container.store.client(client_id) is None:
        return _fail(f"no client {client_id} (see 'fhirvault client list')")
    event = AuditRecord(container.clock.now_ms(), "user-change", "0", 200, "-", client_id=client_id,
                        detail=f"client {client_id}: owner {owner.owner}, purpose {owner.purpose}", category="system")

    def job(tx: Any) -> None:
        set_owner(tx, client_id, owner)
        container.audit.record(tx, event)

    container.store.write_sync("clients.owner", job)
    print(f"client {client_id}: owner {owner.owner}, purpose {owner.purpose}")
    return 0


def _change(container: Any, settings: Settings, command: str, client_id: str) -> int:
    from fhirvault.ports import ClientRow, WriteTx
    from fhirvault.services.audit import AuditRecord

    def audit(interaction: str, detail: str) -> Callable[[WriteTx, ClientRow], None]:
        def record(tx: WriteTx, row: ClientRow) -> None:
            event = AuditRecord(container.clock.now_ms(), interaction, "0", 200, "-", client_id=row.client_id,
                                detail=detail, category="system")
            container.audit.record(tx, event)
        return record

    auth = container.auth
    try:
        if command == "rotate-secret":
            secret = auth.rotate_client_secret(client_id, also=audit("key-change", f"client {client_id}: secret rotated"))
        else:
            disabled = command == "disable"
            auth.set_client_disabled(client_id, disabled, also=audit("user-change", f"client {client_id}: {command}d"))
    except KeyError:
        return _fail(f"no client {client_id} (see 'fhirvault client list')")
    except ValueError as exc:
        return _fail(str(exc))
    if command != "rotate-secret":
        print(f"client {client_id} {command}d" + (
            "; the tokens it holds stop working within a second, also in a running server" if disabled else ""))
        return 0
    print(json.dumps({"client_id": client_id, "client_secret": secret}, indent=2))
    print("The new secret is shown once. The old secret and every token obtained with it no longer work.",
          file=sys.stderr)
    _update_admin_file(settings, client_id, secret)
    return 0


def _update_admin_file(settings: Settings, client_id: str, secret: str) -> None:
    """The data directory's admin-client.json follows a rotation of the admin client's secret."""
    from fhirvault.adapters.keyfile import write_private_file
    from fhirvault.bootstrap import ADMIN_CLIENT_FILE

    path = settings.data_dir / ADMIN_CLIENT_FILE
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(current, dict) and current.get("client_id") == client_id:
        current["client_secret"] = secret
        write_private_file(path, json.dumps(current, indent=2).encode() + b"\n")
        print(f"{path} updated with the new secret (mode 0600).", file=sys.stderr)
