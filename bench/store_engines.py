#!/usr/bin/env python3
"""Creates/s and reads/s through the ResourceStore port, SQLite and PostgreSQL side by side.

A "create" is what a FHIR create writes: a version (a 1.5 KiB sealed blob), its search tags
(12 of 8 bytes) and an audit entry with 2 tags, one job per write, ``--writers`` concurrent
async writers. A "read" is ``read_current`` of a random created resource from ``--readers``
threads. Both stores run on this machine: SQLite files in a temporary directory and, unless
``--pg-url`` is given, a throw-away PostgreSQL started with scripts/pg-test-server.sh.

    python bench/store_engines.py [--creates 5000] [--writers 64] [--reads 20000] [--readers 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fhirvault.adapters.postgres_store import PostgresStore  # noqa: E402
from fhirvault.adapters.sqlite_store import SqliteStore  # noqa: E402
from fhirvault.ports import ResourceStore, StoredVersion  # noqa: E402


def create_job(i: int) -> Any:
    rid = f"p{i}"
    blob = os.urandom(1536)
    tags = [os.urandom(8) for _ in range(12)]

    def job(tx: Any) -> int:
        seq: int = tx.insert_version("t", StoredVersion("Patient", rid, 1, i, False, "k1", blob))
        tx.set_search_tags("t", "Patient", rid, tags)
        tx.append_audit("t", i, lambda s: blob[:200], tags[0] + tags[1])
        return seq

    return job


async def creates(store: ResourceStore, n: int, writers: int) -> float:
    sem = asyncio.Semaphore(writers)

    async def one(i: int) -> None:
        async with sem:
            await store.write("create", create_job(i))

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - started)


def reads(store: ResourceStore, n: int, created: int, readers: int) -> float:
    def batch(k: int) -> None:
        rnd = random.Random(k)
        for _ in range(n // readers):
            assert store.read_current("t", "Patient", f"p{rnd.randrange(created)}") is not None

    started = time.perf_counter()
    with ThreadPoolExecutor(readers) as pool:
        list(pool.map(batch, range(readers)))
    return (n // readers * readers) / (time.perf_counter() - started)


def start_pg(base: Path) -> tuple[str, Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.chmod(base, 0o711)
    url = subprocess.run([str(ROOT / "scripts" / "pg-test-server.sh"), "start", str(base / "pg"), str(port)],
                         check=True, capture_output=True, text=True).stdout.strip()
    return url, base / "pg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--creates", type=int, default=5000)
    ap.add_argument("--writers", type=int, default=64)
    ap.add_argument("--reads", type=int, default=20000)
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--pg-url", help="an empty PostgreSQL database (default: start a throw-away server)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fv-bench-") as tmp:
        base = Path(tmp)
        pg_dir = None
        url = args.pg_url
        if url is None:
            url, pg_dir = start_pg(base)
        try:
            engines: list[tuple[str, Any]] = [
                ("sqlite", lambda: SqliteStore(base / "db.sqlite3")),
                ("postgresql", lambda: PostgresStore(url, read_pool_size=args.readers)),
            ]
            for name, make in engines:
                store = make()
                try:
                    c = asyncio.run(creates(store, args.creates, args.writers))
                    r = reads(store, args.reads, args.creates, args.readers)
                    print(f"{name:<11} creates/s {c:8.0f}   reads/s {r:8.0f}"
                          f"   (commits {getattr(store, 'commits', 0)}, {args.writers} writers, {args.readers} readers)")
                finally:
                    store.close()
        finally:
            if pg_dir is not None:
                subprocess.run([str(ROOT / "scripts" / "pg-test-server.sh"), "stop", str(pg_dir)], check=False)


if __name__ == "__main__":
    main()
