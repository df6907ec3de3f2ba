"""Planted marker: no byte of patient data reaches the disk or the logs in clear."""

from __future__ import annotations

import secrets
from pathlib import Path

from tests import pg_server
from tests.conftest import PATIENT, Server, observation

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _all_bytes(paths: list[Path]) -> list[tuple[Path, bytes]]:
    out = []
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        out += [(p, p.read_bytes()) for p in files]
    return out


def _database_files(server: Server) -> list[Path]:
    """On PostgreSQL (TEST_DB_ENGINE=postgresql), the server's database files, the WAL and the log."""
    return pg_server.server().files_of(server.data_dir) if pg_server.engine() == "postgresql" else []


def _wal_files(server: Server) -> list[Path]:
    if pg_server.engine() == "postgresql":
        return [p for p in _database_files(server)[1].iterdir() if p.is_file()]
    return list(server.data_dir.glob("*-wal"))


def test_marker_absent_from_data_dir_wal_and_logs(server: Server) -> None:
    marker = "Zq" + secrets.token_hex(6)
    with server.client() as c:
        patient = dict(PATIENT, name=[{"family": marker, "given": [marker + "given"]}])
        pid = c.post("/Patient", json=patient, headers=FHIR_JSON).json()["id"]
        obs = observation(pid)
        obs["note"] = [{"text": f"note {marker}"}]
        oid = c.post("/Observation", json=obs, headers=FHIR_JSON).json()["id"]
        assert marker in c.get(f"/Patient/{pid}").text
        c.get(f"/Observation/{oid}")
        c.get("/Patient/_history")
        bad = dict(patient, birthDate=marker)
        assert c.post("/Patient", json=bad, headers=FHIR_JSON).status_code == 422
        c.delete(f"/Patient/{pid}")
    # the WAL holds the recent writes; look before and after shutdown (checkpoint)
    wal_files = _wal_files(server)
    assert wal_files and any(p.stat().st_size > 0 for p in wal_files)
    for phase in ("running", "stopped"):
        if phase == "stopped":
            server.stop()
        for path, data in _all_bytes([server.data_dir, server.log_path, *_database_files(server)]):
            for needle in (marker, marker.upper(), marker.lower()):
                assert needle.encode() not in data, f"{needle} found in {path} ({phase})"
                assert needle.encode("utf-16-le") not in data, f"{needle} (utf-16) found in {path} ({phase})"


def test_indexed_values_are_not_in_the_database(server: Server) -> None:
    """Every searchable value (names, codes, identifiers, dates, references) stays out of the files."""
    family, given, ident = "Qvxbrandt", "Ulvhilde", "279082918829116"  # a valid NIR (checked on write)
    with server.client() as c:
        patient = dict(PATIENT, name=[{"family": family, "given": [given]}], birthDate="1937-03-29",
                       identifier=[{"system": "urn:oid:1.2.250.1.213.1.4.8", "value": ident}],
                       address=[{"city": "Quimperlé", "postalCode": "29300"}])
        pid = c.post("/Patient", json=patient, headers=FHIR_JSON).json()["id"]
        obs = observation(pid)
        obs["code"] = {"coding": [{"system": "http://loinc.org", "code": "99999-7"}]}
        c.post("/Observation", json=obs, headers=FHIR_JSON)
        # the values are searchable...
        assert c.get("/Patient", params={"family": family[:5]}).json()["total"] == 1
        assert c.get("/Patient", params={"identifier": ident}).json()["total"] == 1
        assert c.get("/Observation", params={"code": "99999-7"}).json()["total"] == 1
    server.stop()
    needles = [family, given, ident, "Quimperl", "1937-03-29", "99999-7", family[:5].lower(), family.lower()]
    if pg_server.engine() == "postgresql":  # the scan reads the server's database: its clear routing data is there
        assert not (server.data_dir / "fhirvault.sqlite3").exists()
        assert any(b"Observation" in data for _, data in _all_bytes(_database_files(server)[:1]))
    for path, data in _all_bytes([server.data_dir, server.log_path, *_database_files(server)]):
        for needle in needles:
            assert needle.encode() not in data, f"{needle} found in {path}"
