"""How long the live compliance report takes on an instance with a long audit trail.

The report reads the newest audit entries (up to 20,000) for the last backup, every client, user, key and
register entry, then renders HTML and PDF. Usage::

    python bench/compliance_report.py --entries 50000 --incidents 200

Prints the seconds of build_report, render_html and render_pdf (median of --repeat runs).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.services.audit import AuditRecord
from fhirvault.services.compliance_report import build_report, render_html, render_pdf
from fhirvault.services.registers import RegisterService


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=50_000, help="audit entries written before the report")
    ap.add_argument("--incidents", type=int, default=200, help="incidents and as many requests in the registers")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings({"data_dir": Path(tmp) / "data"}, environ={})
        initialise(settings)
        c = build(settings)
        try:
            c.audit.record_system_event(c.store, c.clock, "backup", "backup b-1 to file:///x: 1/1 chunks uploaded")
            done = 0
            while done < args.entries:
                n = min(1000, args.entries - done)

                def batch(tx: object, n: int = n) -> None:
                    for i in range(n):
                        c.audit.record(tx, AuditRecord(c.clock.now_ms(), "read", "0", 200, "-",  # type: ignore[arg-type]
                                                        client_id="fv-bench", entity=f"Observation/o{i}"))

                c.store.write_sync("bench.audit", batch)
                done += n
            svc = RegisterService(c)
            for i in range(args.incidents):
                svc.open_incident(actor="bench", reason="benchmark entry", title=f"incident {i}")
                svc.open_request(actor="bench", type="access", subject=f"person {i}", reason="benchmark entry")
            timings: dict[str, list[float]] = {"build_report": [], "render_html": [], "render_pdf": []}
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                report = build_report(c)
                t1 = time.perf_counter()
                render_html(report, "fr")
                t2 = time.perf_counter()
                pdf = render_pdf(report, "en")
                t3 = time.perf_counter()
                timings["build_report"].append(t1 - t0)
                timings["render_html"].append(t2 - t1)
                timings["render_pdf"].append(t3 - t2)
        finally:
            c.close()
    print(f"audit entries {args.entries}, incidents {args.incidents}, requests {args.incidents},"
          f" PDF {len(pdf)} bytes; median of {args.repeat}:")
    for name, values in timings.items():
        print(f"  {name:13} {statistics.median(values):.3f} s")


if __name__ == "__main__":
    main()
