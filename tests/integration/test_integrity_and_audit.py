"""Stored data is bound to its place; every interaction, allowed or refused, leaves an audit record."""

from __future__ import annotations

import sqlite3

import pytest

from tests.conftest import PATIENT, App, get_token, observation

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _create(app: App, resource: dict[str, object]) -> str:
    r = app.client.post(f"/fhir/{resource['resourceType']}", json=resource, headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.mark.sqlite_only  # edits the SQLite file
def test_swapped_or_flipped_blobs_are_never_served(app: App) -> None:
    a = _create(app, PATIENT)
    b = _create(app, dict(PATIENT, gender="male"))
    db = sqlite3.connect(app.settings.database_path)
    blob_a = db.execute("SELECT blob FROM resource_versions WHERE id=?", (a,)).fetchone()[0]
    blob_b = db.execute("SELECT blob FROM resource_versions WHERE id=?", (b,)).fetchone()[0]
    # a DBA swaps two patients' ciphertexts, then corrupts one byte of another row
    db.execute("UPDATE resource_versions SET blob=? WHERE id=?", (blob_b, a))
    db.commit()
    c = _create(app, PATIENT)
    flipped = bytearray(db.execute("SELECT blob FROM resource_versions WHERE id=?", (c,)).fetchone()[0])
    flipped[20] ^= 1
    db.execute("UPDATE resource_versions SET blob=? WHERE id=?", (bytes(flipped), c))
    db.commit()
    db.close()
    for rid in (a, c):
        r = app.client.get(f"/fhir/Patient/{rid}", headers=app.auth)
        assert r.status_code == 500
        assert r.json()["resourceType"] == "OperationOutcome" and "Martin" not in r.text
    assert app.client.get(f"/fhir/Patient/{b}", headers=app.auth).json()["gender"] == "male"
    assert blob_a != blob_b


def test_audit_records_who_what_which_patient(app: App) -> None:
    pid = _create(app, PATIENT)
    oid = _create(app, observation(pid))
    app.client.get(f"/fhir/Observation/{oid}", headers=app.auth)
    app.client.delete(f"/fhir/Observation/{oid}", headers=app.auth)
    reader = app.container.auth.register_client("reader", "system/Patient.r")
    token = get_token(app.client, {"client_id": reader.client_id, "client_secret": str(reader.client_secret)})
    assert app.client.get(f"/fhir/Observation/{oid}", headers={"Authorization": f"Bearer {token}"}).status_code == 403
    assert app.client.get(f"/fhir/Patient/{pid}", headers={"Authorization": "Bearer forged"}).status_code == 401

    store, audit = app.container.store, app.container.audit
    records = [audit.decrypt(seq, ts, blob) for seq, ts, blob in store.audit_entries("default", limit=10_000)]
    by = {(r["interaction"], r.get("entity", ""), r["status"]): r for r in records}
    created = by[("create", f"Observation/{oid}/_history/1", 201)]
    assert created["patient"] == f"Patient/{pid}" and created["action"] == "C" and created["outcome"] == "0"
    assert created["client_id"] == app.creds["client_id"]
    read = by[("read", f"Observation/{oid}/_history/1", 200)]
    assert read["patient"] == f"Patient/{pid}" and read["request_id"]
    assert by[("delete", f"Observation/{oid}/_history/2", 204)]["action"] == "D"
    refused = by[("read", f"Observation/{oid}", 403)]
    assert refused["client_id"] == reader.client_id and refused["outcome"] == "4" and "scope" in refused["detail"]
    assert any(r["interaction"] == "authenticate" and r["status"] == 401 for r in records)
    assert any(r["interaction"] == "token" and r["status"] == 200 for r in records)
    # the table itself holds ciphertext only
    raw = b"".join(blob for _, _, blob in store.audit_entries("default", limit=10_000))
    assert pid.encode() not in raw and oid.encode() not in raw
