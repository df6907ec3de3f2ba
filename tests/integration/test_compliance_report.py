"""The compliance report generated from a live server: a backup, a restore drill, an alert, an incident from it,
a data-subject request; fetched as HTML (fr) and PDF (en) over HTTP and written by the CLI. The files are kept
in build/compliance/ (CI artefacts)."""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from pypdf import PdfReader

from tests.backup.test_recovery_e2e import fv
from tests.conftest import engine_settings, start_server

ARTEFACTS = Path(__file__).resolve().parents[2] / "build" / "compliance"


def _pdf_text(data: bytes) -> tuple[int, str]:
    reader = PdfReader(io.BytesIO(data))
    return len(reader.pages), "\n".join(page.extract_text() for page in reader.pages)


@pytest.mark.slow
@pytest.mark.server
def test_the_report_shows_the_live_instance_in_html_and_pdf(tmp_path: Path) -> None:
    data, target = tmp_path / "data", tmp_path / "backups"
    data.mkdir(mode=0o700)
    engine = "".join(f'{k} = "{v}"\n' for k, v in engine_settings(data).items())
    (data / "fhirvault.toml").write_text(engine + f'country = "FR"\n[backup.targets.local]\nurl = "{target.as_uri()}"'
                                         '\nlocation = "FR"\n')
    srv = start_server(data, tmp_path / "server.log")
    try:
        with srv.client() as c:
            for i in range(3):
                r = c.put(f"/Patient/cr{i}", json={"resourceType": "Patient", "id": f"cr{i}", "gender": "female"})
                assert r.status_code in (200, 201), r.text
        r = fv("backup", "create", "--data-dir", str(data), "--target", "local", "--json")
        assert r.returncode == 0, r.stderr
        backup_id = json.loads(r.stdout)["backup_id"]
        r = fv("dr", "drill", "--data-dir", str(data), "--target", "local", "--report-dir", str(data / "dr-drills"))
        assert r.returncode == 0, r.stdout + r.stderr
        drill = json.loads(next((data / "dr-drills").glob("dr-drill-*.json")).read_text())
        with httpx.Client(base_url=srv.base_url, timeout=30) as h:
            for _ in range(6):  # brute force on the token endpoint: a high alert
                assert h.post("/oauth2/token", data={"grant_type": "client_credentials"},
                              auth=(srv.creds["client_id"], "wrong-secret")).status_code in (401, 429)
        alerts_file = data / "alerts.jsonl"
        alert = None
        for _ in range(100):
            lines = alerts_file.read_text().splitlines() if alerts_file.exists() else []
            alert = next((json.loads(x) for x in lines if json.loads(x).get("rule") == "brute_force"), None)
            if alert:
                break
            time.sleep(0.1)
        assert alert is not None, "no brute_force alert"
        r = fv("client", "create", "--data-dir", str(data), "--name", "dpo", "--scope", "fhirvault/registers.write")
        assert r.returncode == 0, r.stderr
        dpo = json.loads(r.stdout)
        with httpx.Client(base_url=srv.base_url, timeout=60) as h:
            token = h.post("/oauth2/token", data={"grant_type": "client_credentials"},
                           auth=(dpo["client_id"], dpo["client_secret"])).json()["access_token"]
            h.headers["Authorization"] = f"Bearer {token}"
            inc = h.post("/admin/registers/incidents", json={"alert": alert["id"], "reason": "checking the source"})
            assert inc.status_code == 201, inc.text
            req = h.post("/admin/registers/requests", json={"type": "access", "subject": "ref 2026-17",
                                                            "reason": "letter received", "received": "2020-01-01"})
            assert req.status_code == 201, req.text
            html = h.get("/admin/compliance/report.html", params={"lang": "fr"})
            pdf = h.get("/admin/compliance/report.pdf", params={"lang": "en"})
            doc = h.get("/admin/compliance/report").json()
    finally:
        srv.stop()
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    (ARTEFACTS / "compliance-report-fr.html").write_text(html.text)
    (ARTEFACTS / "compliance-report-en.pdf").write_bytes(pdf.content)

    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    text = html.text
    assert '<html lang="fr">' in text and "Rapport de conformité fhirvault" in text
    assert "dernière sauvegarde" in text and f"backup {backup_id} to {target.as_uri()}" in text  # as audited
    assert f"RPO {drill['rpo_seconds']:.1f} s, RTO {drill['rto_seconds']:.1f} s" in text
    # the brute-force alert (after-hours rules may add medium ones when CI runs at night)
    assert re.search(r"\d+ alerte\(s\) ouverte\(s\): [^<\[]*\b[1-9] high", text)
    assert "1 incident(s), 1 ouvert(s), 0 au-delà du délai de 72 heures" in text
    assert "1 demande(s), 1 en cours, 1 en retard" in text  # received in 2020
    assert "data_dir : cette machine, en FR" in text and "backup.targets.local : cette machine, en FR" in text
    assert "clé du tenant version 1 sur 1, créée le" in text
    status = {c["key"]: c["status"] for c in doc["controls"]}
    assert status["backup"] == "met" and status["restore-drill"] == "met" and status["encryption"] == "met"
    assert status["monitoring"] == "partial" and status["subject-rights"] == "not met"
    assert status["access-review"] == "not met"  # the console's access reviews are present, no campaign run yet

    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF-1.") and pdf.content.rstrip().endswith(b"%%EOF")
    pages, pdf_text = _pdf_text(pdf.content)
    assert pages >= 2
    flat = re.sub(r"\s+", " ", pdf_text)
    assert "fhirvault compliance report" in flat and f"backup {backup_id}" in flat
    assert "1 incident(s), 1 open, 0 past the 72-hour deadline" in flat and "1 request(s), 1 pending, 1 overdue" in flat
    assert f"RPO {drill['rpo_seconds']:.1f} s" in flat and re.search(r"open alert\(s\): [^\[]*\b[1-9] high", flat)

    # the CLI writes the same report from the data directory
    out = ARTEFACTS / "compliance-report-cli-fr.pdf"
    r = fv("compliance", "report", "--data-dir", str(data), "--format", "pdf", "--lang", "fr", "--out", str(out))
    assert r.returncode == 0, r.stderr
    pages, cli_text = _pdf_text(out.read_bytes())
    assert pages >= 2 and "Rapport de conformit" in cli_text and "CONFORME" in cli_text
    shutil.copy(tmp_path / "server.log", ARTEFACTS / "server.log")
