"""Soak: steady, modest load on a real server for a long time; do memory, file descriptors or latency creep?

Starts ``fhirvault serve`` on loopback on a fresh data directory, drives a fixed
request rate at it (a CRUD + search mix on a bounded pool of Patients), and
every ``--interval`` seconds samples the server's process group: resident
memory (sum of VmRSS), open file descriptors (``/proc/PID/fd``) and the
latency percentiles of that window. At the end it prints the table and a
verdict per series from a least-squares slope fitted after the warm-up:
``flat`` or ``growing``. Exit status 0 when everything is flat and no request
failed, 1 otherwise.

    python bench/soak.py --minutes 30 --rate 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _server  # bench/ is on sys.path when run as a script
import httpx

FHIR_JSON = {"Content-Type": "application/fhir+json"}
TOKEN_REFRESH_S = 120  # well inside the default 300 s token lifetime


@dataclass
class Sample:
    t_s: float
    rss_mb: float
    fds: int
    db_mb: float
    load1: float
    requests: int
    errors: int
    shed: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class Window:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    shed: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def slope_per_hour(xs_s: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over time, in units per hour."""
    n = len(xs_s)
    if n < 2:
        return 0.0
    mx, my = sum(xs_s) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs_s)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs_s, ys, strict=True)) / var * 3600


def rss_mb(pids: list[int]) -> float:
    total_kb = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


def dir_mb(path: Path) -> float:
    """Bytes on disk of the data directory: the database grows (history, audit log), and SQLite's page cache
    (bounded by its cache_size) grows with it, so RSS growth is read against this column."""
    total = 0
    for f in path.rglob("*"):
        with contextlib.suppress(OSError):
            if f.is_file():
                total += f.stat().st_size
    return total / 2**20


def open_fds(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def patient(rng: random.Random, n: int) -> dict[str, Any]:
    return {"resourceType": "Patient", "active": True, "gender": rng.choice(["female", "male", "other"]),
            "name": [{"family": f"Soak{n}", "given": [rng.choice(["Ada", "Lin", "Sam", "Noor"])]}],
            "birthDate": f"19{rng.randint(30, 99)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"}


class Load:
    """An open-loop request schedule at ``rate`` per second, at most ``inflight`` outstanding (the rest is shed)."""

    def __init__(self, server: _server.Server, rate: float, inflight: int, pool: int, seed: int,
                 churn: bool = True) -> None:
        self.server = server
        self.churn = churn
        self.rate = rate
        self.inflight = inflight
        self.pool_max = pool
        self.rng = random.Random(seed)
        self.pool: list[str] = []
        self.window = Window()
        self.running = 0
        self.counter = 0
        self.token = server.token()

    def take_window(self) -> Window:
        w, self.window = self.window, Window()
        return w

    async def refresh_token(self) -> None:
        while True:
            await asyncio.sleep(TOKEN_REFRESH_S)
            try:
                self.token = await asyncio.to_thread(self.server.token)
            except httpx.HTTPError as e:
                self.window.error(f"token: {e!r}")

    async def one(self, c: httpx.AsyncClient) -> None:
        self.running += 1
        self.counter += 1
        n = self.counter
        op = self.rng.random()
        headers = {"Authorization": f"Bearer {self.token}"}
        start = time.perf_counter()
        try:
            if not self.churn and len(self.pool) >= self.pool_max and (op < 0.2 or op >= 0.9):
                op = 0.3  # no churn: once the pool is full, creates and deletes become reads
            if op < 0.2 or not self.pool:
                if len(self.pool) >= self.pool_max:  # keep the live set bounded: delete instead
                    r = await c.delete(f"/Patient/{self.pool.pop(0)}", headers=headers)
                else:
                    r = await c.post("/Patient", json=patient(self.rng, n), headers={**headers, **FHIR_JSON})
                    if r.status_code == 201:
                        self.pool.append(r.json()["id"])
            elif op < 0.6:
                r = await c.get(f"/Patient/{self.rng.choice(self.pool)}", headers=headers)
            elif op < 0.8:
                r = await c.get("/Patient", params={"gender": self.rng.choice(["female", "male"]), "_count": "10"},
                                headers=headers)
            elif op < 0.9:
                pid = self.rng.choice(self.pool)
                body = {**patient(self.rng, n), "id": pid}
                r = await c.put(f"/Patient/{pid}", json=body, headers={**headers, **FHIR_JSON})
            else:
                r = await c.delete(f"/Patient/{self.pool.pop(self.rng.randrange(len(self.pool)))}", headers=headers)
            # a read/update racing a delete of the same id may see 404/410: that is correct behaviour
            if r.status_code >= 400 and r.status_code not in (404, 410):
                self.window.error(f"{r.request.method} {r.request.url.path} -> {r.status_code} {r.text[:160]}")
        except httpx.HTTPError as e:
            self.window.error(repr(e))
        finally:
            self.window.latencies.append((time.perf_counter() - start) * 1000)
            self.running -= 1

    async def run(self, until: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        refresher = asyncio.create_task(self.refresh_token())
        limits = httpx.Limits(max_connections=self.inflight, max_keepalive_connections=self.inflight)
        async with httpx.AsyncClient(base_url=self.server.base + "/fhir", timeout=30, limits=limits) as c:
            start, i = time.monotonic(), 0
            while (now := time.monotonic()) < until:
                due = start + i / self.rate
                if due > now:
                    await asyncio.sleep(due - now)
                i += 1
                if self.running >= self.inflight:
                    self.window.shed += 1
                    continue
                task = asyncio.create_task(self.one(c))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        refresher.cancel()


async def soak(args: argparse.Namespace, server: _server.Server) -> list[Sample]:
    load = Load(server, args.rate, args.inflight, args.pool, args.seed, churn=args.churn)
    t0 = time.monotonic()
    until = t0 + args.minutes * 60
    runner = asyncio.create_task(load.run(until))
    samples: list[Sample] = []
    print(f"{'t(s)':>6} {'RSS MB':>8} {'fds':>5} {'DB MB':>7} {'load1':>5} {'reqs':>6} {'err':>4} {'shed':>5} "
          f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7}", flush=True)
    while not runner.done():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(runner), timeout=max(0.0, t0 + (len(samples) + 1) * args.interval
                                                                       - time.monotonic()))
        w = load.take_window()
        lat = sorted(w.latencies)
        pids = server.pids()
        s = Sample(round(time.monotonic() - t0, 1), round(rss_mb(pids), 1), open_fds(pids),
                   round(dir_mb(server.data_dir), 1), os.getloadavg()[0], len(lat), w.errors,
                   w.shed, round(percentile(lat, 50), 2), round(percentile(lat, 95), 2),
                   round(percentile(lat, 99), 2), round(lat[-1] if lat else 0.0, 2))
        samples.append(s)
        print(f"{s.t_s:>6.0f} {s.rss_mb:>8.1f} {s.fds:>5} {s.db_mb:>7.1f} {s.load1:>5.1f} {s.requests:>6} {s.errors:>4} {s.shed:>5} "
              f"{s.p50_ms:>7.2f} {s.p95_ms:>7.2f} {s.p99_ms:>7.2f} {s.max_ms:>7.1f}", flush=True)
        for e in w.error_samples:
            print(f"    error: {e}", flush=True)
    await runner
    return samples


def verdict(samples: list[Sample], args: argparse.Namespace) -> dict[str, Any]:
    full = [s for s in samples if s.requests + s.shed >= args.rate * args.interval / 2]  # not the last stub
    skip = max(1, int(len(full) * args.warmup_fraction))
    steady = full[skip:] if len(full) - skip >= 3 else full
    ts = [s.t_s for s in steady]
    rss = slope_per_hour(ts, [s.rss_mb for s in steady])
    fds = slope_per_hour(ts, [float(s.fds) for s in steady])
    p99 = slope_per_hour(ts, [s.p99_ms for s in steady])
    return {
        "samples_fitted": len(steady),
        "rss_mb_per_hour": round(rss, 2), "rss": "growing" if rss > args.rss_limit else "flat",
        "fds_per_hour": round(fds, 2), "fds": "growing" if fds > args.fd_limit else "flat",
        "p99_ms_per_hour": round(p99, 2), "p99": "growing" if p99 > args.p99_limit else "flat",
        "db_mb_per_hour": round(slope_per_hour(ts, [s.db_mb for s in steady]), 2),
        "load1_mean": round(sum(s.load1 for s in steady) / max(1, len(steady)), 2),
        "requests": sum(s.requests for s in samples), "errors": sum(s.errors for s in samples),
        "shed": sum(s.shed for s in samples),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30, help="duration (default %(default)s)")
    p.add_argument("--rate", type=float, default=50, help="requests per second (default %(default)s)")
    p.add_argument("--interval", type=float, default=60, help="seconds between samples (default %(default)s)")
    p.add_argument("--inflight", type=int, default=8, help="max outstanding requests; beyond, shed (default %(default)s)")
    p.add_argument("--pool", type=int, default=2000, help="max live Patients (default %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-churn", dest="churn", action="store_false",
                   help="once --pool Patients exist, no more creates or deletes (so no new per-patient keys: "
                        "tells cache growth from a leak)")
    p.add_argument("--warmup-fraction", type=float, default=0.2,
                   help="share of the samples left out of the fit (caches filling up; default %(default)s)")
    p.add_argument("--rss-limit", type=float, default=20.0, help="MB/hour above which RSS is 'growing'")
    p.add_argument("--fd-limit", type=float, default=10.0, help="fds/hour above which fds are 'growing'")
    p.add_argument("--p99-limit", type=float, default=20.0, help="ms/hour above which p99 is 'growing'")
    p.add_argument("--data-dir", type=Path, help="data directory (default: a fresh temporary one)")
    p.add_argument("--json", type=Path, help="also write samples and verdict here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fhirvault-soak-") as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        log = Path(tmp) / "server.log"
        server = _server.start(data_dir, log)
        try:
            print(f"soak: {args.minutes} min at {args.rate} req/s against {server.base} "
                  f"(pids {server.pids()}), sample every {args.interval} s", flush=True)
            samples = asyncio.run(soak(args, server))
        finally:
            server.stop()
        result = verdict(samples, args)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"samples": [asdict(s) for s in samples], "verdict": result}, indent=2))
    ok = result["errors"] == 0 and all(result[k] == "flat" for k in ("rss", "fds", "p99"))
    print("VERDICT:", "flat" if ok else "NOT flat (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
