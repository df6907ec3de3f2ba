"""Drive the local high-availability cluster of scripts/ha-up.sh: faults, write load, checks.

Shared by tests/ha/test_chaos.py and bench/ha_killloop.py. Everything goes through what an operator
has: the scripts, process ids in the cluster directory, Patroni's REST API, HAProxy's FHIR frontend,
the ``fhirvault`` command, and PostgreSQL as its superuser (for the leadership check only).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from fhirvault.adapters.postgres_store import lock_key

ROOT = Path(__file__).resolve().parents[2]
UP = ROOT / "scripts" / "ha-up.sh"
DOWN = ROOT / "scripts" / "ha-down.sh"
FHIRVAULT = str(Path(sys.executable).parent / "fhirvault")
FHIR_JSON = {"Content-Type": "application/fhir+json"}
MARKER_SYSTEM = "urn:fhirvault:ha-test"
TOKEN_RENEW_S = 200.0
# The server's cluster singletons (web/app.py, services/audit_*.py): role names of Leadership.lead().
ROLES = ("audit-checkpoints", "audit-verify", "config-audit", "backups")


@dataclass
class Attempt:
    start: float  # time.monotonic()
    end: float
    status: int  # 0: no HTTP answer (connection refused/reset, timeout)
    marker: str
    resource_id: str | None = None
    error: str | None = None


@dataclass
class Load:
    """What a write load saw: every attempt, in completion order."""

    attempts: list[Attempt] = field(default_factory=list)

    def acknowledged(self) -> list[Attempt]:
        return [a for a in self.attempts if a.status == 201]

    def failed(self) -> list[Attempt]:
        return [a for a in self.attempts if a.status != 201]

    def recovery(self, t: float, quiet: float) -> float | None:
        """Seconds from a fault at ``t`` to the first acknowledged write after the writes that failed.

        That is the end of the first 201 started after the last failure that followed ``t`` (or
        after ``t`` when nothing failed); None until writes have succeeded, with no failure, for
        ``quiet`` seconds after it (so that a fault still taking effect is not taken for a recovery)."""
        after = [a for a in self.attempts if a.start >= t or a.end >= t]
        failures = [a.end for a in after if a.status != 201]
        since = max(failures, default=t)
        done = sorted(a.end for a in after if a.status == 201 and a.start >= since)
        if not done or done[-1] - done[0] < quiet:
            return None
        return done[0] - t

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for a in self.attempts:
            counts[a.status] = counts.get(a.status, 0) + 1
        return counts


class Cluster:
    def __init__(self, directory: Path, base_port: int) -> None:
        self.dir = directory
        self.base_port = base_port
        self._token: str | None = None
        self._token_at = 0.0

    # -- whole cluster ---------------------------------------------------------------------------
    def up(self, timeout: float = 300) -> str:
        """scripts/ha-up.sh: start whatever is not running and wait until all is healthy."""
        env = {**os.environ, "HA_FHIRVAULT": FHIRVAULT, "HA_TIMEOUT": str(int(timeout))}
        env = {k: v for k, v in env.items() if not k.startswith("FHIRVAULT_")}
        proc = subprocess.run(["bash", str(UP), str(self.dir), str(self.base_port)], capture_output=True, text=True,
                              env=env, timeout=timeout + 120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ha-up.sh failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}\n"
                               f"{self.logs_tail()}")
        return proc.stdout

    def down(self, purge: bool = False) -> None:
        subprocess.run(["bash", str(DOWN), str(self.dir), *(["--purge"] if purge else [])], capture_output=True,
                       timeout=180, check=False)

    @property
    def info(self) -> dict[str, Any]:
        return dict(json.loads((self.dir / "cluster.json").read_text()))

    @property
    def http(self) -> str:
        return str(self.info["http"])

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for log in [*sorted(self.dir.glob("fhirvault/node*.log")), *sorted(self.dir.glob("pg/n*/patroni.log"))]:
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log}\n" + "\n".join(text))
        return "\n".join(out)

    # -- Patroni -----------------------------------------------------------------------------------
    def members(self) -> list[dict[str, Any]]:
        """Patroni's view of the cluster (from any node whose REST API answers)."""
        for node in self.info["patroni"]:
            try:
                r = httpx.get(node["rest"] + "/cluster", timeout=2)
                return list(r.json()["members"])
            except (httpx.HTTPError, ValueError, KeyError):
                continue
        raise RuntimeError("no Patroni node answers")

    def primary(self) -> str:
        leaders = [m["name"] for m in self.members() if m["role"] == "leader"]
        assert len(leaders) == 1, leaders
        return str(leaders[0])

    def pg_node(self, name: str) -> dict[str, Any]:
        return next(n for n in self.info["patroni"] if n["name"] == name)

    def kill_pg_node(self, name: str) -> None:
        """The machine dies: SIGKILL to Patroni and to its PostgreSQL (postmaster and every backend) at once."""
        node_dir = Path(self.pg_node(name)["dir"])
        pids = [int((node_dir / "patroni.pid").read_text())]
        postmaster = node_dir / "data" / "postmaster.pid"
        if postmaster.exists():
            pm = int(postmaster.read_text().split()[0])
            pids += [pm, *children(pm)]
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # -- etcd ------------------------------------------------------------------------------------
    def stop_etcd(self, index: int) -> None:
        """A clean stop of one etcd member (SIGTERM; the other two keep the quorum)."""
        pid = int((self.dir / "etcd" / f"e{index}" / "etcd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pid_alive(pid), 30, f"etcd e{index} to stop")

    def etcd_healthy(self) -> list[bool]:
        out = []
        for url in self.info["etcd"]:
            try:
                out.append(httpx.get(url + "/health", timeout=2).json().get("health") == "true")
            except (httpx.HTTPError, ValueError):
                out.append(False)
        return out

    # -- fhirvault nodes -------------------------------------------------------------------------
    def fv_pid(self, name: str) -> int:
        node = next(n for n in self.info["fhirvault"] if n["name"] == name)
        return int(Path(node["pid_file"]).read_text())

    def kill_fv_node(self, name: str) -> None:
        """SIGKILL to the node's every process (Granian supervisor and workers)."""
        os.killpg(self.fv_pid(name), signal.SIGKILL)

    def leaders(self) -> dict[str, list[str]]:
        """Cluster singleton role → the fhirvault nodes holding its advisory lock (one, or none).

        The lock's session is traced to a node's process through its client port and /proc."""
        keys = {lock_key("leader:" + role): role for role in ROLES}
        with self.superuser() as c:
            rows = c.execute(
                "SELECT l.classid::bigint, l.objid::bigint, a.client_port FROM pg_locks l JOIN pg_stat_activity a"
                " USING (pid) WHERE l.locktype = 'advisory' AND l.granted AND a.datname = 'fhirvault'").fetchall()
        port_owner = self._local_ports()
        owners: dict[str, list[str]] = {}
        for classid, objid, port in rows:
            key = int.from_bytes(((classid << 32) | objid).to_bytes(8, "big"), "big", signed=True)
            if key in keys:
                owners.setdefault(keys[key], []).append(port_owner.get(int(port), "?"))
        return owners

    def _local_ports(self) -> dict[int, str]:
        """TCP local port → fhirvault node name, for the nodes' processes."""
        inode_port = {}
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                inode_port[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
        found: dict[int, str] = {}
        for node in self.info["fhirvault"]:
            try:
                group = int(Path(node["pid_file"]).read_text())
            except FileNotFoundError:
                continue
            for pid in [group, *descendants(group)]:
                try:
                    fds = os.listdir(f"/proc/{pid}/fd")
                except OSError:
                    continue
                for fd in fds:
                    try:
                        target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    except OSError:
                        continue
                    if target.startswith("socket:[") and (port := inode_port.get(target[8:-1])) is not None:
                        found[port] = node["name"]
        return found

    @contextmanager
    def superuser_conn(self) -> Iterator[psycopg.Connection[Any]]:
        password = (self.dir / "secrets" / "postgres").read_text().strip()
        host, port = self.info["postgres_primary"].split(":")
        with psycopg.connect(host=host, port=int(port), user="postgres", password=password, dbname="fhirvault",
                             autocommit=True, connect_timeout=5) as c:
            yield c

    def superuser(self) -> Any:
        return self.superuser_conn()

    # -- FHIR ------------------------------------------------------------------------------------
    def token(self, refresh: bool = False) -> str:
        """The admin client's access token, renewed before it expires (token_ttl_seconds: 300)."""
        if self._token is None or refresh or time.monotonic() - self._token_at > TOKEN_RENEW_S:
            creds = json.loads(Path(self.info["admin_client"]).read_text())
            deadline = time.monotonic() + 60
            while True:
                try:
                    r = httpx.post(self.http + "/oauth2/token", data={"grant_type": "client_credentials"},
                                   auth=(creds["client_id"], creds["client_secret"]), timeout=10)
                    if r.status_code == 200:
                        self._token = str(r.json()["access_token"])
                        self._token_at = time.monotonic()
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("no token from the cluster")
                time.sleep(0.5)
        return self._token

    @contextmanager
    def write_load(self, writers: int = 2, pause: float = 0.02) -> Iterator[Load]:
        """Threads POSTing Patients through HAProxy until the block ends; every attempt is recorded."""
        load = Load()
        stop = threading.Event()
        lock = threading.Lock()

        def writer() -> None:
            with httpx.Client(base_url=self.http + "/fhir", timeout=30) as client:
                while not stop.is_set():
                    marker = uuid.uuid4().hex
                    body = {"resourceType": "Patient", "name": [{"family": "Chaos", "given": [marker[:8]]}],
                            "identifier": [{"system": MARKER_SYSTEM, "value": marker}]}
                    start = time.monotonic()
                    attempt = Attempt(start, start, 0, marker)
                    try:
                        r = client.post("/Patient", json=body,
                                        headers={**FHIR_JSON, "Authorization": f"Bearer {self.token()}"})
                        attempt.status = r.status_code
                        if r.status_code == 201:
                            attempt.resource_id = str(r.json()["id"])
                        elif r.status_code == 401:
                            self.token(refresh=True)
                        else:
                            attempt.error = r.text[:300]
                    except httpx.HTTPError as exc:
                        attempt.error = f"{type(exc).__name__}: {exc}"
                    attempt.end = time.monotonic()
                    with lock:
                        load.attempts.append(attempt)
                    if attempt.status != 201:
                        time.sleep(0.1)  # a client backing off a little, not hammering a failing cluster
                    elif pause:
                        time.sleep(pause)

        threads = [threading.Thread(target=writer, daemon=True, name=f"ha-writer-{i}") for i in range(writers)]
        for t in threads:
            t.start()
        try:
            yield load
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)

    def write_one(self) -> bool:
        """One create through HAProxy; True when acknowledged."""
        body = {"resourceType": "Patient", "name": [{"family": "Chaos"}]}
        r = httpx.post(self.http + "/fhir/Patient", json=body, timeout=30,
                       headers={**FHIR_JSON, "Authorization": f"Bearer {self.token()}"})
        return r.status_code == 201

    def unreadable(self, attempts: list[Attempt]) -> list[str]:
        """The acknowledged creates that cannot be read back with what was sent (empty: none lost)."""
        lost = []
        with httpx.Client(base_url=self.http + "/fhir", timeout=30) as client:
            for a in attempts:
                for _ in range(3):  # a 503 while a node comes back is not a lost write; ask again
                    r = client.get(f"/Patient/{a.resource_id}", headers={"Authorization": f"Bearer {self.token()}"})
                    if r.status_code == 401:
                        self.token(refresh=True)
                        continue
                    if r.status_code < 500:
                        break
                    time.sleep(1)
                ok = r.status_code == 200 and r.json()["identifier"][0]["value"] == a.marker
                if not ok:
                    lost.append(f"{a.resource_id}: {r.status_code}")
        return lost

    # -- audit -----------------------------------------------------------------------------------
    def audit_verify(self, node: str = "node1") -> dict[str, Any]:
        data_dir = next(n for n in self.info["fhirvault"] if n["name"] == node)["data_dir"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
        proc = subprocess.run([FHIRVAULT, "audit", "verify", "--data-dir", data_dir, "--json"], capture_output=True,
                              text=True, env=env, timeout=300, check=False)
        try:
            report: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            raise AssertionError(f"audit verify (exit {proc.returncode}): {proc.stdout}{proc.stderr}") from None
        report["exit"] = proc.returncode
        return report

    def forks(self) -> list[str]:
        """Tree sizes that two checkpoints (signed in the database or held by the witness) give different roots."""
        roots: dict[int, set[bytes]] = {}
        with self.superuser() as c:
            for size, root in c.execute("SELECT size, root FROM audit.audit_checkpoints").fetchall():
                roots.setdefault(int(size), set()).add(bytes(root))
        witness = self.dir / "fhirvault" / "audit-witness.log"
        for line in witness.read_text().splitlines() if witness.exists() else []:
            doc = json.loads(line)
            roots.setdefault(int(doc["size"]), set()).add(base64.b64decode(doc["root"]))
        return [f"size {size}: {len(r)} roots" for size, r in sorted(roots.items()) if len(r) > 1]

    def witnessed(self) -> int:
        witness = self.dir / "fhirvault" / "audit-witness.log"
        return len(witness.read_text().splitlines()) if witness.exists() else 0


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    found = children(pid)
    for child in list(found):
        found += descendants(child)
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (f"max {max(values):.1f} s, median {statistics.median(values):.1f} s, min {min(values):.1f} s "
            f"(n={len(values)})")
