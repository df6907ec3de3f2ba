"""Backup export and restore on PostgreSQL: time and peak memory (issue #12, "Backup export on PG").

Takes a populated SQLite data directory (``bench/backup.py --phases populate --resources N --dir DIR``),
copies it and moves the copy into PostgreSQL (``fhirvault move``), then, each in a fresh child process (so
``ru_maxrss`` is the phase's own peak):

* ``backup``: ``create_backup`` from PostgreSQL (the logical export, chunking, encryption) to a file:// target;
* ``restore``: that backup restored into a new, empty PostgreSQL database (``PostgresRestoreSink``: migrate,
  apply the exports as replay applies segments, settle the sequences).

PostgreSQL is started by scripts/pg-test-server.sh under ``--work``. ``--src OLD/src`` runs both phases on
another source tree (e.g. ``git archive COMMIT src | tar -x -C OLD``) to compare before/after a change.

Run: .venv/bin/python bench/pg_backup.py --dir /tmp/fv-50k [--work /tmp/fv-pg-backup] [--src OLD/src]

Measured (shared 2-core machine, load ~5, 50,000 resources from ``bench/backup.py --phases populate``, run back
to back): before the streamed export and COPY restore (commit 367579e) backup 3.5 s at 531 MB peak RSS, restore
81.6 s at 312 MB; after, backup 4.5 s at 281 MB, restore 50.2 s at 202 MB (120 MB stored either way).
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "pg-test-server.sh"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_backup(data: Path, url: str, target_dir: Path) -> dict[str, float]:
    from fhirvault.adapters.keyfile import KeyFileProvider
    from fhirvault.adapters.postgres_backup import PostgresSnapshotSource
    from fhirvault.backup.engine import create_backup
    from fhirvault.backup.file_target import FileTarget

    t0 = time.monotonic()
    res = create_backup(data, FileTarget(target_dir, "FR"), KeyFileProvider.load(data / "root.key"),
                        source=PostgresSnapshotSource(url, data))
    return {"seconds": time.monotonic() - t0, "peak_mb": _peak_mb(), "size_mb": res.size / 1e6}


def child_restore(target_dir: Path, root_key: Path, url: str, to: Path) -> dict[str, float]:
    from fhirvault.backup.engine import restore_backup
    from fhirvault.backup.file_target import FileTarget
    from fhirvault.container import restore_sink

    t0 = time.monotonic()
    restore_backup(FileTarget(target_dir, "FR"), to, root_key.read_bytes(), sink=lambda d: restore_sink(d, url))
    return {"seconds": time.monotonic() - t0, "peak_mb": _peak_mb()}


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
            else child_backup(Path(rest[0]), rest[1], Path(rest[2]))
        print(json.dumps(res))
        return

    import psycopg

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    args.work.chmod(0o711)
    target, data = args.work / "target", args.work / "data"
    target.mkdir()
    shutil.copytree(args.dir, data)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    admin = subprocess.run([str(SCRIPT), "start", str(args.work / "pg"), str(port)], capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE source")
            conn.execute("CREATE DATABASE restored")
        source, restored = admin.rsplit("/", 1)[0] + "/source", admin.rsplit("/", 1)[0] + "/restored"
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "fhirvault.cli.main", "move", "--data-dir", str(data), "--to", source],
                       check=True, capture_output=True)
        with psycopg.connect(source) as conn:
            row = conn.execute("SELECT count(*) FROM resources_current").fetchone()
        print(f"source: {row[0] if row else 0:,} resources moved into PostgreSQL in {time.monotonic() - t0:.0f} s",
              flush=True)
        backed = _child("backup", str(data), source, str(target))
        print(f"backup from PostgreSQL (export + chunks + encryption): {backed['seconds']:.1f} s, peak RSS "
              f"{backed['peak_mb']:.0f} MB, {backed['size_mb']:.0f} MB", flush=True)
        got = _child("restore", str(target), str(data / "root.key"), restored, str(args.work / "restored"))
        print(f"restore into PostgreSQL: {got['seconds']:.1f} s, peak RSS {got['peak_mb']:.0f} MB", flush=True)
    finally:
        subprocess.run([str(SCRIPT), "stop", str(args.work / "pg")], capture_output=True, check=False)


if __name__ == "__main__":
    main()
