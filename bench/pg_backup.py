"""Backup export and restore on PostgreSQL: time and peak memory (issue #12, "Backup export on PG").

Takes a populated SQLite data directory (``bench/backup.py --phases populate --resources N --dir DIR``),
backs it up to a file:// target, then, each in a fresh child process (so ``ru_maxrss`` is the phase's own peak):

* ``restore``: the backup restored into a new, empty PostgreSQL database (``PostgresRestoreSink``: migrate,
  apply the exports as replay applies segments, settle the sequences);
* ``export``: ``PostgresSnapshotSource.dump`` of that database (the logical export a PostgreSQL backup takes).

PostgreSQL is started by scripts/pg-test-server.sh under ``--work``.

Run: .venv/bin/python bench/pg_backup.py --dir /tmp/fv-50k [--work /tmp/fv-pg-backup] [--src OLD/src]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "pg-test-server.sh"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_restore(target_dir: Path, root_key: Path, url: str, to: Path) -> dict[str, float]:
    from fhirvault.backup.engine import restore_backup
    from fhirvault.backup.file_target import FileTarget
    from fhirvault.container import restore_sink

    t0 = time.monotonic()
    restore_backup(FileTarget(target_dir, "FR"), to, root_key.read_bytes(), sink=lambda d: restore_sink(d, url))
    return {"seconds": time.monotonic() - t0, "peak_mb": _peak_mb()}


def child_export(url: str) -> dict[str, float]:
    from fhirvault.adapters.postgres_backup import PostgresSnapshotSource

    with tempfile.TemporaryDirectory() as into:
        t0 = time.monotonic()
        dump = PostgresSnapshotSource(url).dump(Path(into))
        seconds = time.monotonic() - t0
        size = sum(f.path.stat().st_size for f in dump.files)
    return {"seconds": seconds, "peak_mb": _peak_mb(), "export_mb": size / 1e6}


SRC: Path | None = None  # --src: run the measured phases on another source tree (e.g. before a change)


def _child(*argv: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(SRC)} if SRC is not None else None
    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=False,
                         env=env)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, default=Path("/tmp/fv-50k"), help="a populated SQLite data directory")
    p.add_argument("--work", type=Path, default=Path("/tmp/fv-pg-backup"))
    p.add_argument("--src", type=Path, help="a src/ tree the restore and export run from (default: this one)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    global SRC
    SRC = args.src
    if args.child:
        kind, *rest = args.child
        res = child_restore(Path(rest[0]), Path(rest[1]), rest[2], Path(rest[3])) if kind == "restore" \
            else child_export(rest[0])
        print(json.dumps(res))
        return

    from fhirvault.backup.engine import create_backup
    from fhirvault.backup.file_target import FileTarget
    from fhirvault.config import load_settings
    from fhirvault.container import build, snapshot_source

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    args.work.chmod(0o711)
    target = args.work / "target"
    target.mkdir()
    settings = load_settings({"data_dir": args.dir}, environ={})
    c = build(settings)
    try:
        created = create_backup(args.dir, FileTarget(target, "FR"), c.root, source=snapshot_source(settings))
        current = c.store.max_rk()
    finally:
        c.close()
    print(f"source: {args.dir} (about {current:,} resources), backup {created.size / 1e6:.0f} MB", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    admin = subprocess.run([str(SCRIPT), "start", str(args.work / "pg"), str(port)], capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    try:
        import psycopg

        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench")
        url = admin.rsplit("/", 1)[0] + "/bench"
        restored = _child("restore", str(target), str(args.dir / "root.key"), url, str(args.work / "restored"))
        print(f"restore into PostgreSQL: {restored['seconds']:.1f} s, peak RSS {restored['peak_mb']:.0f} MB", flush=True)
        exported = _child("export", url)
        print(f"export (PostgresSnapshotSource.dump): {exported['seconds']:.1f} s, peak RSS "
              f"{exported['peak_mb']:.0f} MB, {exported['export_mb']:.0f} MB written", flush=True)
    finally:
        subprocess.run([str(SCRIPT), "stop", str(args.work / "pg")], capture_output=True, check=False)


if __name__ == "__main__":
    main()
