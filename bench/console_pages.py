"""How long the console's heaviest reads take: a 7-day chart window and the last-use scan of an access review.

Fills a fresh SQLite data directory with a week of one-a-minute metric samples (10,080, in the hourly ring) and
``--entries`` audit records naming users and clients, then times ``SampleStore.since`` over 168 hours plus the
SVG of every chart, and ``last_uses`` (the scan an access-review campaign does when it starts). Usage::

    python bench/console_pages.py --entries 100000

Prints the median seconds of --repeat runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import orjson

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.services.access_reviews import last_uses
from fhirvault.services.audit import AuditRecord
from fhirvault.services.metric_samples import HOUR_MS, SampleStore
from fhirvault.web.console import charts

FIELDS = {"requests": 0.0, "refusals": 0.0, "latency_sum": 0.0, "latency_count": 0.0, "alerts_open": 1.0,
          "backup_age_s": 600.0, "replication_lag_s": 1.2, "drill_rpo_s": None, "drill_rto_s": None,
          "audit_verified": 1.0}


def _median(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000, help="audit entries written before the scan")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings({"data_dir": Path(tmp) / "data"}, environ={})
        initialise(settings)
        c = build(settings)
        try:
            now = c.clock.now_ms()
            store = SampleStore(c.store)
            first_hour = now // HOUR_MS - store.slots + 1

            def fill(tx: object) -> None:  # a week of samples, written as the ring's hourly documents
                n = 0
                for hour in range(first_hour, now // HOUR_MS + 1):
                    points = []
                    for minute in range(60):
                        n += 1
                        values = {**FIELDS, "requests": n * 50.0, "latency_sum": n * 0.5, "latency_count": n * 50.0}
                        points.append([hour * HOUR_MS + minute * 60_000, values])
                    tx.set_meta(f"metric-samples:{hour % store.slots}",  # type: ignore[attr-defined]
                                orjson.dumps({"hour": hour, "points": points}))

            c.store.write_sync("bench.samples", fill)
            since = now - 168 * HOUR_MS

            def chart_page() -> None:
                samples = store.since(since, now)
                series = [charts.rates(samples, "requests"), charts.rates(samples, "refusals"),
                          charts.mean_latency_ms(samples), charts.gauge(samples, "alerts_open"),
                          charts.gauge(samples, "backup_age_s"), charts.gauge(samples, "replication_lag_s"),
                          charts.gauge(samples, "audit_verified")]
                for n, points in enumerate(series):
                    charts.line_chart(f"c{n}", "t", points, since, now, no_data="-", described="{low} {high} {n}")

            print(f"samples in the window: {len(store.since(since, now))}")
            print(f"7-day charts (read + 7 SVGs): {_median(chart_page, args.repeat):.3f} s")

            batch = 5_000
            for start in range(0, args.entries, batch):
                def job(tx: object, start: int = start) -> None:
                    for i in range(start, min(args.entries, start + batch)):
                        c.audit.record(tx, AuditRecord(now, "read", "0", 200, "bench", client_id=f"fv-{i % 40}",
                                                       user=f"u-{i % 300}", entity="Patient/x"))  # type: ignore[arg-type]

                c.store.write_sync("bench.audit", job)
            found = last_uses(c.store, c.audit, settings.tenant)
            print(f"last-use scan of {min(args.entries, 100_000)} entries ({len(found)} subjects):"
                  f" {_median(lambda: last_uses(c.store, c.audit, settings.tenant), max(1, args.repeat // 2)):.2f} s")
        finally:
            c.close()


if __name__ == "__main__":
    main()
