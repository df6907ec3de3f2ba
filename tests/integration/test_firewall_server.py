"""The firewall in a real server process (Granian), configured as an operator would: a config file with
trusted_proxies and a [firewall] table, clients made with the CLI, requests from several loopback
addresses (127.0.0.2 is another machine as far as the server can tell)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhirvault.config import load_settings
from fhirvault.container import build
from tests.conftest import Server, get_token, start_server
from tests.integration.test_cli import fhirvault

pytestmark = pytest.mark.server  # starts real server processes

CONFIG = """
trusted_proxies = ["127.0.0.1/32"]

[firewall]
source_rate = 0.5
source_burst = 6
"""


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[Server]:
    """A server that believes forwarded headers from 127.0.0.1 (the reverse proxy) and nobody else."""
    config = tmp_path / "fhirvault.toml"
    config.write_text(CONFIG)
    srv = start_server(tmp_path / "data", tmp_path / "server.log", env={"FHIRVAULT_CONFIG": str(config)})
    try:
        yield srv
    finally:
        srv.stop()


def _from(server: Server, address: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, transport=httpx.HTTPTransport(local_address=address),
                        timeout=30)


def _records(server: Server, config: Path) -> list[dict[str, Any]]:
    server.stop()  # read the audit trail as the operator would afterwards
    container = build(load_settings({"data_dir": server.data_dir}, environ={}, config_file=config))
    try:
        return [container.audit.decrypt(seq, ts, blob)
                for seq, ts, blob in container.store.audit_entries("default", limit=100_000)]
    finally:
        container.close()


def _wrong_secret(client: httpx.Client, headers: dict[str, str] | None = None) -> None:
    r = client.post("/oauth2/token", data={"grant_type": "client_credentials"}, auth=("fv-nobody", "x"),
                    headers=headers)
    assert r.status_code == 401


def test_real_client_behind_a_trusted_proxy_and_spoofing_ignored(proxied: Server, tmp_path: Path) -> None:
    with _from(proxied, "127.0.0.1") as proxy, _from(proxied, "127.0.0.2") as direct:
        _wrong_secret(proxy, {"X-Forwarded-For": "6.6.6.6, 203.0.113.50"})  # via the proxy
        _wrong_secret(direct, {"X-Forwarded-For": "203.0.113.51"})  # spoofed by a direct caller
        r = proxy.get("/fhir/metadata", headers={"X-Forwarded-Proto": "https"})
        assert r.json()["implementation"]["url"] == proxied.base_url.replace("http://", "https://") + "/fhir"
    sources = [r["source_ip"] for r in _records(proxied, tmp_path / "fhirvault.toml") if r["interaction"] == "token"]
    assert sources == ["203.0.113.50", "127.0.0.2"]


def test_rate_limit_429_then_recovery_per_real_client(proxied: Server) -> None:
    with _from(proxied, "127.0.0.1") as proxy:
        one = {"X-Forwarded-For": "203.0.113.77"}
        statuses = [proxy.get("/fhir/metadata", headers=one).status_code for _ in range(8)]
        assert statuses[:6] == [200] * 6 and 429 in statuses[6:], statuses
        r = proxy.get("/fhir/metadata", headers=one)
        assert r.status_code == 429 and r.json()["issue"][0]["code"] == "throttled"
        wait = int(r.headers["retry-after"])
        assert 1 <= wait <= 2
        # Behind the same proxy, another client has its own bucket (no clinic-wide lockout).
        assert proxy.get("/fhir/metadata", headers={"X-Forwarded-For": "203.0.113.78"}).status_code == 200
        time.sleep(wait + 0.1)
        assert proxy.get("/fhir/metadata", headers=one).status_code == 200


def test_host_header_and_client_allow_list_from_the_cli(server: Server) -> None:
    """Default settings: the README's curl on 127.0.0.1 works, a forged Host does not."""
    r = httpx.get(server.base_url + "/fhir/metadata")
    assert r.status_code == 200
    evil = httpx.get(server.base_url + "/fhir/metadata", headers={"Host": "evil.example"})
    assert evil.status_code == 400 and "evil.example" not in evil.text
    made = fhirvault("client", "create", "--data-dir", str(server.data_dir), "--name", "lab",
                     "--scope", "system/*.rs", "--allowed-source", "127.0.0.2/32")
    assert made.returncode == 0, made.stderr
    creds = json.loads(made.stdout)
    assert creds["allowed_sources"] == ["127.0.0.2/32"]
    with _from(server, "127.0.0.1") as elsewhere, _from(server, "127.0.0.2") as lab:
        r = elsewhere.post("/oauth2/token", data={"grant_type": "client_credentials"},
                           auth=(creds["client_id"], creds["client_secret"]))
        assert r.status_code == 401 and r.json()["error"] == "invalid_client"
        token = get_token(lab, creds)
        auth = {"Authorization": f"Bearer {token}"}
        assert lab.get("/fhir/Patient", headers=auth).status_code == 200
        refused = elsewhere.get("/fhir/Patient", headers=auth)
        assert refused.status_code == 403 and refused.json()["resourceType"] == "OperationOutcome"
