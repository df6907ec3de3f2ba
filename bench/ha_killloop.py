"""Repeated PostgreSQL primary kills on the local HA cluster (scripts/ha-up.sh), under write load.

Each round: writes go through HAProxy from a few threads; the node holding the Patroni leader
key is killed (SIGKILL to Patroni and to its PostgreSQL at once, as if the machine died); the
round waits until writes succeed again, records

- the write unavailability: from the kill to the first acknowledged write started after the last
  failed one,
- Patroni's own failover time: from the kill to another node answering 200 on /primary,
- the answers the clients got meanwhile (HTTP status counts; 0 = no answer),

then restarts the killed node with ha-up.sh (it rejoins as a replica) and reads back every
create acknowledged in the round. At the end: every acknowledged create of the run read back again,
``fhirvault audit verify``, and the checkpoints checked for a fork.

    python bench/ha_killloop.py --kills 20            # a new cluster in a temporary directory
    python bench/ha_killloop.py --dir /tmp/ha --kills 3 --keep   # reuse / keep a cluster directory
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.ha.cluster
from tests.ha.cluster import Attempt, Cluster, Load, summary, wait_until

QUIET_S = 3.0


def promoted(cluster: Cluster, victim: str) -> bool:
    for node in cluster.info["patroni"]:
        if node["name"] != victim:
            try:
                if httpx.get(node["rest"] + "/primary", timeout=0.5).status_code == 200:
                    return True
            except httpx.HTTPError:
                continue
    return False


def kill_primary(cluster: Cluster, victim: str, writers: int) -> tuple[Load, float, float]:
    """One kill under load: (the load, seconds to a new /primary, seconds until writes succeed again)."""
    with cluster.write_load(writers) as load:
        wait_until(lambda: len(load.acknowledged()) >= 10, 60, "writes before the kill")
        time.sleep(1)
        t_kill = time.monotonic()
        cluster.kill_pg_node(victim)
        wait_until(lambda: promoted(cluster, victim), 120, "a new primary", interval=0.1)
        failover = time.monotonic() - t_kill
        [recovery] = wait_until(lambda: [r] if (r := load.recovery(t_kill, QUIET_S)) is not None else None,
                                180, "writes to succeed again")
    return load, failover, recovery


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--dir", type=Path, help="cluster directory (default: a new temporary one)")
    parser.add_argument("--base-port", type=int, default=25400)
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()

    directory = args.dir or Path(tempfile.mkdtemp(prefix="fhirvault-ha-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o711)
    cluster = Cluster(directory, args.base_port)
    t0 = time.monotonic()
    print(cluster.up(), flush=True)
    print(f"cluster up in {time.monotonic() - t0:.1f} s", flush=True)

    unavailable: list[float] = []
    failover: list[float] = []
    rejoin: list[float] = []
    statuses: dict[int, int] = {}
    acknowledged: list[Attempt] = []
    lost: list[str] = []
    try:
        for round_no in range(1, args.kills + 1):
            victim = cluster.primary()
            load, failover_s, recovery = kill_primary(cluster, victim, args.writers)
            failover.append(failover_s)
            unavailable.append(recovery)
            for status, n in load.statuses().items():
                statuses[status] = statuses.get(status, 0) + n
            acked = load.acknowledged()
            acknowledged += acked
            round_lost = cluster.unreadable(acked)
            lost += round_lost
            t_up = time.monotonic()
            cluster.up()  # the killed node rejoins as a replica; waits for a synchronous standby again
            rejoin.append(time.monotonic() - t_up)
            print(f"round {round_no:2}: killed {victim}, new primary after {failover[-1]:5.1f} s, writes back after "
                  f"{recovery:5.1f} s, {len(acked)} acknowledged, lost {len(round_lost)}, answers "
                  f"{load.statuses()}, rejoined in {rejoin[-1]:.1f} s", flush=True)
        final_lost = cluster.unreadable(acknowledged)
        report = cluster.audit_verify()
        forks = cluster.forks()
    finally:
        if not args.keep:
            cluster.down()
            if args.dir is None:
                shutil.rmtree(directory, ignore_errors=True)

    figures = {
        "kills": args.kills, "writers": args.writers,
        "unavailable_s": {"max": max(unavailable), "median": sorted(unavailable)[len(unavailable) // 2],
                          "all": [round(x, 2) for x in unavailable]},
        "patroni_failover_s": {"max": max(failover), "median": sorted(failover)[len(failover) // 2],
                               "all": [round(x, 2) for x in failover]},
        "acknowledged": len(acknowledged), "lost_in_rounds": len(lost), "lost_at_end": len(final_lost),
        "answers": statuses, "audit_verify_ok": report["ok"], "audit_entries": report["entries"],
        "checkpoints": report["checkpoints"], "forks": forks,
    }
    print(f"\nwrite unavailability after a primary kill: {summary(unavailable)}")
    print(f"Patroni failover (kill to a new /primary):  {summary(failover)}")
    print(f"rejoin of the old primary (ha-up.sh):       {summary(rejoin)}")
    print(f"acknowledged writes: {len(acknowledged)}, lost: {len(final_lost)}; client answers: {statuses}")
    print(f"audit verify: {'ok' if report['ok'] else 'FAILED ' + str(report['problems'])} ({report['entries']} "
          f"entries, {report['checkpoints']} checkpoints); forks: {forks or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if not final_lost and not lost and report["ok"] and not forks else 1


if __name__ == "__main__":
    sys.exit(main())
