"""Kill loop: SIGKILL the server (supervisor + workers) under write load, again and again.

Each round: start ``fhirvault serve`` on the same data directory, drive creates
at it from a few concurrent writers, and after a random short time SIGKILL the
whole process group (no shutdown, no flush: a power cut as far as the process
is concerned). Then, with the server down, ``fhirvault audit verify`` must pass;
after the restart of the next round every create acknowledged with a 201 in the
previous round must be readable with the content that was sent. At the end all
acknowledged creates of the whole run are read back once more.

    python bench/killloop.py --kills 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import _server  # bench/ is on sys.path when run as a script
import httpx

FHIR_JSON = {"Content-Type": "application/fhir+json"}


@dataclass
class Totals:
    kills: int = 0
    acknowledged: int = 0
    attempted: int = 0
    lost: list[str] = field(default_factory=list)
    verify_failures: list[str] = field(default_factory=list)
    restart_s: list[float] = field(default_factory=list)


async def write_load(base: str, token: str, writers: int, seconds: float, tag: str) -> tuple[dict[str, str], int]:
    """Creates until ``seconds`` elapse or the server dies; returns {id: family} acknowledged, attempts."""
    acked: dict[str, str] = {}
    attempts = 0
    stop_at = time.monotonic() + seconds

    async with httpx.AsyncClient(base_url=base + "/fhir", headers={"Authorization": f"Bearer {token}"},
                                 timeout=10) as c:

        async def writer(w: int) -> None:
            nonlocal attempts
            i = 0
            while time.monotonic() < stop_at:
                i += 1
                family = f"Kill{tag}w{w}n{i}"
                attempts += 1
                try:
                    r = await c.post("/Patient", json={"resourceType": "Patient", "name": [{"family": family}]},
                                     headers=FHIR_JSON)
                except httpx.HTTPError:
                    return
                if r.status_code == 201:
                    acked[r.json()["id"]] = family

        await asyncio.gather(*(writer(w) for w in range(writers)))
    return acked, attempts


async def round_trip(srv: _server.Server, writers: int, seconds: float, tag: str) -> tuple[dict[str, str], int]:
    """Write load, and SIGKILL the group while it is still writing."""
    token = await asyncio.to_thread(srv.token)
    load = asyncio.create_task(write_load(srv.base, token, writers, seconds + 5, tag))
    await asyncio.sleep(seconds)
    srv.kill9()
    return await load


def check_readable(srv: _server.Server, acked: dict[str, str]) -> list[str]:
    lost = []
    with httpx.Client(base_url=srv.base + "/fhir", headers={"Authorization": f"Bearer {srv.token()}"},
                      timeout=30) as c:
        for pid, family in acked.items():
            r = c.get(f"/Patient/{pid}")
            if r.status_code != 200 or r.json()["name"][0]["family"] != family:
                lost.append(f"{pid} ({family}): {r.status_code}")
    return lost


def run(args: argparse.Namespace, data_dir: Path, log: Path) -> Totals:
    totals = Totals()
    rng = random.Random(args.seed)
    everything: dict[str, str] = {}
    previous: dict[str, str] = {}
    for k in range(1, args.kills + 1):
        t = time.monotonic()
        srv = _server.start(data_dir, log)
        totals.restart_s.append(time.monotonic() - t)
        totals.lost += check_readable(srv, previous)  # the last round's acknowledged creates survived the kill
        seconds = rng.uniform(args.min_seconds, args.max_seconds)
        acked, attempts = asyncio.run(round_trip(srv, args.writers, seconds, str(k)))
        totals.kills += 1
        totals.acknowledged += len(acked)
        totals.attempted += attempts
        everything.update(acked)
        previous = acked
        verify = _server.cli(data_dir, "audit", "verify")
        if verify.returncode != 0:
            totals.verify_failures.append(f"kill {k}: {verify.stdout.strip()} {verify.stderr.strip()}"[:400])
        if k % args.report_every == 0 or k == args.kills:
            print(f"kill {k:>3}: acked {len(acked):>4} this round, {totals.acknowledged} total, "
                  f"lost {len(totals.lost)}, verify failures {len(totals.verify_failures)}, "
                  f"restart {totals.restart_s[-1]:.2f}s", flush=True)
    srv = _server.start(data_dir, log)
    try:
        totals.lost += check_readable(srv, everything)  # and once more, all of them, at the end
    finally:
        srv.stop()
    verify = _server.cli(data_dir, "audit", "verify")
    if verify.returncode != 0:
        totals.verify_failures.append(f"final: {verify.stdout.strip()} {verify.stderr.strip()}"[:400])
    return totals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=100, help="how many SIGKILLs (default %(default)s)")
    p.add_argument("--writers", type=int, default=4, help="concurrent writers (default %(default)s)")
    p.add_argument("--min-seconds", type=float, default=0.3, help="shortest load before a kill")
    p.add_argument("--max-seconds", type=float, default=1.5, help="longest load before a kill")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--report-every", type=int, default=10)
    p.add_argument("--data-dir", type=Path, help="data directory (default: a fresh temporary one)")
    p.add_argument("--json", type=Path, help="also write the totals here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fhirvault-killloop-") as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        totals = run(args, data_dir, Path(tmp) / "server.log")
    elapsed = time.monotonic() - t0
    restarts = sorted(totals.restart_s)
    summary = {
        "kills": totals.kills, "creates_attempted": totals.attempted, "creates_acknowledged": totals.acknowledged,
        "lost": len(totals.lost), "audit_verify_runs": totals.kills + 1,
        "audit_verify_failures": len(totals.verify_failures), "elapsed_s": round(elapsed, 1),
        "restart_to_live_s_median": round(restarts[len(restarts) // 2], 2) if restarts else None,
        "restart_to_live_s_max": round(restarts[-1], 2) if restarts else None,
    }
    print(json.dumps(summary, indent=2))
    for line in totals.lost[:20] + totals.verify_failures[:20]:
        print("  " + line)
    if args.json:
        args.json.write_text(json.dumps({**summary, "lost_ids": totals.lost,
                                         "verify_failures": totals.verify_failures}, indent=2))
    ok = not totals.lost and not totals.verify_failures and totals.acknowledged > 0
    print("VERDICT:", "no acknowledged write lost, audit log verified after every kill" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
