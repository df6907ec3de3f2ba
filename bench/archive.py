#!/usr/bin/env python3
"""Reversibility archive throughput: ``fhirvault archive export``, ``verify`` and ``import``.

A fresh data directory is loaded with ``--patients`` carebundle patients (about 45 resources each,
through the NDJSON importer, in-process), plus ``--updates`` new versions of every Patient so the
archive carries history; then the three CLI commands run as an operator would run them (a
process each), timed from outside. Figures: versions/s for export and import, MB/s for verify.
Example::

    python bench/archive.py --patients 200 [--updates 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _server
import orjson
from bulk_import import cohort

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.domain.scopes import Grants, parse_scopes
from fhirvault.services.auth import Principal
from fhirvault.services.bulk_import import BulkImporter
from fhirvault.services.repository import RequestContext


def load(data_dir: Path, patients: int, seed: int, updates: int) -> int:
    settings = load_settings({"data_dir": data_dir}, environ={})
    initialise(settings)
    container = build(settings)
    try:
        ctx = RequestContext(Principal("bench", settings.tenant, "system/*.*",
                                       Grants(tuple(parse_scopes("system/*.*"))), 2**40, "bench"), "bench")
        importer = BulkImporter(container.repository)
        groups = cohort(patients, seed)
        resources = [r for g in groups for r in g]
        outcome = importer.import_file(ctx, "bench", b"\n".join(orjson.dumps(r) for r in resources))
        assert outcome.committed, outcome.errors[:3]
        versions = len(resources)
        for n in range(updates):
            again = [{**r, "active": n % 2 == 0} for r in resources if r["resourceType"] == "Patient"]
            assert importer.import_file(ctx, "bench", b"\n".join(orjson.dumps(r) for r in again)).committed
            versions += len(again)
        return versions
    finally:
        container.close()


def timed(*args: str) -> tuple[float, dict[str, Any] | str]:
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "fhirvault.cli.main", *args], capture_output=True, text=True,
                       env=_server.clean_env(), timeout=3600, check=False)
    seconds = time.perf_counter() - started
    if r.returncode != 0:
        raise RuntimeError(f"{args[:2]} failed: {r.stdout[-500:]} {r.stderr[-1000:]}")
    try:
        return seconds, dict(json.loads(r.stdout))
    except json.JSONDecodeError:
        return seconds, r.stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--updates", type=int, default=2, help="extra versions of every Patient")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fv-bench-archive-"))
    try:
        versions = load(work / "data", args.patients, args.seed, args.updates)
        archive = work / "archive"
        seconds, out = timed("archive", "export", "--data-dir", str(work / "data"), "--out", str(archive),
                             "--yes-plaintext")
        assert isinstance(out, dict) and out["versions"] == versions, out
        size = sum(f.stat().st_size for f in archive.rglob("*") if f.is_file())
        results: dict[str, Any] = {"versions": versions, "resources": out["resources"],
                                   "archive_mb": round(size / 1e6, 1),
                                   "export": {"seconds": round(seconds, 2), "versions_per_s": round(versions / seconds)}}
        seconds, _ = timed("archive", "verify", str(archive))
        results["verify"] = {"seconds": round(seconds, 2), "mb_per_s": round(size / 1e6 / seconds, 1)}
        seconds, out = timed("archive", "import", str(archive), "--data-dir", str(work / "new"))
        assert isinstance(out, dict) and out["versions"] == versions, out
        results["import"] = {"seconds": round(seconds, 2), "versions_per_s": round(versions / seconds)}
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
