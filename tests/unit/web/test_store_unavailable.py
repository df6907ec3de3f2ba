"""What a client hears when the store loses its database mid-write (in-process app, SQLite underneath)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.ports import StoreUnavailable, WriteTx
from fhirvault.web.app import create_app
from tests.conftest import PATIENT, get_token

FHIR_JSON = {"Content-Type": "application/fhir+json"}


class CutOff:
    """The next resource write fails as when the connection broke during COMMIT ('stored': after it
    committed, 'lost': without committing), or before anything was sent ('before')."""

    def __init__(self, store: Any) -> None:
        self._write = store.write
        self.next: str | None = None
        store.write = self.write

    async def write(self, name: str, fn: Callable[[WriteTx], Any]) -> Any:
        if self.next is None or not name.startswith("resource."):
            return await self._write(name, fn)
        mode, self.next = self.next, None
        if mode == "stored":
            await self._write(name, fn)
        raise StoreUnavailable("connection lost", outcome_unknown=mode != "before")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[TestClient, CutOff, dict[str, str]]]:
    settings = load_settings({"data_dir": tmp_path / "d"}, environ={})
    creds = json.loads(initialise(settings).read_text())
    container = build(settings)
    cut = CutOff(container.store)
    with TestClient(create_app(container)) as client:
        yield client, cut, {"Authorization": f"Bearer {get_token(client, creds)}", **FHIR_JSON}


def test_a_create_cut_off_after_its_commit_is_acknowledged_because_it_is_stored(
        app: tuple[TestClient, CutOff, dict[str, str]]) -> None:
    client, cut, auth = app
    cut.next = "stored"
    r = client.post("/fhir/Patient", json=PATIENT, headers=auth)
    assert r.status_code == 201, r.text
    assert client.get(f"/fhir/Patient/{r.json()['id']}", headers=auth).json()["name"] == PATIENT["name"]


def test_a_create_whose_outcome_is_unknown_is_a_503_never_a_201(
        app: tuple[TestClient, CutOff, dict[str, str]]) -> None:
    client, cut, auth = app
    cut.next = "lost"
    r = client.post("/fhir/Patient", json=PATIENT, headers=auth)
    assert r.status_code == 503 and r.headers["Retry-After"].isdigit()
    assert "could not be established" in r.json()["issue"][0]["diagnostics"]
    assert client.get("/fhir/Patient", headers=auth).json()["total"] == 0


def test_an_if_match_update_cut_off_after_its_commit_answers_200_not_412(
        app: tuple[TestClient, CutOff, dict[str, str]]) -> None:
    client, cut, auth = app
    created = client.post("/fhir/Patient", json=PATIENT, headers=auth).json()
    cut.next = "stored"
    r = client.put(f"/fhir/Patient/{created['id']}", json=dict(created, active=False),
                   headers={**auth, "If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == "2"
    cut.next = "lost"  # not stored, outcome unknown: not repeated (a repeat could only say 412)
    r = client.put(f"/fhir/Patient/{created['id']}", json=dict(created, active=True),
                   headers={**auth, "If-Match": 'W/"2"'})
    assert r.status_code == 503


def test_a_conditional_create_cut_off_is_repeated_and_finds_what_it_stored(
        app: tuple[TestClient, CutOff, dict[str, str]]) -> None:
    client, cut, auth = app
    ident = {"system": "urn:example:mrn", "value": "CUT-1"}
    cut.next = "stored"
    r = client.post("/fhir/Patient", json=dict(PATIENT, identifier=[ident]),
                    headers={**auth, "If-None-Exist": "identifier=CUT-1"})
    assert r.status_code == 200  # the repeat found the resource the first attempt stored
    assert client.get("/fhir/Patient", params={"identifier": "CUT-1"}, headers=auth).json()["total"] == 1


def test_a_plain_write_failed_before_its_commit_is_a_503_left_to_the_client(
        app: tuple[TestClient, CutOff, dict[str, str]]) -> None:
    client, cut, auth = app
    cut.next = "before"
    r = client.post("/fhir/Patient", json=PATIENT, headers=auth)
    assert r.status_code == 503 and r.json()["issue"][0]["code"] == "transient"
    assert client.get("/fhir/Patient", headers=auth).json()["total"] == 0
