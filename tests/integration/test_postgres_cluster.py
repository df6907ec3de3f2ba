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


def test_conditional_delete_racing_an_update_in_another_process_deletes_only_a_match(
        cluster: tuple[Server, Server, str]) -> None:
    """The delete must apply to the version its search matched: an update from another process that moves the
    resource out of the criteria first leaves it alive (today's fixed bug: it deleted the updated resource)."""
    first, second, _ = cluster
    token = first.token()
    wrong: list[int] = []

    async def race(n: int) -> None:
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {token}"}) as c:
            body = dict(PATIENT, identifier=[{"system": "urn:example:mrn", "value": f"DEL-{n}"}])
            rid = (await c.post(f"{first.fhir}/Patient", json=body, headers=FHIR_JSON)).json()["id"]
            moved = dict(body, id=rid, identifier=[{"system": "urn:example:mrn", "value": f"MOVED-{n}"}])
            deleted, updated = await asyncio.gather(
                c.delete(f"{first.fhir}/Patient", params={"identifier": f"DEL-{n}"}),
                c.put(f"{second.fhir}/Patient/{rid}", json=moved, headers=FHIR_JSON))
            assert deleted.status_code == 204 and updated.status_code in (200, 201), (deleted.text, updated.text)
            history = (await c.get(f"{first.fhir}/Patient/{rid}/_history")).json()["entry"]  # newest first
            methods = [e["request"]["method"] for e in history]
            if methods[0] == "DELETE":
                before = next(e["resource"] for e in history[1:] if "resource" in e)
                if before["identifier"][0]["value"] != f"DEL-{n}":
                    wrong.append(n)  # deleted a version the criteria did not match

    for n in range(40):
        asyncio.run(race(n))
    assert wrong == []
