#!/usr/bin/env python3
"""FHIR search latency benchmark on a store of carebundle (Synthea-style) patients.

Phase 1 (optional, ``--load-patients N``): ingest N carebundle patient bundles
with the transaction ingest of ``ingest.py`` (same cache, same progress lines)
to build a store of the wanted size, and print the resource count reached.

Phase 2: discover query parameters from the data through the API (a sample of
Patients spread over the store by probing random birth dates; for some of them
their Observation codes, categories and dates, Encounter dates, Conditions and
MedicationRequest statuses), then run with ``--clients`` virtual users for
``--duration`` seconds (after ``--warmup``) an even mix of eight searches, each
with ``_count=100``:

* ``Observation?patient=X&code=Y``
* ``Patient?family=F&birthdate=B``
* ``Encounter?date=geD&patient=X``
* ``Condition?patient=X&_include=Condition:subject``
* ``Patient?identifier=S|V``
* ``Observation?patient=X&category=C&date=geA&date=leB`` (a window around one of X's)
* ``Observation?code=Y&date=geD&date=ltD+1`` (every patient's, one day)
* ``MedicationRequest?patient=X&status=S``

and report, per query kind: count, req/s, p50/p95/p99/max latency, mean entries
returned and errors. Target (issue): p95 <= 20 ms on a store of >= 1 million
resources.

Example::

    python bench/search.py --base-url http://127.0.0.1:8080/fhir \\
        --client-file /tmp/fv/admin-client.json [--load-patients 200] \\
        --clients 8 --duration 30 [--db /tmp/fv/fhirvault.sqlite3] [--json out.json]

See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import _loadgen as lg
import aiohttp
import ingest as ing
from yarl import URL

KINDS: tuple[str, ...] = (
    "observation", "patient", "encounter", "condition", "identifier", "obs-range", "obs-day", "medication",
)
SHAPES: dict[str, str] = {
    "observation": "Observation?patient=X&code=Y",
    "patient": "Patient?family=F&birthdate=B",
    "encounter": "Encounter?date=geD&patient=X",
    "condition": "Condition?patient=X&_include=Condition:subject",
    "identifier": "Patient?identifier=S|V",
    "obs-range": "Observation?patient=X&category=C&date=geA&date=leB",
    "obs-day": "Observation?code=Y&date=geD&date=ltD+1",
    "medication": "MedicationRequest?patient=X&status=S",
}
PAGE = 100  # _count of every measured search
TARGET_P95_MS = 20.0
TARGET_STORE = 1_000_000


def log(msg: str) -> None:
    print(msg, flush=True)


def q(value: str) -> str:
    return quote(value, safe="")


# ---------------------------------------------------------------------------
# Discovery (through the API)
# ---------------------------------------------------------------------------


Sampled = tuple[str, str, str, str]  # a sampled Patient: id, family, birthDate, first identifier (system|value)


@dataclass
class Details:
    codes: list[str]  # Observation codes, system|code
    encounter_days: list[str]
    conditions: int
    observations: list[tuple[str, str, str]]  # (category code, system|code, effective day)
    med_statuses: list[str]


class Discovery:
    """Finds real query parameters in the store with a handful of searches."""

    def __init__(self, session: aiohttp.ClientSession, auth: lg.Auth, base_url: str) -> None:
        self.session = session
        self.auth = auth
        self.base = base_url.rstrip("/")
        self.requests = 0

    async def search(self, rtype: str, query: str) -> list[dict[str, Any]]:
        """Resources of the first page of ``rtype?query`` (matches only)."""
        url = URL(f"{self.base}/{rtype}?{query}", encoded=True)
        self.requests += 1
        async with self.session.get(url, headers=self.auth.plain_headers) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(
                    f"discovery search {rtype}?{query} answered {resp.status}: "
                    f"{body[: lg.BODY_SNIPPET].decode('utf-8', 'replace')}"
                )
        doc = lg.loads(body)
        return [
            e["resource"]
            for e in doc.get("entry") or ()
            if (e.get("search") or {}).get("mode", "match") == "match" and "resource" in e
        ]

    @staticmethod
    def _patient(res: dict[str, Any]) -> Sampled | None:
        family = next((n.get("family") for n in res.get("name") or () if n.get("family")), None)
        birth = res.get("birthDate")
        if not (res.get("id") and family and birth):
            return None
        ident = next((f"{i['system']}|{i['value']}" for i in res.get("identifier") or ()
                      if i.get("system") and i.get("value")), "")
        return res["id"], family, birth, ident

    async def patients(self, target: int, rng: random.Random) -> list[Sampled]:
        """(id, family, birthDate) of up to ``target`` patients spread over the store.

        The first page of Patients gives the birth-date range; then Patients born on
        random dates in that range are added, so the sample is not just the oldest rows.
        """
        found: dict[str, Sampled] = {}
        # birthdate=ge1800-01-01 matches every Patient with a birth date, and gives the server
        # an indexed criterion (fhirvault refuses unfiltered searches over 10,000 resources).
        first = await self.search(
            "Patient", f"birthdate=ge1800-01-01&_count={PAGE}&_elements=name,birthDate,identifier"
        )
        for res in first:
            if (p := self._patient(res)) is not None:
                found[p[0]] = p
        if not found:
            return []
        days = sorted(dt.date.fromisoformat(p[2][:10]).toordinal() for p in found.values())
        lo, hi = days[0], days[-1]
        # Keep only a few of the first page, so that most of the sample comes from probes.
        keep = dict(rng.sample(sorted(found.items()), min(len(found), max(1, target // 10))))
        probes = 0
        while len(keep) < target and probes < 4 * target and hi > lo:
            probes += 1
            day = dt.date.fromordinal(rng.randint(lo, hi)).isoformat()
            for res in await self.search(
                "Patient", f"birthdate={day}&_count={PAGE}&_elements=name,birthDate,identifier"
            ):
                if (p := self._patient(res)) is not None:
                    keep[p[0]] = p
        if len(keep) < target:  # small store: top up from the first page
            for pid, p in found.items():
                if len(keep) >= target:
                    break
                keep.setdefault(pid, p)
        return list(keep.values())

    async def details(self, pid: str) -> Details:
        """A patient's Observation codes (system|code), Encounter start dates, Condition count,
        Observation (category, date) pairs and MedicationRequest statuses."""
        ref = q(f"Patient/{pid}")
        obs = await self.search(
            "Observation", f"patient={ref}&_count={PAGE}&_elements=code,category,effectiveDateTime"
        )
        codes: list[str] = []
        dated: list[tuple[str, str, str]] = []  # (category, code, day)
        for res in obs:
            code = next((f"{c['system']}|{c['code']}" if c.get("system") else c["code"]
                         for c in (res.get("code") or {}).get("coding") or () if c.get("code")), None)
            if code is None:
                continue
            codes.append(code)
            category = next((c["code"] for cat in res.get("category") or ()
                             for c in cat.get("coding") or () if c.get("code")), None)
            when = res.get("effectiveDateTime")
            if category and isinstance(when, str) and len(when) >= 10:
                dated.append((category, code, when[:10]))
        meds = await self.search("MedicationRequest", f"patient={ref}&_count={PAGE}&_elements=status")
        statuses = sorted({str(m["status"]) for m in meds if m.get("status")})
        enc = await self.search("Encounter", f"patient={ref}&_count={PAGE}&_elements=period")
        dates = [
            res["period"]["start"][:10]
            for res in enc
            if isinstance(res.get("period"), dict) and res["period"].get("start")
        ]
        cond = await self.search("Condition", f"patient={ref}&_count={PAGE}&_elements=code")
        return Details(sorted(set(codes)), dates, len(cond), dated, statuses)


async def discover(
    args: argparse.Namespace, session: aiohttp.ClientSession, auth: lg.Auth
) -> dict[str, Any]:
    """Query URLs per kind (relative to the base, already encoded) and what was found."""
    rng = random.Random(args.seed)
    d = Discovery(session, auth, args.base_url)
    t0 = time.perf_counter()
    patients = await d.patients(args.sample_patients, rng)
    if not patients:
        raise RuntimeError("no Patient with a family name and a birth date in the store")
    detail = rng.sample(patients, min(len(patients), args.detail_patients))
    urls: dict[str, list[str]] = {k: [] for k in KINDS}
    n_codes = n_enc = n_cond = 0
    for pid, _family, _birth, _ident in detail:
        det = await d.details(pid)
        codes, dates = det.codes, det.encounter_days
        ref = q(f"Patient/{pid}")
        n_codes += len(codes)
        n_enc += len(dates)
        n_cond += det.conditions
        for category, code, day in det.observations:
            # a window of 0-90 days on each side of one of the patient's observations
            when = dt.date.fromisoformat(day)
            lo = when - dt.timedelta(days=rng.randint(0, 90))
            hi = when + dt.timedelta(days=rng.randint(0, 90))
            urls["obs-range"].append(
                f"Observation?patient={ref}&category={q(category)}&date=ge{lo}&date=le{hi}&_count={PAGE}"
            )
            # every patient's observations of that code on that day (a population query)
            urls["obs-day"].append(
                f"Observation?code={q(code)}&date=ge{when}&date=lt{when + dt.timedelta(days=1)}&_count={PAGE}"
            )
        for status in det.med_statuses:
            urls["medication"].append(f"MedicationRequest?patient={ref}&status={status}&_count={PAGE}")
        for code in codes:
            urls["observation"].append(f"Observation?patient={ref}&code={q(code)}&_count={PAGE}")
        for start in dates:
            # a lower bound at or up to a year before the encounter, so the search matches it
            day = dt.date.fromisoformat(start) - dt.timedelta(days=rng.randint(0, 365))
            urls["encounter"].append(
                f"Encounter?date=ge{day.isoformat()}&patient={ref}&_count={PAGE}"
            )
        urls["condition"].append(
            f"Condition?patient={ref}&_include=Condition:subject&_count={PAGE}"
        )
    for _pid, family, birth, ident in patients:
        urls["patient"].append(f"Patient?family={q(family)}&birthdate={birth}&_count={PAGE}")
        if ident:
            urls["identifier"].append(f"Patient?identifier={q(ident)}&_count={PAGE}")
    missing = [k for k in KINDS if not urls[k]]
    if missing:
        raise RuntimeError(f"discovery found no parameters for: {', '.join(missing)}")
    return {
        "urls": urls,
        "summary": {
            "patients_sampled": len(patients),
            "patients_detailed": len(detail),
            "observation_codes": n_codes,
            "encounters": n_enc,
            "conditions": n_cond,
            "distinct_queries": {k: len(set(v)) for k, v in urls.items()},
            "requests": d.requests,
            "seconds": round(time.perf_counter() - t0, 2),
        },
    }


# ---------------------------------------------------------------------------
# Measured search loop
# ---------------------------------------------------------------------------


async def run_worker_async(spec: lg.WorkerSpec, barrier: lg.Barrier) -> dict[str, Any]:
    o = spec.options
    ops = {k: lg.Op("search", k) for k in KINDS}
    rec = lg.Recorder(ops.values())
    auth = lg.Auth(
        token=o["token"],
        client_file=o["client_file"],
        token_url=o["token_url"],
        scope=o["scope"],
        timeout_s=o["timeout"],
    )
    session = lg.make_session(spec.n_users, o["timeout"])
    base = o["base_url"].rstrip("/")
    pools = {k: [URL(f"{base}/{u}", encoded=True) for u in o["urls"][k]] for k in KINDS}
    entries = {k: [0, 0, 0] for k in KINDS}  # [entries, matches, responses with a next link]
    iterations = 0

    async def user(uidx: int) -> None:
        nonlocal iterations
        rng = random.Random(f"{o['seed']}/{uidx}")
        i = uidx  # round-robin over the kinds, users start at different kinds
        while True:
            kind = KINDS[i % len(KINDS)]
            i += 1
            url = rng.choice(pools[kind])
            op = ops[kind]
            t0 = lg.perf_counter_ns()
            if t0 >= rec.measure_end:
                return
            try:
                async with session.get(url, headers=auth.plain_headers) as resp:
                    data = await resp.read()
                    status = resp.status
            except Exception as exc:
                in_window = rec.sample(op, t0, lg.perf_counter_ns())
                rec.error(op, in_window, type(exc).__name__, str(exc) or repr(exc))
                continue
            in_window = rec.sample(op, t0, lg.perf_counter_ns())
            if status != 200:
                if status == 401:
                    auth.invalidate()
                rec.error(op, in_window, f"HTTP {status}", data)
                continue
            if in_window:
                iterations += 1
                doc = lg.loads(data)
                got = doc.get("entry") or ()
                stats = entries[kind]
                stats[0] += len(got)
                stats[1] += sum(1 for e in got if e.get("search", {}).get("mode") == "match")
                if any(link.get("relation") == "next" for link in doc.get("link") or ()):
                    stats[2] += 1

    try:
        await auth.start()
        lg.tune_gc()
        if barrier is not None:
            await asyncio.to_thread(barrier.wait, 120.0)
        rec.start(lg.perf_counter_ns(), o["warmup"], o["duration"])
        cpu_mark: list[float] = []
        asyncio.get_running_loop().call_later(
            o["warmup"], lambda: cpu_mark.append(time.process_time())
        )
        await asyncio.gather(
            *(user(u) for u in range(spec.first_user, spec.first_user + spec.n_users))
        )
        cpu_s = time.process_time() - cpu_mark[0] if cpu_mark else 0.0
        result = rec.result(iterations, cpu_s, o["duration"])
        result["token_fetches"] = auth.refreshes
        result["entries"] = entries
        return result
    finally:
        await session.close()
        await auth.close()


def run_worker(spec: lg.WorkerSpec, barrier: lg.Barrier) -> dict[str, Any]:
    return lg.run_async(run_worker_async(spec, barrier), use_uvloop=spec.options["uvloop"])


# ---------------------------------------------------------------------------
# CLI / report
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="FHIR search latency benchmark (carebundle patients; optional load phase)."
    )
    ing.add_common_args(p)
    p.add_argument(
        "--load-patients",
        type=int,
        default=0,
        metavar="N",
        help="phase 1: ingest N carebundle patients first (default: 0, use the store as is)",
    )
    p.add_argument(
        "--load-offset",
        type=int,
        default=0,
        metavar="K",
        help="phase 1: skip the first K bundles of the cohort (grow a store in steps)",
    )
    p.add_argument(
        "--load-clients", type=int, default=8, help="phase 1: concurrent connections (default: 8)"
    )
    p.add_argument(
        "--load-max-seconds",
        type=float,
        default=0.0,
        metavar="S",
        help="phase 1: stop sending bundles after S seconds, 0 = no limit (default: 0)",
    )
    p.add_argument(
        "--progress-every",
        type=int,
        default=50_000,
        metavar="N",
        help="phase 1: print the ingest rate every N resources, 0 = never (default: %(default)s)",
    )
    p.add_argument("--clients", type=int, default=8, help="search virtual users (default: 8)")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds (default: 30)")
    p.add_argument(
        "--warmup", type=float, default=3.0, help="seconds excluded from the stats (default: 3)"
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="load-generator processes; clients are split across them (default: 1)",
    )
    p.add_argument(
        "--sample-patients",
        type=int,
        default=200,
        help="patients sampled for the Patient?family&birthdate queries (default: 200)",
    )
    p.add_argument(
        "--detail-patients",
        type=int,
        default=100,
        help="sampled patients whose Observations/Encounters/Conditions are read for the "
        "other queries (default: 100)",
    )
    args = p.parse_args(argv)
    ing.finish_common_args(p, args)
    if min(args.clients, args.processes, args.load_clients, args.sample_patients) < 1:
        p.error("--clients, --processes, --load-clients and --sample-patients must be >= 1")
    if args.detail_patients < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("--detail-patients must be >= 1, --duration > 0 and --warmup >= 0")
    if min(args.load_patients, args.load_offset, args.progress_every, args.load_max_seconds) < 0:
        p.error("--load-patients, --load-offset, --load-max-seconds, --progress-every must be >= 0")
    return args


async def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Phase 1 (load) and discovery; returns the load report, store size and query URLs."""
    out: dict[str, Any] = {"load": None}
    if args.load_patients:
        t0 = time.perf_counter()
        load = await ing.ingest_cohort(
            args,
            patients=args.load_patients,
            offset=args.load_offset,
            clients=args.load_clients,
            progress_every=args.progress_every,
            max_seconds=args.load_max_seconds,
            log=log,
        )
        load["wall_s"] = round(time.perf_counter() - t0, 1)
        out["load"] = load
        ing.print_ingest(
            load,
            f"\n== phase 1: ingest of {args.load_patients:,} patients "
            f"({args.load_clients} clients, seed {args.seed})",
        )
        print(flush=True)
    auth = ing.make_auth(args)
    session = lg.make_session(4, args.timeout)
    try:
        await auth.start()
        counts = await ing.count_store(args, session, auth)
        out["store"] = {
            "resources": sum(counts.values()) if counts else None,
            "by_type": counts,
            "db": ing.db_sizes(args.db),
        }
        found = await discover(args, session, auth)
    finally:
        await session.close()
        await auth.close()
    out.update(found)
    return out


def build_report(
    args: argparse.Namespace, prep: dict[str, Any], merged: lg.Merged, results: list[dict[str, Any]]
) -> dict[str, Any]:
    elapsed = merged.elapsed_s
    queries: dict[str, Any] = {}
    for kind in KINDS:
        s = lg.summarize(*lg.group(merged, [f"search {kind}"]), elapsed)
        tot = [sum(r["entries"][kind][i] for r in results) for i in range(3)]
        ok = s["count"] - s["errors"]
        s["query"] = SHAPES[kind]
        s["mean_entries"] = round(tot[0] / ok, 2) if ok > 0 else 0.0
        s["mean_matches"] = round(tot[1] / ok, 2) if ok > 0 else 0.0
        s["paged"] = tot[2]
        queries[kind] = s
    overall = lg.summarize(*lg.group(merged, [f"search {k}" for k in KINDS]), elapsed)
    store = prep["store"]["resources"]
    worst_p95 = max(queries[k]["p95_ms"] for k in KINDS)
    return {
        "benchmark": "search",
        "config": {
            "base_url": args.base_url,
            "clients": args.clients,
            "processes": args.processes,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "seed": args.seed,
            "count": PAGE,
            "json_lib": lg.JSON_LIB,
            "uvloop": not args.no_uvloop and lg.uvloop_available(),
        },
        "load": prep["load"],
        "store": prep["store"],
        "discovery": prep["summary"],
        "elapsed_s": round(elapsed, 3),
        "loadgen_cpu_s": round(merged.cpu_s, 2),
        "token_fetches": merged.token_fetches,
        "queries": queries,
        "overall": overall,
        "target": {
            "p95_ms": TARGET_P95_MS,
            "store_resources": TARGET_STORE,
            "worst_p95_ms": worst_p95,
            "p95_met": worst_p95 <= TARGET_P95_MS,
            "store_large_enough": bool(store and store >= TARGET_STORE),
        },
        "errors": {
            "measured": overall["errors"],
            "outside_window": merged.outside_errors,
            "samples": [
                {
                    "query": key.split("|", 1)[0],
                    "status": key.split("|", 1)[1],
                    "count": c,
                    "body": b,
                }
                for key, (c, b) in merged.error_samples.items()
            ],
        },
    }


HEADER = (
    f"{'query':<50}{'count':>8}{'req/s':>9}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}"
    f"{'max ms':>8}{'entries':>8}{'errors':>7}"
)


def row(label: str, s: dict[str, Any], entries: str) -> str:
    return (
        f"{label:<50}{s['count']:>8}{s['rps']:>9.1f}{s['p50_ms']:>8.2f}{s['p95_ms']:>8.2f}"
        f"{s['p99_ms']:>8.2f}{s['max_ms']:>8.2f}{entries:>8}{s['errors']:>7}"
    )


def print_report(report: dict[str, Any]) -> None:
    c, store, disc = report["config"], report["store"], report["discovery"]
    print(
        f"== phase 2: search  {c['base_url']}  clients={c['clients']} processes={c['processes']} "
        f"warmup={c['warmup_s']:g}s duration={c['duration_s']:g}s _count={c['count']}"
    )
    size = f"{store['resources']:,}" if store["resources"] is not None else "unknown"
    db = store["db"]
    db_text = f"; database {ing.mb(db['db_bytes'])} + WAL {ing.mb(db['wal_bytes'])}" if db else ""
    print(f"store: {size} resources{db_text}")
    print(
        f"discovery: {disc['patients_sampled']} patients sampled, {disc['patients_detailed']} "
        f"detailed ({disc['observation_codes']} observation codes, {disc['encounters']} "
        f"encounters, {disc['conditions']} conditions), {disc['requests']} requests in "
        f"{disc['seconds']:.1f} s; distinct queries {disc['distinct_queries']}"
    )
    elapsed = report["elapsed_s"]
    cpu_pct = 100.0 * report["loadgen_cpu_s"] / elapsed if elapsed > 0 else 0.0
    print(
        f"measured {elapsed:.2f} s, load-generator CPU {cpu_pct:.0f}% of one core, "
        f"{report['token_fetches']} token fetches\n"
    )
    print(HEADER)
    for s in report["queries"].values():
        print(row(s["query"], s, f"{s['mean_entries']:.2f}"))
    print(row("overall", report["overall"], ""))
    paged = {k: s["paged"] for k, s in report["queries"].items() if s["paged"]}
    if paged:
        print(f"responses with more than {c['count']} matches (a next link): {paged}")
    t = report["target"]
    verdict = "met" if t["p95_met"] else "NOT met"
    scale = (
        ""
        if t["store_large_enough"]
        else f" (store below the target's {t['store_resources']:,} resources)"
    )
    print(
        f"\ntarget p95 <= {t['p95_ms']:g} ms per query: {verdict}, worst p95 {t['worst_p95_ms']:.2f} ms{scale}"
    )
    e = report["errors"]
    if e["measured"] or e["outside_window"]:
        print(f"ERRORS: {e['measured']} measured, {e['outside_window']} during warmup/drain")
        for s in e["samples"][:8]:
            print(f"  {s['query']}: {s['status']} x{s['count']}: {s['body']}")
    else:
        print("no errors")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prep = lg.run_async(prepare(args), use_uvloop=not args.no_uvloop)
    except (lg.TokenError, aiohttp.ClientError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    load = prep["load"]
    if load is not None and load["resources"] == 0:
        print("error: the load phase stored nothing", file=sys.stderr)
        return 2
    options = {
        "base_url": args.base_url,
        "token": args.token,
        "client_file": args.client_file,
        "token_url": args.token_url,
        "scope": args.scope,
        "timeout": args.timeout,
        "seed": args.seed,
        "warmup": args.warmup,
        "duration": args.duration,
        "uvloop": not args.no_uvloop,
        "urls": prep["urls"],
    }
    specs = [
        lg.WorkerSpec(index=i, first_user=first, n_users=n, options=options)
        for i, (first, n) in enumerate(lg.split_users(args.clients, args.processes))
    ]
    try:
        results = lg.run_processes(run_worker, specs)
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = build_report(args, prep, lg.merge(results), results)
    print_report(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
    failed = load is not None and load["errors"]["bundles"]
    return 1 if report["errors"]["measured"] or report["errors"]["outside_window"] or failed else 0


if __name__ == "__main__":
    sys.exit(main())
