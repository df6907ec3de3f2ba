"""Planted marker: no byte of patient data reaches the disk or the logs in clear."""

from __future__ import annotations

import secrets
from pathlib import Path

from tests.conftest import PATIENT, Server, observation

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _all_bytes(paths: list[Path]) -> list[tuple[Path, bytes]]:
    out = []
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        out += [(p, p.read_bytes()) for p in files]
    return out


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
    wal_files = list(server.data_dir.glob("*-wal"))
    assert wal_files and any(p.stat().st_size > 0 for p in wal_files)
    for phase in ("running", "stopped"):
        if phase == "stopped":
            server.stop()
        for path, data in _all_bytes([server.data_dir, server.log_path]):
            for needle in (marker, marker.upper(), marker.lower()):
                assert needle.encode() not in data, f"{needle} found in {path} ({phase})"
                assert needle.encode("utf-16-le") not in data, f"{needle} (utf-16) found in {path} ({phase})"


def test_indexed_values_are_not_in_the_database(server: Server) -> None:
    """Every searchable value (names, codes, identifiers, dates, references) stays out of the files."""
    family, given, ident = "Qvxbrandt", "Ulvhilde", "NIR-88291-XQ"
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
    for path, data in _all_bytes([server.data_dir, server.log_path]):
        for needle in needles:
            assert needle.encode() not in data, f"{needle} found in {path}"
