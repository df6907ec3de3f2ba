"""Disaster-recovery drill: restore, serve, compare with the source, measure RPO and RTO.

The drill restores a backup into a scratch directory exactly as an operator
would, starts a real ``fhirvault serve`` on it, and checks that what the
restored server holds is what the source held at the same point: per resource
type, the number of current resources and a hash of their decrypted content
(both read through the store and key ring, never from the restored files
alone). The source is read from a consistent copy (SQLite) or from the live
database bounded by the restored write sequence number (PostgreSQL: versions
never change and readers do not block writers), so the live server is not
disturbed. On PostgreSQL the restore goes into a scratch database the drill
creates and drops. It also runs the audit verification on the restored data.

RPO achieved: how much newer the source's newest write is than the newest
write in the restored data. RTO achieved: time to restore plus time for the
restored server to answer ``/readyz``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from fhirvault.backup.engine import DEFAULT_RETRY, Replay, RestoreResult, Retry, restore_backup
from fhirvault.backup.ports import RestoreSink
from fhirvault.backup.target import BackupTarget
from fhirvault.config import Settings, load_settings


@dataclass
class DataState:
    """Current resources as of a write sequence number: counts and content hashes per type."""

    max_seq: int
    newest_ms: int
    counts: dict[str, int] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)


def data_state(settings: Settings, until_seq: int | None = None) -> DataState:
    """Read (through the store and key ring) every current resource with seq <= ``until_seq``."""
    from fhirvault.container import build, catalog_reader
    from fhirvault.services.repository import resource_aad

    container = build(settings)
    try:
        tenant = settings.tenant
        catalog = catalog_reader(settings).catalog(tenant, until_seq)
        state = DataState(catalog.max_seq, catalog.newest_ms)
        digests: dict[str, Any] = {}
        for rtype, rid, version in catalog.latest:
            v = container.store.read_version(tenant, rtype, rid, version)
            if v is None or v.deleted:
                continue
            plain = container.keys.by_id(v.key_id).aead.open(
                v.blob, resource_aad(tenant, v.type, v.id, v.version, v.key_id))
            state.counts[rtype] = state.counts.get(rtype, 0) + 1
            h = digests.setdefault(rtype, hashlib.sha256())
            h.update(f"{rid}\x00{version}\x00".encode())
            h.update(hashlib.sha256(plain).digest())
        state.hashes = {t: h.hexdigest() for t, h in digests.items()}
        return state
    finally:
        container.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the restored server exited during start-up")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the restored server was not ready within {timeout:.0f} s")


def _served_counts(base: str, creds: dict[str, str], types: list[str]) -> dict[str, int]:
    import httpx

    with httpx.Client(base_url=base, timeout=30) as c:
        r = c.post("/oauth2/token", data={"grant_type": "client_credentials", "scope": "system/*.rs"},
                   auth=(creds["client_id"], creds["client_secret"]))
        r.raise_for_status()
        headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
        out = {}
        for t in types:
            resp = c.get(f"/fhir/{t}", params={"_summary": "count"}, headers=headers)
            if resp.status_code == 400:
                continue  # more than the server counts exactly (20,000): compared from the database only
            resp.raise_for_status()
            out[t] = int(resp.json().get("total", -1))
        return out


@dataclass
class DrillReport:
    ok: bool
    started: str
    target: str
    backup_id: str
    at: str | None
    rpo_seconds: float  # newest source write minus newest restored write
    backup_age_seconds: float  # now minus the backup's snapshot time
    rto_seconds: float  # restore + start until ready
    restore_seconds: float
    startup_seconds: float
    restored_bytes: int
    watermark_seq: int
    resources: int
    counts: dict[str, int]
    served_counts_match: bool
    audit: str
    problems: list[str]

    def text(self) -> str:
        lines = [
            f"fhirvault disaster-recovery drill: {'PASSED' if self.ok else 'FAILED'}",
            f"  started          {self.started}",
            f"  target           {self.target}",
            f"  backup           {self.backup_id}" + (f" (point in time {self.at})" if self.at else ""),
            f"  RPO achieved     {self.rpo_seconds:.1f} s of writes not in the restore "
            f"(backup age {self.backup_age_seconds:.1f} s)",
            f"  RTO achieved     {self.rto_seconds:.2f} s (restore {self.restore_seconds:.2f} s "
            f"+ start {self.startup_seconds:.2f} s)",
            f"  restored         {self.restored_bytes / 1e6:.1f} MB, {self.resources} resources "
            f"up to write #{self.watermark_seq}",
            f"  content          {'identical to the source' if not self.problems else 'MISMATCH'}",
            f"  served counts    {'match' if self.served_counts_match else 'MISMATCH'}",
            f"  audit            {self.audit}",
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines) + "\n"


def _without_backup_section(config: Path) -> None:
    """The restored server must never write to the deployment's backup targets (scheduled backups, replication,
    drills of its own): drop the [backup] tables from the scratch copy of fhirvault.toml."""
    if not config.is_file():
        return
    kept: list[str] = []
    skipping = False
    for line in config.read_text().splitlines(keepends=True):
        header = line.strip()
        if header.startswith("["):
            name = header.strip("[] \t").split("]")[0].strip()
            skipping = name == "backup" or name.startswith("backup.")
        if not skipping:
            kept.append(line)
    config.write_text("".join(kept))
    if "backup" in tomllib.loads(config.read_text()):
        raise RuntimeError("the restored fhirvault.toml sets backup outside a [backup] table: the drill will not "
                           "serve it (the restored server would write to the deployment's targets)")


def run_drill(source: Settings, target: BackupTarget, *, at_ms: int | None = None, backup_id: str | None = None,
              report_dir: Path | None = None, scratch: Path | None = None, replay: Replay | None = None,
              retry: Retry = DEFAULT_RETRY, keep_scratch: bool = False,
              scratch_url: str | None = None) -> tuple[DrillReport, list[Path]]:
    """Run the drill; returns the report and the files it was written to.

    On PostgreSQL the restore goes into a scratch database the drill creates (on the deployment's server, or on
    the server of ``scratch_url``) and drops afterwards; the source is the live database, read up to the
    restored write sequence number."""
    from fhirvault.container import scratch_database

    with contextlib.ExitStack() as stack:
        database_url = None
        if source.database_url is not None:
            database_url = stack.enter_context(scratch_database(scratch_url or source.database_url, keep=keep_scratch))
        report = _drill(source, target, at_ms=at_ms, backup_id=backup_id, scratch=scratch, replay=replay,
                        retry=retry, keep_scratch=keep_scratch, database_url=database_url)
    started = datetime.fromisoformat(report.started)
    written: list[Path] = []
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        stem = report_dir / f"dr-drill-{started.strftime('%Y%m%dT%H%M%SZ')}"
        stem.with_suffix(".json").write_bytes(orjson.dumps(asdict(report), option=orjson.OPT_INDENT_2))
        stem.with_suffix(".txt").write_text(report.text())
        written = [stem.with_suffix(".json"), stem.with_suffix(".txt")]
    return report, written


def _drill(source: Settings, target: BackupTarget, *, at_ms: int | None, backup_id: str | None,
           scratch: Path | None, replay: Replay | None, retry: Retry, keep_scratch: bool,
           database_url: str | None) -> DrillReport:
    from fhirvault.container import build, restore_sink, snapshot_source
    from fhirvault.services.audit_verify import verify_data_dir

    started = datetime.now(UTC)
    work = Path(tempfile.mkdtemp(prefix="fhirvault-drill-", dir=scratch))
    proc: subprocess.Popen[bytes] | None = None
    problems: list[str] = []
    engine = {"database_url": database_url} if database_url is not None else {}
    try:
        # 1. Restore as an operator would (on PostgreSQL: the tables into the scratch database).
        restored_dir = work / "restored"
        sink: Callable[[Path], RestoreSink] | None = None
        if database_url is not None:
            from fhirvault.backup.replication import replay as replay_feed

            def sink(d: Path) -> RestoreSink:
                return restore_sink(d, database_url)

            if replay is not None:
                def replay_into(target: BackupTarget, backup_key: bytes, data_dir: Path,
                                watermarks: dict[str, dict[str, int]], until_ms: int | None) -> object:
                    return replay_feed(target, backup_key, data_dir, watermarks, until_ms,
                                       sink=restore_sink(data_dir, database_url))

                replay = replay_into
        res: RestoreResult = restore_backup(target, restored_dir, source.root_key_path.read_bytes(),
                                            backup_id=backup_id, at_ms=at_ms, replay=replay, retry=retry, sink=sink)
        _without_backup_section(restored_dir / "fhirvault.toml")
        restored = load_settings({"data_dir": restored_dir, "tenant": source.tenant, **engine}, environ={})
        # 2. The source as of now, read after the restore so that it holds at least everything the restore
        # could have (replicated changes included); the live server keeps going. SQLite: a consistent copy;
        # PostgreSQL: the live database itself.
        src_dir = work / "source"
        src_dir.mkdir(mode=0o700)
        src_settings = source
        if snapshot_source(source).copy_for_reading(src_dir):
            src_settings = load_settings({"data_dir": src_dir, "root_key_file": source.root_key_path,
                                          "tenant": source.tenant}, environ={})
        # 3. Compare content at the restored point.
        got = data_state(restored)
        want = data_state(src_settings, got.max_seq)
        for t in sorted(set(want.counts) | set(got.counts)):
            if want.counts.get(t) != got.counts.get(t):
                problems.append(f"{t}: {got.counts.get(t, 0)} resources restored, {want.counts.get(t, 0)} in the source")
            elif want.hashes.get(t) != got.hashes.get(t):
                problems.append(f"{t}: restored content differs from the source")
        source_newest = data_state(src_settings).newest_ms
        audit = verify_data_dir(restored)
        if not audit.ok:
            problems.append(audit.summary())
        container = build(restored)
        try:
            client = container.auth.register_client("dr-drill", "system/*.rs")
        finally:
            container.close()
        # 4. Serve it, as the new production server would (one worker: a drill measures, it does not scale).
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
        if database_url is not None:
            env["FHIRVAULT_DATABASE_URL"] = database_url  # never the source's database of the restored toml
        t0 = time.monotonic()
        with (work / "server.log").open("ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "fhirvault.cli.main", "serve", "--data-dir", str(restored_dir),
                 "--port", str(port), "--workers", "1"], stdout=log, stderr=log, env=env, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, proc, 120)
        startup = time.monotonic() - t0
        assert client.client_secret is not None
        served = _served_counts(base, {"client_id": client.client_id, "client_secret": client.client_secret},
                                sorted(got.counts))
        served_ok = all(got.counts.get(t) == n for t, n in served.items())
        if not served_ok:
            problems.append("the restored server does not report the restored resource counts")
        now_ms = time.time_ns() // 1_000_000
        return DrillReport(
            ok=not problems, started=started.isoformat(timespec="seconds"), target=target.url,
            backup_id=res.backup_id,
            at=None if at_ms is None else datetime.fromtimestamp(at_ms / 1000, UTC).isoformat(),
            rpo_seconds=max(0, source_newest - got.newest_ms) / 1000,
            backup_age_seconds=(now_ms - res.snapshot_ms) / 1000,
            rto_seconds=res.seconds + startup, restore_seconds=res.seconds, startup_seconds=startup,
            restored_bytes=res.size, watermark_seq=got.max_seq, resources=sum(got.counts.values()),
            counts=got.counts, served_counts_match=served_ok, audit=audit.summary(), problems=problems)
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not keep_scratch:
            shutil.rmtree(work, ignore_errors=True)
