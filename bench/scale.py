#!/usr/bin/env python3
"""Ingest, search and CRUD at scale, on SQLite or PostgreSQL with 1 or N workers, one command.

The script starts everything itself: a throw-away PostgreSQL (scripts/pg-test-server.sh, on a
free port) when ``--engine postgresql``, then ``fhirvault serve`` (``--workers N`` on
PostgreSQL; with ``--plain``, bench/_plain.py's build with encryption and audit off). Then:

1. **ingest**: ``--patients`` carebundle patients (about 45 resources each; 23,000 is about
   1,040,000 resources) through HTTP transaction Bundles (bench/ingest.py), resources/s;
2. **search**: bench/search.py's eight searches on the loaded store, p50/p95/p99 per query;
3. **CRUD**: bench/crud.py's ``crud``, ``create`` and ``read`` modes on the loaded store.

Everything lives in ``--work DIR`` (the data directory, the PostgreSQL cluster, the logs, the
JSON reports and ``state.json``). A second run on the same DIR loads only the patients not
loaded yet (``--patients`` is the target), so a 1 M store is loaded once and measured many
times, and an interrupted load resumes. ``--keep`` leaves PostgreSQL's files in DIR (they are
always kept; PostgreSQL is stopped at the end either way).

    python bench/scale.py --engine postgresql --workers 2 --patients 23000 --work /var/tmp/pg2
    python bench/scale.py --table /var/tmp/sqlite/scale.json /var/tmp/pg1/scale.json ...

``--table`` prints one table from the ``scale.json`` of several runs. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _server
import httpx
from _server import free_port

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PG_SCRIPT = ROOT / "scripts" / "pg-test-server.sh"
DB_NAME = "fhirvault"
CRUD_MODES = ("crud", "create", "read")
PY_SPY = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}") or "py-spy"


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- state of a work directory -------------------------------------------------------------------


def load_state(work: Path) -> dict[str, Any]:
    path = work / "state.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def save_state(work: Path, state: dict[str, Any]) -> None:
    tmp = work / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(work / "state.json")


# -- PostgreSQL ------------------------------------------------------------------------------------


def start_postgres(work: Path, state: dict[str, Any]) -> str:
    """The database URL of a PostgreSQL started on ``work/pg`` (the same port as last time)."""
    port = int(state.get("pg_port") or free_port())
    admin = subprocess.run([str(PG_SCRIPT), "start", str(work / "pg"), str(port)], check=True,
                           capture_output=True, text=True).stdout.strip()
    state["pg_port"] = port
    import psycopg

    with psycopg.connect(admin, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone() is None:
            conn.execute(f"CREATE DATABASE {DB_NAME}")
    return admin.rsplit("/", 1)[0] + "/" + DB_NAME


def stop_postgres(work: Path) -> None:
    subprocess.run([str(PG_SCRIPT), "stop", str(work / "pg")], check=False, capture_output=True)


def pg_sizes(url: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT n.nspname || '.' || c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
            "AND n.nspname IN ('public', 'audit') ORDER BY 2 DESC").fetchall()
    return {str(name): int(size) for name, size in rows}


def audit_rows(args: argparse.Namespace, url: str | None) -> int:
    """Entries in the audit log (to check that --plain really turned the trail off)."""
    if url is not None:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM audit.audit_log").fetchone()
            return int(row[0]) if row else 0
    import sqlite3

    path = args.work / "data" / "audit.sqlite3"
    if not path.exists():
        path = args.work / "data" / "fhirvault.sqlite3"
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT count(*) FROM audit_log").fetchone()
        return int(row[0]) if row else 0


# -- the server ------------------------------------------------------------------------------------


class Server:
    def __init__(self, args: argparse.Namespace, url: str | None) -> None:
        self.port = free_port()
        self.data = args.work / "data"
        entry = [str(BENCH / "_plain.py")] if args.plain else ["-m", "fhirvault.cli.main"]
        cmd = [sys.executable, *entry, "serve", "--data-dir", str(self.data), "--host", "127.0.0.1",
               "--port", str(self.port)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
        env["FHIRVAULT_CONFIG"] = str(BENCH / "capacity.toml")  # the firewall's limits out of reach
        if url is not None:
            env["FHIRVAULT_DATABASE_URL"] = url
            cmd += ["--workers", str(args.workers)]
        self.log_path = args.work / f"server-{int(time.time())}.log"
        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.origin}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not become ready; see {self.log_path}")

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def workers(self) -> list[int]:
        """The Granian worker processes (the supervisor's children), where the requests are served."""
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def cpu_s(self) -> float:
        """CPU seconds of the supervisor and its workers so far."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in [self.proc.pid, *self.workers()]:
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def stop(self) -> None:
        _server.Server(self.proc, self.port, self.data).stop()  # SIGTERM, then SIGKILL to the group


# -- profiling -------------------------------------------------------------------------------------


def profile_later(server: Server, out: Path, delay: float, seconds: float) -> threading.Thread:
    """py-spy on every worker for ``seconds``, starting ``delay`` s from now (a thread; join it)."""

    def run() -> None:
        time.sleep(delay)
        procs = [subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                   "--rate", "50", "--format", "raw", "--output", f"{out}-{pid}.txt",
                                   "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for pid in server.workers()]
        for p in procs:
            p.wait()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# -- phases ----------------------------------------------------------------------------------------


def bench_cmd(script: str, server: Server, *extra: str) -> list[str]:
    return [sys.executable, str(BENCH / script), "--base-url", f"{server.origin}/fhir",
            "--client-file", str(server.data / "admin-client.json"), *extra]


def store_args(args: argparse.Namespace, url: str | None) -> list[str]:
    if url is not None:
        return ["--database-url", url]
    return ["--db", str(args.work / "data" / "fhirvault.sqlite3")]


def run_phase(name: str, cmd: list[str], json_path: Path, server: Server,
              args: argparse.Namespace) -> dict[str, Any]:
    log(f"{name}: {' '.join(cmd)}")
    spy = profile_later(server, args.work / f"py-spy-{name}", args.py_spy_delay,
                        args.py_spy_seconds) if args.py_spy else None
    cpu0, t0 = server.cpu_s(), time.monotonic()
    with open(args.work / f"{name}.out", "w") as out:
        rc = subprocess.run([*cmd, "--json", str(json_path)], stdout=out, stderr=subprocess.STDOUT,
                            check=False).returncode
    wall = time.monotonic() - t0
    cpu = server.cpu_s() - cpu0
    if spy is not None:
        spy.join()
    if not json_path.exists():
        raise RuntimeError(f"{name} failed (exit status {rc}); see {args.work / f'{name}.out'}")
    report = dict(json.loads(json_path.read_text()))
    report["exit_status"] = rc
    report["server_cpu_s"] = round(cpu, 1)
    report["wall_s"] = round(wall, 1)
    log(f"{name}: exit status {rc}, {wall:.0f} s, server CPU {cpu:.0f} s; see {args.work / f'{name}.out'}")
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.work.mkdir(parents=True, exist_ok=True)
    state = load_state(args.work)
    setup = {"engine": args.engine, "plain": args.plain}
    for key, value in setup.items():
        if state.get(key, value) != value:
            raise SystemExit(f"{args.work} holds a {key}={state[key]} store; use another --work directory")
    state.update(setup)
    url = start_postgres(args.work, state) if args.engine == "postgresql" else None
    save_state(args.work, state)
    result: dict[str, Any] = {"config": {**setup, "workers": args.workers if url else 1,
                                         "patients": args.patients, "loadavg_start": os.getloadavg()[0]}}
    server: Server | None = None
    try:
        server = Server(args, url)
        log(f"server up on {server.origin} ({result['config']['workers']} worker(s)); log {server.log_path}")
        audit_before = audit_rows(args, url)
        sent = int(state.get("bundles_sent", 0))
        if "ingest" not in args.phases:
            log(f"no ingest phase; the store holds {sent:,} bundles")
        elif sent < args.patients:
            load = run_phase("ingest", bench_cmd(
                "ingest.py", server, "--patients", str(args.patients - sent), "--offset", str(sent),
                "--clients", str(args.load_clients), "--max-seconds", str(args.load_max_seconds),
                "--progress-every", str(args.progress_every), *store_args(args, url)),
                args.work / f"ingest-{sent}.json", server, args)
            state["bundles_sent"] = sent + load["bundles"] + load["errors"]["bundles"]
            state.setdefault("loads", []).append({k: load.get(k) for k in (
                "bundles", "resources", "resources_per_s", "elapsed_s", "latency", "errors", "server_cpu_s")}
                | {"offset": sent, "clients": args.load_clients, "workers": result["config"]["workers"]})
            save_state(args.work, state)
            result["ingest"] = load
        else:
            log(f"the store already holds the {sent:,} bundles asked for; no load")
        result["loads"] = state.get("loads", [])
        if "search" in args.phases:
            result["search"] = run_phase("search", bench_cmd(
            "search.py", server, "--clients", str(args.search_clients), "--duration", str(args.search_duration),
                "--warmup", "3", *store_args(args, url)), args.work / "search.json", server, args)
        result["crud"] = {}
        for mode in args.crud_modes if "crud" in args.phases else ():
            result["crud"][mode] = run_phase(f"crud-{mode}", bench_cmd(
                "crud.py", server, "--mode", mode, "--clients", str(args.crud_clients),
                "--duration", str(args.crud_duration), "--warmup", "3"),
                args.work / f"crud-{mode}.json", server, args)
        result["audit_rows"] = {"before": audit_before, "after": audit_rows(args, url)}
        if url is not None:
            result["pg_tables"] = pg_sizes(url)
    finally:
        if server is not None:
            server.stop()
        if url is not None:
            stop_postgres(args.work)
    result["config"]["loadavg_end"] = os.getloadavg()[0]
    return result


# -- the table -------------------------------------------------------------------------------------


def label(r: dict[str, Any]) -> str:
    c = r["config"]
    name = "SQLite" if c["engine"] == "sqlite" else f"PostgreSQL {c['workers']}w"
    return name + (" plain" if c["plain"] else "")


def ingest_rate(r: dict[str, Any]) -> str:
    """Resources/s over the loads this store got with the same worker count."""
    loads = [x for x in r.get("loads") or [] if x.get("workers") == r["config"]["workers"]]
    res = sum(x["resources"] for x in loads)
    secs = sum(x["elapsed_s"] for x in loads)
    return f"{res / secs:,.0f}" if secs else "-"


def crud_cell(r: dict[str, Any], mode: str) -> str:
    rep = r.get("crud", {}).get(mode)
    if rep is None:
        return "-"
    o = rep["operations"]["overall" if mode == "crud" else mode]
    return f"{o['rps']:,.0f} (p99 {o['p99_ms']:.0f})"


def table(results: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, list[str]]] = []
    results = [r for r in results if "search" in r]  # the table compares loaded stores
    cols = [label(r) for r in results]
    store = [r["search"]["store"]["resources"] for r in results]
    rows.append(("store, resources", [f"{s:,}" if s else "?" for s in store]))
    rows.append(("ingest, resources/s (all loads)", [ingest_rate(r) for r in results]))
    for mode in CRUD_MODES:
        rows.append((f"{mode}, req/s (p99 ms)", [crud_cell(r, mode) for r in results]))
    kinds = list(results[0]["search"]["queries"])
    for kind in kinds:
        shape = results[0]["search"]["queries"][kind]["query"]
        rows.append((shape.replace("|", "\\|") + " p50/p95/p99 ms", [
            "{p50_ms:.1f} / {p95_ms:.1f} / {p99_ms:.1f}".format(**r["search"]["queries"][kind])
            if kind in r["search"]["queries"] else "-" for r in results]))
    rows.append(("search, all kinds: req/s", [f"{r['search']['overall']['rps']:,.0f}" for r in results]))
    rows.append(("load average, start / end", [
        f"{r['config']['loadavg_start']:.1f} / {r['config']['loadavg_end']:.1f}" for r in results]))
    errors = [sum(x["errors"]["bundles"] for x in r.get("loads") or [])
              + r["search"]["errors"]["measured"]
              + sum(c["errors"]["total"] for c in r.get("crud", {}).values()) for r in results]
    rows.append(("errors (bundles, searches, CRUD)", [str(e) for e in errors]))
    width = max(len(name) for name, _ in rows)
    cw = [max(len(c), *(len(v[i]) for _, v in rows)) for i, c in enumerate(cols)]
    out = [f"| {'':<{width}} | " + " | ".join(f"{c:>{w}}" for c, w in zip(cols, cw, strict=True)) + " |",
           f"| {'-' * width} | " + " | ".join("-" * (w - 1) + ":" for w in cw) + " |"]
    for name, values in rows:
        out.append(f"| {name:<{width}} | " + " | ".join(f"{v:>{w}}" for v, w in zip(values, cw, strict=True))
                   + " |")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Ingest, search and CRUD at scale (see bench/README.md).")
    p.add_argument("--table", nargs="+", type=Path, metavar="JSON", help="only print one table from these reports")
    p.add_argument("--engine", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--workers", type=int, default=1, help="server workers (PostgreSQL only; default 1)")
    p.add_argument("--plain", action="store_true",
                   help="serve with bench/_plain.py: encryption at rest and the audit trail off")
    p.add_argument("--patients", type=int, default=23_000,
                   help="patients the store should hold (23,000: about 1,040,000 resources)")
    p.add_argument("--work", type=Path, help="work directory, reused by the next run (required)")
    p.add_argument("--load-clients", type=int, default=8)
    p.add_argument("--load-max-seconds", type=float, default=0.0, help="stop loading after S s (0: no limit)")
    p.add_argument("--progress-every", type=int, default=50_000)
    p.add_argument("--search-clients", type=int, default=8)
    p.add_argument("--search-duration", type=float, default=30.0)
    p.add_argument("--crud-clients", type=int, default=32)
    p.add_argument("--crud-duration", type=float, default=20.0)
    p.add_argument("--crud-modes", type=lambda s: [m for m in s.split(",") if m], default=list(CRUD_MODES),
                   help="comma-separated subset of crud,create,read (default: all)")
    p.add_argument("--phases", type=lambda s: set(s.split(",")), default={"ingest", "search", "crud"},
                   help="comma-separated subset of ingest,search,crud (default: all)")
    p.add_argument("--py-spy", action="store_true", help="profile the workers in each phase (py-spy raw stacks)")
    p.add_argument("--py-spy-delay", type=float, default=20.0)
    p.add_argument("--py-spy-seconds", type=float, default=30.0)
    p.add_argument("--json", type=Path, help="the report (default: WORK/scale.json)")
    args = p.parse_args(argv)
    if args.table:
        return args
    if args.work is None:
        p.error("--work DIR is required")
    if args.engine == "sqlite" and args.workers != 1:
        p.error("SQLite serves with one worker")
    if bad := [m for m in args.crud_modes if m not in CRUD_MODES]:
        p.error(f"unknown --crud-modes {bad}")
    args.work = args.work.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(table([json.loads(p.read_text()) for p in args.table]))
        return 0
    result = run(args)
    out = args.json or args.work / "scale.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    if "search" in result:
        print(table([result]))
    a = result["audit_rows"]
    print(f"audit log entries: {a['before']:,} before, {a['after']:,} after" +
          (" (plain build: must not grow)" if args.plain else ""))
    if args.plain and a["after"] != a["before"]:
        print("ERROR: the audit log grew: the bench-only switch did not take effect", file=sys.stderr)
        return 1
    log(f"report in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
