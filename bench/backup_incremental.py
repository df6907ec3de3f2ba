"""Incremental backup after 1 % spread updates: old build (page-level chunks) vs new build (change-feed deltas).

One populated store (``bench/backup.py``'s populate: carebundle resources written in-process through the
repository) is copied once per build. On each copy, with that build's code (a subprocess with PYTHONPATH
set to its ``src``): a full backup to a ``file://`` target, 1 % of the resources updated, spread out (the
same ids and the same update code, run with that build's ``src``), an incremental backup, then ``fhirvault backup
restore`` of the incremental (timed with its process; for the new build this includes applying the deltas
and rebuilding their part of the search index) and the start of ``fhirvault serve`` on it until /readyz.

The old build is ``--old-ref`` (default ``main``) exported with ``git archive`` unless ``--old-src`` names a
``src`` tree.

Run: .venv/bin/python bench/backup_incremental.py --resources 100000 [--dir /tmp/fv-inc-100k] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import backup as base  # bench/backup.py: populate, update_fraction, copy_dir, serve helpers

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")

_CREATE = """
import json, sys
from pathlib import Path
from fhirvault.adapters.keyfile import KeyFileProvider
from fhirvault.backup.engine import create_backup
from fhirvault.backup.file_target import FileTarget
d = Path(sys.argv[1])
r = create_backup(d, FileTarget(Path(sys.argv[2]), "FR"), KeyFileProvider.load(d / "root.key"))
print(json.dumps({"size": r.size, "chunks": r.chunks, "uploaded_chunks": r.uploaded_chunks,
                  "uploaded_bytes": r.uploaded_bytes, "seconds": r.seconds,
                  "incremental": getattr(r, "incremental", False)}))
"""

# The 1 % update, run with the build's own code: the other build's code would migrate its store first.
_UPDATE = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import backup
n, s = backup.update_fraction(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
print(json.dumps({{"changed": n, "seconds": s}}))
"""


def run(src: Path, *argv: str) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
    env["PYTHONPATH"] = str(src)
    t0 = time.perf_counter()
    p = subprocess.run([PY, *argv], capture_output=True, text=True, env=env, check=False, timeout=7200)
    if p.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return p.stdout.strip(), time.perf_counter() - t0


def old_tree(ref: str, into: Path) -> Path:
    if not (into / "src" / "fhirvault").is_dir():
        into.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def one_build(name: str, src: Path, data: Path, work: Path, every: int, batch: int) -> dict[str, float]:
    target = work / f"target-{name}"
    restored = work / f"restored-{name}"
    for p in (target, restored):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    full = json.loads(run(src, "-c", _CREATE, str(data), str(target))[0])
    base.log(f"{name}: full backup {full}")
    upd = json.loads(run(src, "-c", _UPDATE, str(data), str(every), str(batch))[0])
    changed, secs = upd["changed"], upd["seconds"]
    base.log(f"{name}: {changed:,} resources updated in {secs:.1f} s")
    inc = json.loads(run(src, "-c", _CREATE, str(data), str(target))[0])
    base.log(f"{name}: incremental backup {inc}")
    _out, restore_s = run(src, "-m", "fhirvault.cli.main", "backup", "restore", "--target", target.as_uri(),
                          "--location", "FR", "--to", str(restored), "--root-key-file", str(data / "root.key"))
    (restored / "admin-client.json").write_bytes((data / "admin-client.json").read_bytes())
    ready_s = base_ready(src, restored, work / f"serve-{name}.log")
    res = {"full_stored_mb": full["uploaded_bytes"] / 1e6, "database_mb": full["size"] / 1e6,
           "full_s": full["seconds"], "changed": changed,
           "incremental_uploaded_mb": inc["uploaded_bytes"] / 1e6,
           "incremental_share": inc["uploaded_bytes"] / full["uploaded_bytes"], "incremental_s": inc["seconds"],
           "restore_s": restore_s, "serve_ready_s": ready_s}
    for k, v in res.items():
        base.result(name, k, f"{v:,.3f}" if isinstance(v, float) else f"{v:,}")
    return res


def base_ready(src: Path, data: Path, log_path: Path) -> float:
    """Seconds from ``fhirvault serve`` on ``data`` until /readyz answers 200."""
    import urllib.request

    port = base.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
    env["PYTHONPATH"] = str(src)
    t0 = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen([PY, "-m", "fhirvault.cli.main", "serve", "--data-dir", str(data), "--port", str(port)],
                                stdout=log, stderr=log, env=env, start_new_session=True)
    try:
        while time.perf_counter() - t0 < 1800:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server not ready after 30 min")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fv-inc-100k"), help="populated store (kept)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fv-inc-work"))
    ap.add_argument("--resources", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--reuse", action="store_true", help="keep a populated --dir")
    ap.add_argument("--change-percent", type=float, default=1.0)
    ap.add_argument("--old-ref", default="main", help="git ref of the old build")
    ap.add_argument("--old-src", type=Path, help="src tree of the old build (instead of --old-ref)")
    ap.add_argument("--builds", default="old,new")
    args = ap.parse_args()
    base.populate(args.dir, args.resources, args.batch, args.reuse)
    args.work.mkdir(parents=True, exist_ok=True)
    srcs = {"new": ROOT / "src", "old": args.old_src or old_tree(args.old_ref, args.work / "old-build")}
    every = max(1, round(100 / args.change_percent))
    for name in args.builds.split(","):
        copy = args.work / f"data-{name}"
        base.copy_dir(args.dir, copy)
        one_build(name, srcs[name], copy, args.work, every, args.batch)
        subprocess.run(["rm", "-rf", str(copy)], check=True)
    base.print_summary()


if __name__ == "__main__":
    main()
