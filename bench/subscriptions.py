#!/usr/bin/env python3
"""Subscriptions: what N active subscriptions cost a write, and how fast notifications follow.

In-process, on a real store (SQLite in a temporary data directory, or PostgreSQL with
``--database-url``), through ``Repository.create`` (policy, validation, encryption, audit, commit:
everything but HTTP), ``--concurrency`` writers at a time. For each N in ``--subscriptions``, N
rest-hook subscriptions are active (distinct codes; exactly one matches the written Observations
when N > 0), then ``--writes`` Observations are created and timed. The delivering dispatcher runs
in this process and POSTs to a local receiver. By default it is paused while the writes are timed (so
writes/s shows the write path's own cost: the outbox row) and resumed afterwards: "notified/s" is then
its matching + delivery rate, from its restart to the last notification. With ``--concurrent`` it runs
during the writes (they share the CPU, as in one server process); "lag" is from the last write's commit
to the last notification.

Usage: python bench/subscriptions.py [--subscriptions 0 1 100 1000] [--writes 2000] [--concurrency 16]
                                     [--database-url postgresql://…] [--concurrent]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import Container, build
from fhirvault.services.repository import RequestContext
from fhirvault.services.subscription_settings import SubscriptionSettings
from fhirvault.services.subscriptions import ROLE, SubscriptionDispatcher

LOINC = "http://loinc.org"


class _Counter(BaseHTTPRequestHandler):
    count = 0
    last = 0.0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with _Counter.lock:
            _Counter.count += 1
            _Counter.last = time.perf_counter()
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def observation(pid: str, code: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": LOINC, "code": code}]}, "valueQuantity": {"value": 72, "unit": "/min"}}


async def _subscribe(c: Container, ctx: RequestContext, url: str, first: int, upto: int) -> None:
    for i in range(first, upto):
        body = {"resourceType": "Subscription", "status": "requested", "reason": "bench",
                "criteria": f"Observation?code={LOINC}|bench-{i}",
                "channel": {"type": "rest-hook", "endpoint": url, "payload": "application/fhir+json"}}
        await c.repository.create(ctx, "Subscription", body)


async def _writes(c: Container, ctx: RequestContext, pid: str, n: int, concurrency: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = list(range(n))

    async def worker() -> None:
        while queue:
            queue.pop()
            started = time.perf_counter()
            await c.repository.create(ctx, "Observation", observation(pid, "bench-0"))
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


async def run(args: argparse.Namespace) -> None:
    data = Path(tempfile.mkdtemp(prefix="fv-subs-bench-")) / "data"
    engine = {"database_url": args.database_url} if args.database_url else {}
    settings = load_settings({"data_dir": data, **engine}, environ={})
    settings = dataclasses.replace(settings, subscriptions=SubscriptionSettings(
        allow_http=True, allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),), poll_seconds=0.02))
    creds = json.loads(initialise(settings).read_text())
    c = build(settings)
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    client = c.store.client(creds["client_id"])
    assert client is not None
    ctx = RequestContext(c.auth.verify(c.auth.issue(client, None)["access_token"]), "bench")
    assert c.leadership is not None and c.leadership.lead(ROLE)
    assert c.subscriptions is not None
    dispatcher = SubscriptionDispatcher(c.subscriptions, c.leadership)
    dispatcher.start()
    try:
        pid = (await c.repository.create(ctx, "Patient", {"resourceType": "Patient", "gender": "female"})).id
        await _writes(c, ctx, pid, 200, args.concurrency)  # warm-up
        print(f"engine={'postgresql' if engine else 'sqlite'} writes={args.writes} concurrency={args.concurrency}"
              f" dispatcher={'during the writes' if args.concurrent else 'paused during the writes'}")
        print("subscriptions  writes/s  p50 ms  p99 ms  notified  notified/s  lag ms")
        have = 0
        for n in args.subscriptions:
            await _subscribe(c, ctx, url, have, n)
            have = max(have, n)
            while c.store.subscription_backlog()[0] or dispatcher.rounds < 2 or any(
                    live.spec.status == "requested" for live in dispatcher._live.values()):
                await asyncio.sleep(0.05)
            before = _Counter.count
            if not args.concurrent:
                dispatcher.stop()
            latencies, seconds = await _writes(c, ctx, pid, args.writes, args.concurrency)
            ended = time.perf_counter()
            if not args.concurrent:
                dispatcher.start()
            expected = before + (args.writes if n > 0 else 0)
            deadline = time.monotonic() + 300
            while _Counter.count < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            latencies.sort()
            p99 = latencies[int(len(latencies) * 0.99) - 1]
            notified = _Counter.count - before
            spent = (_Counter.last - (ended - (seconds if args.concurrent else 0.0))) if notified else 0.0
            lag = (_Counter.last - ended) * 1000 if notified else 0.0
            print(f"{n:>13}  {args.writes / seconds:>8.0f}  {statistics.median(latencies) * 1000:>6.2f}  "
                  f"{p99 * 1000:>6.2f}  {notified:>8}  {notified / spent if spent else 0:>10.0f}  {lag:>6.0f}")
    finally:
        dispatcher.stop()
        receiver.shutdown()
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subscriptions", type=int, nargs="+", default=[0, 1, 100, 1000])
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--concurrent", action="store_true", help="keep the dispatcher running during the writes")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
