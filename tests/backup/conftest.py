"""Helpers for the backup tests: seeding a real server, a file target, reading a data dir's state."""

from __future__ import annotations

import uuid
from pathlib import Path

from fhirvault.adapters.keyfile import KeyFileProvider
from fhirvault.backup.drill import DataState, data_state
from fhirvault.backup.file_target import FileTarget
from fhirvault.config import load_settings
from tests.conftest import PATIENT, Server, observation

FHIR_JSON = {"Content-Type": "application/fhir+json"}
MARKER = "Zqxvtorbhmarker"  # planted in patient names: must never appear on a target or in a report


def seed(server: Server, patients: int, obs_each: int = 0, *, marker: str = MARKER, per_bundle: int = 50) -> list[str]:
    """Create patients (and observations) through transaction Bundles; returns the patient ids."""
    ids: list[str] = []
    entries: list[dict[str, object]] = []
    with server.client() as c:
        def flush() -> None:
            if not entries:
                return
            r = c.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries}, headers=FHIR_JSON)
            assert r.status_code == 200, r.text
            for e in r.json()["entry"]:
                loc = e["response"]["location"]
                if loc.startswith("Patient/"):
                    ids.append(loc.split("/")[1])
            entries.clear()

        for n in range(patients):
            full = f"urn:uuid:{uuid.uuid4()}"
            body = dict(PATIENT, name=[{"family": f"{marker}{n}", "given": ["Claire"]}])
            entries.append({"fullUrl": full, "resource": body, "request": {"method": "POST", "url": "Patient"}})
            for _ in range(obs_each):
                o = observation("x")
                o["subject"] = {"reference": full}
                entries.append({"resource": o, "request": {"method": "POST", "url": "Observation"}})
            if len(entries) >= per_bundle:
                flush()
        flush()
    return ids


def file_target(path: Path) -> FileTarget:
    return FileTarget(path, "FR")


def root_of(data_dir: Path) -> KeyFileProvider:
    return KeyFileProvider.load(data_dir / "root.key")


def state(data_dir: Path, until_seq: int | None = None, root_key: Path | None = None) -> DataState:
    cli: dict[str, object] = {"data_dir": data_dir}
    if root_key is not None:
        cli["root_key_file"] = root_key
    return data_state(load_settings(cli, environ={}), until_seq)


def all_object_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]
