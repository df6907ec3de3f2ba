"""``fhirvault tenant purge`` (end of contract) and ``fhirvault tenant verify-certificate``.

Stop the server first. The purge is irreversible: it needs ``--yes-destroy-all-data TENANT`` (the
tenant's name typed again) and a reason; it writes the signed deletion certificate (JSON and text) into
``--certificate-dir`` (default: the data directory). Exit codes: 0 purged, 2 bad usage, 3 refused (a
legal hold), 1 a certificate that does not verify.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fhirvault.config import Settings


def register(sub: Any, settings_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("tenant", help="end of contract: purge a tenant, verify its deletion certificate")
    tsub = p.add_subparsers(dest="tenant_command", required=True)
    purge = tsub.add_parser("purge", help="destroy every key of the tenant (crypto-shredding) and sign a "
                                          "deletion certificate; irreversible")
    settings_options(purge)
    purge.add_argument("--yes-destroy-all-data", metavar="TENANT", required=True,
                       help="confirmation: the tenant's name (see 'tenant' in fhirvault.toml; default 'default')")
    purge.add_argument("--reason", required=True, help="why (e.g. the contract reference); in the certificate")
    purge.add_argument("--operator", default=None, help="who runs it (default: the OS user)")
    purge.add_argument("--certificate-dir", type=Path, default=None, help="where to write the certificate")
    purge.add_argument("--destroy-root-key", action="store_true",
                       help="also overwrite and delete the root key file (single-tenant deployments): backups then "
                            "open only with an escrow copy of the root key")
    verify = tsub.add_parser("verify-certificate", help="check a deletion certificate's signature")
    verify.add_argument("file", type=Path, help="the certificate's JSON file")


def verify(args: argparse.Namespace) -> int:
    from fhirvault.services.tenant_purge import verify_certificate

    try:
        body = verify_certificate(json.loads(args.file.read_bytes()))
    except (ValueError, OSError) as exc:
        print(f"fhirvault: certificate NOT valid: {exc}", file=sys.stderr)
        return 1
    print(f"certificate valid: tenant {body['tenant']} purged at {body['purged_at']} on instance "
          f"{body['instance_id']}; {body['destroyed']['data_keys']} data keys destroyed")
    return 0


def _backups(settings: Settings) -> Callable[[], dict[str, list[str]]]:
    def listing() -> dict[str, list[str]]:
        from fhirvault.backup.engine import BackupError, Retry, list_backups
        from fhirvault.backup.targets import open_target

        out: dict[str, list[str]] = {}
        if settings.backup is not None:
            for name in settings.backup.targets:
                target = open_target(name, settings.backup)
                try:
                    out[target.url] = [m.backup_id for m in list_backups(target, Retry((1.0,))).manifests]
                except BackupError as exc:  # the certificate says it could not list them; the ledger still applies
                    print(f"warning: cannot list the backups on {target.url}: {exc}", file=sys.stderr)
                    out[f"{target.url} (unreachable at purge time)"] = []
        return out

    return listing


def run(args: argparse.Namespace, settings: Settings) -> int:
    from fhirvault.container import build
    from fhirvault.services.erasure import check_reason
    from fhirvault.services.tenant_purge import PurgeRefused, purge_tenant

    if args.tenant_command == "verify-certificate":
        return verify(args)
    if args.yes_destroy_all_data != settings.tenant:
        print(f"fhirvault: error: --yes-destroy-all-data must name the tenant ('{settings.tenant}')", file=sys.stderr)
        return 2
    from fhirvault.domain.errors import OperationOutcomeError

    try:
        reason = check_reason(args.reason)
    except OperationOutcomeError as exc:
        print(f"fhirvault: error: {exc.issues[0].diagnostics}", file=sys.stderr)
        return 2
    container = build(settings)
    try:
        result = purge_tenant(container, reason=reason, operator=args.operator or getpass.getuser(),
                              out_dir=args.certificate_dir or settings.data_dir,
                              destroy_root_key=args.destroy_root_key, backups=_backups(settings))
    except PurgeRefused as exc:
        print(f"fhirvault: refused: {exc}", file=sys.stderr)
        return 3
    finally:
        container.close()
    print(f"tenant {settings.tenant} purged: {result.certificate['certificate']['destroyed']['data_keys']} data keys "
          f"and the tenant key destroyed; certificate: {result.json_path} and {result.text_path}")
    return 0
