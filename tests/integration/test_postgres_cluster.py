"""Two server processes on one PostgreSQL database (always PostgreSQL, whatever TEST_DB_ENGINE says)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from fhirvault.adapters.postgres_store import lock_key
from tests import pg_server
from tests.conftest import PATIENT, Server, start_server

pytestmark = pytest.mark.server  # starts real server processes

FHIR_JSON = {"Content-Type": "application/fhir+json"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Server, Server, str]]:
    url = pg_server.server().create_database()
    env = {"FHIRVAULT_DATABASE_URL": url, "FHIRVAULT_AUDIT_CHECKPOINT_SECONDS": "1"}
    first = start_server(tmp_path / "data", tmp_path / "a.log", env=env)
    try:
        second = start_server(tmp_path / "data", tmp_path / "b.log", env=env)  # same keys, same database
        try:
            yield first, second, url
        finally:
            second.stop()
    finally:
        first.stop()


def test_conditional_creates_across_processes_create_one_resource(cluster: tuple[Server, Server, str]) -> None:
    first, second, _ = cluster
    token = first.token()

    async def race(n: int) -> list[int]:
        ident = {"system": "urn:example:mrn", "value": f"RACE-{n}"}
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {token}"}) as c:
            rs = await asyncio.gather(*(c.post(f"{srv.fhir}/Patient", json=dict(PATIENT, identifier=[ident]),
                                               headers={**FHIR_JSON, "If-None-Exist": f"identifier=RACE-{n}"})
                                        for srv in (first, second) * 3))
            return sorted(r.status_code for r in rs)

    for n in range(5):
        assert asyncio.run(race(n)) == [200] * 5 + [201], n
        with second.client(token) as c:
            assert c.get("/Patient", params={"identifier": f"RACE-{n}"}).json()["total"] == 1


def test_one_checkpointer_for_the_cluster_and_every_write_audited_in_order(
        cluster: tuple[Server, Server, str]) -> None:
    first, second, url = cluster
    token = first.token()
    for srv in (first, second):
        with srv.client(token) as c:
            for _ in range(5):
                assert c.post("/Patient", json=PATIENT, headers=FHIR_JSON).status_code == 201
    with psycopg.connect(url) as conn:
        seqs = [r[0] for r in conn.execute("SELECT seq FROM audit.audit_log ORDER BY seq").fetchall()]
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 10
        key = lock_key("leader:audit-checkpoints")  # other roles (config-audit, clock-check…) hold their own
        leaders = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                               " AND classid::bigint = %s AND objid::bigint = %s",
                               ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)).fetchone()
        assert leaders == (1,)  # both processes run the checkpointer thread; one holds the role
