"""Bulk Data $export end to end (in-process app, real store): kick-off, polling, manifest, downloads,
filters, Group and patient exports, the owner check, signed links, cancel, audit and detection."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
from starlette.testclient import TestClient

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import SystemClock, build
from fhirvault.services.bulk_jobs import new_job
from fhirvault.services.detection import AFTER_HOURS
from fhirvault.web.app import create_app
from tests.conftest import App, engine_settings, get_token
from tests.integration.authz_support import bearer, care_team, mint, observation, patient, put

ASYNC = {"Prefer": "respond-async"}


def _poll(client: TestClient | httpx.Client, status_url: str, headers: dict[str, str],
          timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(status_url, headers=headers)
        if r.status_code != 202:
            return r
        assert r.headers["X-Progress"]
        assert int(r.headers["Retry-After"]) >= 1
        assert time.monotonic() < deadline, "export did not finish"
        time.sleep(0.1)


def _export(client: TestClient, headers: dict[str, str], path: str = "/fhir/$export", **params: str) -> dict[str, Any]:
    r = client.get(path, params=params, headers={**headers, **ASYNC})
    assert r.status_code == 202, r.text
    location = r.headers["Content-Location"]
    assert "/fhir/$bulk-status/" in location
    done = _poll(client, location, headers)
    assert done.status_code == 200, done.text
    assert done.headers["Expires"].endswith("GMT")  # when the retention sweep deletes the outputs
    manifest: dict[str, Any] = done.json()
    manifest["_status_url"] = location
    return manifest


def _download(client: TestClient, headers: dict[str, str], url: str) -> list[dict[str, Any]]:
    r = client.get(url, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+ndjson")
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def _all(client: TestClient, headers: dict[str, str], manifest: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in manifest["output"]:
        resources = _download(client, headers, item["url"])
        assert len(resources) == item["count"]
        assert all(r["resourceType"] == item["type"] for r in resources)
        out.setdefault(item["type"], []).extend(r["id"] for r in resources)
    return {k: sorted(v) for k, v in out.items()}


@pytest.fixture
def data(app: App) -> App:
    for pid in ("p1", "p2"):
        put(app.client, app.auth, patient(pid))
        for n in range(3):
            put(app.client, app.auth, observation(pid, f"{pid}-o{n}", "laboratory" if n == 0 else "vital-signs"))
    put(app.client, app.auth, {"resourceType": "Group", "id": "g1", "type": "person", "actual": True,
                               "member": [{"entity": {"reference": "Patient/p1"}}]})
    put(app.client, app.auth, {"resourceType": "Organization", "id": "org1", "name": "Clinique"})
    return app


def test_system_export_manifest_downloads_and_encrypted_files(data: App) -> None:
    c, h = data.client, data.auth
    assert c.get("/fhir/$export", headers=h).status_code == 400  # no Prefer: respond-async
    manifest = _export(c, h)
    assert manifest["requiresAccessToken"] is True
    assert manifest["request"].endswith("/fhir/$export")
    assert manifest["error"] == []
    datetime.datetime.fromisoformat(manifest["transactionTime"])
    found = _all(c, h, manifest)
    assert found["Patient"] == ["p1", "p2"]
    assert found["Observation"] == sorted(f"{p}-o{n}" for p in ("p1", "p2") for n in range(3))
    assert found["Group"] == ["g1"] and found["Organization"] == ["org1"]
    files = list((data.settings.data_dir / "bulk").rglob("*.ndjson"))
    assert files
    for f in files:  # sealed at rest: no resource JSON, no names
        raw = f.read_bytes()
        assert b"resourceType" not in raw and b"Test" not in raw and b"p1-o0" not in raw


def test_type_since_and_type_filter(data: App) -> None:
    c, h = data.client, data.auth
    m = _export(c, h, _type="Observation", _typeFilter="Observation?category=laboratory")
    assert _all(c, h, m) == {"Observation": ["p1-o0", "p2-o0"]}
    # two filters on a type are OR-ed; a query value with a comma stays one query
    m = _export(c, h, _type="Observation,Patient",
                _typeFilter="Observation?subject=Patient/p2&category=vital-signs,Patient?_id=p1")
    assert _all(c, h, m) == {"Observation": ["p2-o1", "p2-o2"], "Patient": ["p1"]}
    future = "2099-01-01T00:00:00Z"
    m = _export(c, h, _since=future)
    assert m["output"] == []
    for bad in ({"_type": "Nonsense"}, {"_since": "yesterday"}, {"_outputFormat": "text/csv"},
                {"_typeFilter": "Observation?nonsense-param=1"}, {"_elements": "id"},
                {"_type": "Patient", "_typeFilter": "Observation?status=final"}):
        r = c.get("/fhir/$export", params=bad, headers={**h, **ASYNC})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["resourceType"] == "OperationOutcome"


def test_lenient_handling_warns_in_the_error_file(data: App) -> None:
    c, h = data.client, data.auth
    r = c.get("/fhir/$export", params={"_type": "Patient", "_elements": "id"},
              headers={**h, "Prefer": "respond-async, handling=lenient"})
    assert r.status_code == 202
    m = _poll(c, r.headers["Content-Location"], h).json()
    assert [o["type"] for o in m["output"]] == ["Patient"]
    [err] = m["error"]
    outcome = _download(c, h, err["url"])[0]
    assert outcome["resourceType"] == "OperationOutcome" and "_elements" in outcome["issue"][0]["diagnostics"]


def test_group_and_post_parameters(data: App) -> None:
    c, h = data.client, data.auth
    m = _export(c, h, "/fhir/Group/g1/$export")  # the Group itself is in p1's compartment (Group.member)
    assert _all(c, h, m) == {"Group": ["g1"], "Observation": ["p1-o0", "p1-o1", "p1-o2"], "Patient": ["p1"]}
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Observation"}, {"name": "_outputFormat", "valueString": "ndjson"},
        {"name": "patient", "valueReference": {"reference": "Patient/p2"}}]}
    r = c.post("/fhir/Patient/$export", json=body, headers={**h, **ASYNC, "Content-Type": "application/fhir+json"})
    assert r.status_code == 202, r.text
    m = _poll(c, r.headers["Content-Location"], h).json()
    assert _all(c, h, m) == {"Observation": ["p2-o0", "p2-o1", "p2-o2"]}
    assert c.get("/fhir/Group/nope/$export", headers={**h, **ASYNC}).status_code == 404


def test_patient_exports_only_their_own_record(data: App) -> None:
    c = data.client
    token = mint(data.container, role="patient", user="u-p1", fhir_user="Patient/p1", patient="p1",
                 scope="patient/*.rs")
    mine = bearer(token)
    m = _export(c, mine, "/fhir/Patient/$export")  # p2's record never; the Group naming p1 is in p1's compartment
    assert _all(c, mine, m) == {"Group": ["g1"], "Observation": ["p1-o0", "p1-o1", "p1-o2"], "Patient": ["p1"]}
    # not the system level, not another patient's Group member list
    assert c.get("/fhir/$export", headers={**mine, **ASYNC}).status_code == 403
    # the admin's job is not theirs: as if it did not exist; nor its files
    admin = _export(c, data.auth, _type="Patient")
    assert c.get(admin["_status_url"], headers=mine).status_code == 404
    assert c.get(admin["output"][0]["url"], headers=mine).status_code == 404
    assert c.delete(admin["_status_url"], headers=mine).status_code == 404
    assert c.get(admin["output"][0]["url"]).status_code == 401  # the access token is required


def test_links_are_signed_and_expire(data: App) -> None:
    c, h = data.client, data.auth
    m = _export(c, h, _type="Patient")
    url = m["output"][0]["url"]
    parts = urlsplit(url)
    q = dict(parse_qsl(parts.query))
    tampered = f"{parts.path}?{urlencode({**q, 'expires': str(int(q['expires']) + 1)})}"
    assert c.get(tampered, headers=h).status_code == 403
    expired = int(time.time() * 1000) - 1
    assert c.get(f"{parts.path}?{urlencode({**q, 'sig': 'x' * 32})}", headers=h).status_code == 403
    assert c.get(f"{parts.path}?expires={expired}&sig={q['sig']}", headers=h).status_code == 403
    assert c.get(url, headers=h).status_code == 200


def test_cancel_deletes_outputs_then_404(data: App) -> None:
    c, h = data.client, data.auth
    m = _export(c, h)
    job = m["_status_url"].rsplit("/", 1)[1]
    folder = data.settings.data_dir / "bulk" / job
    assert folder.is_dir()
    assert c.delete(m["_status_url"], headers=h).status_code == 202
    assert not folder.exists()
    assert c.get(m["_status_url"], headers=h).status_code == 404
    assert c.get(m["output"][0]["url"], headers=h).status_code == 404
    assert c.delete(m["_status_url"], headers=h).status_code == 404


def test_audit_records_kick_off_download_cancel(data: App) -> None:
    c, h = data.client, data.auth
    m = _export(c, h, _type="Patient")
    _download(c, h, m["output"][0]["url"])
    assert c.delete(m["_status_url"], headers=h).status_code == 202
    r = c.get("/fhir/AuditEvent", params={"_count": "200"}, headers=h)
    assert r.status_code == 200, r.text
    kinds = [json.dumps(e["resource"]) for e in r.json()["entry"]]
    assert any("$export" in k and "Patient" in k for k in kinds)  # kick-off
    assert any("export-complete" in k for k in kinds)
    assert any("export-download" in k for k in kinds)
    assert any("export-cancel" in k for k in kinds)


def test_retention_sweep_deletes_expired_outputs(data: App) -> None:
    c, h = data.client, data.auth
    m = _export(c, h, _type="Patient")
    job = m["_status_url"].rsplit("/", 1)[1]
    service = data.container.bulk_export
    assert service is not None
    assert service.sweep() == 0
    service.retention_ms = -1  # everything finished is past retention now
    assert service.sweep() == 1
    assert not (data.settings.data_dir / "bulk" / job).exists()
    assert c.get(m["_status_url"], headers=h).status_code == 404


class _Saturday3am(SystemClock):
    """Real time moving forward, shifted to a Saturday night (outside the default working hours)."""

    def __init__(self) -> None:
        target = datetime.datetime(2026, 12, 5, 3, 0, tzinfo=datetime.UTC).timestamp() * 1000
        self._offset = int(target) - super().now_ms()

    def now_ms(self) -> int:
        return super().now_ms() + self._offset


def test_after_hours_export_raises_the_alert(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path / "data", **engine_settings(tmp_path / "data")}, environ={})
    creds = json.loads(initialise(settings).read_text())
    container = build(settings, _Saturday3am())
    with TestClient(create_app(container), base_url="http://testserver") as client:
        h = bearer(get_token(client, creds))
        put(client, h, patient("p1"))
        assert container.alerts is not None
        assert not any(rule == AFTER_HOURS for rule, _ in container.alerts.open_counts())
        _export(client, h, _type="Patient")
        assert any(rule == AFTER_HOURS for rule, _ in container.alerts.open_counts())


def test_capability_statement_lists_the_export_operations(app: App) -> None:
    cap = app.client.get("/fhir/metadata").json()
    rest = cap["rest"][0]
    assert "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data" in cap["instantiates"]
    assert [o["definition"] for o in rest["operation"]] == [
        "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
        "urn:fhirvault:OperationDefinition/import"]  # $import: docs/bulk-import.md
    by_type = {r["type"]: [o["definition"].rsplit("/", 1)[1] for o in r.get("operation", [])]
               for r in rest["resource"]}
    assert "patient-export" in by_type["Patient"] and "group-export" in by_type["Group"]
    assert not any("export" in d for t, ops in by_type.items() if t not in ("Patient", "Group") for d in ops)


def test_xml_parameters_kick_off(data: App) -> None:
    c, h = data.client, data.auth
    xml = ('<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="_type"/>'
           '<valueString value="Patient"/></parameter></Parameters>')
    r = c.post("/fhir/Group/g1/$export", content=xml,
               headers={**h, **ASYNC, "Content-Type": "application/fhir+xml", "Accept": "application/fhir+xml"})
    assert r.status_code == 202, r.text
    m = _poll(c, r.headers["Content-Location"], h).json()
    assert _all(c, h, m) == {"Patient": ["p1"]}


def test_a_job_whose_process_died_is_reported_failed(data: App) -> None:
    c, h = data.client, data.auth
    service = data.container.bulk_export
    assert service is not None
    client_id = data.creds["client_id"]
    job = new_job("export", "default", client_id, None, "http://testserver/fhir/$export", 0, {})
    job.status = "running"
    service.jobs.save(job)  # as a crashed server left it: running, no heartbeat for long
    r = c.get(f"/fhir/$bulk-status/{job.job_id}", headers=h)
    assert r.status_code == 500
    assert r.json()["resourceType"] == "OperationOutcome" and "stopped" in r.json()["issue"][0]["diagnostics"]
    found = service.jobs.get(job.job_id)
    assert found is not None and found.status == "failed"


def test_a_practitioner_exports_only_their_patients(data: App) -> None:
    c = data.client
    doctor = "Practitioner/dr-bulk"
    put(c, data.auth, {"resourceType": "Practitioner", "id": "dr-bulk", "name": [{"family": "House"}]})
    put(c, data.auth, care_team("p2", "team-p2", doctor))
    h = bearer(mint(data.container, role="practitioner", user="u-dr-bulk", fhir_user=doctor))
    m = _export(c, h, "/fhir/Patient/$export", _type="Patient,Observation")
    assert _all(c, h, m) == {"Observation": ["p2-o0", "p2-o1", "p2-o2"], "Patient": ["p2"]}
    # the Group listing p1 is filed in p1's compartment: outside their care, it does not exist for them
    assert c.get("/fhir/Group/g1/$export", headers={**h, **ASYNC}).status_code == 404
    assert c.get("/fhir/$export", headers={**h, **ASYNC}).status_code == 403  # system level: backend services only
