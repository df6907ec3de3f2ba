"""The erasure ledger's signed copies (backup/erasure_ledger.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fhirvault.backup import erasure_ledger as ledger
from tests.backup.conftest import file_target


def _key() -> tuple[Ed25519PrivateKey, str]:
    k = Ed25519PrivateKey.generate()
    return k, k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


A = ledger.Entry("default", ledger.PATIENT, "dk-a", 1)
B = ledger.Entry("default", ledger.PATIENT, "dk-b", 2)


def test_publish_merges_and_never_drops_entries(tmp_path: Path) -> None:
    target = file_target(tmp_path)
    key, public = _key()
    ledger.publish(target, {A}, key, public)
    assert ledger.publish(target, {B}, key, public) == {A, B}  # a node that only knew B does not erase A
    assert ledger.fetch(target, public) == {A, B}


def test_a_forged_or_foreign_ledger_is_refused(tmp_path: Path) -> None:
    target = file_target(tmp_path)
    key, public = _key()
    other, _ = _key()
    target.put(ledger.object_key(public), ledger.sign({A}, other))
    with pytest.raises(ledger.LedgerError, match="signature"):
        ledger.fetch(target, public)
    signed = ledger.sign({A, B}, key)
    target.put(ledger.object_key(public), signed.replace(b"dk-b", b"dk-c"))
    with pytest.raises(ledger.LedgerError, match="signature"):
        ledger.fetch(target, public)


def test_restore_refuses_a_backup_older_than_a_tenant_purge(tmp_path: Path) -> None:
    target = file_target(tmp_path)
    key, public = _key()
    ledger.publish(target, {ledger.Entry("default", ledger.TENANT, "", 500)}, key, public)
    with pytest.raises(ledger.LedgerError, match="purged after this backup"):
        ledger.for_restore(target, public, 400, allow_missing=False)
    with pytest.raises(ledger.LedgerError, match="no erasure ledger"):
        ledger.for_restore(file_target(tmp_path / "empty"), public, 400, allow_missing=False)
    assert ledger.for_restore(file_target(tmp_path / "empty"), public, 400, allow_missing=True) == set()


def test_file_copy_round_trips(tmp_path: Path) -> None:
    assert ledger.read_file(tmp_path) == set()
    ledger.write_file(tmp_path, {A, B})
    assert ledger.read_file(tmp_path) == {A, B}
    assert oct((tmp_path / ledger.LEDGER_FILE).stat().st_mode & 0o777) == "0o600"
