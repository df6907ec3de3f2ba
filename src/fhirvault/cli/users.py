"""``fhirvault user …`` (people who log in) and ``fhirvault client create-app`` (SMART apps)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fhirvault.config import Settings
from fhirvault.services.identity_types import ROLES

USER_COMMANDS = ("create", "disable", "enable", "unlock", "reset-totp", "set-password", "link", "list")


def register(sub: Any, settings_options: Callable[[argparse.ArgumentParser], None],
             client_sub: Any | None = None) -> None:
    p_user = sub.add_parser("user", help="manage user accounts (login, roles, second factor)")
    user_sub = p_user.add_subparsers(dest="user_command", required=True)
    p = user_sub.add_parser("create", help="create a user; prints the TOTP enrolment URI once for professionals")
    settings_options(p)
    p.add_argument("--username", required=True, help="the login name")
    p.add_argument("--role", required=True, choices=ROLES, help="what the person may do (see docs/access-control.md)")
    p.add_argument("--fhir-user", dest="fhir_user", help="e.g. Practitioner/123 or Patient/abc (patients: required)")
    p.add_argument("--org", help="the user's Organization id")
    p.add_argument("--clearance", action="append", default=[], choices=["R", "V"],
                   help="confidentiality codes this user may read (repeatable)")
    p.add_argument("--password-file", dest="password_file", type=Path,
                   help="file whose first line is the password (default: read it from stdin)")
    p.add_argument("--no-password", action="store_true", help="federated login only")
    for name, text in (("disable", "refuse all logins"), ("enable", "allow logins again"),
                       ("unlock", "clear failed-login back-off and lockout"),
                       ("reset-totp", "enrol a new TOTP secret (prints the otpauth:// URI once)"),
                       ("set-password", "set a new password (from --password-file or stdin)")):
        q = user_sub.add_parser(name, help=text)
        settings_options(q)
        q.add_argument("--username", required=True, help="the login name")
        if name == "set-password":
            q.add_argument("--password-file", dest="password_file", type=Path,
                           help="file whose first line is the password (default: read it from stdin)")
    q = user_sub.add_parser("link", help="link an external identity (OIDC provider, issuer, subject) to a user")
    settings_options(q)
    q.add_argument("--username", required=True, help="the local user to link")
    q.add_argument("--provider", required=True, help="the provider's name in [[identity_providers]]")
    q.add_argument("--issuer", required=True, help="the provider's issuer URL (the iss claim)")
    q.add_argument("--subject", required=True, help="the person's id at that provider (the sub claim)")
    q = user_sub.add_parser("list", help="list users (no secrets)")
    settings_options(q)
    if client_sub is not None:
        c = client_sub.add_parser("create-app", help="register a SMART app (authorization code + PKCE)")
        settings_options(c)
        c.add_argument("--name", required=True, help="a label for the app (lists, audit records)")
        c.add_argument("--scope", required=True,
                       help='e.g. "openid fhirUser launch/patient offline_access patient/*.rs user/*.rs"')
        c.add_argument("--redirect-uri", dest="redirect_uri", action="append", required=True,
                       help="exact redirect URI (repeatable)")
        c.add_argument("--public", action="store_true", help="public client (no secret; PKCE protects it)")
        c.add_argument("--jwks-file", dest="jwks_file", type=Path, help="JWK Set for private_key_jwt")


def handles(args: argparse.Namespace) -> bool:
    return args.command == "user" or (args.command == "client"
                                      and getattr(args, "client_command", None) == "create-app")


def _fail(message: str) -> int:
    print(f"fhirvault: error: {message}", file=sys.stderr)
    return 2


def _password(path: Path | None) -> str:
    if path is not None:
        return path.read_text().splitlines()[0] if path.read_text() else ""
    if sys.stdin.isatty():
        return getpass.getpass("Password: ")
    return sys.stdin.readline().rstrip("\r\n")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from fhirvault.container import build
    from fhirvault.domain.scopes import ScopeError
    from fhirvault.services.users import TOTP_KEY_NAME, UserError, UserService

    try:
        container = build(settings)
    except Exception as exc:  # a missing or uninitialised data dir, a wrong key file
        return _fail(str(exc))
    try:
        if args.command == "client":
            jwks = json.loads(args.jwks_file.read_text()) if args.jwks_file else None
            app = container.auth.register_app(args.name, args.scope, list(args.redirect_uri), public=args.public,
                                              jwks=jwks)
            out: dict[str, Any] = {"client_id": app.client_id, "name": app.name, "scope": app.scope,
                                   "redirect_uris": list(args.redirect_uri), "public": bool(args.public)}
            if app.client_secret is not None:
                out["client_secret"] = app.client_secret
            print(json.dumps(out, indent=2))
            return 0
        users = UserService(container.store, container.clock, container.secrets.get(TOTP_KEY_NAME),
                            tenant=settings.tenant)
        cmd = args.user_command

        def audit(detail: str) -> None:  # account administration leaves a trace (never secrets)
            container.audit.record_system_event(container.store, container.clock, "user-admin", detail)

        if cmd == "create":
            password = None if args.no_password else _password(args.password_file)
            created = users.create(args.username, args.role, password, fhir_user=args.fhir_user,
                                   organization=args.org, clearances=frozenset(args.clearance))
            audit(f"user {created.user.user_id} created with role {created.user.role}")
            print(json.dumps({"user_id": created.user.user_id, "username": created.user.username,
                              "role": created.user.role}, indent=2))
            if created.totp_uri:
                print("Second factor (shown once; scan it into an authenticator app):", file=sys.stderr)
                print(created.totp_uri)
            return 0
        if cmd == "list":
            for u in container.store.users(settings.tenant):
                print(json.dumps({"user_id": u.user_id, "username": u.username, "role": u.role,
                                  "fhir_user": u.fhir_user, "disabled": u.disabled,
                                  "locked": u.locked_until_ms == -1, "totp": u.totp is not None}))
            return 0
        if cmd in ("disable", "enable"):
            ended = users.set_disabled(args.username, cmd == "disable")
            if ended:
                print(f"{ended} login session(s) ended; their tokens are revoked")
        elif cmd == "unlock":
            users.unlock(args.username)
        elif cmd == "reset-totp":
            uri = users.reset_totp(args.username)
            audit(f"user {users.account_key(args.username)}: reset-totp")
            print(uri)
            return 0
        elif cmd == "set-password":
            users.set_password(args.username, _password(args.password_file))
        elif cmd == "link":
            users.link(args.username, args.provider, args.issuer, args.subject)
        audit(f"user {users.account_key(args.username)}: {cmd}")
        print(f"user {args.username}: {cmd} done")
        return 0
    except (UserError, ScopeError) as exc:
        return _fail(str(exc))
    except (OSError, ValueError) as exc:
        return _fail(f"cannot read input: {exc}")
    finally:
        container.close()
