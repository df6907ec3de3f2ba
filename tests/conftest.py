"""Shared fixtures: an in-process app (fast) and a real server process (integration)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from fhirvault.bootstrap import initialise
from fhirvault.config import Settings, load_settings
from fhirvault.container import Container, build
from fhirvault.web.app import create_app
from tests import pg_server

# Markers (registered in pyproject.toml): `server` for tests that start a real server process,
# `s3` for tests that need the Swift S3 server. Tests using the fixtures below get them here;
# a test that calls start_server() itself must carry @pytest.mark.server (checked at run time).
_FIXTURE_MARKERS = {"server": "server", "shared_server": "server", "s3_server": "s3"}
_running: list[pytest.Item] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            if fixture in _FIXTURE_MARKERS:
                item.add_marker(_FIXTURE_MARKERS[fixture])


def pytest_runtest_setup(item: pytest.Item) -> None:
    _running[:] = [item]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_token(client: httpx.Client | TestClient, creds: dict[str, str], scope: str | None = None) -> str:
    data = {"grant_type": "client_credentials"}
    if scope:
        data["scope"] = scope
    r = client.post("/oauth2/token", data=data, auth=(creds["client_id"], creds["client_secret"]))
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


@pytest.fixture
def pg_url() -> str:
    """A fresh PostgreSQL database (with the schema) on this test process's server."""
    return pg_server.server().create_database()


def engine_settings(data_dir: Path) -> dict[str, object]:
    """Settings selecting the engine under test (TEST_DB_ENGINE: sqlite, the default, or postgresql)."""
    if pg_server.engine() == "postgresql":
        return {"database_url": pg_server.server().database_for(data_dir)}
    return {}


@dataclass
class App:
    client: TestClient
    settings: Settings
    creds: dict[str, str]
    token: str
    container: Container

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    """A fresh data directory served in-process, with an admin token."""
    settings = load_settings({"data_dir": tmp_path / "data", **engine_settings(tmp_path / "data")}, environ={})
    creds_path = initialise(settings)
    creds = json.loads(creds_path.read_text())
    container = build(settings)
    with TestClient(create_app(container), base_url="http://testserver") as client:
        token = get_token(client, creds)
        yield App(client, settings, creds, token, container)


@dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    creds: dict[str, str]

    @property
    def fhir(self) -> str:
        return self.base_url + "/fhir"

    def token(self, scope: str | None = None) -> str:
        with httpx.Client(base_url=self.base_url) as c:
            return get_token(c, self.creds, scope)

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.token()}"}
        return httpx.Client(base_url=self.fhir, headers=headers, timeout=30)

    def stop(self) -> None:
        """Graceful stop: SIGTERM to the supervisor, which stops its worker."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def kill_all(self) -> None:
        """Power-cut style: SIGKILL to the supervisor and its worker at once."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def start_server(data_dir: Path, log_path: Path, *extra: str, env: dict[str, str] | None = None,
                 tls: bool = False) -> Server:
    if _running and _running[0].get_closest_marker("server") is None:
        pytest.fail(f"{_running[0].nodeid} starts a server process: mark it @pytest.mark.server")
    port = free_port()
    cmd = [sys.executable, "-m", "fhirvault.cli.main", "serve", "--data-dir", str(data_dir), "--port", str(port), *extra]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
    engine = engine_settings(data_dir)
    if engine and not data_dir.exists():
        # As an operator would: in the data directory's config file, so the CLI commands a test runs
        # on this directory (user create, keys rotate, audit verify) reach the same database.
        data_dir.mkdir(mode=0o700, parents=True)
        config = data_dir / "fhirvault.toml"
        config.write_text("".join(f'{k} = "{v}"\n' for k, v in engine.items()))
        config.chmod(0o600)
    else:
        full_env.update({f"FHIRVAULT_{k.upper()}": str(v) for k, v in engine.items()})
    full_env.update(env or {})
    with log_path.open("ab") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=full_env, start_new_session=True)
    base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/livez", timeout=1, verify=False).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("server did not start")
    creds = json.loads((data_dir / "admin-client.json").read_text())
    return Server(base, data_dir, log_path, proc, creds)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = start_server(tmp_path / "data", tmp_path / "server.log")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server process for a whole test module (start-up costs about a second)."""
    base = tmp_path_factory.mktemp("srv")
    srv = start_server(base / "data", base / "server.log")
    try:
        yield srv
    finally:
        srv.stop()


PATIENT = {
    "resourceType": "Patient",
    "identifier": [{"system": "urn:oid:1.2.250.1.213.1.4.8", "value": "184057512345625"}],
    "name": [{"use": "official", "family": "Martin", "given": ["Claire", "Anne"]}],
    "gender": "female",
    "birthDate": "1984-05-12",
    "telecom": [{"system": "phone", "value": "+33 6 12 34 56 78", "use": "mobile"}],
    "address": [{"line": ["12 rue des Lilas"], "city": "Lyon", "postalCode": "69003", "country": "FR"}],
}


def observation(patient_id: str) -> dict[str, object]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": "2026-11-02T09:30:00+01:00",
        "valueQuantity": {"value": 72, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"},
    }
