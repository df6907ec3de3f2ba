#!/usr/bin/env python3
"""Bulk Data $export throughput: load N resources, export them all, download every file.

A fresh data directory served in-process (the real app and store, no network): N resources are
loaded as transaction Bundles (one Patient and 9 Observations per ten), then a system-level
``$export`` runs; the figures are the export job's resources/s (kick-off to completed manifest:
read, decrypt, policy, write sealed NDJSON) and the download's (decrypting the files).

Example::

    python bench/bulk_export.py --resources 100000 [--engine postgresql --database-url postgresql://…]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.web.app import create_app


def _bundle(start: int, count: int) -> dict[str, Any]:
    entries = []
    for n in range(start, start + count):
        pid = f"p{n // 10}"
        if n % 10 == 0:
            resource: dict[str, Any] = {"resourceType": "Patient", "id": pid, "gender": "female",
                                        "name": [{"family": f"Family{n}", "given": ["Bench"]}], "birthDate": "1970-01-01"}
        else:
            resource = {"resourceType": "Observation", "id": f"o{n}", "status": "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                        "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": "2026-01-01T10:00:00Z",
                        "valueQuantity": {"value": 60 + n % 40, "unit": "/min"}}
        entries.append({"resource": resource,
                        "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resources", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--database-url", default=None, help="PostgreSQL instead of the embedded SQLite")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="an existing data directory of an earlier run: the load is skipped")
    args = ap.parse_args(argv)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="fv-bulk-bench-")) / "data"
    cli: dict[str, Any] = {"data_dir": data_dir, "max_bundle_entries": max(args.batch, 5000)}
    if args.database_url:
        cli["database_url"] = args.database_url
    settings = load_settings(cli, environ={})
    reuse = (data_dir / "admin-client.json").exists()
    creds = json.loads((data_dir / "admin-client.json" if reuse else initialise(settings)).read_text())
    container = build(settings)
    with TestClient(create_app(container), base_url="http://bench") as c:
        token = c.post("/oauth2/token", data={"grant_type": "client_credentials"},
                       auth=(creds["client_id"], creds["client_secret"])).json()["access_token"]
        h = {"Authorization": f"Bearer {token}"}
        started = time.perf_counter()
        for start in range(0, 0 if reuse else args.resources, args.batch):
            r = c.post("/fhir", json=_bundle(start, min(args.batch, args.resources - start)),
                       headers={**h, "Content-Type": "application/fhir+json"})
            if r.status_code != 200:
                print(r.text[:500], file=sys.stderr)
                return 1
        load_s = time.perf_counter() - started
        print(f"data directory: {data_dir}")
        if not reuse:
            print(f"loaded {args.resources} resources in {load_s:.1f} s ({args.resources / load_s:.0f}/s)")

        started = time.perf_counter()
        r = c.get("/fhir/$export", headers={**h, "Prefer": "respond-async"})
        status = r.headers["Content-Location"]
        while (r := c.get(status, headers=h)).status_code == 202:
            time.sleep(0.2)
        export_s = time.perf_counter() - started
        if r.status_code != 200:
            print(f"export failed: {r.status_code} {r.text[:500]}", file=sys.stderr)
            return 1
        manifest = r.json()
        total = sum(o["count"] for o in manifest["output"])
        print(f"export job: {total} resources in {len(manifest['output'])} files, {export_s:.1f} s "
              f"({total / export_s:.0f} resources/s)")

        started = time.perf_counter()
        size = lines = 0
        for item in manifest["output"]:
            body = c.get(item["url"], headers=h).content
            size += len(body)
            lines += body.count(b"\n")
        download_s = time.perf_counter() - started
        print(f"download: {lines} resources, {size / 1e6:.1f} MB in {download_s:.1f} s "
              f"({lines / download_s:.0f} resources/s)")

        # Through a filter: every Observation decrypted, parsed and matched (the search engine's matcher).
        started = time.perf_counter()
        r = c.get("/fhir/$export", params={"_type": "Observation", "_typeFilter": "Observation?value-quantity=ge80"},
                  headers={**h, "Prefer": "respond-async"})
        status = r.headers["Content-Location"]
        while (r := c.get(status, headers=h)).status_code == 202:
            time.sleep(0.2)
        filtered_s = time.perf_counter() - started
        kept = sum(o["count"] for o in r.json()["output"])
        scanned = args.resources - (args.resources + 9) // 10
        print(f"export with _typeFilter=Observation?value-quantity=ge80: {kept} of {scanned} Observations in "
              f"{filtered_s:.1f} s ({scanned / filtered_s:.0f} scanned/s)")
        return 0 if lines == total == args.resources else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
