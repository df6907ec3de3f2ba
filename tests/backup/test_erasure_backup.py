"""Erasure reaches the database files and the backups; a tenant purge leaves nothing readable."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fhirvault.backup import erasure_ledger
from fhirvault.backup.engine import RestoreError, create_backup, list_backups, restore_backup
from fhirvault.backup.file_target import FileTarget
from fhirvault.bootstrap import initialise
from fhirvault.cli.main import main
from fhirvault.config import load_settings
from fhirvault.container import Container, TenantPurged, build
from fhirvault.domain.errors import OperationOutcomeError
from fhirvault.services.audit import AuditRecord
from fhirvault.services.keys import patient_compartment
from fhirvault.services.repository import RequestContext
from fhirvault.services.tenant_purge import purge_tenant, verify_certificate
from tests.backup.conftest import MARKER, all_object_bytes, file_target, root_of
from tests.conftest import PATIENT, observation


@dataclass
class Clinic:
    data_dir: Path
    container: Container
    target: FileTarget


@pytest.fixture
def clinic(tmp_path: Path) -> Iterator[Clinic]:
    data, target = tmp_path / "data", tmp_path / "target"
    data.mkdir(mode=0o700)
    # As an operator would: the backup target in the config file, so erasures publish the ledger to it.
    (data / "fhirvault.toml").write_text(f'[backup.targets.offsite]\nurl = "file://{target}"\nlocation = "FR"\n')
    settings = load_settings({"data_dir": data}, environ={})
    initialise(settings)
    container = build(settings)
    try:
        yield Clinic(data, container, file_target(target))
    finally:
        container.close()


def _create(c: Clinic, name: str) -> str:
    ctx = _admin(c.container)

    async def go() -> str:
        repo = c.container.repository
        r = await repo.create(ctx, "Patient", dict(PATIENT, name=[{"family": name}]))
        await repo.create(ctx, "Observation", observation(r.id))
        return r.id

    return asyncio.run(go())


def _record(r: object) -> AuditRecord:
    return AuditRecord(0, "gdpr-erase", "0", 200, "test", category="system", detail="test erasure")


def _erase(c: Clinic, pid: str) -> str:
    lc = c.container.lifecycle
    assert lc is not None
    result = lc.erase_sync(pid, _record, override_retention=True)
    assert result.key_id is not None
    return result.key_id


def _readable(data_dir: Path, pid: str) -> bool:
    container = build(load_settings({"data_dir": data_dir}, environ={}))
    try:
        return container.store.read_current(container.settings.tenant, "Patient", pid) is not None and \
            container.keys.existing(patient_compartment(pid)) is not None
    finally:
        container.close()


def _files(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("fhirvault.sqlite3*")))


@pytest.mark.sqlite_only
def test_erased_wrapped_key_leaves_the_database_file_and_wal(clinic: Clinic, monkeypatch: pytest.MonkeyPatch) -> None:
    keep, gone = _create(clinic, f"{MARKER}keep"), _create(clinic, f"{MARKER}gone")
    store, tenant = clinic.container.store, clinic.container.settings.tenant
    keys = clinic.container.keys
    rows = {pid: store.data_key_by_lookup(tenant, keys.compartment_lookup(patient_compartment(pid)))
            for pid in (keep, gone)}
    assert all(rows.values())
    assert rows[gone].wrapped in _files(clinic.data_dir)  # type: ignore[union-attr]
    _erase(clinic, gone)
    raw = _files(clinic.data_dir)
    assert rows[gone].wrapped not in raw and rows[gone].compartment not in raw  # type: ignore[union-attr]
    assert rows[keep].wrapped in raw  # type: ignore[union-attr]  # the scan does find a key that still exists
    assert MARKER.encode() not in raw


@pytest.mark.sqlite_only
def test_without_the_scrub_the_wal_would_keep_the_erased_key(clinic: Clinic, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for the test above: the checkpoint is what removes the key's old page image."""
    pid = _create(clinic, "x")
    store, tenant = clinic.container.store, clinic.container.settings.tenant
    row = store.data_key_by_lookup(tenant, clinic.container.keys.compartment_lookup(patient_compartment(pid)))
    assert row is not None
    monkeypatch.setattr(type(store), "scrub", lambda self: True)
    _erase(clinic, pid)
    assert row.wrapped in _files(clinic.data_dir)


def test_a_restored_old_backup_does_not_bring_an_erased_patient_back(clinic: Clinic, tmp_path: Path) -> None:
    kept, erased = _create(clinic, "kept"), _create(clinic, "erased")
    root = root_of(clinic.data_dir)
    create_backup(clinic.data_dir, clinic.target, root)
    key_id = _erase(clinic, erased)
    # The erasure put the signed ledger on the configured target at once.
    assert {e.key_id for e in erasure_ledger.fetch(clinic.target, _public(clinic)) or ()} == {key_id}
    oldest = list_backups(clinic.target).manifests[0].backup_id
    restored = tmp_path / "restored"
    restore_backup(clinic.target, restored, (clinic.data_dir / "root.key").read_bytes(), backup_id=oldest)
    assert {e.key_id for e in erasure_ledger.read_file(restored)} == {key_id}
    assert _readable(restored, kept)
    assert not _readable(restored, erased)  # the first start destroyed the key again
    container = build(load_settings({"data_dir": restored}, environ={}))
    try:
        assert container.store.data_key(container.settings.tenant, key_id) is None
        with pytest.raises(OperationOutcomeError) as exc:
            asyncio.run(container.repository.read(_admin(container), "Patient", erased))
        assert exc.value.status == 404
    finally:
        container.close()


def test_restore_fails_closed_without_a_ledger(clinic: Clinic, tmp_path: Path) -> None:
    _create(clinic, "x")
    create_backup(clinic.data_dir, clinic.target, root_of(clinic.data_dir))
    clinic.target.delete(erasure_ledger.object_key(_public(clinic)))
    key = (clinic.data_dir / "root.key").read_bytes()
    with pytest.raises(RestoreError, match="no erasure ledger"):
        restore_backup(clinic.target, tmp_path / "r1", key)
    assert not (tmp_path / "r1").exists()
    clinic.target.put(erasure_ledger.object_key(_public(clinic)), b'{"ledger": "{}", "public_key": "00", "signature": "00"}')
    with pytest.raises(RestoreError, match=r"malformed|signature"):
        restore_backup(clinic.target, tmp_path / "r2", key)
    with pytest.raises(RestoreError, match=r"malformed|signature"):  # a forged ledger is never "missing"
        restore_backup(clinic.target, tmp_path / "r3", key, allow_missing_ledger=True)
    clinic.target.delete(erasure_ledger.object_key(_public(clinic)))
    restore_backup(clinic.target, tmp_path / "r3", key, allow_missing_ledger=True)  # the operator's explicit choice
    assert (tmp_path / "r3" / "fhirvault.sqlite3").is_file()


def test_tenant_purge_leaves_nothing_readable(clinic: Clinic, tmp_path: Path) -> None:
    pid = _create(clinic, f"{MARKER}purge")
    root = root_of(clinic.data_dir)
    backup = create_backup(clinic.data_dir, clinic.target, root)
    tenant_rows = clinic.container.store.tenant_keys("default")
    before = _files(clinic.data_dir)
    assert tenant_rows[0].wrapped in before
    result = purge_tenant(clinic.container, reason="end of contract CT-2026-042", operator="dpo",
                          out_dir=tmp_path / "cert", destroy_root_key=False,
                          backups=lambda: {clinic.target.url: [backup.backup_id]})
    body = verify_certificate(json.loads(result.json_path.read_bytes()))
    assert body["tenant"] == "default" and body["backups"] == {clinic.target.url: [backup.backup_id]}
    assert body["destroyed"]["patient_keys"] == 1 and body["data"]["versions"] == 2
    assert "CERTIFICATE OF DELETION" in result.text_path.read_text()
    tampered = json.loads(result.json_path.read_bytes())
    tampered["certificate"]["data"]["versions"] = 1
    with pytest.raises(ValueError, match="altered"):
        verify_certificate(tampered)
    clinic.container.close()
    raw = _files(clinic.data_dir)
    assert tenant_rows[0].wrapped not in raw  # the tenant key is gone from the database file and WAL
    for _path, data in [*all_object_bytes(tmp_path / "target"), ("db", raw)]:
        assert MARKER.encode() not in data and b"Martin" not in data
    with pytest.raises(TenantPurged):
        build(load_settings({"data_dir": clinic.data_dir}, environ={}))
    with pytest.raises(RestoreError, match="purged after this backup"):
        restore_backup(clinic.target, tmp_path / "restored", (clinic.data_dir / "root.key").read_bytes())
    assert not (tmp_path / "restored").exists()
    assert pid


def test_cli_purge_needs_the_tenant_name_and_verifies(clinic: Clinic, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _create(clinic, "x")
    clinic.container.close()
    d = str(clinic.data_dir)
    assert main(["tenant", "purge", "--data-dir", d, "--yes-destroy-all-data", "wrong",
                 "--reason", "end of contract CT-1"]) == 2
    assert main(["patient", "hold", "--data-dir", d, "--id", "nobody", "--reason", "litigation file 2026-7"]) == 0
    assert main(["tenant", "purge", "--data-dir", d, "--yes-destroy-all-data", "default",
                 "--reason", "end of contract CT-1"]) == 3
    assert "legal-hold" in capsys.readouterr().err
    assert main(["patient", "release", "--data-dir", d, "--id", "nobody", "--reason", "litigation closed ok"]) == 0
    assert main(["tenant", "purge", "--data-dir", d, "--yes-destroy-all-data", "default", "--reason",
                 "end of contract CT-1", "--certificate-dir", str(tmp_path / "c"), "--destroy-root-key"]) == 0
    assert not (clinic.data_dir / "root.key").exists()
    cert = next((tmp_path / "c").glob("*.json"))
    assert main(["tenant", "verify-certificate", str(cert)]) == 0
    assert json.loads(cert.read_bytes())["certificate"]["destroyed"]["root_key_file_destroyed"] is True


def _public(c: Clinic) -> str:
    from fhirvault.backup.manifest import BackupKeys

    s = c.container.secrets
    return BackupKeys(s.get("backup"), s.get("backup-signing")).public_key_hex


def _admin(container: Container) -> RequestContext:
    from fhirvault.domain.scopes import Grants, parse_scopes
    from fhirvault.services.auth import Principal

    p = Principal("test", container.settings.tenant, "system/*.cruds", Grants(tuple(parse_scopes("system/*.cruds"))),
                  2**40, "t")
    return RequestContext(p, "test")


def test_cli_patient_commands_and_retention_run(clinic: Clinic, capsys: pytest.CaptureFixture[str]) -> None:
    pid = _create(clinic, "cli")
    clinic.container.close()
    d = str(clinic.data_dir)
    assert main(["patient", "erase", "--data-dir", d, "--id", pid, "--reason", "patient request art. 17"]) == 3
    assert "fr-csp-r1112-7" in capsys.readouterr().err
    assert main(["patient", "restrict", "--data-dir", d, "--id", pid, "--reason", "accuracy contested"]) == 0
    assert main(["patient", "status", "--data-dir", d, "--id", pid]) == 0
    status = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert status["restricted"] is True and status["retention_rule"] == "fr-csp-r1112-7"
    assert status["details"]["restricted"]["reason"] == "accuracy contested"
    assert main(["retention", "run", "--data-dir", d, "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["patients"] == 1 and report["due"] == 0 and report["dry_run"] is True
    assert main(["patient", "erase", "--data-dir", d, "--id", pid, "--reason", "unlawful processing found",
                 "--override-retention", "--operator", "dpo@clinic"]) == 0
    assert "erased" in capsys.readouterr().out
    assert not _readable(clinic.data_dir, pid)


def test_versions_written_after_the_read_are_erased_too(clinic: Clinic) -> None:
    """The erasure reads the key's versions before its transaction; one written in between must not survive."""
    pid = _create(clinic, "late")
    store, tenant = clinic.container.store, clinic.container.settings.tenant
    key = clinic.container.keys.existing(patient_compartment(pid))
    assert key is not None
    known = (store.max_seq(), store.key_versions(tenant, key))
    assert len(known[1]) == 2

    async def late() -> None:
        await clinic.container.repository.create(_admin(clinic.container), "Observation", observation(pid))

    asyncio.run(late())
    assert store.write_sync("t", lambda tx: tx.erase_key(tenant, key, known)) == (3, 3)
    assert store.key_versions(tenant, key) == [] and store.data_key(tenant, key) is None


def test_a_ledger_copy_given_by_the_operator_replaces_a_lost_target_ledger(clinic: Clinic, tmp_path: Path) -> None:
    erased = _create(clinic, "erased")
    create_backup(clinic.data_dir, clinic.target, root_of(clinic.data_dir))
    key_id = _erase(clinic, erased)
    clinic.target.delete(erasure_ledger.object_key(_public(clinic)))  # the target lost it
    key = (clinic.data_dir / "root.key").read_bytes()
    with pytest.raises(RestoreError, match="--erasure-ledger FILE"):
        restore_backup(clinic.target, tmp_path / "r1", key)
    copy = erasure_ledger.read_file(clinic.data_dir)  # the data directory's copy (or one kept with the escrow)
    restore_backup(clinic.target, tmp_path / "r2", key, erasure_entries=copy)
    assert {e.key_id for e in erasure_ledger.read_file(tmp_path / "r2")} == {key_id}
    assert not _readable(tmp_path / "r2", erased)
