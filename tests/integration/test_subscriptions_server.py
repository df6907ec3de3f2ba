"""Subscriptions in real server processes: queued notifications survive a kill, and with two worker
processes each notification is sent once (one worker holds the delivering role)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Server, start_server
from tests.integration.test_subscriptions import observation, subscription, wait_until
from tests.subscription_receiver import Receiver

pytestmark = pytest.mark.server

FHIR_JSON = {"Content-Type": "application/fhir+json"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


def configure(data_dir: Path) -> None:
    """As an operator would for a receiver on the LAN: loopback and http allowed, fast retries."""
    data_dir.mkdir(mode=0o700, parents=True)
    config = data_dir / "fhirvault.toml"
    config.write_text('[subscriptions]\nallow_http = true\nallowed_networks = ["127.0.0.1/32"]\npoll_seconds = 0.1\n'
                      "retry_initial_seconds = 1.0\nretry_max_seconds = 1.0\nmax_attempts = 20\n")
    config.chmod(0o600)


def post(c: httpx.Client, resource: dict[str, Any]) -> dict[str, Any]:
    r = c.post(f"/{resource['resourceType']}", json=resource, headers=FHIR_JSON)
    assert r.status_code == 201, r.text
    return dict(r.json())


def subscribe(srv: Server, endpoint: str) -> tuple[httpx.Client, str]:
    c = srv.client()
    pid = post(c, {"resourceType": "Patient", "gender": "male"})["id"]
    sid = post(c, subscription(endpoint, f"Observation?patient=Patient/{pid}"))["id"]
    wait_until(lambda: c.get(f"/Subscription/{sid}").json()["status"] == "active", timeout=30)
    return c, pid


def test_queued_notifications_survive_a_kill(tmp_path: Path, receiver: Receiver) -> None:
    receiver.default = 503
    data = tmp_path / "data"
    configure(data)
    srv = start_server(data, tmp_path / "server.log")
    try:
        c, pid = subscribe(srv, receiver.url)
        try:
            obs = post(c, observation(pid))
        finally:
            c.close()
        receiver.wait_for(1, timeout=30)  # tried once, refused: queued for a retry
    finally:
        srv.kill_all()
    tried = len(receiver.received)
    receiver.default = 200
    srv = start_server(data, tmp_path / "server2.log")
    try:
        got = receiver.wait_for(tried + 1, timeout=30)
        assert orjson.loads(got[-1].body)["id"] == obs["id"]
        wait_until(lambda: len(receiver.received) == tried + 1, timeout=5)
    finally:
        srv.stop()


def test_two_workers_deliver_each_notification_once(tmp_path: Path, receiver: Receiver) -> None:
    data = tmp_path / "data"
    configure(data)
    srv = start_server(data, tmp_path / "server.log", "--workers", "2")
    try:
        c, pid = subscribe(srv, receiver.url)
        try:
            ids = {post(c, observation(pid))["id"] for _ in range(12)}
        finally:
            c.close()
        got = receiver.wait_for(12, timeout=30)
        time.sleep(1.5)  # a second delivering worker would have sent its copies by now
        assert len(receiver.received) == 12
        assert {orjson.loads(g.body)["id"] for g in got} == ids
    finally:
        srv.stop()
