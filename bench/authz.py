#!/usr/bin/env python3
"""Authorization cost benchmark (issue #4, "Benchmarks").

Starts a fresh ``fhirvault serve`` on a temporary data directory (or uses
``--base-url``/``--data-dir`` of a running one), seeds a population, then
measures the same loads with two tokens, alternating A/B over several rounds:

* **a: admin** -- the ``client_credentials`` token of ``admin-client.json``
  (``system/*.cruds``, a backend service: decided on its scopes alone);
* **b: practitioner** -- a ``user/*.cruds`` token of a user with role
  ``practitioner`` and ``fhirUser`` = the benchmark Practitioner, obtained
  through the real login flow (authorization code + PKCE, password, TOTP) of
  a confidential SMART app; every access goes through the care-relationship,
  consent and label checks.

Population (written with the admin token before measuring): ``--patients`` N
Patients, ``--observations`` k Observations each, one benchmark Practitioner,
and an active CareTeam (subject = the patient, member = the Practitioner) for
every other patient, so half the patients are related to the practitioner.

Loads (``--loads``):

* ``read`` -- each virtual user GETs random seeded Patients and Observations
  (uniformly over the seeded resources; same sequence for both tokens). The
  admin token expects 200 for all; the practitioner 200 for related patients'
  resources and 404 for the others (the policy's answer for "no care
  relationship"). Any other status counts as an error, so the run also checks
  that the practitioner sees exactly their patients.
* ``crud`` -- the CRUD workload of ``crud.py`` on the seeded population: each
  iteration takes a random *related* patient P and creates Encounter (subject P),
  Observation (subject P) and MedicationRequest (subject P), referring to a
  Location, Organization and Practitioner seeded by the admin (users other than
  directory administrators may not write the directory, issue #11), reads P and
  the three, updates P and the three, deletes the three (14 requests, same
  templates as ``crud.py``). All
  answers must be 2xx for both tokens. ``crud.py`` itself cannot run with a
  practitioner token: the Patient it creates has no care relationship yet, so
  the practitioner may create it but not read, update or delete it.

Then revocation latency (``--revocation-trials``):

* in-process: ``POST /oauth2/revoke`` (the app's client credentials) of a
  fresh practitioner access token while a poller GETs a related Patient with
  it back to back; latency = first 401 answer - revoke response;
* cross-process: ``fhirvault user disable`` (another process: the CLI) of a
  freshly logged-in practitioner while the poller runs; latency = first 401
  answer - the moment the CLI printed that the sessions ended (just after its
  commit). The server picks others' revocations up at most
  ``REVOCATION_POLL_S`` after its previous poll, on the next token check.

Usage::

    python bench/authz.py --rounds 3 --duration 15 --clients 32 [--json out.json]

See bench/README.md, "Authorization cost (issue #4)".
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import _loadgen as lg
import crud
import httpx
import pyotp
from yarl import URL

REDIRECT = "http://127.0.0.1:9/callback"  # never followed
APP_SCOPE = "openid fhirUser offline_access user/*.cruds"
PASSWORD = "bench practitioner password 1"
CARE_TEAM_ROLE = {
    "system": "http://snomed.info/sct",
    "code": "158965000",
    "display": "Medical practitioner",
}
# Patient comes from the seeded population; the directory (Location, Organization, Practitioner) is
# written by directory administrators only (docs/access-control.md), so it is seeded too and referenced.
DIRECTORY_TYPES = ("Location", "Organization", "Practitioner")
CRUD_TYPES = tuple(rt for rt in crud.ORDER[1:] if rt not in DIRECTORY_TYPES)
TOKENS = ("admin", "practitioner")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Server, CLI, CPU accounting
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}


def start_server(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fhirvault.cli.main",
                "serve",
                "--data-dir",
                str(data_dir),
                "--port",
                str(port),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            # The firewall's limits out of the way: this measures capacity from one address.
            env={**clean_env(), "FHIRVAULT_CONFIG": str(Path(__file__).with_name("capacity.toml"))},
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1).status_code == 200:
                return proc
        time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"server did not come up; see {log_path}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cli(data_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "fhirvault.cli.main", *args, "--data-dir", str(data_dir)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"fhirvault {' '.join(args)}: exit {out.returncode}: {out.stderr.strip()}"
        )
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root`` and all its descendants."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read().decode()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


# ---------------------------------------------------------------------------
# Tokens: admin (client credentials) and practitioner (login flow)
# ---------------------------------------------------------------------------


def admin_token(origin: str, data_dir: Path) -> str:
    client = json.loads((data_dir / "admin-client.json").read_text())
    r = httpx.post(
        f"{origin}/oauth2/token",
        timeout=30,
        data={"grant_type": "client_credentials", "scope": "system/*.cruds"},
        auth=(client["client_id"], client["client_secret"]),
    )
    r.raise_for_status()
    return str(r.json()["access_token"])


def _form_fields(page: str) -> dict[str, str]:
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', page))


class Practitioner:
    """A practitioner account (CLI), logged in through /oauth2/authorize with password + TOTP."""

    def __init__(
        self, origin: str, data_dir: Path, username: str, fhir_user: str, app: dict[str, str]
    ) -> None:
        made = cli(
            data_dir,
            "user",
            "create",
            "--username",
            username,
            "--role",
            "practitioner",
            "--fhir-user",
            fhir_user,
            stdin=PASSWORD + "\n",
        )
        uri = next(x for x in made.stdout.splitlines() if x.startswith("otpauth://"))
        totp = pyotp.parse_uri(uri)
        assert isinstance(totp, pyotp.TOTP)
        self.totp = totp
        self.origin = origin
        self.username = username
        self.app = app
        self.refresh_token = ""
        self.access_token = ""

    def login(self) -> str:
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        params = {
            "response_type": "code",
            "client_id": self.app["client_id"],
            "redirect_uri": REDIRECT,
            "scope": APP_SCOPE,
            "state": secrets.token_hex(8),
            "nonce": secrets.token_hex(8),
            "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256",
            "aud": f"{self.origin}/fhir",
        }
        with httpx.Client(base_url=self.origin, timeout=30, follow_redirects=False) as http:
            r = http.get("/oauth2/authorize", params=params)
            r = http.post(
                "/oauth2/authorize",
                data={**_form_fields(r.text), "username": self.username, "password": PASSWORD},
            )
            if r.status_code == 200 and 'value="totp"' in r.text:
                r = http.post(
                    "/oauth2/authorize", data={**_form_fields(r.text), "code": self.totp.now()}
                )
            if r.status_code != 303:
                raise RuntimeError(f"login failed: {r.status_code} {r.text[:300]}")
            query = parse_qs(urlsplit(r.headers["location"]).query)
            if "code" not in query:
                raise RuntimeError(f"login failed: {r.headers['location']}")
            r = http.post(
                "/oauth2/token",
                auth=(self.app["client_id"], self.app["client_secret"]),
                data={
                    "grant_type": "authorization_code",
                    "code": query["code"][0],
                    "redirect_uri": REDIRECT,
                    "code_verifier": verifier,
                },
            )
            r.raise_for_status()
        doc = r.json()
        self.refresh_token = doc["refresh_token"]
        self.access_token = doc["access_token"]
        return self.access_token

    def refresh(self) -> str:
        """A fresh access token (refresh grant; the refresh token rotates)."""
        r = httpx.post(
            f"{self.origin}/oauth2/token",
            timeout=30,
            auth=(self.app["client_id"], self.app["client_secret"]),
            data={"grant_type": "refresh_token", "refresh_token": self.refresh_token},
        )
        r.raise_for_status()
        doc = r.json()
        self.refresh_token = doc["refresh_token"]
        self.access_token = doc["access_token"]
        return self.access_token


# ---------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------


class Seeded:
    def __init__(self) -> None:
        self.practitioner = ""  # "Practitioner/<id>"
        self.directory: dict[bytes, bytes] = {}  # @@Location@@ -> b"Location/<id>"…, seeded by the admin
        self.patients: list[tuple[str, int, bool]] = []  # (id, Patient template index, related)
        self.observations: list[tuple[str, bool]] = []  # (id, related)
        self.care_teams = 0
        self.seconds = 0.0


async def seed(base: str, token: str, n: int, k: int, seed_: int, concurrency: int) -> Seeded:
    t0 = time.perf_counter()
    out = Seeded()
    pool = crud.build_pool(seed_, 128)
    rng = random.Random(f"{seed_}/authz/observations")
    obs_bodies: list[bytes] = []
    for _ in range(64):
        body, _upd = crud.make_observation(rng)
        body.pop("encounter")
        obs_bodies.append(lg.dumps(body))
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": lg.FHIR_JSON,
        "Accept": lg.FHIR_JSON,
    }
    session = lg.make_session(concurrency, 60)

    async def post(rt: str, body: bytes) -> str:
        for attempt in range(3):
            async with session.post(f"{base}/{rt}", data=body, headers=headers) as resp:
                data = await resp.read()
                if resp.status == 201:
                    rid = crud.extract_id(rt, data, resp.headers.get("Location"))
                    if rid:
                        return rid
                if attempt == 2:
                    raise RuntimeError(f"seeding {rt}: HTTP {resp.status}: {data[:300]!r}")
            await asyncio.sleep(0.5)
        raise AssertionError("unreachable")

    async def run(jobs: list[Any]) -> list[Any]:
        results: list[Any] = [None] * len(jobs)
        it = iter(enumerate(jobs))

        async def worker() -> None:
            for i, job in it:
                results[i] = await job()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results

    try:
        prac = pool["Practitioner"][0]
        out.practitioner = "Practitioner/" + await post("Practitioner", prac.create)
        out.directory[b"@@Practitioner@@"] = out.practitioner.encode()
        for rt in ("Location", "Organization"):
            tmpl = pool[rt][0]
            body = tmpl.render(tmpl.create, tmpl.create_keys, {crud.PH_N_B: b"seed"})
            out.directory[crud.ref_placeholder(rt).encode()] = f"{rt}/{await post(rt, body)}".encode()
        ptmpl = pool["Patient"]

        def patient_job(i: int) -> Any:
            tmpl = ptmpl[i % len(ptmpl)]
            body = tmpl.render(tmpl.create, tmpl.create_keys, {crud.PH_N_B: f"seed-{i}".encode()})
            return lambda: post("Patient", body)

        ids = await run([patient_job(i) for i in range(n)])
        out.patients = [(pid, i % len(ptmpl), i % 2 == 0) for i, pid in enumerate(ids)]
        log(f"seeded {n} patients")

        def obs_job(pid: str, j: int) -> Any:
            body = obs_bodies[j % len(obs_bodies)].replace(
                b"@@Patient@@", f"Patient/{pid}".encode()
            )
            return lambda: post("Observation", body)

        def team_job(pid: str) -> Any:
            body = lg.dumps(
                {
                    "resourceType": "CareTeam",
                    "status": "active",
                    "name": "Benchmark care team",
                    "subject": {"reference": f"Patient/{pid}"},
                    "participant": [
                        {
                            "role": [{"coding": [CARE_TEAM_ROLE]}],
                            "member": {"reference": out.practitioner},
                        }
                    ],
                }
            )
            return lambda: post("CareTeam", body)

        jobs: list[Any] = []
        owners: list[tuple[str, bool] | None] = []
        for idx, (pid, _t, related) in enumerate(out.patients):
            for j in range(k):
                jobs.append(obs_job(pid, idx * k + j))
                owners.append((pid, related))
            if related:
                jobs.append(team_job(pid))
                owners.append(None)
        rids = await run(jobs)
        for owner, rid in zip(owners, rids, strict=True):
            if owner is None:
                out.care_teams += 1
            else:
                out.observations.append((rid, owner[1]))
    finally:
        await session.close()
    out.seconds = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------
# Loads
# ---------------------------------------------------------------------------


async def get_expect(client: lg.Client, op: lg.Op, url: URL, expected: int) -> None:
    rec = client.rec
    t0 = lg.perf_counter_ns()
    try:
        async with client.session.get(url, headers=client.auth.plain_headers) as resp:
            data = await resp.read()
            status = resp.status
    except Exception as exc:
        rec.error(op, rec.sample(op, t0, lg.perf_counter_ns()), type(exc).__name__, str(exc))
        return
    in_window = rec.sample(op, t0, lg.perf_counter_ns())
    if status != expected:
        rec.error(op, in_window, f"HTTP {status} (expected {expected})", data)


class SeededCrud(crud.Workload):
    """crud.py's iteration with the Patient taken from the related seeded patients."""

    def __init__(
        self,
        *args: Any,
        patients: list[tuple[bytes, crud.Template]],
        patient_url: str,
        patient_ops: tuple[lg.Op, lg.Op],
        directory: dict[bytes, bytes],
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self.directory = directory
        self.patients = patients
        self.patient_url = patient_url
        self.patient_read, self.patient_update = patient_ops

    async def iteration(self, rng: random.Random, n: bytes) -> None:
        call = self.client.call
        pid, ptmpl = self.patients[rng.randrange(len(self.patients))]
        purl = URL(self.patient_url + pid.decode(), encoded=True)
        values: dict[bytes, bytes] = {crud.PH_N_B: n, b"@@Patient@@": b"Patient/" + pid, **self.directory}
        created = await self.create_chain(rng, values)
        await call(self.patient_read, "GET", purl, None)
        for spec, _, _, url in created:
            await call(spec.read, "GET", url, None)
        values[crud.PH_ID_B] = pid
        await call(
            self.patient_update, "PUT", purl, ptmpl.render(ptmpl.update, ptmpl.update_keys, values)
        )
        for spec, tmpl, rid_b, url in created:
            values[crud.PH_ID_B] = rid_b
            await call(spec.update, "PUT", url, tmpl.render(tmpl.update, tmpl.update_keys, values))
        for spec, _, _, url in reversed(created):
            await call(spec.delete, "DELETE", url, None)


async def measure(
    load: str,
    who: str,
    token: str,
    base: str,
    seeded: Seeded,
    args: argparse.Namespace,
    round_: int,
) -> dict[str, Any]:
    auth = lg.Auth(token=token)
    session = lg.make_session(args.clients, args.timeout)
    ops: list[lg.Op] = []
    try:
        if load == "read":
            op_of = {
                (rt, rel): lg.Op("read", f"{rt} ({'related' if rel else 'unrelated'})")
                for rt in ("Patient", "Observation")
                for rel in (True, False)
            }
            ops = list(op_of.values())
            deny = 404 if who == "practitioner" else 200
            targets = [
                (
                    URL(f"{base}/Patient/{pid}", encoded=True),
                    op_of["Patient", rel],
                    200 if rel else deny,
                )
                for pid, _t, rel in seeded.patients
            ]
            targets += [
                (
                    URL(f"{base}/Observation/{oid}", encoded=True),
                    op_of["Observation", rel],
                    200 if rel else deny,
                )
                for oid, rel in seeded.observations
            ]
            if args.read_mix == "related":
                targets = [t for t in targets if t[2] == 200 and "(related)" in t[1].key]
        else:
            pool = crud.build_pool(args.seed, 128)
            op_map = {(k, rt): lg.Op(k, rt) for rt in crud.ORDER for k in crud.KINDS}
            ops = list(op_map.values())
        rec = lg.Recorder(ops)
        client = lg.Client(session, auth, rec)
        iterations = [0]
        if load == "read":

            async def user(uidx: int) -> None:
                rng = random.Random(f"{args.seed}/authz-read/{round_}/{uidx}")
                done = 0
                while True:
                    now = lg.perf_counter_ns()
                    if now >= rec.measure_end:
                        break
                    url, op, expected = targets[rng.randrange(len(targets))]
                    await get_expect(client, op, url, expected)
                    done += now >= rec.measure_start
                iterations[0] += done

            runner = user
        else:
            specs = [
                crud.TypeSpec(
                    rt=rt,
                    url=URL(f"{base}/{rt}"),
                    prefix=f"{base}/{rt}/",
                    ref_key=crud.ref_placeholder(rt).encode(),
                    dep_keys=tuple(
                        crud.ref_placeholder(d).encode() for d in crud.DEPENDS_ON.get(rt, ())
                    ),
                    templates=pool[rt],
                    create=op_map["create", rt],
                    read=op_map["read", rt],
                    update=op_map["update", rt],
                    delete=op_map["delete", rt],
                )
                for rt in CRUD_TYPES
            ]
            patients = [
                (pid.encode(), pool["Patient"][t]) for pid, t, rel in seeded.patients if rel
            ]
            work = SeededCrud(
                client,
                specs,
                args.seed + 1000 * round_,
                0,
                patients=patients,
                patient_url=f"{base}/Patient/",
                patient_ops=(op_map["read", "Patient"], op_map["update", "Patient"]),
                directory=seeded.directory,
            )
            runner = work.user
        lg.tune_gc()
        server_cpu0 = tree_cpu_s(args.server_pid) if args.server_pid else 0.0
        load0 = os.getloadavg()[0]
        now = lg.perf_counter_ns()
        rec.start(now, args.warmup, args.duration)
        cpu_mark: list[tuple[float, float]] = []

        def mark() -> None:
            cpu_mark.append(
                (time.process_time(), tree_cpu_s(args.server_pid) if args.server_pid else 0.0)
            )

        asyncio.get_running_loop().call_later(args.warmup, mark)
        spy: list[subprocess.Popen[bytes]] = []
        if args.py_spy:
            out_file = Path(args.py_spy) / f"{load}-{round_}-{who}.txt"
            asyncio.get_running_loop().call_later(
                args.warmup,
                lambda: spy.append(
                    subprocess.Popen(
                        [
                            args.py_spy_bin,
                            "record",
                            "--pid",
                            str(args.server_pid),
                            "--subprocesses",
                            "--nonblocking",
                            "--format",
                            "raw",
                            "--rate",
                            "100",
                            "--duration",
                            str(int(args.duration)),
                            "--output",
                            str(out_file),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                ),
            )
        end_mark: list[tuple[float, float]] = []
        asyncio.get_running_loop().call_later(
            args.warmup + args.duration,
            lambda: end_mark.append(
                (time.process_time(), tree_cpu_s(args.server_pid) if args.server_pid else 0.0)
            ),
        )
        await asyncio.gather(*(runner(u) for u in range(args.clients)))
        for proc in spy:
            await asyncio.to_thread(proc.wait)
        if load == "crud":
            iterations[0] = work.iterations
        if not end_mark:
            mark_end = (
                time.process_time(),
                tree_cpu_s(args.server_pid) if args.server_pid else 0.0,
            )
        else:
            mark_end = end_mark[0]
        start = cpu_mark[0] if cpu_mark else (0.0, server_cpu0)
        result = rec.result(iterations[0], mark_end[0] - start[0], args.duration)
    finally:
        await session.close()
    merged = lg.merge([result])
    elapsed = merged.elapsed_s
    samples, errors = lg.group(merged, (op.key for op in ops))
    overall = lg.summarize(samples, errors, elapsed)
    per_op = {op.key: lg.summarize(*lg.group(merged, [op.key]), elapsed) for op in ops}
    per_op = {k: v for k, v in per_op.items() if v["count"] or v["errors"]}
    server_cpu = mark_end[1] - start[1]
    return {
        "load": load,
        "token": who,
        "round": round_,
        "elapsed_s": round(elapsed, 3),
        "iterations": merged.iterations,
        "overall": overall,
        "operations": per_op,
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_ms_per_req": round(1000 * server_cpu / overall["count"], 3)
        if overall["count"]
        else None,
        "loadgen_cpu_s": round(merged.cpu_s, 2),
        "loadavg_1m_before": load0,
        "errors": {
            "measured": errors,
            "outside_window": merged.outside_errors,
            "samples": {k: v for k, v in list(merged.error_samples.items())[:8]},
        },
    }


# ---------------------------------------------------------------------------
# Revocation latency
# ---------------------------------------------------------------------------


class Poller(threading.Thread):
    """GETs one URL with a token back to back, recording (sent, answered, status)."""

    def __init__(self, url: str, token: str, max_s: float) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}", "Accept": lg.FHIR_JSON}
        self.max_s = max_s
        self.log: list[tuple[float, float, int]] = []
        self.stop_after_401 = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_s
        extra = 0
        with httpx.Client(timeout=30) as http:
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                status = http.get(self.url, headers=self.headers).status_code
                self.log.append((t0, time.monotonic(), status))
                if len(self.log) >= 20:
                    self.ready.set()
                if status == 401:
                    extra += 1
                    if extra >= 20:
                        return

    def outcome(self, t_ref: float) -> dict[str, Any]:
        """Relative to ``t_ref`` (when the revocation was known to be done): when the first 401 was
        answered (negative: before ``t_ref``) and how many requests sent after ``t_ref`` got 200."""
        first_401 = next((x for x in self.log if x[2] == 401), None)
        stale = [x for x in self.log if x[0] >= t_ref and x[2] == 200]
        later_ok = [
            x for x in self.log if first_401 is not None and x[0] > first_401[1] and x[2] != 401
        ]
        return {
            "latency_ms": round((first_401[1] - t_ref) * 1000, 1) if first_401 else None,
            "stale_200_after_revocation": len(stale),
            "non_401_after_first_401": len(later_ok),
            "poll_interval_ms": round(1000 * statistics.median(b - a for a, b, _ in self.log), 2)
            if self.log
            else None,
            "requests": len(self.log),
        }


def revocation(
    origin: str,
    data_dir: Path,
    seeded: Seeded,
    app: dict[str, str],
    main: Practitioner,
    trials: int,
) -> dict[str, Any]:
    related = next(pid for pid, _t, rel in seeded.patients if rel)
    url = f"{origin}/fhir/Patient/{related}"
    inproc: list[dict[str, Any]] = []
    for _ in range(trials):
        token = main.refresh()
        poller = Poller(url, token, 15)
        poller.start()
        poller.ready.wait(10)
        t_sent = time.monotonic()
        r = httpx.post(
            f"{origin}/oauth2/revoke",
            data={"token": token},
            timeout=30,
            auth=(app["client_id"], app["client_secret"]),
        )
        t_done = time.monotonic()
        poller.join()
        res = poller.outcome(t_done)
        res["revoke_status"] = r.status_code
        res["revoke_call_ms"] = round((t_done - t_sent) * 1000, 1)
        res["latency_from_revoke_sent_ms"] = poller.outcome(t_sent)["latency_ms"]
        inproc.append(res)
        time.sleep(0.3)
    cross: list[dict[str, Any]] = []
    for i in range(trials):
        user = Practitioner(origin, data_dir, f"dr.revoke{i}", seeded.practitioner, app)
        token = user.login()
        poller = Poller(url, token, 20)
        poller.start()
        poller.ready.wait(10)
        # A random phase against the server's revocation poll (every REVOCATION_POLL_S while
        # tokens are checked): without it the CLI's fixed start-up time would pick the phase.
        time.sleep(random.uniform(0.0, 1.0))
        t_start = time.monotonic()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-u",
                "-m",
                "fhirvault.cli.main",
                "user",
                "disable",
                "--username",
                user.username,
                "--data-dir",
                str(data_dir),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        t_line = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if "session(s) ended" in line and t_line is None:
                t_line = time.monotonic()
        proc.wait()
        t_exit = time.monotonic()
        poller.join()
        res = poller.outcome(t_line if t_line is not None else t_exit)
        res["cli_exit"] = proc.returncode
        res["cli_seconds"] = round(t_exit - t_start, 2)
        res["latency_from_cli_exit_ms"] = poller.outcome(t_exit)["latency_ms"]
        res["latency_from_cli_start_ms"] = poller.outcome(t_start)["latency_ms"]
        res["sessions_line_seen"] = t_line is not None
        cross.append(res)
    return {"in_process_revoke": inproc, "cross_process_user_disable": cross}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def row(r: dict[str, Any]) -> str:
    o = r["overall"]
    cpu = r["server_cpu_ms_per_req"]
    return (
        f"{r['load']:<5} {r['round']:>2} {r['token']:<13}{o['count']:>8}{o['rps']:>9.1f}"
        f"{o['p50_ms']:>8.2f}{o['p95_ms']:>8.2f}{o['p99_ms']:>8.2f}{o['errors']:>7}"
        f"{cpu if cpu is not None else float('nan'):>9.3f}{r['loadavg_1m_before']:>7.2f}"
    )


def summarize(runs: list[dict[str, Any]], loads: list[str], rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for load in loads:
        per_round = []
        for rnd in range(1, rounds + 1):
            pair = {r["token"]: r for r in runs if r["load"] == load and r["round"] == rnd}
            if len(pair) < 2:
                continue
            a, b = pair["admin"], pair["practitioner"]
            cpu_a, cpu_b = a["server_cpu_ms_per_req"], b["server_cpu_ms_per_req"]
            per_round.append(
                {
                    "round": rnd,
                    "admin_rps": a["overall"]["rps"],
                    "practitioner_rps": b["overall"]["rps"],
                    "ratio_rps": round(b["overall"]["rps"] / a["overall"]["rps"], 3)
                    if a["overall"]["rps"]
                    else None,
                    "ratio_p50": round(b["overall"]["p50_ms"] / a["overall"]["p50_ms"], 3)
                    if a["overall"]["p50_ms"]
                    else None,
                    "ratio_p99": round(b["overall"]["p99_ms"] / a["overall"]["p99_ms"], 3)
                    if a["overall"]["p99_ms"]
                    else None,
                    "cpu_per_req_ratio": round(cpu_b / cpu_a, 3) if cpu_a and cpu_b else None,
                }
            )
        ratios = [p["ratio_rps"] for p in per_round if p["ratio_rps"] is not None]
        cpu_ratios = [p["cpu_per_req_ratio"] for p in per_round if p["cpu_per_req_ratio"]]
        out[load] = {
            "per_round": per_round,
            "median_ratio_rps": round(statistics.median(ratios), 3) if ratios else None,
            "median_cpu_per_req_ratio": round(statistics.median(cpu_ratios), 3)
            if cpu_ratios
            else None,
            "target": 0.8,
        }
    return out


def print_summary(runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    print(
        f"\n{'load':<5} {'rd':>2} {'token':<13}{'count':>8}{'req/s':>9}{'p50':>8}{'p95':>8}"
        f"{'p99':>8}{'errors':>7}{'srvCPU/req':>10}{'load1':>6}"
    )
    print(" " * 38 + "(ms)" + " " * 20 + "(ms)")
    for r in runs:
        print(row(r))
    for load, s in summary.items():
        print(f"\n{load}: practitioner / admin per round")
        for p in s["per_round"]:
            print(
                f"  round {p['round']}: req/s {p['practitioner_rps']:.1f} / {p['admin_rps']:.1f}"
                f" = {p['ratio_rps']}, p50 x{p['ratio_p50']}, p99 x{p['ratio_p99']},"
                f" server CPU per request x{p['cpu_per_req_ratio']}"
            )
        print(
            f"  median req/s ratio {s['median_ratio_rps']} (target >= 0.8), "
            f"median CPU/request ratio {s['median_cpu_per_req_ratio']}"
        )


def print_revocation(rev: dict[str, Any]) -> None:
    for kind, trials in rev.items():
        lat = [t["latency_ms"] for t in trials if t["latency_ms"] is not None]
        stale = [t["stale_200_after_revocation"] for t in trials]
        print(
            f"\n{kind}: first 401 (ms after the revocation was done; negative: before the"
            f" revoking call returned) per trial {lat}; 200s to requests sent after it {stale}"
        )
        if lat:
            print(f"  median {statistics.median(lat):.1f} ms, max {max(lat):.1f} ms")
        if kind == "in_process_revoke":
            print(
                f"  from the revoke request being sent: "
                f"{[t['latency_from_revoke_sent_ms'] for t in trials]}; revoke call ms "
                f"{[t['revoke_call_ms'] for t in trials]}"
            )
        if kind == "cross_process_user_disable":
            print(
                "  (from the CLI's 'sessions ended' line; from CLI exit: "
                f"{[t['latency_from_cli_exit_ms'] for t in trials]}; "
                f"CLI run s {[t['cli_seconds'] for t in trials]})"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Authorization cost benchmark (issue #4).")
    p.add_argument("--patients", type=int, default=2000)
    p.add_argument("--observations", type=int, default=3, help="per patient (default: 3)")
    p.add_argument("--loads", default="read,crud", help="comma list of read, crud")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument(
        "--read-mix",
        choices=("both", "related"),
        default="both",
        help="read load: resources of all seeded patients (both outcomes), or only of the "
        "practitioner's related patients (default: %(default)s)",
    )
    p.add_argument("--rounds", type=int, default=3, help="0: revocation trials only")
    p.add_argument("--revocation-trials", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seed-concurrency", type=int, default=16)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    p.add_argument("--json", metavar="FILE")
    p.add_argument(
        "--py-spy",
        metavar="DIR",
        help="profile the server with py-spy (raw stacks, 100 Hz) during each measured run;"
        " costs CPU: for diagnosis, not for the figures",
    )
    p.add_argument("--py-spy-bin", default=str(Path(sys.executable).with_name("py-spy")))
    args = p.parse_args(argv)
    args.loads = [x for x in args.loads.split(",") if x]
    if not set(args.loads) <= {"read", "crud"} or not args.loads:
        p.error("--loads: read and/or crud")
    if args.py_spy:
        Path(args.py_spy).mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fv-authz-"))
    data_dir = tmp / "data"
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    base = f"{origin}/fhir"
    log(f"starting fhirvault serve on {origin}, data {data_dir}")
    server = start_server(data_dir, port, tmp / "server.log")
    args.server_pid = server.pid
    runs: list[dict[str, Any]] = []
    report: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "server_pid"}}
    try:
        seeded = lg.run_async(_seed_async(base, admin_token(origin, data_dir), args))
        seeded_obj: Seeded = seeded["seeded"]
        report["seed"] = {k: v for k, v in seeded.items() if k != "seeded"}
        log(f"seed: {report['seed']}")
        app_out = cli(
            data_dir,
            "client",
            "create-app",
            "--name",
            "authz bench",
            "--scope",
            APP_SCOPE,
            "--redirect-uri",
            REDIRECT,
        )
        app = json.loads(app_out.stdout)
        main_user = Practitioner(origin, data_dir, "dr.bench", seeded_obj.practitioner, app)
        main_user.login()
        log(f"practitioner logged in (fhirUser {seeded_obj.practitioner})")
        for rnd in range(1, args.rounds + 1):
            for load in args.loads:
                order = TOKENS if rnd % 2 else TOKENS[::-1]
                for who in order:
                    token = admin_token(origin, data_dir) if who == "admin" else main_user.refresh()
                    r = lg.run_async(measure(load, who, token, base, seeded_obj, args, rnd))
                    runs.append(r)
                    log(row(r))
                    if r["errors"]["measured"] or r["errors"]["outside_window"]:
                        log(f"  errors: {r['errors']}")
        summary = summarize(runs, args.loads, args.rounds)
        report["runs"] = runs
        report["summary"] = summary
        if runs:
            print_summary(runs, summary)
        if args.revocation_trials:
            log("revocation trials")
            rev = revocation(origin, data_dir, seeded_obj, app, main_user, args.revocation_trials)
            report["revocation"] = rev
            print_revocation(rev)
    finally:
        stop_server(server)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    errors = sum(r["errors"]["measured"] + r["errors"]["outside_window"] for r in runs)
    return 1 if errors else 0


async def _seed_async(base: str, token: str, args: argparse.Namespace) -> dict[str, Any]:
    s = await seed(base, token, args.patients, args.observations, args.seed, args.seed_concurrency)
    return {
        "seeded": s,
        "patients": len(s.patients),
        "observations": len(s.observations),
        "care_teams": s.care_teams,
        "related_patients": sum(r for _p, _t, r in s.patients),
        "seconds": round(s.seconds, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
