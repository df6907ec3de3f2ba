"""Issue #14 at 1 million resources: seed a store fast, then old build vs new build on copies of it.

Two commands:

* ``populate``: fills ``--dir`` with ``--resources`` carebundle resources (Patient, Practitioner,
  Encounter, Condition, Observations, DiagnosticReports with their references), each written through
  ``Repository.prepare_create`` and the store's write transactions: validation, search tags, a
  per-patient data key, AES-GCM encryption, one audit entry per resource, audit checkpoints. It runs
  with the ``src`` tree given by ``--src`` (default: the old build, so that both builds can open the
  store; the new one migrates it at its first start). What makes it fast (bench-only, in this process
  only; nothing of it exists in the installed package):

  - the CPU work that does not need the store (validation, search-term extraction and blind-index
    tags) runs in ``--workers`` forked processes; the main process seals and writes, with the very
    code the server runs (``prepare_create`` is handed the worker's tags for that body);
  - the data keys of the next patients are created together in one transaction, instead of one
    write transaction (and one wait for it) per new patient;
  - ``--batch`` resources per write transaction (default 2,000), two transactions in flight;
  - ``synchronous=OFF`` on the seeding connection (no fsync per commit: a crash while seeding loses
    the seed, nothing else);
  - the ``search_tags`` rows are not written by the deferred index flusher while seeding (each flush
    of random tags rewrites pages all over a growing index: this is what made seeding slow down with
    size). The resources stay marked in ``index_dirty``, as after a crash, and at the end every
    resource's tag list (``resources_current.tags``, written by the server's transaction) is inserted
    into ``search_tags`` in one sorted pass, then ``index_dirty`` is emptied: the index then holds
    exactly the rows the server would have written, in fuller pages than random inserts leave.

* ``measure``: for each build (``--builds old,new``), on its own copy of the populated store:
  ``fhirvault serve`` until ``/readyz`` 200 (first start: for the new build this includes migrating
  the old store), stopped, started again (second start), a full backup to a ``file://`` target, 1 % of
  the resources updated (every 100th, spread out, in-process with that build's code), an incremental
  backup, ``fhirvault backup restore`` of it (CLI process) and ``serve`` on the restored dir until
  ``/readyz`` (ready after restore; RTO = restore + that).

* ``reads``: ``bench/crud.py --mode read`` (32 clients, 15 s) against the new build serving an empty
  data dir and ``--dir`` (a big store in the new format, e.g. ``measure --keep-restored new``'s),
  alternately, ``--rounds`` times; the load starts once the server's background full audit pass is done.

Run:
  .venv/bin/python bench/million.py populate --resources 1000000 --dir /tmp/fv-1m-pop
  .venv/bin/python bench/million.py measure --dir /tmp/fv-1m-pop --work /tmp/fv-1m-work --builds old,new \\
      --keep-restored new
  .venv/bin/python bench/million.py reads --dir /tmp/fv-1m-work/restored-new --work /tmp/fv-1m-work --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")
OLD_REF = "7d9e76c"  # main before any issue #14 work
MARKER = "bench-populated.json"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_env(src: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
    env["PYTHONPATH"] = f"{src}{os.pathsep}{ROOT / 'bench'}"
    return env


# -- populate (runs with the --src tree on PYTHONPATH) ------------------------------------------------
_C: Any = None  # the container, inherited by the forked workers
_TEMPLATES: list[bytes] = []


def _prepared(i: int) -> list[tuple[str, str, bytes, bytes, str]]:
    """Worker: one patient's bundle copy with its blind-index tags (joined) and its key compartment.

    The first copy of each template is validated (as the server would: a 422 stops the run); later
    copies differ from it only in their ids and references, so they are not validated again.
    """
    import orjson

    from backup import _fresh_copy
    from fhirvault.domain.compartment import patient_of
    from fhirvault.services.keys import TENANT_COMPARTMENT, patient_compartment
    from fhirvault.services.repository import _STAMPED

    repo = _C.repository
    out = []
    for rtype, rid, body in _fresh_copy(_TEMPLATES[i % len(_TEMPLATES)]):
        body.pop("id", None)
        if i < len(_TEMPLATES):
            repo._validate(rtype, body)
        body["id"] = rid
        tags = repo._index.resource_tags(rtype, body, skip=_STAMPED)
        pid = patient_of(rtype, body)
        out.append((rtype, rid, orjson.dumps(body), b"".join(tags),
                    patient_compartment(pid) if pid else TENANT_COMPARTMENT))
    return out


def _populate_in_process(data_dir: Path, target: int, batch: int, workers: int) -> dict[str, Any]:
    global _C, _TEMPLATES
    import orjson
    from _synthetic import DEFAULT_CACHE, ensure_cohort, iter_bundles

    from backup import TEMPLATES, _run_all, system_ctx
    from fhirvault.adapters import sqlite_store
    from fhirvault.bootstrap import initialise
    from fhirvault.config import load_settings
    from fhirvault.container import build
    from fhirvault.ports import SEARCH_TAG_BYTES

    shutil.rmtree(data_dir, ignore_errors=True)
    settings = load_settings({"data_dir": data_dir}, environ={})
    initialise(settings)
    # Bench-only: the flusher never sees the staged tags; index_dirty keeps them (bulk pass at the end).
    sqlite_store._DeferredIndex.stage = lambda self, changes: None  # type: ignore[method-assign]
    c = build(settings)
    _C = c
    conn = c.store._writer_conn
    for schema in ("main", "audit"):
        conn.execute(f"PRAGMA {schema}.synchronous=OFF")  # bench-only, seeding connection
    path = ensure_cohort(DEFAULT_CACHE, TEMPLATES, 1, log)
    _TEMPLATES = [body for _, body in iter_bundles(path, TEMPLATES)]
    ctx = system_ctx(c, data_dir, "bench-populate")
    repo = c.repository
    for i in range(20):  # warm the per-parameter HMAC keys before forking
        _prepared(i)

    pre: dict[str, list[bytes]] = {}
    real_tags = repo._index.resource_tags

    def given_tags(rtype: str, body: dict[str, Any], *, skip: frozenset[str] = frozenset()) -> list[bytes]:
        joined = pre.pop(f"{rtype}/{body['id']}", None)
        if joined is None:
            return list(real_tags(rtype, body, skip=skip))
        return [joined[k : k + SEARCH_TAG_BYTES] for k in range(0, len(joined), SEARCH_TAG_BYTES)]

    repo._index.resource_tags = given_tags  # the worker computed them with the same code
    repo._validate = lambda rtype, body: None  # the worker validated this template

    def keys_for(comps: set[str]) -> None:
        missing = sorted(x for x in comps if c.keys.cached_for(x) is None)
        if missing:
            made = c.store.write_sync("bench.keys", lambda tx: [c.keys.get_or_create_in_tx(tx, x) for x in missing])
            for key, lookup in made:
                c.keys.remember(key, lookup)

    async def run() -> dict[str, Any]:
        written = copies = 0
        t0 = last_t = time.perf_counter()
        last_n = 0
        pending: list[asyncio.Future[Any]] = []
        jobs: list[Callable[[Any], Any]] = []
        group: list[list[tuple[str, str, bytes, bytes, str]]] = []

        async def flush() -> None:
            nonlocal jobs
            pending.append(asyncio.ensure_future(c.store.write("bench.populate", _run_all(jobs))))
            jobs = []
            while len(pending) > 2:
                await pending.pop(0)

        async def write_group() -> None:
            nonlocal written, copies
            keys_for({comp for copy in group for *_r, comp in copy})
            copies += len(group)
            for rtype, rid, raw, tags, _comp in (r for copy in group for r in copy):
                body = orjson.loads(raw)
                if written >= target:
                    break
                pre[f"{rtype}/{rid}"] = tags
                jobs.append(await repo.prepare_create(ctx, rtype, body, rid=rid))
                written += 1
                if len(jobs) >= batch:
                    await flush()
            group.clear()

        ncopies = target // 40 + 100  # ~45 resources a copy; stop at target
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for copy in pool.imap(_prepared, range(ncopies), chunksize=8):
                group.append(copy)
                if len(group) >= 100:
                    await write_group()
                if written - last_n >= 50_000:
                    now = time.perf_counter()
                    log(f"  populated {written:,} ({(written - last_n) / (now - last_t):,.0f}/s last, "
                        f"{written / (now - t0):,.0f}/s overall)")
                    last_t, last_n = now, written
                    if written % 200_000 < 50_000:
                        c.checkpointer.step(force=True)
                if written >= target:
                    pool.terminate()
                    break
            if group and written < target:
                await write_group()
        if jobs:
            await flush()
        for f in pending:
            await f
        return {"resources": written, "patients": copies, "seconds": time.perf_counter() - t0}

    try:
        info = asyncio.run(run())
        c.checkpointer.step(force=True, witness=True)
    finally:
        c.close()
    t0 = time.perf_counter()
    info["index_rows"] = _bulk_index(settings.database_path, SEARCH_TAG_BYTES)
    info["index_seconds"] = time.perf_counter() - t0
    return info


def _bulk_index(db: Path, width: int) -> int:
    """Insert every dirty resource's tags into search_tags in one sorted pass; empty index_dirty."""
    con = sqlite3.connect(db, isolation_level=None)
    try:
        con.execute("PRAGMA cache_size=-1048576")
        con.execute("PRAGMA temp_store=FILE")
        longest = con.execute("SELECT max(length(tags)) FROM resources_current").fetchone()[0] or 0
        con.execute("BEGIN IMMEDIATE")
        con.execute("CREATE TEMP TABLE n (i INTEGER PRIMARY KEY)")
        con.executemany("INSERT INTO n (i) VALUES (?)", [(i,) for i in range(longest // width)])
        before = con.execute("SELECT count(*) FROM search_tags").fetchone()[0]
        con.execute(f"INSERT OR IGNORE INTO search_tags (tag, rk) SELECT substr(c.tags, n.i * {width} + 1, {width}), "
                    f"c.rk FROM index_dirty d JOIN resources_current c ON c.rk = d.rk "
                    f"JOIN n ON n.i < length(c.tags) / {width} ORDER BY 1, 2")
        con.execute("DELETE FROM index_dirty")
        rows = int(con.execute("SELECT count(*) FROM search_tags").fetchone()[0]) - int(before)
        con.execute("COMMIT")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return rows
    finally:
        con.close()


def populate_main(args: argparse.Namespace) -> None:
    info = _populate_in_process(args.dir, args.resources, args.batch, args.workers)
    con = sqlite3.connect(f"file:{args.dir / 'fhirvault.sqlite3'}?mode=ro", uri=True)
    try:
        info["current"] = int(con.execute("SELECT count(*) FROM resources_current").fetchone()[0])
    finally:
        con.close()
    info["db_bytes"] = sum(p.stat().st_size for p in args.dir.glob("*.sqlite3*"))
    info["batch"] = args.batch
    info["src"] = str(args.src)
    (args.dir / MARKER).write_text(json.dumps(info))
    log(f"RESULT populate: {info['current']:,} resources ({info['patients']:,} patients) in {info['seconds']:.0f} s "
        f"({info['resources'] / info['seconds']:,.0f}/s), search index {info['index_rows']:,} rows in "
        f"{info['index_seconds']:.0f} s, files {info['db_bytes'] / 1e9:.2f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("populate")
    p.add_argument("--dir", type=Path, default=Path("/tmp/fv-1m-pop"))
    p.add_argument("--resources", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--src", type=Path, help=f"src tree to seed with (default: {OLD_REF}, exported)")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    m = sub.add_parser("measure")
    m.add_argument("--dir", type=Path, default=Path("/tmp/fv-1m-pop"))
    m.add_argument("--work", type=Path, default=Path("/tmp/fv-1m-work"))
    m.add_argument("--builds", default="old,new")
    m.add_argument("--old-src", type=Path)
    m.add_argument("--change-percent", type=float, default=1.0)
    m.add_argument("--batch", type=int, default=500)
    m.add_argument("--json", type=Path)
    m.add_argument("--keep-restored", default="", metavar="BUILDS",
                   help="keep these builds' restored data dirs (e.g. new: for the reads command)")
    r = sub.add_parser("reads")
    r.add_argument("--dir", type=Path, required=True, help="a big data dir in the new build's format (a copy)")
    r.add_argument("--work", type=Path, default=Path("/tmp/fv-1m-work"))
    r.add_argument("--clients", type=int, default=32)
    r.add_argument("--duration", type=int, default=15)
    r.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    if args.cmd == "populate":
        if args.in_process:
            if os.environ.get("BENCH_PROFILE"):  # where the seeding process spends its time
                import cProfile

                cProfile.runctx("populate_main(args)", globals(), {"args": args}, os.environ["BENCH_PROFILE"])
            else:
                populate_main(args)
            return
        from backup_incremental import old_tree

        src = args.src or old_tree(OLD_REF, Path("/tmp/fv-million-old"))
        argv = [PY, __file__, "populate", "--in-process", "--dir", str(args.dir), "--resources", str(args.resources),
                "--batch", str(args.batch), "--workers", str(args.workers), "--src", str(src)]
        raise SystemExit(subprocess.run(argv, env=build_env(src), check=False).returncode)
    if args.cmd == "reads":
        reads_main(args)
        return
    measure_main(args)


# -- measure (the driver runs each step in a subprocess with that build's src) ------------------------
_CREATE = _UPDATE = ""  # bench/backup_incremental.py's create_backup and 1 % update, set by measure_main
RESULTS: dict[str, dict[str, Any]] = {}


def result(build: str, figure: str, value: Any) -> None:
    RESULTS.setdefault(build, {})[figure] = value
    log(f"RESULT {build}: {figure} = {value}")


def run(src: Path, *argv: str, timeout: float = 3600) -> tuple[str, float]:
    t0 = time.perf_counter()
    p = subprocess.run([PY, *argv], capture_output=True, text=True, env=build_env(src), check=False, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed:\n{p.stdout[-2000:]}{p.stderr[-3000:]}")
    return p.stdout.strip(), time.perf_counter() - t0


def start_server(src: Path, data: Path, log_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], int, float]:
    """``fhirvault serve`` on ``data`` with ``src`` (own process group): (process, port, start time)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    t0 = time.perf_counter()
    with log_path.open("wb") as out:
        proc = subprocess.Popen([PY, "-m", "fhirvault.cli.main", "serve", "--data-dir", str(data), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=build_env(src) | env,
                                start_new_session=True)
    return proc, port, t0


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def serve_ready(src: Path, data: Path, log_path: Path, wait_full: bool = True) -> dict[str, Any]:
    """``fhirvault serve`` on ``data``: seconds until /readyz 200, and until the server logs a full
    audit verification (``wait_full``; at most 10 min). The server is stopped afterwards."""
    import contextlib
    import re
    import urllib.request

    proc, port, t0 = start_server(src, data, log_path)
    ready: float | None = None
    full: float | None = None
    try:
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text(errors='replace')[-2000:]}")
            if ready is None:
                with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz",
                                                                          timeout=2) as r:
                    if r.status == 200:
                        ready = time.perf_counter() - t0
                        deadline = min(deadline, time.monotonic() + 600)
            text = log_path.read_text(errors="replace")
            if full is None and re.search(r'"audit log verified"', text):
                full = time.perf_counter() - t0
            if ready is not None and (full is not None or not wait_full):
                break
            time.sleep(0.1)
    finally:
        stop_server(proc)
    lines = [ln.strip()[:300] for ln in log_path.read_text(errors="replace").splitlines()
             if "audit log verif" in ln or "migrat" in ln.lower()]
    return {"ready_s": ready, "full_verification_s": full, "log": lines}


def one_build(name: str, src: Path, pop: Path, work: Path, every: int, batch: int, keep: bool) -> None:
    data, target, restored = work / f"data-{name}", work / f"target-{name}", work / f"restored-{name}"
    for p in (data, target, restored):
        shutil.rmtree(p, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-a", "--reflink=auto", str(pop), str(data)], check=True)
    log(f"{name}: copied the store in {time.perf_counter() - t0:.0f} s")
    for start in ("first start", "second start"):
        r = serve_ready(src, data, work / f"serve-{name}-{start.split()[0]}.log")
        result(name, f"{start}: /readyz after (s)", round(r["ready_s"], 1))
        result(name, f"{start}: full audit verification logged after (s)",
               None if r["full_verification_s"] is None else round(r["full_verification_s"], 1))
        for line in r["log"]:
            log(f"  {name} {start} log: {line}")
    db = sum(p.stat().st_size for p in data.glob("*.sqlite3*"))
    result(name, "database files (MB)", round(db / 1e6))
    full = json.loads(run(src, "-c", _CREATE, str(data), str(target))[0])
    result(name, "full backup (s)", round(full["seconds"], 1))
    result(name, "full backup stored (MB)", round(full["uploaded_bytes"] / 1e6, 1))
    upd = json.loads(run(src, "-c", _UPDATE, str(data), str(every), str(batch))[0])
    result(name, "resources updated (spread)", upd["changed"])
    result(name, "update step (s, not a backup figure)", round(upd["seconds"], 1))
    inc = json.loads(run(src, "-c", _CREATE, str(data), str(target))[0])
    result(name, "incremental backup (s)", round(inc["seconds"], 1))
    result(name, "incremental uploaded (MB)", round(inc["uploaded_bytes"] / 1e6, 1))
    result(name, "incremental share of full (%)", round(100 * inc["uploaded_bytes"] / full["uploaded_bytes"], 1))
    shutil.rmtree(data)  # the restore needs the room
    _out, restore_s = run(src, "-m", "fhirvault.cli.main", "backup", "restore", "--target", target.as_uri(),
                          "--location", "FR", "--to", str(restored), "--root-key-file", str(pop / "root.key"))
    result(name, "restore of the incremental, CLI (s)", round(restore_s, 1))
    (restored / "admin-client.json").write_bytes((pop / "admin-client.json").read_bytes())
    r = serve_ready(src, restored, work / f"serve-{name}-restored.log")
    result(name, "ready after restore (s)", round(r["ready_s"], 1))
    result(name, "RTO = restore + ready (s)", round(restore_s + r["ready_s"], 1))
    shutil.rmtree(target, ignore_errors=True)
    if not keep:
        shutil.rmtree(restored, ignore_errors=True)


def reads_main(args: argparse.Namespace) -> None:
    """crud.py --mode read against the new build: an empty data dir and the big one, alternately."""
    import urllib.request

    args.work.mkdir(parents=True, exist_ok=True)
    empty = args.work / "reads-empty"
    rows = []
    for rnd in range(args.rounds):
        for label, data in (("empty", empty), ("big", args.dir)):
            if label == "empty":
                shutil.rmtree(empty, ignore_errors=True)
            log_path = args.work / f"reads-{label}-{rnd}.log"
            proc, port, t0 = start_server(ROOT / "src", data, log_path,
                                          FHIRVAULT_CONFIG=str(ROOT / "bench" / "capacity.toml"))
            try:
                while True:
                    if proc.poll() is not None or time.perf_counter() - t0 > 900:
                        raise RuntimeError(f"server on {data} did not become ready")
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                            ready = r.status == 200
                    except OSError:
                        ready = False
                    # and the background full audit pass done (~20 s of CPU at 1 M): not in the figures
                    if ready and '"audit log verified"' in log_path.read_text(errors="replace"):
                        break
                    time.sleep(0.2)
                out = args.work / f"reads-{label}-{rnd}.json"
                base = f"http://127.0.0.1:{port}"
                subprocess.run([PY, str(ROOT / "bench" / "crud.py"), "--mode", "read", "--base-url", base + "/fhir",
                                "--client-file", str(data / "admin-client.json"), "--token-url", base + "/oauth2/token",
                                "--clients", str(args.clients), "--warmup", "3", "--duration", str(args.duration),
                                "--json", str(out)], check=False, env=build_env(ROOT / "src"))
                rep = json.loads(out.read_text())
                op = rep["operations"]["read"]
                rows.append((rnd, label, op["rps"], op["p50_ms"], op["p99_ms"], rep["errors"]["total"]))
                log(f"RESULT reads round {rnd} {label}: {op['rps']:,.0f} reads/s, p50 {op['p50_ms']:.1f} ms, "
                    f"p99 {op['p99_ms']:.1f} ms, errors {rep['errors']['total']}")
            finally:
                stop_server(proc)
    shutil.rmtree(empty, ignore_errors=True)
    print("| round | data dir | reads/s | p50 ms | p99 ms | errors |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0] + 1} | {r[1]} | {r[2]:,.0f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]} |")


def measure_main(args: argparse.Namespace) -> None:
    global _CREATE, _UPDATE
    from backup_incremental import _CREATE, _UPDATE, old_tree

    info = json.loads((args.dir / MARKER).read_text())
    log(f"store {args.dir}: {info}")
    args.work.mkdir(parents=True, exist_ok=True)
    srcs = {"new": ROOT / "src", "old": args.old_src or old_tree(OLD_REF, Path("/tmp/fv-million-old"))}
    every = max(1, round(100 / args.change_percent))
    for name in args.builds.split(","):
        one_build(name, srcs[name], args.dir, args.work, every, args.batch,
                  name in args.keep_restored.split(","))
    names = list(RESULTS)
    figures = list(dict.fromkeys(f for b in RESULTS.values() for f in b))
    print("| figure | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for f in figures:
        print(f"| {f} | " + " | ".join(str(RESULTS[b].get(f, "")) for b in names) + " |")
    if args.json:
        args.json.write_text(json.dumps({"store": info, "results": RESULTS}, indent=1))


if __name__ == "__main__":
    main()
