"""$import: NDJSON uploads and import-directory manifests, all-or-nothing per file, audited, system-only."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import PATIENT, App, get_token, observation

NDJSON = {"Content-Type": "application/fhir+ndjson"}


def _ndjson(*resources: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in resources)


def _patient(pid: str, family: str = "Martin") -> dict[str, Any]:
    return {**PATIENT, "id": pid, "name": [{"family": family, "given": ["Claire"]}]}


def _obs(oid: str, pid: str) -> dict[str, Any]:
    return {**observation(pid), "id": oid}


def _manifest(*inputs: tuple[str, str]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [
        {"name": "inputFormat", "valueCode": "application/fhir+ndjson"},
        {"name": "inputSource", "valueUri": "https://old-ehr.example.org"},
        *({"name": "input", "part": [{"name": "type", "valueCode": t}, {"name": "url", "valueUri": u}]}
          for t, u in inputs)]}


def _poll(app: App, status_url: str, headers: dict[str, str]) -> dict[str, Any]:
    path = status_url.removeprefix("http://testserver")
    for _ in range(200):
        r = app.client.get(path, headers=headers)
        if r.status_code == 200:
            return dict(r.json())
        assert r.status_code == 202, r.text
        assert r.headers["X-Progress"]
        time.sleep(0.05)
    raise AssertionError("the import did not finish")


def test_upload_keeps_ids_indexes_and_versions(app: App) -> None:
    body = _ndjson(_patient("imp-p1"), _patient("imp-p2", "Durand"), _obs("imp-o1", "imp-p1"))
    r = app.client.post("/fhir/$import", content=body, headers={**app.auth, **NDJSON})
    assert r.status_code == 200, r.text
    manifest = r.json()
    assert sorted((o["type"], o["count"]) for o in manifest["output"]) == [("Observation", 1), ("Patient", 2)]
    assert manifest["error"] == []
    assert manifest["extension"]["files"][0]["committed"] is True
    p1 = app.client.get("/fhir/Patient/imp-p1", headers=app.auth).json()
    assert p1["meta"]["versionId"] == "1" and p1["name"][0]["family"] == "Martin"
    # Searches see the imported resources as soon as the import is acknowledged.
    found = app.client.get("/fhir/Patient?family=Durand", headers=app.auth).json()
    assert [e["resource"]["id"] for e in found["entry"]] == ["imp-p2"]
    obs = app.client.get("/fhir/Observation?subject=Patient/imp-p1", headers=app.auth).json()
    assert [e["resource"]["id"] for e in obs["entry"]] == ["imp-o1"]
    # Importing again is an update (PUT semantics): a new version, same id.
    r = app.client.post("/fhir/$import", content=_ndjson(_patient("imp-p1", "Martin-Roux")),
                        headers={**app.auth, **NDJSON})
    assert r.status_code == 200, r.text
    p1 = app.client.get("/fhir/Patient/imp-p1", headers=app.auth).json()
    assert p1["meta"]["versionId"] == "2" and p1["name"][0]["family"] == "Martin-Roux"


def test_a_bad_last_line_stores_nothing_of_the_file(app: App) -> None:
    bad = {"resourceType": "Observation", "id": "imp-bad", "status": "not-a-status", "code": {"text": "x"}}
    body = _ndjson(_patient("imp-a1"), _obs("imp-a2", "imp-a1")) + b"{not json\n" + _ndjson(bad)
    r = app.client.post("/fhir/$import", content=body, headers={**app.auth, **NDJSON})
    assert r.status_code == 200, r.text
    manifest = r.json()
    assert manifest["output"] == []
    assert manifest["extension"]["files"][0] == {
        "inputUrl": "upload.ndjson", "sha256": manifest["extension"]["files"][0]["sha256"], "lines": 4,
        "committed": False, "count": 0, "refusedLines": 2}
    assert app.client.get("/fhir/Patient/imp-a1", headers=app.auth).status_code == 404
    assert app.client.get("/fhir/Observation/imp-a2", headers=app.auth).status_code == 404
    errors_url = manifest["error"][0]["url"].removeprefix("http://testserver")
    lines = app.client.get(errors_url, headers=app.auth)
    assert lines.status_code == 200 and lines.headers["content-type"].startswith("application/fhir+ndjson")
    outcomes = [orjson.loads(x) for x in lines.content.splitlines()]
    assert [o["issue"][0]["location"] for o in outcomes] == [["Line[3]"], ["Line[4]"]]
    assert all(o["resourceType"] == "OperationOutcome" for o in outcomes)
    assert "not-a-status" not in lines.text  # diagnostics never echo submitted values


def test_async_manifest_from_the_import_directory(app: App) -> None:
    folder = app.settings.data_dir / "import"
    folder.mkdir()
    (folder / "patients.ndjson").write_bytes(_ndjson(_patient("imp-d1"), _patient("imp-d2")))
    (folder / "obs.ndjson").write_bytes(_ndjson(_obs("imp-d3", "imp-d1"), {"resourceType": "Observation"}))
    headers = {**app.auth, "Prefer": "respond-async", "Content-Type": "application/fhir+json"}
    r = app.client.post("/fhir/$import", json=_manifest(("Patient", "patients.ndjson"),
                                                         ("Observation", f"file://{folder}/obs.ndjson")),
                        headers=headers)
    assert r.status_code == 202, r.text
    manifest = _poll(app, r.headers["Content-Location"], app.auth)
    files = manifest["extension"]["files"]
    assert [(f["committed"], f["count"], f["refusedLines"]) for f in files] == [(True, 2, 0), (False, 0, 1)]
    assert manifest["output"] == [{"type": "Patient", "inputUrl": "patients.ndjson", "count": 2}]
    assert app.client.get("/fhir/Patient/imp-d2", headers=app.auth).status_code == 200
    assert app.client.get("/fhir/Observation/imp-d3", headers=app.auth).status_code == 404
    # Another client (even an admin one) does not see the job; its owner can forget it.
    second = app.container.auth.register_client("second", "system/*.*")
    other = get_token(app.client, {"client_id": second.client_id, "client_secret": second.client_secret})
    status = r.headers["Content-Location"].removeprefix("http://testserver")
    assert app.client.get(status, headers={"Authorization": f"Bearer {other}"}).status_code == 404
    assert app.client.get(status + "/error/1", headers={"Authorization": f"Bearer {other}"}).status_code == 404
    assert app.client.get(status + "/error/1", headers=app.auth).status_code == 200
    assert app.client.delete(status, headers=app.auth).status_code == 202
    assert app.client.get(status, headers=app.auth).status_code == 404


@pytest.mark.parametrize("url", ["../fhirvault.sqlite3", "/etc/passwd", "file:///etc/passwd",
                                 "https://example.org/x.ndjson", "file://evil.example.org/x", "missing.ndjson",
                                 "sub/../../root.key"])
def test_inputs_outside_the_import_directory_are_refused(app: App, url: str) -> None:
    (app.settings.data_dir / "import").mkdir(exist_ok=True)
    r = app.client.post("/fhir/$import", json=_manifest(("Patient", url)),
                        headers={**app.auth, "Content-Type": "application/fhir+json"})
    assert r.status_code == 400, r.text
    assert r.json()["resourceType"] == "OperationOutcome"


def test_only_system_write_scopes_may_import(app: App) -> None:
    body = _ndjson(_patient("imp-s1"))
    readonly = get_token(app.client, app.creds, "system/*.rs")
    r = app.client.post("/fhir/$import", content=body, headers={"Authorization": f"Bearer {readonly}", **NDJSON})
    assert r.status_code == 403, r.text
    # Patients only: an Observation line's type is not covered (declared type checked against the token).
    patients = get_token(app.client, app.creds, "system/Patient.cruds")
    r = app.client.post("/fhir/$import?type=Observation", content=_ndjson(_obs("imp-s2", "imp-s1")),
                        headers={"Authorization": f"Bearer {patients}", **NDJSON})
    assert r.status_code == 403, r.text
    r = app.client.post("/fhir/$import", content=body, headers={"Authorization": f"Bearer {patients}", **NDJSON})
    assert r.status_code == 403, r.text  # undeclared types need the wildcard
    r = app.client.post("/fhir/$import?type=Patient", content=body,
                        headers={"Authorization": f"Bearer {patients}", **NDJSON})
    assert r.status_code == 200, r.text
    assert app.client.post("/fhir/$import", content=body, headers=NDJSON).status_code == 401


def test_import_is_audited_per_file_and_per_patient(app: App) -> None:
    body = _ndjson(_patient("imp-u1"), _obs("imp-u2", "imp-u1"), _obs("imp-u3", "imp-u1"))
    r = app.client.post("/fhir/$import", content=body, headers={**app.auth, **NDJSON})
    assert r.status_code == 200, r.text
    history = app.client.get("/fhir/Patient/imp-u1/$access-history", headers=app.auth).json()
    events = [e["resource"] for e in history.get("entry", [])]
    # The patient's access history shows the import that wrote into their record (one entry, not three).
    assert [[c["code"] for c in ev["subtype"]] for ev in events] == [["import"]]
    assert events[0]["entity"][0]["what"]["reference"].startswith("$import/")
    every = app.client.get("/fhir/AuditEvent?_count=100", headers=app.auth).json()
    imports = [e["resource"] for e in every["entry"] if e["resource"]["subtype"][0]["code"] == "import"]
    assert len(imports) == 2  # the file's summary and the one patient compartment


def test_bad_requests_are_4xx(app: App) -> None:
    h = {**app.auth, "Content-Type": "application/fhir+json"}
    assert app.client.post("/fhir/$import", content=b"[1]", headers=h).status_code == 400
    assert app.client.post("/fhir/$import", json={"resourceType": "Parameters"}, headers=h).status_code == 400
    assert app.client.post("/fhir/$import", json=_manifest(("Nope", "x.ndjson")), headers=h).status_code == 400
    assert app.client.get("/fhir/$import", headers=app.auth).status_code == 405
    assert app.client.get("/fhir/$import-status/nope", headers=app.auth).status_code == 404
    assert app.client.post("/fhir/$import", content=b"x", headers={**app.auth, "Content-Type": "text/csv"}
                           ).status_code == 415


def test_an_empty_file_stores_nothing_and_fails_nothing(app: App) -> None:
    r = app.client.post("/fhir/$import", content=b"\n\n", headers={**app.auth, **NDJSON})
    assert r.status_code == 200, r.text
    assert r.json()["extension"]["files"][0]["committed"] is True and r.json()["output"] == []


def test_ndjson_type_mismatch_is_per_line(app: App, tmp_path: Path) -> None:
    r = app.client.post("/fhir/$import?type=Patient", content=_ndjson(_obs("imp-t1", "x")),
                        headers={**app.auth, **NDJSON})
    assert r.status_code == 200
    assert r.json()["extension"]["files"][0]["refusedLines"] == 1


def test_async_upload_is_sealed_at_rest(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    from fhirvault.services.bulk_import import BulkImporter

    seen: list[bytes] = []
    original = BulkImporter.import_file

    def spy(self: BulkImporter, *args: Any, **kwargs: Any) -> Any:
        # While the job runs, its upload is on disk: sealed, never in clear.
        seen.extend(p.read_bytes() for p in (app.settings.data_dir / "bulk").rglob("*") if p.is_file())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BulkImporter, "import_file", spy)
    body = _ndjson(_patient("imp-x1", "Zyxwvutsrq"))
    r = app.client.post("/fhir/$import", content=body,
                        headers={**app.auth, **NDJSON, "Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    manifest = _poll(app, r.headers["Content-Location"], app.auth)
    assert manifest["output"] == [{"type": "Patient", "inputUrl": "upload.ndjson", "count": 1}]
    assert seen and not any(b"Zyxwvutsrq" in data for data in seen)
    assert not list((app.settings.data_dir / "bulk").rglob("upload.ndjson"))  # deleted once imported


def test_capability_statement_lists_import(app: App) -> None:
    cap = app.client.get("/fhir/metadata").json()
    assert "import" in [op["name"] for op in cap["rest"][0]["operation"]]


def test_xml_manifest(app: App) -> None:
    folder = app.settings.data_dir / "import"
    folder.mkdir()
    (folder / "p.ndjson").write_bytes(_ndjson(_patient("imp-xml1")))
    xml = (b'<Parameters xmlns="http://hl7.org/fhir">'
           b'<parameter><name value="inputFormat"/><valueCode value="application/fhir+ndjson"/></parameter>'
           b'<parameter><name value="input"/><part><name value="url"/><valueUri value="p.ndjson"/></part></parameter>'
           b'</Parameters>')
    r = app.client.post("/fhir/$import", content=xml, headers={**app.auth, "Content-Type": "application/fhir+xml"})
    assert r.status_code == 200, r.text
    assert r.json()["output"] == [{"type": "Patient", "inputUrl": "p.ndjson", "count": 1}]
    bad = app.client.post("/fhir/$import", content=b"<Parameters xmlns='http://hl7.org/fhir'/>",
                          headers={**app.auth, "Content-Type": "application/fhir+xml", "Accept": "application/fhir+xml"})
    assert bad.status_code == 400 and b"OperationOutcome" in bad.content


def test_a_failing_job_says_why(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    from fhirvault.services.bulk_import import BulkImporter
    from fhirvault.services.repository import ConcurrentChange

    def conflict(*_args: object, **_kwargs: object) -> None:
        raise ConcurrentChange()

    monkeypatch.setattr(BulkImporter, "import_file", conflict)
    r = app.client.post("/fhir/$import", content=_ndjson(_patient("imp-f1")), headers={**app.auth, **NDJSON})
    assert r.status_code == 409, r.text
    r = app.client.post("/fhir/$import", content=_ndjson(_patient("imp-f1")),
                        headers={**app.auth, **NDJSON, "Prefer": "respond-async"})
    status = r.headers["Content-Location"].removeprefix("http://testserver")
    for _ in range(200):
        s = app.client.get(status, headers=app.auth)
        if s.status_code != 202:
            break
        time.sleep(0.05)
    assert s.status_code == 500 and "changed while" in s.json()["issue"][0]["diagnostics"], s.text


def test_finished_import_jobs_are_swept_after_the_retention_time(app: App) -> None:
    r = app.client.post("/fhir/$import", content=_ndjson(_patient("imp-sweep")),
                        headers={**app.auth, **NDJSON, "Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    status = r.headers["Content-Location"]
    _poll(app, status, app.auth)
    service = app.container.bulk_export
    assert service is not None
    assert service.sweep() == 0  # within retention: kept
    service.retention_ms = -1  # everything finished is past retention now
    assert service.sweep() == 1
    assert app.client.get(status.removeprefix("http://testserver"), headers=app.auth).status_code == 404
