"""FHIR Subscriptions (rest-hook) through the HTTP API, with a real receiver on loopback.

The app runs in-process with its lifespan (so the delivering singleton runs), on the engine under test
(TEST_DB_ENGINE). Loopback is not a public address: the settings allow 127.0.0.1/32 and http, as an
operator would for a receiver on the LAN; 127.0.0.2 stays refused.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest
from starlette.testclient import TestClient

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.domain.subscription import HEARTBEAT_EXT, OWNER_EXT
from fhirvault.services.subscription_settings import SubscriptionSettings
from fhirvault.web.app import create_app
from tests.conftest import App, engine_settings, get_token
from tests.integration.authz_support import mint
from tests.integration.identity_helpers import make_app, make_user
from tests.subscription_receiver import Receiver

FHIR_JSON = {"Content-Type": "application/fhir+json"}
LOINC = "http://loinc.org"
HEART_RATE = "8867-4"


def sub_settings(**overrides: Any) -> SubscriptionSettings:
    values: dict[str, Any] = {
        "allow_http": True, "allowed_networks": (ipaddress.ip_network("127.0.0.1/32"),), "poll_seconds": 0.05,
        "retry_initial_seconds": 0.05, "retry_max_seconds": 0.2, "max_attempts": 3, "min_heartbeat_seconds": 1,
    }
    values.update(overrides)
    return SubscriptionSettings(**values)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    settings = load_settings({"data_dir": tmp_path / "data", **engine_settings(tmp_path / "data")}, environ={})
    settings = dataclasses.replace(settings, subscriptions=sub_settings())
    creds = json.loads(initialise(settings).read_text())
    container = build(settings)
    with TestClient(create_app(container), base_url="http://testserver") as client:
        yield App(client, settings, creds, get_token(client, creds), container)


def subscription(endpoint: str, criteria: str, *, payload: bool = True, headers: list[str] | None = None,
                 **extra: Any) -> dict[str, Any]:
    channel: dict[str, Any] = {"type": "rest-hook", "endpoint": endpoint}
    if payload:
        channel["payload"] = "application/fhir+json"
    if headers:
        channel["header"] = headers
    channel.update(extra.pop("channel", {}))
    return {"resourceType": "Subscription", "status": "active", "reason": "test", "criteria": criteria,
            "channel": channel, **extra}


def observation(pid: str, code: str = HEART_RATE) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": LOINC, "code": code}]}, "valueQuantity": {"value": 72, "unit": "/min"}}


def create(app: App, resource: dict[str, Any], auth: dict[str, str] | None = None) -> dict[str, Any]:
    r = app.client.post(f"/fhir/{resource['resourceType']}", json=resource, headers={**(auth or app.auth), **FHIR_JSON})
    assert r.status_code == 201, r.text
    return dict(r.json())


def patient(app: App, pid: str | None = None) -> str:
    pid = pid or "p-" + uuid.uuid4().hex[:8]
    r = app.client.put(f"/fhir/Patient/{pid}", json={"resourceType": "Patient", "id": pid, "gender": "female"},
                       headers={**app.auth, **FHIR_JSON})
    assert r.status_code in (200, 201), r.text
    return pid


def wait_until(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def status_of(app: App, sid: str) -> dict[str, Any]:
    r = app.client.get(f"/fhir/Subscription/{sid}", headers=app.auth)
    assert r.status_code == 200, r.text
    return dict(r.json())


def active(app: App, sub: dict[str, Any], auth: dict[str, str] | None = None) -> dict[str, Any]:
    created = create(app, sub, auth)
    assert created["status"] == "requested"  # the server decides: the client's "active" is not taken
    return dict(wait_until(lambda: (s := status_of(app, created["id"]))["status"] == "active" and s))


def test_matching_write_is_posted_with_headers_and_resource(app: App, receiver: Receiver) -> None:
    pid = patient(app)
    sub = active(app, subscription(receiver.url, f"Observation?code={LOINC}|{HEART_RATE}&patient=Patient/{pid}",
                                   headers=["Authorization: Bearer receiver-secret", "X-Tenant: ward-7"]))
    owner = next(e for e in sub["extension"] if e["url"] == OWNER_EXT)
    assert {"url": "client", "valueString": app.creds["client_id"]} in owner["extension"]
    create(app, observation(pid, code="8310-5"))  # another code: no notification
    create(app, observation(patient(app)))  # another patient: none either
    obs = create(app, observation(pid))
    got = receiver.wait_for(1)
    time.sleep(0.5)
    assert len(receiver.received) == 1, "only the matching write is notified"
    note = got[0]
    assert note.path == "/hook"
    assert note.headers["authorization"] == "Bearer receiver-secret"
    assert note.headers["x-tenant"] == "ward-7"
    assert note.headers["content-type"].startswith("application/fhir+json")
    sent = orjson.loads(note.body)
    assert sent["id"] == obs["id"] and sent["resourceType"] == "Observation"
    assert sent["meta"]["versionId"] == "1"


def test_empty_payload_is_a_ping_and_updates_deletes_and_bundles_notify(app: App, receiver: Receiver) -> None:
    pid = patient(app)
    active(app, subscription(receiver.url, f"Observation?patient=Patient/{pid}", payload=False))
    obs = create(app, observation(pid))
    receiver.wait_for(1)
    assert receiver.received[0].body == b""
    assert "content-type" not in receiver.received[0].headers
    r = app.client.put(f"/fhir/Observation/{obs['id']}", json={**obs, "status": "amended"},
                       headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 200, r.text
    receiver.wait_for(2)
    assert app.client.delete(f"/fhir/Observation/{obs['id']}", headers=app.auth).status_code in (200, 204)
    receiver.wait_for(3)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": observation(pid), "request": {"method": "POST", "url": "Observation"}},
        {"resource": observation(pid), "request": {"method": "POST", "url": "Observation"}}]}
    r = app.client.post("/fhir", json=bundle, headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 200, r.text
    receiver.wait_for(5)


@pytest.mark.parametrize(("criteria", "status"), [
    ("Observation?no-such-parameter=1", 400),
    ("NotAType?code=1", 422),
    ("Observation?_sort=date", 422),
    ("AuditEvent?action=R", 422),
    ("", 422),
])
def test_invalid_criteria_are_refused_at_create(app: App, criteria: str, status: int) -> None:
    r = app.client.post("/fhir/Subscription", json=subscription("http://127.0.0.1:9/hook", criteria),
                        headers={**app.auth, **FHIR_JSON})
    assert r.status_code == status, r.text
    assert r.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("channel", [
    {"type": "websocket"},
    {"type": "rest-hook", "endpoint": "ftp://127.0.0.1/hook"},
    {"type": "rest-hook", "endpoint": "http://user:pw@127.0.0.1/hook"},
    {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook", "header": ["Host: evil.example"]},
    {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook", "header": ["no colon"]},
    {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook", "payload": "application/xml"},
])
def test_channels_the_server_cannot_honour_are_refused(app: App, channel: dict[str, Any]) -> None:
    body = {"resourceType": "Subscription", "status": "requested", "reason": "t", "criteria": "Observation?",
            "channel": channel}
    r = app.client.post("/fhir/Subscription", json=body, headers={**app.auth, **FHIR_JSON})
    assert r.status_code == 422, r.text


def test_retries_after_failures_then_delivers(app: App, receiver: Receiver) -> None:
    receiver.statuses = [500, 503]
    pid = patient(app)
    sub = active(app, subscription(receiver.url, f"Observation?patient=Patient/{pid}"))
    obs = create(app, observation(pid))
    got = receiver.wait_for(3)
    assert all(orjson.loads(g.body)["id"] == obs["id"] for g in got)
    time.sleep(0.5)
    assert len(receiver.received) == 3, "delivered once it succeeded, not again"
    assert status_of(app, sub["id"])["status"] == "active"


def test_error_status_after_max_attempts(app: App, receiver: Receiver) -> None:
    receiver.default = 500
    pid = patient(app)
    sub = active(app, subscription(receiver.url, f"Observation?patient=Patient/{pid}"))
    create(app, observation(pid))
    receiver.wait_for(3)
    failed = wait_until(lambda: (s := status_of(app, sub["id"]))["status"] == "error" and s)
    assert "3 times" in failed["error"] and "HTTP 500" in failed["error"]
    create(app, observation(pid))
    time.sleep(0.5)
    assert len(receiver.received) == 3, "an errored subscription sends nothing more"
    metrics = generate_latest(app.container.metrics.registry).decode()
    assert 'fhirvault_subscription_notifications_total{outcome="gave_up"} 1.0' in metrics
    assert 'fhirvault_subscription_notifications_total{outcome="failed"} 2.0' in metrics


@pytest.mark.parametrize("host", ["127.0.0.2", "169.254.169.254", "10.1.2.3"])
def test_non_public_endpoints_go_to_error_without_a_request(app: App, receiver: Receiver, host: str) -> None:
    sub = create(app, subscription(f"http://{host}:{receiver.port}/hook", "Observation?"))
    failed = wait_until(lambda: (s := status_of(app, sub["id"]))["status"] == "error" and s)
    assert "non-public address" in failed["error"]
    create(app, observation(patient(app)))
    time.sleep(0.3)
    assert receiver.received == []


def test_patient_owner_is_not_notified_of_another_patients_resource(app: App, receiver: Receiver) -> None:
    mine, other = patient(app), patient(app)
    app_id, _secret = make_app(app.container, scope="patient/*.cruds user/Subscription.cruds")
    person = make_user(app.container, "pat-" + mine, "patient", fhir_user=f"Patient/{mine}")
    token = mint(app.container, role="patient", user=person.user_id, fhir_user=f"Patient/{mine}", patient=mine,
                 scope="patient/Observation.rs user/Subscription.cruds", client_id=app_id)
    sub = active(app, subscription(receiver.url, "Observation?"), {"Authorization": f"Bearer {token}"})
    owner = next(e for e in sub["extension"] if e["url"] == OWNER_EXT)
    assert {"url": "patient", "valueString": mine} in owner["extension"]
    create(app, observation(other))
    theirs = create(app, observation(mine))
    receiver.wait_for(1)
    time.sleep(0.5)
    assert [orjson.loads(r.body)["id"] for r in receiver.received] == [theirs["id"]]
    audit = app.client.get("/fhir/AuditEvent", params={"subtype": "subscription-notify"}, headers=app.auth)
    assert audit.status_code == 200, audit.text
    events = [e["resource"] for e in audit.json().get("entry", [])]
    assert len(events) == 2, "one audit entry per notification: delivered, and withheld"
    text = orjson.dumps(events).decode()
    assert "notify withheld" in text  # a refusal says why (a success's detail is not shown)
    assert sorted(e["outcome"] for e in events)[0] == "0"


def test_revoked_client_subscription_stops(app: App, receiver: Receiver) -> None:
    new = app.container.auth.register_client("lab feed", "system/Observation.rs system/Subscription.cruds")
    assert new.client_secret is not None
    token = get_token(app.client, {"client_id": new.client_id, "client_secret": new.client_secret})
    pid = patient(app)
    sub = active(app, subscription(receiver.url, f"Observation?patient=Patient/{pid}"),
                 {"Authorization": f"Bearer {token}"})
    create(app, observation(pid))
    receiver.wait_for(1)
    app.container.auth.set_client_disabled(new.client_id, True)
    create(app, observation(pid))
    failed = wait_until(lambda: (s := status_of(app, sub["id"]))["status"] == "error" and s)
    assert "disabled" in failed["error"]
    time.sleep(0.3)
    assert len(receiver.received) == 1


def test_heartbeat_is_sent_without_writes(app: App, receiver: Receiver) -> None:
    active(app, subscription(receiver.url, "Observation?code=none|none", payload=False,
                             channel={"extension": [{"url": HEARTBEAT_EXT, "valueUnsignedInt": 1}]}))
    got = receiver.wait_for(2, timeout=10)
    assert all(g.body == b"" for g in got)


def test_off_subscription_sends_nothing(app: App, receiver: Receiver) -> None:
    pid = patient(app)
    sub = create(app, {**subscription(receiver.url, f"Observation?patient=Patient/{pid}"), "status": "off"})
    assert sub["status"] == "off"
    create(app, observation(pid))
    time.sleep(0.5)
    assert receiver.received == []


def test_writes_queue_nothing_without_subscriptions(app: App) -> None:
    create(app, observation(patient(app)))
    assert app.container.store.subscription_backlog() == (0, 0)


def test_capability_statement_lists_rest_hook_only(app: App) -> None:
    doc = app.client.get("/fhir/metadata").json()
    sub = next(r for r in doc["rest"][0]["resource"] if r["type"] == "Subscription")
    channels = [e["valueCode"] for e in sub["extension"] if e["url"].endswith("subscription-channel-type")]
    assert channels == ["rest-hook"]


def test_a_subscription_past_its_end_is_turned_off(app: App, receiver: Receiver) -> None:
    pid = patient(app)
    sub = create(app, {**subscription(receiver.url, f"Observation?patient=Patient/{pid}"),
                       "end": "2020-01-01T00:00:00Z"})
    wait_until(lambda: status_of(app, sub["id"])["status"] == "off")
    create(app, observation(pid))
    time.sleep(0.5)
    assert receiver.received == []
    history = app.client.get(f"/fhir/Subscription/{sub['id']}/_history", headers=app.auth).json()
    assert [e["resource"]["status"] for e in history["entry"]] == ["off", "requested"]  # the server's change


def test_a_subscription_in_xml(app: App, receiver: Receiver) -> None:
    xml = ('<Subscription xmlns="http://hl7.org/fhir"><status value="active"/><reason value="x"/>'
           '<criteria value="Observation?code=http://loinc.org|8867-4"/><channel>'
           f'<extension url="{HEARTBEAT_EXT}"><valueUnsignedInt value="120"/></extension>'
           f'<type value="rest-hook"/><endpoint value="{receiver.url}"/><payload value="application/fhir+json"/>'
           '<header value="Authorization: Bearer x"/></channel></Subscription>')
    r = app.client.post("/fhir/Subscription", content=xml, headers={
        **app.auth, "Content-Type": "application/fhir+xml", "Accept": "application/fhir+xml"})
    assert r.status_code == 201, r.text
    assert '<status value="requested"/>' in r.text and OWNER_EXT in r.text


def test_a_subscription_whose_owner_lost_a_scope_stops(app: App, receiver: Receiver) -> None:
    new = app.container.auth.register_client("lab feed", "system/Observation.rs system/Subscription.cruds")
    assert new.client_secret is not None
    token = get_token(app.client, {"client_id": new.client_id, "client_secret": new.client_secret})
    sub = active(app, subscription(receiver.url, "Observation?"), {"Authorization": f"Bearer {token}"})

    def narrowed(tx: Any) -> None:
        row = tx.client_for_update(new.client_id)
        tx.update_client(dataclasses.replace(row, scopes="system/Subscription.cruds"))

    app.container.store.write_sync("test.client-scopes", narrowed)
    create(app, observation(patient(app)))
    failed = wait_until(lambda: (s := status_of(app, sub["id"]))["status"] == "error" and s)
    assert "no longer has the scopes" in failed["error"]
    assert receiver.received == []


def test_capability_statement_lists_no_channel_when_subscriptions_are_disabled(tmp_path: Path) -> None:
    """[subscriptions] enabled = false refuses Subscriptions: the CapabilityStatement must not offer rest-hook."""
    config = tmp_path / "fhirvault.toml"
    config.write_text("[subscriptions]\nenabled = false\n")
    settings = load_settings({"data_dir": tmp_path / "data", **engine_settings(tmp_path / "data")}, environ={},
                             config_file=config)
    initialise(settings)
    container = build(settings)
    try:
        with TestClient(create_app(container), base_url="http://testserver") as client:
            doc = client.get("/fhir/metadata").json()
    finally:
        container.close()
    sub = next(r for r in doc["rest"][0]["resource"] if r["type"] == "Subscription")
    assert not [e for e in sub.get("extension", []) if e["url"].endswith("subscription-channel-type")]
    assert "disabled" in sub["documentation"]
