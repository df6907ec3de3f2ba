#!/usr/bin/env python3
"""NDJSON ``$import`` throughput against transaction Bundles, same data, same run, real servers.

The data is ``--patients`` carebundle patients (about 45 resources each, see _synthetic.py), with
ids chosen up front and references rewritten to them, so both paths store the same resources:

- old: each patient's transaction Bundle (``PUT Type/id`` entries), ``--clients`` at a time;
- new: the same resources as NDJSON files of ``--file-resources`` lines, put in the server's import
  directory and imported with one ``$import`` manifest (``Prefer: respond-async``, polled);
  the figure runs from kick-off to the completed manifest.

Each path gets its own fresh server (``fhirvault serve`` on loopback, SQLite). With ``--profile``
the importer also runs in-process under cProfile and the top functions are printed (where the time
goes). Example::

    python bench/bulk_import.py --patients 200 [--clients 4] [--file-resources 20000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _server
import _synthetic as syn
import httpx
import orjson

_URN = re.compile(rb'"urn:uuid:([0-9a-f-]{36})"')


def with_ids(bundle_json: bytes) -> list[dict[str, Any]]:
    """The bundle's resources with ids (the fullUrl's uuid) and references rewritten to Type/id."""
    bundle = orjson.loads(bundle_json)
    types = {e["fullUrl"]: e["resource"]["resourceType"] for e in bundle["entry"]}

    def fix(m: re.Match[bytes]) -> bytes:
        key = "urn:uuid:" + m.group(1).decode()
        return b'"' + types[key].encode() + b"/" + m.group(1) + b'"' if key in types else m.group(0)

    out = []
    for e in bundle["entry"]:
        resource = {**e["resource"], "id": e["fullUrl"].rsplit(":", 1)[1]}
        out.append(orjson.loads(_URN.sub(fix, orjson.dumps(resource))))
    return out


def cohort(patients: int, seed: int) -> list[list[dict[str, Any]]]:
    path = syn.ensure_cohort(syn.DEFAULT_CACHE, patients, seed)
    return [with_ids(body) for _n, body in syn.iter_bundles(path, patients)]


def transaction(resources: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r,
         "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources]})


def ndjson_files(groups: list[list[dict[str, Any]]], per_file: int) -> Iterator[bytes]:
    lines: list[bytes] = []
    for group in groups:
        for r in group:
            lines.append(orjson.dumps(r))
            if len(lines) >= per_file:
                yield b"\n".join(lines) + b"\n"
                lines = []
    if lines:
        yield b"\n".join(lines) + b"\n"


async def run_bundles(base: str, token: str, bodies: list[bytes], clients: int) -> float:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json",
               "Prefer": "return=minimal"}
    queue = list(reversed(bodies))
    async with httpx.AsyncClient(base_url=base + "/fhir", headers=headers, timeout=600) as client:
        async def worker() -> None:
            while queue:
                body = queue.pop()
                r = await client.post("", content=body)
                if r.status_code != 200:
                    raise RuntimeError(f"transaction refused: {r.status_code} {r.text[:500]}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - started


def cpu_seconds(srv: _server.Server) -> float:
    """User + system CPU time of the server's processes so far: robust to other load on a shared box."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in srv.pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def run_import(srv: _server.Server, files: list[bytes]) -> tuple[float, dict[str, Any]]:
    folder = srv.data_dir / "import"
    folder.mkdir(exist_ok=True)
    inputs = []
    for n, data in enumerate(files):
        (folder / f"part-{n}.ndjson").write_bytes(data)
        inputs.append({"name": "input", "part": [{"name": "url", "valueUri": f"part-{n}.ndjson"}]})
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "inputFormat", "valueCode": "application/fhir+ndjson"}, *inputs]}
    headers = {"Authorization": f"Bearer {srv.token()}", "Prefer": "respond-async"}
    with httpx.Client(base_url=srv.base + "/fhir", headers=headers, timeout=600) as c:
        started = time.perf_counter()
        r = c.post("/$import", json=body)
        if r.status_code != 202:
            raise RuntimeError(f"$import refused: {r.status_code} {r.text[:500]}")
        status = r.headers["Content-Location"]
        while True:
            s = c.get(status)
            if s.status_code == 200:
                return time.perf_counter() - started, dict(s.json())
            if s.status_code != 202:
                raise RuntimeError(f"$import failed: {s.status_code} {s.text[:500]}")
            time.sleep(0.1)


def profile_in_process(files: list[bytes], work: Path) -> str:
    """cProfile of the importer alone (no HTTP), on the first file: where the time goes."""
    from fhirvault.bootstrap import initialise
    from fhirvault.config import load_settings
    from fhirvault.container import build
    from fhirvault.domain.scopes import Grants, parse_scopes
    from fhirvault.services.auth import Principal
    from fhirvault.services.bulk_import import BulkImporter
    from fhirvault.services.repository import RequestContext

    settings = load_settings({"data_dir": work / "profile"}, environ={})
    initialise(settings)
    container = build(settings)
    try:
        principal = Principal("bench", settings.tenant, "system/*.*", Grants(tuple(parse_scopes("system/*.*"))),
                              2**40, "bench")
        importer = BulkImporter(container.repository)
        prof = cProfile.Profile()
        prof.enable()
        importer.import_file(RequestContext(principal, "bench"), "bench", files[0])
        prof.disable()
    finally:
        container.close()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(20)
    return out.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--clients", type=int, default=4, help="concurrent transaction Bundles (old path)")
    p.add_argument("--file-resources", type=int, default=20_000, help="lines per NDJSON file (new path)")
    p.add_argument("--profile", action="store_true", help="also profile the importer in-process (cProfile)")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args()

    groups = cohort(args.patients, args.seed)
    total = sum(len(g) for g in groups)
    bodies = [transaction(g) for g in groups]
    files = list(ndjson_files(groups, args.file_resources))
    print(f"{args.patients} patients, {total} resources; {len(bodies)} bundles, {len(files)} NDJSON files",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="fv-bench-import-"))
    results: dict[str, Any] = {"patients": args.patients, "resources": total}
    try:
        assert _server.cli(work / "bundles", "init").returncode == 0
        srv = _server.start(work / "bundles", work / "bundles.log")
        try:
            cpu = cpu_seconds(srv)
            seconds = asyncio.run(run_bundles(srv.base, srv.token(), bodies, args.clients))
            cpu = cpu_seconds(srv) - cpu
        finally:
            srv.stop()
        results["transaction_bundles"] = {"seconds": round(seconds, 2), "resources_per_s": round(total / seconds),
                                          "server_cpu_s": round(cpu, 2), "resources_per_cpu_s": round(total / cpu)}
        print(f"transaction Bundles ({args.clients} clients): {seconds:.1f} s, {total / seconds:,.0f} resources/s; "
              f"server CPU {cpu:.1f} s, {total / cpu:,.0f} resources per CPU-second", flush=True)
        assert _server.cli(work / "ndjson", "init").returncode == 0
        srv = _server.start(work / "ndjson", work / "ndjson.log")
        try:
            cpu = cpu_seconds(srv)
            seconds, manifest = run_import(srv, files)
            cpu = cpu_seconds(srv) - cpu
        finally:
            srv.stop()
        stored = sum(o["count"] for o in manifest["output"])
        if stored != total:
            raise RuntimeError(f"$import stored {stored} of {total} resources: {manifest['error']}")
        results["ndjson_import"] = {"seconds": round(seconds, 2), "resources_per_s": round(total / seconds),
                                    "server_cpu_s": round(cpu, 2), "resources_per_cpu_s": round(total / cpu)}
        print(f"$import NDJSON: {seconds:.1f} s, {total / seconds:,.0f} resources/s; "
              f"server CPU {cpu:.1f} s, {total / cpu:,.0f} resources per CPU-second", flush=True)
        if args.profile:
            print(profile_in_process(files, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
