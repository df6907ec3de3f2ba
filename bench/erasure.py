"""Erasure and retention costs on a SQLite data directory (in process, no HTTP).

    .venv/bin/python bench/erasure.py --patients 2000 --obs 10

Creates the patients (each with ``--obs`` observations, each updated once), then measures:
the erasure of one patient (one transaction: its versions, current rows and tags, its key; then the WAL
checkpoint), a read with and without the restriction check, and a dry run of the retention job.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.domain.scopes import Grants, parse_scopes
from fhirvault.services.audit import AuditRecord
from fhirvault.services.auth import Principal
from fhirvault.services.repository import RequestContext
from fhirvault.services.retention import RetentionJob

PATIENT = {"resourceType": "Patient", "name": [{"family": "Bench", "given": ["Erasure"]}], "birthDate": "1970-01-01"}


def observation(pid: str) -> dict[str, object]:
    return {"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}


async def seed(container: object, ctx: RequestContext, patients: int, obs: int) -> list[str]:
    repo = container.repository  # type: ignore[attr-defined]
    ids = []
    for _ in range(patients):
        p = await repo.create(ctx, "Patient", dict(PATIENT))
        for _ in range(obs):
            o = await repo.create(ctx, "Observation", observation(p.id))
            await repo.update(ctx, "Observation", o.id, dict(observation(p.id), id=o.id, status="amended"), None)
        ids.append(p.id)
    return ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--obs", type=int, default=10)
    ap.add_argument("--erase", type=int, default=20, help="patients erased (timed one by one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings({"data_dir": Path(tmp) / "data"}, environ={})
        initialise(settings)
        c = build(settings)
        p = Principal("bench", settings.tenant, "system/*.cruds", Grants(tuple(parse_scopes("system/*.cruds"))),
                      2**40, "t")
        ctx = RequestContext(p, "bench")
        started = time.perf_counter()
        ids = asyncio.run(seed(c, ctx, args.patients, args.obs))
        versions = c.store.tenant_usage(settings.tenant)[1]
        print(f"seeded {args.patients} patients, {versions} versions in {time.perf_counter() - started:.1f} s")
        lc = c.lifecycle
        assert lc is not None

        async def reads(n: int) -> float:
            t = time.perf_counter()
            for pid in ids[-n:]:
                await c.repository.read(ctx, "Patient", pid)
            return (time.perf_counter() - t) / n * 1e3

        asyncio.run(reads(200))  # warm the caches
        with_check, without = [], []
        for _ in range(3):  # alternated, best of three: the check's cost, not the machine's noise
            with_check.append(asyncio.run(reads(300)))
            c.repository.lifecycle = None
            without.append(asyncio.run(reads(300)))
            c.repository.lifecycle = lc
        print(f"read (audited, in process): {min(with_check):.3f} ms with the restriction check, "
              f"{min(without):.3f} ms without (best mean of 3 x 300)")
        t = time.perf_counter()
        report = RetentionJob(c.store, lc, c.audit, c.clock, lc.rules).run(dry_run=True)
        print(f"retention dry run over {report.patients} patients: {time.perf_counter() - t:.2f} s")
        phases: dict[str, list[float]] = {"checks and reads (off the writer)": [], "transaction (holds the writer)": [],
                                          "WAL checkpoint + ledger file": []}
        for pid in ids[: args.erase]:
            t0 = time.perf_counter()
            job = lc.erase_job(pid, lambda _r: AuditRecord(0, "gdpr-erase", "0", 200, "bench", category="system"),
                               override_retention=True)
            t1 = time.perf_counter()
            result = c.store.write_sync("bench.erase", job)
            t2 = time.perf_counter()
            lc.finish(result)
            t3 = time.perf_counter()
            for (_name, bucket), ms in zip(phases.items(), (t1 - t0, t2 - t1, t3 - t2), strict=True):
                bucket.append(ms * 1e3)
        print(f"erase one patient ({1 + 2 * args.obs} versions) among {versions}, median (max) of {args.erase}:")
        for name, values in phases.items():
            print(f"  {name}: {statistics.median(values):.1f} ms ({max(values):.1f})")
        c.close()


if __name__ == "__main__":
    main()
