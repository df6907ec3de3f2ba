"""``fhirvault backup create|list|verify|restore|prune``, ``fhirvault dr drill``, ``fhirvault escrow``.

Exit codes: 0 success, 1 the operation ran and failed (verification, drill
mismatch, unusable backup), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fhirvault.config import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from fhirvault.backup.ports import RestoreSink
    from fhirvault.backup.settings import BackupSettings
    from fhirvault.backup.target import BackupTarget
    from fhirvault.ports import RootKeyProvider

COMMANDS = ("backup", "dr", "escrow")
SettingsOptions = Callable[[argparse.ArgumentParser], None]
LoadSettings = Callable[[argparse.Namespace], Settings]


class CliError(Exception):
    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# -- parser ---------------------------------------------------------------------------------------
def _target_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--target", required=required, default="",
                   help="configured target name, file:///path or s3://bucket/prefix")
    p.add_argument("--location", help="ISO country code where an unconfigured target stores data, e.g. FR")
    p.add_argument("--allow-outside-eea", action="store_true", help="accept a target located outside the EEA")
    p.add_argument("--backup-config", type=Path,
                   help="TOML file whose [backup] section defines targets and retention")


def _recovery_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recovery-file", type=Path, help="passphrase-protected recovery file (from escrow export)")
    p.add_argument("--share", action="append", type=Path, default=[], help="a recovery share file (repeat M times)")
    p.add_argument("--passphrase-file", type=Path, help="file holding the recovery passphrase ('-' for stdin)")


def register(sub: Any, settings_options: SettingsOptions) -> None:
    """Add the backup, dr and escrow commands to the ``fhirvault`` parser."""
    p_backup = sub.add_parser("backup", help="encrypted backups: create, list, verify, restore, prune")
    bsub = p_backup.add_subparsers(dest="backup_command", required=True)

    p = bsub.add_parser("create", help="take an online backup of the data directory")
    settings_options(p)
    _target_options(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--full", action="store_true",
                   help="copy the whole database even when a small incremental (delta) backup would do")

    p = bsub.add_parser("list", help="list the complete backups on a target")
    _target_options(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (backups oldest first, unreadable manifests) for scripts")

    p = bsub.add_parser("verify", help="re-read every chunk of a backup and check hashes and signature")
    settings_options(p)
    _target_options(p)
    _recovery_options(p)
    p.add_argument("--backup", dest="backup_id", help="backup id (default: the newest)")

    p = bsub.add_parser("restore", help="rebuild a data directory from a backup")
    _target_options(p)
    _recovery_options(p)
    p.add_argument("--to", required=True, type=Path, help="new data directory (must not exist or be empty)")
    p.add_argument("--root-key-file", dest="restore_root_key", type=Path, help="the deployment's root key file")
    p.add_argument("--allow-missing-erasure-ledger", action="store_true",
                   help="restore although the target holds no erasure ledger (erased patients could come back)")
    p.add_argument("--erasure-ledger", type=Path, metavar="FILE",
                   help="a copy of the erasure ledger (the data directory's erasure-ledger.json, or from escrow), "
                        "merged with the target's; needed when the target has none")
    p.add_argument("--backup", dest="backup_id", help="backup id (default: the newest)")
    p.add_argument("--at", help="point in time, ISO 8601 with a time zone, e.g. 2026-11-29T03:00:00Z")
    p.add_argument("--database-url", help="a deployment on PostgreSQL: restore its tables into this new, empty "
                                          "database (password from ~/.pgpass or PGPASSWORD, not the URL)")

    p = bsub.add_parser("prune", help="apply the retention policy and delete unreferenced chunks")
    settings_options(p)
    _target_options(p)
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    p.add_argument("--grace", help="override the grace period for unreferenced chunks, e.g. 1h or 0")

    p_dr = sub.add_parser("dr", help="disaster recovery")
    dsub = p_dr.add_subparsers(dest="dr_command", required=True)
    p = dsub.add_parser("drill", help="restore into a scratch directory, serve it, compare, report RPO/RTO")
    settings_options(p)
    _target_options(p)
    p.add_argument("--backup", dest="backup_id", help="backup id (default: the newest)")
    p.add_argument("--at", help="point in time, ISO 8601 with a time zone")
    p.add_argument("--report-dir", type=Path, default=Path("."), help="where to write the JSON and text report")
    p.add_argument("--scratch-dir", type=Path, help="where to create the scratch directory (default: $TMPDIR)")
    p.add_argument("--keep-scratch", action="store_true",
                   help="keep the scratch data directory (and database) afterwards (to inspect it; delete it yourself)")
    p.add_argument("--scratch-url", help="PostgreSQL: a server (any database on it, a role with CREATEDB) where the "
                   "drill creates and drops its scratch database (default: the deployment's own server)")

    p_esc = sub.add_parser("escrow", help="export or recover the root key (key escrow)")
    esub = p_esc.add_subparsers(dest="escrow_command", required=True)
    p = esub.add_parser("export", help="export the root key under a passphrase and/or as M-of-N shares")
    settings_options(p)
    p.add_argument("--out", type=Path, help="write a passphrase-protected recovery file here")
    p.add_argument("--passphrase-file", type=Path, help="file holding the passphrase ('-' for stdin)")
    p.add_argument("--generate-passphrase", action="store_true", help="generate a strong passphrase and print it once")
    p.add_argument("--shares", type=int, help="split into this many shares (N)")
    p.add_argument("--threshold", type=int, help="shares needed to recover (M)")
    p.add_argument("--out-dir", type=Path, help="directory for the share files")
    p = esub.add_parser("recover", help="rebuild the root key file from recovery material")
    _recovery_options(p)
    p.add_argument("--out", type=Path, required=True, help="root key file to write (mode 0600)")


# -- helpers --------------------------------------------------------------------------------------
def _backup_settings(args: argparse.Namespace, settings: Settings | None) -> BackupSettings | None:
    from fhirvault.backup.settings import parse_backup_settings

    path: Path | None = getattr(args, "backup_config", None)
    if path is not None:
        try:
            with path.open("rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read backup config {path}: {exc}") from None
        return parse_backup_settings(doc.get("backup", {}), f"config file {path}")
    return settings.backup if settings is not None else None


def _target(args: argparse.Namespace, settings: Settings | None) -> BackupTarget:
    from fhirvault.backup.targets import open_target

    return open_target(args.target, _backup_settings(args, settings), location=args.location,
                       allow_outside_eea=args.allow_outside_eea)


def _retain_days(args: argparse.Namespace, settings: Settings | None) -> int:
    from fhirvault.backup.targets import resolve

    return resolve(args.target, _backup_settings(args, settings), location=args.location,
                   allow_outside_eea=args.allow_outside_eea).object_lock_days


def _passphrase(path: Path | None, *, confirm: bool = False) -> str:
    if path is not None:
        raw = sys.stdin.read() if str(path) == "-" else path.read_text()
        return raw.strip("\r\n")
    if not sys.stdin.isatty():
        raise CliError("no passphrase: pass --passphrase-file FILE (or '-' for stdin)")
    first = getpass.getpass("Recovery passphrase: ")
    if confirm and getpass.getpass("Again: ") != first:
        raise CliError("the passphrases differ")
    return first


def _recovered_key_file(args: argparse.Namespace) -> bytes | None:
    """Root key file bytes from --recovery-file or --share, or None if neither was given."""
    from fhirvault.backup.escrow import recover_passphrase, recover_shares

    if args.recovery_file is not None:
        return recover_passphrase(args.recovery_file.read_bytes(), _passphrase(args.passphrase_file))
    if args.share:
        return recover_shares([p.read_bytes() for p in args.share])
    return None


def _root_from_bytes(raw: bytes) -> RootKeyProvider:
    import base64
    import json

    from fhirvault.adapters.keyfile import KeyFileProvider

    doc = json.loads(raw)
    keys = {kid: base64.b64decode(k) for kid, k in doc["keys"].items()}
    return KeyFileProvider(Path(os.devnull), keys, doc["active"])


def _parse_at(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"--at {raw!r}: expected ISO 8601, e.g. 2026-11-29T03:00:00Z") from None
    if when.tzinfo is None:
        raise CliError(f"--at {raw!r}: give a time zone (Z or +01:00) so the instant is unambiguous")
    return int(when.timestamp() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _instance_id(settings: Settings) -> str:
    from fhirvault.backup.ports import SnapshotError
    from fhirvault.container import INSTANCE_META, snapshot_source

    try:
        with snapshot_source(settings).meta(read_only=True) as meta:
            value = meta.get_meta(INSTANCE_META)
    except SnapshotError:
        value = None
    if value is None:
        raise CliError(f"{settings.data_dir} is not an initialised data directory")
    return value.decode()


def _live_root(settings: Settings) -> RootKeyProvider:
    from fhirvault.adapters.keyfile import KeyFileProvider

    return KeyFileProvider.load(settings.root_key_path)


# -- commands -------------------------------------------------------------------------------------
def _create(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from fhirvault.backup.engine import create_backup
    from fhirvault.container import delta_feed_source, snapshot_source

    target = _target(args, settings)
    result = create_backup(settings.data_dir, target, _live_root(settings), retain_days=_retain_days(args, settings),
                           source=snapshot_source(settings), feed=delta_feed_source(settings), full=args.full)
    _audit(settings, "backup", f"backup {result.backup_id} to {target.url}: {result.uploaded_chunks}/"
                               f"{result.chunks} chunks uploaded")
    if args.json:
        print(json.dumps(result.__dict__))
    else:
        kind = "incremental backup" if result.incremental else "backup"
        print(f"{kind} {result.backup_id} complete on {target.url}: {result.size / 1e6:.1f} MB in {result.files} "
              f"files, {result.uploaded_chunks} of {result.chunks} chunks uploaded "
              f"({result.uploaded_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s")
    return 0


def _audit(settings: Settings, interaction: str, detail: str) -> None:
    """A system event in the data directory's audit trail (backup and restore runs are traced)."""
    from fhirvault.container import build

    container = build(settings)
    try:
        container.audit.record_system_event(container.store, container.clock, interaction, detail)
    finally:
        container.close()


def _list(args: argparse.Namespace) -> int:
    from fhirvault.backup.engine import list_backups

    target = _target(args, None)
    listing = list_backups(target)
    if args.json:
        import json

        backups = [{"backup_id": m.backup_id, "instance_id": m.instance_id, "snapshot": _iso(m.snapshot_ms),
                    "snapshot_ms": m.snapshot_ms, "created_ms": m.created_ms, "size_bytes": m.size,
                    "files": m.files_count} for m in listing.manifests]
        print(json.dumps({"target": target.url, "backups": backups, "problems": listing.problems}, indent=2))
        return 0
    print(f"{'BACKUP':32} {'SNAPSHOT (UTC)':25} {'SIZE':>10} INSTANCE")
    for m in reversed(listing.manifests):
        print(f"{m.backup_id:32} {_iso(m.snapshot_ms):25} {m.size / 1e6:>8.1f}MB {m.instance_id}")
    for problem in listing.problems:
        print(f"warning: unreadable manifest: {problem}", file=sys.stderr)
    if not listing.manifests:
        print(f"(no complete backup on {target.url})")
    return 0


def _verify(args: argparse.Namespace, load: LoadSettings) -> int:
    from fhirvault.backup.engine import verify_backup

    recovered = _recovered_key_file(args)
    instance: str | None = None
    settings: Settings | None = None
    if recovered is not None:
        root = _root_from_bytes(recovered)
    else:
        settings = load(args)
        root = _live_root(settings)
        instance = _instance_id(settings)
    target = _target(args, settings)
    result = verify_backup(target, root, args.backup_id, instance_id=instance)
    if result.ok:
        print(f"backup {result.backup_id} verified: signature OK, {result.chunks} chunks and "
              f"{result.bytes_read / 1e6:.1f} MB re-read, every hash matches")
        return 0
    print(f"backup {result.backup_id} FAILED verification:", file=sys.stderr)
    for p in result.problems:
        print(f"  {p}", file=sys.stderr)
    return 1


def _restore(args: argparse.Namespace) -> int:
    from fhirvault.backup.engine import default_replay, restore_backup

    target = _target(args, None)
    at_ms = _parse_at(args.at)
    key_file = _recovered_key_file(args)
    if key_file is None:
        if args.restore_root_key is None:
            raise CliError("restore needs the root key: --root-key-file FILE, --recovery-file FILE or --share FILE…")
        key_file = args.restore_root_key.read_bytes()
    replay = default_replay()
    if at_ms is not None and replay is None:
        print("warning: this build has no replication replay; restoring the newest backup taken before --at",
              file=sys.stderr)
    url: str | None = getattr(args, "database_url", None)
    sink = None
    if url is not None:
        from fhirvault.backup.replication import replay as replay_feed
        from fhirvault.container import restore_sink

        def sink(d: Path) -> RestoreSink:
            return restore_sink(d, url)

        def replay_into(target: BackupTarget, backup_key: bytes, data_dir: Path,
                        watermarks: dict[str, dict[str, int]], until_ms: int | None) -> object:
            return replay_feed(target, backup_key, data_dir, watermarks, until_ms, sink=restore_sink(data_dir, url))

        replay = replay_into
    extra = None
    if args.erasure_ledger is not None:
        from fhirvault.backup.erasure_ledger import LedgerError, decode

        try:
            extra = decode(args.erasure_ledger.read_bytes())
        except LedgerError as exc:
            raise CliError(f"{args.erasure_ledger}: {exc}") from None
    res = restore_backup(target, args.to, key_file, backup_id=args.backup_id, at_ms=at_ms, replay=replay, sink=sink,
                         allow_missing_ledger=args.allow_missing_erasure_ledger, erasure_entries=extra)
    if args.allow_missing_erasure_ledger:
        print("WARNING: restored without checking the erasure ledger: patients erased after this backup may be"
              " readable again; copy the ledger (erasure-ledger.json) into the data directory before serving",
              file=sys.stderr)
    for note in res.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"restored backup {res.backup_id} (snapshot {_iso(res.snapshot_ms)}) into {res.data_dir}: "
          f"{res.size / 1e6:.1f} MB in {res.seconds:.1f} s")
    status = 0
    report = res.replayed
    recovery_ms = getattr(report, "last_commit_ms", None) or res.snapshot_ms
    restored = load_settings({"data_dir": res.data_dir, **({"database_url": url} if url else {})})
    if url is not None:
        print(f"the tables are in the new database: point the restored server at it (database_url in "
              f"{res.data_dir / 'fhirvault.toml'} or FHIRVAULT_DATABASE_URL), not at the old one", file=sys.stderr)
    approximate = list(getattr(report, "approximate_tags", None) or [])
    if approximate:
        # A cut inside a segment can leave extra search tags on resources changed twice in it: rebuild them.
        from fhirvault.backup.replication import retag
        from fhirvault.container import build

        container = build(restored)
        try:
            retag(container.store, container.keys, approximate)
        finally:
            container.close()
    if report is not None:
        print(f"replayed {getattr(report, 'segments_applied', '?')} replication segments; "
              f"recovery point {_iso(recovery_ms)}")
    gap = getattr(report, "gap", None)
    if gap:
        print(f"error: replication segments are missing ({gap}): the data stops at {_iso(recovery_ms)}",
              file=sys.stderr)
        status = 1
    _audit(restored, "restore", f"restored backup {res.backup_id}; recovery point {_iso(recovery_ms)}")
    print(f"next: fhirvault serve --data-dir {res.data_dir}")
    return status


def _prune(args: argparse.Namespace, settings: Settings) -> int:
    import dataclasses

    from fhirvault.backup.engine import prune
    from fhirvault.backup.settings import RetentionSettings, duration_seconds

    backup = _backup_settings(args, settings)
    policy = backup.retention if backup is not None else RetentionSettings()
    if args.grace is not None:
        policy = dataclasses.replace(policy, grace_seconds=duration_seconds("--grace", args.grace))
    target = _target(args, settings)
    res = prune(target, _live_root(settings), _instance_id(settings), policy, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"kept {len(res.kept)} backups; {verb} {len(res.deleted_manifests)} backups and "
          f"{res.deleted_chunks} chunks; {res.pending_chunks} unreferenced chunks wait for the grace period")
    for note in res.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _drill(args: argparse.Namespace, settings: Settings) -> int:
    from fhirvault.backup.drill import run_drill
    from fhirvault.backup.engine import default_replay

    target = _target(args, settings)
    report, files = run_drill(settings, target, at_ms=_parse_at(args.at), backup_id=args.backup_id,
                              report_dir=args.report_dir, scratch=args.scratch_dir, replay=default_replay(),
                              keep_scratch=args.keep_scratch, scratch_url=args.scratch_url)
    sys.stdout.write(report.text())
    for f in files:
        print(f"report written to {f}")
    return 0 if report.ok else 1


def _escrow_export(args: argparse.Namespace, settings: Settings) -> int:
    from fhirvault.adapters.keyfile import write_private_file
    from fhirvault.backup.escrow import export_passphrase, export_shares, generate_passphrase

    if args.out is None and args.shares is None:
        raise CliError("give --out FILE (passphrase) and/or --shares N --threshold M --out-dir DIR")
    _live_root(settings)  # refuse a key file with loose permissions or bad contents
    key_file = settings.root_key_path.read_bytes()
    instance = _instance_id(settings)
    if args.out is not None:
        if args.generate_passphrase:
            passphrase = generate_passphrase()
        else:
            passphrase = _passphrase(args.passphrase_file, confirm=True)
        args.out.absolute().parent.mkdir(parents=True, exist_ok=True)
        write_private_file(args.out.absolute(), export_passphrase(key_file, passphrase, instance))
        print(f"recovery file written to {args.out} (encrypted under the passphrase)")
        if args.generate_passphrase:
            print(f"recovery passphrase (shown once; write it down, keep it apart from the file): {passphrase}")
    if args.shares is not None:
        if args.threshold is None or args.out_dir is None:
            raise CliError("--shares needs --threshold M and --out-dir DIR")
        args.out_dir.mkdir(parents=True, exist_ok=True)
        docs = export_shares(key_file, args.threshold, args.shares, instance)
        for i, doc in enumerate(docs, 1):
            path = args.out_dir.absolute() / f"fhirvault-share-{i}-of-{len(docs)}.json"
            write_private_file(path, doc)
            print(f"share {i} of {len(docs)} written to {path}")
        print(f"any {args.threshold} of the {args.shares} shares recover the root key; hand each to a different officer")
    return 0


def _escrow_recover(args: argparse.Namespace) -> int:
    from fhirvault.adapters.keyfile import write_private_file

    key_file = _recovered_key_file(args)
    if key_file is None:
        raise CliError("give --recovery-file FILE or --share FILE (M times)")
    if args.out.exists():
        raise CliError(f"refusing to overwrite {args.out}")
    args.out.absolute().parent.mkdir(parents=True, exist_ok=True)
    write_private_file(args.out.absolute(), key_file)
    print(f"root key file written to {args.out} (mode 0600)")
    return 0


def run(args: argparse.Namespace, load: LoadSettings) -> int:
    """Dispatch; settings are loaded only by commands that work on a data directory."""
    from fhirvault.backup.engine import BackupError
    from fhirvault.backup.escrow import EscrowError
    from fhirvault.backup.manifest import ManifestError
    from fhirvault.backup.snapshot import SnapshotError
    from fhirvault.backup.target import TargetError

    try:
        if args.command == "backup":
            sub = args.backup_command
            if sub == "list":
                return _list(args)
            if sub == "restore":
                return _restore(args)
            if sub == "verify":
                return _verify(args, load)
            settings = load(args)
            return _create(args, settings) if sub == "create" else _prune(args, settings)
        if args.command == "dr":
            return _drill(args, load(args))
        if args.escrow_command == "recover":
            return _escrow_recover(args)
        return _escrow_export(args, load(args))
    except CliError as exc:
        return _fail(str(exc), exc.code)
    except SettingsError as exc:
        return _fail(str(exc), 2)
    except (BackupError, EscrowError, ManifestError, SnapshotError, TargetError) as exc:
        return _fail(str(exc), 1)
    except (OSError, ValueError) as exc:  # unreadable files, malformed key files
        return _fail(str(exc), 1)


def _fail(message: str, code: int) -> int:
    print(f"fhirvault: error: {message}", file=sys.stderr)
    return code
