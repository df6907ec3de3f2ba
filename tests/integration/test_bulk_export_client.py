"""$export with a published Bulk Data client against a real server process, and a completed
export surviving a restart.

The client is SMART Fetch (``smart-fetch`` on PyPI, smart-on-fhir's bulk export tool, which
replaced cumulus-etl's export), installed at a pinned version into its own virtual environment
(cached under ~/.cache) and run as a subprocess, as an operator would run it.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, start_server

SMART_FETCH = "smart-fetch==1.0.3"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
VITALS = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                      "code": "vital-signs"}]}


@pytest.fixture(scope="session")
def smart_fetch() -> Path:
    """The smart-fetch command, from a venv of its own (created once, then reused)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fhirvault-tests"
    venv = cache / SMART_FETCH.replace("==", "-")
    command = venv / "bin" / "smart-fetch"
    if not command.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", SMART_FETCH], check=True, timeout=600)
    return command


def _load(client: httpx.Client) -> None:
    for pid in ("p1", "p2"):
        r = client.put(f"/Patient/{pid}", json={"resourceType": "Patient", "id": pid, "name": [{"family": "Fetch"}]},
                       headers=FHIR_JSON)
        assert r.status_code in (200, 201), r.text
        for n in range(3):
            obs = {"resourceType": "Observation", "id": f"{pid}-o{n}", "status": "final", "category": [VITALS],
                   "code": {"text": "heart rate"}, "subject": {"reference": f"Patient/{pid}"}}
            assert client.put(f"/Observation/{pid}-o{n}", json=obs, headers=FHIR_JSON).status_code in (200, 201)
    group = {"resourceType": "Group", "id": "g1", "type": "person", "actual": True,
             "member": [{"entity": {"reference": "Patient/p2"}}]}
    assert client.put("/Group/g1", json=group, headers=FHIR_JSON).status_code in (200, 201)


def _fetched(folder: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in sorted(folder.glob("*.ndjson.gz")):
        for line in gzip.decompress(f.read_bytes()).splitlines():
            resource: dict[str, Any] = json.loads(line)
            out.setdefault(resource["resourceType"], []).append(resource["id"])
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.slow
@pytest.mark.server
def test_smart_fetch_exports_system_and_group(tmp_path: Path, smart_fetch: Path) -> None:
    srv = start_server(tmp_path / "data", tmp_path / "server.log")
    try:
        token = srv.token()
        with srv.client(token) as c:
            _load(c)
        token_file = tmp_path / "token"
        token_file.write_text(token)

        def fetch(folder: str, *extra: str) -> dict[str, list[str]]:
            run = subprocess.run([str(smart_fetch), "bulk", str(tmp_path / folder), "--fhir-url", srv.fhir,
                                  "--bearer-token", str(token_file), "--type", "Patient,Observation", *extra],
                                 capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            return _fetched(tmp_path / folder)

        # smart-fetch sends its default Observation _typeFilter (categories, commas double-encoded)
        assert fetch("all") == {"Observation": sorted(f"{p}-o{n}" for p in ("p1", "p2") for n in range(3)),
                                "Patient": ["p1", "p2"]}
        assert fetch("group", "--group", "g1") == {"Observation": ["p2-o0", "p2-o1", "p2-o2"], "Patient": ["p2"]}
        log = [json.loads(line) for line in (tmp_path / "all" / "log.ndjson").read_text().splitlines()]
        assert any(e["eventId"] == "status_complete" for e in log)
    finally:
        srv.stop()


def _poll(client: httpx.Client, url: str) -> httpx.Response:
    deadline = time.monotonic() + 60
    while (r := client.get(url)).status_code == 202:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return r


@pytest.mark.server
def test_completed_export_survives_a_restart(tmp_path: Path) -> None:
    srv: Server = start_server(tmp_path / "data", tmp_path / "server.log")
    try:
        with srv.client() as c:
            _load(c)
            r = c.get("/$export", params={"_type": "Patient"}, headers={"Prefer": "respond-async"})
            assert r.status_code == 202, r.text
            status = r.headers["Content-Location"].split("/fhir", 1)[1]  # the restarted server has another port
            assert _poll(c, status).status_code == 200
    finally:
        srv.stop()
    srv = start_server(tmp_path / "data", tmp_path / "server.log")
    try:
        with srv.client() as c:  # a new token of the same client
            r = _poll(c, status)
            assert r.status_code == 200, r.text
            [out] = r.json()["output"]
            lines = c.get(out["url"]).text.splitlines()
            assert sorted(json.loads(x)["id"] for x in lines) == ["p1", "p2"]
    finally:
        srv.stop()
