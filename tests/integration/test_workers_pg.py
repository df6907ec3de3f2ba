"""One server with two worker processes (``--workers 2``), on a real PostgreSQL and on SQLite.

Each check sends many requests, each on its own connection and several at once, so both
workers serve some of them; a change made through one worker (or by another process, like
the CLI) must apply to every request that starts after it was acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from fhirvault.config import load_settings
from fhirvault.container import Container, build
from tests import pg_server
from tests.conftest import PATIENT, Server, start_server
from tests.integration.authz_support import FHIR_JSON, care_team, mint, patient
from tests.integration.identity_helpers import exchange, login, make_app, make_user

pytestmark = pytest.mark.server  # starts real server processes

N = 40  # requests per check: with two workers, both serve some of them


@dataclass
class Cluster:
    server: Server
    container: Container  # this test process's view of the same data directory and database
    url: str
    admin: str  # an admin client-credentials token
    engine: str

    def cli_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
        if self.url:
            env["FHIRVAULT_DATABASE_URL"] = self.url
        return env


# SQLite: the workers share the file (and this test process writes it too, like the CLI would).
@pytest.fixture(scope="module", params=[pytest.param("sqlite", marks=pytest.mark.sqlite_only), "postgresql"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("workers")
    url = pg_server.server().create_database() if request.param == "postgresql" else ""
    env = {"FHIRVAULT_DATABASE_URL": url} if url else {}
    srv = start_server(base / "data", base / "server.log", "--workers", "2", env=env)
    try:
        engine = {"database_url": url} if url else {}
        container = build(load_settings({"data_dir": base / "data", **engine}, environ={}))
        try:
            yield Cluster(srv, container, url, srv.token(), request.param)
        finally:
            container.close()
    finally:
        srv.stop()


def statuses(srv: Server, token: str, path: str, n: int = N) -> list[int]:
    """``n`` GETs, 8 at a time, each on a new connection (so the kernel spreads them over the workers)."""

    async def run() -> list[int]:
        limits = httpx.Limits(max_keepalive_connections=0, max_connections=8)
        async with httpx.AsyncClient(base_url=srv.fhir, timeout=30, limits=limits,
                                     headers={"Authorization": f"Bearer {token}"}) as c:
            return [r.status_code for r in await asyncio.gather(*(c.get(path) for _ in range(n)))]

    return asyncio.run(run())


async def totals(srv: Server, token: str, identifier: str, n: int = 16) -> list[int]:
    """``total`` of ``n`` identifier searches, each on a new connection."""
    limits = httpx.Limits(max_keepalive_connections=0, max_connections=8)
    async with httpx.AsyncClient(base_url=srv.fhir, timeout=30, limits=limits,
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        rs = await asyncio.gather(*(c.get("/Patient", params={"identifier": identifier, "_total": "accurate"})
                                    for _ in range(n)))
        return [r.json()["total"] for r in rs]


def test_the_server_runs_two_worker_processes(cluster: Cluster) -> None:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(cluster.server.proc.pid)], capture_output=True,
                         text=True, check=True).stdout.split()
    assert len(out) == 2, out
    if cluster.engine == "sqlite":  # still one server per data directory (the supervisor holds the lock)
        proc = subprocess.run([sys.executable, "-m", "fhirvault.cli.main", "serve", "--data-dir",
                               str(cluster.server.data_dir), "--port", "0", "--workers", "2"], capture_output=True,
                              text=True, env=cluster.cli_env(), timeout=60, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "is already serving" in proc.stderr


def test_a_revoked_token_is_refused_by_every_worker_at_once(cluster: Cluster) -> None:
    srv = cluster.server
    token = srv.token()
    assert statuses(srv, token, "/metadata") == [200] * N  # public: warms nothing, checks the server
    assert set(statuses(srv, token, "/Patient?_count=1")) == {200}  # both workers have the token cached
    # Requests keep coming while the revocation is made, so neither worker is idle when it commits.
    done = threading.Event()

    def keep_busy() -> None:
        while not done.is_set():
            statuses(srv, token, "/Patient?_count=1", n=8)

    busy = threading.Thread(target=keep_busy)
    busy.start()
    try:
        with httpx.Client(base_url=srv.base_url) as c:
            r = c.post("/oauth2/revoke", data={"token": token},
                       auth=(srv.creds["client_id"], srv.creds["client_secret"]))
            assert r.status_code == 200, r.text
    finally:
        done.set()
    assert statuses(srv, token, "/Patient?_count=1") == [401] * N
    busy.join()


def test_a_token_revoked_by_another_process_is_refused_by_every_worker_at_once(cluster: Cluster) -> None:
    """No client authentication to wait for here: the revocation commits while both workers are busy."""
    srv, c = cluster.server, cluster.container
    token = srv.token()
    claims = c.auth.own_token_claims(token)
    assert claims is not None
    done = threading.Event()

    def keep_busy() -> None:
        while not done.is_set():
            statuses(srv, token, "/Patient?_count=1", n=8)

    busy = threading.Thread(target=keep_busy)
    busy.start()
    try:
        statuses(srv, token, "/Patient?_count=1", n=16)
        c.store.write_sync("oauth.revoke", lambda tx: tx.revoke_jti(claims["jti"], claims["exp"] * 1000,
                                                                    c.clock.now_ms()))
    finally:
        done.set()
    assert statuses(srv, token, "/Patient?_count=1") == [401] * N
    busy.join()


def test_a_disabled_user_is_refused_by_every_worker_at_once(cluster: Cluster) -> None:
    srv, c = cluster.server, cluster.container
    person = make_user(c, "dr-disabled", "practitioner", fhir_user="Practitioner/dr-disabled")
    app_id, _ = make_app(c)
    with httpx.Client(base_url=srv.base_url, timeout=30) as http:
        code, verifier, _ = login(http, app_id, person, scope="openid fhirUser user/*.cruds")
        r = exchange(http, app_id, code, verifier)
        assert r.status_code == 200, r.text
        token = r.json()["access_token"]
    assert set(statuses(srv, token, "/Practitioner?_count=1")) == {200}
    # As `fhirvault user disable` does, from another process: the workers learn it from the database.
    from tests.integration.identity_helpers import users_of

    assert users_of(c).set_disabled("dr-disabled", True) == 1
    assert statuses(srv, token, "/Practitioner?_count=1") == [401] * N


def test_care_team_changes_apply_on_every_worker_at_the_next_request(cluster: Cluster) -> None:
    srv, c = cluster.server, cluster.container
    admin = {"Authorization": f"Bearer {cluster.admin}", **FHIR_JSON}
    doctor = mint(c, role="practitioner", user="u-ct", fhir_user="Practitioner/ct-doc")
    with httpx.Client(base_url=srv.fhir, timeout=30, headers=admin) as http:
        assert http.put("/Patient/ct-p", json=patient("ct-p")).status_code == 201
    path = "/Patient/ct-p"
    # Both workers compute and cache "no relationship" for this practitioner (refused reads answer 404).
    assert statuses(srv, doctor, path) == [404] * N
    with httpx.Client(base_url=srv.fhir, timeout=30, headers=admin) as http:
        r = http.put("/CareTeam/ct-1", json=care_team("ct-p", "ct-1", "Practitioner/ct-doc"))
        assert r.status_code == 201, r.text
    assert statuses(srv, doctor, path) == [200] * N
    with httpx.Client(base_url=srv.fhir, timeout=30, headers=admin) as http:
        assert http.delete("/CareTeam/ct-1").status_code == 204
    assert statuses(srv, doctor, path) == [404] * N


def test_every_worker_sees_every_acknowledged_write(cluster: Cluster) -> None:
    srv = cluster.server
    token = cluster.admin
    for n in range(5):
        ident = {"system": "urn:example:seen", "value": f"SEEN-{n}"}
        with srv.client(token) as http:
            assert http.post("/Patient", json=dict(PATIENT, identifier=[ident]), headers=FHIR_JSON).status_code == 201

        async def totals(value: str) -> list[int]:
            limits = httpx.Limits(max_keepalive_connections=0, max_connections=8)
            async with httpx.AsyncClient(base_url=srv.fhir, timeout=30, limits=limits,
                                         headers={"Authorization": f"Bearer {token}"}) as c:
                rs = await asyncio.gather(*(c.get("/Patient", params={"identifier": value}) for _ in range(16)))
                return [r.json()["total"] for r in rs]

        assert asyncio.run(totals(f"SEEN-{n}")) == [1] * 16


def test_concurrent_conditional_creates_and_updates_create_one_resource_then_the_audit_log_verifies(cluster: Cluster) -> None:
    srv = cluster.server
    token = cluster.admin

    async def race(n: int) -> list[int]:
        ident = {"system": "urn:example:mrn", "value": f"W-RACE-{n}"}
        limits = httpx.Limits(max_keepalive_connections=0, max_connections=8)
        async with httpx.AsyncClient(timeout=60, limits=limits, headers={"Authorization": f"Bearer {token}"}) as c:
            rs = await asyncio.gather(*(c.post(f"{srv.fhir}/Patient", json=dict(PATIENT, identifier=[ident]),
                                               headers={**FHIR_JSON, "If-None-Exist": f"identifier=W-RACE-{n}"})
                                        for _ in range(8)))
            return sorted(r.status_code for r in rs)

    async def race_updates(n: int) -> list[int]:
        ident = {"system": "urn:example:mrn", "value": f"W-PUT-{n}"}
        limits = httpx.Limits(max_keepalive_connections=0, max_connections=8)
        async with httpx.AsyncClient(timeout=60, limits=limits, headers={"Authorization": f"Bearer {token}"}) as c:
            rs = await asyncio.gather(*(c.put(f"{srv.fhir}/Patient", params={"identifier": f"W-PUT-{n}"},
                                              json=dict(PATIENT, identifier=[ident]), headers=FHIR_JSON)
                                        for _ in range(8)))
            return sorted(r.status_code for r in rs)

    for n in range(5):
        assert asyncio.run(race(n)) == [200] * 7 + [201], n
        assert asyncio.run(race_updates(n)) == [200] * 7 + [201], n  # conditional update: one create
    # Concurrent load through both workers, then the whole trail verifies (gap-free, in commit order).
    assert set(statuses(srv, token, "/Patient?_count=5", n=80)) == {200}
    proc = subprocess.run([sys.executable, "-m", "fhirvault.cli.main", "audit", "verify", "--json",
                           "--data-dir", str(srv.data_dir)], capture_output=True, text=True, env=cluster.cli_env(),
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["entries"] > 100, report


def test_two_processes_writing_at_once_keep_every_write_and_a_gap_free_audit_trail(cluster: Cluster) -> None:
    """The workers and this process (as the CLI would) write the same database at the same time."""
    srv, c = cluster.server, cluster.container
    token = cluster.admin
    before = c.store.audit_size()
    done = threading.Event()
    written: list[str] = []

    def write_here() -> None:  # a second writer process's worth of writes, in this process
        n = 0
        while not done.is_set():
            n += 1
            c.store.write_sync("test.meta", lambda tx, n=n: tx.set_meta(f"test-{n % 7}", str(n).encode()))
            written.append(str(n))

    here = threading.Thread(target=write_here)
    here.start()

    async def create(n: int) -> list[int]:
        limits = httpx.Limits(max_keepalive_connections=0, max_connections=8)
        async with httpx.AsyncClient(base_url=srv.fhir, timeout=60, limits=limits,
                                     headers={"Authorization": f"Bearer {token}", **FHIR_JSON}) as http:
            rs = await asyncio.gather(*(http.post("/Patient", json=dict(PATIENT, identifier=[
                {"system": "urn:example:two", "value": f"TWO-{n}-{i}"}])) for i in range(n)))
            return [r.status_code for r in rs]

    try:
        assert asyncio.run(create(60)) == [201] * 60
    finally:
        done.set()
        here.join()
    assert written
    # Every create is found, by whichever worker answers, at once (the last ones before any index flush).
    assert asyncio.run(totals(srv, token, ",".join(f"TWO-60-{i}" for i in range(60)))) == [60] * 16
    rows = c.store.audit_rows(after_seq=before, limit=100_000)
    assert [r.seq for r in rows] == list(range(before + 1, before + 1 + len(rows)))  # no gap, no duplicate
    assert len(rows) >= 60
