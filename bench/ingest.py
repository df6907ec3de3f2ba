#!/usr/bin/env python3
"""FHIR transaction-bundle ingest benchmark (Synthea-style carebundle patients).

Generates ``--patients`` patient bundles with ``carebundle.generate_cohort`` (each
a transaction Bundle of ~45 resources linked by ``urn:uuid`` fullUrls), caches
them on disk under ``--cache`` (keyed by seed and count, so a repeated run skips
generation), then POSTs them to the FHIR base with ``--clients`` concurrent
keep-alive connections and ``Prefer: return=minimal``.

Reports resources/s, bundles/s, per-bundle latency percentiles, errors (non-200
answers with the first body), the ingest rate every ``--progress-every``
resources (to show how the rate changes as the store grows) and, with ``--db``,
the size of the SQLite database (+ WAL) per resource.

Example::

    python bench/ingest.py --base-url http://127.0.0.1:8080/fhir \\
        --client-file /tmp/fv/admin-client.json --patients 200 --clients 8 \\
        [--seed 1] [--db /tmp/fv/fhirvault.sqlite3] [--json out.json]

See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import _loadgen as lg
import _synthetic as syn
import aiohttp
from yarl import URL

# Resource types carebundle emits: the store size is the sum of their counts.
RESOURCE_TYPES: tuple[str, ...] = (
    "Patient",
    "Practitioner",
    "Encounter",
    "Condition",
    "Observation",
    "DiagnosticReport",
    "MedicationRequest",
    "AllergyIntolerance",
)
ERROR_BODY = 2000  # characters of the first error body kept per status

Log = Callable[[str], None]


def log_stdout(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------
# Helpers shared with search.py
# ---------------------------------------------------------------------------


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Server, auth and data-cache options (used by ingest.py and search.py)."""
    lg.add_server_args(p)
    p.add_argument("--seed", type=int, default=1, help="carebundle cohort seed (default: 1)")
    p.add_argument(
        "--cache",
        type=Path,
        default=syn.DEFAULT_CACHE,
        help="directory for the generated bundles (default: %(default)s)",
    )
    p.add_argument(
        "--db",
        type=Path,
        metavar="FILE",
        help="the server's SQLite file (DIR/fhirvault.sqlite3): report its size (+ WAL) and "
        "count the store's resources in it (read-only)",
    )
    p.add_argument(
        "--database-url",
        metavar="URL",
        help="the server's PostgreSQL database: count the store's resources in it (as --db does)",
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="per-request timeout, s (default: %(default)s)"
    )
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")


def finish_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.token_url and not args.client_file:
        p.error("--token-url only makes sense with --client-file")
    if args.client_file and not args.token_url:
        args.token_url = str(URL(args.base_url).origin() / "oauth2" / "token")
    if args.timeout <= 0:
        p.error("--timeout must be > 0")


def make_auth(args: argparse.Namespace) -> lg.Auth:
    return lg.Auth(
        token=args.token,
        client_file=args.client_file,
        token_url=args.token_url,
        scope=args.scope,
        timeout_s=args.timeout,
    )


def db_sizes(db: Path | None) -> dict[str, int] | None:
    """Sizes in bytes of the SQLite file, its WAL and shared-memory index (0 if absent)."""
    if db is None:
        return None

    def size(p: Path) -> int:
        try:
            return p.stat().st_size
        except FileNotFoundError:
            return 0

    out = {
        "db_bytes": size(db),
        "wal_bytes": size(db.with_name(db.name + "-wal")),
        "shm_bytes": size(db.with_name(db.name + "-shm")),
    }
    out["total_bytes"] = out["db_bytes"] + out["wal_bytes"]
    return out


def _sqlite_ro(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)


def count_in_db(db: Path) -> dict[str, int] | None:
    """Live resources per type, read from fhirvault's SQLite file (read-only, WAL-safe).

    Counting through the API does not scale: fhirvault refuses a search that would
    scan more than 10,000 resources without an indexed criterion.
    """
    try:
        with contextlib.closing(_sqlite_ro(db)) as conn:
            rows = conn.execute(
                "SELECT type, count(*) FROM resources_current WHERE deleted = 0 GROUP BY type"
            ).fetchall()
    except sqlite3.Error:
        return None
    return {str(t): int(n) for t, n in rows}


def count_in_pg(url: str) -> dict[str, int] | None:
    """Live resources per type, read from fhirvault's PostgreSQL database."""
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT type, count(*) FROM resources_current WHERE NOT deleted GROUP BY type"
            ).fetchall()
    except psycopg.Error:
        return None
    return {str(t): int(n) for t, n in rows}


def db_tables(db: Path | None) -> dict[str, int] | None:
    """Bytes per table and index (SQLite ``dbstat``), largest first; None if unavailable."""
    if db is None:
        return None
    try:
        with contextlib.closing(_sqlite_ro(db)) as conn:
            rows = conn.execute(
                "SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"
            ).fetchall()
    except sqlite3.Error:
        return None
    return {str(name): int(size) for name, size in rows}


async def count_api(
    session: aiohttp.ClientSession, auth: lg.Auth, base_url: str
) -> dict[str, int] | None:
    """Resources per carebundle type through ``_summary=count``; None if any search fails."""
    base = base_url.rstrip("/")
    out: dict[str, int] = {}
    for rt in RESOURCE_TYPES:
        try:
            async with session.get(
                f"{base}/{rt}", params={"_summary": "count"}, headers=auth.plain_headers
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    return None
            total = lg.loads(body).get("total")
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
            return None
        if not isinstance(total, int):
            return None
        out[rt] = total
    return out


async def count_store(
    args: argparse.Namespace, session: aiohttp.ClientSession, auth: lg.Auth
) -> dict[str, int] | None:
    """Resources per type in the store: from ``--db`` or ``--database-url`` if given, else through the API."""
    if args.database_url is not None:
        counts = await asyncio.to_thread(count_in_pg, args.database_url)
        if counts is not None:
            return counts
    if args.db is not None:
        counts = await asyncio.to_thread(count_in_db, args.db)
        if counts is not None:
            return counts
    return await count_api(session, auth, args.base_url)


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


# ---------------------------------------------------------------------------
# Ingest
# ---------------------------------------------------------------------------


class Ingest:
    """POSTs transaction bundles with N concurrent clients, records latencies and progress."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        auth: lg.Auth,
        base_url: str,
        *,
        clients: int,
        progress_every: int = 0,
        store_before: int = 0,
        db: Path | None = None,
        log: Log = log_stdout,
    ) -> None:
        self.session = session
        self.auth = auth
        self.url = URL(base_url.rstrip("/"))
        self.clients = clients
        self.progress_every = progress_every
        self.store_before = store_before
        self.db = db
        self.log = log
        self.op = lg.Op("transaction", "Bundle")
        self.rec = lg.Recorder([self.op])
        self.bundles_ok = 0
        self.resources_ok = 0
        self.bundles_failed = 0
        self.resources_failed = 0
        self.first_error: str | None = None
        self.stopped_early = False  # the time limit ended the run before the last bundle
        self.curve: list[dict[str, Any]] = []
        self._next_mark = progress_every
        self._mark_ns = 0
        self._mark_resources = 0
        self._mark_sample = 0

    async def _post(self, n: int, body: bytes) -> None:
        headers = {**self.auth.body_headers, "Prefer": "return=minimal"}
        t0 = lg.perf_counter_ns()
        try:
            async with self.session.post(self.url, data=body, headers=headers) as resp:
                data = await resp.read()
                status = resp.status
        except Exception as exc:
            self.rec.sample(self.op, t0, lg.perf_counter_ns())
            self._failed(n, type(exc).__name__, str(exc) or repr(exc))
            return
        self.rec.sample(self.op, t0, lg.perf_counter_ns())
        if status == 200:
            self.bundles_ok += 1
            self.resources_ok += n
            if self.progress_every and self.resources_ok >= self._next_mark:
                self._progress()
            return
        if status == 401:
            self.auth.invalidate()
        self._failed(n, f"HTTP {status}", data.decode("utf-8", "replace"))

    def _failed(self, n: int, status: str, body: str) -> None:
        self.bundles_failed += 1
        self.resources_failed += n
        self.rec.error(self.op, True, status, body)
        if self.first_error is None:
            self.first_error = f"{status}: {body[:ERROR_BODY]}"
            self.log(f"first error: {self.first_error}")

    def _progress(self) -> None:
        now = lg.perf_counter_ns()
        while self._next_mark <= self.resources_ok:
            self._next_mark += self.progress_every
        interval_s = (now - self._mark_ns) / 1e9
        elapsed_s = (now - self.rec.measure_start) / 1e9
        done = self.resources_ok - self._mark_resources
        lat = sorted(self.op.samples[self._mark_sample :])
        point: dict[str, Any] = {
            "store_resources": self.store_before + self.resources_ok,
            "ingested": self.resources_ok,
            "bundles": self.bundles_ok,
            "elapsed_s": round(elapsed_s, 1),
            "interval_res_per_s": round(done / interval_s, 1) if interval_s > 0 else 0.0,
            "overall_res_per_s": round(self.resources_ok / elapsed_s, 1) if elapsed_s > 0 else 0.0,
            "interval_p50_ms": round(lg.percentile(lat, 50), 1),
            "interval_p95_ms": round(lg.percentile(lat, 95), 1),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }
        sizes = db_sizes(self.db)
        if sizes is not None:
            point.update(db_bytes=sizes["db_bytes"], wal_bytes=sizes["wal_bytes"])
        self.curve.append(point)
        self._mark_ns = now
        self._mark_resources = self.resources_ok
        self._mark_sample = len(self.op.samples)
        db = f", db {mb(sizes['db_bytes'])} + wal {mb(sizes['wal_bytes'])}" if sizes else ""
        self.log(
            f"  store {point['store_resources']:>10,} resources | {point['elapsed_s']:>7.0f} s | "
            f"{point['interval_res_per_s']:>7,.0f} res/s (last {done:,}), "
            f"{point['overall_res_per_s']:,.0f} res/s overall | bundle p50 "
            f"{point['interval_p50_ms']:.0f} ms p95 {point['interval_p95_ms']:.0f} ms{db} | "
            f"load {point['loadavg_1m']:.1f}"
        )

    async def run(self, bundles: Iterable[tuple[int, bytes]], max_seconds: float = 0.0) -> None:
        """POST every bundle; with ``max_seconds`` > 0 stop sending new ones after that time."""
        it: Iterator[tuple[int, bytes]] = iter(bundles)
        now = lg.perf_counter_ns()
        deadline = now + int(max_seconds * 1e9) if max_seconds > 0 else lg.NEVER

        async def client() -> None:
            # All clients pull from one iterator; next() never awaits, so this is safe.
            while lg.perf_counter_ns() < deadline:
                item = next(it, None)
                if item is None:
                    return
                await self._post(*item)
            self.stopped_early = next(it, None) is not None or self.stopped_early

        self.rec.start(now, 0.0, 0.0)  # everything is measured
        self._mark_ns = now
        await asyncio.gather(*(client() for _ in range(self.clients)))

    def report(self) -> dict[str, Any]:
        elapsed = max(0, self.rec.last_end - self.rec.measure_start) / 1e9
        latency = lg.summarize(array("q", self.op.samples), self.op.errors, elapsed)
        return {
            "elapsed_s": round(elapsed, 3),
            "bundles": self.bundles_ok,
            "resources": self.resources_ok,
            "bundles_per_s": round(self.bundles_ok / elapsed, 2) if elapsed > 0 else 0.0,
            "resources_per_s": round(self.resources_ok / elapsed, 1) if elapsed > 0 else 0.0,
            "latency": {k: v for k, v in latency.items() if k.endswith("_ms")},
            "errors": {
                "bundles": self.bundles_failed,
                "resources": self.resources_failed,
                "first": self.first_error,
                "by_status": {
                    key.split("|", 1)[1]: count
                    for key, (count, _snippet) in self.rec.error_samples.items()
                },
            },
            "stopped_at_time_limit": self.stopped_early,
            "curve": self.curve,
        }


async def ingest_cohort(
    args: argparse.Namespace,
    *,
    patients: int,
    offset: int,
    clients: int,
    progress_every: int,
    max_seconds: float = 0.0,
    log: Log = log_stdout,
) -> dict[str, Any]:
    """Generate/cache the cohort, ingest bundles [offset, offset+patients) and size the store.

    ``args`` carries the options of :func:`add_common_args`.
    """
    path = syn.ensure_cohort(args.cache, offset + patients, args.seed, log)
    auth = make_auth(args)
    session = lg.make_session(clients + 1, args.timeout)
    try:
        await auth.start()
        before = await count_store(args, session, auth)
        store_before = sum(before.values()) if before is not None else 0
        log(
            f"store before: {store_before:,} resources"
            if before is not None
            else "store before: unknown (give --db; _summary=count searches failed)"
        )
        bundles = (
            b for i, b in enumerate(syn.iter_bundles(path, offset + patients)) if i >= offset
        )
        if offset:
            log(f"skipping the first {offset:,} bundles of the cohort")
        limit = f", for at most {max_seconds:g} s" if max_seconds > 0 else ""
        log(f"ingesting {patients:,} bundles with {clients} clients{limit} ...")
        lg.tune_gc()
        ingest = Ingest(
            session,
            auth,
            args.base_url,
            clients=clients,
            progress_every=progress_every,
            store_before=store_before,
            db=args.db,
            log=log,
        )
        await ingest.run(bundles, max_seconds)
        report = ingest.report()
        after = await count_store(args, session, auth)
        report["token_fetches"] = auth.refreshes
    finally:
        await session.close()
        await auth.close()
    store_after = sum(after.values()) if after is not None else None
    report["store"] = {
        "resources_before": store_before if before is not None else None,
        "resources_after": store_after,
        "by_type": after,
    }
    sizes = db_sizes(args.db)
    db: dict[str, Any] | None = None
    if sizes is not None:
        per = store_after or report["resources"]
        db = {
            **sizes,
            "bytes_per_resource": round(sizes["total_bytes"] / per, 1) if per else 0.0,
            "per_resource_basis": "store_resources" if store_after else "ingested_resources",
            "tables": await asyncio.to_thread(db_tables, args.db),
        }
    report["db"] = db
    return report


def print_ingest(report: dict[str, Any], header: str) -> None:
    lat = report["latency"]
    print(header)
    if report.get("stopped_at_time_limit"):
        print("stopped at the time limit (--max-seconds) before the last bundle")
    print(
        f"ingested {report['bundles']:,} bundles / {report['resources']:,} resources in "
        f"{report['elapsed_s']:.1f} s: {report['resources_per_s']:,.1f} resources/s, "
        f"{report['bundles_per_s']:,.2f} bundles/s"
    )
    print(
        f"per-bundle latency ms: p50 {lat['p50_ms']:.1f}  p95 {lat['p95_ms']:.1f}  "
        f"p99 {lat['p99_ms']:.1f}  max {lat['max_ms']:.1f}  mean {lat['mean_ms']:.1f}"
    )
    store = report["store"]
    if store["resources_after"] is not None:
        by_type = ", ".join(f"{rt} {n:,}" for rt, n in (store["by_type"] or {}).items() if n)
        print(f"store after: {store['resources_after']:,} resources ({by_type})")
    db = report["db"]
    if db is not None:
        basis = "store resource" if db["per_resource_basis"] == "store_resources" else "resource"
        print(
            f"database: {mb(db['db_bytes'])} + WAL {mb(db['wal_bytes'])} = "
            f"{mb(db['total_bytes'])}, {db['bytes_per_resource']:,.0f} bytes per {basis}"
        )
        per = report["store"]["resources_after"] or report["resources"]
        if db.get("tables") and per:
            top = list(db["tables"].items())[:6]
            print(
                "  by table/index (bytes per resource): "
                + ", ".join(f"{name} {size / per:,.0f}" for name, size in top)
            )
    e = report["errors"]
    if e["bundles"]:
        print(
            f"ERRORS: {e['bundles']:,} bundles ({e['resources']:,} resources) failed: {e['by_status']}"
        )
        print(f"  first: {e['first']}")
    else:
        print("no errors")


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Transaction-bundle ingest benchmark with carebundle (Synthea-style) patients."
    )
    add_common_args(p)
    p.add_argument("--patients", type=int, default=200, help="bundles to POST (default: 200)")
    p.add_argument(
        "--offset",
        type=int,
        default=0,
        help="skip the first N bundles of the cohort (to grow a store without duplicates)",
    )
    p.add_argument("--clients", type=int, default=8, help="concurrent connections (default: 8)")
    p.add_argument(
        "--progress-every",
        type=int,
        default=50_000,
        metavar="N",
        help="print the ingest rate every N resources, 0 = never (default: %(default)s)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=0.0,
        help="stop sending bundles after this many seconds, 0 = no limit (default: 0)",
    )
    args = p.parse_args(argv)
    finish_common_args(p, args)
    if args.max_seconds < 0:
        p.error("--max-seconds must be >= 0")
    if args.patients < 1 or args.clients < 1 or args.offset < 0 or args.progress_every < 0:
        p.error("--patients and --clients must be >= 1, --offset and --progress-every >= 0")
    return args


def config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "base_url": args.base_url,
        "seed": args.seed,
        "json_lib": lg.JSON_LIB,
        "uvloop": not args.no_uvloop and lg.uvloop_available(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        report = lg.run_async(
            ingest_cohort(
                args,
                patients=args.patients,
                offset=args.offset,
                clients=args.clients,
                progress_every=args.progress_every,
                max_seconds=args.max_seconds,
            ),
            use_uvloop=not args.no_uvloop,
        )
    except (lg.TokenError, aiohttp.ClientError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = {
        "benchmark": "ingest",
        "config": {
            **config(args),
            "patients": args.patients,
            "offset": args.offset,
            "clients": args.clients,
            "max_seconds": args.max_seconds,
        },
        **report,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print_ingest(
        out,
        f"transaction ingest  {args.base_url}  patients={args.patients} clients={args.clients} "
        f"seed={args.seed}",
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
            fh.write("\n")
    return 1 if out["errors"]["bundles"] else 0


if __name__ == "__main__":
    sys.exit(main())
