"""The operator's backup page in process: a restore drill started from the console runs in the background,
writes its report, and shows on the page and in the charts' drill history; one job at a time."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from fhirvault.backup.settings import parse_backup_settings
from fhirvault.web.console.routes import Console
from fhirvault.web.login import IdentityWeb
from tests.conftest import PATIENT, App
from tests.integration.identity_helpers import make_user
from tests.unit.web.console.test_console_app import sign_in

pytestmark = pytest.mark.slow


def test_a_drill_started_from_the_console_reports_rpo_and_rto(app: App, tmp_path: Path) -> None:
    assert app.client.post("/fhir/Patient", json=PATIENT, headers=app.auth).status_code == 201
    (tmp_path / "target").mkdir()
    backup = parse_backup_settings({"targets": {"local": {"url": f"file://{tmp_path / 'target'}", "location": "FR"}},
                                    "interval": "1h"}, "test")
    container = dataclasses.replace(app.container, settings=dataclasses.replace(app.container.settings, backup=backup))
    detection = app.container.enable_alerting()
    identity = IdentityWeb.build(container, None)
    console = Console(container, identity.server, identity.users, detection, None)
    operator = make_user(app.container, "oscar", "operator")
    with TestClient(Starlette(routes=console.routes()), base_url="http://testserver") as client:
        assert sign_in(client, operator) == 303
        page = client.get("/console/backups")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        r = client.post("/console/backups/drill", data={"csrf": token}, follow_redirects=False)
        assert r.status_code == 400  # no reason
        r = client.post("/console/backups/backup", data={"csrf": token, "reason": "before the drill"},
                        follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].endswith("done=ok")
        r = client.post("/console/backups/drill", data={"csrf": token, "reason": "quarterly drill"},
                        follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].endswith("done=started")
        busy = client.post("/console/backups/backup", data={"csrf": token, "reason": "again"})
        assert busy.status_code == 409  # the drill is still running
        reports = container.settings.data_dir / "dr-drills"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not list(reports.glob("*.json")):
            time.sleep(0.5)
        assert list(reports.glob("*.json")), "no drill report"
        page = client.get("/console/backups")
        assert "passed" in page.text and " s</td>" in page.text
        charts = client.get("/console/charts?hours=1")
        assert 'id="chart-drill-rto"' in charts.text and "<polyline" in charts.text.split('id="chart-drill-rto"')[1]
        c = app.container
        records = [c.audit.decrypt(seq, ts, blob) for seq, ts, blob in c.store.audit_entries("default", limit=100_000)]
        runs = [r for r in records if r["interaction"] == "console.drill-run"]
        assert len(runs) == 1 and "reason: quarterly drill" in runs[0]["detail"] and runs[0]["user"] == operator.user_id
        assert any(r["interaction"] == "dr-drill" and "passed" in r["detail"] for r in records)
