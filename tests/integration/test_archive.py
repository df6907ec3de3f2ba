"""The reversibility archive from the CLI: export, verify (and catch tampering), import into a fresh data
directory with every version identical, and an audit log that verifies."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.ports import HistoryQuery
from tests import pg_server
from tests.conftest import PATIENT, engine_settings, observation, start_server

JSON = {"Content-Type": "application/fhir+json"}


def fhirvault(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRVAULT_")}
    return subprocess.run([sys.executable, "-m", "fhirvault.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _fresh_dir(path: Path) -> Path:
    """A new data directory for the engine under test (PostgreSQL: its own database, named in its config)."""
    if pg_server.engine() == "postgresql":
        path.mkdir(mode=0o700)
        (path / "fhirvault.toml").write_text("".join(f'{k} = "{v}"\n' for k, v in engine_settings(path).items()))
    return path


def _every_version(data_dir: Path) -> dict[tuple[str, str, int], tuple[int, bool, Any]]:
    """(type, id, version) -> (lastUpdated ms, deleted, the resource) of every version in a data directory."""
    settings = load_settings({"data_dir": data_dir}, config_file=data_dir / "fhirvault.toml"
                             if (data_dir / "fhirvault.toml").exists() else None, environ={})
    container = build(settings)
    try:
        rows = container.store.history(HistoryQuery(settings.tenant, limit=100_000))
        return {(v.type, v.id, v.version): (v.last_updated_ms, v.deleted,
                                             None if v.deleted else orjson.loads(container.repository._open(v)))
                for v in rows}
    finally:
        container.close()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A server's data directory with history (updates, a deletion, a consent), stopped, and its archive."""
    base = tmp_path_factory.mktemp("arc")
    srv = start_server(base / "data", base / "server.log")
    try:
        with srv.client() as c:
            pid = c.post("/Patient", json=PATIENT, headers=JSON).json()["id"]
            for family in ("Martin-Roux", "Roux"):
                body = {**PATIENT, "id": pid, "name": [{"family": family}]}
                assert c.put(f"/Patient/{pid}", json=body, headers=JSON).status_code == 200
            oid = c.post("/Observation", json=observation(pid), headers=JSON).json()["id"]
            assert c.delete(f"/Observation/{oid}").status_code == 204
            consent = {"resourceType": "Consent", "status": "active", "scope": {"coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
                "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                "patient": {"reference": f"Patient/{pid}"}}
            assert c.post("/Consent", json=consent, headers=JSON).status_code == 201
            assert c.get(f"/Patient/{pid}").status_code == 200
    finally:
        srv.stop()
    secret = base / "pw"
    secret.write_text("correct horse battery staple 42\n")
    r = fhirvault("user", "create", "--data-dir", str(base / "data"), "--username", "dr.house",
                  "--role", "practitioner", "--fhir-user", "Practitioner/p1", "--password-file", str(secret))
    assert r.returncode == 0, r.stderr
    archive = base / "archive"
    r = fhirvault("archive", "export", "--data-dir", str(base / "data"), "--out", str(archive))
    assert r.returncode == 2 and "NOT encrypted" in r.stderr and not archive.exists()  # needs the confirmation
    r = fhirvault("archive", "export", "--data-dir", str(base / "data"), "--out", str(archive), "--yes-plaintext")
    assert r.returncode == 0, r.stderr
    assert "NOT encrypted" in r.stderr
    out = json.loads(r.stdout)
    assert out["resources"] == 3 and out["versions"] == 6
    return base / "data", archive, out["signing_key_fingerprint"]


@pytest.mark.server
def test_archive_is_complete_private_and_without_secrets(exported: tuple[Path, Path, str]) -> None:
    data, archive, fp = exported
    assert archive.stat().st_mode & 0o777 == 0o700
    manifest = json.loads((archive / "manifest.json").read_text())
    paths = {f["path"]: f for f in manifest["files"]}
    assert {"README.md", "config.json", "audit/entries.ndjson", "audit/checkpoints.ndjson", "audit/log-key.json",
            "identity/clients.ndjson", "resources/Patient.ndjson", "resources/Observation.ndjson",
            "resources/Observation.deleted.ndjson", "resources/Consent.ndjson"} <= set(paths)
    assert paths["resources/Patient.ndjson"]["count"] == 3
    assert manifest["signing_key"]["fingerprint"] == fp
    patients = [json.loads(x) for x in (archive / "resources/Patient.ndjson").read_text().splitlines()]
    assert sorted(p["meta"]["versionId"] for p in patients) == ["1", "2", "3"]
    deleted = json.loads((archive / "resources/Observation.deleted.ndjson").read_text())
    assert deleted["versionId"] == "2" and deleted["lastUpdated"].endswith("Z")
    everything = "".join(p.read_text() for p in archive.rglob("*") if p.is_file())
    creds = json.loads((data / "admin-client.json").read_text())
    assert creds["client_secret"] not in everything
    assert "$argon2" not in everything  # no password or client secret hashes
    users = [json.loads(x) for x in (archive / "identity/users.ndjson").read_text().splitlines()]
    assert [(u["username"], u["role"]) for u in users] == [("dr.house", "practitioner")]
    assert "correct horse" not in everything
    assert "(redacted)" in everything or "secret" not in (archive / "config.json").read_text()
    entries = [json.loads(x) for x in (archive / "audit/entries.ndjson").read_text().splitlines()]
    assert entries[-1]["record"]["interaction"] == "archive-export"  # the export is in the trail it exports


@pytest.mark.server
def test_a_tampered_segment_fails(exported: tuple[Path, Path, str], tmp_path: Path) -> None:
    _data, archive, _fp = exported
    target = _fresh_dir(tmp_path / "seg")
    assert fhirvault("archive", "import", str(archive), "--data-dir", str(target)).returncode == 0
    (kept,) = (target / "archived-audit").glob("*.sealed")
    kept.chmod(0o600)
    raw = bytearray(kept.read_bytes())
    raw[-20] ^= 1
    kept.write_bytes(bytes(raw))
    r = fhirvault("archive", "verify-segments", "--data-dir", str(target))
    assert r.returncode == 1 and "does not open" in r.stderr, r.stdout + r.stderr


@pytest.mark.server
def test_verify_detects_tampering(exported: tuple[Path, Path, str], tmp_path: Path) -> None:
    _data, archive, fp = exported
    r = fhirvault("archive", "verify", str(archive), "--fingerprint", fp)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "archive OK" in r.stdout and "audit log OK" in r.stdout
    assert fhirvault("archive", "verify", str(archive), "--fingerprint", "00" * 32).returncode == 1

    def copy() -> Path:
        target = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        subprocess.run(["cp", "-a", str(archive), str(target)], check=True)
        return target

    changed = copy()
    path = changed / "resources/Patient.ndjson"
    path.write_text(path.read_text().replace("Roux", "Rouy", 1))
    r = fhirvault("archive", "verify", str(changed))
    assert r.returncode == 1 and "resources/Patient.ndjson: SHA-256" in r.stdout
    # Re-hashing the file in the manifest breaks the signature instead.
    manifest = json.loads((changed / "manifest.json").read_text())
    import hashlib

    for f in manifest["files"]:
        if f["path"] == "resources/Patient.ndjson":
            f["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (changed / "manifest.json").write_text(json.dumps(manifest, indent=2))
    r = fhirvault("archive", "verify", str(changed))
    assert r.returncode == 1 and "signature" in r.stdout
    # An audit entry dropped, with the manifest re-signed by another key: the signed checkpoints catch it.
    dropped = copy()
    audit = dropped / "audit/entries.ndjson"
    lines = audit.read_text().splitlines(keepends=True)
    audit.write_text("".join(lines[:1] + lines[2:]))
    _resign(dropped)
    r = fhirvault("archive", "verify", str(dropped))
    assert r.returncode == 1 and "audit trail" in r.stdout, r.stdout
    extra = copy()
    (extra / "resources/Extra.ndjson").write_text("{}\n")
    assert "not listed" in fhirvault("archive", "verify", str(extra)).stdout


def _resign(root: Path) -> None:
    """Recompute the manifest's hashes and sign it with a new key (what a forger could do)."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from fhirvault.services.archive import fingerprint

    manifest = json.loads((root / "manifest.json").read_text())
    for f in manifest["files"]:
        data = (root / f["path"]).read_bytes()
        f["sha256"], f["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
        if "count" in f:
            f["count"] = data.count(b"\n")
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    manifest["signing_key"] = {"algorithm": "Ed25519", "public_key": base64.b64encode(public).decode(),
                               "fingerprint": fingerprint(public)}
    body = json.dumps(manifest).encode()
    (root / "manifest.json").write_bytes(body)
    (root / "manifest.sig").write_text(base64.b64encode(key.sign(b"fhirvault-archive-manifest-v1\n" + body)).decode())


@pytest.mark.server
def test_import_restores_every_version_and_a_verifying_audit_log(exported: tuple[Path, Path, str],
                                                                   tmp_path: Path) -> None:
    data, archive, fp = exported
    target = _fresh_dir(tmp_path / "new")
    r = fhirvault("archive", "import", str(archive), "--data-dir", str(target), "--fingerprint", fp)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["versions"] == 6
    assert _every_version(target) == _every_version(data)  # ids, version ids, lastUpdated, content, deletions
    verify = fhirvault("audit", "verify", "--data-dir", str(target))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # Re-encrypted under the new instance's keys: no name in clear anywhere in its data directory.
    assert not [p for p in target.rglob("*") if p.is_file() and b"Martin-Roux" in p.read_bytes()]
    # The old trail is kept sealed (its records name patients), and verifies when opened.
    kept = target / "archived-audit" / (result["archive_manifest_sha256"] + ".sealed")
    assert kept.is_file() and b"archive-export" not in kept.read_bytes()
    segment = fhirvault("archive", "verify-segments", "--data-dir", str(target))
    assert segment.returncode == 0 and f"signed by {fp}" in segment.stdout, segment.stdout + segment.stderr
    assert "audit log OK" in segment.stdout
    # A second import into the same instance is refused (it is no longer fresh).
    again = fhirvault("archive", "import", str(archive), "--data-dir", str(target))
    assert again.returncode == 1 and "fresh" in again.stderr
    # The imported instance serves and searches what it imported.
    srv = start_server(target, tmp_path / "new.log")
    try:
        with srv.client() as c:
            found = c.get("/Patient?family=Roux").json()
            assert found["total"] == 1 and found["entry"][0]["resource"]["meta"]["versionId"] == "3"
            pid = found["entry"][0]["resource"]["id"]
            assert len(c.get(f"/Patient/{pid}/_history").json()["entry"]) == 3
    finally:
        srv.stop()
