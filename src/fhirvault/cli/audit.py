"""``fhirvault audit verify``: check the tamper-evident audit log of a data directory."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from fhirvault.config import Settings


def register(sub: Any, settings_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p_audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = p_audit.add_subparsers(dest="audit_command", required=True)
    p_verify = audit_sub.add_parser(
        "verify", help="recompute the Merkle tree; check entries, signed checkpoints and witnesses")
    settings_options(p_verify)
    p_verify.add_argument("--witness", action="append", default=[], metavar="URL",
                          help="an extra witness to check against (file:///path), besides the configured ones")
    p_verify.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from fhirvault.adapters.witness import WitnessConfigError
    from fhirvault.services.audit_verify import verify_data_dir

    try:
        report = verify_data_dir(settings, args.witness)
    except WitnessConfigError as exc:
        print(f"fhirvault: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a missing data dir or a wrong key file: say so, no traceback
        print(f"fhirvault: error: cannot open the audit log: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
        for problem in report.problems[1:]:
            print("  also: " + problem)
    return 0 if report.ok else 1
