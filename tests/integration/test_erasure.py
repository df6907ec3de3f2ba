"""GDPR lifecycle over HTTP ($erase, $restrict, $unrestrict, $legal-hold), on the engine under test."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from fhirvault.backup import erasure_ledger
from fhirvault.domain.errors import OperationOutcomeError
from fhirvault.domain.scopes import Grants, parse_scopes
from fhirvault.ports import AuditQuery
from fhirvault.services.auth import Principal
from fhirvault.services.keys import patient_compartment
from fhirvault.services.repository import RequestContext
from tests.conftest import PATIENT, App, get_token, observation

FHIR_JSON = {"Content-Type": "application/fhir+json"}
DPO_SCOPE = "system/*.rs fhirvault/lifecycle.write"


def _params(**values: Any) -> dict[str, Any]:
    out = []
    for name, value in values.items():
        key = "valueBoolean" if isinstance(value, bool) else "valueString"
        out.append({"name": name, key: value})
    return {"resourceType": "Parameters", "parameter": out}


def _dpo(app: App) -> dict[str, str]:
    client = app.container.auth.register_client("dpo", DPO_SCOPE)
    token = get_token(app.client, {"client_id": client.client_id, "client_secret": str(client.client_secret)})
    return {"Authorization": f"Bearer {token}", **FHIR_JSON}


def _seed(app: App) -> tuple[str, list[str]]:
    h = {**app.auth, **FHIR_JSON}
    pid = app.client.post("/fhir/Patient", json=PATIENT, headers=h).json()["id"]
    obs = [app.client.post("/fhir/Observation", json=observation(pid), headers=h).json()["id"] for _ in range(2)]
    updated = dict(observation(pid), id=obs[0], status="amended")
    assert app.client.put(f"/fhir/Observation/{obs[0]}", json=updated, headers=h).status_code == 200
    return pid, obs


def _orphan_tags(app: App) -> int:
    """Search tags whose resource row is gone (the blind index must not keep an erased patient's tags)."""
    sql = "SELECT count(*) FROM search_tags s WHERE NOT EXISTS (SELECT 1 FROM resources_current c WHERE c.rk = s.rk)"
    if app.settings.database_url is not None:
        import psycopg

        with psycopg.connect(app.settings.database_url) as conn:
            row = conn.execute(sql).fetchone()
    else:
        import sqlite3

        with contextlib.closing(sqlite3.connect(app.settings.database_path)) as conn:
            row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def _system(c: Any) -> RequestContext:
    p = Principal("t", c.settings.tenant, "system/*.cruds", Grants(tuple(parse_scopes("system/*.cruds"))), 2**40, "t")
    return RequestContext(p, "t")


def _op(app: App, pid: str, name: str, headers: dict[str, str], **values: Any) -> Any:
    return app.client.post(f"/fhir/Patient/{pid}/${name}", json=_params(**values), headers=headers)


def _audit_details(app: App, interaction: str) -> list[dict[str, Any]]:
    rows = app.container.store.audit_find(AuditQuery(app.settings.tenant, descending=True, limit=200))
    docs = [app.container.audit.decrypt(r.seq, r.ts_ms, r.blob) for r in rows]
    return [d for d in docs if d.get("interaction") == interaction]


def test_erasure_is_refused_under_retention_then_shreds_every_version(app: App) -> None:
    pid, obs = _seed(app)
    dpo = _dpo(app)
    key_id = app.container.keys.existing(patient_compartment(pid))
    assert key_id is not None
    refused = _op(app, pid, "erase", dpo, reason="patient request under GDPR art. 17")
    assert refused.status_code == 409, refused.text
    issue = refused.json()["issue"][0]
    assert issue["code"] == "business-rule"
    assert "fr-csp-r1112-7" in issue["diagnostics"] and " until 20" in issue["diagnostics"]
    assert app.client.get(f"/fhir/Patient/{pid}", headers=app.auth).status_code == 200  # nothing erased

    time.sleep(1.5)  # SQLite: let the deferred index write the tags to search_tags first
    done = _op(app, pid, "erase", dpo, reason="unlawful processing, DPO decision 2026-12", overrideRetention=True)
    assert done.status_code == 200, done.text
    out = {p["name"]: next(v for k, v in p.items() if k.startswith("value")) for p in done.json()["parameter"]}
    assert out["erased"] is True and out["resources"] == 3 and out["versions"] == 4

    for path in (f"Patient/{pid}", f"Observation/{obs[0]}", f"Observation/{obs[1]}",
                 f"Observation/{obs[0]}/_history/1"):
        assert app.client.get(f"/fhir/{path}", headers=app.auth).status_code == 404, path
    found = app.client.get(f"/fhir/Observation?subject=Patient/{pid}", headers=app.auth).json()
    assert found.get("total", 0) == 0 and not found.get("entry")
    by_name = app.client.get("/fhir/Patient?family=Martin", headers=app.auth).json()
    assert not by_name.get("entry")
    assert _orphan_tags(app) == 0
    assert app.container.store.data_key(app.settings.tenant, key_id) is None
    assert app.container.store.key_usage(app.settings.tenant, key_id) == []
    listed = erasure_ledger.read_file(app.settings.data_dir)
    assert {(e.kind, e.key_id) for e in listed} == {("patient", key_id)}
    trail = _audit_details(app, "gdpr-erase")
    assert [d["status"] for d in trail[:2]] == [200, 409]
    assert trail[0]["patient"] == f"Patient/{pid}" and "Martin" not in str(trail)
    # A second erasure finds nothing left; a new record for the same id gets a new key.
    again = _op(app, pid, "erase", dpo, reason="patient request under GDPR art. 17")
    assert again.status_code == 200 and again.json()["parameter"][1]["valueBoolean"] is False


def test_lifecycle_operations_need_the_lifecycle_scope(app: App) -> None:
    pid, _ = _seed(app)
    denied = _op(app, pid, "erase", {**app.auth, **FHIR_JSON}, reason="an admin without the scope",
                 overrideRetention=True)
    assert denied.status_code == 403 and "fhirvault/lifecycle.write" in denied.text
    assert _op(app, pid, "restrict", {**app.auth, **FHIR_JSON}, reason="an admin without the scope").status_code == 403
    assert app.client.get(f"/fhir/Patient/{pid}", headers=app.auth).status_code == 200
    assert [d["status"] for d in _audit_details(app, "gdpr-erase")] == [403]
    dpo = _dpo(app)
    short = _op(app, pid, "restrict", dpo, reason="short")
    assert short.status_code == 400 and "reason" in short.text
    assert app.client.get(f"/fhir/Patient/{pid}/$erase", headers=dpo).status_code == 405


def test_legal_hold_blocks_erasure_until_released(app: App) -> None:
    pid, _ = _seed(app)
    dpo = _dpo(app)
    held = _op(app, pid, "legal-hold", dpo, reason="litigation 2026/123 at the tribunal", active=True)
    assert held.status_code == 200 and held.json()["parameter"][2]["valueBoolean"] is True
    refused = _op(app, pid, "erase", dpo, reason="patient request under GDPR art. 17", overrideRetention=True)
    assert refused.status_code == 409
    assert "'legal-hold' until released" in refused.json()["issue"][0]["diagnostics"]
    assert app.client.get(f"/fhir/Patient/{pid}", headers=app.auth).status_code == 200
    assert _op(app, pid, "legal-hold", dpo, reason="litigation 2026/123 closed", active=False).status_code == 200
    assert _op(app, pid, "erase", dpo, reason="patient request under GDPR art. 17",
               overrideRetention=True).status_code == 200


def test_restriction_hides_the_record_from_ordinary_clients(app: App) -> None:
    pid, obs = _seed(app)
    other = app.client.post("/fhir/Patient", json=dict(PATIENT, name=[{"family": "Durand"}]),
                            headers={**app.auth, **FHIR_JSON}).json()["id"]
    dpo = _dpo(app)
    assert _op(app, pid, "restrict", dpo, reason="accuracy contested by the patient").status_code == 200
    read = app.client.get(f"/fhir/Patient/{pid}", headers=app.auth)
    assert read.status_code == 403 and "restricted (GDPR art. 18)" in read.json()["issue"][0]["diagnostics"]
    assert app.client.get(f"/fhir/Observation/{obs[1]}", headers=app.auth).status_code == 403
    etag = {"If-None-Match": 'W/"1"', **app.auth}  # a 304 would confirm the version
    assert app.client.get(f"/fhir/Observation/{obs[1]}", headers=etag).status_code == 403
    assert app.client.get(f"/fhir/Patient/{pid}/$everything", headers=app.auth).status_code == 403
    page = app.client.get("/fhir/Patient", headers=app.auth).json()
    found = [e["resource"] for e in page.get("entry", [])]
    assert [r["id"] for r in found if r["resourceType"] == "Patient"] == [other]
    assert any(r["resourceType"] == "OperationOutcome" and "GDPR art. 18" in str(r) for r in found)
    history = app.client.get("/fhir/Observation/_history", headers=app.auth).json()
    assert not history.get("entry")
    assert app.client.get(f"/fhir/Patient/{pid}", headers=dpo).status_code == 200  # the DPO's tool still reads it
    assert app.client.get(f"/fhir/Patient/{pid}", headers=app.auth).status_code == 403
    assert _op(app, pid, "unrestrict", dpo, reason="accuracy checked and confirmed").status_code == 200
    assert app.client.get(f"/fhir/Patient/{pid}", headers=app.auth).status_code == 200
    assert len([e for e in app.client.get("/fhir/Patient", headers=app.auth).json()["entry"]
                if e["resource"]["resourceType"] == "Patient"]) == 2


@pytest.mark.parametrize("name", ["erase", "restrict", "unrestrict", "legal-hold"])
def test_capability_statement_lists_the_operations(app: App, name: str) -> None:
    cap = app.client.get("/fhir/metadata").json()
    patient = next(r for r in cap["rest"][0]["resource"] if r["type"] == "Patient")
    assert name in {o["name"] for o in patient["operation"]}


def test_another_process_drops_the_erased_key_and_never_writes_with_it(app: App) -> None:
    """Two processes share the database (serve --workers N): the other one's cached key must go, or its next
    write for the patient would be sealed under a key that no longer exists (unreadable at once)."""
    from fhirvault.container import build

    pid, _ = _seed(app)
    other = build(app.settings)
    try:
        compartment = patient_compartment(pid)
        assert other.coherence is not None
        other.coherence.sync()  # its first sync drops everything; from here on only what changed
        old = other.keys.for_compartment_sync(compartment)  # cached there
        dpo = _dpo(app)
        assert _op(app, pid, "erase", dpo, reason="patient request under GDPR art. 17",
                   overrideRetention=True).status_code == 200
        other.coherence.sync()  # what each request of that process does first
        assert other.keys.cached_for(compartment) is None
        fresh = other.keys.for_compartment_sync(compartment)
        assert fresh.key_id != old.key_id
        assert other.store.data_key(app.settings.tenant, fresh.key_id) is not None
        assert other.store.key_versions(app.settings.tenant, old.key_id) == []
    finally:
        other.close()


def test_a_restriction_set_by_another_process_applies_from_the_next_request(app: App) -> None:
    """The CLI (or another worker) restricts a patient this process has just read: its next request
    refuses the record, and serves it again as soon as the restriction is lifted (each process keeps a
    copy of the restricted patients; the coherence feed must drop it)."""
    import asyncio

    from fhirvault.container import build
    from fhirvault.services.audit import AuditRecord
    from fhirvault.services.erasure import RESTRICTED

    pid, _ = _seed(app)
    assert app.client.get(f"/fhir/Patient/{pid}", headers=app.auth).status_code == 200  # copy taken here
    other = build(app.settings)
    try:
        lifecycle = other.repository.lifecycle
        assert lifecycle is not None

        def flag(on: bool) -> None:
            record = AuditRecord(other.clock.now_ms(), "gdpr-restrict", "0", 200, "cli", entity=f"Patient/{pid}",
                                 patient=f"Patient/{pid}", user="dpo", detail="test", category="system")
            asyncio.run(lifecycle.set_flag(pid, RESTRICTED, on, "accuracy contested", "dpo", record))

        flag(True)
        assert app.client.get(f"/fhir/Patient/{pid}", headers=app.auth).status_code == 403
        flag(False)
        assert app.client.get(f"/fhir/Patient/{pid}", headers=app.auth).status_code == 200
    finally:
        other.close()


def test_operations_take_and_answer_xml(app: App) -> None:
    pid, _ = _seed(app)
    headers = {**_dpo(app), "Content-Type": "application/fhir+xml", "Accept": "application/fhir+xml"}
    body = ('<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="reason"/>'
            '<valueString value="accuracy contested by the patient"/></parameter></Parameters>')
    r = app.client.post(f"/fhir/Patient/{pid}/$restrict", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+xml")
    assert '<name value="restricted"/><valueBoolean value="true"/>' in r.text
    refused = app.client.post(f"/fhir/Patient/{pid}/$erase", content=body, headers=headers)
    assert refused.status_code == 409 and "<OperationOutcome" in refused.text and "fr-csp-r1112-7" in refused.text


def test_a_write_prepared_with_the_erased_key_is_refused(app: App) -> None:
    """A request of another process that synced just before the erasure committed still holds the old key:
    its write is refused (409, the client retries) instead of sealing a version under a destroyed key."""
    from fhirvault.container import build

    pid, _ = _seed(app)
    other = build(app.settings)
    try:
        compartment = patient_compartment(pid)
        old = other.keys.for_compartment_sync(compartment)
        stale = asyncio.run(other.repository.prepare_create(_system(other), "Observation", observation(pid)))
        assert _op(app, pid, "erase", _dpo(app), reason="patient request under GDPR art. 17",
                   overrideRetention=True).status_code == 200
        with pytest.raises(OperationOutcomeError) as conflict:
            other.store.write_sync("t", stale)
        assert conflict.value.status == 409
        assert other.store.key_versions(app.settings.tenant, old.key_id) == []
        assert other.keys.cached_for(compartment) is None  # the retry makes a new key
    finally:
        other.close()
