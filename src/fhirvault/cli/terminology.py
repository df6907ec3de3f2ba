"""``fhirvault terminology load FILE | list``: national or local terminology from FHIR packages.

A package is an npm-style ``.tgz`` (``package/package.json`` and ``package/*.json``); its
CodeSystems and ValueSets are stored in the database (every worker sees them at its next
terminology request, backups carry them) and used by $lookup, $expand and $validate-code.
Loading a package with the same name again replaces it. Each load is written to the audit trail.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fhirvault.config import Settings


def register(sub: Any, settings_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("terminology", help="load FHIR terminology packages (CodeSystems, ValueSets)")
    tsub = p.add_subparsers(dest="terminology_command", required=True)
    p_load = tsub.add_parser("load", help="store the CodeSystems and ValueSets of a FHIR package (.tgz)")
    settings_options(p_load)
    p_load.add_argument("file", type=Path, help="the package file, e.g. hl7.fhir.fr.core-2.1.0.tgz")
    p_list = tsub.add_parser("list", help="list the loaded packages")
    settings_options(p_list)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from fhirvault.container import build
    from fhirvault.services.terminology import PackageError, TerminologyService

    data = None
    if args.terminology_command == "load":
        try:
            data = args.file.read_bytes()
        except OSError as exc:
            print(f"fhirvault: error: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
            return 2
    container = build(settings)
    try:
        service = TerminologyService(container.store, container.clock)
        if data is None:
            for row in service.packages():
                print(f"{row['name']}@{row['version']}  {row['codeSystems']} code systems, "
                      f"{row['valueSets']} value sets, loaded {row['loaded']}")
            return 0
        try:
            row = service.load_package(data)
        except PackageError as exc:
            print(f"fhirvault: error: {args.file}: {exc}", file=sys.stderr)
            return 2
        container.audit.record_system_event(container.store, container.clock, "config-change",
                                            f"terminology package {row['name']}@{row['version']} loaded")
        print(f"loaded {row['name']}@{row['version']}: {row['codeSystems']} code systems, "
              f"{row['valueSets']} value sets")
        return 0
    finally:
        container.close()
