"""``fhirvault compliance report --format html|pdf|json --out FILE [--lang fr|en]``: the live compliance report.

Read from the data directory (a running server's too): keys, users, backups and drills, the audit log,
alerts, registers, residency. The server serves the same at ``/admin/compliance/report(.html|.pdf)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fhirvault.config import Settings


def register(sub: Any, settings_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("compliance", help="compliance report (HDS, ISO 27001 Annex A, GDPR art. 32)")
    csub = p.add_subparsers(dest="compliance_command", required=True)
    q = csub.add_parser("report", help="write the live compliance report")
    settings_options(q)
    q.add_argument("--format", dest="fmt", choices=["html", "pdf", "json"], default="html", help="output format")
    q.add_argument("--lang", choices=["fr", "en"], default="en", help="language of the report (fr or en)")
    q.add_argument("--out", type=Path, required=True, help="output file ('-': standard output, html/json only)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from fhirvault.container import build
    from fhirvault.services.compliance_report import build_report, render_html, render_pdf

    container = build(settings)
    try:
        report = build_report(container)
    finally:
        container.close()
    if args.fmt == "pdf":
        data = render_pdf(report, args.lang)
    elif args.fmt == "html":
        data = render_html(report, args.lang).encode()
    else:
        data = json.dumps(report.to_json(), indent=2, ensure_ascii=False).encode() + b"\n"
    if str(args.out) == "-":
        if args.fmt == "pdf":
            print("fhirvault: error: a PDF needs --out FILE", file=sys.stderr)
            return 2
        sys.stdout.write(data.decode())
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    counts = report.counts()
    print(f"compliance report written to {args.out}: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
          file=sys.stderr)
    return 0
