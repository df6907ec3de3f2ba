"""``fhirvault move`` (issue #12): time moving a populated SQLite data directory into an empty PostgreSQL database.

Populates DIR (default /tmp/fv-move) in-process with ``--resources`` resources (bench/backup.py's populate:
the server's write path, audit records included), starts a PostgreSQL server with scripts/pg-test-server.sh,
creates an empty database and runs ``fhirvault move --data-dir DIR --to URL`` (copy, per-table comparison,
audit verification), printing its output and wall time.

Run: .venv/bin/python bench/move.py [--resources 20000] [--dir /tmp/fv-move] [--reuse]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from backup import ROOT, cli, populate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fv-move"), help="the SQLite data directory to populate")
    ap.add_argument("--resources", type=int, default=20000, help="resources to write before the move")
    ap.add_argument("--batch", type=int, default=200, help="resources per store transaction while populating")
    ap.add_argument("--reuse", action="store_true", help="keep a data directory populated by an earlier run")
    args = ap.parse_args()
    populate(args.dir, args.resources, args.batch, args.reuse)
    for stale in (args.dir / "fhirvault.toml", args.dir / "fhirvault.toml.before-move"):
        stale.unlink(missing_ok=True)  # a --reuse'd directory from an earlier move
    base = Path(tempfile.mkdtemp(prefix="fv-move-pg-"))
    base.chmod(0o711)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = str(ROOT / "scripts" / "pg-test-server.sh")
    admin = subprocess.run([script, "start", str(base / "pg"), str(port)], check=True, capture_output=True,
                           text=True).stdout.strip()
    try:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute("CREATE DATABASE fv_move")
        url = admin.rsplit("/", 1)[0] + "/fv_move"
        code, out, seconds = cli("move", "--data-dir", str(args.dir), "--to", url)
        print(out)
        print(f"fhirvault move: exit {code}, {seconds:.1f} s wall time for {args.resources:,} resources")
    finally:
        subprocess.run([script, "stop", str(base / "pg")], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
