"""Time to verify the audit log: fill a fresh data dir with N entries, checkpoint, then verify.

Run: .venv/bin/python bench/audit_verify.py --entries 1000000 [--dir /tmp/fv-audit-bench]

Entries are realistic read records (client, source IP, patient, entity, request id),
sealed and tagged exactly as the server does, written 2,000 per transaction. The
figure the issue asks for is the ``verify`` line: entries re-read, authenticated
at their position, tags recomputed, Merkle tree rebuilt, checkpoints and the
witness checked (target < 30 s for 1 M entries).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.services.audit import AuditRecord
from fhirvault.services.audit_verify import verify_data_dir

BATCH = 2000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fv-audit-bench"))
    ap.add_argument("--reuse", action="store_true", help="verify an existing bench dir without refilling")
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
                records = [AuditRecord(base + i // 50, "read", "0", 200, f"bench-{i:012x}", client_id="bench-client",
                                       source_ip="10.1.2.3", entity=f"Observation/obs-{i}/_history/1",
                                       patient=f"Patient/p-{i % 20000}")
                           for i in range(start, min(start + BATCH, args.entries))]
                c.store.write_sync("bench", lambda tx, rs=records: [c.audit.record(tx, r) for r in rs])
                if start % 100_000 == 0:
                    c.checkpointer.step(force=True, witness=start % 500_000 == 0)
            fill = time.perf_counter() - started
            t0 = time.perf_counter()
            c.checkpointer.step(force=True, witness=True)
            checkpoint = time.perf_counter() - t0
        finally:
            c.close()
        size = sum(f.stat().st_size for f in args.dir.glob("fhirvault.sqlite3*"))
        print(f"fill: {args.entries} entries in {fill:.1f} s ({args.entries / fill:,.0f}/s); "
              f"last checkpoint step {checkpoint:.2f} s; database files {size / 1e6:.0f} MB "
              f"({size / args.entries:.0f} B/entry)")
    report = verify_data_dir(settings)
    print(f"verify: {report.summary()}")
    if not report.ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
