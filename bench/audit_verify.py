"""Time to verify the audit log: fill a fresh data dir with N entries, checkpoint, then verify.

Run: .venv/bin/python bench/audit_verify.py --entries 1000000 [--dir /tmp/fv-audit-bench] [--serve]

``--tail T`` (default 20,000) entries follow the last witnessed checkpoint, covered by a
signed one only: what a server killed before its next witness publication leaves.
``--serve`` then starts ``fhirvault serve`` on the directory and reports the time from
process start to ``/readyz`` 200, and to the end of the background full pass (from the
server's log). Run the whole script with ``PYTHONPATH=OTHER/src`` to measure another build.

Entries are realistic read records (client, source IP, patient, entity, request id),
sealed and tagged exactly as the server does, written 2,000 per transaction. The
figure the issue asks for is the ``verify`` line: entries re-read, authenticated
at their position, tags recomputed, Merkle tree rebuilt, checkpoints and the
witness checked (target < 30 s for 1 M entries).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.services.audit import AuditRecord
from fhirvault.services.audit_verify import verify_data_dir

BATCH = 2000


def _records(base: int, start: int, end: int) -> list[AuditRecord]:
    return [AuditRecord(base + i // 50, "read", "0", 200, f"bench-{i:012x}", client_id="bench-client",
                        source_ip="10.1.2.3", entity=f"Observation/obs-{i}/_history/1", patient=f"Patient/p-{i % 20000}")
            for i in range(start, end)]


def _serve(data_dir: Path, timeout: float = 900) -> None:
    """Time from ``fhirvault serve`` to /readyz 200, and to the full verification's log line."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    log_path = data_dir.parent / f"{data_dir.name}-serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fhirvault.cli.main", "serve", "--data-dir", str(data_dir),
                             "--port", str(port)], stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        ready = full = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (ready is None or full is None):
            if proc.poll() is not None:
                raise SystemExit(f"server exited (status {proc.returncode}); see {log_path}")
            if ready is None:
                with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz",
                                                                          timeout=2) as r:
                    if r.status == 200:
                        ready = time.perf_counter() - started
            if full is None and re.search(r'audit log verified"(?!.*"since": *[1-9])', log_path.read_text(errors="replace")):
                full = time.perf_counter() - started
            time.sleep(0.05)
        for line in log_path.read_text(errors="replace").splitlines():
            if "audit log verif" in line:
                print(f"server log: {line.strip()[:240]}")
        print(f"serve: /readyz 200 after {ready if ready is None else round(ready, 1)} s; "
              f"full verification done {full if full is None else round(full, 1)} s after start")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fv-audit-bench"))
    ap.add_argument("--reuse", action="store_true", help="verify an existing bench dir without refilling")
    ap.add_argument("--tail", type=int, default=20_000, help="entries after the last witnessed checkpoint")
    ap.add_argument("--serve", action="store_true", help="then time fhirvault serve to /readyz 200")
    ap.add_argument("--no-verify", action="store_true", help="skip the offline full verification")
    args = ap.parse_args()
    settings = load_settings({"data_dir": args.dir}, environ={})
    if not args.reuse:
        shutil.rmtree(args.dir, ignore_errors=True)
        initialise(settings)
        c = build(settings)
        started = time.perf_counter()
        base = c.clock.now_ms()
        try:
            for start in range(0, args.entries, BATCH):
                records = _records(base, start, min(start + BATCH, args.entries))
                c.store.write_sync("bench", lambda tx, rs=records: [c.audit.record(tx, r) for r in rs])
                if start % 100_000 == 0:
                    c.checkpointer.step(force=True, witness=start % 500_000 == 0)
            fill = time.perf_counter() - started
            t0 = time.perf_counter()
            c.checkpointer.step(force=True, witness=True)
            checkpoint = time.perf_counter() - t0
            total = args.entries + args.tail
            for start in range(args.entries, total, BATCH):
                records = _records(base, start, min(start + BATCH, total))
                c.store.write_sync("bench", lambda tx, rs=records: [c.audit.record(tx, r) for r in rs])
            c.checkpointer.step(force=True, witness=False)  # signed, not yet witnessed
        finally:
            c.close()
        size = sum(f.stat().st_size for f in args.dir.glob("fhirvault.sqlite3*"))
        print(f"fill: {args.entries} entries in {fill:.1f} s ({args.entries / fill:,.0f}/s); "
              f"last checkpoint step {checkpoint:.2f} s; database files {size / 1e6:.0f} MB "
              f"({size / args.entries:.0f} B/entry)")
    if not args.no_verify:
        report = verify_data_dir(settings)
        print(f"verify: {report.summary()}")
        if not report.ok:
            raise SystemExit(1)
    if args.serve:
        _serve(args.dir)


if __name__ == "__main__":
    main()
