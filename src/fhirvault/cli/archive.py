"""``fhirvault archive export|verify|import``: the reversibility archive (services/archive.py)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fhirvault.config import Settings

LoadSettings = Callable[[argparse.Namespace], Settings]

WARNING = """\
WARNING: the reversibility archive is NOT encrypted. It holds every patient's health data, the full
audit trail and the user list, in clear, in {path}. Write it only to encrypted storage you control,
hand it over through a secure channel, and delete it once it has been received and verified.
"""


def register(sub: Any, settings_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("archive", help="reversibility archive: a whole tenant in open formats, signed")
    archive_sub = p.add_subparsers(dest="archive_command", required=True)
    p_export = archive_sub.add_parser("export", help="write the tenant (plaintext!) into a new directory")
    settings_options(p_export)
    p_export.add_argument("--out", type=Path, required=True, help="a new (or empty) directory to write")
    p_export.add_argument("--yes-plaintext", action="store_true",
                          help="confirm that writing health data in clear to --out is intended (required)")
    p_verify = archive_sub.add_parser("verify", help="check an archive: signature, hashes, counts, audit trail")
    p_verify.add_argument("archive", type=Path, help="the archive directory")
    p_verify.add_argument("--fingerprint", help="the signing key fingerprint the sender gave you out of band")
    p_verify.add_argument("--json", action="store_true", help="print the report as JSON")
    p_verify.add_argument("--audit-only", action="store_true",
                          help="a historical audit segment (DATA_DIR/archived-audit/…) kept by an import")
    p_segments = archive_sub.add_parser(
        "verify-segments", help="open and verify the old audit trails an archive import kept (sealed)")
    settings_options(p_segments)
    p_import = archive_sub.add_parser("import", help="load an archive into a fresh data directory")
    settings_options(p_import)
    p_import.add_argument("archive", type=Path, help="the archive directory")
    p_import.add_argument("--fingerprint", help="refuse the archive unless signed by this key")


def run(args: argparse.Namespace, load: LoadSettings, load_existing: LoadSettings) -> int:
    from fhirvault.services.archive import ArchiveError

    try:
        if args.archive_command == "verify":
            return _verify(args)
        if args.archive_command == "verify-segments":
            return _verify_segments(load_existing(args))
        if args.archive_command == "export":
            return _export(args, load_existing(args))
        return _import(args, load(args))
    except ArchiveError as exc:
        print(f"fhirvault: error: {exc}", file=sys.stderr)
        return 1


def _export(args: argparse.Namespace, settings: Settings) -> int:
    from fhirvault.container import build
    from fhirvault.ports import LostLeadership
    from fhirvault.services.archive import export_archive, record_export

    out: Path = args.out
    print(WARNING.format(path=out.resolve()), file=sys.stderr)
    if not args.yes_plaintext:
        print("fhirvault: error: add --yes-plaintext to confirm", file=sys.stderr)
        return 2
    container = build(settings)
    try:
        record_export(container, getpass.getuser())
        try:  # a signed (and witnessed) tree head covering the export's own entry, so the archive ends on one
            container.checkpointer.step(force=True, witness=True)
        except LostLeadership:
            print("note: a running server signs the audit checkpoints; the archive ends on its last one",
                  file=sys.stderr)
        result = export_archive(container, out)
    finally:
        container.close()
    print(json.dumps({"archive": str(result.path), "resources": result.resources, "versions": result.versions,
                      "audit_entries": result.audit_entries, "seconds": round(result.seconds, 2),
                      "signing_key_fingerprint": result.fingerprint}, indent=2))
    print(f"Give the recipient this fingerprint through another channel: {result.fingerprint}", file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from fhirvault.services.archive import verify_archive

    report = verify_archive(args.archive, args.fingerprint, audit_only=args.audit_only)
    if args.json:
        audit = report.audit.to_dict() if report.audit else None
        print(json.dumps({"ok": report.ok, "problems": report.problems, "fingerprint": report.fingerprint,
                          "manifest_sha256": report.manifest_sha256, "counts": report.manifest.get("counts"),
                          "audit": audit}, indent=2))
    elif report.ok:
        assert report.audit is not None
        counts = report.manifest.get("counts", {})
        print(f"archive OK: signed by {report.fingerprint}; {counts.get('resources')} resources, "
              f"{counts.get('versions')} versions; {report.audit.summary()}")
        if args.fingerprint is None:
            print("note: compare the fingerprint above with the one the sender gave you (or pass --fingerprint)",
                  file=sys.stderr)
    else:
        print(f"archive FAILED: {report.problems[0]}")
        for problem in report.problems[1:20]:
            print("  also: " + problem)
    return 0 if report.ok else 1


def _verify_segments(settings: Settings) -> int:
    from fhirvault.container import build
    from fhirvault.services.archive import verify_segments

    container = build(settings)
    try:
        reports = verify_segments(container)
    finally:
        container.close()
    if not reports:
        print("no archived audit segments")
    for sha, report in reports:
        if report.ok:
            assert report.audit is not None
            print(f"segment {sha}: OK, signed by {report.fingerprint}; {report.audit.summary()}")
        else:
            print(f"segment {sha}: FAILED: {report.problems[0]}")
    return 0 if all(r.ok for _, r in reports) else 1


def _import(args: argparse.Namespace, settings: Settings) -> int:
    from fhirvault.bootstrap import data_dir_is_new, initialise
    from fhirvault.container import build
    from fhirvault.services.archive import import_archive

    if data_dir_is_new(settings.data_dir):
        initialise(settings)
        print(f"initialised {settings.data_dir} (admin credentials in admin-client.json)", file=sys.stderr)
    container = build(settings)
    try:
        result = import_archive(container, args.archive, expected_fingerprint=args.fingerprint)
    finally:
        container.close()
    print(json.dumps({"resources": result.resources, "versions": result.versions, "users": result.users,
                      "clients": result.clients, "seconds": round(result.seconds, 2),
                      "archive_manifest_sha256": result.manifest_sha256}, indent=2))
    print("Users have no password or MFA yet (fhirvault user set-password, user reset-totp); clients need new secrets (fhirvault client rotate-secret).",
          file=sys.stderr)
    return 0
