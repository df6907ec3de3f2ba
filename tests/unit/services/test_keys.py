from __future__ import annotations

from pathlib import Path

import pytest

from fhirvault.adapters.keyfile import KeyFileError, KeyFileProvider
from fhirvault.adapters.sqlite_store import SqliteStore
from fhirvault.container import SystemClock
from fhirvault.services.keys import KeyError_, KeyRing, patient_compartment


@pytest.fixture
def ring(tmp_path: Path) -> tuple[KeyRing, SqliteStore, KeyFileProvider]:
    root = KeyFileProvider.create(tmp_path / "root.key")
    store = SqliteStore(tmp_path / "db.sqlite3")
    ring = KeyRing(store, root, "default", SystemClock())
    ring.initialise()
    yield ring, store, root
    store.close()


def test_one_key_per_compartment_stable_across_reload(ring: tuple[KeyRing, SqliteStore, KeyFileProvider]) -> None:
    keys, store, root = ring
    a = keys.for_compartment_sync(patient_compartment("a"))
    b = keys.for_compartment_sync(patient_compartment("b"))
    assert a.key_id != b.key_id
    blob = a.aead.seal(b"secret", b"ad")
    fresh = KeyRing(store, root, "default", SystemClock())
    fresh.load()
    again = fresh.for_compartment_sync(patient_compartment("a"))
    assert again.key_id == a.key_id
    assert fresh.by_id(a.key_id).aead.open(blob, b"ad") == b"secret"
    assert fresh.by_id(a.key_id).compartment == "patient/a"


def test_tenant_rotation_rewraps_without_reencrypting(ring: tuple[KeyRing, SqliteStore, KeyFileProvider]) -> None:
    keys, store, root = ring
    k = keys.for_compartment_sync(patient_compartment("p1"))
    blob = k.aead.seal(b"data", b"")
    before = store.data_key("default", k.key_id)
    assert keys.rotate_tenant_key() == 2
    after = store.data_key("default", k.key_id)
    assert before is not None and after is not None
    assert after.kek_version == 2 and after.wrapped != before.wrapped
    reloaded = KeyRing(store, root, "default", SystemClock())
    reloaded.load()
    assert reloaded.by_id(k.key_id).aead.open(blob, b"") == b"data"
    assert reloaded.for_compartment_sync(patient_compartment("p1")).key_id == k.key_id


def test_root_rotation_and_wrong_root(ring: tuple[KeyRing, SqliteStore, KeyFileProvider], tmp_path: Path) -> None:
    keys, store, root = ring
    k = keys.for_compartment_sync("tenant")
    old = root.active_key_id
    root.begin_rotation()
    keys.rewrap_tenant_keys(root)
    root.retire(old)
    reloaded = KeyRing(store, KeyFileProvider.load(tmp_path / "root.key"), "default", SystemClock())
    reloaded.load()
    assert reloaded.by_id(k.key_id).key_id == k.key_id
    stranger = KeyFileProvider.create(tmp_path / "other.key")
    with pytest.raises(KeyError_):
        KeyRing(store, stranger, "default", SystemClock()).load()


def test_key_file_permissions_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    KeyFileProvider.create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    with pytest.raises(KeyFileError):
        KeyFileProvider.load(path)
    with pytest.raises(KeyFileError):
        KeyFileProvider.create(path)
